"""The Redis limit store against a real redis-server: shared caps and rates with the core's
token-bucket semantics, leases that expire and are renewed, bounded keys, and the fallback
when Redis is gone or frozen (logged once per change, counted, recovered without a restart).

Two stores on one Redis are two instances; each has its own ``Limiter(shared=True)``, as
each process has.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from dicomfw.config.model import ClientTLS, RedisStore
from dicomfw.core.policy import Reject
from dicomfw.core.ratelimit import (
    AssociationQuery,
    Delay,
    Gate,
    Limiter,
    LimitRules,
    RateLimits,
    Refuse,
    TokenBucket,
    source_key,
)
from dicomfw.relay.redis_store import RELEASE_BATCH_SECONDS, RedisLimitStore
from tests.harness import Pki
from tests.redishelpers import RedisServer, ServerTls, needs_redis, running_redis

pytestmark = needs_redis
ADDRESS = ipaddress.ip_address("10.1.2.3")
SOURCE = source_key(ADDRESS)


@dataclass
class Watcher:
    states: list[bool] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    def limit_store_state(self, up: bool) -> None:
        self.states.append(up)

    def limit_store_fallback(self, fail: str) -> None:
        self.fallbacks.append(fail)


@dataclass
class Instance:
    """One instance's side: its limiter and its store."""

    store: RedisLimitStore
    limiter: Limiter
    rules: LimitRules
    watcher: Watcher

    def gate(self) -> Gate:
        gate = self.limiter.connect(self.rules, "modalities", ADDRESS)
        assert gate is not None
        return gate

    async def associate(self, peer: str | None = "CT01", enforce: bool = True) -> Any:
        """A new connection's association decision: (the answer, its gate)."""
        gate = self.gate()
        query = AssociationQuery("modalities", SOURCE, peer, enforce)
        answer = await self.store.decide(query, gate)
        if answer is None or not enforce:
            gate.admit(peer or "", time.monotonic(), enforce=False)  # as the session does
        return answer, gate

    async def request(self, gate: Gate, service: str = "C-FIND") -> Any:
        query = gate.shared_request(service, True)  # as the session asks
        assert query is not None, f"no shared {service} rate"
        return await self.store.decide(query, gate)


def settings(server: RedisServer, **changes: Any) -> RedisStore:
    return replace(RedisStore(server.url, timeout_ms=200, lease_seconds=3), **changes)


def run(
    server: RedisServer,
    rates: RateLimits,
    test: Callable[..., Awaitable[None]],
    instances: int = 1,
    **changes: Any,
) -> None:
    """Run ``test(*instances)`` on a fresh event loop with stores started and closed."""

    async def main() -> None:
        rules = LimitRules(rates)
        made = []
        for number in range(instances):
            watcher = Watcher()
            store = RedisLimitStore(
                settings(server, **changes), f"fw{number}", lambda: rules, watcher
            )
            await store.start()
            made.append(Instance(store, Limiter(shared=True), rules, watcher))
        try:
            await test(*made)
        finally:
            for instance in made:
                await instance.store.close()

    asyncio.run(main())


def slots(server: RedisServer, scope: str) -> int:
    with server.client() as client:
        client.zremrangebyscore(f"dicomfw:c:{scope}", "-inf", int(time.time() * 1000))
        return int(client.zcard(f"dicomfw:c:{scope}"))


def test_a_concurrency_cap_holds_across_instances_and_a_release_frees_a_slot(
    tmp_path: Path,
) -> None:
    async def test(one: Instance, two: Instance) -> None:
        first, _ = await one.associate()
        second, held = await two.associate()
        assert first is None and second is None
        over, _ = await one.associate()
        assert isinstance(over, Reject)
        assert (over.result, over.source, over.reason) == (2, 3, 2)  # transient, local limit
        assert over.why == "peer_concurrency_exceeded"
        assert over.detail == "CT01 has 2 of 2 associations"
        held.release()
        two.store.release(held)
        await asyncio.sleep(RELEASE_BATCH_SECONDS + 0.05)  # releases are written in batches
        assert (await one.associate())[0] is None

    with running_redis(tmp_path) as server:
        run(server, RateLimits(max_concurrent_per_peer=2), test, instances=2)


def test_monitor_mode_counts_over_the_cap_and_says_which(tmp_path: Path) -> None:
    async def test(one: Instance) -> None:
        assert (await one.associate())[0] is None
        over, _ = await one.associate(enforce=False)
        assert isinstance(over, Reject) and over.why == "ip_concurrency_exceeded"
        assert slots(server, f"ip:{SOURCE}") == 2  # counted all the same

    with running_redis(tmp_path) as server:
        run(server, RateLimits(max_concurrent_per_ip=1), test)


