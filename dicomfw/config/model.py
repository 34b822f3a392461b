"""The validated configuration: frozen dataclasses built by ``config.load`` from a rules file.

Network-facing settings (listeners, upstreams, TLS material, limits) live here; the rules that
decide what passes are the core's ``Policy``, which this model carries. Paths are absolute
(resolved against the rules file's directory) so a reload from another working directory reads
the same files.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from dicomfw.core.policy import IPNetwork, Policy
from dicomfw.core.ratelimit import LimitRules


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """TLS on a listener: always requires a client certificate that verifies against ``ca``."""

    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None
    min_version: str = "TLSv1.2"  # "TLSv1.2" or "TLSv1.3"
    key_password_file: Path | None = None


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """TLS toward an upstream: our client certificate plus verification of the server's."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # name to verify; defaults to the upstream host
    verify_hostname: bool = True
    min_version: str = "TLSv1.2"
    key_password_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Listener:
    """``proxy_protocol``: every connection starts with a PROXY v2 header naming the real client,
    accepted only from a balancer address in ``proxy_from``."""

    name: str
    host: str
    port: int
    tls: ServerTLS | None = None
    proxy_protocol: bool = False
    proxy_from: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    host: str
    port: int
    tls: ClientTLS | None = None


@dataclass(frozen=True, slots=True)
class RedisStore:
    """``limits: {store: redis, redis: {...}}``: the association limits and per-peer request
    rates of every instance and worker are kept in one Redis (``relay/redis_store.py``).

    ``fail``: what new associations get while Redis does not answer within ``timeout_ms``:
    ``open`` (this process's own limits, as without a store) or ``closed`` (the transient
    local-limit rejection). ``lease_seconds``: how long a concurrency slot outlives the last
    renewal of its holder, i.e. how soon the slots of a crashed instance are free again.
    """

    url: str  # redis://host:port/db, rediss://... (TLS) or unix:///path
    tls: ClientTLS | None = None
    password_file: Path | None = None
    timeout_ms: int = 100
    fail: str = "open"
    lease_seconds: int = 15
    key_prefix: str = "dicomfw:"


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource bounds. Times in seconds, sizes in bytes.

    ``rates`` are the association/request rates and concurrency caps, with the per-listener
    and per-peer overrides (``listeners[].limits``, ``peers[].limits``) folded in; all off unless
    configured. ``store``: where those limits are counted (None: in each process).
    ``drain_seconds``: on SIGTERM, how long open associations may finish;
    ``drain_notice_seconds``: before that, how long ``/ready`` says 503 while the listeners still
    accept, so a load balancer stops sending first. ``max_refusals_per_association``: refused
    requests after which the requester is cut off with A-ABORT (0: never).
    """

    max_pdu_bytes: int = 1_048_576
    artim_seconds: float = 30.0
    idle_seconds: float = 300.0
    connect_timeout_seconds: float = 10.0
    tls_handshake_seconds: float = 15.0
    drain_seconds: float = 30.0
    drain_notice_seconds: float = 0.0
    max_refusals_per_association: int = 100
    rates: LimitRules = field(default_factory=LimitRules)
    store: RedisStore | None = None


@dataclass(frozen=True, slots=True)
class MetricsEndpoint:
    """Where the Prometheus ``/metrics`` endpoint listens (``metrics: {bind: …}``)."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class AtnaCollector:
    """An IHE ATNA audit record repository: syslog over TLS (RFC 5425) or UDP (RFC 5426).

    Over TLS the collector's certificate is verified against ``ca`` and ``host``; ``cert`` and
    ``key`` are our client certificate for collectors that require one.
    """

    host: str
    port: int
    transport: str  # "tls" or "udp"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class Audit:
    """The audit trail: JSON lines to ``file`` (or stdout), and/or ATNA messages to a collector.

    Each sink has its own bounded queue of ``queue_size`` events: when a sink falls that far
    behind, events are dropped (and counted) rather than slowing down the relay.
    """

    file: Path | None = None
    stdout: bool = False  # "file: -"
    queue_size: int = 10_000
    atna: AtnaCollector | None = None


