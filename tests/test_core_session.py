"""One association through the firewall, as transcripts: events in, commands out (h11-style).

Each test reads as the scenario: what a side sends, and the exact commands and events the
session answers with. Forwarded bytes are compared whole; event ``detail`` texts are for humans
and blanked, except where a test is about them.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import ip_address, ip_network

from dicomfw.core import pdu
from dicomfw.core.policy import AllowRule, Peer, Policy, Route
from dicomfw.core.session import (
    REFUSAL_REPORT_SECONDS,
    REFUSALS_REPORTED_ONE_BY_ONE,
    TALLY_ROUND_TRIPS,
    AssociationAccepted,
    AssociationEnded,
    AssociationRejected,
    Close,
    Command,
    ConnectUpstream,
    OperationCounts,
    RequestFailed,
    RequestRefused,
    RequestTally,
    Send,
    Session,
    Side,
    State,
)
from tests.corehelpers import (
    CT,
    EXPLICIT_LE,
    IMPLICIT_LE,
    MR,
    SECONDARY_CAPTURE,
    STUDY_FIND,
    STUDY_MOVE,
    VERIFICATION,
    Clock,
    ContextSpec,
    abort_pdu,
    associate_ac,
    associate_rq,
    c_echo_rq,
    c_echo_rsp,
    c_find_rq,
    c_find_rsp,
    c_move_rq,
    c_store_rq,
    c_store_rsp,
    command_pdv,
    data_pdv,
    decoded_ac,
    decoded_command,
    decoded_rq,
    p_data,
    pdvs_of,
    release_rp,
    release_rq,
    rj_pdu,
)

CAP = 65_536
REQUESTER, UPSTREAM = Side.REQUESTER, Side.UPSTREAM

POLICY = Policy(
    peers=(
        Peer("CT01", (ip_network("10.1.2.0/24"),)),
        Peer("WS1", (ip_network("10.1.3.0/24"),)),
    ),
    routes=(
        Route(
            "pacs",
            "modalities",
            "PACS",
            "pacs-upstream",
            allow=(
                AllowRule(frozenset({"C-ECHO", "C-STORE"}), frozenset({CT, MR})),
                AllowRule(
                    frozenset({"C-FIND", "C-MOVE"}),
                    frozenset({STUDY_FIND, STUDY_MOVE}),
                    move_destinations=frozenset({"CT01", "WS1"}),
                ),
            ),
            upstream_called_ae="REALPACS",
        ),
        # Storage (and verification) of any SOP class: sop_classes omitted.
        Route(
            "archive",
            "modalities",
            "ARCHIVE",
            "archive-upstream",
            allow=(AllowRule(frozenset({"C-ECHO", "C-STORE"})),),
        ),
    ),
)

# What CT01 proposes to PACS; context 9 (Secondary Capture) is not allowed on that route.
ECHO, STORE, FIND, MOVE, SC = 1, 3, 5, 7, 9
PACS_CONTEXTS: list[ContextSpec] = [
    (ECHO, VERIFICATION, [IMPLICIT_LE]),
    (STORE, CT, [EXPLICIT_LE, IMPLICIT_LE]),
    (FIND, STUDY_FIND, [IMPLICIT_LE]),
    (MOVE, STUDY_MOVE, [IMPLICIT_LE]),
    (SC, SECONDARY_CAPTURE, [IMPLICIT_LE]),
]
PACS_AC = associate_ac(
    "CT01",
    "REALPACS",
    [
        (ECHO, 0, IMPLICIT_LE),
        (STORE, 0, EXPLICIT_LE),
        (FIND, 0, IMPLICIT_LE),
        (MOVE, 0, IMPLICIT_LE),
    ],
)


def new_session(address: str = "10.1.2.3") -> Session:
    return Session(POLICY, "modalities", ip_address(address), None, CAP)


def transcript(commands: Sequence[Command]) -> list[Command]:
    """Commands with each Send's buffers joined into one ``bytes`` and event details blanked."""
    normalised: list[Command] = []
    for command in commands:
        if isinstance(command, Send):
            command = Send(command.side, [b"".join(bytes(b) for b in command.data)])
        elif isinstance(command, AssociationRejected | RequestRefused | AssociationEnded):
            command = replace(command, detail="")
        normalised.append(command)
    return normalised


