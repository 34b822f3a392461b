"""``dicomfw learn``: the least-privilege rules that would have allowed what the audit trail saw.

Switching a deny-by-default firewall on in front of a working PACS starts from what the network
really does: a period in monitor mode lets everything through and audits each association, and
this module turns those ``association`` records into a rules file:

* a peer per calling AE title, from the source addresses it came from (each address alone, or
  widened to ``--widen-ipv4`` / ``--widen-ipv6`` bits, /64 by default for IPv6), bound to its
  certificate when every association of it presented one with the same identity;
* a route per listener, called AE and calling AEs that did the same things: peers with equal
  needs share one route (``calling_ae: [CT01, CT02]``), a peer that needs more gets its own, so
  nobody is allowed what only another one did;
* in each route, one allow rule per (services, transfer syntaxes) a set of SOP classes was used
  with: the services that were requested, the SOP classes they were requested on, the transfer
  syntaxes the upstream accepted for them (only where the audit recorded them), and the C-MOVE
  destinations seen. C-ECHO gets its own rule on Verification; the storage SOP classes a C-GET
  association negotiated go with the C-GET rule (its C-STORE sub-operations run on them);
* listeners, upstreams, limits, metrics, audit and workers copied from ``--base`` as written
  there (comments included); of each route, what the base route the associations took says
  besides whom it admits and what it allows (upstream, AE title rewriting, any key added later).

Every peer, route and SOP class carries a comment with its counts and first and last seen. What
cannot be learned (an association to a called AE no route knows, one without a request) is
reported, not guessed. ``--diff CURRENT`` compares the period with a rules file instead: what it
allows that nobody used, and what was used that it refuses.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import yaml
from yaml.nodes import MappingNode

from dicomfw.admin.changes import ANY, grants
from dicomfw.admin.explain import explain
from dicomfw.admin.locate import Locator
from dicomfw.admin.records import BadRecord, attempt_of, moment, read_audit
from dicomfw.config.model import Config
from dicomfw.core import uids
from dicomfw.core.policy import (
    VERIFICATION_SOP_CLASS,
    CertificateIdentity,
    IPAddress,
    IPNetwork,
    PresentedIdentity,
)

__all__ = ["Learned", "Options", "cautions", "compare", "learn", "report", "rules_file"]

_PLAIN: Final = re.compile(r"[A-Za-z0-9_./+-]+")
_NOT_A_NAME: Final = re.compile(r"[^A-Za-z0-9_.-]")
#: Route keys ``learn`` writes itself; a learned route keeps the rest of its base route's.
_LEARNED_ROUTE_KEYS: Final = frozenset(
    {"name", "listener", "called_ae", "upstream", "calling_ae", "allow", "mode"}
)


@dataclass
class Seen:
    """How often something was seen, and when first and last (audit timestamps, UTC)."""

    count: int = 0
    first: str = ""
    last: str = ""

    def add(self, first: str, last: str, count: int = 1) -> None:
        self.count += count
        self.first = min(self.first or first, first)
        self.last = max(self.last, last)

    def merge(self, other: Seen) -> None:
        self.add(other.first, other.last, other.count)

    def span(self) -> str:
        return f"{_short(self.first)} .. {_short(self.last)}"


def _count(number: int, what: str = "association") -> str:
    return f"{number} {what}" + ("" if number == 1 else "s")


def _short(timestamp: str) -> str:
    """2026-11-25T14:58:18.063Z -> 2026-11-25T14:58:18Z."""
    return re.sub(r"\.\d+Z$", "Z", timestamp)


@dataclass
class Caller:
    """What one calling AE did on one listener and called AE."""

    route: str = ""  # the base route its latest association took
    latest: str = ""
    seen: Seen = field(default_factory=Seen)
    requests: dict[tuple[str, str], Seen] = field(default_factory=dict)  # (service, SOP class)
    syntaxes: dict[str, dict[str, Seen]] = field(default_factory=dict)  # SOP class -> TS -> seen
    destinations: dict[str, Seen] = field(default_factory=dict)

    def needs(self) -> dict[str, frozenset[str]]:
        """SOP class -> the services it needs on it."""
        services: dict[str, set[str]] = {}
        for service, sop_class in self.requests:
            services.setdefault(sop_class, set()).add(service)
        return {sop_class: frozenset(names) for sop_class, names in services.items()}


@dataclass
class PeerSeen:
    seen: Seen = field(default_factory=Seen)
    addresses: Counter[IPAddress] = field(default_factory=Counter)
    identities: set[PresentedIdentity | None] = field(default_factory=set)


@dataclass
class Learned:
    """What the audit trail showed, before it is written as rules."""

    peers: dict[str, PeerSeen] = field(default_factory=dict)
    callers: dict[tuple[str, str, str], Caller] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)  # the associations learned from
    #: what was not learned, and how often: (why, what) -> count
    skipped: Counter[tuple[str, str]] = field(default_factory=Counter)


def learn(paths: Sequence[Path], since: datetime | None = None) -> Learned:
    """Read the audit files; ``since``: only records from then on."""
    learned = Learned()
    for path in paths:
        for number, record in read_audit(path):
            if isinstance(record, BadRecord):
                learned.skipped[("unreadable line", f"{path}:{number}: {record}")] += 1
            elif since is None or ("time" in record and moment(record["time"]) >= since):
                _take(learned, record)
    return learned


def _take(learned: Learned, record: dict[str, Any]) -> None:
    event = record.get("event")
    if event == "association_rejected" and record.get("reason") == "called_ae_unknown":
        what = (
            f"{record.get('calling_ae')} -> {record.get('called_ae')} on {record.get('listener')}"
        )
        learned.skipped[("a called AE no route knows (nothing to send it to)", what)] += 1
    if event != "association" or not record.get("route") or not record.get("calling_ae"):
        return
    used = [op for op in record["operations"] if op["requests"] > op["refused"]]
    attempt = attempt_of(record)
    calling, called = record["calling_ae"], record["called_ae"]
    if not used:
        what = f"{calling} -> {called} on {record['listener']}"
        learned.skipped[("an association without a request that passed", what)] += 1
        return
    learned.records.append(record)
    start, end = record["start"], record["end"]
    peer = learned.peers.setdefault(calling, PeerSeen())
    peer.seen.add(start, end)
    peer.addresses[_unmapped(attempt.address)] += 1
    peer.identities.add(attempt.identity)
    caller = learned.callers.setdefault((record["listener"], called, calling), Caller())
    caller.seen.add(start, end)
    if end >= caller.latest:
        caller.route, caller.latest = record["route"], end
    for op in used:
        key = (op["service"], op["sop_class_uid"])
        caller.requests.setdefault(key, Seen()).add(start, end, op["requests"] - op["refused"])
    gets = any(op["service"] == "C-GET" for op in used)
    requested = {op["sop_class_uid"] for op in used}
    for context in record["contexts"]:
        sop_class = context["sop_class_uid"]
        if gets and sop_class not in requested:  # what the C-GET's sub-operations store
            caller.requests.setdefault(("C-GET", sop_class), Seen()).add(start, end, 0)
        syntaxes = caller.syntaxes.setdefault(sop_class, {})
        syntaxes.setdefault(context["transfer_syntax"], Seen()).add(start, end)
    for destination in record["move_destinations"]:
        caller.destinations.setdefault(destination, Seen()).add(start, end)


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4 client of a dual-stack listener is its IPv4 address."""
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


