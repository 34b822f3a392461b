"""The policy engine: immutable rules that answer the firewall's three questions.

1. May this association be accepted (calling AE, called AE, source address, certificate)?
2. Which proposed presentation contexts survive (SOP class, transfer syntaxes)?
3. May this DIMSE request pass (service, SOP class, C-MOVE destination)?

Each listener and route runs in ``enforce`` or ``monitor`` mode. The answers are the same in
both: in monitor mode the session records what enforce mode would have refused and lets it
pass, except where there is nothing to let it pass to (no route for the called AE). Every rule
object carries ``where`` (``FILE:LINE`` of its definition) so an answer can name the rule that
gave it.

Everything here is pure and frozen: a reload builds a new ``Policy`` and swaps one reference,
and an association keeps the ``Policy`` it started with. The answers carry the exact DICOM
codes (PS3.8 Table 9-21 for A-ASSOCIATE-RJ, PS3.7 Annex C for DIMSE statuses) so the relay
never invents one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Final

from dicomfw.core.content import ContentRules

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: DIMSE request CommandField values (PS3.7 Annex E), by service name.
SERVICE_COMMANDS: Final[dict[str, int]] = {
    "C-STORE": 0x0001,
    "C-GET": 0x0010,
    "C-FIND": 0x0020,
    "C-MOVE": 0x0021,
    "C-ECHO": 0x0030,
    "N-EVENT-REPORT": 0x0100,
    "N-GET": 0x0110,
    "N-SET": 0x0120,
    "N-ACTION": 0x0130,
    "N-CREATE": 0x0140,
    "N-DELETE": 0x0150,
}
SERVICE_BY_COMMAND: Final[dict[int, str]] = {v: k for k, v in SERVICE_COMMANDS.items()}
#: The Verification SOP Class (PS3.4 Annex A): the only abstract syntax C-ECHO runs on.
VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"

# A-ASSOCIATE-RJ codes, PS3.8 Table 9-21.
RJ_PERMANENT: Final = 1
RJ_TRANSIENT: Final = 2
RJ_SOURCE_USER: Final = 1
RJ_SOURCE_ACSE: Final = 2
RJ_SOURCE_PRESENTATION: Final = 3
RJ_USER_NO_REASON: Final = 1
RJ_USER_CALLING_AE_NOT_RECOGNIZED: Final = 3
RJ_USER_CALLED_AE_NOT_RECOGNIZED: Final = 7
RJ_PRESENTATION_TEMPORARY_CONGESTION: Final = 1
RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED: Final = 2

# Presentation context results, PS3.8 Table 9-18.
PC_ACCEPTANCE: Final = 0
PC_USER_REJECTION: Final = 1
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED: Final = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED: Final = 4

#: Modes of a listener or a route: refuse what the rules refuse, or only record it.
ENFORCE: Final = "enforce"
MONITOR: Final = "monitor"

#: The reasons the rules give, by stage, so that whoever counts or explains refusals names the
#: same set: the metrics create their series from them and ``dicomfw explain`` knows these are
#: the ones it can decide again. (``no_context_allowed`` is the session's verdict on the
#: contexts; ``source_address_denied``, before any PDU, the relay's on ``decide_address``.)
ASSOCIATION_RULE_REASONS: Final = (
    "calling_ae_unknown",
    "source_network_denied",
    "certificate_mismatch",
    "called_ae_unknown",
    "route_denies_calling_ae",
    "no_context_allowed",
)
CONTEXT_RULE_REASONS: Final = ("sop_class_not_allowed", "transfer_syntax_not_allowed")
REQUEST_RULE_REASONS: Final = ("service_not_allowed", "move_destination_denied")

# DIMSE statuses used for refusals (PS3.7 Annex C and C.4.2).
STATUS_NOT_AUTHORIZED: Final = 0x0124
STATUS_SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
STATUS_MOVE_DESTINATION_UNKNOWN: Final = 0xA801


@dataclass(frozen=True, slots=True)
class CertificateIdentity:
    """What a peer's client certificate must carry; every field that is set must match."""

    subject_cn: str | None = None
    san_dns: str | None = None
    san_uri: str | None = None
    fingerprint_sha256: str | None = None  # lowercase hex, no colons

    def matches(self, presented: PresentedIdentity | None) -> bool:
        if presented is None:
            return False
        checks = (
            (self.subject_cn, presented.subject_cn == self.subject_cn),
            (self.san_dns, self.san_dns in presented.san_dns),
            (self.san_uri, self.san_uri in presented.san_uri),
            (self.fingerprint_sha256, presented.fingerprint_sha256 == self.fingerprint_sha256),
        )
        return all(ok for wanted, ok in checks if wanted is not None)


