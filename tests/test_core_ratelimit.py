"""Rate limits and caps with made-up times: buckets, counters, overrides, and the session's use
of them (the PS3.8 rejection, the out-of-resources status, a delayed request held back)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from dicomfw.core.policy import RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED, Refuse, Reject
from dicomfw.core.ratelimit import (
    MAX_DELAY_SECONDS,
    Delay,
    Gate,
    Limiter,
    LimitRules,
    RateLimits,
    TokenBucket,
    source_key,
)
from dicomfw.core.session import (
    AssociationRejected,
    PauseReading,
    RequestRefused,
    ResumeReading,
    Send,
    Session,
    State,
    Wakeup,
)
from dicomfw.errors import LocalProtocolError
from tests.corehelpers import Clock, associate_rq, c_find_rq, command_pdv, data_pdv, p_data, rj_pdu
from tests.test_core_session import (
    CAP,
    FIND,
    PACS_CONTEXTS,
    POLICY,
    REQUESTER,
    UPSTREAM,
    echo,
    established,
    refusal,
    transcript,
)

CT01 = ip_address("10.1.2.3")


def gate(limits: RateLimits, limiter: Limiter | None = None, address: str = "10.1.2.3") -> Gate:
    connected = (limiter or Limiter()).connect(
        LimitRules(limits), "modalities", ip_address(address)
    )
    assert connected is not None
    return connected


def delay_of(answer: object) -> float:
    """How long a ``Delay`` answer asks to wait (anything else fails the test)."""
    assert isinstance(answer, Delay), answer
    return answer.seconds


def local_limit(why: str) -> tuple[int, int, int, str]:
    return 2, 3, RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED, why


def codes(reject: Reject | None) -> tuple[int, int, int, str] | None:
    return None if reject is None else (reject.result, reject.source, reject.reason, reject.why)


# ---- the token bucket ----------------------------------------------------------------------------


def test_a_bucket_holds_a_minutes_worth_and_refills_continuously() -> None:
    bucket = TokenBucket(60, now=100.0)
    assert all(bucket.take(60, 100.0) for _ in range(60))
    assert not bucket.take(60, 100.0)
    assert bucket.wait(60, 100.0) == pytest.approx(1.0)
    assert not bucket.take(60, 100.9)
    assert bucket.take(60, 101.0)  # one per second at 60/minute
    assert not bucket.take(60, 101.5)
    assert bucket.full(1000.0)  # long idle: back to a full minute's worth, never more


def test_reserve_goes_into_debt_so_waiting_requests_keep_to_the_rate() -> None:
    bucket = TokenBucket(120, now=0.0)
    for _ in range(120):
        assert bucket.reserve(120, 0.0) == 0.0
    # Three requests arrive at once: each waits half a second longer than the one before.
    assert [bucket.reserve(120, 0.0) for _ in range(3)] == pytest.approx([0.5, 1.0, 1.5])
    assert bucket.wait(120, 1.5) == pytest.approx(0.5)


def test_a_reload_that_lowers_the_rate_applies_to_an_existing_bucket_at_once() -> None:
    bucket = TokenBucket(100, now=0.0)
    assert bucket.take(100, 0.0)
    assert sum(bucket.take(5, 0.0) for _ in range(10)) == 5


def test_ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert source_key(ip_address("2001:db8:1:2::1")) == ip_network("2001:db8:1:2::/64")
    assert source_key(ip_address("2001:db8:1:2:ffff::9")) == source_key(
        ip_address("2001:db8:1:2::1")
    )
    assert source_key(ip_address("::ffff:10.1.2.3")) == CT01


# ---- the limiter: pending, concurrency, association rates ----------------------------------


def test_connections_beyond_the_pending_cap_are_refused_until_one_associates_or_leaves() -> None:
    limiter = Limiter()
    rules = LimitRules(RateLimits(max_pending_per_ip=2))
    first, second = (limiter.connect(rules, "modalities", CT01) for _ in range(2))
    assert first is not None and second is not None
    assert limiter.connect(rules, "modalities", CT01) is None
    assert limiter.connect(rules, "modalities", ip_address("10.1.2.4")) is not None  # another host
    assert first.admit("CT01", 0.0) is None  # associated: no longer pending
    third = limiter.connect(rules, "modalities", CT01)
    assert third is not None
    second.release()
    assert limiter.connect(rules, "modalities", CT01) is not None


@pytest.mark.parametrize(
    ("limits", "why"),
    [
        (RateLimits(max_concurrent_per_ip=2), "ip_concurrency_exceeded"),
        (RateLimits(max_concurrent_per_peer=2), "peer_concurrency_exceeded"),
        (RateLimits(max_concurrent_total=2), "total_concurrency_exceeded"),
    ],
)
def test_the_third_concurrent_association_is_rejected_transient_local_limit(
    limits: RateLimits, why: str
) -> None:
    limiter = Limiter()
    first, second, third = (gate(limits, limiter) for _ in range(3))
    assert first.admit("CT01", 0.0) is None
    assert second.admit("CT01", 0.0) is None
    assert codes(third.admit("CT01", 0.0)) == local_limit(why)
    first.release()
    assert third.admit("CT01", 0.0) is None  # a slot is free again


def test_the_total_cap_counts_every_address_and_peer() -> None:
    limiter = Limiter()
    limits = RateLimits(max_concurrent_total=1)
    assert gate(limits, limiter, "10.1.2.3").admit("CT01", 0.0) is None
    late = gate(limits, limiter, "10.1.3.3").admit("WS1", 0.0)
    assert codes(late) == local_limit("total_concurrency_exceeded")


def test_association_rates_per_address_and_per_peer() -> None:
    limiter = Limiter()
    per_ip = RateLimits(associations_per_minute_per_ip=2)
    assert [codes(gate(per_ip, limiter).source(0.0)) for _ in range(3)] == [
        None,
        None,
        local_limit("ip_association_rate_exceeded"),
    ]
    assert gate(per_ip, limiter).source(30.0) is None  # half a minute: one more token
    assert gate(per_ip, limiter, "10.1.2.4").source(30.0) is None  # another address

    per_peer = RateLimits(associations_per_minute_per_peer=1)
    assert gate(per_peer, limiter).admit("CT01", 0.0) is None
    assert codes(gate(per_peer, limiter, "10.1.2.9").admit("CT01", 0.0)) == local_limit(
        "peer_association_rate_exceeded"
    )


def test_release_gives_back_everything_and_is_idempotent() -> None:
    limiter = Limiter()
    limits = RateLimits(max_pending_per_ip=5, max_concurrent_per_ip=5, max_concurrent_total=5)
    gates = [gate(limits, limiter) for _ in range(4)]
    for active in gates[:2]:
        assert active.admit("CT01", 0.0) is None
    assert (limiter.usage().pending, limiter.usage().active) == (2, 2)
    for each in gates + gates:
        each.release()
    usage = limiter.usage()
    assert (usage.pending, usage.active, usage.keys) == (0, 0, 0)


def test_rate_buckets_of_addresses_gone_quiet_are_swept() -> None:
    limiter = Limiter()
    limits = RateLimits(associations_per_minute_per_ip=10)
    for host in range(5000):
        connected = gate(limits, limiter, f"10.{host // 250}.{host % 250}.1")
        assert connected.source(float(host)) is None  # one a second: older buckets refill
        connected.release()
    assert limiter.usage().keys <= 2048


# ---- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "status"),
    [("C-FIND", 0xA700), ("C-STORE", 0xA700), ("C-MOVE", 0xA701), ("C-GET", 0xA701),
     ("C-ECHO", 0x0213), ("N-ACTION", 0x0213)],
)  # fmt: skip
def test_a_refused_request_gets_its_services_out_of_resources_status(
    service: str, status: int
) -> None:
    limits = RateLimits(
        requests_per_minute_per_association={service: 1}, request_limit_action="refuse"
    )
    connected = gate(limits)
    assert connected.admit("CT01", 0.0) is None
    assert connected.request(service, 0.0) is None
    refused = connected.request(service, 0.0)
    assert isinstance(refused, Refuse) and refused.status == status
    assert refused.why == "request_rate_exceeded"


def test_delay_mode_answers_how_long_to_wait_and_refuses_beyond_a_minute() -> None:
    limits = RateLimits(requests_per_minute_per_association={"C-FIND": 60})
    connected = gate(limits)
    assert connected.admit("CT01", 0.0) is None
    assert [connected.request("C-FIND", 0.0) for _ in range(60)] == [None] * 60
    assert delay_of(connected.request("C-FIND", 0.0)) == pytest.approx(1.0)
    assert delay_of(connected.request("C-FIND", 0.0)) == pytest.approx(2.0)
    assert connected.request("C-ECHO", 0.0) is None  # other services are not limited
    for _ in range(57):
        connected.request("C-FIND", 0.0)
    assert delay_of(connected.request("C-FIND", 0.0)) == pytest.approx(MAX_DELAY_SECONDS)
    over = connected.request("C-FIND", 0.0)
    assert isinstance(over, Refuse) and over.status == 0xA700


def test_a_per_peer_request_rate_is_shared_by_all_the_peers_associations() -> None:
    limiter = Limiter()
    limits = RateLimits(requests_per_minute_per_peer={"C-FIND": 2}, request_limit_action="refuse")
    one, two, other = gate(limits, limiter), gate(limits, limiter), gate(limits, limiter)
    for connected, peer in ((one, "CT01"), (two, "CT01"), (other, "WS1")):
        assert connected.admit(peer, 0.0) is None
    assert one.request("C-FIND", 0.0) is None
    assert two.request("C-FIND", 0.0) is None
    assert isinstance(one.request("C-FIND", 0.0), Refuse)
    assert other.request("C-FIND", 0.0) is None  # WS1 has its own


def test_peer_overrides_listener_overrides_global_key_by_key() -> None:
    rules = LimitRules(
        RateLimits(
            max_concurrent_per_ip=10,
            requests_per_minute_per_association={"C-FIND": 60, "C-MOVE": 10},
            request_limit_action="delay",
        ),
        listeners={"remote": RateLimits(max_concurrent_per_ip=2)},
        peers={
            "CT01": RateLimits(
                requests_per_minute_per_association={"C-FIND": 600}, request_limit_action="refuse"
            )
        },
    )
    assert rules.effective("modalities").max_concurrent_per_ip == 10
    assert rules.effective("remote").max_concurrent_per_ip == 2
    ct01 = rules.effective("remote", "CT01")
    assert ct01.max_concurrent_per_ip == 2
    assert dict(ct01.requests_per_minute_per_association) == {"C-FIND": 600, "C-MOVE": 10}
    assert ct01.action == "refuse"
    assert rules.effective("remote", "WS1").action == "delay"


# ---- the session asks the gate ------------------------------------------------------------------


def limited_session(limits: RateLimits, limiter: Limiter, clock: Clock) -> Session:
    return Session(POLICY, "modalities", CT01, None, CAP, gate(limits, limiter), clock)


def test_a_session_with_a_gate_needs_a_clock() -> None:
    with pytest.raises(LocalProtocolError, match="clock"):
        Session(POLICY, "modalities", CT01, None, CAP, gate(RateLimits(), Limiter()))


def test_the_session_rejects_an_association_over_the_cap_with_2_3_2() -> None:
    limiter, clock = Limiter(), Clock()
    limits = RateLimits(max_concurrent_per_peer=1)
    first = limited_session(limits, limiter, clock)
    first.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS))
    assert first.state is State.AWAIT_UPSTREAM
    second = limited_session(limits, limiter, clock)
    commands = transcript(second.receive(REQUESTER, associate_rq("CT01", "PACS", PACS_CONTEXTS)))
    assert commands[0] == Send(REQUESTER, [rj_pdu(2, 3, 2)])
    assert isinstance(commands[2], AssociationRejected)
    assert commands[2].why == "peer_concurrency_exceeded"


def test_an_address_over_its_rate_is_rejected_before_its_ae_title_is_looked_at() -> None:
    limiter, clock = Limiter(), Clock()
    limits = RateLimits(associations_per_minute_per_ip=1)
    guess = limited_session(limits, limiter, clock)
    guess.receive(REQUESTER, associate_rq("GUESS1", "PACS", PACS_CONTEXTS))  # permanent RJ 3
    again = limited_session(limits, limiter, clock)
    commands = again.receive(REQUESTER, associate_rq("GUESS2", "PACS", PACS_CONTEXTS))
    assert transcript(commands)[0] == Send(REQUESTER, [rj_pdu(2, 3, 2)])


def established_with(limits: RateLimits, clock: Clock) -> Session:
    return established(session=limited_session(limits, Limiter(), clock))


def find(message_id: int) -> bytes:
    """A C-FIND-RQ and its identifier in one P-DATA-TF."""
    return p_data(
        command_pdv(FIND, c_find_rq(message_id)), data_pdv(FIND, b"\x08\x00\x52\x00", last=True)
    )


def test_a_c_find_over_its_rate_is_refused_with_a700_and_never_forwarded() -> None:
    clock = Clock()
    limits = RateLimits(
        requests_per_minute_per_association={"C-FIND": 1}, request_limit_action="refuse"
    )
    session = established_with(limits, clock)
    assert transcript(session.receive(REQUESTER, find(1)))[0] == Send(UPSTREAM, [find(1)])
    commands = session.receive(REQUESTER, find(2))
    assert refusal(commands[:1]) == (FIND, 0x8020, 2, 0xA700)
    assert isinstance(commands[1], RequestRefused) and commands[1].why == "request_rate_exceeded"
    clock.now = 60.0
    assert transcript(session.receive(REQUESTER, find(3)))[0] == Send(UPSTREAM, [find(3)])


def test_a_delayed_request_is_held_and_what_follows_waits_behind_it() -> None:
    clock = Clock()
    limits = RateLimits(requests_per_minute_per_association={"C-ECHO": 60})
    session = established_with(limits, clock)
    for message_id in range(60):
        assert transcript(session.receive(REQUESTER, echo(message_id)))[0] == Send(
            UPSTREAM, [echo(message_id)]
        )
    commands = session.receive(REQUESTER, echo(60))
    # nothing is sent until the wakeup, and the requester is not read meanwhile
    assert [type(c) for c in commands] == [Wakeup, PauseReading]
    assert isinstance(commands[0], Wakeup) and commands[0].delay == pytest.approx(1.0)
    assert commands[1] == PauseReading(REQUESTER)
    assert session.holding
    assert session.receive(REQUESTER, echo(61)) == []  # arrives while held: queued behind it
    clock.now = 1.0
    woken = transcript(session.wakeup())
    # the next one is over the rate too: still not read
    assert woken[0] == Send(UPSTREAM, [echo(60)]) and len(woken) == 2
    assert isinstance(woken[1], Wakeup) and woken[1].delay == pytest.approx(1.0)
    clock.now = 2.0
    assert transcript(session.wakeup()) == [Send(UPSTREAM, [echo(61)]), ResumeReading(REQUESTER)]
    assert not session.holding


def test_an_abort_while_a_request_is_held_drops_it() -> None:
    clock = Clock()
    limits = RateLimits(requests_per_minute_per_association={"C-ECHO": 1})
    session = established_with(limits, clock)
    session.receive(REQUESTER, echo(1))
    assert isinstance(session.receive(REQUESTER, echo(2))[0], Wakeup)
    aborted = transcript(session.abort("shutdown"))
    assert [c for c in aborted if isinstance(c, Send) and c.side is UPSTREAM] == [
        Send(UPSTREAM, [bytes.fromhex("07000000000400000200")])
    ]
    assert session.wakeup() == []
