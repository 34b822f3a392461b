"""Limits decided by a store all instances share: the session asks (``CheckLimits``) and waits.

The test plays the store: it reads the query the session emits and answers it with
``limits_answered``, as the relay does with Redis, or with the instance's own counters when the
store cannot answer (``Gate.decide_locally``).
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address

from dicomfw.core.policy import MONITOR, Reject
from dicomfw.core.ratelimit import (
    AssociationQuery,
    Delay,
    Gate,
    Limiter,
    LimitRules,
    RateLimits,
    Refuse,
    RequestQuery,
    source_key,
)
from dicomfw.core.session import (
    AssociationRejected,
    CheckLimits,
    Command,
    ConnectUpstream,
    PauseReading,
    RequestRefused,
    ResumeReading,
    Send,
    Session,
    Side,
    State,
    Wakeup,
    WouldRefuse,
)
from tests.corehelpers import Clock, associate_rq, c_echo_rq, command_pdv, p_data, rj_pdu
from tests.test_core_ratelimit import find
from tests.test_core_session import CAP, ECHO, PACS_AC, PACS_CONTEXTS, POLICY, transcript

REQUESTER, UPSTREAM = Side.REQUESTER, Side.UPSTREAM
ADDRESS = ip_address("10.1.2.3")
OVER = Reject(2, 3, 2, "peer_concurrency_exceeded", "CT01 has 4 of 4 associations")
FIND_RATE = RateLimits(requests_per_minute_per_peer={"C-FIND": 60})


NO_LIMITS = RateLimits()


def shared_session(
    rates: RateLimits = NO_LIMITS, mode: str = "enforce", clock: Clock | None = None
) -> tuple[Session, Gate]:
    gate = Limiter(shared=True).connect(LimitRules(rates), "modalities", ADDRESS)
    assert gate is not None
    policy = replace(POLICY, routes=tuple(replace(r, mode=mode) for r in POLICY.routes))
    session = Session(policy, "modalities", ADDRESS, None, CAP, gate, clock or Clock())
    return session, gate


def query_of(commands: list[Command]) -> AssociationQuery | RequestQuery:
    [check] = [c for c in commands if isinstance(c, CheckLimits)]
    return check.query


def test_an_association_waits_for_the_store_and_goes_upstream_when_it_admits() -> None:
    session, _ = shared_session()
    commands = session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    assert query_of(commands) == AssociationQuery("modalities", source_key(ADDRESS), "CT01", True)
    assert session.state is State.AWAIT_LIMITS
    early = p_data(command_pdv(ECHO, c_echo_rq(1)))
    assert session.receive(REQUESTER, early) == []  # kept until the association is up
    assert session.limits_answered(None)[-1] == ConnectUpstream("pacs-upstream")
    session.upstream_connected()
    commands = session.receive(UPSTREAM, PACS_AC)
    assert any(isinstance(c, Send) and c.side is UPSTREAM for c in commands)


def test_an_association_the_store_refuses_gets_the_transient_local_limit_rejection() -> None:
    session, _ = shared_session()
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    commands = transcript(session.limits_answered(OVER))
    assert commands[0] == Send(REQUESTER, [rj_pdu(2, 3, 2)])
    assert isinstance(commands[-1], AssociationRejected)
    assert commands[-1].why == "peer_concurrency_exceeded"


def test_a_rejected_caller_still_spends_the_addresses_rate_at_the_store() -> None:
    """AE-title guessing is slowed down by the address's rate, shared or not."""
    session, _ = shared_session()
    commands = session.receive(REQUESTER, associate_rq("GUESS", "PACS", PACS_CONTEXTS))
    query = query_of(commands)
    assert isinstance(query, AssociationQuery) and query.peer is None
    rate = Reject(2, 3, 2, "ip_association_rate_exceeded", "over 60 associations/minute")
    [*_, rate_rejection] = session.limits_answered(rate)
    assert isinstance(rate_rejection, AssociationRejected)
    assert rate_rejection.why == "ip_association_rate_exceeded"
    other, _ = shared_session()
    other.receive(REQUESTER, associate_rq("GUESS", "PACS", PACS_CONTEXTS))
    [*_, policy_rejection] = other.limits_answered(None)
    assert isinstance(policy_rejection, AssociationRejected)
    assert policy_rejection.why == "calling_ae_unknown"


