"""One fuzz target per sans-IO decoder, and one for the whole session.

A target takes bytes and returns nothing. It may let exactly the errors the decoder promises
(``RemoteProtocolError``; ``InvalidProxyHeader`` for the PROXY parser) pass silently; any other
exception, or a failed ``check``, is a finding. Besides "does not crash", each target checks the
decoder's own promise where one exists: the framer hands back exactly the bytes it was fed, a
decoded A-ASSOCIATE-RQ/AC or command set re-encodes to something that decodes the same, a
stream that lets every message pass forwards a prefix of its input, byte for byte, and the
session ends at most once, with nothing after the end.

The targets import no fuzzing engine: ``fuzz/run.py`` drives them under atheris, and
``tests/test_fuzz_corpus.py`` replays the committed corpus and every finding through them in
the normal test suite. Adding a decoder (e.g. the data-set parser) is one more function with
``@target("name")`` here and a ``fuzz/corpus/<name>/`` directory of seeds.

Read splits, decide answers and the like come from the input's CRC-32, so a run is
reproducible from the input alone (``python -m fuzz.run --replay FILE``) and every mutation of
the bytes also explores other splits.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from typing import Final

from dicomfw.core import acse, pdu, proxy
from dicomfw.core.content import ContentRules, DataSetInspector, Kind, Message
from dicomfw.core.dimse import DimseCommand, decode_command, encode_response
from dicomfw.core.policy import AllowRule, Peer, Policy, Route
from dicomfw.core.ratelimit import Gate, Limiter, LimitRules, RateLimits
from dicomfw.core.session import (
    AssociationEnded,
    AssociationRejected,
    Command,
    ConnectUpstream,
    Session,
    Side,
    Wakeup,
)
from dicomfw.core.stream import FORWARD, HOLD, SWALLOW, DataStream
from dicomfw.errors import RemoteProtocolError

Target = Callable[[bytes], None]
#: Every target by name, in the order ``fuzz.run`` shares time among them.
TARGETS: dict[str, Target] = {}

#: The PDU cap of the framer, stream and session targets. Small enough that the fuzzer meets it.
CAP: Final = 65_536
#: Every odd presentation context ID: the stream targets accept them all, so what they reach
#: is the PDV walker, not the context check.
ALL_CONTEXTS: Final = frozenset(range(1, 256, 2))
#: AE titles and addresses of the captured peers (``fuzz/capture.py``), so the session target's
#: policy admits the corpus and the fuzzer starts in the data phase.
CALLING_AE: Final = "MODALITY"
ADDRESS: Final = ip_address("127.0.0.1")


class FindingError(AssertionError):
    """A target's own check failed: the decoder broke a promise without raising."""


def check(condition: bool, what: str) -> None:
    """An assertion that also holds under ``python -O``."""
    if not condition:
        raise FindingError(what)


def target(name: str) -> Callable[[Target], Target]:
    def register(function: Target) -> Target:
        TARGETS[name] = function
        return function

    return register


def reads(data: bytes) -> list[bytes]:
    """``data`` cut into reads as the input's CRC-32 says: one read, single bytes, or random
    cuts (small pieces around headers are where framers go wrong)."""
    rng = random.Random(zlib.crc32(data))
    mode = rng.randrange(4)
    if mode == 0 or not data:
        return [data] if data else []
    if mode == 1 and len(data) <= 4096:
        return [data[i : i + 1] for i in range(len(data))]
    pieces, pos = [], 0
    while pos < len(data):
        size = rng.choice((1, 2, 5, 6, 7, 11, 12, 13, rng.randrange(1, 4096)))
        pieces.append(data[pos : pos + size])
        pos += size
    return pieces


# ---- PDU framer ---------------------------------------------------------------------------------


