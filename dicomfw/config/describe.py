"""A plain-text summary of a loaded ``Config``, as ``dicomfw check`` prints it.

The reader is the network admin who wrote the rules file and wants to see what the firewall
understood: which ports are open and with what TLS, where each called AE title goes, who may
call it from where, and what they may do there. So UIDs are shown as PS3.6 keywords, every
"omitted means any" is spelled out, and the absolute paths of the TLS files are listed.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom import datadict

from dicomfw.config.model import ClientTLS, Config, Listener, RedisStore, ServerTLS, Upstream
from dicomfw.core import uids
from dicomfw.core.policy import AllowRule, CertificateIdentity, ContentPolicy, Peer, Route
from dicomfw.core.ratelimit import RateLimits

__all__ = ["describe"]

_INDENT = "  "
_DETAIL = "      "


def describe(config: Config) -> str:
    """Summarise the configuration in aligned plain text, one section per rules-file section."""
    sections = [
        [
            f"Rules file: {config.source}",
            f"Instance: {config.instance}",
            f"Worker processes: {config.workers}",
        ],
        _section("Listeners", _listeners(config.listeners)),
        _section("Upstreams", _upstreams(config.upstreams)),
        _section("Peers (who may connect)", _peers(config.policy.peers)),
        _section("Routes (what may pass; everything else is refused)", _routes(config)),
        _section("Limits", _limits(config)),
        _section("Metrics and audit", _observability(config)),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _section(title: str, lines: list[str]) -> list[str]:
    return [title, *(lines or [f"{_INDENT}(none)"])]


def _aligned(rows: Sequence[Sequence[str]], indent: str) -> list[str]:
    """Pad every column but the last to its widest cell, so the columns line up."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        indent
        + "".join(cell.ljust(w + 2) for cell, w in zip(row[:-1], widths, strict=True))
        + row[-1]
        for row in rows
    ]


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tls_version(version: str) -> str:
    return f"TLS {version.removeprefix('TLSv')} or later"


def _listeners(listeners: Sequence[Listener]) -> list[str]:
    rows = _aligned(
        [
            (lst.name, _endpoint(lst.host, lst.port), _server_tls_summary(lst.tls))
            for lst in listeners
        ],
        _INDENT,
    )
    lines: list[str] = []
    for listener, row in zip(listeners, rows, strict=True):
        lines.append(row)
        if listener.proxy_protocol:
            balancers = ", ".join(map(str, listener.proxy_from))
            lines.append(f"{_DETAIL}behind a load balancer: PROXY protocol v2 from {balancers}")
        if listener.tls is not None:
            lines += _files(listener.tls)
    return lines


def _server_tls_summary(tls: ServerTLS | None) -> str:
    if tls is None:
        return "plain DICOM (no TLS)"
    return f"mutual {_tls_version(tls.min_version)}, client certificate required"


def _upstreams(upstreams: Sequence[Upstream]) -> list[str]:
    rows = _aligned(
        [(up.name, _endpoint(up.host, up.port), _client_tls_summary(up)) for up in upstreams],
        _INDENT,
    )
    lines: list[str] = []
    for upstream, row in zip(upstreams, rows, strict=True):
        lines.append(row)
        if upstream.tls is not None:
            lines += _files(upstream.tls, _server_name(upstream, upstream.tls))
    return lines


def _client_tls_summary(upstream: Upstream) -> str:
    tls = upstream.tls
    if tls is None:
        return "plain DICOM (no TLS)"
    client = "with" if tls.cert is not None else "without"
    return f"{_tls_version(tls.min_version)}, {client} client certificate"


def _server_name(upstream: Upstream, tls: ClientTLS) -> str:
    if not tls.verify_hostname:
        return "NOT verified (verify_hostname: false)"
    return f"{tls.server_name or upstream.host} (verified)"


