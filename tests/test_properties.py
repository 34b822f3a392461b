"""Every sans-IO decoder, on generated input (hypothesis): round trips on what real peers send,
and on anything else in any split into reads, a result or the decoder's own protocol error.

What well-formed input looks like comes from an encoder independent of the code under test
(pynetdicom for A-ASSOCIATE PDUs and command sets, ``struct`` for framing and PROXY headers),
with every field drawn: AE titles, UIDs, context IDs and transfer syntaxes, Maximum Length,
message IDs, statuses, fragment sizes, how PDVs share PDUs. Hostile input is that input
mutated, or noise. The session has its own properties: tests/test_core_contract.py (any input,
ends once, blames the hostile side) and tests/test_session_stateful.py (random interleavings).

Adding a decoder (the data-set parser, say): its round trip and its any-bytes property here,
one function in fuzz/targets.py, seeds in fuzz/corpus/<target>/ (tests/test_fuzz_corpus.py
replays them).

The example counts are bounded and derandomized so the suite stays fast and every CI run checks
the same cases; raise ``max_examples`` locally to explore (the fuzz targets in fuzz/ explore
the same decoders guided by coverage).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom.pdu import A_ASSOCIATE_RJ

from dicomfw.core import acse, pdu
from dicomfw.core.dimse import MAX_COMMAND_BYTES, DimseCommand, decode_command, encode_response
from dicomfw.core.proxy import (
    MAX_HEADER_BYTES,
    InvalidProxyHeader,
    ProxyHeader,
    ProxyHeaderReader,
)
from dicomfw.core.stream import FORWARD, SWALLOW, DataStream
from dicomfw.errors import RemoteProtocolError
from tests.corehelpers import (
    associate_ac,
    associate_rq,
    c_echo_rq,
    c_echo_rsp,
    c_find_rq,
    c_find_rsp,
    c_move_rq,
    c_move_rsp,
    c_store_rq,
    c_store_rsp,
    decoded_command,
    decoded_rq,
    joined,
    p_data,
    pdv,
    pdvs_of,
    release_rq,
)
from tests.sizes import retained_bytes
from tests.test_core_contract import mutated, reads
from tests.test_core_proxy import header as proxy_header

CAP = 65_536
PROPERTY = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- strategies ---------------------------------------------------------------------------------

#: PS3.5 §9.1: components of digits, no leading zero (except "0"), dots between, 64 at most.
uids = (
    st.lists(st.integers(0, 99_999_999), min_size=2, max_size=9)
    .map(lambda parts: ".".join(map(str, parts)))
    .filter(lambda uid: len(uid) <= 64)
)
#: PS3.5 Table 6.2-1: 1-16 characters of the default repertoire, no backslash or control
#: characters; leading and trailing spaces are padding, so none are drawn.
ae_titles = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"),
    min_size=1,
    max_size=16,
)
context_ids = st.lists(st.integers(0, 127).map(lambda n: 2 * n + 1), min_size=1, unique=True)
max_lengths = st.integers(1, CAP)


@st.composite
def proposed_contexts(draw: st.DrawFn) -> list[tuple[int, str, list[str]]]:
    ids = draw(context_ids.map(lambda ids: ids[:12]))
    return [
        (cid, draw(uids), draw(st.lists(uids, min_size=1, max_size=4, unique=True))) for cid in ids
    ]


def hostile(data: st.DataObject, honest: bytes) -> bytes:
    return data.draw(st.binary(max_size=300)) if data.draw(st.booleans()) else mutated(data, honest)


# ---- PDU framer ---------------------------------------------------------------------------------


@st.composite
def pdu_streams(draw: st.DrawFn) -> bytes:
    """Well-formed PDUs of every type back to back (bodies are opaque to the framer)."""
    out = bytearray()
    for pdu_type in draw(st.lists(st.integers(1, 7), min_size=1, max_size=8)):
        fixed = pdu_type in (pdu.A_ASSOCIATE_RJ, pdu.A_RELEASE_RQ, pdu.A_RELEASE_RP, pdu.A_ABORT)
        body = draw(st.binary(min_size=4, max_size=4) if fixed else st.binary(max_size=600))
        out += pdu.HEADER.pack(pdu_type, len(body)) + body
    return bytes(out)


@PROPERTY
@given(st.data())
def test_the_framer_returns_exactly_the_pdus_it_was_fed_in_any_split(data: st.DataObject) -> None:
    stream = data.draw(pdu_streams())
    buffer = pdu.PduBuffer(CAP)
    found = [raw for piece in reads(data, stream) for _, raw in buffer.feed(piece)]
    assert b"".join(found) == stream
    assert buffer.take_rest() == b""


@PROPERTY
@given(st.data())
def test_the_framer_on_any_bytes_keeps_them_all_or_refuses_and_never_holds_over_a_pdu(
    data: st.DataObject,
) -> None:
    cap = data.draw(st.sampled_from((4, 100, CAP)))
    stream = hostile(data, data.draw(pdu_streams()))
    buffer = pdu.PduBuffer(cap)
    found: list[bytes] = []
    try:
        for piece in reads(data, stream):
            found += [raw for _, raw in buffer.feed(piece)]
            # What waits is one PDU in reassembly at most, its length checked from the header.
            assert retained_bytes(buffer) <= pdu.HEADER_SIZE + cap + len(piece) + 200
    except RemoteProtocolError:
        return
    assert all(len(raw) - pdu.HEADER_SIZE <= cap for raw in found)
    assert b"".join(found) + buffer.take_rest() == stream


# ---- A-ASSOCIATE-RQ / AC / RJ -------------------------------------------------------------------


@PROPERTY
@given(
    calling=ae_titles,
    called=ae_titles,
    contexts=proposed_contexts(),
    max_length=max_lengths,
    roles=st.lists(uids, max_size=3),
    identity=st.none()
    | st.tuples(st.binary(min_size=1, max_size=40), st.binary(min_size=1, max_size=40)),
)
def test_a_request_pynetdicom_encodes_decodes_and_re_encodes_to_the_same_bytes(
    calling: str,
    called: str,
    contexts: list[tuple[int, str, list[str]]],
    max_length: int,
    roles: list[str],
    identity: tuple[bytes, bytes] | None,
) -> None:
    raw = associate_rq(
        calling, called, contexts, max_length=max_length, roles=roles, user_identity=identity
    )
    rq = acse.decode_rq(raw)
    assert (rq.calling_ae, rq.called_ae, rq.max_length) == (calling, called, max_length)
    assert [(c.context_id, c.abstract_syntax, list(c.transfer_syntaxes)) for c in rq.contexts] == [
        (cid, abstract, transfer) for cid, abstract, transfer in contexts
    ]
    # Nothing changed: every byte of the peer's request goes upstream as it came.
    assert acse.encode_rq(rq, rq.contexts, CAP) == raw


@PROPERTY
@given(data=st.data(), contexts=proposed_contexts(), max_length=st.integers(0, 2**32 - 1))
def test_a_narrowed_request_keeps_the_peers_bytes_of_every_context_it_did_not_change(
    data: st.DataObject, contexts: list[tuple[int, str, list[str]]], max_length: int
) -> None:
    raw = associate_rq("CT01", "PACS", contexts, max_length=max_length)
    rq = acse.decode_rq(raw)
    kept: list[acse.ProposedContext] = []
    for context in rq.contexts:
        if data.draw(st.booleans()):  # dropped
            continue
        if data.draw(st.booleans()):  # narrowed to one of its transfer syntaxes
            context = acse.narrow(context, (data.draw(st.sampled_from(context.transfer_syntaxes)),))
        kept.append(context)
    kept = kept or [rq.contexts[0]]
    called = data.draw(ae_titles)
    upstream = acse.encode_rq(replace(rq, called_ae=called), tuple(kept), CAP)
    pynetdicom_view = decoded_rq(upstream)
    assert pynetdicom_view.called_ae_title == called
    assert [c.context_id for c in pynetdicom_view.presentation_context] == [
        c.context_id for c in kept
    ]
    for context in kept:
        if context.raw:
            assert context.raw in upstream
    clamped = acse.decode_rq(upstream).max_length
    assert clamped == (CAP if max_length == 0 or max_length > CAP else max_length)
    # The other user information sub-items (after Maximum Length) go as the peer sent them.
    assert rq.user_information[12:] in upstream


@PROPERTY
@given(
    calling=ae_titles,
    called=ae_titles,
    contexts=proposed_contexts(),
    results=st.lists(st.sampled_from((0, 1, 2, 3, 4)), min_size=12, max_size=12),
    max_length=max_lengths,
)
def test_an_ac_that_answers_every_context_reaches_the_requester_byte_for_byte(
    calling: str,
    called: str,
    contexts: list[tuple[int, str, list[str]]],
    results: list[int],
    max_length: int,
) -> None:
    rq = acse.decode_rq(associate_rq(calling, called, contexts))
    answers = [(cid, results[n], transfer[0]) for n, (cid, _, transfer) in enumerate(contexts)]
    raw = associate_ac(calling, called, answers, max_length=max_length)
    ac = acse.decode_ac(raw)
    assert [(c.context_id, c.result) for c in ac.contexts] == [(c, r) for c, r, _ in answers]
    assert ac.max_length == max_length
    assert acse.encode_ac_for_requester(raw, ac, rq, {}, CAP) == raw


@PROPERTY
@given(
    contexts=proposed_contexts(),
    data=st.data(),
)
def test_the_ac_for_the_requester_has_one_result_per_proposed_context_whatever_was_refused(
    contexts: list[tuple[int, str, list[str]]], data: st.DataObject
) -> None:
    rq = acse.decode_rq(associate_rq("CT01", "PACS", contexts))
    refusals = st.sampled_from((3, 4))
    refused = {c.context_id: data.draw(refusals) for c in rq.contexts if data.draw(st.booleans())}
    answered = [c for c in rq.contexts if c.context_id not in refused and data.draw(st.booleans())]
    raw = associate_ac(
        "CT01", "PACS", [(c.context_id, 0, c.transfer_syntaxes[0]) for c in answered]
    )
    for_requester = acse.decode_ac(
        acse.encode_ac_for_requester(raw, acse.decode_ac(raw), rq, refused, CAP)
    )
    expected = [
        (c.context_id, refused.get(c.context_id, 0 if c in answered else acse.PC_NO_REASON))
        for c in rq.contexts
    ]
    assert [(c.context_id, c.result) for c in for_requester.contexts] == expected


@PROPERTY
@given(st.data())
def test_any_association_pdu_decodes_or_is_the_peers_protocol_error(data: st.DataObject) -> None:
    honest = data.draw(
        st.sampled_from(
            (
                associate_rq("CT01", "PACS", [(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]),
                associate_ac("CT01", "PACS", [(1, 0, "1.2.840.10008.1.2")]),
            )
        )
    )
    raw = hostile(data, honest)
    for decode in (acse.decode_rq, acse.decode_ac):
        with contextlib.suppress(RemoteProtocolError):
            decode(raw)


@PROPERTY
@given(result=st.integers(0, 255), source=st.integers(0, 255), reason=st.integers(0, 255))
def test_an_a_associate_rj_reads_back_the_same_in_pynetdicom_and_the_framer(
    result: int, source: int, reason: int
) -> None:
    raw = pdu.associate_rj(result, source, reason)
    ((pdu_type, framed),) = pdu.PduBuffer(CAP).feed(raw)
    assert pdu_type == pdu.A_ASSOCIATE_RJ and pdu.rj_fields(framed) == (result, source, reason)
    decoded = A_ASSOCIATE_RJ()
    decoded.decode(raw)
    assert (decoded.result, decoded.source, decoded.reason_diagnostic) == (result, source, reason)


# ---- DIMSE command sets -------------------------------------------------------------------------

message_ids = st.integers(1, 65_535)
statuses = st.integers(0, 0xFFFF)


KINDS = ("echo", "echo-rsp", "store", "store-rsp", "find", "find-rsp", "move", "move-rsp")


@st.composite
def command_sets(draw: st.DrawFn) -> tuple[bytes, DimseCommand]:
    """A command set pynetdicom encodes, with the fields ``decode_command`` must read from it."""
    kind = draw(st.sampled_from(KINDS))
    message_id, sop_class, instance, status = draw(st.tuples(message_ids, uids, uids, statuses))
    verification = "1.2.840.10008.1.1"
    pending = status in (0xFF00, 0xFF01)
    built: dict[str, Callable[[], tuple[bytes, DimseCommand]]] = {
        "echo": lambda: (
            c_echo_rq(message_id),
            DimseCommand(0x0030, message_id, verification, "", None, False, None),
        ),
        "echo-rsp": lambda: (
            c_echo_rsp(message_id, status),
            DimseCommand(0x8030, message_id, verification, "", None, False, status),
        ),
        "store": lambda: (
            c_store_rq(message_id, sop_class, instance),
            DimseCommand(0x0001, message_id, sop_class, instance, None, True, None),
        ),
        "store-rsp": lambda: (
            c_store_rsp(message_id, status, sop_class, instance),
            DimseCommand(0x8001, message_id, sop_class, instance, None, False, status),
        ),
        "find": lambda: (
            c_find_rq(message_id, sop_class),
            DimseCommand(0x0020, message_id, sop_class, "", None, True, None),
        ),
        "find-rsp": lambda: (
            c_find_rsp(message_id, status, sop_class),
            DimseCommand(0x8020, message_id, sop_class, "", None, pending, status),
        ),
        "move": lambda: (
            c_move_rq(message_id, destination, sop_class),
            DimseCommand(0x0021, message_id, sop_class, "", destination, True, None),
        ),
        "move-rsp": lambda: (
            c_move_rsp(message_id, status, sop_class),
            DimseCommand(0x8021, message_id, sop_class, "", None, False, status),
        ),
    }
    destination = draw(ae_titles)
    return built[kind]()


@PROPERTY
@given(command_sets())
def test_a_command_set_pynetdicom_encodes_decodes_to_its_fields(
    command: tuple[bytes, DimseCommand],
) -> None:
    raw, expected = command
    assert decode_command(raw) == expected


@PROPERTY
@given(
    command_sets(),
    statuses,
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),
)
def test_the_firewalls_refusal_of_any_request_reads_as_its_final_response_in_pydicom(
    command: tuple[bytes, DimseCommand], status: int, comment: str
) -> None:
    request = decode_command(command[0])
    response = encode_response(request, status, comment)
    assert decode_command(response) == DimseCommand(
        request.command_field | 0x8000,
        request.message_id,
        request.sop_class,
        request.sop_instance,
        None,
        False,
        status,
    )
    read = decoded_command(response)
    assert (read.MessageIDBeingRespondedTo, read.Status) == (request.message_id, status)
    assert len(read.get("ErrorComment", "")) <= 64


@PROPERTY
@given(st.data())
def test_any_command_set_decodes_or_is_the_peers_protocol_error(data: st.DataObject) -> None:
    raw = hostile(data, data.draw(command_sets())[0])
    with contextlib.suppress(RemoteProtocolError):
        decode_command(raw)


# ---- P-DATA-TF walker (DataStream) --------------------------------------------------------------

CONTEXTS = frozenset({1, 3, 5})


@st.composite
def transcripts(draw: st.DrawFn) -> tuple[bytes, list[list[bytes]]]:
    """A data phase: DIMSE messages (command, then a data set when it announces one), each cut
    into fragments, the PDVs packed several to a PDU or one each (a PDU may end one message and
    start the next), then maybe an A-RELEASE-RQ. Also returns each message's PDVs."""
    messages: list[list[bytes]] = []
    for number in range(draw(st.integers(1, 6))):
        context = draw(st.sampled_from(sorted(CONTEXTS)))
        message_id = number + 1
        make = draw(st.sampled_from((c_echo_rq, c_store_rq, c_find_rq)))
        command = make(message_id)
        data_set = draw(st.binary(max_size=3000)) if decode_command(command).has_data_set else None
        pdvs = _fragments(draw, context, 0x01, command)
        if data_set is not None:
            pdvs += _fragments(draw, context, 0x00, data_set)
        messages.append(pdvs)
    flat = [item for message in messages for item in message]
    stream = bytearray()
    while flat:
        take = draw(st.integers(1, min(4, len(flat))))
        stream += p_data(*flat[:take])
        del flat[:take]
    if draw(st.booleans()):
        stream += release_rq()
    return bytes(stream), messages


