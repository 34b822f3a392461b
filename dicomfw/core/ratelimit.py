"""Rate limits and resource caps, sans-IO: token buckets and counters; the caller passes ``now``.

A firewall in front of a PACS must shed abusive load with answers a DICOM peer understands, and
must decide without waiting: a refusal that sleeps first is a resource an attacker holds. So
every decision here is immediate and takes the time as an argument (the relay passes its event
loop's monotonic clock), which keeps the rules testable with made-up times:

* a new association over a rate or a concurrency cap gets A-ASSOCIATE-RJ *rejected-transient*,
  source *service-provider (presentation)*, reason *local-limit-exceeded* (PS3.8 §9.3.4,
  Table 9-21): the requester may retry later, as it would after congestion;
* a connection beyond the per-address cap of not-yet-associated connections is refused
  before a byte is read (``Limiter.connect`` returns ``None``);
* a DIMSE request over its service's rate is either refused with that service's *out of
  resources* status (PS3.4 B.2.3, C.4.1.1.4, C.4.2.1.5, C.4.3.1.4; the general 0x0213 *resource
  limitation*, PS3.7 §C.5, for the others), or delayed: the answer is then how long to wait, and
  the relay holds only that association's request stream for that long.

Rates are token buckets holding a minute's worth of tokens: "C-FIND: 60" lets a workstation
send a burst of up to 60 queries and then one per second, so normal use is never slowed and a
scraper is held to the rate. Counters are per process (see the README on several workers), keyed
by source address (an IPv6 source by its /64, which one host usually owns whole), by peer AE
title, and in total. A lease (``Gate``) remembers what it counted, so releasing it is exact even
if a reload changed the limits meanwhile.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Final, Generic, Literal, TypeVar

from dicomfw.core.policy import (
    RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED,
    RJ_SOURCE_PRESENTATION,
    RJ_TRANSIENT,
    IPAddress,
    Refuse,
    Reject,
)

#: Failure statuses for a request refused by a rate limit: each service's *Refused: Out of
#: Resources* (PS3.4 B.2.3 C-STORE, C.4.1.1.4 C-FIND, C.4.2.1.5 C-MOVE, C.4.3.1.4 C-GET).
OUT_OF_RESOURCES: Final[Mapping[str, int]] = MappingProxyType(
    {"C-STORE": 0xA700, "C-FIND": 0xA700, "C-MOVE": 0xA701, "C-GET": 0xA701}
)
#: PS3.7 §C.5: the general *Resource limitation* failure, for C-ECHO and the N-services.
STATUS_RESOURCE_LIMITATION: Final = 0x0213
#: The longest a request is ever delayed; beyond it the request is refused instead, so a
#: waiting association never outlives the ARTIM/idle timers on either side.
MAX_DELAY_SECONDS: Final = 60.0
#: Buckets kept before the first sweep of idle ones (a full bucket is the same as none).
_SWEEP_FLOOR: Final = 1024

Action = Literal["delay", "refuse"]


def _rates(items: Mapping[str, int] | None = None) -> Mapping[str, int]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, slots=True)
class RateLimits:
    """One set of limits as the rules file gives it; ``None`` (or an empty mapping) is "not set".

    The same shape serves the global ``limits:`` section and the per-listener and per-peer
    overrides; ``over`` layers a more specific set on top of a general one, key by key.
    """

    associations_per_minute_per_ip: int | None = None
    associations_per_minute_per_peer: int | None = None
    max_concurrent_per_ip: int | None = None
    max_concurrent_per_peer: int | None = None
    max_concurrent_total: int | None = None
    max_pending_per_ip: int | None = None
    requests_per_minute_per_association: Mapping[str, int] = field(default_factory=_rates)
    requests_per_minute_per_peer: Mapping[str, int] = field(default_factory=_rates)
    request_limit_action: Action | None = None

    def over(self, general: RateLimits) -> RateLimits:
        """These limits where set, ``general`` elsewhere; request rates merge per service."""
        values: dict[str, object] = {}
        for item in fields(RateLimits):
            mine, theirs = getattr(self, item.name), getattr(general, item.name)
            if isinstance(mine, Mapping):
                values[item.name] = _rates({**theirs, **mine})
            else:
                values[item.name] = theirs if mine is None else mine
        return RateLimits(**values)  # type: ignore[arg-type]

    @property
    def action(self) -> Action:
        """Delay is the default: shaping slows a scraper without failing anybody's query."""
        return self.request_limit_action or "delay"