def _files(tls: ServerTLS | ClientTLS, server_name: str | None = None) -> list[str]:
    ca_label = "client CA" if isinstance(tls, ServerTLS) else "server CA"
    rows = [
        ("server name", server_name),
        ("certificate", tls.cert),
        ("key", tls.key),
        ("key password", tls.key_password_file),
        (ca_label, tls.ca),
        ("CRL", tls.crl if isinstance(tls, ServerTLS) else None),
    ]
    return _aligned([(label, str(value)) for label, value in rows if value is not None], _DETAIL)


def _peers(peers: Sequence[Peer]) -> list[str]:
    return _aligned(
        [
            (peer.ae_title, ", ".join(map(str, peer.networks)), _certificate(peer.certificate))
            for peer in peers
        ],
        _INDENT,
    )


def _certificate(identity: CertificateIdentity | None) -> str:
    if identity is None:
        return "no certificate binding"
    wanted = [
        ("subject CN", identity.subject_cn),
        ("SAN DNS", identity.san_dns),
        ("SAN URI", identity.san_uri),
        ("SHA-256", identity.fingerprint_sha256),
    ]
    return "certificate must have " + ", ".join(f"{k} {v}" for k, v in wanted if v is not None)


def _routes(config: Config) -> list[str]:
    lines: list[str] = []
    for route in config.policy.routes:
        upstream = config.upstream(route.upstream)
        lines.append(
            f"{_INDENT}{route.name}: listener {route.listener}, called AE {route.called_ae}"
            f" -> upstream {route.upstream} ({_endpoint(upstream.host, upstream.port)})"
        )
        lines += _aligned(_route_details(route), _DETAIL)
    return lines


def _route_details(route: Route) -> list[tuple[str, str]]:
    callers = "any peer" if route.calling_aes is None else ", ".join(sorted(route.calling_aes))
    rows = [("calling AEs", callers)]
    if route.upstream_called_ae or route.upstream_calling_ae:
        called = route.upstream_called_ae or "unchanged"
        calling = route.upstream_calling_ae or "unchanged"
        rows.append(("upstream sees", f"called AE {called}, calling AE {calling}"))
    if route.mode != "enforce":
        rows.append(("mode", f"{route.mode}: refuses nothing, reports what it would"))
    for number, rule in enumerate(route.allow, 1):
        rows += _allow_rows(f"allow {number}", rule)
    rows.append(("content", _content(route.content)))
    return rows


def _content(content: ContentPolicy | None) -> str:
    """What a route checks in the data sets, in the rules file's words."""
    if content is None:
        return "not validated (command sets only)"
    rules = content.rules
    parts = ["safety checks" + (" and conformance checks" if rules.conformance else "")]
    if content.monitor:
        parts.append(f"monitor only {', '.join(sorted(content.monitor))}")
    for label, tags in (("required", rules.required), ("refused", rules.refused)):
        if tags:
            parts.append(f"{label} {', '.join(_attribute_name(tag) for tag in sorted(tags))}")
    if rules.allowed_values:
        parts.append(
            "allowed values of "
            + ", ".join(_attribute_name(tag) for tag in sorted(rules.allowed_values))
        )
    if rules.universal_match_refused:
        parts.append("no universal match on " + ", ".join(sorted(rules.universal_match_refused)))
    if rules.max_instance_bytes is not None:
        parts.append(f"instances up to {rules.max_instance_bytes} bytes")
    if content.scan != "off":
        parts.append(f"scan {content.scan}")
    return "; ".join(parts)


def _attribute_name(tag: int) -> str:
    return datadict.keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _allow_rows(label: str, rule: AllowRule) -> list[tuple[str, str]]:
    services = ", ".join(sorted(rule.services))
    rows = [(label, f"{services} on {_uid_names(rule.sop_classes, 'any SOP class')}")]
    if rule.transfer_syntaxes is not None:
        rows.append(("", f"transfer syntaxes {_uid_names(rule.transfer_syntaxes, '')}"))
    if "C-MOVE" in rule.services:
        destinations = rule.move_destinations
        shown = "any" if destinations is None else ", ".join(sorted(destinations))
        rows.append(("", f"C-MOVE destinations {shown}"))
    return rows