def counted(session: Session) -> dict[tuple[str, str], OperationCounts]:
    """What the session's requests came to since the last look (its tally, taken)."""
    tallies = [event for event in session.take_report() if isinstance(event, RequestTally)]
    return tallies[0].counts if tallies else {}


def established(
    called: str = "PACS",
    contexts: Sequence[ContextSpec] = PACS_CONTEXTS,
    ac: bytes = PACS_AC,
    session: Session | None = None,
) -> Session:
    """``session`` (a new one by default) taken through CT01's association set-up."""
    session = session or new_session()
    assert len(session.receive(REQUESTER, associate_rq("CT01", called, contexts))) == 1
    session.upstream_connected()
    session.receive(UPSTREAM, ac)
    assert session.state is State.ESTABLISHED
    return session


def rejected(
    result: int, source: int, reason: int, why: str, calling: str = "CT01"
) -> list[Command]:
    called = "PACS" if why != "called_ae_unknown" else "NOBODY"
    return [
        Send(REQUESTER, [rj_pdu(result, source, reason)]),
        Close(REQUESTER),
        AssociationRejected(calling, called, result, source, reason, why, ""),
    ]


def echo(message_id: int) -> bytes:
    return p_data(command_pdv(ECHO, c_echo_rq(message_id)))


def store(message_id: int, sop_class: str = CT) -> list[bytes]:
    """A C-STORE as three PDUs: the command, then a data set in two PDUs."""
    return [
        p_data(command_pdv(STORE, c_store_rq(message_id, sop_class))),
        p_data(data_pdv(STORE, b"\x08\x00\x18\x00" * 100)),
        p_data(data_pdv(STORE, b"\x10\x00\x10\x00" * 50, last=True)),
    ]


def refusal(commands: Sequence[Command]) -> tuple[int, int, int, int]:
    """(context ID, CommandField, MessageIDBeingRespondedTo, Status) of a firewall-made *-RSP."""
    sends = [c for c in commands if isinstance(c, Send)]
    assert len(sends) == 1 and sends[0].side is REQUESTER
    [(context_id, control, command_set)] = pdvs_of(b"".join(bytes(b) for b in sends[0].data))
    assert control == 0x03  # a whole command in one PDV
    response = decoded_command(command_set)
    assert response.CommandDataSetType == 0x0101
    return context_id, response.CommandField, response.MessageIDBeingRespondedTo, response.Status


# ---- association set-up: refusals --------------------------------------------------------------


def test_unknown_calling_ae_is_rejected_with_reason_3() -> None:
    session = new_session()
    commands = session.receive(REQUESTER, associate_rq("INTRUDER", "PACS", PACS_CONTEXTS))
    assert transcript(commands) == rejected(1, 1, 3, "calling_ae_unknown", calling="INTRUDER")
    assert session.state is State.CLOSED


def test_known_calling_ae_from_the_wrong_network_is_rejected_with_reason_3() -> None:
    session = new_session(address="10.9.9.9")
    commands = session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    assert transcript(commands) == rejected(1, 1, 3, "source_network_denied")


def test_unknown_called_ae_is_rejected_with_reason_7() -> None:
    commands = new_session().receive(REQUESTER, associate_rq("CT01", "NOBODY", PACS_CONTEXTS))
    assert transcript(commands) == rejected(1, 1, 7, "called_ae_unknown")


def test_no_allowed_context_is_rejected_without_contacting_the_upstream() -> None:
    rq = associate_rq("CT01", "PACS", [(1, SECONDARY_CAPTURE, [IMPLICIT_LE])])
    commands = new_session().receive(REQUESTER, rq)
    assert transcript(commands) == rejected(1, 1, 1, "no_context_allowed")
    assert not any(isinstance(c, ConnectUpstream) for c in commands)


def test_rejection_detail_names_the_calling_ae_for_the_operator() -> None:
    [*_, event] = new_session().receive(REQUESTER, associate_rq("INTRUDER", "PACS", PACS_CONTEXTS))
    assert isinstance(event, AssociationRejected) and "INTRUDER" in event.detail


