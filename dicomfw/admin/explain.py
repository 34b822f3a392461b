"""``dicomfw explain``: what the rules decide about one association, why, and what to change.

The admin asks about an association described on the command line or about an audit event
(why was this refused yesterday; would the new rules let it through?). The answers come from
the core's ``Policy``, the code the daemon runs, asked the daemon's questions in the daemon's
order: ``admits_source``, ``decide_association``, ``filter_context`` for each proposed context,
``decide_request`` for each request. To list every problem and not only the first, the
association is also put to a copy of the policy whose routes are all in monitor mode (the same
code, which then collects every objection); the daemon's own answer decides the verdict.

Each step names the rule it matched or the one that is missing, with ``FILE:LINE``, and each
refusal the smallest change that would allow it. What the rules do not decide is not guessed:
rate limits and caps depend on the traffic at the time, a TLS handshake on certificates, an
upstream on itself; for those the audit record's answer stands, and the output says so.
"""

from __future__ import annotations

import _ssl
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from dicomfw.admin.locate import Locator
from dicomfw.admin.records import Attempt, Context, Request
from dicomfw.config.model import Config
from dicomfw.core import uids
from dicomfw.core.policy import (
    ASSOCIATION_RULE_REASONS,
    CONTEXT_RULE_REASONS,
    MONITOR,
    PC_ACCEPTANCE,
    REQUEST_RULE_REASONS,
    SERVICE_COMMANDS,
    Accept,
    Allow,
    AllowRule,
    CertificateIdentity,
    Peer,
    Policy,
    PresentedIdentity,
    Reject,
    Route,
)
from dicomfw.core.ratelimit import RateLimits
from dicomfw.relay.tls import identity_of

__all__ = [
    "BadInput",
    "Explanation",
    "Refusal",
    "attempt_from_arguments",
    "explain",
    "identity_from_pem",
    "render",
]

#: Without ``:TS``, a context proposes what nearly every modality proposes: the DICOM default
#: (Implicit VR Little Endian, PS3.5 §10.1) and Explicit VR Little Endian.
DEFAULT_TRANSFER_SYNTAXES: Final = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
#: Stands for the transfer syntaxes a record did not keep: no rule lists it, so a context is
#: kept only by a rule that takes every transfer syntax.
_UNRECORDED: Final = ""
#: The reasons the rules decide, which explain derives again; any other reason in a record
#: (limits, TLS, the upstream, the protocol) is reported as the record gives it.
RULE_REASONS: Final = frozenset(
    {
        "source_address_denied",
        *ASSOCIATION_RULE_REASONS,
        *CONTEXT_RULE_REASONS,
        *REQUEST_RULE_REASONS,
        "unrecognized_operation",
    }
)