def _fragments(draw: st.DrawFn, context: int, kind: int, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=4))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [
        pdv(context, kind | (0x02 if n == len(pieces) - 1 else 0), piece)
        for n, piece in enumerate(pieces)
    ]


def forwarded_pdvs(stream: bytes) -> list[bytes]:
    """The PDV items of every P-DATA-TF in ``stream``, as raw bytes."""
    found = []
    pos = 0
    while pos < len(stream):
        length = struct.unpack_from(">L", stream, pos + 2)[0]
        whole = stream[pos : pos + 6 + length]
        if whole[0] == pdu.P_DATA_TF:
            found += [pdv(context, control, data) for context, control, data in pdvs_of(whole)]
        pos += 6 + length
    return found


@PROPERTY
@given(st.data(), transcripts())
def test_the_data_stream_forwards_every_message_it_passes_byte_for_byte_in_any_split(
    data: st.DataObject, transcript: tuple[bytes, list[list[bytes]]]
) -> None:
    stream, _ = transcript
    stream_out = DataStream(CONTEXTS, CAP, lambda context, command: FORWARD)
    out = [buffer for piece in reads(data, stream) for buffer in stream_out.feed(piece)]
    assert joined(out) == stream
    assert stream_out.at_message_boundary


@PROPERTY
@given(st.data(), transcripts())
def test_a_refused_message_is_cut_out_whole_and_every_other_pdv_passes_unchanged(
    data: st.DataObject, transcript: tuple[bytes, list[list[bytes]]]
) -> None:
    stream, messages = transcript
    refused = set(data.draw(st.lists(st.integers(1, len(messages)), max_size=len(messages))))
    walker = DataStream(
        CONTEXTS,
        CAP,
        lambda context, command: SWALLOW if command.message_id in refused else FORWARD,
    )
    out = joined(buffer for piece in reads(data, stream) for buffer in walker.feed(piece))
    expected = [
        item for n, message in enumerate(messages, 1) if n not in refused for item in message
    ]
    assert forwarded_pdvs(out) == expected
    assert walker.control_pdus == ([pdu.A_RELEASE_RQ] if stream.endswith(release_rq()) else [])