def test_unreachable_upstream_is_a_transient_rejection_2_3_1() -> None:
    session = new_session()
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    commands = session.upstream_failed("connection refused")
    assert transcript(commands) == rejected(2, 3, 1, "upstream_unreachable")


def test_upstream_rejection_is_relayed_to_the_requester() -> None:
    session = new_session()
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    session.upstream_connected()
    commands = session.receive(UPSTREAM, rj_pdu(1, 1, 7))
    assert transcript(commands) == [
        Send(REQUESTER, [rj_pdu(1, 1, 7)]),
        Close(REQUESTER),
        Close(UPSTREAM),
        AssociationRejected("CT01", "PACS", 1, 1, 7, "upstream_rejected", "", True),
    ]


# ---- association set-up: acceptance -------------------------------------------------------------


def test_allowed_association_goes_upstream_narrowed_and_comes_back_complete() -> None:
    session = new_session()
    rq = associate_rq("CT01", "PACS", PACS_CONTEXTS)
    # Split inside the 6-byte PDU header: nothing happens until the RQ is whole.
    assert session.receive(REQUESTER, rq[:3]) == []
    assert session.receive(REQUESTER, rq[3:]) == [ConnectUpstream("pacs-upstream")]

    [send] = session.upstream_connected()
    assert isinstance(send, Send) and send.side is UPSTREAM
    upstream_rq = decoded_rq(bytes(send.data[0]))
    assert (upstream_rq.called_ae_title, upstream_rq.calling_ae_title) == ("REALPACS", "CT01")
    forwarded = upstream_rq.to_primitive().presentation_context_definition_list
    assert [(c.context_id, c.abstract_syntax) for c in forwarded] == [
        (ECHO, VERIFICATION),
        (STORE, CT),
        (FIND, STUDY_FIND),
        (MOVE, STUDY_MOVE),
    ]

    commands = session.receive(UPSTREAM, PACS_AC)
    assert len(commands) == 2
    assert commands[1] == AssociationAccepted(
        "pacs",
        "CT01",
        "PACS",
        4,
        ((SC, SECONDARY_CAPTURE, "sop_class_not_allowed"),),
        (
            (VERIFICATION, IMPLICIT_LE),
            (CT, EXPLICIT_LE),
            (STUDY_FIND, IMPLICIT_LE),
            (STUDY_MOVE, IMPLICIT_LE),
        ),
    )
    ac_send = commands[0]
    assert isinstance(ac_send, Send) and ac_send.side is REQUESTER
    ac = decoded_ac(bytes(ac_send.data[0]))
    assert (ac.called_ae_title, ac.calling_ae_title) == ("PACS", "CT01")
    results = ac.to_primitive().presentation_context_definition_results_list
    assert [(c.context_id, c.result) for c in results] == [
        (ECHO, 0),
        (STORE, 0),
        (FIND, 0),
        (MOVE, 0),
        (SC, 3),
    ]
    assert session.state is State.ESTABLISHED


def test_upstream_answering_a_context_it_was_not_offered_is_aborted() -> None:
    session = new_session()
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    session.upstream_connected()
    bogus_ac = associate_ac("CT01", "REALPACS", [(ECHO, 0, IMPLICIT_LE), (SC, 0, IMPLICIT_LE)])
    commands = session.receive(UPSTREAM, bogus_ac)
    assert transcript(commands) == [
        Send(REQUESTER, [pdu.abort()]),
        Close(REQUESTER),
        Send(UPSTREAM, [pdu.abort(reason=pdu.ABORT_INVALID_PARAMETER)]),
        Close(UPSTREAM),
        AssociationEnded("aborted", "upstream_protocol_error", ""),
    ]


def test_requester_pdus_sent_before_the_ac_are_forwarded_once_it_arrives() -> None:
    session = new_session()
    rq = associate_rq("CT01", "PACS", PACS_CONTEXTS)
    session.receive(REQUESTER, rq + echo(1) + echo(2)[:5])  # not conformant, but not lost
    session.upstream_connected()
    assert session.receive(REQUESTER, echo(2)[5:]) == []
    commands = session.receive(UPSTREAM, PACS_AC)
    assert transcript(commands)[2:] == [Send(UPSTREAM, [echo(1) + echo(2)])]
    assert counted(session) == {("C-ECHO", VERIFICATION): OperationCounts(forwarded=2)}