class BadInput(ValueError):
    """The association cannot be described to these rules (unknown listener, bad keyword)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """One thing the rules refuse. ``monitored``: the daemon lets it through (monitor mode) and
    only reports it. ``fix``: the smallest change that allows it ("" when none can)."""

    stage: str  # connection, association, context, request
    why: str
    detail: str
    fix: str
    monitored: bool = False


@dataclass
class Explanation:
    """The chain of steps (what matched, with ``FILE:LINE``) and the refusals in the order the
    daemon meets them: the first one not ``monitored`` is the daemon's answer."""

    attempt: Attempt
    steps: list[tuple[str, str]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the route it goes to, and the allow rule that let each request through
    route: Route | None = None
    granted: list[tuple[AllowRule, Request]] = field(default_factory=list)

    @property
    def answer(self) -> Refusal | None:
        """What the daemon refuses it with, or None when it lets it through."""
        return next((r for r in self.refusals if not r.monitored), None)

    @property
    def allowed(self) -> bool:
        """Allowed by the rules in enforce mode: nothing refused, not even in monitor mode."""
        return not self.refusals


def explain(config: Config, locator: Locator, attempt: Attempt) -> Explanation:
    """Put ``attempt`` to the rules; raises ``BadInput`` for a listener the rules lack."""
    return _Explainer(config, locator, attempt).run()


def _name(uid: str) -> str:
    return uids.name_of(uid)


def _names(uid_list: Iterable[str]) -> str:
    return ", ".join(_name(uid) for uid in uid_list)


class _Explainer:
    def __init__(self, config: Config, locator: Locator, attempt: Attempt) -> None:
        self.config = config
        self.policy = config.policy
        self.locate = locator
        self.attempt = attempt
        self.out = Explanation(attempt)

    def run(self) -> Explanation:
        self.connection()
        route = self.association()
        if route is not None:
            self.contexts(route)
            self.requests(route)
        self.recorded()
        return self.out

    def step(self, what: str, text: str) -> None:
        self.out.steps.append((what, text))

    def refuse(self, stage: str, why: str, detail: str, fix: str, monitored: bool = False) -> None:
        self.record(Refusal(stage, why, detail, fix, monitored))

    def record(self, refusal: Refusal) -> None:
        self.out.refusals.append(refusal)
        verdict = "would be REFUSED in enforce mode" if refusal.monitored else "REFUSED"
        self.step(refusal.stage, f"{verdict} {refusal.why}: {refusal.detail}")

    # -- the daemon's questions, in its order ------------------------------------------------

    def connection(self) -> None:
        attempt, policy = self.attempt, self.policy
        listener = next((x for x in self.config.listeners if x.name == attempt.listener), None)
        if listener is None:
            known = ", ".join(x.name for x in self.config.listeners)
            raise BadInput(f"no listener {attempt.listener!r} in {self.locate.file} ({known})")
        mode = policy.listener_mode(listener.name)
        tls = "mutual TLS" if listener.tls is not None else "plain DICOM"
        where = self.locate.listener(self.config, listener.name)
        self.step("listener", f"{listener.name} ({where}): {tls}, {mode} mode")
        address = attempt.address
        if policy.admits_source(address):
            holders = [p for p in policy.peers if p.allows_address(address)]
            self.step("source", f"{address}: in the networks of {_peer_list(holders)}")
            return
        self.refuse(
            "connection",
            "source_address_denied",
            f"{address} is in no peer's networks",
            self.fix_address(),
            monitored=mode == MONITOR,
        )

    def association(self) -> Route | None:
        """Calling AE, its network and certificate, and the route; returns the route the
        association goes on to (None: none, or no AE titles were read)."""
        attempt, policy = self.attempt, self.policy
        if attempt.calling_ae is None or attempt.called_ae is None:
            self.out.notes.append(
                "the connection was closed before any DICOM was read: no AE title to check"
            )
            return None
        question = (
            attempt.listener,
            attempt.address,
            attempt.calling_ae,
            attempt.called_ae,
            attempt.identity,
        )
        answer = policy.decide_association(*question)
        every = _all_monitored(policy).decide_association(*question)
        self.step("calling AE", self.peer_text(attempt.calling_ae))
        if isinstance(every, Reject):  # no route for the called AE: nowhere to go on to
            self.refuse("association", every.why, every.detail, self.fix_called_ae())
            return None
        route = next(r for r in policy.routes if r.name == every.route.name)
        self.out.route = route
        self.step("called AE", self.route_text(route, every))
        limits = self.config.limits.rates.effective(attempt.listener, attempt.calling_ae)
        if limits != RateLimits() and not attempt.reason.endswith("_exceeded"):
            self.out.notes.append(
                "rate limits and caps apply to it: explain does not evaluate them, they depend "
                "on the traffic at the time"
            )
        for objection in every.objections:
            self.refuse(
                "association",
                objection.why,
                objection.detail,
                self.fix_association(objection, route),
                monitored=isinstance(answer, Accept),
            )
        return route

    def contexts(self, route: Route) -> None:
        attempt = self.attempt
        monitored = route.mode == MONITOR
        contexts = attempt.contexts
        if not contexts:
            if attempt.reason == "no_context_allowed" and not self.out.refusals:
                self.refuse(
                    "association",
                    "no_context_allowed",
                    "the audit record does not list the proposed presentation contexts",
                    "name them with --context to see which rule to change",
                    monitored,
                )
            elif not attempt.requests:
                self.out.notes.append(
                    "no presentation context to check"
                    + (" (the record does not list them)" if attempt.event else ": add --context")
                )
            return
        refused: list[Refusal] = []
        for number, context in enumerate(contexts):
            proposed = context.transfer_syntaxes or (_UNRECORDED,)
            verdict = Policy.filter_context(route, 2 * number + 1, context.sop_class, proposed)
            syntaxes = _names(context.transfer_syntaxes) or "transfer syntaxes not recorded"
            label = f"{_name(context.sop_class)} ({syntaxes})"
            covering = [r for r in route.allow if r.covers_sop_class(context.sop_class)]
            if verdict.result == PC_ACCEPTANCE:
                rules = ", ".join(rule.where for rule in covering)
                plural = "s" if len(covering) > 1 else ""
                self.step("context", f"{label}: allowed by the allow rule{plural} at {rules}")
                continue
            fix = self.fix_context(route, context, covering, verdict.why)
            refused.append(Refusal("context", verdict.why, label, fix, monitored))
        if len(refused) == len(contexts) and attempt.every_context:
            detail = f"no proposed presentation context is allowed on route {route.name!r}"
            self.refuse("association", "no_context_allowed", detail, "", monitored)
        for refusal in refused:
            self.record(refusal)

    def requests(self, route: Route) -> None:
        monitored = route.mode == MONITOR
        for request in self.attempt.requests:
            label = f"{request.service} of {_name(request.sop_class)}"
            if request.service == "C-MOVE":
                label += f" to {request.destination or '(destination not recorded)'}"
            if request.service not in SERVICE_COMMANDS:
                detail = f"{label}: the command is no DIMSE request"
                self.refuse("request", "unrecognized_operation", detail, "", monitored)
                continue
            verdict = Policy.decide_request(
                route, request.service, request.sop_class, request.destination
            )
            if isinstance(verdict, Allow):
                self.out.granted.append((verdict.rule, request))
                self.step("request", f"{label}: allowed by the allow rule at {verdict.rule.where}")
            else:
                fix = self.fix_request(route, request, verdict.why)
                self.refuse("request", verdict.why, label, fix, monitored)

    def recorded(self) -> None:
        """What the record says, where the rules cannot say it again (or now say otherwise)."""
        attempt = self.attempt
        if not attempt.event:
            return
        refusal_event = attempt.event in (
            "association_rejected",
            "request_refused",
            "connection_refused",
            "would_refuse",
        )
        if refusal_event and attempt.reason not in RULE_REASONS:
            if self.out.allowed:
                self.record(
                    Refusal(
                        attempt.stage or _STAGE_OF_EVENT[attempt.event],
                        attempt.reason,
                        _not_a_rule(attempt.reason),
                        "",
                        monitored=attempt.event == "would_refuse",
                    )
                )
        elif refusal_event and attempt.reason not in {r.why for r in self.out.refusals}:
            self.out.notes.append(
                f"the audit record says {attempt.reason}: these rules do not refuse it for that "
                "reason (they are not the rules in force then)"
            )
        elif attempt.event == "request_failed":
            self.out.notes.append("the upstream answered it with a failure status")
        elif attempt.event == "association" and attempt.reason != "released":
            self.out.notes.append(f"it ended with {attempt.reason}, which is not a rule's doing")

    # -- what matched ------------------------------------------------------------------------

    def peer(self, ae_title: str) -> Peer | None:
        return next((p for p in self.policy.peers if p.ae_title == ae_title), None)

    def peer_text(self, ae_title: str) -> str:
        peer = self.peer(ae_title)
        if peer is None:
            return f"{ae_title}: no peer has this AE title"
        networks = ", ".join(map(str, peer.networks))
        binding = ", bound to a certificate" if peer.certificate is not None else ""
        return f"{ae_title}: peer {ae_title} ({peer.where}), networks {networks}{binding}"

    def route_text(self, route: Route, accept: Accept) -> str:
        upstream = f"upstream {route.upstream} ({self.locate.upstream(route.upstream)})"
        denied = any(o.why == "route_denies_calling_ae" for o in accept.objections)
        admits = "does not admit" if denied else "admits"
        return (
            f"{route.called_ae}: route {route.name} ({route.where}), {route.mode} mode, "
            f"{admits} {self.attempt.calling_ae}; {upstream}"
        )

    # -- the smallest change -----------------------------------------------------------------

    def fix_address(self) -> str:
        attempt = self.attempt
        peer = self.peer(attempt.calling_ae) if attempt.calling_ae else None
        if peer is not None:
            return f"add {attempt.address} to peer {peer.ae_title}'s networks ({peer.where})"
        if attempt.calling_ae:
            return self.fix_new_peer()
        return (
            f"add {attempt.address} to the networks of the peer that calls from it "
            f"(peers, {self.locate.where('peers')})"
        )

    def fix_new_peer(self) -> str:
        attempt = self.attempt
        return (
            f"add a peer {{ae_title: {attempt.calling_ae}, networks: [{attempt.address}]}} "
            f"to peers ({self.locate.where('peers')})"
        )

    def fix_called_ae(self) -> str:
        attempt = self.attempt
        return (
            f"add a route for called AE {attempt.called_ae} on listener {attempt.listener} "
            f"(routes, {self.locate.where('routes')})"
        )

    def fix_association(self, objection: Reject, route: Route) -> str:
        attempt = self.attempt
        peer = self.peer(attempt.calling_ae or "")
        if objection.why == "calling_ae_unknown":
            return self.fix_new_peer()
        if objection.why == "source_network_denied":
            return self.fix_address()
        if objection.why == "route_denies_calling_ae":
            return (
                f"add {attempt.calling_ae} to the calling_ae of route {route.name} ({route.where})"
            )
        if objection.why == "certificate_mismatch" and peer is not None and peer.certificate:
            tls = any(x.name == attempt.listener and x.tls for x in self.config.listeners)
            return _fix_certificate(peer, peer.certificate, attempt.identity, tls)
        return ""

    def fix_context(
        self, route: Route, context: Context, covering: list[AllowRule], why: str
    ) -> str:
        name = _name(context.sop_class)
        if why == "transfer_syntax_not_allowed":
            syntax = context.transfer_syntaxes[0] if context.transfer_syntaxes else ""
            wanted = _name(syntax) if syntax else "a transfer syntax it proposes (not recorded)"
            return f"add {wanted} to the transfer_syntaxes of the allow rule at {covering[0].where}"
        services = {r.service for r in self.attempt.requests if r.sop_class == context.sop_class}
        listing = [r for r in route.allow if r.sop_classes is not None]
        rule = next((r for r in listing if services & r.services), None)
        if rule is None and services:
            return ""  # the request's fix, a new allow rule, covers the context too
        return f"add {name} to the sop_classes of the allow rule at {(rule or listing[0]).where}"

    def fix_request(self, route: Route, request: Request, why: str) -> str:
        name = _name(request.sop_class)
        if why == "move_destination_denied":
            rule = next(
                r
                for r in route.allow
                if "C-MOVE" in r.services and r.covers_sop_class(request.sop_class)
            )
            destination = request.destination or "the destination (not recorded)"
            return f"add {destination} to the move_destinations of the allow rule at {rule.where}"
        listing = [
            r for r in route.allow if request.service in r.services and r.sop_classes is not None
        ]
        if listing:
            return f"add {name} to the sop_classes of the allow rule at {listing[0].where}"
        destinations = ""
        if request.service == "C-MOVE" and request.destination:
            destinations = f", move_destinations: [{request.destination}]"
        return (
            f"add an allow rule {{services: [{request.service}], sop_classes: [{name}]"
            f"{destinations}}} to route {route.name} ({route.where})"
        )


_STAGE_OF_EVENT: Final = {
    "association_rejected": "association",
    "request_refused": "request",
    "connection_refused": "connection",
    "would_refuse": "",
}


def _all_monitored(policy: Policy) -> Policy:
    """The same rules with every route in monitor mode: ``decide_association`` then lists
    every objection instead of returning the first."""
    return replace(policy, routes=tuple(replace(r, mode=MONITOR) for r in policy.routes))


def _peer_list(peers: Sequence[Peer]) -> str:
    return ", ".join(f"peer {p.ae_title} ({p.where})" for p in peers)


def _fix_certificate(
    peer: Peer, binding: CertificateIdentity, presented: PresentedIdentity | None, tls: bool
) -> str:
    where = f"peer {peer.ae_title}'s certificate binding ({peer.where})"
    if presented is None and tls:
        return f"{where} needs a client certificate: give explain the one it presents (--cert)"
    if presented is None:
        return (
            f"{where} needs a client certificate, which a plain listener never has: connect "
            "through a TLS listener, or remove the binding"
        )
    wanted = [
        f"{key} {value}"
        for key, value in asdict(binding).items()
        if value is not None and not CertificateIdentity(**{key: value}).matches(presented)
    ]
    return f"{where} wants {', '.join(wanted)}: issue a certificate that has it, or change it"


def _not_a_rule(reason: str) -> str:
    if reason.endswith("_exceeded"):
        return (
            "a rate limit or cap: it depends on the traffic at the time, which explain does "
            "not replay; the rules themselves allow it"
        )
    if reason == "tls_handshake_failed":
        return "the TLS handshake failed, before any rule: check the client certificate"
    if reason.startswith("proxy_"):
        return "the listener takes connections only from proxy_from, with a PROXY v2 header"
    if reason.startswith("upstream_"):
        return "the upstream's doing, not a rule's: the rules allow it"
    return "not a rule's doing: the rules allow it"


# -- input -----------------------------------------------------------------------------------


def identity_from_pem(path: Path) -> PresentedIdentity:
    """The identity a client presenting the certificate in ``path`` gets at the relay.

    The certificate is decoded by the decoder ``SSLSocket.getpeercert()`` uses (``_ssl``'s
    ``_test_decode_cert``, which CPython keeps for its own tests) and read by the relay's own
    ``identity_of``: what explain says about it is what the daemon would see.
    """
    try:
        der = x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)
        decoded = _ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]
    except (OSError, ValueError) as error:
        raise BadInput(f"cannot read a PEM certificate from {path}: {error}") from None
    return identity_of(der, decoded)