@dataclass(frozen=True)
class LimitRules:
    """The global limits and the per-listener and per-peer overrides (peer wins, then listener)."""

    default: RateLimits = RateLimits()
    listeners: Mapping[str, RateLimits] = field(default_factory=lambda: MappingProxyType({}))
    peers: Mapping[str, RateLimits] = field(default_factory=lambda: MappingProxyType({}))
    _merged: dict[tuple[str, str | None], RateLimits] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def effective(self, listener: str, peer: str | None = None) -> RateLimits:
        """The limits for an association on ``listener`` from ``peer`` (None: not yet known)."""
        key = (listener, peer)
        merged = self._merged.get(key)
        if merged is None:
            merged = self.listeners.get(listener, RateLimits()).over(self.default)
            if peer is not None:
                merged = self.peers.get(peer, RateLimits()).over(merged)
            self._merged[key] = merged  # the rules are immutable: a cache, not state
        return merged


@dataclass(frozen=True, slots=True)
class Delay:
    """Hold the request (and what follows it on this association) this many seconds."""

    seconds: float


class TokenBucket:
    """A bucket of up to ``per_minute`` tokens, refilled continuously at ``per_minute`` a minute.

    The rate is passed with every call so a reload that changes it applies to existing buckets.
    ``reserve`` may take the bucket below zero: a delayed request owns its token already, and
    the debt makes the next one wait longer, so waiting requests keep to the rate in order.
    """

    __slots__ = ("_per_minute", "_stamp", "_tokens")

    def __init__(self, per_minute: int, now: float) -> None:
        self._per_minute = per_minute
        self._tokens = float(per_minute)
        self._stamp = now

    def _refill(self, per_minute: int, now: float) -> None:
        self._per_minute = per_minute
        if now > self._stamp:
            self._tokens = min(
                float(per_minute), self._tokens + (now - self._stamp) * per_minute / 60.0
            )
            self._stamp = now
        elif self._tokens > per_minute:  # the rate was lowered by a reload
            self._tokens = float(per_minute)

    def wait(self, per_minute: int, now: float) -> float:
        """Seconds until a token is available (0.0: one is available now)."""
        self._refill(per_minute, now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) * 60.0 / per_minute

    def take(self, per_minute: int, now: float) -> bool:
        """Take a token if one is available now; never waits."""
        if self.wait(per_minute, now):
            return False
        self._tokens -= 1.0
        return True

    def reserve(self, per_minute: int, now: float) -> float:
        """Take a token, available now or later; return how long to wait for it."""
        wait = self.wait(per_minute, now)
        self._tokens -= 1.0
        return wait

    def full(self, now: float) -> bool:
        """Refilled to capacity: indistinguishable from a new bucket, so it can be dropped."""
        self._refill(self._per_minute, now)
        return self._tokens >= self._per_minute


K = TypeVar("K", bound=Hashable)


class _Buckets(Generic[K]):
    """Buckets by key, bounded: full buckets are swept once the table has doubled."""

    __slots__ = ("_items", "_sweep_at")

    def __init__(self) -> None:
        self._items: dict[K, TokenBucket] = {}
        self._sweep_at = _SWEEP_FLOOR

    def get(self, key: K, per_minute: int, now: float) -> TokenBucket:
        bucket = self._items.get(key)
        if bucket is None:
            if len(self._items) >= self._sweep_at:
                self._items = {k: b for k, b in self._items.items() if not b.full(now)}
                self._sweep_at = max(_SWEEP_FLOOR, 2 * len(self._items))
            bucket = self._items[key] = TokenBucket(per_minute, now)
        return bucket

    def __len__(self) -> int:
        return len(self._items)