def test_upstream_pdus_in_the_same_read_as_the_ac_are_forwarded() -> None:
    session = new_session()
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    session.upstream_connected()
    upstream_echo = echo(77)
    commands = session.receive(UPSTREAM, PACS_AC + upstream_echo)
    assert transcript(commands)[2:] == [Send(REQUESTER, [upstream_echo])]


# ---- data phase: requests ------------------------------------------------------------------------


def test_allowed_c_store_passes_and_its_response_completes_the_request() -> None:
    session = established()
    command, *data_set = store(1)
    assert transcript(session.receive(REQUESTER, command)) == [Send(UPSTREAM, [command])]
    for piece in data_set:
        assert transcript(session.receive(REQUESTER, piece)) == [Send(UPSTREAM, [piece])]
    assert counted(session) == {("C-STORE", CT): OperationCounts(forwarded=1)}
    response = p_data(command_pdv(STORE, c_store_rsp(1)))
    assert transcript(session.receive(UPSTREAM, response)) == [Send(REQUESTER, [response])]
    assert counted(session) == {("C-STORE", CT): OperationCounts(success=1)}
    assert session.take_report() == []  # taken: the next tally starts from zero


def test_c_find_on_a_storage_only_route_is_refused_and_the_next_echo_still_passes() -> None:
    session = established(
        "ARCHIVE",
        [(1, VERIFICATION, [IMPLICIT_LE]), (3, STUDY_FIND, [IMPLICIT_LE])],
        associate_ac("CT01", "ARCHIVE", [(1, 0, IMPLICIT_LE), (3, 0, IMPLICIT_LE)]),
    )
    find = p_data(command_pdv(3, c_find_rq(5)), data_pdv(3, b"\x08\x00\x52\x00", last=True))

    commands = session.receive(REQUESTER, find)

    assert not any(isinstance(c, Send) and c.side is UPSTREAM for c in commands)
    assert refusal(commands) == (3, 0x8020, 5, 0x0124)
    assert transcript(commands)[1:] == [
        RequestRefused("C-FIND", STUDY_FIND, 0x0124, "service_not_allowed", "", 5)
    ]
    assert transcript(session.receive(REQUESTER, echo(6))) == [Send(UPSTREAM, [echo(6)])]
    assert counted(session) == {("C-ECHO", VERIFICATION): OperationCounts(forwarded=1)}


def test_c_move_to_an_unlisted_destination_is_refused_with_a801() -> None:
    session = established()
    move = p_data(
        command_pdv(MOVE, c_move_rq(8, "EVIL")), data_pdv(MOVE, b"\x08\x00\x52\x00", last=True)
    )
    commands = session.receive(REQUESTER, move)
    assert refusal(commands) == (MOVE, 0x8021, 8, 0xA801)
    assert transcript(commands)[1:] == [
        RequestRefused(
            "C-MOVE", STUDY_MOVE, 0xA801, "move_destination_denied", "", 8, move_destination="EVIL"
        )
    ]


def test_c_move_to_a_listed_destination_passes() -> None:
    session = established()
    move = p_data(command_pdv(MOVE, c_move_rq(8, "WS1")), data_pdv(MOVE, b"\x00\x00", last=True))
    assert transcript(session.receive(REQUESTER, move)) == [Send(UPSTREAM, [move])]
    assert counted(session) == {("C-MOVE", STUDY_MOVE): OperationCounts(forwarded=1)}


def test_refused_c_store_swallows_its_data_set_and_the_next_store_passes() -> None:
    session = established()
    command, *data_set = store(2, sop_class=SECONDARY_CAPTURE)  # on the CT context

    commands = session.receive(REQUESTER, command)
    assert refusal(commands) == (STORE, 0x8001, 2, 0x0124)
    for piece in data_set:
        assert session.receive(REQUESTER, piece) == []

    allowed = b"".join(store(3))
    assert transcript(session.receive(REQUESTER, allowed)) == [Send(UPSTREAM, [allowed])]
    assert counted(session) == {("C-STORE", CT): OperationCounts(forwarded=1)}