@dataclass(frozen=True, slots=True)
class TlsEndpoint:
    """The TLS files of one listener, upstream or ATNA collector, for what goes over all of them
    (``dicomfw certs check --config``, ``certs install --listener``, the certificate metrics).

    ``presents`` is what the endpoint's own certificate does in the handshake: a listener
    presents a server certificate, an upstream connection or the ATNA sink a client one.
    """

    kind: str  # "listener", "upstream" or "atna"
    name: str  # the listener's or upstream's name; "" for the ATNA collector
    presents: str  # "server" or "client"
    cert: Path | None
    key: Path | None
    ca: Path | None
    key_password_file: Path | None = None
    crl: Path | None = None

    @classmethod
    def of(cls, kind: str, name: str, tls: ServerTLS | ClientTLS) -> TlsEndpoint:
        crl = tls.crl if isinstance(tls, ServerTLS) else None
        presents = "server" if isinstance(tls, ServerTLS) else "client"
        return cls(kind, name, presents, tls.cert, tls.key, tls.ca, tls.key_password_file, crl)

    @property
    def setting(self) -> str:
        """Where its TLS settings are in the rules file, as errors name them."""
        if self.kind == "atna":
            return "audit.atna"
        return f"{self.kind}s.{self.name}.tls"

    @property
    def role(self) -> str:
        """Its metric label: ``listener:NAME``, ``upstream:NAME`` or ``atna``."""
        return f"{self.kind}:{self.name}" if self.name else self.kind


@dataclass(frozen=True, slots=True)
class Scanner:
    """A running ClamAV daemon that scans the data sets content validation hands it (the
    routes' ``scan``): ``address`` is ``unix:PATH`` or ``HOST:PORT``; ``max_bytes`` the most
    it is sent at once; ``fail`` what passes when it cannot answer in ``timeout_seconds``
    (open: everything, logged; closed: nothing it was to scan)."""

    address: str
    timeout_seconds: float = 10.0
    max_bytes: int = 64 * 1_048_576
    fail: str = "open"


@dataclass(frozen=True, slots=True)
class Config:
    source: Path  # the rules file this came from
    listeners: tuple[Listener, ...]
    upstreams: tuple[Upstream, ...]
    policy: Policy
    limits: Limits = Limits()
    metrics: MetricsEndpoint | None = None
    audit: Audit | None = None
    scanner: Scanner | None = None
    workers: int = 1  # processes sharing the listeners (``workers: auto`` = the CPU count)
    # Names this instance in logs, audit records and ``dicomfw_instance_info``; several
    # instances behind a balancer share one rules file, so the default is the host name.
    instance: str = field(default_factory=socket.gethostname)

    def tls_endpoints(self) -> tuple[TlsEndpoint, ...]:
        """Every endpoint with TLS files, in rules-file order: listeners, upstreams, ATNA."""
        endpoints = [
            TlsEndpoint.of("listener", listener.name, listener.tls)
            for listener in self.listeners
            if listener.tls is not None
        ]
        endpoints += [
            TlsEndpoint.of("upstream", upstream.name, upstream.tls)
            for upstream in self.upstreams
            if upstream.tls is not None
        ]
        atna = self.audit.atna if self.audit is not None else None
        if atna is not None and atna.transport == "tls":
            endpoints.append(TlsEndpoint("atna", "", "client", atna.cert, atna.key, atna.ca))
        return tuple(endpoints)

    def certificate_files(self) -> tuple[tuple[str, Path], ...]:
        """Every certificate file the daemon uses, as (role, path): for expiry checks/metrics.

        Roles read like ``listener:remote:cert`` or ``upstream:pacs:ca``, so an alert names
        which TLS endpoint is about to break.
        """
        return tuple(
            (f"{endpoint.role}:{what}", path)
            for endpoint in self.tls_endpoints()
            for what, path in (("cert", endpoint.cert), ("ca", endpoint.ca))
            if path is not None
        )

    def crl_files(self) -> tuple[tuple[str, Path], ...]:
        """Every CRL the listeners load, as (role, path), roles like ``listener:remote:crl``."""
        return tuple(
            (f"{endpoint.role}:crl", endpoint.crl)
            for endpoint in self.tls_endpoints()
            if endpoint.crl is not None
        )

    def upstream(self, name: str) -> Upstream:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)