# -- the rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """``widen_ipv4`` / ``widen_ipv6``: prefix length learned addresses are widened to."""

    widen_ipv4: int = 32
    widen_ipv6: int = 64
    mode: str = "enforce"


@dataclass(frozen=True)
class _Rule:
    services: tuple[str, ...]
    sop_classes: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...] | None
    destinations: tuple[str, ...] | None


def _rules(caller: Caller) -> tuple[_Rule, ...]:
    """The allow rules one caller needs: SOP classes grouped by the services used on them and
    the transfer syntaxes seen for them."""
    groups: dict[tuple[tuple[str, ...], tuple[str, ...] | None], list[str]] = {}
    for sop_class, services in sorted(caller.needs().items()):
        seen = caller.syntaxes.get(sop_class)
        syntaxes = tuple(sorted(seen)) if seen else None
        groups.setdefault((tuple(sorted(services)), syntaxes), []).append(sop_class)
    destinations = tuple(sorted(caller.destinations)) or None
    rules = [
        _Rule(
            services, tuple(sop_classes), syntaxes, destinations if "C-MOVE" in services else None
        )
        for (services, syntaxes), sop_classes in groups.items()
    ]
    # C-ECHO on Verification first, as people write it; then by services.
    return tuple(
        sorted(rules, key=lambda r: (r.sop_classes != (VERIFICATION_SOP_CLASS,), r.services))
    )


@dataclass
class _Route:
    base: str
    listener: str
    called_ae: str
    rules: tuple[_Rule, ...]
    callers: dict[str, Caller] = field(default_factory=dict)
    name: str = ""