def test_in_monitor_mode_the_store_counts_and_an_over_limit_association_goes_on() -> None:
    session, _ = shared_session(mode=MONITOR)
    query = query_of(session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS)))
    assert isinstance(query, AssociationQuery) and not query.enforce
    commands = session.limits_answered(OVER)
    [event] = [c for c in commands if isinstance(c, WouldRefuse) and c.stage == "limit"]
    assert event.why == "peer_concurrency_exceeded"
    assert commands[-1] == ConnectUpstream("pacs-upstream")


def test_a_connection_lost_while_the_store_decides_closes_without_an_upstream() -> None:
    session, _ = shared_session()
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    commands = session.connection_lost(REQUESTER)
    assert all(getattr(c, "side", None) is not UPSTREAM for c in commands)
    assert session.limits_answered(None) == []  # the answer comes too late: nothing


def established_shared(
    rates: RateLimits, mode: str = "enforce", clock: Clock | None = None
) -> Session:
    session, _ = shared_session(rates, mode, clock)
    session.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    session.limits_answered(None)
    session.upstream_connected()
    session.receive(UPSTREAM, PACS_AC)
    assert session.state is State.ESTABLISHED
    return session


def test_a_request_with_a_shared_rate_is_held_until_the_store_lets_it_pass() -> None:
    session = established_shared(FIND_RATE)
    commands = session.receive(REQUESTER, find(1))
    assert query_of(commands) == RequestQuery("modalities", "CT01", "C-FIND", True, 60, True)
    assert not any(isinstance(c, Send) for c in commands)  # nothing of it went up
    assert PauseReading(REQUESTER) in commands  # nor is anything after it read
    assert session.receive(REQUESTER, find(2)) == []
    passed = session.limits_answered(None)
    assert transcript(passed)[0] == Send(UPSTREAM, [find(1)])
    find_2 = RequestQuery("modalities", "CT01", "C-FIND", True, 60, True)
    assert query_of(passed) == find_2


def test_a_request_the_store_refuses_is_answered_by_the_firewall() -> None:
    session = established_shared(FIND_RATE)
    session.receive(REQUESTER, find(1))
    commands = session.limits_answered(Refuse(0xA700, "request_rate_exceeded", "over 60/minute"))
    assert not any(isinstance(c, Send) and c.side is UPSTREAM for c in commands)
    [refused] = [c for c in commands if isinstance(c, RequestRefused)]
    assert (refused.status, refused.why) == (0xA700, "request_rate_exceeded")
    assert any(isinstance(c, Send) and c.side is REQUESTER for c in commands)
    assert ResumeReading(REQUESTER) in commands


def test_a_request_the_store_delays_waits_for_its_wakeup() -> None:
    session = established_shared(FIND_RATE)
    session.receive(REQUESTER, find(1))
    assert session.limits_answered(Delay(0.5)) == [Wakeup(0.5)]
    assert session.holding
    assert transcript(session.wakeup())[0] == Send(UPSTREAM, [find(1)])


def test_without_the_store_the_instance_answers_from_its_own_counters() -> None:
    clock = Clock()
    rules = LimitRules(
        RateLimits(max_concurrent_per_peer=1, requests_per_minute_per_peer={"C-FIND": 60})
    )
    gate = Limiter(shared=True).connect(rules, "modalities", ADDRESS)
    assert gate is not None
    admit = AssociationQuery("modalities", source_key(ADDRESS), "CT01", True)
    assert gate.decide_locally(admit, clock.now) is None
    elsewhere = Limiter(shared=True).connect(rules, "modalities", ADDRESS)
    assert elsewhere is not None
    assert elsewhere.decide_locally(admit, clock.now) is None  # another instance's own count
    same = Limiter(shared=True)
    first, second = (
        same.connect(rules, "modalities", ADDRESS),
        same.connect(rules, "modalities", ADDRESS),
    )
    assert first is not None and second is not None
    assert first.decide_locally(admit, clock.now) is None
    over = second.decide_locally(admit, clock.now)
    assert isinstance(over, Reject) and over.why == "peer_concurrency_exceeded"
    ask = RequestQuery("modalities", "CT01", "C-FIND", True, 60, True)
    answers = [gate.decide_locally(ask, clock.now) for _ in range(61)]
    assert answers[:60] == [None] * 60 and isinstance(answers[60], Delay)
