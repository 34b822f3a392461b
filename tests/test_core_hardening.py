"""What an independent fuzzing campaign found in the sans-IO core, one test per finding.

Each test replays the finding's input (or its shape) and asserts the answer the session must
give: a refusal or an A-ABORT naming the right side, never an exception, nothing after the end,
and memory bounded by the configured caps rather than by what the peer sends.
"""

from __future__ import annotations

import tracemalloc
from ipaddress import ip_address

import pytest

from dicomfw.core import acse
from dicomfw.core.ratelimit import Gate, Limiter, LimitRules, RateLimits
from dicomfw.core.session import (
    MAX_QUEUED_REPLY_BYTES,
    REFUSAL_REPORT_SECONDS,
    REFUSALS_REPORTED_ONE_BY_ONE,
    AssociationEnded,
    Command,
    PauseReading,
    RequestRefused,
    ResumeReading,
    Send,
    Session,
    Side,
    State,
    Wakeup,
)
from dicomfw.errors import RemoteProtocolError
from tests.corehelpers import (
    VERIFICATION,
    Clock,
    application_context_item,
    associate_ac,
    associate_rq,
    c_echo_rq,
    c_find_rq,
    c_find_rsp,
    command_pdv,
    context_rq_item,
    data_pdv,
    p_data,
    raw_associate_rq,
    user_information_item,
)
from tests.test_core_dimse import _command, _element
from tests.test_core_session import (
    CAP,
    ECHO,
    FIND,
    PACS_AC,
    PACS_CONTEXTS,
    POLICY,
    established,
)