@dataclass(frozen=True, slots=True)
class PresentedIdentity:
    """The verified client certificate of a TLS connection, as the relay extracted it."""

    subject_cn: str | None
    san_dns: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    fingerprint_sha256: str = ""


@dataclass(frozen=True, slots=True)
class Peer:
    """A calling AE title the firewall knows, where it may come from and who it must be."""

    ae_title: str
    networks: tuple[IPNetwork, ...]
    certificate: CertificateIdentity | None = None
    where: str = field(default="", compare=False)  # FILE:LINE of its definition

    def allows_address(self, address: IPAddress) -> bool:
        return in_networks(self.networks, address)


def in_networks(networks: tuple[IPNetwork, ...], address: IPAddress) -> bool:
    """Is ``address`` in any of ``networks`` (also as an IPv4-mapped IPv6 address)?"""
    return any(_contains(net, address) for net in networks)


def _contains(network: IPNetwork, address: IPAddress) -> bool:
    """Membership that also matches IPv4-mapped IPv6 addresses (dual-stack listeners)."""
    if address.version != network.version:
        mapped = getattr(address, "ipv4_mapped", None)
        return mapped is not None and mapped in network
    return address in network


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One line of a route's allowlist. ``None`` means "any" for that dimension."""

    services: frozenset[str]
    sop_classes: frozenset[str] | None = None
    transfer_syntaxes: frozenset[str] | None = None
    move_destinations: frozenset[str] | None = None
    where: str = field(default="", compare=False)

    def covers_sop_class(self, sop_class: str) -> bool:
        """A rule allowing C-ECHO covers Verification without listing it next to CT or MR."""
        return (
            self.sop_classes is None
            or sop_class in self.sop_classes
            or (sop_class == VERIFICATION_SOP_CLASS and "C-ECHO" in self.services)
        )


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    """Content validation on a route: what is checked (``rules``, the checks of
    ``dicomfw.core.content``), which checks only report (``monitor``), how much of a data set
    is held while its first part is checked (``hold_bytes``: past it, the rest streams and a
    late violation aborts), and which data sets an external scanner sees (``scan``: off,
    documents — Encapsulated Document SOP classes —, or instances: every C-STORE), up to
    ``scan_max_bytes``; ``scan_fail`` (open or closed) says what passes when it cannot scan."""

    rules: ContentRules
    monitor: frozenset[str] = frozenset()
    hold_bytes: int = 1_048_576
    scan: str = "off"
    scan_max_bytes: int = 64 * 1_048_576
    scan_fail: str = "open"


@dataclass(frozen=True, slots=True)
class Route:
    """Where associations for (listener, called AE) go, and what they may do there."""

    name: str
    listener: str
    called_ae: str
    upstream: str
    allow: tuple[AllowRule, ...]
    calling_aes: frozenset[str] | None = None
    upstream_called_ae: str | None = None
    upstream_calling_ae: str | None = None
    mode: str = ENFORCE  # the route's own, else its listener's, else the rules file's
    content: ContentPolicy | None = None  # data sets are inspected (command sets always are)
    where: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the association with A-ASSOCIATE-RJ (PS3.8 §9.3.4) and say why, for the audit."""

    result: int
    source: int
    reason: int
    why: str  # stable machine-readable reason, e.g. "calling_ae_unknown"
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Accept:
    """``peer`` is None only in monitor mode, for a calling AE no peer has; ``objections`` are
    what enforce mode would have rejected the association with, in the order it checks them
    (the first is the answer it would have given)."""

    route: Route
    peer: Peer | None
    objections: tuple[Reject, ...] = ()


@dataclass(frozen=True, slots=True)
class ContextVerdict:
    """For one proposed presentation context: the result and the transfer syntaxes kept."""

    context_id: int
    result: int
    transfer_syntaxes: tuple[str, ...]
    why: str = ""


@dataclass(frozen=True, slots=True)
class Allow:
    """The allow rule that admits the request (the first that does)."""

    rule: AllowRule


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the request with this DIMSE status instead of forwarding it."""

    status: int
    why: str
    detail: str = ""