@target("framer")
def framer(data: bytes) -> None:
    """``PduBuffer``: whatever it returns plus what it keeps is exactly what it was fed."""
    buffer = pdu.PduBuffer(CAP)
    out: list[bytes] = []
    try:
        for piece in reads(data):
            for pdu_type, raw in buffer.feed(piece):
                check(raw[0] == pdu_type, "PDU type differs from its first byte")
                check(len(raw) - 6 == int.from_bytes(raw[2:6], "big"), "PDU length mismatch")
                check(len(raw) - 6 <= CAP, "a PDU over the cap was returned")
                out.append(raw)
    except RemoteProtocolError:
        return
    check(b"".join(out) + buffer.take_rest() == data, "framer lost or invented bytes")


# ---- A-ASSOCIATE-RQ / AC / RJ -------------------------------------------------------------------


def _rq_fields(rq: acse.AssociateRQ) -> tuple[object, ...]:
    contexts = tuple((c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts)
    return (rq.protocol_version, rq.called_ae, rq.calling_ae, rq.application_context, contexts)


@target("acse_rq")
def acse_rq(data: bytes) -> None:
    """``decode_rq``, then: the re-encoded request decodes to the same request, keeps every
    item it did not change byte for byte, and re-encoding it again changes nothing."""
    try:
        rq = acse.decode_rq(data)
    except RemoteProtocolError:
        return
    encoded = acse.encode_rq(rq, rq.contexts, CAP)
    again = acse.decode_rq(encoded)
    check(_rq_fields(again) == _rq_fields(rq), "re-encoded A-ASSOCIATE-RQ decodes differently")
    check(all(c.raw in encoded for c in rq.contexts), "a presentation context item changed")
    check(acse.encode_rq(again, again.contexts, CAP) == encoded, "re-encoding is not stable")
    narrowed = tuple(acse.narrow(c, c.transfer_syntaxes[:1]) for c in rq.contexts[::2])
    check(
        [c.transfer_syntaxes for c in acse.decode_rq(acse.encode_rq(rq, narrowed, CAP)).contexts]
        == [c.transfer_syntaxes for c in narrowed],
        "a narrowed request does not carry exactly the narrowed contexts",
    )


@target("acse_ac")
def acse_ac(data: bytes) -> None:
    """``decode_ac``, then the A-ASSOCIATE-AC for a requester whose request proposed the same
    contexts: one result per proposed context, the upstream's own items byte for byte."""
    try:
        ac = acse.decode_ac(data)
    except RemoteProtocolError:
        return
    ids = sorted({c.context_id for c in ac.contexts if c.context_id % 2})
    contexts = tuple(
        acse.ProposedContext(cid, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",), b"") for cid in ids
    )
    if not contexts:
        return
    rq = acse.AssociateRQ(1, "PACS", CALLING_AE, ac.application_context, contexts, b"", None)
    refused = {cid: 3 for cid in ids[1::3]}
    for_requester = acse.encode_ac_for_requester(data, ac, rq, refused, CAP)
    decoded = acse.decode_ac(for_requester)
    check([c.context_id for c in decoded.contexts] == ids, "not one result per proposed context")
    check(
        all(decoded.contexts[n].result == 3 for n, cid in enumerate(ids) if cid in refused),
        "a firewall refusal did not reach the requester",
    )


@target("acse_rj")
def acse_rj(data: bytes) -> None:
    """A-ASSOCIATE-RJ (and the other fixed-size PDUs) through the framer: the three fields
    read back as the firewall writes them."""
    buffer = pdu.PduBuffer(CAP)
    try:
        pdus = [found for piece in reads(data) for found in buffer.feed(piece)]
    except RemoteProtocolError:
        return
    for pdu_type, raw in pdus:
        if pdu_type == pdu.A_ASSOCIATE_RJ:
            result, source, reason = pdu.rj_fields(raw)
            written = pdu.associate_rj(result, source, reason)
            check(pdu.rj_fields(written) == (result, source, reason), "RJ fields do not round-trip")
        elif pdu_type == pdu.A_ABORT:
            source, reason = pdu.fixed_fields(raw)
            check(pdu.fixed_fields(pdu.abort(source, reason))[0] == source, "abort source lost")


# ---- DIMSE command sets ------------------------------------------------------------------------


@target("dimse")
def dimse(data: bytes) -> None:
    """``decode_command``, then the firewall's refusal of it decodes as a final response to it."""
    try:
        command = decode_command(data)
    except RemoteProtocolError:
        return
    status = zlib.crc32(data) & 0xFFFF
    response = decode_command(encode_response(command, status, "dicomfw: fuzz"))
    check(response.is_response and response.status == status, "refusal status lost")
    check(response.command_field == command.command_field | 0x8000, "refusal answers another")
    check(response.message_id == (command.message_id or 0), "refusal answers another message")
    check(response.sop_class == command.sop_class, "refusal names another SOP class")
    check(response.sop_instance == command.sop_instance, "refusal names another SOP instance")
    check(not response.has_data_set, "a refusal announces a data set")


# ---- P-DATA-TF walker ---------------------------------------------------------------------------


@target("stream")
def stream(data: bytes) -> None:
    """``DataStream.feed`` in any split. When every message passes, what it forwards is always
    a prefix of its input, byte for byte. Otherwise, as the session does, messages are
    forwarded, swallowed or held (a held message's data-set fragments shown to ``inspect``,
    which forwards, swallows or keeps holding it; one still held at its end is settled, and
    reading goes on with what was left unread), refusals are injected and reading halts now
    and then; nothing is read after an A-ABORT."""
    rng = random.Random(zlib.crc32(data) ^ 0x5A5A)
    filtering = rng.random() < 0.5
    decided: list[int] = []
    walkers: list[DataStream] = []

    def decide(context_id: int, command: DimseCommand) -> int:
        decided.append(context_id)
        number = command.message_id or 0
        if not filtering:
            return FORWARD
        if number % 5 == 0:
            walkers[0].halt()
        if number % 7 == 0:
            return HOLD
        return SWALLOW if number % 3 == 0 else FORWARD

    def inspect(fragment: memoryview, last: bool) -> int:
        return (FORWARD, SWALLOW, HOLD, HOLD)[fragment[0] % 4 if len(fragment) else 3]

    walker = DataStream(ALL_CONTEXTS, CAP, decide, inspect)
    walkers.append(walker)
    out = bytearray()
    pending = reads(data)
    try:
        while pending:
            for buffer in walker.feed(pending.pop(0)):
                out += buffer
            if walker.waiting or (filtering and rng.random() < 0.1):
                for buffer in walker.settle(rng.random() < 0.5):
                    out += buffer
            unread = walker.take_unread()
            if pdu.A_ABORT in walker.control_pdus:
                break
            walker.control_pdus.clear()
            if unread:
                pending.insert(0, unread)
            if filtering and decided and rng.random() < 0.3:
                for buffer in walker.inject(pdu.p_data_tf([pdu.pdv(decided[-1], 3, bytes(8))])):
                    out += buffer
    except RemoteProtocolError:
        pass
    if not filtering:
        check(data.startswith(bytes(out)), "an all-pass stream forwarded bytes it was not fed")


# ---- PROXY protocol v2 --------------------------------------------------------------------------


@target("proxy")
def proxy_header(data: bytes) -> None:
    """``ProxyHeaderReader`` fed at most ``need`` bytes at a time, as the relay does: a header,
    an ``InvalidProxyHeader``, or a request for more; never a read past the header."""
    reader = proxy.ProxyHeaderReader()
    rng = random.Random(zlib.crc32(data))
    pos = 0
    try:
        while pos < len(data):
            size = min(reader.need, rng.choice((1, 3, reader.need)))
            header = reader.feed(data[pos : pos + size])
            pos += size
            if header is not None:
                check(reader.need == 0, "a complete header still needs bytes")
                check(proxy.parse(data[:pos]) == header, "reader and parse disagree")
                check(pos <= proxy.MAX_HEADER_BYTES, "a header longer than the bound was accepted")
                return
    except proxy.InvalidProxyHeader:
        return


# ---- data sets (content validation) ------------------------------------------------------------

#: The first byte of a ``dataset`` input chooses what the data set travels as: (command field,
#: transfer syntax), so one corpus covers every encoding the walker reads.
DATASET_CONTEXTS: Final = (
    (0x0001, "1.2.840.10008.1.2"),  # C-STORE-RQ, Implicit VR Little Endian
    (0x0001, "1.2.840.10008.1.2.1"),  # Explicit VR Little Endian
    (0x0001, "1.2.840.10008.1.2.2"),  # Explicit VR Big Endian
    (0x0001, "1.2.840.10008.1.2.1.99"),  # Deflated Explicit VR Little Endian
    (0x0001, "1.2.840.10008.1.2.4.50"),  # JPEG Baseline: encapsulated Pixel Data
    (0x0020, "1.2.840.10008.1.2"),  # C-FIND-RQ identifier
    (0x8020, "1.2.840.10008.1.2.1"),  # C-FIND-RSP identifier
    (0x0021, "1.2.840.10008.1.2"),  # C-MOVE-RQ identifier
)
#: Every check on, with small bounds the fuzzer can reach.
DATASET_RULES: Final = ContentRules(
    conformance=True,
    max_depth=6,
    max_elements=2_000,
    max_instance_bytes=CAP,
    max_inflated_bytes=4 * CAP,
    max_value_bytes=4_096,
    max_document_bytes=CAP,
    required=(0x00080018,),
    refused=frozenset({0x00101000}),
    private_creators=frozenset({"DICOMFW"}),
    universal_match_refused={"STUDY": frozenset({0x00100020})},
    document_types=frozenset({"application/pdf"}),
)


@target("dataset")
def dataset(data: bytes) -> None:
    """``DataSetInspector.feed`` (the data-set walker and every content check) on any bytes in
    any split, with every check on: findings only, never an exception, nothing after a
    structural finding's walk has stopped."""
    if not data:
        return
    command_field, transfer_syntax = DATASET_CONTEXTS[data[0] % len(DATASET_CONTEXTS)]
    study_find = "1.2.840.10008.5.1.4.1.2.2.1"
    sop_class = "1.2.840.10008.5.1.4.1.1.2" if command_field == 0x0001 else study_find
    message = Message(command_field, sop_class, "1.2.3.4", sop_class, transfer_syntax)
    inspector = DataSetInspector(DATASET_RULES, message)
    pieces = reads(data[1:]) or [b""]
    for number, piece in enumerate(pieces):
        for finding in inspector.feed(piece, number == len(pieces) - 1):
            check(isinstance(finding.kind, Kind) and bool(finding.check), "a malformed finding")


# ---- the session --------------------------------------------------------------------------------

#: Operations of a session script: each record is (operation byte, 16-bit length, payload).
FROM_REQUESTER, FROM_UPSTREAM, IDLE, REQUESTER_LOST, UPSTREAM_LOST, ABORT, UNREACHABLE, REPORT = (
    range(8)
)
_RECORD: Final = struct.Struct(">BH")


def records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The (operation, payload) records of a session script; a short tail is a last payload."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < _RECORD.size:
            yield FROM_REQUESTER, data[pos:]
            return
        operation, length = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        yield operation % 8, data[pos : pos + length]
        pos += length


def script(steps: list[tuple[int, bytes]]) -> bytes:
    """The inverse of ``records``: how ``fuzz/capture.py`` writes a transcript as a seed."""
    out = bytearray()
    for operation, payload in steps:
        for start in range(0, max(len(payload), 1), 0xFFFF):
            chunk = payload[start : start + 0xFFFF]
            out += _RECORD.pack(operation, len(chunk)) + chunk
    return bytes(out)


def fuzz_policy() -> Policy:
    """What the captured peers may do: route PACS allows every service on every SOP class;
    route STRICT (rewriting the called AE) allows C-ECHO and CT storage only, so that the
    fuzzer also meets refused contexts and refused requests."""
    verification, ct = "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2"
    services = frozenset({"C-ECHO", "C-STORE", "C-FIND", "C-MOVE", "C-GET"}) | frozenset(
        f"N-{name}" for name in ("EVENT-REPORT", "GET", "SET", "ACTION", "CREATE", "DELETE")
    )
    return Policy(
        peers=(Peer(CALLING_AE, (ip_network("127.0.0.0/8"),)),),
        routes=(
            Route("pacs", "front", "PACS", "pacs", (AllowRule(services),)),
            Route(
                "strict",
                "front",
                "STRICT",
                "pacs",
                (
                    AllowRule(frozenset({"C-ECHO", "C-STORE"}), frozenset({verification, ct})),
                    AllowRule(frozenset({"C-MOVE"}), None, None, frozenset({"WS1"})),
                ),
                upstream_called_ae="PACS",
            ),
        ),
    )


POLICY: Final = fuzz_policy()


class SessionRun:
    """One session driven by a script, checked against its contract after every input."""

    def __init__(self, max_refusals: int) -> None:
        self.now = 0.0
        rates = RateLimits(requests_per_minute_per_association={"C-ECHO": 2, "C-FIND": 1})
        gate = Limiter().connect(LimitRules(rates), "front", ADDRESS)
        assert isinstance(gate, Gate)
        self.session = Session(
            POLICY, "front", ADDRESS, None, CAP, gate, lambda: self.now, max_refusals
        )
        self.ended = False
        self.connecting = False
        self.waking = False

    def answer(self, commands: list[Command]) -> None:
        if self.ended:
            check(commands == [], f"commands after the end: {commands!r}")
            return
        ends = [c for c in commands if isinstance(c, AssociationEnded | AssociationRejected)]
        check(len(ends) <= 1, f"ended twice: {commands!r}")
        if ends:
            check(commands[-1] is ends[0], f"the end is not the last command: {commands!r}")
            self.ended = True
        self.connecting |= any(isinstance(c, ConnectUpstream) for c in commands)
        self.waking |= any(isinstance(c, Wakeup) for c in commands)

    def step(self, operation: int, payload: bytes) -> None:
        session = self.session
        if self.connecting:
            self.connecting = False
            if operation == UNREACHABLE:
                self.answer(session.upstream_failed("fuzz"))
                return
            self.answer(session.upstream_connected())
        if self.waking:
            self.waking = False
            self.now += 60.0
            self.answer(session.wakeup())
        if operation == FROM_REQUESTER:
            for piece in reads(payload):
                self.answer(session.receive(Side.REQUESTER, piece))
        elif operation == FROM_UPSTREAM:
            for piece in reads(payload):
                self.answer(session.receive(Side.UPSTREAM, piece))
        elif operation == IDLE:
            self.answer(session.timed_out("idle"))
        elif operation == REQUESTER_LOST:
            self.answer(session.connection_lost(Side.REQUESTER))
        elif operation == UPSTREAM_LOST:
            self.answer(session.connection_lost(Side.UPSTREAM))
        elif operation == ABORT:
            self.answer(session.abort("shutdown"))
        elif operation == REPORT:
            self.now += 11.0
            session.take_report(final=False)


@target("session")
def session(data: bytes) -> None:
    """A whole association from a script of both sides' bytes, timers and closes: commands and
    events, never an exception; it ends at most once, last, with nothing after; and it does end
    once both connections are gone."""
    run = SessionRun(max_refusals=(0, 1, 5)[zlib.crc32(data) % 3])
    for operation, payload in records(data):
        run.step(operation, payload)
    run.answer(run.session.connection_lost(Side.REQUESTER))
    run.answer(run.session.connection_lost(Side.UPSTREAM))
    check(run.ended, "both connections lost and the association did not end")
