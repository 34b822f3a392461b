"""The shared limit store: association limits and per-peer request rates kept in one Redis for
every instance and worker (``limits: {store: redis}``).

Several dicomfw instances behind a load balancer each count only what reaches them; with the
store, the relay asks Redis instead (``Relay.limit_store``, ``Limiter(shared=True)``): one
atomic script per decision, one round trip, bounded by ``timeout_ms`` (``redis_scripts.py``).

* **Leases.** An admitted association holds a slot in each of its scopes (address, peer, site)
  until it ends (``release``). Each slot expires ``lease_seconds`` after its last renewal; one
  script renews every live slot of this process every third of that, so the slots of an
  instance that crashed free themselves within the lease, and a slot Redis lost (restart,
  outage longer than a lease) is put back by the next renewal.
* **Failure.** A decision Redis does not answer in time (or a broken connection) puts the store
  *down*: logged once (``event=limit_store_down``), shown by ``dicomfw_limit_store_up``, and
  until it is back every decision is the fallback, counted in
  ``dicomfw_limit_store_fallbacks_total``: ``fail: open`` answers from this process's own
  counters (the limits as without a store), ``fail: closed`` rejects new associations with the
  transient local-limit rejection (``limit_store_unavailable``) and makes ``accepting`` false,
  which ``/ready`` reports. Requests on associations already open are decided locally either
  way: they were admitted, and refusing their queries helps nobody. While down, Redis is not
  asked per decision (no timeout per association): the renewal timer probes it every second
  and, once it answers, the store is up again (``event=limit_store_up``) without a restart.
* Every worker process has its own connection pool (the store is created in the worker).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from dicomfw.config.model import Config, RedisStore
from dicomfw.core.policy import (
    RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED,
    RJ_SOURCE_PRESENTATION,
    RJ_TRANSIENT,
    Refuse,
    Reject,
)
from dicomfw.core.ratelimit import (
    MAX_DELAY_SECONDS,
    OUT_OF_RESOURCES,
    STATUS_RESOURCE_LIMITATION,
    AssociationQuery,
    Delay,
    Gate,
    Limiter,
    LimitQuery,
    LimitRules,
    RequestQuery,
)
from dicomfw.logsetup import log_event
from dicomfw.relay import redis_scripts
from dicomfw.relay.server import Relay

log = logging.getLogger("dicomfw.limitstore")

#: While the store is down, how often Redis is asked whether it is back.
PROBE_SECONDS: Final = 1.0
#: Slots of associations that ended are given back together, this long after the first: one
#: script for many (each call costs the relay ~0.1 ms of CPU), a slot counted 50 ms too long.
RELEASE_BATCH_SECONDS: Final = 0.05
#: What a failed call to Redis raises: its own errors, the socket's, and our timeout.
_FAILURES: Final = (RedisError, OSError, TimeoutError)
_TLS_VERSIONS: Final = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class StoreWatcher(Protocol):
    """Who hears of the store's state and fallbacks (the metrics)."""

    def limit_store_state(self, up: bool) -> None: ...

    def limit_store_fallback(self, fail: str) -> None: ...


@dataclass(eq=False)
class _Lease:
    """The slots one association holds (or may hold: a decision that timed out may still have
    been carried out by Redis), as (sorted-set key, member) pairs."""

    member: str
    keys: tuple[str, str, str]
    deciding: bool = True  # Redis may be carrying out the decision now: not renewed yet
    renew: bool = False  # admitted: renewed until released
    released: bool = False  # the connection ended while the decision was under way


def _over_limit(why: str, detail: str) -> Reject:
    """The rejection ``core/ratelimit.py`` gives for a local limit (PS3.8 Table 9-21)."""
    return Reject(
        RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED, why, detail
    )


def _cap(value: int | None) -> int:
    """A limit as the scripts take it: 0 is "not set"."""
    return 0 if value is None else value