def attempt_from_arguments(
    listener: str,
    address: str,
    calling_ae: str,
    called_ae: str,
    identity: PresentedIdentity | None,
    contexts: Sequence[str],
    requests: Sequence[str],
) -> Attempt:
    """An association described on the command line: ``--context SOPCLASS[:TS[,TS...]]``,
    ``--request SERVICE:SOPCLASS[:DESTINATION]`` (keywords or UIDs)."""
    try:
        source = ipaddress.ip_address(address)
    except ValueError:
        raise BadInput(f"--from {address!r} is not an IP address") from None
    proposed = [_context(text) for text in contexts]
    asked = [_request(text) for text in requests]
    listed = {context.sop_class for context in proposed}
    proposed += [
        Context(sop_class, DEFAULT_TRANSFER_SYNTAXES)
        for sop_class in dict.fromkeys(r.sop_class for r in asked)
        if sop_class not in listed
    ]
    return Attempt(
        listener,
        source,
        calling_ae.strip(" "),
        called_ae.strip(" "),
        identity,
        tuple(proposed),
        tuple(asked),
    )


def _uid(text: str, kind: str) -> str:
    try:
        return uids.resolve(text, kind)
    except ValueError as error:
        raise BadInput(str(error)) from None


def _context(text: str) -> Context:
    sop_class, _, syntaxes = text.partition(":")
    if not syntaxes:
        return Context(_uid(sop_class, "SOP Class"), DEFAULT_TRANSFER_SYNTAXES)
    listed = tuple(_uid(ts, "Transfer Syntax") for ts in syntaxes.split(","))
    return Context(_uid(sop_class, "SOP Class"), listed)