def test_refusal_waits_until_the_upstreams_message_in_progress_has_ended() -> None:
    session = established()
    session.receive(
        REQUESTER, p_data(command_pdv(FIND, c_find_rq(4)), data_pdv(FIND, b"", last=True))
    )
    pending = p_data(command_pdv(FIND, c_find_rsp(4, 0xFF00)), data_pdv(FIND, b"\x08\x00"))
    assert transcript(session.receive(UPSTREAM, pending)) == [Send(REQUESTER, [pending])]

    move = p_data(command_pdv(MOVE, c_move_rq(5, "EVIL")), data_pdv(MOVE, b"", last=True))
    commands = session.receive(REQUESTER, move)
    assert [type(c) for c in commands] == [RequestRefused]  # no response inside the identifier

    identifier_end = p_data(data_pdv(FIND, b"\x52\x00", last=True))
    [send] = session.receive(UPSTREAM, identifier_end)
    assert isinstance(send, Send) and send.side is REQUESTER
    assert bytes(send.data[0]) == identifier_end
    assert refusal([Send(REQUESTER, send.data[1:])]) == (MOVE, 0x8021, 5, 0xA801)


def test_pending_responses_do_not_complete_a_request_but_the_final_one_does() -> None:
    session = established()
    session.receive(
        REQUESTER, p_data(command_pdv(FIND, c_find_rq(4)), data_pdv(FIND, b"", last=True))
    )
    pending = p_data(command_pdv(FIND, c_find_rsp(4, 0xFF00)), data_pdv(FIND, b"", last=True))
    final = p_data(command_pdv(FIND, c_find_rsp(4, 0x0000)))
    assert transcript(session.receive(UPSTREAM, pending)) == [Send(REQUESTER, [pending])]
    assert counted(session) == {("C-FIND", STUDY_FIND): OperationCounts(forwarded=1)}
    assert transcript(session.receive(UPSTREAM, final)) == [Send(REQUESTER, [final])]
    assert counted(session) == {("C-FIND", STUDY_FIND): OperationCounts(success=1)}


def test_echo_response_completes_the_echo() -> None:
    session = established()
    session.receive(REQUESTER, echo(9))
    response = p_data(command_pdv(ECHO, c_echo_rsp(9)))
    assert transcript(session.receive(UPSTREAM, response)) == [Send(REQUESTER, [response])]
    assert counted(session) == {("C-ECHO", VERIFICATION): OperationCounts(forwarded=1, success=1)}


def test_answers_are_counted_by_status_class_and_a_failure_is_an_event_too() -> None:
    session = established()
    answers = {10: 0x0000, 11: 0x0001, 12: 0xFE00, 13: 0xC211}
    for message_id in answers:
        session.receive(REQUESTER, echo(message_id))
    events = []
    for message_id, status in answers.items():
        response = p_data(command_pdv(ECHO, c_echo_rsp(message_id, status)))
        events += transcript(session.receive(UPSTREAM, response))[1:]
    assert events == [RequestFailed("C-ECHO", VERIFICATION, 0xC211, 13)]
    assert counted(session) == {
        ("C-ECHO", VERIFICATION): OperationCounts(4, success=1, warning=1, failure=1, cancel=1)
    }


def test_refused_c_moves_name_their_destination_until_they_are_counted_together() -> None:
    """The destination is the requester's to choose: each refusal reported one by one says
    which, and the ones counted together are one entry however many destinations they named
    (not one per destination: a flood of names must not grow the session's report)."""
    clock = Clock()
    session = established_with_clock(clock)
    events: list[RequestRefused] = []
    for message_id in range(1, 201):
        move = p_data(
            command_pdv(MOVE, c_move_rq(message_id, f"EVIL{message_id}")),
            data_pdv(MOVE, b"\x08\x00\x52\x00", last=True),
        )
        events += [c for c in session.receive(REQUESTER, move) if isinstance(c, RequestRefused)]
    assert [e.move_destination for e in events] == [
        f"EVIL{n}" for n in range(1, REFUSALS_REPORTED_ONE_BY_ONE + 1)
    ]
    clock.now = REFUSAL_REPORT_SECONDS
    [summary] = session.take_report()
    assert isinstance(summary, RequestRefused)
    assert (summary.count, summary.why) == (
        200 - REFUSALS_REPORTED_ONE_BY_ONE,
        "move_destination_denied",
    )
    assert summary.move_destination is None and summary.message_id is None