@dataclass(frozen=True)
class Policy:
    """All rules that decide what passes. Built by the config loader, never mutated."""

    peers: tuple[Peer, ...]
    routes: tuple[Route, ...]
    #: The rules file's mode, and each listener's where it sets one: for what is decided before
    #: a route is known (the source address at accept).
    mode: str = ENFORCE
    listener_modes: dict[str, str] = field(default_factory=dict)
    _peer_by_ae: dict[str, Peer] = field(init=False, repr=False, compare=False)
    _routes_by_key: dict[tuple[str, str], tuple[Route, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_peer_by_ae", {p.ae_title: p for p in self.peers})
        index: dict[tuple[str, str], tuple[Route, ...]] = {}
        for route in self.routes:
            key = (route.listener, route.called_ae)
            index[key] = (*index.get(key, ()), route)
        object.__setattr__(self, "_routes_by_key", index)

    def admits_source(self, address: IPAddress) -> bool:
        """Checked at TCP accept, before a byte is read: is the address any peer's network?"""
        return any(peer.allows_address(address) for peer in self.peers)

    def listener_mode(self, listener: str) -> str:
        return self.listener_modes.get(listener, self.mode)

    def decide_association(
        self,
        listener: str,
        address: IPAddress,
        calling_ae: str,
        called_ae: str,
        identity: PresentedIdentity | None,
    ) -> Accept | Reject:
        """PS3.8 §9.3.4 answers for an A-ASSOCIATE-RQ. AE titles arrive already stripped.

        The checks run in a fixed order and enforce mode answers with the first that fails.
        In monitor mode (the route's) every failing check becomes an objection and the
        association goes on, unless there is no route for the called AE to go on to.
        """
        candidates = self._routes_by_key.get((listener, called_ae), ())
        route = next(
            (r for r in candidates if r.calling_aes is None or calling_ae in r.calling_aes),
            None,
        )
        objections: list[Reject] = []
        peer = self._peer_by_ae.get(calling_ae)
        if peer is None:
            objections.append(
                _reject_calling("calling_ae_unknown", f"calling AE {calling_ae!r} is not a peer")
            )
        elif not peer.allows_address(address):
            objections.append(
                _reject_calling(
                    "source_network_denied", f"{calling_ae!r} may not connect from {address}"
                )
            )
        elif peer.certificate is not None and not peer.certificate.matches(identity):
            objections.append(
                _reject_calling(
                    "certificate_mismatch",
                    f"{calling_ae!r} is bound to a certificate identity this connection lacks",
                )
            )
        if not candidates:
            objections.append(
                Reject(
                    RJ_PERMANENT,
                    RJ_SOURCE_USER,
                    RJ_USER_CALLED_AE_NOT_RECOGNIZED,
                    "called_ae_unknown",
                    f"no route for called AE {called_ae!r} on listener {listener!r}",
                )
            )
        elif route is None:
            objections.append(
                _reject_calling(
                    "route_denies_calling_ae", f"no route to {called_ae!r} admits {calling_ae!r}"
                )
            )
            route = candidates[0]  # where monitor mode lets it go
        if route is None or (objections and route.mode != MONITOR):
            return objections[0]
        return Accept(route, peer, tuple(objections))

    @staticmethod
    def filter_context(
        route: Route, context_id: int, abstract_syntax: str, transfer_syntaxes: tuple[str, ...]
    ) -> ContextVerdict:
        """Keep a context when some rule covers its SOP class and some allowed TS remains."""
        rules = [rule for rule in route.allow if rule.covers_sop_class(abstract_syntax)]
        if not rules:
            return ContextVerdict(
                context_id, PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, (), "sop_class_not_allowed"
            )
        if any(rule.transfer_syntaxes is None for rule in rules):
            kept = transfer_syntaxes
        else:
            allowed = frozenset().union(*(rule.transfer_syntaxes or () for rule in rules))
            kept = tuple(ts for ts in transfer_syntaxes if ts in allowed)
        if not kept:
            return ContextVerdict(
                context_id, PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, (), "transfer_syntax_not_allowed"
            )
        return ContextVerdict(context_id, PC_ACCEPTANCE, kept)

    @staticmethod
    def decide_request(
        route: Route, service: str, sop_class: str, move_destination: str | None
    ) -> Allow | Refuse:
        """May a DIMSE request from the association requester reach the upstream?"""
        rules = [r for r in route.allow if service in r.services and r.covers_sop_class(sop_class)]
        if not rules:
            return Refuse(
                STATUS_NOT_AUTHORIZED,
                "service_not_allowed",
                f"{service} of {sop_class} is not allowed on route {route.name!r}",
            )
        if service == "C-MOVE":
            destination = move_destination or ""
            rules = [
                r
                for r in rules
                if r.move_destinations is None or destination in r.move_destinations
            ]
            if not rules:
                return Refuse(
                    STATUS_MOVE_DESTINATION_UNKNOWN,
                    "move_destination_denied",
                    f"C-MOVE destination {destination!r} is not allowed on route {route.name!r}",
                )
        return Allow(rules[0])


def _reject_calling(why: str, detail: str) -> Reject:
    return Reject(RJ_PERMANENT, RJ_SOURCE_USER, RJ_USER_CALLING_AE_NOT_RECOGNIZED, why, detail)
