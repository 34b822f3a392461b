"""``dicomfw check``'s warnings: rules that load but do not do what the admin meant.

The loader refuses what cannot work (an undefined listener, a ``calling_ae`` naming no peer,
two routes that would take the same association). What it accepts can still be a mistake: a
route nothing ever reaches, a peer no route lets in, a transfer syntax list no modality can meet,
a C-MOVE destination nobody knows, a certificate about to expire. Each warning names the line to
look at; none stops the daemon (``dicomfw check --strict`` makes them fail the check).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import combinations
from pathlib import Path
from typing import Final

from cryptography import x509
from pydicom.uid import UID

from dicomfw.admin.locate import Key, Locator
from dicomfw.config.model import AtnaCollector, ClientTLS, Config, ServerTLS
from dicomfw.core import uids
from dicomfw.core.policy import VERIFICATION_SOP_CLASS, AllowRule, IPNetwork, Peer, Route

__all__ = ["EXPIRY_WARNING_DAYS", "Finding", "findings"]

#: A certificate that expires within this many days is worth a warning at every check.
EXPIRY_WARNING_DAYS: Final = 30
#: Words in a SOP class's PS3.6 name that mean its objects may carry pixel data, and so may be
#: proposed with a compressed (encapsulated) transfer syntax. Anything else (queries, reports,
#: presentation states, waveforms, MPPS, Verification) is only ever encoded uncompressed.
_PIXEL_DATA_WORDS: Final = ("Image", "Segmentation", "Map", "Dose", "Volume", "Photograph", "Video")


@dataclass(frozen=True, slots=True, order=True)
class Finding:
    """One warning: where to look (``FILE:LINE``) and what is wrong there."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: warning: {self.message}"


def findings(config: Config, locator: Locator, files: bool = True) -> list[Finding]:
    """Every warning for ``config``, in line order. ``files``: also read the certificate and
    key files it names (off for ``--syntax-only``)."""
    found = [
        *_listeners_without_routes(config, locator),
        *_unreachable(config),
        *_overlapping_networks(config.policy.peers),
        *_transfer_syntax_dead_ends(config.policy.routes),
        *_unknown_move_destinations(config),
    ]
    if files:
        found += _certificates(config, locator, datetime.now(UTC))
    return sorted(found, key=lambda f: (_line(f.where), f.message))


def _line(where: str) -> int:
    return int(where.rsplit(":", 1)[1])


def _name(uid: str) -> str:
    return uids.name_of(uid)


# -- who can reach what ----------------------------------------------------------------------


def _listeners_without_routes(config: Config, locator: Locator) -> Iterator[Finding]:
    routed = {route.listener for route in config.policy.routes}
    for listener in config.listeners:
        if listener.name not in routed:
            yield Finding(
                locator.listener(config, listener.name),
                f"listener {listener.name!r} has no route: every association to it is refused "
                "(called AE not recognized)",
            )


def _unreachable(config: Config) -> Iterator[Finding]:
    """Routes no peer can take, and peers no route takes.

    A peer takes a route when the route admits it (``calling_ae``, or every peer), no earlier
    route for the same listener and called AE took it first, and its certificate binding can
    match there (a plain listener has no certificate to match).
    """
    peers = config.policy.peers
    plain = {listener.name for listener in config.listeners if listener.tls is None}
    taken: dict[tuple[str, str], dict[str, Route]] = {}  # (listener, called AE) -> peer -> route
    reached: set[str] = set()
    for route in config.policy.routes:
        earlier = taken.setdefault((route.listener, route.called_ae), {})
        admitted = [
            p for p in peers if route.calling_aes is None or p.ae_title in route.calling_aes
        ]
        shadowed = [p for p in admitted if p.ae_title in earlier]
        usable = [p for p in admitted if p not in shadowed and not _needs_tls(p, route, plain)]
        for peer in admitted:
            earlier.setdefault(peer.ae_title, route)  # the policy picks the first route
        reached |= {peer.ae_title for peer in usable}
        if not usable:
            yield Finding(route.where, _unreachable_route(route, admitted, shadowed, earlier))
    for peer in peers:
        if peer.ae_title not in reached:
            yield Finding(peer.where, _unreached_peer(peer, config.policy.routes, plain))


def _needs_tls(peer: Peer, route: Route, plain: set[str]) -> bool:
    return peer.certificate is not None and route.listener in plain


def _unreachable_route(
    route: Route, admitted: list[Peer], shadowed: list[Peer], earlier: dict[str, Route]
) -> str:
    never = f"route {route.name!r} can never match"
    if not admitted:
        return f"{never}: there is no peer for it to admit"
    parts = []
    if shadowed:
        lines = sorted({earlier[p.ae_title].where.rsplit(":", 1)[1] for p in shadowed}, key=int)
        titles = ", ".join(p.ae_title for p in shadowed)
        parts.append(f"earlier routes (line {', '.join(lines)}) take {titles} first")
    bound = [p.ae_title for p in admitted if p not in shadowed]
    if bound:
        parts.append(
            f"{', '.join(bound)} must present a certificate, which plain listener "
            f"{route.listener!r} never has"
        )
    return f"{never}: {'; '.join(parts)}"