def established_with_clock(clock: Clock) -> Session:
    timed = Session(POLICY, "modalities", ip_address("10.1.2.3"), None, CAP, clock=clock)
    return established(session=timed)


def test_round_trips_are_timed_on_the_clock_from_request_to_final_response() -> None:
    clock = Clock()
    session = established_with_clock(clock)
    session.receive(REQUESTER, echo(1))
    clock.now += 0.25
    session.receive(REQUESTER, echo(2))
    clock.now += 0.5
    for message_id in (2, 1):
        session.receive(UPSTREAM, p_data(command_pdv(ECHO, c_echo_rsp(message_id))))
    [tally] = session.take_report()
    assert isinstance(tally, RequestTally)
    assert tally.round_trips == [("C-ECHO", 0.5), ("C-ECHO", 0.75)]


def test_the_session_hands_its_tally_out_by_itself_once_it_holds_enough_round_trips() -> None:
    clock = Clock()
    session = established_with_clock(clock)
    handed: list[RequestTally] = []
    for message_id in range(1, TALLY_ROUND_TRIPS + 2):
        session.receive(REQUESTER, echo(message_id))
        clock.now += 0.001
        response = p_data(command_pdv(ECHO, c_echo_rsp(message_id)))
        handed += [c for c in session.receive(UPSTREAM, response) if isinstance(c, RequestTally)]
    assert len(handed) == 1 and len(handed[0].round_trips) == TALLY_ROUND_TRIPS
    assert handed[0].counts[("C-ECHO", VERIFICATION)].success == TALLY_ROUND_TRIPS
    [rest] = session.take_report()  # the one after starts afresh
    assert isinstance(rest, RequestTally)
    assert rest.counts[("C-ECHO", VERIFICATION)].success == 1


def test_protocol_error_in_the_data_phase_aborts_both_sides_with_the_culprit_told_why() -> None:
    session = established()
    commands = session.receive(REQUESTER, p_data(data_pdv(STORE, b"orphan", last=True)))
    assert transcript(commands) == [
        Send(REQUESTER, [pdu.abort(reason=pdu.ABORT_UNEXPECTED_PARAMETER)]),
        Close(REQUESTER),
        Send(UPSTREAM, [pdu.abort()]),
        Close(UPSTREAM),
        AssociationEnded("aborted", "requester_protocol_error", ""),
    ]
    assert session.receive(REQUESTER, echo(1)) == []  # closed: late bytes are dropped


# ---- release, abort, lost connections, timers ---------------------------------------------------


def test_release_passes_both_ways_and_the_close_that_follows_is_no_abort() -> None:
    session = established()
    assert transcript(session.receive(REQUESTER, release_rq())) == [Send(UPSTREAM, [release_rq()])]
    assert transcript(session.receive(UPSTREAM, release_rp())) == [Send(REQUESTER, [release_rp()])]
    assert session.connection_lost(REQUESTER) == [
        Close(UPSTREAM),
        AssociationEnded("released", "released"),
    ]


def test_connection_lost_in_the_data_phase_aborts_the_other_side() -> None:
    session = established()
    assert session.connection_lost(REQUESTER) == [
        Send(UPSTREAM, [pdu.abort()]),
        Close(UPSTREAM),
        AssociationEnded("aborted", "requester_connection_lost"),
    ]
    assert session.connection_lost(UPSTREAM) == []


def test_upstream_abort_in_the_data_phase_is_forwarded_and_closes_both_sides() -> None:
    session = established()
    assert transcript(session.receive(UPSTREAM, abort_pdu(2, 0))) == [
        Send(REQUESTER, [abort_pdu(2, 0)]),
        Close(REQUESTER),
        Close(UPSTREAM),
        AssociationEnded("aborted", "upstream_aborted", ""),
    ]