@PROPERTY
@given(st.data(), transcripts())
def test_any_data_phase_bytes_are_forwarded_as_a_prefix_or_refused_and_nothing_is_amplified(
    data: st.DataObject, transcript: tuple[bytes, list[list[bytes]]]
) -> None:
    """Hostile bytes: what passes is always a prefix of what came (an all-pass stream invents
    nothing), and what the stream holds never grows past what it was fed plus a constant, so
    the caps (one PDU, ``MAX_COMMAND_BYTES``) bound it whatever the PDV layout."""
    stream = hostile(data, transcript[0])
    walker = DataStream(CONTEXTS, CAP, lambda context, command: FORWARD)
    out = bytearray()
    fed = 0
    try:
        for piece in reads(data, stream):
            fed += len(piece)
            out += joined(walker.feed(piece))
            walker.take_unread()
            assert retained_bytes(walker) <= 2 * min(fed, CAP + MAX_COMMAND_BYTES) + 4096
    except RemoteProtocolError:
        pass
    assert stream.startswith(bytes(out))


# ---- PROXY protocol v2 --------------------------------------------------------------------------

tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=80)), max_size=5).map(
    lambda items: b"".join(bytes((kind,)) + struct.pack(">H", len(v)) + v for kind, v in items)
)


@st.composite
def proxy_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    ports = draw(st.tuples(st.integers(0, 65535), st.integers(0, 65535)))
    if draw(st.booleans()):
        source, destination = (
            IPv4Address(draw(st.integers(0, 2**32 - 1))),
            IPv4Address(draw(st.integers(0, 2**32 - 1))),
        )
        family = 0x11
    else:
        source, destination = (
            IPv6Address(draw(st.integers(0, 2**128 - 1))),
            IPv6Address(draw(st.integers(0, 2**128 - 1))),
        )
        family = 0x21
    body = source.packed + destination.packed + struct.pack(">HH", *ports)
    expected = ProxyHeader("PROXY", (source, ports[0]), (destination, ports[1]))
    return proxy_header(0x21, family, body, draw(tlvs)), expected