def _uid_names(uid_set: frozenset[str] | None, if_any: str) -> str:
    if uid_set is None:
        return if_any
    return ", ".join(sorted(uids.name_of(uid) for uid in uid_set))


def _limits(config: Config) -> list[str]:
    limits = config.limits
    lines = _aligned(
        [
            ("max PDU size", f"{limits.max_pdu_bytes} bytes"),
            ("ARTIM timeout", f"{limits.artim_seconds:g} s"),
            ("idle timeout", f"{limits.idle_seconds:g} s"),
            ("upstream connect timeout", f"{limits.connect_timeout_seconds:g} s"),
            ("TLS handshake timeout", f"{limits.tls_handshake_seconds:g} s"),
            ("drain on SIGTERM", f"{limits.drain_seconds:g} s"),
            ("notice before the drain", f"{limits.drain_notice_seconds:g} s"),
            ("limits counted", _store(limits.store)),
            (
                "refusals before cut-off",
                str(limits.max_refusals_per_association or "no limit"),
            ),
            *(_rate_rows(limits.rates.default) or [("rates and caps", "none")]),
        ],
        _INDENT,
    )
    overrides = [("listener", limits.rates.listeners), ("peer", limits.rates.peers)]
    for scope, by_name in overrides:
        for name, override in by_name.items():
            lines += [f"{_INDENT}{scope} {name}:", *_aligned(_rate_rows(override), _DETAIL)]
    return lines


def _store(store: RedisStore | None) -> str:
    if store is None:
        return "in each process"
    return (
        f"for all instances in Redis at {store.url} (fail {store.fail}, "
        f"timeout {store.timeout_ms} ms, leases {store.lease_seconds} s)"
    )


def _rate_rows(limits: RateLimits) -> list[tuple[str, str]]:
    """The rates and caps that are set, in the rules file's words."""
    counts = [
        ("associations/min per IP", limits.associations_per_minute_per_ip),
        ("associations/min per peer", limits.associations_per_minute_per_peer),
        ("max concurrent per IP", limits.max_concurrent_per_ip),
        ("max concurrent per peer", limits.max_concurrent_per_peer),
        ("max concurrent in total", limits.max_concurrent_total),
        ("max pending per IP", limits.max_pending_per_ip),
    ]
    rows = [(label, str(value)) for label, value in counts if value is not None]
    for label, rates in (
        ("requests per association", limits.requests_per_minute_per_association),
        ("requests per peer", limits.requests_per_minute_per_peer),
    ):
        if rates:
            rows.append((label, ", ".join(f"{name} {n}/min" for name, n in rates.items())))
    if limits.request_limit_action is not None:
        rows.append(("over a request rate", limits.request_limit_action))
    return rows


def _observability(config: Config) -> list[str]:
    rows: list[tuple[str, str]] = []
    if config.metrics is not None:
        host = f"[{config.metrics.host}]" if ":" in config.metrics.host else config.metrics.host
        rows.append(("Prometheus metrics", f"http://{host}:{config.metrics.port}/metrics"))
    audit = config.audit
    if audit is not None:
        if audit.file is not None or audit.stdout:
            where = "stdout" if audit.stdout else str(audit.file)
            rows.append(("audit trail (JSON lines)", where))
        if audit.atna is not None:
            atna = audit.atna
            transport = "TLS, RFC 5425" if atna.transport == "tls" else "UDP, RFC 5426"
            rows.append(("IHE ATNA audit messages", f"{atna.host}:{atna.port} ({transport})"))
        rows.append(("audit queue per sink", f"{audit.queue_size} events, then dropped"))
    return _aligned(rows, _INDENT)
