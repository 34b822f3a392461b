"""Monitor mode: every decision is made as in enforce mode; what enforce mode would refuse is
reported as ``WouldRefuse`` with the same reason, and the association goes on as if allowed.

Each case is run twice on the same input: enforce mode must refuse it, monitor mode must let it
through and say why enforce mode would not have.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address, ip_network

import pytest

from dicomfw.core.policy import MONITOR, CertificateIdentity, Peer, Policy
from dicomfw.core.ratelimit import Limiter, LimitRules, RateLimits
from dicomfw.core.session import (
    MAX_MOVE_DESTINATIONS,
    AssociationRejected,
    Command,
    ConnectUpstream,
    RequestRefused,
    RequestTally,
    Send,
    Session,
    Side,
    WouldRefuse,
)
from tests.corehelpers import (
    IMPLICIT_LE,
    SECONDARY_CAPTURE,
    STUDY_FIND,
    Clock,
    associate_rq,
    c_move_rq,
    c_store_rq,
    command_pdv,
    data_pdv,
    decoded_rq,
    p_data,
)
from tests.test_core_ratelimit import find
from tests.test_core_session import CAP, FIND, MOVE, PACS_CONTEXTS, POLICY, established

REQUESTER, UPSTREAM = Side.REQUESTER, Side.UPSTREAM
ALLOWED_CONTEXTS = PACS_CONTEXTS[:4]  # all but Secondary Capture, which the route refuses
CT01_BOUND = Peer(
    "CT01", (ip_network("10.1.2.0/24"),), CertificateIdentity(subject_cn="ct01.example")
)


def policy_in(mode: str, policy: Policy = POLICY) -> Policy:
    return replace(policy, routes=tuple(replace(route, mode=mode) for route in policy.routes))


def session(policy: Policy, address: str = "10.1.2.3") -> Session:
    return Session(policy, "modalities", ip_address(address), None, CAP)


ASSOCIATION_CASES = {
    # why: (policy, source address, calling AE, proposed contexts)
    "calling_ae_unknown": (POLICY, "10.1.2.3", "INTRUDER", PACS_CONTEXTS),
    "source_network_denied": (POLICY, "10.9.9.9", "CT01", PACS_CONTEXTS),
    "certificate_mismatch": (
        replace(POLICY, peers=(CT01_BOUND, *POLICY.peers[1:])),
        "10.1.2.3",
        "CT01",
        PACS_CONTEXTS,
    ),
    "route_denies_calling_ae": (
        replace(
            POLICY,
            routes=(replace(POLICY.routes[0], calling_aes=frozenset({"WS1"})), *POLICY.routes[1:]),
        ),
        "10.1.2.3",
        "CT01",
        PACS_CONTEXTS,
    ),
    "no_context_allowed": (POLICY, "10.1.2.3", "CT01", [(1, SECONDARY_CAPTURE, [IMPLICIT_LE])]),
}


@pytest.mark.parametrize("why", ASSOCIATION_CASES)
def test_an_association_enforce_mode_rejects_goes_upstream_in_monitor_mode(why: str) -> None:
    policy, address, calling, contexts = ASSOCIATION_CASES[why]
    rq = associate_rq(calling, "PACS", contexts)
    [*_, rejected] = session(policy, address).receive(REQUESTER, rq)
    assert isinstance(rejected, AssociationRejected) and rejected.why == why

    commands = session(policy_in(MONITOR, policy), address).receive(REQUESTER, rq)
    assert commands[-1] == ConnectUpstream("pacs-upstream")
    reported = [c for c in commands if isinstance(c, WouldRefuse)]
    assert [e.why for e in reported if e.stage == "association"] == [why]
    [event] = [e for e in reported if e.why == why]
    code = f"{rejected.result}/{rejected.source}/{rejected.reason}"
    assert event.answer == f"A-ASSOCIATE-RJ {code}"


def test_an_unknown_called_ae_is_rejected_in_monitor_mode_too_there_is_nowhere_to_go() -> None:
    commands = session(policy_in(MONITOR)).receive(
        REQUESTER, associate_rq("CT01", "NOBODY", PACS_CONTEXTS)
    )
    assert isinstance(commands[-1], AssociationRejected)
    assert commands[-1].why == "called_ae_unknown"


def test_a_context_enforce_mode_refuses_is_proposed_upstream_as_proposed_in_monitor_mode() -> None:
    monitored = session(policy_in(MONITOR))
    commands = monitored.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    [event] = [c for c in commands if isinstance(c, WouldRefuse)]
    assert (event.stage, event.why, event.sop_class) == (
        "context",
        "sop_class_not_allowed",
        SECONDARY_CAPTURE,
    )
    [send] = monitored.upstream_connected()
    assert isinstance(send, Send)
    proposed = decoded_rq(bytes(send.data[0])).presentation_context
    assert [c.abstract_syntax for c in proposed][-1] == SECONDARY_CAPTURE
    # enforce mode leaves it out
    enforced = session(POLICY)
    enforced.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    [send] = enforced.upstream_connected()
    assert isinstance(send, Send)
    proposed = decoded_rq(bytes(send.data[0])).presentation_context
    assert SECONDARY_CAPTURE not in [c.abstract_syntax for c in proposed]


def moved(destination: str) -> bytes:
    return p_data(
        command_pdv(MOVE, c_move_rq(1, destination)), data_pdv(MOVE, b"\0" * 8, last=True)
    )


REFUSED_REQUESTS = {
    "move_destination_denied": (moved("EVIL"), 0xA801),
    "service_not_allowed": (
        p_data(command_pdv(FIND, c_store_rq(1, STUDY_FIND)), data_pdv(FIND, b"\0" * 8, last=True)),
        0x0124,
    ),
}


@pytest.mark.parametrize("why", REFUSED_REQUESTS)
def test_a_request_enforce_mode_refuses_reaches_the_upstream_in_monitor_mode(why: str) -> None:
    request, status = REFUSED_REQUESTS[why]
    enforced = established()
    refused = [c for c in enforced.receive(REQUESTER, request) if isinstance(c, RequestRefused)]
    assert [(e.why, e.status) for e in refused] == [(why, status)]

    monitored = established(contexts=ALLOWED_CONTEXTS, session=session(policy_in(MONITOR)))
    commands = monitored.receive(REQUESTER, request)
    [send] = [c for c in commands if isinstance(c, Send)]
    assert send.side is UPSTREAM and b"".join(bytes(b) for b in send.data) == request
    [event] = [c for c in commands if isinstance(c, WouldRefuse)]
    assert (event.stage, event.why, event.answer) == ("request", why, f"0x{status:04X}")
    assert not any(isinstance(c, RequestRefused) for c in commands)


def limited(policy: Policy, rates: RateLimits, clock: Clock) -> Session:
    gate = Limiter().connect(LimitRules(rates), "modalities", ip_address("10.1.2.3"))
    assert gate is not None
    return Session(policy, "modalities", ip_address("10.1.2.3"), None, CAP, gate, clock)


def test_a_request_over_its_rate_passes_in_monitor_mode_and_says_it_was_over() -> None:
    clock = Clock()
    rates = RateLimits(
        requests_per_minute_per_association={"C-FIND": 1}, request_limit_action="refuse"
    )
    for mode, forwarded in (("enforce", False), (MONITOR, True)):
        active = established(
            contexts=ALLOWED_CONTEXTS, session=limited(policy_in(mode), rates, clock)
        )
        active.receive(REQUESTER, find(1))
        commands: list[Command] = active.receive(REQUESTER, find(2))
        went_up = any(isinstance(c, Send) and c.side is UPSTREAM for c in commands)
        assert went_up is forwarded, mode
        if forwarded:
            [event] = [c for c in commands if isinstance(c, WouldRefuse)]
            assert (event.stage, event.why, event.answer) == (
                "limit",
                "request_rate_exceeded",
                "0xA700",
            )


def test_move_destinations_used_are_reported_for_learning_and_bounded() -> None:
    monitored = established(contexts=ALLOWED_CONTEXTS, session=session(policy_in(MONITOR)))
    for number in range(40):  # monitor mode lets every destination through
        monitored.receive(REQUESTER, moved(f"DEST{number % 20}"))
    tallies = [e for e in monitored.take_report() if isinstance(e, RequestTally)]
    reported = set().union(*(t.move_destinations for t in tallies))
    assert len(reported) == MAX_MOVE_DESTINATIONS
    assert reported <= {f"DEST{n}" for n in range(20)}