def _request(text: str) -> Request:
    service, _, rest = text.partition(":")
    sop_class, _, destination = rest.partition(":")
    if service not in SERVICE_COMMANDS or not sop_class:
        raise BadInput(
            f"--request {text!r}: expected SERVICE:SOPCLASS[:DESTINATION], SERVICE one of "
            + ", ".join(SERVICE_COMMANDS)
        )
    if destination and service != "C-MOVE":
        raise BadInput(f"--request {text!r}: only C-MOVE has a destination")
    return Request(service, _uid(sop_class, "SOP Class"), destination or None)


# -- output ----------------------------------------------------------------------------------


def render(explanation: Explanation) -> str:
    """The chain, the verdict and the changes that would allow it, as ``dicomfw explain``
    prints them."""
    attempt = explanation.attempt
    lines: list[str] = []
    if attempt.event:
        said = f": {attempt.reason}" if attempt.reason else ""
        lines.append(f"audit record     {attempt.event} {attempt.time}{said}".rstrip())
    width = max(len(what) for what, _ in explanation.steps) + 2
    lines += [f"{what.ljust(max(width, 17))}{text}" for what, text in explanation.steps]
    lines += [f"note             {note}" for note in explanation.notes]
    answer, refusals = explanation.answer, explanation.refusals
    if not refusals:
        lines.append("\nALLOWED")
    elif answer is not None:
        lines.append(f"\nREFUSED ({answer.why})")
    else:
        lines.append(
            f"\nALLOWED IN MONITOR MODE ONLY: enforce mode would refuse it ({refusals[0].why})"
        )
    fixes = list(dict.fromkeys(r.fix for r in refusals if r.fix))
    if fixes:
        lines.append("to allow it" + (" in enforce mode" if answer is None else "") + ":")
        lines += [f"  - {fix}" for fix in fixes]
    return "\n".join(lines) + "\n"