def test_upstream_lost_while_awaiting_the_ac_aborts_the_requester() -> None:
    session = new_session()
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    session.upstream_connected()
    assert session.connection_lost(UPSTREAM) == [
        Send(REQUESTER, [pdu.abort()]),
        Close(REQUESTER),
        Close(UPSTREAM),
        AssociationEnded("aborted", "upstream_closed_during_setup"),  # what the requester got
    ]


def test_a_connection_closed_without_a_byte_is_a_probe_and_one_with_bytes_is_not() -> None:
    assert new_session().connection_lost(REQUESTER) == [
        Close(REQUESTER),
        AssociationEnded("probe", "closed_without_a_byte"),
    ]
    session = new_session()
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS)[:10])
    assert session.connection_lost(REQUESTER)[-1] == AssociationEnded(
        "closed", "requester_closed_during_setup"
    )


def test_artim_expiry_before_the_rq_closes_without_sending_anything() -> None:
    session = new_session()
    assert session.timed_out("artim") == [
        Close(REQUESTER),
        AssociationEnded("closed", "artim_timeout"),
    ]
    assert session.state is State.CLOSED


def test_idle_timeout_in_the_data_phase_aborts_both_sides() -> None:
    session = established()
    assert transcript(session.timed_out("idle")) == [
        Send(REQUESTER, [pdu.abort()]),
        Close(REQUESTER),
        Send(UPSTREAM, [pdu.abort()]),
        Close(UPSTREAM),
        AssociationEnded("aborted", "idle_timeout", ""),
    ]


def test_garbage_first_pdu_is_aborted_as_unrecognized() -> None:
    commands = new_session().receive(REQUESTER, bytes.fromhex("09 00 00000004 00000000"))
    assert transcript(commands) == [
        Send(REQUESTER, [pdu.abort(reason=pdu.ABORT_UNRECOGNIZED_PDU)]),
        Close(REQUESTER),
        AssociationEnded("aborted", "requester_protocol_error", ""),
    ]


def test_p_data_before_the_association_is_aborted_as_unexpected() -> None:
    commands = new_session().receive(REQUESTER, echo(1))
    assert transcript(commands) == [
        Send(REQUESTER, [pdu.abort(reason=pdu.ABORT_UNEXPECTED_PDU)]),
        Close(REQUESTER),
        AssociationEnded("aborted", "requester_protocol_error", ""),
    ]


def test_an_established_association_keeps_nothing_of_a_128_context_request() -> None:
    """A modality proposing every storage SOP class (as DCMTK's storescu does) sends ~10 KB of
    A-ASSOCIATE-RQ; decoded, that is ~55 KB of objects, which must not stay for the hours an
    association may last: only the accepted contexts' SOP classes are kept."""
    from pynetdicom import StoragePresentationContexts

    proposed: list[ContextSpec] = [
        (2 * number + 1, template.abstract_syntax or "", [EXPLICIT_LE, IMPLICIT_LE])
        for number, template in enumerate(StoragePresentationContexts[:128])
    ]
    ct_context = next(cid for cid, uid, _ in proposed if uid == CT)
    request = associate_rq("CT01", "PACS", proposed)
    answer = associate_ac("CT01", "REALPACS", [(ct_context, 0, EXPLICIT_LE)])

    def established_with_128() -> Session:
        session = new_session()
        session.receive(REQUESTER, request)
        session.upstream_connected()
        session.receive(UPSTREAM, answer)
        assert session.state is State.ESTABLISHED
        return session

    established_with_128()  # warm-up: interned strings and caches are not per association
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = [established_with_128() for _ in range(20)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_association = sum(d.size_diff for d in after.compare_to(before, "filename")) / len(kept)
    assert len(request) > 9_000
    assert per_association < 8_000, per_association
    # and it still works: a C-STORE on the accepted context passes
    commands = kept[0].receive(REQUESTER, p_data(command_pdv(ct_context, c_store_rq(1, CT))))
    assert isinstance(commands[0], Send) and commands[0].side is UPSTREAM