class _Counts(Generic[K]):
    """Counters by key that vanish at zero, so a long-running process keeps no dead keys."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[K, int] = {}

    def get(self, key: K) -> int:
        return self._items.get(key, 0)

    def add(self, key: K) -> None:
        self._items[key] = self._items.get(key, 0) + 1

    def remove(self, key: K) -> None:
        left = self._items[key] - 1
        if left:
            self._items[key] = left
        else:
            del self._items[key]

    def total(self) -> int:
        return sum(self._items.values())

    def most(self) -> int:
        """The highest count of any key (0 when none is counted)."""
        return max(self._items.values(), default=0)

    def snapshot(self) -> Mapping[K, int]:
        return MappingProxyType(dict(self._items))

    def __len__(self) -> int:
        return len(self._items)


SourceKey = ipaddress.IPv4Address | ipaddress.IPv6Network


def source_key(address: IPAddress) -> SourceKey:
    """Count an IPv4 host by its address and an IPv6 host by its /64 (one host gets a whole
    /64 and can pick any address in it); an IPv4-mapped IPv6 address counts as the IPv4 one."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return ipaddress.IPv6Network((address, 64), strict=False)


@dataclass(frozen=True, slots=True)
class Usage:
    """What the limiter holds now: for status lines, and for tests that prove nothing leaks."""

    pending: int
    active: int
    keys: int  # counter entries and rate buckets in memory


@dataclass(frozen=True, slots=True)
class Peaks:
    """What each concurrency cap is compared with now, at its fullest: the associations open
    (``max_concurrent_total``), the most one address holds open (``max_concurrent_per_ip``) or
    has not yet associated (``max_pending_per_ip``), and each peer's open associations
    (``max_concurrent_per_peer``). For the metrics' share of each cap in use."""

    total: int
    per_ip: int
    pending_per_ip: int
    per_peer: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class AssociationQuery:
    """For a shared limit store (``Limiter(shared=True)``): may an association start? The
    address's association rate, and when the policy accepted ``peer`` the peer's rate and the
    concurrency caps, in one atomic decision. ``peer`` None: the policy rejected it, only the
    address's rate counts (it slows down AE title guessing). Not ``enforce`` (monitor mode):
    count the association even over a cap, and say which."""

    listener: str
    source: SourceKey
    peer: str | None
    enforce: bool


@dataclass(frozen=True, slots=True)
class RequestQuery:
    """For a shared limit store: may ``peer`` send a request of ``service`` now (its rate per
    peer, over every instance)? ``per_minute`` and ``delay`` are the rate and action the
    association was admitted with: a reload since then does not change them, as without a
    store."""

    listener: str
    peer: str
    service: str
    enforce: bool
    per_minute: int
    delay: bool


LimitQuery = AssociationQuery | RequestQuery


class Limiter:
    """The counters and buckets of one process, shared by all its listeners and associations.

    ``shared``: the association limits and the per-peer request rates are decided by a store
    all instances share (the relay asks it, see ``AssociationQuery``); this process still
    counts what it admitted, so its own limits can stand in when the store cannot answer.
    """

    def __init__(self, shared: bool = False) -> None:
        self.shared = shared
        self._pending: _Counts[SourceKey] = _Counts()
        self._by_source: _Counts[SourceKey] = _Counts()
        self._by_peer: _Counts[str] = _Counts()
        self._total = 0
        self._source_rates: _Buckets[SourceKey] = _Buckets()
        self._peer_rates: _Buckets[str] = _Buckets()
        self._peer_requests: _Buckets[tuple[str, str]] = _Buckets()

    def connect(self, rules: LimitRules, listener: str, address: IPAddress) -> Gate | None:
        """A TCP connection was accepted: count it as pending, or ``None`` if the address
        already has ``max_pending_per_ip`` connections that have not associated yet (the
        caller closes it unread: a client that opens connections and sends nothing must not
        be able to exhaust the process)."""
        limits = rules.effective(listener)
        key = source_key(address)
        cap = limits.max_pending_per_ip
        if cap is not None and self._pending.get(key) >= cap:
            return None
        self._pending.add(key)
        return Gate(self, rules, listener, key)

    def peaks(self) -> Peaks:
        """The counts the caps are compared with (``Peaks``). Goes over every address and peer
        counted: for a once-a-second sample, not for each association."""
        return Peaks(
            self._total, self._by_source.most(), self._pending.most(), self._by_peer.snapshot()
        )

    def usage(self) -> Usage:
        keys = (
            len(self._pending)
            + len(self._by_source)
            + len(self._by_peer)
            + len(self._source_rates)
            + len(self._peer_rates)
            + len(self._peer_requests)
        )
        return Usage(self._pending.total(), self._total, keys)