class RedisLimitStore:
    """``relay/server.py:LimitStore`` on Redis. ``rules`` gives the limits in force (they follow
    reloads); ``instance`` names this instance in the lease members (``ZRANGE`` shows who holds
    a slot). Call ``start`` on the running loop, ``close`` after the relay stopped."""

    def __init__(
        self,
        settings: RedisStore,
        instance: str,
        rules: Callable[[], LimitRules],
        watcher: StoreWatcher | None = None,
    ) -> None:
        self._settings = settings
        self._rules = rules
        self._watcher = watcher
        self._timeout = settings.timeout_ms / 1000
        self._prefix = settings.key_prefix
        self._lease_ms = settings.lease_seconds * 1000
        self._members = f"{instance}:{os.getpid()}:{secrets.token_hex(3)}:"
        self._count = 0
        self._leases: dict[Gate, _Lease] = {}
        self._releasing: list[_Lease] = []
        self._flushing: asyncio.Task[None] | None = None
        self._slots = asyncio.Lock()  # a renewal and a release never interleave
        self._up = True
        self._down_since = 0.0
        self._wake = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._redis = _client(settings, instance)
        self._associate = self._redis.register_script(redis_scripts.ASSOCIATE)
        self._request = self._redis.register_script(redis_scripts.REQUEST)
        self._renew = self._redis.register_script(redis_scripts.RENEW)
        self._release = self._redis.register_script(redis_scripts.RELEASE)

    @property
    def up(self) -> bool:
        return self._up

    @property
    def accepting(self) -> bool:
        return self._up or self._settings.fail == "open"

    async def start(self) -> None:
        """Ask Redis once (so the state is known before the first association), then keep the
        leases renewed. Redis being down does not stop the start: the fallback applies."""
        await self._renew_leases()
        if self._up:
            log_event(log, logging.INFO, "limit_store_up", url=_shown(self._settings.url))
        if self._watcher is not None:
            self._watcher.limit_store_state(self._up)
        self._keeper = asyncio.get_running_loop().create_task(self._keep())

    async def close(self) -> None:
        """Give back what is still held (best effort: what Redis does not take now expires)."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self._flush()
        await self._redis.aclose()

    # ---- decisions -----------------------------------------------------------------------------

    async def decide(self, query: LimitQuery, gate: Gate) -> Reject | Refuse | Delay | None:
        if isinstance(query, AssociationQuery):
            return await self._decide_association(query, gate)
        return await self._decide_request(query, gate)

    async def _decide_association(self, query: AssociationQuery, gate: Gate) -> Reject | None:
        rules = self._rules()
        ip, limits = rules.effective(query.listener), rules.effective(query.listener, query.peer)
        keys = [f"{self._prefix}ar:ip:{query.source}"]
        lease = None
        if query.peer is not None:
            slots = (f"{self._prefix}c:ip:{query.source}", f"{self._prefix}c:peer:{query.peer}")
            self._count += 1
            lease = _Lease(f"{self._members}{self._count}", (*slots, f"{self._prefix}c:total"))
            self._leases[gate] = lease
            keys += [f"{self._prefix}ar:peer:{query.peer}", *lease.keys]
        args = (
            int(query.enforce),
            _cap(ip.associations_per_minute_per_ip),
            _cap(limits.associations_per_minute_per_peer),
            _cap(limits.max_concurrent_per_ip),
            _cap(limits.max_concurrent_per_peer),
            _cap(limits.max_concurrent_total),
            self._lease_ms,
            "" if lease is None else lease.member,
        )
        reply = await self._call(self._associate, keys, args)
        if reply is None:
            answer = self._fallback_association(query, gate)
            admitted = not (answer is not None and query.enforce)
            # Redis may have counted it before the timeout: keep the lease to release it.
            self._settle(gate, lease, renew=admitted, keep=True)
            return answer
        why, number, cap, counted = reply
        self._settle(gate, lease, renew=bool(counted), keep=bool(counted))
        return self._rejection(query, why.decode(), int(number), int(cap))

    def _rejection(self, query: AssociationQuery, why: str, number: int, cap: int) -> Reject | None:
        """The script's answer in the words ``core/ratelimit.py`` uses for the same limit."""
        if not why:
            return None
        if why.endswith("_association_rate_exceeded"):
            who = query.source if why.startswith("ip") else query.peer
            return _over_limit(why, f"{who} is over {number} associations/minute")
        scope = why.split("_", 1)[0]
        who = {"ip": str(query.source), "peer": query.peer}.get(scope, "the site")
        return _over_limit(why, f"{who} has {number} of {cap} associations")

    async def _decide_request(self, query: RequestQuery, gate: Gate) -> Refuse | Delay | None:
        key = f"{self._prefix}rr:{query.service}:{query.peer}"
        args = (query.per_minute, int(query.delay), MAX_DELAY_SECONDS)
        reply = await self._call(self._request, [key], args)
        if reply is None:
            self._count_fallback()
            answer = gate.decide_locally(query, time.monotonic())
            assert not isinstance(answer, Reject)
            return answer
        passed, wait = int(reply[0]), float(reply[1])
        if passed:
            return Delay(wait) if wait else None
        return Refuse(
            OUT_OF_RESOURCES.get(query.service, STATUS_RESOURCE_LIMITATION),
            "request_rate_exceeded",
            f"{query.service} is over {query.per_minute}/minute per peer",
        )

    def _fallback_association(self, query: AssociationQuery, gate: Gate) -> Reject | None:
        self._count_fallback()
        if self._settings.fail == "open":
            answer = gate.decide_locally(query, time.monotonic())
            assert answer is None or isinstance(answer, Reject)
            return answer
        return _over_limit("limit_store_unavailable", "the shared limit store does not answer")

    def _count_fallback(self) -> None:
        if self._watcher is not None:
            self._watcher.limit_store_fallback(self._settings.fail)

    async def _call(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int | float]
    ) -> list[bytes] | None:
        """Run one decision's script; None when the store is down or just went down."""
        if not self._up:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                reply: list[bytes] = await self._run(script, keys, args)
        except _FAILURES as error:
            self._went_down(error)
            return None
        return reply

    async def _run(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int | float]
    ) -> Any:
        """EVALSHA, loading the script when Redis does not have it (it restarted). Called
        directly rather than through ``AsyncScript``: a third less CPU per call."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        execute = self._redis.execute_command  # untyped in redis-py: the reply is the script's
        try:
            return await execute(*command)  # type: ignore[no-untyped-call]
        except NoScriptError:
            await self._redis.script_load(script.script)
            return await execute(*command)  # type: ignore[no-untyped-call]

    # ---- leases --------------------------------------------------------------------------------

    def _settle(self, gate: Gate, lease: _Lease | None, renew: bool, keep: bool) -> None:
        """The decision for ``lease`` is in: renew it from now on, keep it only to release it
        at the end, or forget it (Redis counted nothing)."""
        if lease is None:
            return
        lease.deciding, lease.renew = False, renew
        if lease.released:  # the connection ended meanwhile
            if keep:
                self._give_back(lease)
        elif not keep:
            del self._leases[gate]

    def release(self, gate: Gate) -> None:
        """The association of ``gate`` ended: its slots go back (``RELEASE_BATCH_SECONDS``)."""
        lease = self._leases.pop(gate, None)
        if lease is None:
            return
        if lease.deciding:
            lease.released = True  # ``_settle`` gives it back once Redis has answered
        else:
            self._give_back(lease)

    def _give_back(self, lease: _Lease) -> None:
        self._releasing.append(lease)
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(RELEASE_BATCH_SECONDS)
            while self._releasing:  # more may end while one flush waits for Redis
                await self._flush()
        finally:
            self._flushing = None

    async def _flush(self) -> None:
        async with self._slots:
            leases, self._releasing = self._releasing, []
            if not leases or not self._up:
                return  # while down: the slots expire by themselves
            keys = [key for lease in leases for key in lease.keys]
            members = [lease.member for lease in leases for _ in lease.keys]
            try:
                async with asyncio.timeout(self._timeout):
                    await self._run(self._release, keys, members)
            except _FAILURES as error:
                self._went_down(error)

    async def _renew_leases(self) -> bool:
        """Renew every live slot of this process; also the probe of a store that is down."""
        async with self._slots:
            live = [lease for lease in self._leases.values() if lease.renew]
            keys = [key for lease in live for key in lease.keys]
            args: list[str | int] = [self._lease_ms]
            args += [lease.member for lease in live for _ in lease.keys]
            try:
                async with asyncio.timeout(max(self._timeout, PROBE_SECONDS)):
                    await self._run(self._renew, keys, args)
            except _FAILURES as error:
                self._went_down(error)
                return False
        self._came_up()
        return True

    async def _keep(self) -> None:
        """Renew the leases every third of a lease; while down, probe every second."""
        loop = asyncio.get_running_loop()
        renew_every = self._settings.lease_seconds / 3
        while True:
            self._wake.clear()
            interval = renew_every if self._up else PROBE_SECONDS
            deadline = loop.time() + interval
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wake.wait()  # the store went down: probe from now on
                continue
            except TimeoutError:
                pass
            await self._renew_leases()

    # ---- state ---------------------------------------------------------------------------------

    def _went_down(self, error: BaseException) -> None:
        if not self._up:
            return
        self._up, self._down_since = False, time.monotonic()
        log_event(
            log,
            logging.WARNING,
            "limit_store_down",
            fail=self._settings.fail,
            error=_describe(error),
        )
        if self._watcher is not None:
            self._watcher.limit_store_state(False)
        self._wake.set()

    def _came_up(self) -> None:
        if self._up:
            return
        self._up = True
        down = time.monotonic() - self._down_since
        log_event(log, logging.INFO, "limit_store_up", down_seconds=f"{down:.1f}")
        if self._watcher is not None:
            self._watcher.limit_store_state(True)


async def share_limits(
    relay: Relay, config: Config, watcher: StoreWatcher | None
) -> RedisLimitStore | None:
    """Before ``relay`` starts: decide its limits in the store ``config`` names (None: the
    rules keep them local). The limits themselves are read from the relay's current rules at
    each decision, so a reload changes them as it does without a store."""
    if config.limits.store is None:
        return None
    store = RedisLimitStore(
        config.limits.store, config.instance, lambda: relay.runtime.config.limits.rates, watcher
    )
    relay.limiter = Limiter(shared=True)
    relay.limit_store = store
    await store.start()
    return store


def _client(settings: RedisStore, instance: str) -> Redis:
    """A client with its own connection pool, failing fast: one retry (a pooled connection
    Redis closed is noticed at once and replaced), then the store's timeout decides."""
    tls: dict[str, Any] = {}  # only for rediss://: a plain connection takes no ssl_* argument
    if settings.tls is not None:
        key_password = settings.tls.key_password_file
        tls = {
            "ssl_ca_certs": str(settings.tls.ca),
            "ssl_certfile": None if settings.tls.cert is None else str(settings.tls.cert),
            "ssl_keyfile": None if settings.tls.key is None else str(settings.tls.key),
            "ssl_password": None if key_password is None else _secret(key_password),
            "ssl_check_hostname": settings.tls.verify_hostname,
            "ssl_min_version": _TLS_VERSIONS[settings.tls.min_version],
        }
    password = None if settings.password_file is None else _secret(settings.password_file)
    timeout = max(settings.timeout_ms / 1000, PROBE_SECONDS)
    return Redis.from_url(
        settings.url,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        client_name=f"dicomfw:{instance}:{os.getpid()}",
        **tls,
    )


def _secret(path: os.PathLike[str]) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read().strip()


def _shown(url: str) -> str:
    """The URL without a password, for the log."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__