REQUESTER, UPSTREAM = Side.REQUESTER, Side.UPSTREAM
#: A C-FIND-RQ with its identifier, in one read.
FIND_REQUEST = p_data(command_pdv(FIND, c_find_rq(1))) + p_data(
    data_pdv(FIND, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", last=True)
)

#: The 31 bytes of finding 2: a P-DATA-TF with an unknown command field (0x0000) whose Affected
#: SOP Class UID is the single byte 0xFF.
NON_ASCII_UID_PDU = bytes.fromhex("040000000019000000150103000000010200000001000000020001000000ff")
#: The same request well-formed but for its UID (even length, in tag order), so that the UID
#: check itself refuses it.
NON_ASCII_EVEN_UID_PDU = p_data(
    command_pdv(ECHO, _command(_element(0x0002, b"\xff\x00"), _element(0x0100, b"\x01\x00")))
)
#: What the session sends a side it aborts for a protocol error: A-ABORT, service provider,
#: reason 6 (invalid PDU parameter value) to the culprit, 0 to the other side.
ABORT_INVALID = bytes.fromhex("07000000000400000206")
ABORT_PLAIN = bytes.fromhex("07000000000400000200")


def ended(commands: list[Command]) -> AssociationEnded:
    """The end event, which must be the last command of the list."""
    assert commands, "no commands"
    last = commands[-1]
    assert isinstance(last, AssociationEnded), commands
    assert sum(isinstance(c, AssociationEnded) for c in commands) == 1
    return last


def sent(commands: list[Command], side: Side) -> bytes:
    return b"".join(
        bytes(b) for c in commands if isinstance(c, Send) and c.side is side for b in c.data
    )


def refused_unknown(message_id: int) -> bytes:
    """A request with a command field no DIMSE service has (0x0ff0): refused with 0x0211."""
    command = _command(
        _element(0x0002, b"1.2.840.10008.1.1\x00"),
        _element(0x0100, b"\xf0\x0f"),
        _element(0x0110, message_id.to_bytes(2, "little")),
        _element(0x0800, b"\x01\x01"),
    )
    return p_data(command_pdv(ECHO, command))


# ---- finding 2: a UID that is not a UID --------------------------------------------------------


@pytest.mark.parametrize(
    ("pdu", "detail"),
    [
        (NON_ASCII_UID_PDU, "invalid DIMSE command element (0000,0002)"),  # as found: odd length
        (NON_ASCII_EVEN_UID_PDU, "not a UID"),
    ],
)
def test_finding_2_a_non_ascii_uid_aborts_the_requester_instead_of_raising(
    pdu: bytes, detail: str
) -> None:
    session = established()
    commands = session.receive(REQUESTER, pdu)
    end = ended(commands)
    assert (end.how, end.why) == ("aborted", "requester_protocol_error")
    assert detail in end.detail
    assert sent(commands, REQUESTER) == ABORT_INVALID
    assert sent(commands, UPSTREAM) == ABORT_PLAIN  # nothing of the bad command went up
    assert session.receive(REQUESTER, p_data(command_pdv(ECHO, c_echo_rq(2)))) == []


def test_finding_2_in_the_delayed_request_path_the_bad_command_still_ends_the_association() -> None:
    """The rate-limit path: the bad command arrives while a request is delayed, and is read at
    ``wakeup`` (which had no guard in the relay): it must end in an A-ABORT, not be lost."""
    clock = Clock()
    rules = LimitRules(RateLimits(requests_per_minute_per_association={"C-ECHO": 1}))
    gate = Limiter().connect(rules, "modalities", ip_address("10.1.2.3"))
    assert isinstance(gate, Gate)
    session = established(
        session=Session(POLICY, "modalities", ip_address("10.1.2.3"), None, CAP, gate, clock)
    )
    session.receive(REQUESTER, p_data(command_pdv(ECHO, c_echo_rq(1))))
    delayed = session.receive(REQUESTER, p_data(command_pdv(ECHO, c_echo_rq(2))))
    assert isinstance(delayed[0], Wakeup) and PauseReading(REQUESTER) in delayed
    assert session.receive(REQUESTER, NON_ASCII_UID_PDU) == []  # waits behind the held one
    clock.now = 60.0
    commands = session.wakeup()
    assert sent(commands, UPSTREAM).startswith(p_data(command_pdv(ECHO, c_echo_rq(2))))
    assert ended(commands).why == "requester_protocol_error"
    assert session.state is State.CLOSED


# ---- finding 3: refusals queued behind an unfinished upstream message ---------------------------


def test_finding_3_refusals_waiting_for_the_upstreams_message_stop_the_requester_being_read() -> (
    None
):
    session = established()
    # The upstream's pending C-FIND response has begun; its identifier is still arriving.
    session.receive(REQUESTER, FIND_REQUEST)
    started = session.receive(
        UPSTREAM,
        p_data(command_pdv(FIND, c_find_rsp(1, 0xFF00))) + p_data(data_pdv(FIND, b"\0" * 64)),
    )
    assert sent(started, REQUESTER)
    flood = b"".join(refused_unknown(n) for n in range(1, 20_001))  # 1.6 MB of requests
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        commands = session.receive(REQUESTER, flood)
        assert commands[-1] == PauseReading(REQUESTER)
        answered = sent(commands, REQUESTER)
        assert session.receive(REQUESTER, refused_unknown(20_001)) == []  # not read: deferred
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Reading stopped once the waiting answers passed the bound: the session holds them and the
    # unread rest of the requester's bytes (at most _MAX_DEFERRED_BYTES), where the finding saw
    # 3.1 MB of answers for 640 KB sent, growing with every refusal.
    assert answered == b""  # all of them wait for the upstream's message to end
    assert held < len(flood) + 4 * MAX_QUEUED_REPLY_BYTES
    # The upstream ends its message: every answer that waited goes out, then the requester is
    # read again, starting with what it sent meanwhile.
    resumed = session.receive(UPSTREAM, p_data(data_pdv(FIND, b"\0" * 64, last=True)))
    to_requester = sent(resumed, REQUESTER)
    assert to_requester.startswith(p_data(data_pdv(FIND, b"\0" * 64, last=True)))
    assert len(to_requester) > MAX_QUEUED_REPLY_BYTES
    assert ResumeReading(REQUESTER) in resumed
    assert session.state is State.ESTABLISHED


def test_finding_3_a_requester_that_keeps_sending_while_paused_is_aborted_at_the_bound() -> None:
    session = established()
    session.receive(REQUESTER, FIND_REQUEST)
    session.receive(
        UPSTREAM,
        p_data(command_pdv(FIND, c_find_rsp(1, 0xFF00))) + p_data(data_pdv(FIND, b"\0" * 64)),
    )
    flood = b"".join(refused_unknown(n) for n in range(1, 3_001))
    assert session.receive(REQUESTER, flood)[-1] == PauseReading(REQUESTER)
    end = None
    for _ in range(200):  # a relay that ignored PauseReading: ~8 MB more, then the abort
        commands = session.receive(REQUESTER, flood)
        if commands:
            end = ended(commands)
            break
    assert end is not None and end.why == "requester_protocol_error"


# ---- finding 4: nothing after the end -----------------------------------------------------------


def test_finding_4_an_ac_and_an_abort_in_one_read_end_it_and_the_early_data_stays_unsent() -> None:
    session = Session(POLICY, "modalities", ip_address("10.1.2.3"), None, CAP)
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    session.upstream_connected()
    early = p_data(command_pdv(ECHO, c_echo_rq(1)))
    assert session.receive(REQUESTER, early) == []  # before the AC: kept for later
    commands = session.receive(UPSTREAM, PACS_AC + bytes.fromhex("07000000000400000000"))
    assert ended(commands).why == "upstream_aborted"
    assert early not in sent(commands, UPSTREAM)
    assert not any(isinstance(c, RequestRefused) for c in commands)
    for side in (REQUESTER, UPSTREAM):
        assert session.receive(side, early) == []


def test_finding_4_nothing_after_an_abort_in_the_same_read_is_forwarded() -> None:
    session = established()
    after = p_data(command_pdv(ECHO, c_echo_rq(7)))
    commands = session.receive(REQUESTER, bytes.fromhex("07000000000400000000") + after)
    assert ended(commands).why == "requester_aborted"
    assert after not in sent(commands, UPSTREAM)


# ---- finding 5: the right side blamed ---------------------------------------------------------


def test_finding_5_early_requester_data_on_an_unproposed_context_is_the_requesters_error() -> None:
    session = Session(POLICY, "modalities", ip_address("10.1.2.3"), None, CAP)
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    session.upstream_connected()
    session.receive(REQUESTER, p_data(command_pdv(77, c_echo_rq(1))))  # context 77: never proposed
    commands = session.receive(UPSTREAM, PACS_AC)
    assert ended(commands).why == "requester_protocol_error"
    # the upstream did nothing wrong: it is told "not specified", the requester why
    assert sent(commands, REQUESTER).endswith(bytes.fromhex("07000000000400000205"))
    assert sent(commands, UPSTREAM) == ABORT_PLAIN


def test_an_upstream_accepting_a_transfer_syntax_it_was_not_offered_is_its_error() -> None:
    session = Session(POLICY, "modalities", ip_address("10.1.2.3"), None, CAP)
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    session.upstream_connected()
    deflated = associate_ac("CT01", "REALPACS", [(ECHO, 0, "1.2.840.10008.1.2.1.99")])
    end = ended(session.receive(UPSTREAM, deflated))
    assert end.why == "upstream_protocol_error" and "not offered" in end.detail


# ---- finding 6: object amplification ---------------------------------------------------------


def test_finding_6_ten_thousand_empty_command_fragments_hold_about_their_own_size() -> None:
    session = established()
    fragments = p_data(*(command_pdv(ECHO, b"", last=False) for _ in range(10_000)))
    assert len(fragments) == 60_006
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert session.receive(REQUESTER, fragments) == []  # the command is not complete yet
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 * len(fragments)  # was ~1.93 MB: 32 times the bytes
    rest = p_data(command_pdv(ECHO, c_echo_rq(1)))
    commands = session.receive(REQUESTER, rest)
    assert sent(commands, UPSTREAM) == fragments + rest  # passed as received, in order


# ---- finding 7: a refusal flood --------------------------------------------------------------


def test_finding_7_past_ten_refusals_of_a_kind_they_are_counted_and_reported_together() -> None:
    clock = Clock()
    session = established(
        session=Session(POLICY, "modalities", ip_address("10.1.2.3"), None, CAP, clock=clock)
    )
    events: list[RequestRefused] = []
    for message_id in range(1, 201):
        commands = session.receive(REQUESTER, refused_unknown(message_id))
        assert sent(commands, REQUESTER)  # every request is answered
        events += [c for c in commands if isinstance(c, RequestRefused)]
    assert len(events) == REFUSALS_REPORTED_ONE_BY_ONE
    assert all(e.count == 1 and e.service == "unknown" for e in events)
    assert session.take_report() == []  # the interval has not passed
    clock.now = REFUSAL_REPORT_SECONDS
    [summary] = session.take_report()
    assert isinstance(summary, RequestRefused)
    assert (summary.count, summary.why, summary.status) == (190, "unrecognized_operation", 0x0211)
    assert summary.message_id is None
    session.receive(REQUESTER, refused_unknown(201))
    assert session.take_report() == []  # one report per interval
    [last] = session.take_report(final=True)
    assert isinstance(last, RequestRefused) and last.count == 1


def test_finding_7_past_max_refusals_the_requester_is_cut_off() -> None:
    session = established(
        session=Session(POLICY, "modalities", ip_address("10.1.2.3"), None, CAP, max_refusals=100)
    )
    for message_id in range(1, 101):
        assert sent(session.receive(REQUESTER, refused_unknown(message_id)), REQUESTER)
    commands = session.receive(REQUESTER, refused_unknown(101))
    end = ended(commands)
    assert (end.how, end.why) == ("aborted", "too_many_refusals")
    assert sent(commands, REQUESTER) == ABORT_PLAIN
    assert sent(commands, UPSTREAM) == ABORT_PLAIN
    assert session.receive(REQUESTER, refused_unknown(102)) == []


# ---- finding A of the project's own fuzzing: an AE title the encoder cannot write back -----------

#: An A-ASSOCIATE-RQ whose called AE field is b"P\xe9CS" (found by the fuzz target acse_rq).
NON_ASCII_CALLED_AE = raw_associate_rq(
    [
        application_context_item(),
        context_rq_item(1, VERIFICATION, ["1.2.840.10008.1.2"]),
        user_information_item(),
    ],
    called=b"P\xe9CS",
)


def test_finding_a_an_ae_title_with_a_byte_over_0x7e_is_a_protocol_error() -> None:
    """PS3.5 Table 6.2-1 allows only the default character repertoire in an AE title; the
    codec read such bytes as Latin-1 and could not write the request back (UnicodeEncodeError)."""
    with pytest.raises(RemoteProtocolError, match="non-ASCII") as raised:
        acse.decode_rq(NON_ASCII_CALLED_AE)
    assert raised.value.abort_reason == 6
    session = Session(POLICY, "modalities", ip_address("10.1.2.3"), None, CAP)
    end = ended(session.receive(REQUESTER, NON_ASCII_CALLED_AE))
    assert end.why == "requester_protocol_error"