def _unreached_peer(peer: Peer, routes: tuple[Route, ...], plain: set[str]) -> str:
    admitting = [r for r in routes if r.calling_aes is None or peer.ae_title in r.calling_aes]
    message = f"no route admits peer {peer.ae_title!r}: every association it makes is refused"
    if admitting and all(_needs_tls(peer, r, plain) for r in admitting):
        names = ", ".join(repr(r.name) for r in admitting)
        message += f" (it is bound to a certificate; routes {names} are on plain listeners)"
    return message


def _overlapping_networks(peers: tuple[Peer, ...]) -> Iterator[Finding]:
    """One AE title given the same addresses twice: in one peer's networks (the narrower entry
    grants nothing; was the wider one meant to go?), or as two peers whose titles differ only
    in case (many DICOM systems do not tell them apart)."""
    for peer in peers:
        for wide, narrow in combinations(peer.networks, 2):
            if _overlaps(wide, narrow):
                yield Finding(
                    peer.where,
                    f"peer {peer.ae_title!r} lists {wide} and {narrow}, which overlap: "
                    "the narrower one adds nothing",
                )
    for first, second in combinations(peers, 2):
        shared = any(_overlaps(a, b) for a in first.networks for b in second.networks)
        if first.ae_title.upper() == second.ae_title.upper() and shared:
            yield Finding(
                second.where,
                f"peers {first.ae_title!r} ({first.where}) and {second.ae_title!r} are the "
                "same AE title in another case, on overlapping networks",
            )


def _overlaps(first: IPNetwork, second: IPNetwork) -> bool:
    return first.version == second.version and first.overlaps(second)


# -- what a rule can let through -------------------------------------------------------------


def _transfer_syntax_dead_ends(routes: tuple[Route, ...]) -> Iterator[Finding]:
    """A rule that lists only compressed transfer syntaxes next to SOP classes whose objects
    carry no pixel data: no modality ever proposes those compressed, so their contexts are
    always refused."""
    for route in routes:
        for rule in route.allow:
            if rule.transfer_syntaxes is None or rule.sop_classes is None:
                continue
            if not all(UID(ts).is_encapsulated for ts in rule.transfer_syntaxes):
                continue
            stranded = [uid for uid in _sop_classes_of(rule) if not _may_carry_pixels(uid)]
            if stranded:
                yield Finding(
                    rule.where,
                    f"{', '.join(map(_name, stranded))}: this rule allows only compressed "
                    f"transfer syntaxes ({', '.join(sorted(map(_name, rule.transfer_syntaxes)))})"
                    ", which no modality proposes for objects without pixel data; their "
                    "contexts are always refused",
                )


def _sop_classes_of(rule: AllowRule) -> list[str]:
    implied = [VERIFICATION_SOP_CLASS] if "C-ECHO" in rule.services else []
    return sorted(set(rule.sop_classes or ()) | set(implied))


def _may_carry_pixels(uid: str) -> bool:
    """From the registry's name; a SOP class it does not know (a private one) may."""
    name = UID(uid).name
    return name == uid or any(word in name for word in _PIXEL_DATA_WORDS)


def _unknown_move_destinations(config: Config) -> Iterator[Finding]:
    known = {peer.ae_title for peer in config.policy.peers}
    for route in config.policy.routes:
        known |= {route.called_ae, route.upstream_called_ae or route.called_ae}
    for route in config.policy.routes:
        for rule in route.allow:
            unknown = sorted(set(rule.move_destinations or ()) - known)
            if unknown:
                yield Finding(
                    rule.where,
                    f"move destination {', '.join(unknown)} is neither a peer nor an AE title "
                    "the firewall routes to: a typo, or a node these rules do not know",
                )


# -- certificates ----------------------------------------------------------------------------

TLSFiles = ServerTLS | ClientTLS | AtnaCollector


def _tls_sections(config: Config) -> Iterator[tuple[tuple[Key, ...], TLSFiles]]:
    for index, listener in enumerate(config.listeners):
        if listener.tls is not None:
            yield ("listeners", index, "tls"), listener.tls
    for upstream in config.upstreams:
        if upstream.tls is not None:
            yield ("upstreams", upstream.name, "tls"), upstream.tls
    if config.audit is not None and config.audit.atna is not None:
        yield ("audit", "atna"), config.audit.atna


def _certificates(config: Config, locator: Locator, now: datetime) -> Iterator[Finding]:
    """Certificates (and CAs) that expire within ``EXPIRY_WARNING_DAYS``. A key that is not its
    certificate's is an error when the rules load (``relay/tlsfiles.py``), not a warning."""
    soon = now + timedelta(days=EXPIRY_WARNING_DAYS)
    for path, tls in _tls_sections(config):
        for key, file in (("cert", tls.cert), ("ca", tls.ca)):
            for cert in _read_certificates(file) if file is not None else ():
                expires = cert.not_valid_after_utc
                if expires <= soon:
                    when = "expired" if expires <= now else "expires"
                    yield Finding(
                        locator.where(*path, key),
                        f"{file}: certificate {cert.subject.rfc4514_string()} {when} on "
                        f"{expires:%Y-%m-%d %H:%M} UTC",
                    )


def _read_certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []  # not a readable PEM file: the daemon's own load reports it as an error