def read_header(data: st.DataObject, stream: bytes) -> tuple[ProxyHeader | None, int]:
    """Feed at most ``need`` bytes at a time, in drawn pieces; (header, bytes consumed)."""
    reader = ProxyHeaderReader()
    pos = 0
    while pos < len(stream):
        take = min(reader.need, data.draw(st.integers(1, 64)))
        found = reader.feed(stream[pos : pos + take])
        pos += take
        if found is not None:
            assert reader.need == 0
            return found, pos
    return None, pos


@PROPERTY
@given(st.data(), proxy_headers())
def test_a_proxy_header_reads_as_its_addresses_and_not_one_byte_of_what_follows_is_taken(
    data: st.DataObject, encoded: tuple[bytes, ProxyHeader]
) -> None:
    raw, expected = encoded
    following = associate_rq("CT01", "PACS", [(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])])
    assert read_header(data, raw + following) == (expected, len(raw))


@PROPERTY
@given(st.data(), proxy_headers())
def test_any_bytes_before_dicom_are_a_proxy_header_or_refused_within_the_header_bound(
    data: st.DataObject, encoded: tuple[bytes, ProxyHeader]
) -> None:
    stream = hostile(data, encoded[0])
    try:
        _, consumed = read_header(data, stream)
    except InvalidProxyHeader:
        return
    assert consumed <= MAX_HEADER_BYTES