def _over(
    limiter: Limiter, limits: RateLimits, source: SourceKey, peer: str, now: float
) -> Reject | None:
    """The first association limit one more association of ``peer`` from ``source`` breaks:
    the peer's association rate (a token is taken when there is one), then the caps."""
    rate = limits.associations_per_minute_per_peer
    if rate is not None and not limiter._peer_rates.get(peer, rate, now).take(rate, now):
        return _over_limit(
            "peer_association_rate_exceeded", f"{peer} is over {rate} associations/minute"
        )
    caps = (
        (limits.max_concurrent_per_ip, limiter._by_source.get(source), "ip", source),
        (limits.max_concurrent_per_peer, limiter._by_peer.get(peer), "peer", peer),
        (limits.max_concurrent_total, limiter._total, "total", "the firewall"),
    )
    for cap, count, scope, who in caps:
        if cap is not None and count >= cap:
            return _over_limit(
                f"{scope}_concurrency_exceeded", f"{who} has {count} of {cap} associations"
            )
    return None


def _over_rate(service: str, rate: int, scope: str) -> Refuse:
    """A request over its rate: its service's out-of-resources status (``OUT_OF_RESOURCES``)."""
    return Refuse(
        OUT_OF_RESOURCES.get(service, STATUS_RESOURCE_LIMITATION),
        "request_rate_exceeded",
        f"{service} is over {rate}/minute per {scope}",
    )


def _over_limit(why: str, detail: str) -> Reject:
    """PS3.8 Table 9-21: rejected-transient, service-provider (presentation), local limit."""
    return Reject(
        RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED, why, detail
    )


