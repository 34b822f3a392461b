"""``dicomfw check --diff OLD NEW``: what a change to the rules newly allows and newly refuses.

A line-by-line diff of two rules files says what was typed; the reviewer of a firewall change
wants to know what it lets through. So both files are loaded and compared as rules: peers and
their networks (as address ranges: 10.1.0.0/16 replacing 10.1.2.0/24 allows the rest of the
/16 and refuses nothing), certificate bindings, routes and whom they admit, monitor mode, and the
services, SOP classes and move destinations each route allows ("any" covers every one). Each
line names where to look: the new file for what it allows, the old one for what it refuses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from dicomfw.admin.locate import Locator
from dicomfw.config.model import Config
from dicomfw.core import uids
from dicomfw.core.policy import MONITOR, VERIFICATION_SOP_CLASS, IPNetwork, Peer, Route

__all__ = ["ANY", "Change", "Grant", "diff", "grants", "render"]

#: Stands for "any" SOP class or move destination (a rule that does not list them).
ANY: Final = "*"


@dataclass(frozen=True, slots=True, order=True)
class Change:
    where: str
    text: str


Rules = tuple[Config, Locator]


def diff(old: Rules, new: Rules) -> tuple[list[Change], list[Change]]:
    """(what ``new`` allows that ``old`` did not, what ``old`` allowed that ``new`` does not)."""
    return list(_gained(old[0], *new)), list(_gained(new[0], *old))


def render(old_file: str, new_file: str, allowed: list[Change], refused: list[Change]) -> str:
    if not allowed and not refused:
        return f"{new_file} allows and refuses what {old_file} does.\n"
    lines = []
    for title, changes in (("allows", allowed), ("refuses", refused)):
        if changes:
            lines.append(f"{new_file} newly {title}:")
            lines += [f"  {change.where}: {change.text}" for change in changes]
    return "\n".join(lines) + "\n"


def _gained(before: Config, after: Config, locate: Locator) -> Iterator[Change]:
    """What ``after`` lets through that ``before`` did not, located in ``after``."""
    peers = {peer.ae_title: peer for peer in before.policy.peers}
    for peer in after.policy.peers:
        yield from _peer_gains(peers.get(peer.ae_title), peer)
    for listener in after.listeners:
        monitored = after.policy.listener_mode(listener.name) == MONITOR
        if monitored and before.policy.listener_mode(listener.name) != MONITOR:
            yield Change(
                locate.listener(after, listener.name),
                f"listener {listener.name} in monitor mode: connections from addresses in no "
                "peer's networks pass",
            )
    routes = {(r.name, r.listener, r.called_ae): r for r in before.policy.routes}
    for route in after.policy.routes:
        yield from _route_gains(routes.get((route.name, route.listener, route.called_ae)), route)


def _peer_gains(before: Peer | None, peer: Peer) -> Iterator[Change]:
    if before is None:
        yield Change(peer.where, f"peer {peer.ae_title} from {_networks(peer.networks)}")
        return
    wider = _gained_networks(peer.networks, before.networks)
    if wider:
        yield Change(peer.where, f"peer {peer.ae_title} from {wider}")
    if before.certificate is not None and before.certificate != peer.certificate:
        binding = "no certificate" if peer.certificate is None else f"{peer.certificate}"
        yield Change(peer.where, f"peer {peer.ae_title} with {binding} (was {before.certificate})")


def _route_gains(before: Route | None, route: Route) -> Iterator[Change]:
    name = f"route {route.name}"
    if before is None:
        callers = (
            "every peer" if route.calling_aes is None else ", ".join(sorted(route.calling_aes))
        )
        yield Change(
            route.where,
            f"{name}: called AE {route.called_ae} on listener {route.listener}, to upstream "
            f"{route.upstream}, for {callers}",
        )
    elif before.calling_aes is not None:
        if route.calling_aes is None:
            yield Change(
                route.where, f"{name} for every peer (was {', '.join(before.calling_aes)})"
            )
        elif route.calling_aes - before.calling_aes:
            new = ", ".join(sorted(route.calling_aes - before.calling_aes))
            yield Change(route.where, f"{name} for {new}")
    if route.mode == MONITOR and (before is None or before.mode != MONITOR):
        yield Change(route.where, f"{name} in monitor mode: what its rules refuse passes")
    earlier = list(grants(before)) if before is not None else []
    for grant, where in grants(route):
        if not any(_covers(old, grant) for old, _ in earlier):
            yield Change(where, f"{name}: {_grant_text(grant, earlier)}")


Grant = tuple[str, str, str]  # service, SOP class (or ANY), C-MOVE destination (or ANY, or "")


def grants(route: Route) -> Iterator[tuple[Grant, str]]:
    """Every (service, SOP class, destination) the route's rules allow, with the rule's line."""
    for rule in route.allow:
        for service in sorted(rule.services):
            sop_classes = sorted(rule.sop_classes) if rule.sop_classes is not None else [ANY]
            if service == "C-ECHO":  # it runs on Verification only, whatever else is listed
                sop_classes = [VERIFICATION_SOP_CLASS]
            destinations = [""]
            if service == "C-MOVE":
                destinations = sorted(rule.move_destinations or [ANY])
            for sop_class in sop_classes:
                for destination in destinations:
                    yield (service, sop_class, destination), rule.where


def _covers(old: Grant, new: Grant) -> bool:
    return old[0] == new[0] and old[1] in (new[1], ANY) and old[2] in (new[2], ANY)


def _grant_text(grant: Grant, other: Iterable[tuple[Grant, str]]) -> str:
    service, sop_class, destination = grant
    if sop_class == ANY:
        listed = sorted({g[1] for g, _ in other if g[0] == service and g[1] != ANY})
        but = f" but {', '.join(map(uids.name_of, listed))}" if listed else ""
        what = f"any SOP class{but}"
    else:
        what = uids.name_of(sop_class)
    to = {"": "", ANY: " to any destination"}.get(destination, f" to {destination}")
    return f"{service} of {what}{to}"


def _networks(networks: Iterable[IPNetwork]) -> str:
    return ", ".join(map(str, networks))


def _gained_networks(networks: Iterable[IPNetwork], before: Iterable[IPNetwork]) -> str:
    """The addresses of ``networks`` not in ``before``, the way an admin reads them:
    ``10.1.0.0/16 except 10.1.2.0/24`` rather than the eight networks that make it up."""
    before = list(before)
    parts = []
    for network in networks:
        if not _minus([network], before):
            continue
        inside = [b for b in before if b.version == network.version and b.overlaps(network)]
        parts.append(f"{network} except {_networks(inside)}" if inside else str(network))
    return ", ".join(parts)


def _minus(networks: Iterable[IPNetwork], others: Iterable[IPNetwork]) -> list[IPNetwork]:
    """The addresses of ``networks`` that are in none of ``others``, as few networks as can be."""
    rest = list(networks)
    for other in others:
        remaining: list[IPNetwork] = []
        for network in rest:
            if network.version != other.version or not network.overlaps(other):
                remaining.append(network)
            elif not network.subnet_of(other):  # type: ignore[arg-type]
                remaining += network.address_exclude(other)  # type: ignore[arg-type]
        rest = remaining
    v4 = [n for n in rest if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in rest if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]
