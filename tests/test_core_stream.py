"""The data-phase hot path: P-DATA-TF relayed byte-identical, however TCP splits the stream.

A transcript is a list of PDUs; each P-DATA-TF is a list of (message number, PDV). The expected
output of any run follows from it without the code under test: a PDU all of whose PDVs pass
leaves as received, one with some PDVs of a refused message leaves re-framed with the rest, one
with only refused PDVs does not leave at all.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest

from dicomfw.core import pdu
from dicomfw.core.dimse import DimseCommand
from dicomfw.core.stream import FORWARD, HOLD, SWALLOW, Buffer, DataStream
from dicomfw.errors import RemoteProtocolError
from tests.corehelpers import (
    abort_pdu,
    associate_rq,
    c_echo_rq,
    c_find_rq,
    c_store_rq,
    command_pdv,
    data_pdv,
    joined,
    p_data,
    pdv,
    pdvs_of,
    release_rp,
    release_rq,
    split_at,
)

STORE = 1  # presentation context IDs accepted on the association
FIND = 3
ECHO = 5
ACCEPTED = frozenset((STORE, FIND, ECHO))
CAP = 16_384

Pdu = bytes | list[tuple[int, bytes]]  # a control PDU, or a P-DATA-TF as (message, PDV) pairs


def wire(pdus: Sequence[Pdu]) -> bytes:
    return b"".join(p if isinstance(p, bytes) else p_data(*(v for _, v in p)) for p in pdus)


def expected_output(pdus: Sequence[Pdu], refused: frozenset[int]) -> bytes:
    out = []
    for p in pdus:
        if isinstance(p, bytes):
            out.append(p)
            continue
        kept = [v for message, v in p if message not in refused]
        if kept:
            out.append(p_data(*kept))
    return b"".join(out)


def message_boundaries(pdus: Sequence[Pdu]) -> set[int]:
    """Byte offsets of the PDU boundaries that no message straddles."""
    spans: dict[int, list[int]] = {}
    for index, p in enumerate(pdus):
        if not isinstance(p, bytes):
            for message, _ in p:
                spans.setdefault(message, [index, index])[1] = index
    boundaries = {0}
    offset = 0
    for index, p in enumerate(pdus):
        offset += len(wire([p]))
        if not any(first <= index < last for first, last in spans.values()):
            boundaries.add(offset)
    return boundaries


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


STORE_1 = c_store_rq(1)
ECHO_2 = c_echo_rq(2)
STORE_3 = c_store_rq(3)
FIND_4 = c_find_rq(4)
STORE_5 = c_store_rq(5, sop_instance="1.2.3.4.5.6.7.8.9.10.11.12")
ECHO_6 = c_echo_rq(6)

# Six messages as real peers frame them, in every layout the stream must handle.
TRANSCRIPT: list[Pdu] = [
    # 0: C-STORE, command PDU then three single-PDV data PDUs (the fast path).
    [(0, command_pdv(STORE, STORE_1))],
    [(0, data_pdv(STORE, b"\x08\x00" * 20))],
    [(0, data_pdv(STORE, b"\x10\x00" * 25))],
    [(0, data_pdv(STORE, b"tail!", last=True))],
    # 1 + 2: a C-ECHO and the start of a C-STORE (command + data) in one PDU.
    [
        (1, command_pdv(ECHO, ECHO_2)),
        (2, command_pdv(STORE, STORE_3)),
        (2, data_pdv(STORE, b"a" * 30)),
        (2, data_pdv(STORE, b"b" * 31)),
    ],
    # 2 + 3: the end of that data set and the first half of a C-FIND command.
    [(2, data_pdv(STORE, b"c" * 7, last=True)), (3, command_pdv(FIND, FIND_4[:40], last=False))],
    # 3: the rest of the command and its identifier in one PDU.
    [(3, command_pdv(FIND, FIND_4[40:])), (3, data_pdv(FIND, b"\x08\x00\x52\x00", last=True))],
    # 4: a C-STORE command fragmented across two PDUs, a two-PDV data PDU, a last data PDU.
    [(4, command_pdv(STORE, STORE_5[:50], last=False))],
    [(4, command_pdv(STORE, STORE_5[50:]))],
    [(4, data_pdv(STORE, b"d" * 12)), (4, data_pdv(STORE, b"e" * 13))],
    [(4, data_pdv(STORE, b"f" * 40, last=True))],
    # 5: a C-ECHO alone, then the release request.
    [(5, command_pdv(ECHO, ECHO_6))],
    release_rq(),
]
DATA = wire(TRANSCRIPT)
MESSAGE_IDS = [1, 2, 3, 4, 5, 6]  # message number n carries MessageID n + 1
BOUNDARIES = message_boundaries(TRANSCRIPT)
LONE_ECHO = wire(TRANSCRIPT[11:12])  # message 5, a whole message in one PDU


@dataclass
class Recorder:
    """A ``decide`` callback that refuses the given message IDs and records every call."""

    refused: frozenset[int] = frozenset()
    calls: list[tuple[int, DimseCommand]] = field(default_factory=list)

    def __call__(self, context_id: int, command: DimseCommand) -> int:
        self.calls.append((context_id, command))
        return SWALLOW if command.message_id in self.refused else FORWARD

    @property
    def message_ids(self) -> list[int | None]:
        return [command.message_id for _, command in self.calls]


def new_stream(decide: Recorder | None = None) -> DataStream:
    return DataStream(ACCEPTED, CAP, decide or Recorder())


def feed_all(stream: DataStream, pieces: Iterable[bytes]) -> list[Buffer]:
    out: list[Buffer] = []
    for piece in pieces:
        out += stream.feed(piece)
    return out


# ---- byte-identical forwarding under every split -------------------------------------------------


def test_whole_transcript_in_one_feed_is_forwarded_byte_identical() -> None:
    decide = Recorder()
    stream = new_stream(decide)
    assert joined(stream.feed(DATA)) == DATA
    assert decide.message_ids == MESSAGE_IDS
    assert [context for context, _ in decide.calls] == [STORE, ECHO, STORE, FIND, STORE, ECHO]
    assert stream.control_pdus == [pdu.A_RELEASE_RQ]
    assert stream.at_message_boundary


def test_every_two_way_split_is_forwarded_byte_identical() -> None:
    for offset in range(len(DATA) + 1):
        decide = Recorder()
        stream = new_stream(decide)
        out = feed_all(stream, split_at(DATA, [offset]))
        assert joined(out) == DATA, f"split at {offset}"
        assert decide.message_ids == MESSAGE_IDS, f"split at {offset}"
        assert stream.control_pdus == [pdu.A_RELEASE_RQ]


def test_random_multi_splits_and_single_bytes_are_forwarded_byte_identical() -> None:
    rng = random.Random(20240611)
    splits = [rng.sample(range(1, len(DATA)), rng.randint(2, 40)) for _ in range(150)]
    splits.append(list(range(1, len(DATA))))  # one byte per feed
    for offsets in splits:
        decide = Recorder()
        out = feed_all(new_stream(decide), split_at(DATA, offsets))
        assert joined(out) == DATA, f"split at {sorted(offsets)}"
        assert decide.message_ids == MESSAGE_IDS


@pytest.mark.parametrize("message", range(6))
def test_a_refused_message_is_cut_out_and_everything_else_is_byte_identical(message: int) -> None:
    refused_id = MESSAGE_IDS[message]
    expected = expected_output(TRANSCRIPT, frozenset((message,)))
    for offset in range(len(DATA) + 1):
        decide = Recorder(frozenset((refused_id,)))
        out = feed_all(new_stream(decide), split_at(DATA, [offset]))
        assert joined(out) == expected, f"split at {offset}"
        assert decide.message_ids == MESSAGE_IDS


def test_refused_echo_inside_a_shared_pdu_leaves_the_rest_reframed() -> None:
    shared = TRANSCRIPT[4]
    assert not isinstance(shared, bytes)
    stream = new_stream(Recorder(frozenset((2,))))
    stream.feed(wire(TRANSCRIPT[:4]))
    assert joined(stream.feed(wire([shared]))) == p_data(*(v for _, v in shared[1:]))


def test_refused_store_swallows_its_fast_path_data_pdus() -> None:
    stream = new_stream(Recorder(frozenset((1,))))
    assert stream.feed(wire(TRANSCRIPT[:1])) == []
    for data_pdu in TRANSCRIPT[1:4]:
        assert stream.feed(wire([data_pdu])) == []
    assert stream.at_message_boundary
    assert joined(stream.feed(LONE_ECHO)) == LONE_ECHO


# ---- injected PDUs -----------------------------------------------------------------------------

INJECTED = p_data(command_pdv(STORE, b"firewall-made response"))


def test_injected_pdu_comes_out_only_at_the_first_message_boundary() -> None:
    for offset in range(len(DATA) + 1):
        stream = new_stream()
        out = [*stream.feed(DATA[:offset]), *stream.inject(INJECTED), *stream.feed(DATA[offset:])]
        stream_bytes = joined(out)
        at = stream_bytes.find(INJECTED)
        assert at >= 0, f"injected PDU never came out (fed up to {offset})"
        assert stream_bytes[:at] + stream_bytes[at + len(INJECTED) :] == DATA, f"at {offset}"
        assert at in BOUNDARIES, f"injected at {at} inside a message (fed up to {offset})"
        assert at <= min(b for b in BOUNDARIES if b >= offset), f"held too long at {offset}"


def test_inject_between_messages_goes_out_at_once() -> None:
    stream = new_stream()
    stream.feed(wire(TRANSCRIPT[:4]))
    assert stream.inject(INJECTED) == [INJECTED]


def test_inject_while_a_release_is_half_received_goes_out_before_the_release() -> None:
    stream = new_stream()
    stream.feed(LONE_ECHO + release_rp()[:4])
    assert stream.inject(INJECTED) == [INJECTED]
    assert joined(stream.feed(release_rp()[4:])) == release_rp()


def test_inject_waits_while_a_command_is_held_and_leaves_after_its_message() -> None:
    stream = new_stream()
    stream.feed(wire(TRANSCRIPT[:7]))
    assert stream.feed(wire(TRANSCRIPT[7:8])) == []  # first half of a command: held
    assert stream.inject(INJECTED) == []
    out = joined(stream.feed(wire(TRANSCRIPT[8:11])))
    assert out == wire(TRANSCRIPT[7:11]) + INJECTED


# ---- the fast path -----------------------------------------------------------------------------


def test_consecutive_data_pdus_leave_as_one_zero_copy_buffer() -> None:
    stream = new_stream()
    stream.feed(p_data(command_pdv(STORE, STORE_1)))
    data = b"".join(p_data(data_pdv(STORE, bytes([i]) * 1000)) for i in range(5))
    out = stream.feed(data)
    assert len(out) == 1
    assert isinstance(out[0], memoryview) and out[0].obj is data
    assert bytes(out[0]) == data


def test_command_then_data_pdus_in_one_feed_leave_as_one_slice_of_the_input() -> None:
    stream = new_stream()
    data = p_data(command_pdv(STORE, STORE_1)) + b"".join(
        p_data(data_pdv(STORE, b"x" * 100, last=i == 3)) for i in range(4)
    )
    out = stream.feed(data)
    assert joined(out) == data
    assert len(out) == 1  # one write for the relay
    assert all(isinstance(b, memoryview) and b.obj is data for b in out)


def test_an_inspected_data_set_in_one_feed_leaves_as_one_slice_of_the_input() -> None:
    inspector = Inspector(frozenset({1}), FORWARD, at=1)
    data = p_data(command_pdv(STORE, STORE_1)) + b"".join(
        p_data(data_pdv(STORE, b"x" * 100, last=i == 3)) for i in range(4)
    )
    out = inspector.stream().feed(data)
    assert joined(out) == data
    # the held command, the PDU whose fragment released it, then the rest in one slice
    assert len(out) == 3
    assert out[2].obj is data  # type: ignore[union-attr]
    assert len(inspector.seen) == 4


def test_data_pdu_split_inside_its_headers_still_passes_without_reassembly() -> None:
    stream = new_stream()
    stream.feed(p_data(command_pdv(STORE, STORE_1)))
    data = p_data(data_pdv(STORE, b"y" * 5000, last=True))
    first = stream.feed(data[:9])  # inside the PDV header: nothing can leave yet
    second = stream.feed(data[9:20])  # the header is complete: forwarded as it arrives
    third = stream.feed(data[20:])
    assert first == []
    assert joined(second) == data[:20]
    assert joined(third) == data[20:]
    assert stream.at_message_boundary


# ---- release and abort ---------------------------------------------------------------------------


@pytest.mark.parametrize("control", [release_rq(), release_rp(), abort_pdu(0, 0)])
def test_release_and_abort_are_forwarded_and_reported(control: bytes) -> None:
    stream = new_stream()
    assert joined(stream.feed(LONE_ECHO + control)) == LONE_ECHO + control
    assert stream.control_pdus == [control[0]]


def test_release_pdu_alone_at_the_end_of_a_feed_is_processed_at_once() -> None:
    stream = new_stream()
    assert joined(stream.feed(release_rq())) == release_rq()
    assert stream.control_pdus == [pdu.A_RELEASE_RQ]


def test_release_pdu_split_across_feeds_is_processed_when_its_tenth_byte_arrives() -> None:
    stream = new_stream()
    assert stream.feed(release_rp()[:3]) == []
    assert stream.feed(release_rp()[3:9]) == []
    assert stream.control_pdus == []
    assert joined(stream.feed(release_rp()[9:])) == release_rp()
    assert stream.control_pdus == [pdu.A_RELEASE_RP]


def test_abort_in_the_middle_of_a_message_is_forwarded() -> None:
    stream = new_stream()
    data = wire(TRANSCRIPT[:2]) + abort_pdu(0, 0)
    assert joined(stream.feed(data)) == data
    assert stream.control_pdus == [pdu.A_ABORT]


# ---- protocol errors -----------------------------------------------------------------------------

START_STORE = p_data(command_pdv(STORE, STORE_1))

BAD_STREAMS: dict[str, tuple[bytes, str, int]] = {
    "PDV on a context that was not accepted": (
        p_data(command_pdv(7, c_echo_rq(1))),
        "context 7, which was not accepted",
        pdu.ABORT_UNEXPECTED_PARAMETER,
    ),
    "data PDV without a command": (
        p_data(data_pdv(STORE, b"orphan", last=True)),
        "without a command",
        pdu.ABORT_UNEXPECTED_PARAMETER,
    ),
    "data PDV on another context than its command (fast path)": (
        START_STORE + p_data(data_pdv(FIND, b"z" * 20)),
        "context 3 while the message uses context 1",
        pdu.ABORT_UNEXPECTED_PARAMETER,
    ),
    "data PDV on another context than its command (shared PDU)": (
        START_STORE + p_data(data_pdv(STORE, b"z"), data_pdv(FIND, b"z")),
        "context 3 while the message uses context 1",
        pdu.ABORT_UNEXPECTED_PARAMETER,
    ),
    "command PDV while a data set is in progress": (
        START_STORE + p_data(data_pdv(STORE, b"z" * 20)) + p_data(command_pdv(ECHO, ECHO_2)),
        "before the previous data set ended",
        pdu.ABORT_UNEXPECTED_PARAMETER,
    ),
    "command fragments on two contexts": (
        p_data(command_pdv(STORE, STORE_1[:30], last=False), command_pdv(FIND, STORE_1[30:])),
        "two presentation contexts",
        pdu.ABORT_UNEXPECTED_PARAMETER,
    ),
    "PDV longer than its PDU": (
        p_data(command_pdv(ECHO, ECHO_2)[:-4]),
        "does not fit",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "PDV length below the 2-byte control header": (
        p_data(b"\x00\x00\x00\x01\x05"),
        "truncated PDV header",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "P-DATA-TF without a PDV": (p_data(), "without a PDV", pdu.ABORT_INVALID_PARAMETER),
    "PDU length over the cap": (
        bytes.fromhex("04 00") + (CAP + 1).to_bytes(4, "big"),
        "over the 16384-byte limit",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "unknown PDU type": (
        bytes.fromhex("09 00 00000004 00000000"),
        "0x09",
        pdu.ABORT_UNRECOGNIZED_PDU,
    ),
    "A-ASSOCIATE-RQ in the data phase": (
        associate_rq("CT01", "PACS", [(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]),
        "unexpected A-ASSOCIATE-RQ",
        pdu.ABORT_UNEXPECTED_PDU,
    ),
    "A-RELEASE-RQ in the middle of a message": (
        START_STORE + release_rq(),
        "unexpected A-RELEASE-RQ",
        pdu.ABORT_UNEXPECTED_PDU,
    ),
    "A-RELEASE-RP between command fragments": (
        p_data(command_pdv(STORE, STORE_1[:30], last=False)) + release_rp(),
        "unexpected A-RELEASE-RP",
        pdu.ABORT_UNEXPECTED_PDU,
    ),
    "command set that is not a command set": (
        p_data(command_pdv(ECHO, b"\x08\x00\x16\x00\x02\x00\x00\x001\x00")),
        "invalid DIMSE command element",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "command set over 64 KiB": (
        b"".join(p_data(command_pdv(ECHO, bytes(8000), last=False)) for _ in range(9)),
        "too large",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "endless empty command fragments": (
        p_data(*(command_pdv(ECHO, b"", last=False) for _ in range(2000))) * 6,
        "too large",
        pdu.ABORT_INVALID_PARAMETER,
    ),
}


@pytest.mark.parametrize("piece", [0, 1, 7], ids=["one feed", "byte by byte", "7-byte feeds"])
@pytest.mark.parametrize("case", BAD_STREAMS)
def test_protocol_violation_is_a_remote_protocol_error(case: str, piece: int) -> None:
    data, message, reason = BAD_STREAMS[case]
    if len(data) > 20_000:
        piece *= 1009  # the same splits, a thousand times fewer feeds
    stream = new_stream()
    with pytest.raises(RemoteProtocolError, match=message) as raised:
        feed_all(stream, chunks(data, piece) if piece else [data])
    assert raised.value.abort_reason == reason


def test_over_cap_length_is_refused_from_the_header_before_the_body_arrives() -> None:
    stream = new_stream()
    stream.feed(b"\x04\x00")
    with pytest.raises(RemoteProtocolError):
        stream.feed((CAP + 1).to_bytes(4, "big"))


# ---- held messages: decide answers HOLD, inspect settles their fate ----------------------------


@dataclass
class Inspector:
    """Holds the messages with the given IDs and settles each on its ``at``-th data fragment:
    FORWARD or SWALLOW, or HOLD to the end (then the test settles it). Records what it saw."""

    held: frozenset[int]
    verdict: int = FORWARD
    at: int = 1
    seen: list[tuple[bytes, bool]] = field(default_factory=list)
    calls: list[int | None] = field(default_factory=list)

    def decide(self, context_id: int, command: DimseCommand) -> int:
        self.calls.append(command.message_id)
        return HOLD if command.message_id in self.held else FORWARD

    def inspect(self, fragment: memoryview, last: bool) -> int:
        self.seen.append((bytes(fragment), last))
        return self.verdict if len(self.seen) == self.at else HOLD

    def stream(self) -> DataStream:
        return DataStream(ACCEPTED, CAP, self.decide, self.inspect)


def data_set_of(message: int) -> bytes:
    """The data-set fragments of message number ``message`` of the transcript, joined."""
    return b"".join(
        v[6:]
        for p in TRANSCRIPT
        if not isinstance(p, bytes)
        for m, v in p
        if m == message
        if not v[5] & 0x01
    )


@pytest.mark.parametrize("message", [0, 2, 4])
def test_a_held_message_that_inspect_forwards_leaves_byte_identical_in_any_split(
    message: int,
) -> None:
    for offset in range(len(DATA) + 1):
        inspector = Inspector(frozenset((MESSAGE_IDS[message],)), FORWARD, at=2)
        out = feed_all(inspector.stream(), split_at(DATA, [offset]))
        assert joined(out) == DATA, f"split at {offset}"
        assert b"".join(f for f, _ in inspector.seen) == data_set_of(message)
        assert [last for _, last in inspector.seen][-1]  # the last fragment is flagged


@pytest.mark.parametrize("message", [0, 2, 3, 4])
def test_a_held_message_that_inspect_swallows_is_cut_out_whole(message: int) -> None:
    expected = expected_output(TRANSCRIPT, frozenset((message,)))
    for offset in range(len(DATA) + 1):
        inspector = Inspector(frozenset((MESSAGE_IDS[message],)), SWALLOW, at=1)
        out = feed_all(inspector.stream(), split_at(DATA, [offset]))
        assert joined(out) == expected, f"split at {offset}"
        assert inspector.calls == MESSAGE_IDS  # every other message was decided in turn


def test_nothing_of_a_held_message_leaves_before_inspect_lets_it() -> None:
    inspector = Inspector(frozenset((1,)), FORWARD, at=3)
    stream = inspector.stream()
    first = [p for p in TRANSCRIPT[:4] if not isinstance(p, bytes)]
    assert joined(stream.feed(wire(first[:3]))) == b""  # command + two fragments: still held
    assert joined(stream.feed(wire(first[3:]))) == wire(first)


def test_a_message_held_to_its_end_stops_the_reading_until_it_is_settled() -> None:
    inspector = Inspector(frozenset((3,)), HOLD)  # message 2 (ID 3): held to its end
    stream = inspector.stream()
    out = stream.feed(DATA)
    # message 1 shares its PDU with message 2, and waits with it
    assert joined(out) == wire(TRANSCRIPT[:4])
    assert not stream.at_message_boundary
    assert stream.inject(b"ours") == []  # our own PDUs wait too
    rest = stream.take_unread()
    end_of_message_2 = TRANSCRIPT[5][0][1]
    assert isinstance(end_of_message_2, bytes)
    assert joined(stream.settle(True)) == wire(TRANSCRIPT[4:5]) + p_data(end_of_message_2) + b"ours"
    start_of_find = p_data(command_pdv(FIND, FIND_4[:40], last=False))  # framed anew
    assert joined(feed_all(stream, [rest])) == start_of_find + wire(TRANSCRIPT[6:])
    assert inspector.calls == MESSAGE_IDS


def test_a_late_refusal_raised_by_inspect_stops_the_feed() -> None:
    class Late(Exception):
        pass

    def inspect(fragment: memoryview, last: bool) -> int:
        if last:
            raise Late
        return FORWARD

    stream = DataStream(ACCEPTED, CAP, lambda _, c: HOLD if c.message_id == 1 else FORWARD, inspect)
    with pytest.raises(Late):
        stream.feed(wire(TRANSCRIPT[:4]))


def pdv_sequence(stream: bytes) -> list[bytes]:
    """The PDVs of every P-DATA-TF in ``stream``, and every other PDU whole, in order."""
    items, pos = [], 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 2 : pos + 6], "big")
        pdu_bytes = stream[pos : pos + 6 + length]
        if pdu_bytes[0] == 0x04:
            items += [pdv(c, control, data) for c, control, data in pdvs_of(pdu_bytes)]
        else:
            items.append(pdu_bytes)
        pos += 6 + length
    return items


@pytest.mark.parametrize("forward", [True, False])
def test_a_held_message_without_a_data_set_waits_for_settle(forward: bool) -> None:
    inspector = Inspector(frozenset((2,)), HOLD)  # message 1: the C-ECHO (ID 2)
    stream = inspector.stream()
    out = joined(stream.feed(DATA))
    assert out == wire(TRANSCRIPT[:4])  # the echo's PDU also carries message 2: both wait
    rest = stream.take_unread()
    settled = joined(stream.settle(forward))
    assert settled == (p_data(command_pdv(ECHO, ECHO_2)) if forward else b"")
    assert inspector.seen == []  # an echo has no data set to show
    expected = expected_output(TRANSCRIPT, frozenset() if forward else frozenset({1}))
    total = out + settled + joined(feed_all(stream, [rest]))
    assert pdv_sequence(total) == pdv_sequence(expected)  # the same PDVs, framed anew


@pytest.mark.parametrize("forward", [True, False])
def test_a_message_settled_while_its_data_set_still_arrives(forward: bool) -> None:
    inspector = Inspector(frozenset((5,)), HOLD)  # message 4 (ID 5): five PDUs
    stream = inspector.stream()
    out = joined(stream.feed(wire(TRANSCRIPT[:10])))  # up to its first data PDU
    assert out == wire(TRANSCRIPT[:7])
    assert len(inspector.seen) == 2  # that PDU's two fragments
    settled = joined(stream.settle(forward))
    assert settled == (wire(TRANSCRIPT[7:10]) if forward else b"")
    inspector.verdict, inspector.at = FORWARD, 3  # what inspect answers for the last fragment
    after = joined(stream.feed(wire(TRANSCRIPT[10:])))
    assert after == (wire(TRANSCRIPT[10:]) if forward else wire(TRANSCRIPT[11:]))
    assert len(inspector.seen) == (3 if forward else 2)  # swallowed fragments are not shown