def _routes(learned: Learned, base: Config) -> list[_Route]:
    """Callers with the same needs on one listener, called AE and base route share a route."""
    known = {route.name for route in base.policy.routes}
    grouped: dict[tuple[str, str, str, tuple[_Rule, ...]], _Route] = {}
    for (listener, called_ae, calling_ae), caller in sorted(learned.callers.items()):
        if caller.route not in known:
            continue  # said by ``cautions``
        rules = _rules(caller)
        key = (caller.route, listener, called_ae, rules)
        grouped.setdefault(key, _Route(caller.route, listener, called_ae, rules))
        grouped[key].callers[calling_ae] = caller
    routes = list(grouped.values())
    names: set[str] = set()
    for route in routes:
        base_name = _NOT_A_NAME.sub("-", route.base)
        alone = sum(r.base == route.base for r in routes) == 1
        name = base_name if alone else f"{base_name}-{_NOT_A_NAME.sub('-', min(route.callers))}"
        while name in names:
            name += "-2"
        names.add(name)
        route.name = name
    return routes


def rules_file(learned: Learned, base_path: Path, base: Config, options: Options) -> str:
    """The learned rules, in the base file's section order, its other sections as written."""
    text = base_path.read_text(encoding="utf-8")
    routes = _routes(learned, base)
    reached = {ae for route in routes for ae in route.callers}
    learned_parts = {
        "mode": [f"mode: {options.mode}\n", "\n"],
        "peers": [*_peers_yaml(learned, base, reached, options), "\n"],
        "routes": [*_routes_yaml(routes, base, yaml.safe_load(text)["routes"]), "\n"],
    }
    header = [
        "# Learned by `dicomfw learn` from the audit trail: exactly what was seen, nothing more.\n",
        f"# Listeners, upstreams and the other sections come from {base_path}.\n",
        "# Review it, then: dicomfw check --config THIS; dicomfw check --diff BASE THIS\n",
        "\n",
    ]
    sections = _sections(text)
    if "mode" not in sections:
        sections = {"mode": "", **sections}
    body = [
        "".join(learned_parts[key]) if key in learned_parts else text
        for key, text in sections.items()
    ]
    return "".join(header) + "".join(body).rstrip("\n") + "\n"


