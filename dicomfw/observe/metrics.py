"""Prometheus metrics, fed by the same relay events as the log and the audit trail.

Names follow the Prometheus conventions: ``dicomfw_`` prefix, base units (``_seconds``,
``_bytes``), ``_total`` on counters. Every label value comes from the rules file (listener,
route, upstream and peer names, the SOP classes the rules list) or from a fixed set in the code
(outcomes, status classes, the stable ``why`` strings of the core and relay): an AE title or
address sent by a stranger never becomes a series, so a scan cannot blow up the TSDB.

The observer never blocks and is never called per PDU or per request: bytes are counted once
per association at its end, and requests (counts by status class, round trips timed by the
session) arrive in a ``RequestTally`` about once a second per association.

Several worker processes (``dicomfw.service.supervisor`` does all of this): start every process with
``PROMETHEUS_MULTIPROC_DIR`` set to the same empty directory (prometheus-client then keeps each
value in a per-process mmap file), let one process serve ``/metrics`` (``MetricsServer`` then
aggregates all files with ``MultiProcessCollector``), and call
``prometheus_client.multiprocess.mark_process_dead(pid)`` when a worker exits. Each gauge below
declares how its per-process values combine.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar, cast
from wsgiref.simple_server import WSGIServer

from cryptography import x509
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from dicomfw.config.model import Config, MetricsEndpoint
from dicomfw.core.content import CHECKS
from dicomfw.core.policy import (
    ASSOCIATION_RULE_REASONS,
    CONTEXT_RULE_REASONS,
    MONITOR,
    REQUEST_RULE_REASONS,
    VERIFICATION_SOP_CLASS,
    Route,
)
from dicomfw.core.ratelimit import Peaks
from dicomfw.core.session import (
    ANSWER_CLASSES,
    AssociationAccepted,
    AssociationEnded,
    AssociationRejected,
    ContentRefused,
    Event,
    RequestRefused,
    RequestTally,
    Scanned,
    WouldRefuse,
)
from dicomfw.core.uids import name_of
from dicomfw.logsetup import log_event
from dicomfw.observe.health import Health, with_health
from dicomfw.relay.server import AssociationInfo, Refused
from dicomfw.relay.tlsfiles import TlsFileError, next_update, read_crls

log = logging.getLogger("dicomfw.metrics")

#: Ends of an association the firewall imposed because a peer broke the protocol or went
#: quiet: counted as refusals next to the policy's own.
PROTOCOL_REFUSALS: Final = frozenset(
    {
        "requester_protocol_error",
        "upstream_protocol_error",
        "artim_timeout",
        "idle_timeout",
        "too_many_refusals",
    }
)
#: Rejections because the upstream connection failed (``Session.upstream_failed``).
UPSTREAM_FAILURES: Final = frozenset(
    {"upstream_unreachable", "upstream_certificate_invalid", "upstream_tls_failed"}
)
#: The reasons each stage of ``dicomfw_refusals_total`` counts (the core's and the relay's
#: fixed ``why`` strings; content: the check names), and the fixed values of the other
#: labels. Every series they make with the rules' names exists from the start at 0 (see
#: ``Metrics._known_series``): a panel shows 0, not "No data", and the first refusal of a
#: kind counts in ``increase()`` instead of being the series' first sample.
CONNECTION_REASONS: Final = ("source_address_denied", "pending_limit_exceeded")
TLS_REASONS: Final = ("tls_handshake_failed",)
PROXY_REASONS: Final = ("proxy_source_denied", "proxy_header_invalid")
LIMIT_ASSOCIATION_REASONS: Final = (
    "ip_association_rate_exceeded",
    "peer_association_rate_exceeded",
    "ip_concurrency_exceeded",
    "peer_concurrency_exceeded",
    "total_concurrency_exceeded",
)
ASSOCIATION_REASONS: Final = (
    *ASSOCIATION_RULE_REASONS,
    *LIMIT_ASSOCIATION_REASONS,
    "upstream_unreachable",
    "upstream_certificate_invalid",
    "upstream_tls_failed",
    "upstream_rejected",
)
REQUEST_REASONS: Final = (*REQUEST_RULE_REASONS, "unrecognized_operation", "request_rate_exceeded")
CONTENT_CHECKS: Final = (*CHECKS, "malware", "scan_unavailable")
#: ``dicomfw_tls_handshake_failures_total``'s causes (``relay/server.py:handshake_cause``).
HANDSHAKE_CAUSES: Final = (
    "no_certificate",
    "unknown_ca",
    "certificate_expired",
    "certificate_revoked",
    "certificate_invalid",
    "crl_expired",
    "crl_invalid",
    "protocol_version",
    "no_shared_cipher",
    "not_tls",
    "peer_alert",
    "timeout",
    "connection_lost",
    "other",
)
#: ``dicomfw_upstream_connect_failures_total``'s causes (``relay/server.py:upstream_cause``);
#: the TLS ones only for an upstream with TLS.
UPSTREAM_CAUSES: Final = ("refused", "timeout", "unreachable", "connection_lost", "other")
UPSTREAM_TLS_CAUSES: Final = ("certificate_invalid", "tls_handshake_failed")
#: How a connection that reached DICOM can end, with a route and without one.
ROUTED_OUTCOMES: Final = ("released", "aborted", "closed", "rejected")
UNROUTED_OUTCOMES: Final = ("rejected", "aborted", "closed", "refused", "probe")
SCAN_RESULTS: Final = ("clean", "found", "error", "skipped")
CONTENT_SIDES: Final = ("requester", "upstream")
CONTENT_ACTIONS: Final = ("refused", "replaced", "aborted")
DIRECTIONS: Final = ("from_requester", "from_upstream")

#: The keys of ``limits:`` that ``dicomfw_limit`` exports (by their rules-file names), the
#: caps among them (those with a usage), and the request rates of ``dicomfw_request_limit``.
LIMIT_KINDS: Final = (
    "max_concurrent_total",
    "max_concurrent_per_ip",
    "max_concurrent_per_peer",
    "max_pending_per_ip",
    "associations_per_minute_per_ip",
    "associations_per_minute_per_peer",
)
CAP_KINDS: Final = frozenset(LIMIT_KINDS[:4])
REQUEST_LIMIT_KINDS: Final = (
    "requests_per_minute_per_association",
    "requests_per_minute_per_peer",
)

NONE: Final = "none"  # label value: no route (yet)
UNKNOWN: Final = "unknown"  # label value: an AE title that is no configured peer
OTHER: Final = "other"  # label value: a SOP class the rules do not name

_DURATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
#: Event-loop lag: a healthy loop stays in the first buckets; 10 ms is the soak's p99 bound.
_LAG_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_ROUND_TRIP_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


_M = TypeVar("_M", Counter, Gauge, Histogram)


class Metrics:
    """The metrics of one daemon process, in their own registry (several firewalls in one test
    process keep separate counts). Call ``configure`` with the rules in force, then use the
    instance as a relay observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            "dicomfw_associations_total",
            "Connections by how they ended: released, aborted, closed (during set-up), "
            "rejected (A-ASSOCIATE-RJ) or refused (before any DICOM: address, TLS).",
            ["listener", "route", "peer", "outcome"],
            registry=r,
        )
        self.active = Gauge(
            "dicomfw_active_associations",
            "Associations the upstream accepted that have not ended yet.",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.refusals = Counter(
            "dicomfw_refusals_total",
            "What the firewall refused, by stage (connection, association, context, request, "
            "protocol) and stable reason.",
            ["listener", "stage", "reason"],
            registry=r,
        )
        self.content = Counter(
            "dicomfw_content_refusals_total",
            "Data sets content validation refused, by whose message it was (side), check and "
            "what the firewall did (refused: answered; replaced: a response replaced by a "
            "failure; aborted: found after forwarding began).",
            ["listener", "side", "check", "action"],
            registry=r,
        )
        self.scans = Counter(
            "dicomfw_scans_total",
            "Data sets handed to the external scanner, by result: clean, found, error (it "
            "could not answer; the route's fail decided), skipped (larger than it takes).",
            ["listener", "result"],
            registry=r,
        )
        self.would_refuse = Counter(
            "dicomfw_would_refuse_total",
            "What a listener or route in monitor mode let pass that enforce mode would have "
            "refused, by stage (connection, association, context, request, limit) and reason.",
            ["listener", "stage", "reason"],
            registry=r,
        )
        self.tls_failures = Counter(
            "dicomfw_tls_handshake_failures_total",
            "Failed TLS handshakes on listeners, by cause.",
            ["listener", "cause"],
            registry=r,
        )
        self.requests = Counter(
            "dicomfw_dimse_requests_total",
            "DIMSE requests by service, SOP class (as the rules name it, else 'other') and the "
            "class of their final status; requests the firewall refused count as failure.",
            ["route", "service", "sop_class", "status"],
            registry=r,
        )
        self.bytes = Counter(
            "dicomfw_bytes_total",
            "Bytes received from each side, counted when the association ends.",
            ["listener", "route", "direction"],
            registry=r,
        )
        self.duration = Histogram(
            "dicomfw_association_duration_seconds",
            "From TCP accept to the end of the association.",
            ["listener", "route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.round_trip = Histogram(
            "dicomfw_dimse_round_trip_seconds",
            "From the firewall passing a request (its command) to relaying its final response; "
            "includes any delay a request rate limit imposed.",
            ["route", "service"],
            buckets=_ROUND_TRIP_BUCKETS,
            registry=r,
        )
        self.upstream_failures = Counter(
            "dicomfw_upstream_connect_failures_total",
            "Upstream connections that failed, by cause: refused, timeout, unreachable, "
            "connection_lost, certificate_invalid (its certificate did not verify), "
            "tls_handshake_failed (e.g. it refused ours), other.",
            ["upstream", "cause"],
            registry=r,
        )
        self.reloads = Counter(
            "dicomfw_rule_reloads_total",
            "Reloads of rules and certificates, by result (success or failure).",
            ["result"],
            registry=r,
        )
        self.reload_ok = Gauge(
            "dicomfw_rules_last_reload_successful",
            "1 if the last reload succeeded (or none was tried), 0 if the old rules are in force.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.rules_info = Gauge(
            "dicomfw_rules_info",
            "The rules file in force: value 1 on the series whose sha256 label is its hash.",
            ["sha256"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.not_after = Gauge(
            "dicomfw_certificate_not_after_timestamp_seconds",
            "Expiry (notAfter, Unix time) of the earliest-expiring certificate in each file.",
            ["file", "role"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.crl_next_update = Gauge(
            "dicomfw_crl_next_update_timestamp_seconds",
            "nextUpdate (Unix time) of the soonest CRL in each CRL file a listener loads: past "
            "it, the listener refuses every client certificate.",
            ["file", "role"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.audit_lost = Counter(
            "dicomfw_audit_events_lost_total",
            "Audit records a sink (file, atna) did not deliver, by cause: queue_full (dropped: "
            "the sink was queue_size records behind), write_error (the write failed: disk "
            "full, file gone, connection broken), collector_unreachable (ATNA: no connection).",
            ["sink", "cause"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "dicomfw_event_loop_lag_seconds",
            "How late the event loop ran a timer due every quarter second: the delay every "
            "association on that loop suffers at that moment (one process's loop, or each "
            "worker's, summed).",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.worker_restarts = Counter(
            "dicomfw_worker_restarts_total",
            "Worker processes the supervisor started again after one died unexpectedly.",
            registry=r,
        )
        self.instance_info = Gauge(
            "dicomfw_instance_info",
            "This instance: value 1 on the series whose name label is its instance name, as its "
            "log lines and audit records give it (Prometheus' own instance label is the target).",
            ["name"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.limit_store_up = Gauge(
            "dicomfw_limit_store_up",
            "1 while the shared limit store answers, 0 while its fallback (fail: open or closed) "
            "decides; with workers, 0 if any worker cannot reach it.",
            ["store"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.limit_store_fallbacks = Counter(
            "dicomfw_limit_store_fallbacks_total",
            "Limit decisions made without the shared store, by its fail setting: open (this "
            "process's own limits) or closed (new associations rejected).",
            ["store", "fail"],
            registry=r,
        )
        self.limits = Gauge(
            "dicomfw_limit",
            "The limits the rules file sets, by key (kind) and where it is set (scope: global "
            "for limits:, listener:NAME, peer:AE): the concurrency caps max_concurrent_total, "
            "max_concurrent_per_ip, max_concurrent_per_peer (open associations) and "
            "max_pending_per_ip (connections not associated yet), and the association rates "
            "associations_per_minute_per_ip, associations_per_minute_per_peer.",
            ["kind", "scope"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.request_limits = Gauge(
            "dicomfw_request_limit",
            "The request rates the rules file sets, per minute, by key (kind: "
            "requests_per_minute_per_association, requests_per_minute_per_peer), scope and "
            "service.",
            ["kind", "scope", "service"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.limit_usage = Gauge(
            "dicomfw_limit_usage",
            "What each concurrency cap of dicomfw_limit (same kind and scope) is compared with "
            "now: max_concurrent_total, the associations open; max_concurrent_per_ip and "
            "max_pending_per_ip, the most one address holds; max_concurrent_per_peer, the most "
            "one peer holds (scope peer:AE: that peer). This process's counts (with workers, "
            "the busiest worker's), sampled every second.",
            ["kind", "scope"],
            registry=r,
            multiprocess_mode="livemax",
        )
        for result in ("success", "failure"):  # exported from the start, so increase() works
            self.reloads.labels(result)
        self.reload_ok.set(1)
        self._open: dict[int, str] = {}  # id(AssociationInfo) -> route, until the end event
        self._peers: frozenset[str] = frozenset()
        self._sop_labels: dict[str, str] = {}
        self._upstream_of_route: dict[str, str] = {}
        self._rules_hash = ""
        self._file_series: dict[Gauge, set[tuple[str, str]]] = {}  # see ``_set_moments``
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}  # see ``_child``
        self._instance = ""
        self._caps: set[tuple[str, str]] = set()  # (kind, scope) of the caps in force
        self._request_caps: set[tuple[str, str, str]] = set()

    # ---- configuration ------------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Take label sets, rules version and certificate expiry from the rules now in force.

        Called at start and after each successful reload (it reads the certificate files, like
        the reload itself, never per association)."""
        if not self._instance:  # a start-only setting: a reload does not rename the instance
            self._instance = config.instance
            self.instance_info.labels(config.instance).set(1)
        policy = config.policy
        self._peers = frozenset(peer.ae_title for peer in policy.peers)
        uids = {VERIFICATION_SOP_CLASS}
        for route in policy.routes:
            for rule in route.allow:
                uids |= rule.sop_classes or set()
        self._sop_labels = {uid: name_of(uid) for uid in uids}
        self._upstream_of_route = {route.name: route.upstream for route in policy.routes}
        for metric, *values in self._known_series(config):
            self._child(metric, *values)
        try:
            digest = hashlib.sha256(config.source.read_bytes()).hexdigest()
        except OSError:
            digest = UNKNOWN
        if digest != self._rules_hash:
            if self._rules_hash:
                self.rules_info.labels(self._rules_hash).set(0)  # what stays in multiprocess mode
                self.rules_info.remove(self._rules_hash)
            self.rules_info.labels(digest).set(1)
            self._rules_hash = digest
        self._set_certificates(config)
        self._set_limits(config)

    def _set_limits(self, config: Config) -> None:
        """One ``dicomfw_limit`` (or ``dicomfw_request_limit``) series per limit the rules set,
        and a ``dicomfw_limit_usage`` series per cap; those of limits a reload removed go.
        (In multiprocess mode a removed series keeps the value last written: +Inf, "no
        limit", rather than the old figure.)"""
        rules = config.limits.rates
        scopes = [
            ("global", rules.default),
            *((f"listener:{name}", limits) for name, limits in rules.listeners.items()),
            *((f"peer:{ae}", limits) for ae, limits in rules.peers.items()),
        ]
        caps: dict[tuple[str, str], int] = {}
        request_caps: dict[tuple[str, str, str], int] = {}
        for scope, limits in scopes:
            for kind in LIMIT_KINDS:
                value = getattr(limits, kind)
                if value is not None:
                    caps[(kind, scope)] = value
            for kind in REQUEST_LIMIT_KINDS:
                for service, rate in getattr(limits, kind).items():
                    request_caps[(kind, scope, service)] = rate
        for key, value in caps.items():
            self.limits.labels(*key).set(value)
            if key[0] in CAP_KINDS and key not in self._caps:
                self.limit_usage.labels(*key).set(0)
        for key in self._caps - caps.keys():
            self.limits.labels(*key).set(math.inf)
            self.limits.remove(*key)
            if key[0] in CAP_KINDS:
                self.limit_usage.labels(*key).set(0)
                self.limit_usage.remove(*key)
                self._children.pop((self.limit_usage, key), None)
        for request_key, rate in request_caps.items():
            self.request_limits.labels(*request_key).set(rate)
        for request_key in self._request_caps - request_caps.keys():
            self.request_limits.labels(*request_key).set(math.inf)
            self.request_limits.remove(*request_key)
        self._caps, self._request_caps = set(caps), set(request_caps)

    def sample_limits(self, peaks: Peaks) -> None:
        """(Every second, from ``Sampler``) Each cap's count now, from the relay's limiter."""
        for kind, scope in self._caps:
            if kind == "max_concurrent_total":
                used = peaks.total
            elif kind == "max_concurrent_per_ip":
                used = peaks.per_ip
            elif kind == "max_pending_per_ip":
                used = peaks.pending_per_ip
            elif kind == "max_concurrent_per_peer" and scope.startswith("peer:"):
                used = peaks.per_peer.get(scope.removeprefix("peer:"), 0)
            elif kind == "max_concurrent_per_peer":
                used = max(peaks.per_peer.values(), default=0)
            else:
                continue  # a rate: nothing is held open
            self._child(self.limit_usage, kind, scope).set(used)

    def _known_series(self, config: Config) -> Iterator[tuple[Any, ...]]:
        """(metric, *label values) of every series the rules make known: their listeners,
        routes, peers, upstreams and SOP classes with the fixed reasons, causes and outcomes
        that can happen there. Created at 0 at start and after each reload (new names; the
        series of names a reload removed stay, with what they counted).

        Not here: requests of a service or SOP class no allow rule of the route lists (a
        refused request's own series starts with it; its refusal is counted in
        ``dicomfw_refusals_total``, which is), and certificate and CRL expiry (set at once)."""
        policy = config.policy
        peers = [peer.ae_title for peer in policy.peers]
        tls_upstreams = {u.name for u in config.upstreams if u.tls is not None}
        for upstream in config.upstreams:
            causes = UPSTREAM_CAUSES + (
                UPSTREAM_TLS_CAUSES if upstream.name in tls_upstreams else ()
            )
            for cause in causes:
                yield self.upstream_failures, upstream.name, cause
        for listener in config.listeners:
            name = listener.name
            routes = [route for route in policy.routes if route.listener == name]
            monitored = policy.listener_mode(name) == MONITOR or any(
                route.mode == MONITOR for route in routes
            )
            validated = [route for route in routes if route.content is not None]
            yield self.active, name
            for outcome in UNROUTED_OUTCOMES:
                yield self.associations, name, NONE, UNKNOWN, outcome
            for peer in peers:
                yield self.associations, name, NONE, peer, "rejected"
            for route_name in (NONE, *(route.name for route in routes)):
                yield self.duration, name, route_name
                for direction in DIRECTIONS:
                    yield self.bytes, name, route_name, direction
            for route in routes:
                admitted = peers if route.calling_aes is None else sorted(route.calling_aes)
                if route.mode == MONITOR:
                    admitted = [*admitted, UNKNOWN]
                for peer in admitted:
                    for outcome in ROUTED_OUTCOMES:
                        yield self.associations, name, route.name, peer, outcome
                yield from self._request_series(route)
            connection = CONNECTION_REASONS + (TLS_REASONS if listener.tls is not None else ())
            connection += PROXY_REASONS if listener.proxy_protocol else ()
            stages = {
                "connection": connection,
                "association": ASSOCIATION_REASONS,
                "context": CONTEXT_RULE_REASONS,
                "request": REQUEST_REASONS,
                "protocol": tuple(sorted(PROTOCOL_REFUSALS)),
                "content": CONTENT_CHECKS if validated else (),
            }
            for stage, reasons in stages.items():
                for reason in reasons:
                    yield self.refusals, name, stage, reason
            if listener.tls is not None:
                for cause in HANDSHAKE_CAUSES:
                    yield self.tls_failures, name, cause
            if validated:
                for side in CONTENT_SIDES:
                    for check in CONTENT_CHECKS:
                        for action in CONTENT_ACTIONS:
                            yield self.content, name, side, check, action
            if any(route.content.scan != "off" for route in validated if route.content):
                for result in SCAN_RESULTS:
                    yield self.scans, name, result
            would: dict[str, tuple[str, ...]] = {}
            if monitored:
                would = {
                    "connection": ("source_address_denied",)
                    if policy.listener_mode(name) == MONITOR
                    else (),
                    "association": ASSOCIATION_RULE_REASONS,
                    "context": CONTEXT_RULE_REASONS,
                    "request": (*REQUEST_RULE_REASONS, "unrecognized_operation"),
                    "limit": (*LIMIT_ASSOCIATION_REASONS, "request_rate_exceeded"),
                }
            if (monitored and validated) or any(
                route.content.monitor for route in validated if route.content
            ):
                would["content"] = CONTENT_CHECKS
            for stage, reasons in would.items():
                for reason in reasons:
                    yield self.would_refuse, name, stage, reason
        store = config.limits.store
        if store is not None:
            yield self.limit_store_fallbacks, "redis", store.fail

    def _request_series(self, route: Route) -> Iterator[tuple[Any, ...]]:
        """A route's requests: each service its allow rules list with each SOP class they list
        (Verification for C-ECHO; ``other`` where a rule lists none), by status class; and
        the round trips of each of those services."""
        pairs: set[tuple[str, str]] = set()
        for rule in route.allow:
            for service in rule.services:
                if service == "C-ECHO":
                    pairs.add((service, name_of(VERIFICATION_SOP_CLASS)))
                elif rule.sop_classes is None:
                    pairs.add((service, OTHER))
                else:
                    pairs |= {(service, self._sop_labels[uid]) for uid in rule.sop_classes}
        for service, sop_class in sorted(pairs):
            for answer in ANSWER_CLASSES:
                yield self.requests, route.name, service, sop_class, answer
        for service in sorted({service for service, _ in pairs}):
            yield self.round_trip, route.name, service

    def _set_certificates(self, config: Config) -> None:
        self._set_moments(self.not_after, config.certificate_files(), _earliest_not_after)
        self._set_moments(self.crl_next_update, config.crl_files(), _earliest_next_update)

    def _set_moments(
        self,
        gauge: Gauge,
        files: Iterable[tuple[str, Path]],
        read: Callable[[Path], float | None],
    ) -> None:
        """One series per (file, role) with the moment ``read`` finds in it; the series of
        files the rules no longer name go."""
        current: set[tuple[str, str]] = set()
        for role, path in files:
            moment = read(path)
            if moment is None:
                continue
            key = (str(path), role)
            gauge.labels(*key).set(moment)
            current.add(key)
        for key in self._file_series.get(gauge, set()) - current:
            gauge.remove(*key)
        self._file_series[gauge] = current

    def reload_succeeded(self, config: Config) -> None:
        self.reloads.labels("success").inc()
        self.reload_ok.set(1)
        self.configure(config)

    def reload_failed(self) -> None:
        self.reloads.labels("failure").inc()
        self.reload_ok.set(0)

    def worker_exited(self, pid: int) -> None:
        """(Supervisor, multiprocess mode) A worker process is gone: its live gauges (open
        associations, rules in force, ...) leave the sums; its counters stay, they count what
        happened."""
        mark_process_dead(pid)  # type: ignore[no-untyped-call]

    def limit_store_state(self, up: bool) -> None:
        """(``relay/redis_store.py:StoreWatcher``) The shared store answers again, or not."""
        self.limit_store_up.labels("redis").set(int(up))

    def limit_store_fallback(self, fail: str) -> None:
        self._child(self.limit_store_fallbacks, "redis", fail).inc()

    def audit_losses(self, sink: str, causes: Iterable[str]) -> Callable[[str, int], None]:
        """What counts the records the audit sink called ``sink`` loses, by cause (called on
        the sink's thread, or the relay's for a full queue); its series exist from now, at 0."""
        children = {cause: self.audit_lost.labels(sink, cause) for cause in causes}

        def lost(cause: str, count: int) -> None:
            children[cause].inc(count)

        return lost

    # ---- the observer -------------------------------------------------------------------------

    def __call__(self, info: AssociationInfo, event: Event | Refused) -> None:
        kind = type(event)
        if kind is RequestTally:
            assert isinstance(event, RequestTally)
            self._tallied(info, event)
        elif kind is RequestRefused:
            assert isinstance(event, RequestRefused)
            route = info.route or NONE
            sop_class = self._sop_labels.get(event.sop_class, OTHER)
            self._child(self.requests, route, event.service, sop_class, "failure").inc(event.count)
            self._child(self.refusals, info.listener, "request", event.why).inc(event.count)
        elif kind is ContentRefused:
            assert isinstance(event, ContentRefused)
            if event.side == "requester" and event.action == "refused":
                route = info.route or NONE
                sop_class = self._sop_labels.get(event.sop_class, OTHER)
                self._child(self.requests, route, event.service, sop_class, "failure").inc(
                    event.count
                )
            self._child(self.refusals, info.listener, "content", event.check).inc(event.count)
            self._child(self.content, info.listener, event.side, event.check, event.action).inc(
                event.count
            )
        elif kind is Scanned:
            assert isinstance(event, Scanned)
            self._child(self.scans, info.listener, event.result).inc()
        elif kind is WouldRefuse:
            assert isinstance(event, WouldRefuse)
            self._child(self.would_refuse, info.listener, event.stage, event.why).inc(event.count)
        elif kind is AssociationAccepted:
            assert isinstance(event, AssociationAccepted)
            self._open[id(info)] = event.route
            self._child(self.active, info.listener).inc()
            for _, _, why in event.refused_contexts:
                self._child(self.refusals, info.listener, "context", why).inc()
        elif kind is AssociationRejected:
            assert isinstance(event, AssociationRejected)
            self._child(self.refusals, info.listener, "association", event.why).inc()
            if event.why in UPSTREAM_FAILURES:
                upstream = self._upstream_of_route.get(info.route or "", UNKNOWN)
                cause = info.upstream_failure or OTHER
                self._child(self.upstream_failures, upstream, cause).inc()
            self._ended(info, "rejected")
        elif kind is AssociationEnded:
            assert isinstance(event, AssociationEnded)
            if event.why in PROTOCOL_REFUSALS:
                self._child(self.refusals, info.listener, "protocol", event.why).inc()
            self._ended(info, event.how)
        elif kind is Refused:
            assert isinstance(event, Refused)
            self._child(self.refusals, info.listener, "connection", event.why).inc()
            if event.cause:
                self._child(self.tls_failures, info.listener, event.cause).inc()
            self._child(self.associations, info.listener, NONE, UNKNOWN, "refused").inc()

    def _tallied(self, info: AssociationInfo, tally: RequestTally) -> None:
        route = self._open.get(id(info)) or info.route or NONE
        for (service, uid), counts in tally.counts.items():
            sop_class = self._sop_labels.get(uid, OTHER)
            for answer in ANSWER_CLASSES:
                count = getattr(counts, answer)
                if count:
                    self._child(self.requests, route, service, sop_class, answer).inc(count)
        for service, seconds in tally.round_trips:
            self._child(self.round_trip, route, service).observe(seconds)

    def _ended(self, info: AssociationInfo, outcome: str) -> None:
        """The last event of a connection that reached DICOM: count it, forget its state."""
        if self._open.pop(id(info), None) is not None:
            self._child(self.active, info.listener).dec()
        route = info.route or NONE
        peer = info.calling_ae if info.calling_ae in self._peers else UNKNOWN
        self._child(self.associations, info.listener, route, peer, outcome).inc()
        listener = info.listener
        self._child(self.bytes, listener, route, "from_requester").inc(info.bytes_from_requester)
        self._child(self.bytes, listener, route, "from_upstream").inc(info.bytes_from_upstream)
        self._child(self.duration, listener, route).observe(time.monotonic() - info.started)

    def _child(self, metric: _M, *values: str) -> _M:
        """``metric.labels(*values)``, cached: ``labels()`` costs several times the increment,
        and the observer runs on the event loop. Label values come from the rules file or fixed
        sets, so the cache is as bounded as the series."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return cast(_M, child)


class Sampler:
    """Calls ``sample`` every ``interval`` seconds on the event loop: for gauges of state no
    event reports (the limiter's counts), at a cost that does not grow with the traffic."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sample: Callable[[], None], interval: float = 1.0
    ) -> None:
        self._loop = loop
        self._sample = sample
        self._interval = interval
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._fire()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        try:
            self._sample()
        except Exception:  # a gauge must never stop the loop's other work
            log.exception("event=sample_failed")
        self._handle = self._loop.call_later(self._interval, self._fire)


class LoopLagProbe(Sampler):
    """Measures the event loop's lag: a timer due every ``interval`` seconds reports how late
    it ran (``time.monotonic``, finer than uvloop's millisecond timer clock), so that a slow
    callback, a blocking call or CPU starvation shows as lag before it shows as timeouts.
    Four callbacks a second: no cost worth measuring."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        observe: Callable[[float], None],
        interval: float = 0.25,
    ) -> None:
        super().__init__(loop, self._measure, interval)
        self._observe = observe
        self._due: float | None = None  # when the next sample is due; none before the first

    def _measure(self) -> None:
        now = time.monotonic()
        if self._due is not None:
            self._observe(max(0.0, now - self._due))
        self._due = now + self._interval


def _earliest_not_after(path: Path) -> float | None:
    """The soonest notAfter among the PEM certificates in ``path`` (a chain or CA bundle)."""
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as error:
        log_event(log, logging.WARNING, "certificate_unreadable", file=str(path), error=error)
        return None
    return min(c.not_valid_after_utc.timestamp() for c in certificates)


def _earliest_next_update(path: Path) -> float | None:
    """The soonest nextUpdate among the CRLs in ``path``."""
    try:
        moment = next_update(read_crls(path))
    except TlsFileError as error:
        log_event(log, logging.WARNING, "crl_unreadable", file=str(path), error=error.message)
        return None
    return moment.timestamp() if moment is not None else None


class MetricsServer:
    """``/metrics`` over HTTP on its own thread, so a scrape never waits for the event loop,
    and beside it ``/ready`` and ``/live`` from ``health`` (``observe/health.py``).

    With ``PROMETHEUS_MULTIPROC_DIR`` set it serves the sum over every process writing to that
    directory instead of this process's registry.
    """

    def __init__(self, endpoint: MetricsEndpoint, registry: CollectorRegistry) -> None:
        exposed = registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            exposed = CollectorRegistry()
            MultiProcessCollector(exposed)  # type: ignore[no-untyped-call]
        disable_created_metrics()  # type: ignore[no-untyped-call]  # half the series
        self._server: WSGIServer
        self._server, self._thread = start_http_server(endpoint.port, endpoint.host, exposed)
        self.health = Health()
        self._server.set_app(with_health(make_wsgi_app(exposed), self.health))

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def close_after_fork(self) -> None:
        """In a process forked from the one serving: close this process's copy of the listening
        socket (the serving thread exists only in the parent, so ``close`` would wait forever)."""
        self._server.server_close()