def test_association_rates_are_token_buckets_per_address_and_per_peer(tmp_path: Path) -> None:
    async def test(one: Instance, two: Instance) -> None:
        answers = [(await (one, two)[n % 2].associate())[0] for n in range(4)]
        assert answers[:3] == [None] * 3
        assert isinstance(answers[3], Reject) and answers[3].why == "ip_association_rate_exceeded"
        assert answers[3].detail == f"{SOURCE} is over 3 associations/minute"
        guess, _ = await one.associate(peer=None)  # AE-title guessing spends the rate too
        assert isinstance(guess, Reject) and guess.why == "ip_association_rate_exceeded"

    with running_redis(tmp_path) as server:
        run(server, RateLimits(associations_per_minute_per_ip=3), test, instances=2)

    async def peer_rate(one: Instance) -> None:
        answers = [(await one.associate())[0] for _ in range(3)]
        assert answers[:2] == [None, None]
        assert isinstance(answers[2], Reject) and answers[2].why == "peer_association_rate_exceeded"

    with running_redis(tmp_path) as server:
        run(server, RateLimits(associations_per_minute_per_peer=2), peer_rate)


def test_a_request_rate_delays_like_the_core_s_token_bucket_then_refuses(tmp_path: Path) -> None:
    """C-FIND: 2 a minute, delay: two pass, then waits of 30 and 60 s (the debt of the first
    delayed one counts), then a refusal: more than 60 s is refused, as in the core."""
    rates = RateLimits(requests_per_minute_per_peer={"C-FIND": 2})

    async def test(one: Instance, two: Instance) -> None:
        _, gate_one = await one.associate()
        _, gate_two = await two.associate()
        answers = [await (one, two)[n % 2].request((gate_one, gate_two)[n % 2]) for n in range(5)]
        local, now = TokenBucket(2, 0.0), 0.0
        expected = [local.reserve(2, now) for _ in range(4)]
        assert answers[:2] == [None, None] and expected[:2] == [0.0, 0.0]
        for answer, wait in zip(answers[2:4], expected[2:4], strict=True):
            assert isinstance(answer, Delay)
            assert wait - 0.5 < answer.seconds <= wait  # Redis's clock ran on a little
        refused = Refuse(0xA700, "request_rate_exceeded", "C-FIND is over 2/minute per peer")
        assert answers[4] == refused

    with running_redis(tmp_path) as server:
        run(server, rates, test, instances=2)


def test_every_key_expires_so_addresses_that_came_once_leave_nothing(tmp_path: Path) -> None:
    rates = RateLimits(
        associations_per_minute_per_ip=60,
        associations_per_minute_per_peer=60,
        max_concurrent_per_ip=5,
        requests_per_minute_per_peer={"C-FIND": 60},
    )

    async def test(one: Instance) -> None:
        _, gate = await one.associate()
        await one.request(gate)
        with server.client() as client:
            keys = client.keys("dicomfw:*")
            assert len(keys) == 6  # 2 association buckets, 3 slot sets, 1 request bucket
            ttls = {key.decode(): client.pttl(key) for key in keys}
        assert all(0 < ttl <= 3000 for key, ttl in ttls.items() if ":c:" in key)
        # a bucket one token short is full again in a second: its key goes then
        assert all(0 < ttl <= 2000 for key, ttl in ttls.items() if ":c:" not in key)

    with running_redis(tmp_path) as server:
        run(server, rates, test)


def test_slots_of_an_instance_that_stops_renewing_expire_within_the_lease(tmp_path: Path) -> None:
    async def test(alive: Instance, crashed: Instance) -> None:
        for _ in range(2):
            assert (await crashed.associate())[0] is None
        assert (await alive.associate())[0] is None
        await crashed.store.close()  # no release: what a kill -9 leaves behind
        stopped = time.monotonic()
        assert isinstance((await alive.associate())[0], Reject)
        await asyncio.sleep(4)  # longer than a lease: the live instance's slot was renewed
        assert slots(server, "peer:CT01") == 1
        assert (await alive.associate())[0] is None
        assert time.monotonic() - stopped < 3 + 1.5

    with running_redis(tmp_path) as server:
        run(server, RateLimits(max_concurrent_per_peer=3), test, instances=2)