class Gate:
    """One connection's lease on the limiter: pending until admitted, then active until
    ``release``. Made by ``Limiter.connect``; the association's session asks it at each step."""

    __slots__ = (
        "_active",
        "_limiter",
        "_limits",
        "_listener",
        "_peer",
        "_requests",
        "_rules",
        "_source",
    )

    def __init__(self, limiter: Limiter, rules: LimitRules, listener: str, source: SourceKey):
        self._limiter = limiter
        self._rules = rules
        self._listener = listener
        self._source: SourceKey | None = source  # set while counted as pending
        self._peer: str | None = None
        self._active = False
        self._limits: RateLimits | None = None  # once admitted
        self._requests: _Buckets[str] = _Buckets()

    @property
    def shared(self) -> bool:
        """The association limits and per-peer request rates are a shared store's to decide."""
        return self._limiter.shared

    @property
    def source_key(self) -> SourceKey | None:
        return self._source

    @property
    def listener(self) -> str:
        return self._listener

    @property
    def peer(self) -> str | None:
        """The peer it was admitted for (None before)."""
        return self._peer

    def shared_request(self, service: str, enforce: bool) -> RequestQuery | None:
        """The shared store's question when a request of ``service`` needs its answer (the
        store is shared and this association has a per-peer rate for the service)."""
        limits = self._limits
        if not self._limiter.shared or limits is None:
            return None
        rate = limits.requests_per_minute_per_peer.get(service)
        if rate is None:
            return None
        delay = limits.action == "delay"
        return RequestQuery(self._listener, self._peer or "", service, enforce, rate, delay)

    def source(self, now: float) -> Reject | None:
        """Before the policy looks at an A-ASSOCIATE-RQ: the per-address association rate,
        which also slows down anyone guessing AE titles."""
        rate = self._rules.effective(self._listener).associations_per_minute_per_ip
        if rate is None or self._source is None:
            return None
        if self._limiter._source_rates.get(self._source, rate, now).take(rate, now):
            return None
        return _over_limit(
            "ip_association_rate_exceeded", f"{self._source} is over {rate} associations/minute"
        )

    def admit(self, peer: str, now: float, enforce: bool = True) -> Reject | None:
        """The policy accepted ``peer``: check its association rate and the concurrency caps,
        and count the association as active instead of pending. Over a limit, enforce mode
        counts nothing and returns the rejection; monitor mode (``enforce`` False) returns it
        too but counts the association, which goes on, so the counts stay true."""
        source = self._source
        if source is None or self._active:
            return None
        limiter = self._limiter
        limits = self._rules.effective(self._listener, peer)
        over = _over(limiter, limits, source, peer, now)
        if over is not None and enforce:
            return over
        limiter._pending.remove(source)
        limiter._by_source.add(source)
        limiter._by_peer.add(peer)
        limiter._total += 1
        self._peer, self._active, self._limits = peer, True, limits
        return over

    def request(self, service: str, now: float) -> Delay | Refuse | None:
        """May a DIMSE request of ``service`` pass now? ``None``: yes; ``Delay``: after a wait
        (``request_limit_action: delay``); ``Refuse``: answer it with out-of-resources."""
        limits = self._limits
        if limits is None:
            return None
        own = limits.requests_per_minute_per_association.get(service)
        # per peer: this process's own buckets, unless a shared store decides that rate
        shared = None if self._limiter.shared else limits.requests_per_minute_per_peer.get(service)
        if own is None and shared is None:
            return None
        assert self._peer is not None
        metered: list[tuple[TokenBucket, int, str]] = []
        if own is not None:
            metered.append((self._requests.get(service, own, now), own, "association"))
        if shared is not None:
            bucket = self._limiter._peer_requests.get((self._peer, service), shared, now)
            metered.append((bucket, shared, "peer"))
        waits = [(bucket.wait(rate, now), rate, scope) for bucket, rate, scope in metered]
        wait, rate, scope = max(waits)
        if wait == 0.0 or (limits.action == "delay" and wait <= MAX_DELAY_SECONDS):
            for bucket, rate_, _ in metered:
                bucket.reserve(rate_, now)
            return Delay(wait) if wait else None
        return _over_rate(service, rate, scope)

    def decide_locally(self, query: LimitQuery, now: float) -> Reject | Delay | Refuse | None:
        """What this process alone answers to ``query``: the fallback when the shared store
        cannot (``fail: open``), from the same counters a store-less process uses."""
        if isinstance(query, AssociationQuery):
            over = self.source(now)
            if query.peer is None or (over is not None and query.enforce):
                return over
            return self.admit(query.peer, now, query.enforce) or over
        limits = self._limits
        rate = None if limits is None else limits.requests_per_minute_per_peer.get(query.service)
        if rate is None or self._peer is None:
            return None
        bucket = self._limiter._peer_requests.get((self._peer, query.service), rate, now)
        wait = bucket.wait(rate, now)
        if wait == 0.0 or (
            limits is not None and limits.action == "delay" and wait <= MAX_DELAY_SECONDS
        ):
            bucket.reserve(rate, now)
            return Delay(wait) if wait else None
        return _over_rate(query.service, rate, "peer")

    def release(self) -> None:
        """The connection is gone: give back what it counted (idempotent)."""
        limiter = self._limiter
        if self._source is not None:
            if self._active:
                limiter._by_source.remove(self._source)
                assert self._peer is not None
                limiter._by_peer.remove(self._peer)
                limiter._total -= 1
            else:
                limiter._pending.remove(self._source)
        self._source, self._active = None, False