def _sections(text: str) -> dict[str, str]:
    """The base file's top-level sections as written: each from the comment paragraph right
    above its key to where the next one's begins."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, MappingNode) or root.flow_style:
        raise ValueError("the base rules file must be a block mapping of sections")
    lines = text.splitlines(keepends=True)
    starts = []
    for key, _ in root.value:
        start = key.start_mark.line
        while start > 0 and lines[start - 1].lstrip().startswith("#"):
            start -= 1
        starts.append(start)
    ends = [*starts[1:], len(lines)]
    return {
        key.value: "".join(lines[start:end])
        for (key, _), start, end in zip(root.value, starts, ends, strict=True)
    }


def _scalar(text: str) -> str:
    """A string as YAML reads it back: plain when it can be, else double-quoted."""
    if _PLAIN.fullmatch(text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text)


def _flow(items: Iterable[str]) -> str:
    return "[" + ", ".join(_scalar(item) for item in items) + "]"


def _peers_yaml(learned: Learned, base: Config, reached: set[str], options: Options) -> list[str]:
    base_peers = {peer.ae_title: peer for peer in base.policy.peers}
    out = ["peers:\n"]
    for ae_title in sorted(reached):
        seen = learned.peers[ae_title]
        addresses = ", ".join(
            f"{address} ({count})" for address, count in sorted(seen.addresses.items(), key=str)
        )
        out.append(f"  # {_count(seen.seen.count)} from {addresses}; {seen.seen.span()}\n")
        out.append(f"  - ae_title: {_scalar(ae_title)}\n")
        out.append(f"    networks: {_flow(map(str, _networks(seen.addresses, options)))}\n")
        base_peer = base_peers.get(ae_title)
        binding = _binding(
            seen.identities, base_peer.certificate if base_peer is not None else None
        )
        if binding is not None:
            fields = [
                f"{key}: {_scalar(value)}"
                for key, value in asdict(binding).items()
                if value is not None
            ]
            out.append(f"    certificate: {{{', '.join(fields)}}}\n")
    return out


def _networks(addresses: Iterable[IPAddress], options: Options) -> list[IPNetwork]:
    widened: list[IPNetwork] = [
        ipaddress.ip_network(
            f"{address}/{options.widen_ipv4 if address.version == 4 else options.widen_ipv6}",
            strict=False,
        )
        for address in addresses
    ]
    v4 = [n for n in widened if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in widened if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def _binding(
    identities: set[PresentedIdentity | None], base: CertificateIdentity | None
) -> CertificateIdentity | None:
    """The base rules' binding if every association met it; else what every association's
    certificate had in common (a SAN URI, else the subject CN); else none."""
    if None in identities:
        return None  # some came without a certificate: a binding would refuse them
    presented = [identity for identity in identities if identity is not None]
    if base is not None and all(base.matches(identity) for identity in presented):
        return base
    uris = set.intersection(*(set(identity.san_uri) for identity in presented))
    if len(uris) == 1:
        return CertificateIdentity(san_uri=uris.pop())
    names = {identity.subject_cn for identity in presented}
    if len(names) == 1 and None not in names:
        return CertificateIdentity(subject_cn=names.pop())
    return None


def _routes_yaml(
    routes: list[_Route], base: Config, written_routes: list[dict[str, Any]]
) -> list[str]:
    """The learned routes; each keeps what its base route says besides whom it admits and what
    it allows (``written_routes``: the base file's routes as YAML reads them)."""
    base_routes = {route.name: route for route in base.policy.routes}
    out = ["routes:\n"]
    for route in routes:
        source = base_routes[route.base]
        seen = Seen()
        for caller in route.callers.values():
            seen.merge(caller.seen)
        out.append(
            f"  # {_count(seen.count)}; {seen.span()} (as route {route.base}, {source.where})\n"
        )
        out += [
            f"  - name: {route.name}\n",
            f"    listener: {_scalar(route.listener)}\n",
            f"    called_ae: {_scalar(route.called_ae)}\n",
            f"    upstream: {_scalar(source.upstream)}\n",
            f"    calling_ae: {_flow(sorted(route.callers))}\n",
        ]
        written = written_routes[list(base_routes).index(route.base)]
        kept = {key: value for key, value in written.items() if key not in _LEARNED_ROUTE_KEYS}
        if kept:  # rewrite, and whatever else a route may say: as the base says it
            block = yaml.safe_dump(kept, default_flow_style=False, sort_keys=False)
            out += [f"    {line}\n" for line in block.splitlines()]
        out.append("    allow:\n")
        for rule in route.rules:
            out += _rule_yaml(rule, list(route.callers.values()))
    return out


def _rule_yaml(rule: _Rule, callers: list[Caller]) -> list[str]:
    out = [f"      - services: {_flow(rule.services)}\n", "        sop_classes:\n"]
    for sop_class in rule.sop_classes:
        counts = []
        for service in rule.services:
            seen = _total(c.requests.get((service, sop_class)) for c in callers)
            if seen.count:
                counts.append(f"{service} {seen.count}")
        span = _total(c.requests.get((s, sop_class)) for c in callers for s in rule.services)
        what = ", ".join(counts) or "negotiated for C-GET"
        out.append(f"          - {_scalar(uids.name_of(sop_class))}  # {what}; {span.span()}\n")
    if rule.transfer_syntaxes is not None:
        out.append("        transfer_syntaxes:\n")
        for syntax in rule.transfer_syntaxes:
            seen = _total(
                c.syntaxes.get(sop, {}).get(syntax) for c in callers for sop in rule.sop_classes
            )
            out.append(
                f"          - {_scalar(uids.name_of(syntax))}  # accepted in "
                f"{_count(seen.count, 'context')}\n"
            )
    if rule.destinations is None and "C-MOVE" in rule.services:
        out.append("        # no C-MOVE destination was recorded: any is allowed\n")
    if rule.destinations is not None:
        out.append("        move_destinations:\n")
        for destination in rule.destinations:
            seen = _total(c.destinations.get(destination) for c in callers)
            out.append(
                f"          - {_scalar(destination)}  # in {_count(seen.count)}; {seen.span()}\n"
            )
    return out


def _total(seen: Iterable[Seen | None]) -> Seen:
    total = Seen()
    for one in seen:
        if one is not None:
            total.merge(one)
    return total


def report(learned: Learned) -> Iterator[str]:
    """What was not learned, for stderr."""
    for (why, what), count in sorted(learned.skipped.items()):
        yield f"not learned ({why}): {what}" + (f" ({count} times)" if count > 1 else "")


def cautions(
    learned: Learned, base: Config, base_path: Path, out: Path, options: Options
) -> Iterator[str]:
    """What the learned file leaves out because the base lacks it, and what the copied sections
    do differently from what the admin may expect, for stderr."""
    known = {route.name for route in base.policy.routes}
    for (listener, called_ae, calling_ae), caller in sorted(learned.callers.items()):
        if caller.route not in known:
            yield (
                f"not learned: {calling_ae} -> {called_ae} on {listener}, which took route "
                f"{caller.route}: {base_path} has no such route"
            )
    for listener, mode in sorted(base.policy.listener_modes.items()):
        if mode != options.mode:
            yield f"listener {listener} keeps its own mode: {mode} (copied from {base_path})"
    if out.absolute().parent != base_path.absolute().parent:
        yield (
            f"the sections copied from {base_path} keep their relative paths, which are "
            f"relative to the rules file's directory: write {out.name} next to it"
        )


# -- --diff CURRENT ----------------------------------------------------------------------------


def compare(learned: Learned, config: Config, locator: Locator) -> str:
    """Rule by rule: what ``config`` allows that the period never used, and what was used that
    ``config`` refuses (or lets through only in monitor mode)."""
    used_networks: dict[str, set[IPAddress]] = {}
    used_routes: dict[str, set[str]] = {}
    used_rules: dict[str, set[tuple[str, str, str]]] = {}
    refused: dict[str, dict[tuple[str, str], list[str]]] = {}  # fix -> (why, detail) -> who
    for record in learned.records:
        attempt = attempt_of(record)
        answer = explain(config, locator, attempt)
        who = f"{attempt.calling_ae} -> {attempt.called_ae} on {attempt.listener}"
        used_networks.setdefault(attempt.calling_ae or "", set()).add(_unmapped(attempt.address))
        if answer.route is not None:
            used_routes.setdefault(answer.route.name, set()).add(attempt.calling_ae or "")
        for rule, request in answer.granted:
            used_rules.setdefault(rule.where, set()).add(
                (request.service, request.sop_class, request.destination or "")
            )
        for refusal in answer.refusals:
            if refusal.why == "no_context_allowed" and not refusal.fix:
                continue  # the refusals of its contexts say what to change
            fix = refusal.fix or "no rule change allows it"
            refused.setdefault(fix, {}).setdefault((refusal.why, refusal.detail), []).append(who)
    unused = list(_unused(config, used_networks, used_routes, used_rules))
    lines = [f"{locator.file} allows what the audit trail never shows used:"]
    lines += [f"  {where}: {text}" for where, text in sorted(unused, key=_by_line)] or ["  nothing"]
    lines.append(f"used in the audit trail, and {locator.file} refuses it (to allow it: ...):")
    for fix, reasons in sorted(refused.items()):
        lines.append(f"  {fix}")
        for (why, detail), associations in reasons.items():
            callers = ", ".join(sorted(set(associations)))
            lines.append(f"      {why}: {detail} ({_count(len(associations))}: {callers})")
    if not refused:
        lines.append("  nothing")
    return "\n".join(lines) + "\n"


def _by_line(item: tuple[str, str]) -> tuple[int, str]:
    return int(item[0].rsplit(":", 1)[1]), item[1]


def _unused(
    config: Config,
    networks: dict[str, set[IPAddress]],
    routes: dict[str, set[str]],
    rules: dict[str, set[tuple[str, str, str]]],
) -> Iterator[tuple[str, str]]:
    for peer in config.policy.peers:
        addresses = networks.get(peer.ae_title)
        if addresses is None:
            yield peer.where, f"peer {peer.ae_title}: no association"
            continue
        for network in peer.networks:
            if not any(_inside(address, network) for address in addresses):
                yield peer.where, f"peer {peer.ae_title}: no association from {network}"
    for route in config.policy.routes:
        callers = routes.get(route.name)
        if callers is None:
            yield route.where, f"route {route.name}: no association"
            continue
        for calling_ae in sorted((route.calling_aes or frozenset()) - callers):
            yield route.where, f"route {route.name}: no association of {calling_ae}"
        for (service, sop_class, destination), where in grants(route):
            used = rules.get(where, set())
            if not any(_uses(request, service, sop_class, destination) for request in used):
                what = "any SOP class" if sop_class == ANY else uids.name_of(sop_class)
                to = {"": "", ANY: " to any destination"}.get(destination, f" to {destination}")
                yield where, f"route {route.name}: {service} of {what}{to}: never used"


def _inside(address: IPAddress, network: IPNetwork) -> bool:
    return address.version == network.version and address in network


def _uses(request: tuple[str, str, str], service: str, sop_class: str, destination: str) -> bool:
    return (
        request[0] == service
        and sop_class in (ANY, request[1])
        and destination in ("", ANY, request[2])
    )