def test_redis_gone_fail_open_answers_locally_logs_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomfw.limitstore")

    async def test(one: Instance) -> None:
        _, first = await one.associate()
        server.stop()
        answers = [await one.associate() for _ in range(3)]
        assert [answer for answer, _ in answers[:1]] == [None]  # this process's own cap: 2
        assert all(isinstance(answer, Reject) for answer, _ in answers[1:])
        assert one.watcher.states == [True, False] and one.watcher.fallbacks == ["open"] * 3
        assert one.store.accepting
        server.start()  # empty: the slots it held are gone
        await wait_for(lambda: one.store.up)
        assert one.watcher.states == [True, False, True]
        # the next renewal put back the slots of the live associations, one admitted meanwhile
        await wait_for(lambda: slots(server, "peer:CT01") == 2)
        assert isinstance((await one.associate())[0], Reject)
        assert first.peer == "CT01"

    with running_redis(tmp_path) as server:
        run(server, RateLimits(max_concurrent_per_peer=2), test)
    events = [r.getMessage().split()[0] for r in caplog.records]
    assert events.count("event=limit_store_down") == 1
    assert events.count("event=limit_store_up") == 2  # at start, and once back


def test_redis_frozen_fail_closed_refuses_within_the_timeout_and_is_not_accepting(
    tmp_path: Path,
) -> None:
    async def test(one: Instance) -> None:
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            answer, _ = await one.associate()
            assert time.monotonic() - started < 0.5  # the 200 ms timeout, not TCP's
            assert isinstance(answer, Reject) and answer.why == "limit_store_unavailable"
            assert (answer.result, answer.reason) == (2, 2)
            assert not one.store.accepting
            started = time.monotonic()
            assert isinstance((await one.associate())[0], Reject)
            assert time.monotonic() - started < 0.05  # while down, Redis is not asked
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        await wait_for(lambda: one.store.accepting)
        assert (await one.associate())[0] is None
        assert one.watcher.fallbacks == ["closed", "closed"]

    with running_redis(tmp_path) as server:
        run(server, RateLimits(max_concurrent_per_peer=5), test, fail="closed")


def test_a_connection_that_ends_while_its_decision_is_under_way_leaves_no_slot(
    tmp_path: Path,
) -> None:
    async def test(one: Instance) -> None:
        gate = one.gate()
        query = AssociationQuery("modalities", SOURCE, "CT01", True)
        deciding = asyncio.get_running_loop().create_task(one.store.decide(query, gate))
        await asyncio.sleep(0)  # the script is on its way
        gate.release()
        one.store.release(gate)
        assert await deciding is None
        await wait_for(lambda: slots(server, "peer:CT01") == 0)

    with running_redis(tmp_path) as server:
        run(server, RateLimits(max_concurrent_per_peer=5), test)


def test_over_tls_the_store_verifies_redis_and_presents_its_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    """rediss:// with limits.redis.tls: Redis's certificate is verified against the CA and
    the URL's host (127.0.0.1, in its SAN), and Redis requires dicomfw's client certificate."""
    tls = ServerTls(pki.pacs, pki.ca, pki.fw_client)

    async def test(one: Instance) -> None:
        assert one.store.up
        assert (await one.associate())[0] is None
        assert isinstance((await one.associate())[0], Reject)  # the cap of 1, kept over TLS

    client = ClientTLS(pki.ca, pki.fw_client.cert, pki.fw_client.key)
    with running_redis(tmp_path, tls) as server:
        run(server, RateLimits(max_concurrent_per_peer=1), test, tls=client)


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.05)


def test_after_a_reload_an_open_association_keeps_the_request_rate_it_was_admitted_with(
    tmp_path: Path,
) -> None:
    """As without a store: a reload from C-FIND 2 to 1000 a minute leaves an association
    admitted before it at 2 (its third query refused), while one admitted after gets 1000."""
    before, after = (
        LimitRules(
            RateLimits(requests_per_minute_per_peer={"C-FIND": rate}, request_limit_action="refuse")
        )
        for rate in (2, 1000)
    )
    in_force = [before]

    async def main(server: RedisServer) -> None:
        store = RedisLimitStore(settings(server), "fw0", lambda: in_force[0], Watcher())
        await store.start()
        try:
            limiter = Limiter(shared=True)
            _, admitted_before = await Instance(store, limiter, before, Watcher()).associate()
            in_force[0] = after  # the reload
            later = Instance(store, limiter, after, Watcher())
            _, admitted_after = await later.associate(peer="CT02")
            old = [await later.request(admitted_before) for _ in range(3)]
            new = [await later.request(admitted_after) for _ in range(3)]
        finally:
            await store.close()
        assert old[:2] == [None, None]
        assert old[2] == Refuse(0xA700, "request_rate_exceeded", "C-FIND is over 2/minute per peer")
        assert new == [None, None, None]

    with running_redis(tmp_path) as server:
        asyncio.run(main(server))
