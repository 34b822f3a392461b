"""One association through the firewall, as a sans-IO state machine (PS3.8 §9.2 seen from a relay).

Like h11's ``Connection`` or a mitmproxy layer: the relay feeds it what happened (bytes from a
side, upstream connected or failed, a side closed, a timer fired) and it answers with commands
(send these bytes to that side, connect the upstream, close a side) and events for audit and
metrics. It never touches a socket or a clock, so every rule and every refusal is tested on bytes.

States: AWAIT_RQ → (policy) → [AWAIT_LIMITS] → AWAIT_UPSTREAM → AWAIT_AC → ESTABLISHED → CLOSED
(AWAIT_LIMITS only when a shared store decides the limits: ``CheckLimits``). The firewall
answers on its own only with refusals (A-ASSOCIATE-RJ, a failure *-RSP) or an A-ABORT: it never
acknowledges anything the upstream did not.

The contract, which the property tests check on arbitrary input:

* Any bytes, from either side, split into reads any way, end in commands and events, or in one
  A-ABORT of both sides with ``AssociationEnded(why="<side>_protocol_error")`` naming the side
  whose bytes broke the protocol. No other exception leaves the session.
* Nothing follows the end: after ``AssociationEnded`` or ``AssociationRejected`` every input
  answers with no command at all, but for ``upstream_connected``: an upstream connection that
  comes too late is answered ``Close(UPSTREAM)``.
* What a session holds is bounded by its configuration, not by what peers send: the PDU cap
  (one PDU in reassembly per direction), ``MAX_COMMAND_BYTES`` for a command in reassembly,
  ``_MAX_EARLY_BYTES`` before the association is up, ``_MAX_DEFERRED_BYTES`` while a side is not
  read, ``MAX_HELD_BYTES`` of a message held for an answer (a request rate's delay, the shared
  limit store), and ``MAX_QUEUED_REPLY_BYTES`` of the firewall's own answers waiting for the
  upstream's message to end; beyond these the session asks the relay to stop reading that side
  (``PauseReading``), and TCP holds the rest back at the peer. Refused requests are reported
  one by one up to ``REFUSALS_REPORTED_ONE_BY_ONE`` of a kind, then as counts; past
  ``max_refusals`` the requester is cut off.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from mypy_extensions import mypyc_attr

from dicomfw.core import acse, pdu
from dicomfw.core.content import DataSetInspector, Finding, Kind, Message
from dicomfw.core.dimse import (
    C_CANCEL_RQ,
    RESPONSE_BIT,
    DimseCommand,
    encode_cancel,
    encode_response,
    status_class,
)
from dicomfw.core.policy import (
    MONITOR,
    PC_ACCEPTANCE,
    RJ_PERMANENT,
    RJ_SOURCE_PRESENTATION,
    RJ_SOURCE_USER,
    RJ_TRANSIENT,
    RJ_USER_NO_REASON,
    SERVICE_BY_COMMAND,
    Accept,
    Allow,
    IPAddress,
    Policy,
    PresentedIdentity,
    Refuse,
    Reject,
    Route,
)
from dicomfw.core.ratelimit import AssociationQuery, Delay, Gate, LimitQuery
from dicomfw.core.stream import FORWARD, HOLD, SWALLOW, Buffer, DataStream
from dicomfw.errors import LocalProtocolError, RemoteProtocolError

_PENDING_STATUSES: Final = frozenset((0xFF00, 0xFF01))
#: How much a requester may send before the association is up (it should send nothing).
_MAX_EARLY_BYTES: Final = 65_536
#: Round trips a session keeps before it hands its ``RequestTally`` out by itself.
TALLY_ROUND_TRIPS: Final = 256
#: Distinct C-MOVE destinations an association reports (in monitor mode they are the
#: requester's words, not the rules').
MAX_MOVE_DESTINATIONS: Final = 16
#: What a requester may send while it is not read (a request is delayed, or its answers wait):
#: the relay stops reading from it meanwhile, so this only bounds what one read can bring.
_MAX_DEFERRED_BYTES: Final = 8 * 1_048_576
#: The firewall's own answers (refusals) that may wait for the upstream's message toward the
#: requester to end before the requester is no longer read: ~500 refusal responses.
MAX_QUEUED_REPLY_BYTES: Final = 65_536
#: Refused requests of one kind (``why``) an association reports one event each; beyond that
#: they are counted and reported together every ``REFUSAL_REPORT_SECONDS`` and at the end, so a
#: requester cannot fill the log and the audit disk at line rate.
REFUSALS_REPORTED_ONE_BY_ONE: Final = 10
REFUSAL_REPORT_SECONDS: Final = 10.0


class Side(enum.Enum):
    REQUESTER = "requester"  # the association requester (the peer that connected to us)
    UPSTREAM = "upstream"  # the acceptor the route sends it to

    # The session keys its per-side state by Side, about fifteen lookups per DIMSE round trip;
    # Enum's own __hash__ is Python code (hash of the name), this one is C. A member equals only
    # itself, so hashing by identity keeps every dict and set as it was.
    __hash__ = object.__hash__

    @property
    def other(self) -> Side:
        return Side.UPSTREAM if self is Side.REQUESTER else Side.REQUESTER


class State(enum.Enum):
    AWAIT_RQ = "await_rq"
    AWAIT_LIMITS = "await_limits"  # a shared limit store decides (``CheckLimits``)
    AWAIT_UPSTREAM = "await_upstream"
    AWAIT_AC = "await_ac"
    ESTABLISHED = "established"
    CLOSED = "closed"


# ---- commands: what the relay must do --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    side: Side
    data: list[Buffer]


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    upstream: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close a side once what was sent to it has been written."""

    side: Side


@dataclass(frozen=True, slots=True)
class PauseReading:
    """Read nothing more from ``side`` until ``ResumeReading``: what it sent meanwhile waits in
    the session (bounded), and TCP's flow control holds the rest back at the peer."""

    side: Side


@dataclass(frozen=True, slots=True)
class ResumeReading:
    side: Side


@dataclass(frozen=True, slots=True)
class Wakeup:
    """A request is over its rate (``request_limit_action: delay``): it is held, and nothing
    after it read, until ``Session.wakeup`` after ``delay`` seconds. Only this association
    waits."""

    delay: float


@dataclass(frozen=True, slots=True)
class Scan:
    """Hand ``data`` (a data set the route's ``scan`` names, whole) to the external scanner and
    give its verdict to ``Session.scan_done(side, ...)``; meanwhile ``side``'s message is held
    and nothing after it read."""

    side: Side
    data: bytes


@dataclass(frozen=True, slots=True)
class CheckLimits:
    """Ask the shared limit store (``Limiter(shared=True)``) and give its answer to
    ``Session.limits_answered``: a ``Reject`` or None for an ``AssociationQuery``; a
    ``Refuse``, a ``Delay`` or None for a ``RequestQuery``. Meanwhile the association (or
    the request, and what follows it) waits."""

    query: LimitQuery


# ---- events: what happened, for logs, audit and metrics ----------------------------------------


@dataclass(frozen=True, slots=True)
class AssociationRejected:
    calling_ae: str
    called_ae: str
    result: int
    source: int
    reason: int
    why: str
    detail: str
    by_upstream: bool = False


@dataclass(frozen=True, slots=True)
class AssociationAccepted:
    """The upstream accepted; ``refused_contexts`` are (context ID, SOP class UID, why) of those
    the firewall refused, ``contexts`` (SOP class UID, transfer syntax UID) of those accepted
    (what learning rules from an audit trail needs)."""

    route: str
    calling_ae: str
    called_ae: str
    accepted_contexts: int
    refused_contexts: tuple[tuple[int, str, str], ...]
    contexts: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """``count`` refused requests alike: one, or (past ``REFUSALS_REPORTED_ONE_BY_ONE`` of a
    kind) those since the previous report, with ``message_id`` and ``move_destination`` None
    and a SOP class only when it is one the association negotiated. ``move_destination`` is a
    field of its own so that ``dicomfw learn`` and ``explain`` never read it out of ``detail``."""

    service: str  # "unknown" for a command field that is no DIMSE request
    sop_class: str
    status: int
    why: str
    detail: str
    message_id: int | None
    count: int = 1
    move_destination: str | None = None  # a C-MOVE's, as received


@dataclass(frozen=True, slots=True)
class WouldRefuse:
    """What enforce mode would have refused, in monitor mode, where it goes on as if allowed.

    ``stage``: association, context, request or limit; ``why`` and ``detail`` as enforce mode
    would report them; ``answer`` what it would have sent (``A-ASSOCIATE-RJ 1/1/3``, a context
    result, a DIMSE status). Reported like refusals: ten of a kind one by one, then counted.
    """

    stage: str
    why: str
    detail: str
    answer: str
    service: str = ""
    sop_class: str = ""
    count: int = 1
    move_destination: str | None = None  # a request's C-MOVE destination, as received


@dataclass(frozen=True, slots=True)
class ContentRefused:
    """Content validation refused a data set of ``side``'s message (check names are a fixed
    set: ``dicomfw.core.content.CHECKS``). ``action``: ``refused`` (a request, answered with
    ``status``), ``replaced`` (a response: the other side got a failure with ``status``
    instead; a pending one also cancelled its request), ``aborted`` (found after forwarding
    began: both sides aborted, ``status`` 0). Reported like refusals: ten of a kind one by one,
    then counted."""

    side: str
    service: str
    sop_class: str
    check: str
    kind: str
    status: int
    action: str
    detail: str
    message_id: int | None
    count: int = 1

    @property
    def why(self) -> str:
        return self.check


@dataclass(frozen=True, slots=True)
class Scanned:
    """What the external scanner said of a data set: ``clean``, ``found`` (``detail`` names the
    signature), ``error`` (it could not answer: the route's ``fail`` decided), or ``skipped``
    (larger than the scanner takes)."""

    side: str
    service: str
    sop_class: str
    result: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """The upstream answered a request with a failure status (counted in ``RequestTally`` too;
    this event is for the audit record of the failure)."""

    service: str
    sop_class: str
    status: int
    message_id: int | None = None


#: The status classes of final responses ``OperationCounts`` counts (one field each).
ANSWER_CLASSES: Final = ("success", "warning", "failure", "cancel")


@dataclass(slots=True)
class OperationCounts:
    """Requests of one service and SOP class: forwarded, and final responses by status class."""

    forwarded: int = 0
    success: int = 0
    warning: int = 0
    failure: int = 0
    cancel: int = 0

    @property
    def completed(self) -> int:
        return self.success + self.warning + self.failure + self.cancel


class RequestTally:
    """What the forwarded requests of one association came to since its previous tally.

    Counting happens here, in the session, so that the relay calls its observers about once
    per second per association rather than twice per request: observer calls on the event
    loop cost 5-17 µs per C-ECHO, a tenth of its round trip. The relay takes the tally
    (``Session.take_tally``) every second and before the association's end event; the session
    hands it out by itself after ``TALLY_ROUND_TRIPS`` round trips, which bounds its size.
    Observers only read it.
    """

    __slots__ = ("counts", "move_destinations", "round_trips")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], OperationCounts] = {}  # (service, SOP class UID)
        #: (service, seconds from forwarding the request to its final response); empty when
        #: the session has no clock
        self.round_trips: list[tuple[str, float]] = []
        #: C-MOVE destinations of the forwarded requests (new ones of the association, bounded)
        self.move_destinations: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.counts)

    def __repr__(self) -> str:
        return (
            f"RequestTally(counts={self.counts!r}, round_trips={self.round_trips!r}, "
            f"move_destinations={self.move_destinations!r})"
        )

    def of(self, service: str, sop_class: str) -> OperationCounts:
        counts = self.counts.get((service, sop_class))
        if counts is None:
            counts = self.counts[(service, sop_class)] = OperationCounts()
        return counts


@dataclass(frozen=True, slots=True)
class AssociationEnded:
    """``how`` is 'released', 'aborted', 'closed' (during set-up, nothing to abort) or 'probe'
    (connected and closed without sending a byte: a health check); ``why`` is stable,
    ``detail`` human."""

    how: str
    why: str
    detail: str = ""


Event = (
    AssociationRejected
    | AssociationAccepted
    | RequestRefused
    | ContentRefused
    | Scanned
    | WouldRefuse
    | RequestFailed
    | RequestTally
    | AssociationEnded
)
Command = (
    Send
    | ConnectUpstream
    | Close
    | Wakeup
    | CheckLimits
    | Scan
    | PauseReading
    | ResumeReading
    | Event
)


def _zero() -> float:
    return 0.0


def _peer_name(decision: Accept | Reject) -> str | None:
    """The AE title the limits count an accepted association under ("" for a calling AE no
    peer has, let through in monitor mode); None when the policy rejected it."""
    if isinstance(decision, Reject):
        return None
    return decision.peer.ae_title if decision.peer is not None else ""


def _service_name(command_field: int) -> str:
    """The DIMSE service of a request or response command field ("unknown" for others)."""
    return SERVICE_BY_COMMAND.get(command_field & ~RESPONSE_BIT, "unknown")


def content_status(kind: Kind, command_field: int) -> int:
    """The status a refused data set is answered with, by what was wrong and the service
    (PS3.4 C-STORE B.2.3, C-FIND C.4.1.1.4, C-MOVE/C-GET C.4.2.1.5/C.4.3.1.4; PS3.7 C.4 for the
    N-services): cannot understand / unable to process 0xC000, data set or identifier does
    not match SOP class 0xA900, SOP class not supported 0x0122, out of resources 0xA700
    (0xA701 for C-MOVE and C-GET, resource limitation 0x0213 for N-services), refused: not
    authorized 0x0124."""
    service = command_field & ~RESPONSE_BIT
    n_service = service >= 0x0100
    if kind is Kind.MALFORMED:
        return 0x0110 if n_service else 0xC000  # N: processing failure
    if kind is Kind.MISMATCH:
        return 0x0106 if n_service else 0xA900  # N: invalid attribute value
    if kind is Kind.UNSUPPORTED:
        return 0x0122
    if kind is Kind.TOO_LARGE:
        if n_service:
            return 0x0213
        return 0xA701 if service in (0x0010, 0x0021) else 0xA700
    return 0x0124


def _would_refuse_request(stage: str, refusal: Refuse, hold: _Hold) -> WouldRefuse:
    service = _service_name(hold.command.command_field)
    answer = f"0x{refusal.status:04X}" if refusal.status else "delayed"
    return WouldRefuse(
        stage,
        refusal.why,
        refusal.detail,
        answer,
        service,
        hold.sop_class,
        move_destination=hold.command.move_destination,
    )


class _Hold:
    """A message one side's stream holds (``HOLD``) until every answer it waits for has come:
    a request rate's delay, the shared limit store's answer, content validation of its data
    set's first part. At most one per side: the messages of a direction follow each other.
    Once forwarded, what follows of its data set is still inspected until it ends."""

    __slots__ = (
        "command",
        "context_id",
        "delayed",
        "ended",
        "forwarded",
        "held",
        "inspector",
        "scan",
        "sop_class",
        "waiting",
    )

    def __init__(self, context_id: int, command: DimseCommand, sop_class: str) -> None:
        self.context_id = context_id
        self.command = command
        self.sop_class = sop_class
        self.delayed = False  # a ``Wakeup`` is due
        self.waiting = False  # the shared limit store's answer is due
        self.inspector: DataSetInspector | None = None  # content validation of its data set
        #: the whole data set for the external scanner, until it has answered (None: no scan)
        self.scan: bytearray | None = None
        self.held = 0  # data-set bytes held
        self.ended = False  # the whole message has been read
        self.forwarded = False

    @property
    def ready(self) -> bool:
        return not (self.delayed or self.waiting or self.scan is not None)


class _ContentAbort(Exception):
    """A violation found after the message began to go out: the association cannot go on."""

    def __init__(self, side: Side, hold: _Hold, finding: Finding) -> None:
        super().__init__(finding.detail)
        self.side, self.hold, self.finding = side, hold, finding


#: SOP classes of encapsulated documents (PDF, CDA, STL, OBJ, MTL: PS3.4 Annex B.5), the
#: data sets ``scan: documents`` hands the scanner.
_DOCUMENTS: Final = "1.2.840.10008.5.1.4.1.1.104."
#: What a message held for an answer may buffer before its side is no longer read.
MAX_HELD_BYTES: Final = 1_048_576


class _CutOff(Exception):
    """The requester's refused requests passed ``max_refusals``: abort the association."""


# Compiled by mypyc (setup.py); a test subclasses it to inject an internal error.
@mypyc_attr(allow_interpreted_subclasses=True)
class Session:
    """The state machine for one association. Not thread-safe; one per connection."""

    def __init__(
        self,
        policy: Policy,
        listener: str,
        address: IPAddress,
        identity: PresentedIdentity | None,
        max_pdu_length: int,
        gate: Gate | None = None,
        clock: Callable[[], float] | None = None,
        max_refusals: int = 0,
    ) -> None:
        """``gate`` enforces the rate limits and caps; the session asks it at the
        A-ASSOCIATE-RQ and at each request. ``clock`` (monotonic seconds, precise enough to
        time a C-ECHO) is what the gate and the request round trips are measured with; a gate
        needs it, round trips are left out without it. ``max_refusals``: refused requests an
        association may collect before it is aborted (0: no limit)."""
        if gate is not None and clock is None:
            raise LocalProtocolError("a Session with a rate-limit gate needs a clock")
        self.policy = policy
        self.listener = listener
        self.address = address
        self.identity = identity
        self.state = State.AWAIT_RQ
        self.route: Route | None = None
        self.calling_ae = ""
        self.called_ae = ""
        self._max_pdu = max_pdu_length
        self._setup = pdu.PduBuffer(max_pdu_length)
        self._early = bytearray()  # requester bytes that arrived before the association was up
        self._spoke = False  # the requester sent a byte
        self._rq: acse.AssociateRQ | None = None
        self._upstream_rq = b""
        self._narrowed: dict[int, tuple[str, ...]] = {}  # transfer syntaxes proposed upstream
        self._refused_contexts: dict[int, int] = {}
        self._refused_why: dict[int, str] = {}
        self._abstract_syntax: dict[int, str] = {}
        self._to_requester: DataStream | None = None
        self._to_upstream: DataStream | None = None
        self._outstanding: dict[int, tuple[str, str, float]] = {}  # (service, SOP, sent at)
        self._tally = RequestTally()
        self._destinations: set[str] = set()  # C-MOVE destinations reported so far
        self._released = False
        self._replies: list[Buffer] = []  # firewall-made PDUs for the requester, in order
        self._events: list[Command] = []  # events raised while a stream is being fed
        self._gate = gate
        self._clock: Callable[[], float] = clock or _zero
        self._timed = clock is not None  # round trips are measured
        self._holds: dict[Side, _Hold] = {}  # the message each side's stream holds
        self._transfer_syntax: dict[int, str] = {}  # accepted context ID -> its transfer syntax
        #: message IDs whose responses from that side are dropped: we cancelled the request
        #: after refusing one of its responses
        self._cancelled: dict[Side, set[int]] = {Side.REQUESTER: set(), Side.UPSTREAM: set()}
        self._upstream_replies: list[Buffer] = []  # firewall-made PDUs for the upstream
        self._pending_rq: tuple[Accept | Reject, bytes] | None = None  # during AWAIT_LIMITS
        self._backlog = False  # too many of our answers wait: the requester is not read
        #: A side's message is held until an answer comes from outside (``settle``): nothing
        #: more of that side is read meanwhile.
        self._settling: set[Side] = set()
        #: What the relay was last told about reading each side (see ``_flow``).
        self._told_reading = {Side.REQUESTER: True, Side.UPSTREAM: True}
        #: What a side sent while it was not read.
        self._deferred = {Side.REQUESTER: bytearray(), Side.UPSTREAM: bytearray()}
        self._max_refusals = max_refusals
        self._refusals = 0
        self._reported_by_why: dict[tuple[str, str], int] = {}  # (event type, why) -> reported
        #: refusals not reported one by one, as their event with neither detail nor message ID
        #: -> how many
        self._unreported: dict[RequestRefused | ContentRefused | WouldRefuse, int] = {}
        self._reported_at = self._clock()

    # ---- inputs --------------------------------------------------------------------------------

    def receive(self, side: Side, data: bytes) -> list[Command]:
        """Bytes arrived from ``side``."""
        if self.state is State.ESTABLISHED:
            if not self._reading(side):
                deferred = self._deferred[side]
                deferred += data
                if len(deferred) > _MAX_DEFERRED_BYTES:
                    return self._fail(side, RemoteProtocolError("too much data while paused"))
                return []
            return self._feed(side, data)
        try:
            if self.state is State.AWAIT_RQ and side is Side.REQUESTER:
                return self._await_rq(data)
            if self.state is State.AWAIT_AC and side is Side.UPSTREAM:
                return self._await_ac(data)
            if side is Side.REQUESTER and self.state in (
                State.AWAIT_LIMITS,
                State.AWAIT_UPSTREAM,
                State.AWAIT_AC,
            ):
                self._early += data
                if len(self._early) > _MAX_EARLY_BYTES:
                    raise RemoteProtocolError("requester sent data before the A-ASSOCIATE-AC", 2)
                return []
            return []  # CLOSED: late bytes are dropped
        except RemoteProtocolError as error:
            return self._fail(side, error)

    def take_report(self, final: bool = False) -> list[Event]:
        """What to report since the last call: the requests counted (a ``RequestTally``), and
        the refusals counted instead of reported one by one, once ``REFUSAL_REPORT_SECONDS``
        have passed since their previous report or when ``final`` (the association ends)."""
        report: list[Event] = []
        if self._tally:
            report.append(self._tally)
            self._tally = RequestTally()
        if self._unreported and (
            final or self._clock() - self._reported_at >= REFUSAL_REPORT_SECONDS
        ):
            for event, count in self._unreported.items():
                detail = f"{count} more refused for the same reason"
                if isinstance(event, WouldRefuse):
                    detail = f"{count} more would have been refused for the same reason"
                report.append(replace(event, detail=detail, count=count))
            self._unreported = {}
            self._reported_at = self._clock()
        return report

    @property
    def holding(self) -> bool:
        """A delayed request waits for ``wakeup`` (waiting for it is not idleness)."""
        hold = self._holds.get(Side.REQUESTER)
        return hold is not None and hold.delayed

    def wakeup(self) -> list[Command]:
        """The ``Wakeup`` delay has passed: forward the held request, then what the requester
        sent meanwhile (which may hold again)."""
        hold = self._holds.get(Side.REQUESTER)
        if hold is None or not hold.delayed or self.state is not State.ESTABLISHED:
            return []
        hold.delayed = False
        return self._answered(Side.REQUESTER, hold)

    def limits_answered(self, answer: Reject | Refuse | Delay | None) -> list[Command]:
        """The shared limit store's answer to the last ``CheckLimits``."""
        if self.state is State.AWAIT_LIMITS:
            assert self._pending_rq is not None and self._rq is not None
            (decision, rest), self._pending_rq = self._pending_rq, None
            over = answer if isinstance(answer, Reject) else None
            return self._admit(self._rq, decision, over, rest)
        hold = self._holds.get(Side.REQUESTER)
        if self.state is not State.ESTABLISHED or hold is None or not hold.waiting:
            return []  # the association ended meanwhile
        hold.waiting = False
        assert self.route is not None
        monitor = self.route.mode == MONITOR
        if isinstance(answer, Refuse) and monitor:
            self._report(_would_refuse_request("limit", answer, hold))
        elif isinstance(answer, Refuse):
            return self._refuse_held(hold, answer)
        elif isinstance(answer, Delay) and answer.seconds and not monitor:
            hold.delayed = True
            return [Wakeup(answer.seconds)]
        return self._answered(Side.REQUESTER, hold)

    def upstream_connected(self) -> list[Command]:
        if self.state is not State.AWAIT_UPSTREAM:
            return [Close(Side.UPSTREAM)]
        self.state = State.AWAIT_AC
        self._setup = pdu.PduBuffer(self._max_pdu)
        return [Send(Side.UPSTREAM, [self._upstream_rq])]

    def upstream_failed(self, detail: str, why: str = "upstream_unreachable") -> list[Command]:
        """The upstream could not be reached: a transient refusal the modality will retry.

        ``why`` says how, from the relay's fixed set: upstream_unreachable (down, refusing,
        silent), upstream_certificate_invalid (its certificate did not verify),
        upstream_tls_failed (the TLS handshake failed otherwise, e.g. it refused ours). The
        requester's A-ASSOCIATE-RJ is the same for all: it can only retry later."""
        if self.state is not State.AWAIT_UPSTREAM:
            return []
        return self._reject(Reject(RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, 1, why, detail))

    def connection_lost(self, side: Side) -> list[Command]:
        """``side`` closed its connection (or it broke)."""
        if self.state is State.CLOSED:
            return []
        previous = self.state
        self.state = State.CLOSED
        if previous in (State.AWAIT_RQ, State.AWAIT_LIMITS, State.AWAIT_UPSTREAM) or (
            side is Side.UPSTREAM and (previous is State.AWAIT_AC)
        ):
            commands: list[Command] = [Close(Side.REQUESTER)]
            how = "closed"
            if previous is State.AWAIT_AC:  # the requester is told: its association is gone
                commands.insert(0, Send(Side.REQUESTER, [pdu.abort()]))
                how = "aborted"
            if previous not in (State.AWAIT_RQ, State.AWAIT_LIMITS):
                commands.append(Close(Side.UPSTREAM))
            if previous is State.AWAIT_RQ and not self._spoke:
                # connect and close, not a byte sent: a balancer's or a monitor's health check
                return [*commands, AssociationEnded("probe", "closed_without_a_byte")]
            return [*commands, AssociationEnded(how, f"{side.value}_closed_during_setup")]
        if self._released:
            return [Close(side.other), AssociationEnded("released", "released")]
        return [
            Send(side.other, [pdu.abort()]),
            Close(side.other),
            AssociationEnded("aborted", f"{side.value}_connection_lost"),
        ]

    def timed_out(self, timer: str) -> list[Command]:
        """A timer the relay runs for us expired: 'artim' (no A-ASSOCIATE-RQ) or 'idle'."""
        if self.state is State.CLOSED:
            return []
        if self.state is State.AWAIT_RQ:
            self.state = State.CLOSED  # PS3.8 §9.1.5: ARTIM expiry closes the transport
            return [Close(Side.REQUESTER), AssociationEnded("closed", f"{timer}_timeout")]
        return self.abort(f"{timer}_timeout", f"no traffic within the {timer} timeout")

    def abort(self, why: str, detail: str = "") -> list[Command]:
        """The relay gives up on this association (shutdown, internal error): A-ABORT all."""
        if self.state is State.CLOSED:
            return []
        return self._abort(None, pdu.ABORT_REASON_NOT_SPECIFIED, why, detail)

    # ---- association set-up --------------------------------------------------------------------

    def _await_rq(self, data: bytes) -> list[Command]:
        self._spoke = self._spoke or bool(data)
        pdus = self._setup.feed(data)
        if not pdus:
            return []
        pdu_type, raw = pdus[0]
        if pdu_type != pdu.A_ASSOCIATE_RQ:
            raise RemoteProtocolError(
                f"expected A-ASSOCIATE-RQ, got {pdu.PDU_NAMES[pdu_type]}", pdu.ABORT_UNEXPECTED_PDU
            )
        rq = acse.decode_rq(raw)
        self._rq = rq
        self.calling_ae, self.called_ae = rq.calling_ae, rq.called_ae
        decision = self.policy.decide_association(
            self.listener, self.address, rq.calling_ae, rq.called_ae, self.identity
        )
        rest = self._rest_after(pdus)
        gate = self._gate
        monitor = isinstance(decision, Accept) and decision.route.mode == MONITOR
        peer = _peer_name(decision)
        if gate is not None and gate.shared:
            source = gate.source_key
            assert source is not None
            self._pending_rq = (decision, rest)
            self.state = State.AWAIT_LIMITS
            return [CheckLimits(AssociationQuery(self.listener, source, peer, not monitor))]
        # The address's association rate comes first (in enforce mode the answer), so it also
        # slows down AE title guessing.
        over = gate.source(self._clock()) if gate is not None else None
        if over is None and gate is not None and peer is not None:
            over = gate.admit(peer, self._clock(), enforce=not monitor)
        return self._admit(rq, decision, over, rest)

    def _admit(
        self, rq: acse.AssociateRQ, decision: Accept | Reject, over: Reject | None, rest: bytes
    ) -> list[Command]:
        """The policy's and the limits' answers to an A-ASSOCIATE-RQ: reject, or go upstream
        (in monitor mode with what enforce mode would have rejected it for)."""
        monitor = isinstance(decision, Accept) and decision.route.mode == MONITOR
        if over is not None and not monitor:
            return self._reject(over)
        if isinstance(decision, Reject):
            return self._reject(decision)
        gate = self._gate
        peer = _peer_name(decision)
        if gate is not None and gate.shared and peer is not None:
            # the store admitted it: count it here too, for when the store cannot answer
            gate.admit(peer, self._clock(), enforce=False)
        objections = [("association", reject) for reject in decision.objections]
        if over is not None:
            objections.append(("limit", over))
        for stage, reject in objections:
            answer = f"A-ASSOCIATE-RJ {reject.result}/{reject.source}/{reject.reason}"
            self._report(WouldRefuse(stage, reject.why, reject.detail, answer))
        return self._propose_upstream(rq, decision, rest)

    def _propose_upstream(self, rq: acse.AssociateRQ, accept: Accept, rest: bytes) -> list[Command]:
        route = accept.route
        self.route = route
        kept: list[acse.ProposedContext] = []
        allowed = 0  # contexts enforce mode would keep
        for context in rq.contexts:
            self._abstract_syntax[context.context_id] = context.abstract_syntax
            verdict = self.policy.filter_context(
                route, context.context_id, context.abstract_syntax, context.transfer_syntaxes
            )
            if verdict.result == PC_ACCEPTANCE:
                allowed += 1
                kept.append(acse.narrow(context, verdict.transfer_syntaxes))
                self._narrowed[context.context_id] = verdict.transfer_syntaxes
            elif route.mode == MONITOR:  # proposed as the requester proposed it
                kept.append(context)
                self._narrowed[context.context_id] = context.transfer_syntaxes
                self._report(
                    WouldRefuse(
                        "context",
                        verdict.why,
                        f"presentation context {context.context_id}",
                        f"presentation context result {verdict.result}",
                        sop_class=context.abstract_syntax,
                    )
                )
            else:
                self._refused_contexts[context.context_id] = verdict.result
                self._refused_why[context.context_id] = verdict.why
        if not allowed:
            no_context = Reject(
                RJ_PERMANENT,
                RJ_SOURCE_USER,
                RJ_USER_NO_REASON,
                "no_context_allowed",
                "no proposed presentation context is allowed on route " + repr(route.name),
            )
            if not kept:
                return self._reject(no_context)
            self._report(
                WouldRefuse(
                    "association", no_context.why, no_context.detail, "A-ASSOCIATE-RJ 1/1/1"
                )
            )
        upstream_rq = replace(
            rq,
            called_ae=route.upstream_called_ae or rq.called_ae,
            calling_ae=route.upstream_calling_ae or rq.calling_ae,
        )
        self._upstream_rq = acse.encode_rq(upstream_rq, tuple(kept), self._max_pdu)
        self._early += rest
        self.state = State.AWAIT_UPSTREAM
        events, self._events = self._events, []
        return [*events, ConnectUpstream(route.upstream)]

    def _await_ac(self, data: bytes) -> list[Command]:
        pdus = self._setup.feed(data)
        if not pdus:
            return []
        pdu_type, raw = pdus[0]
        assert self._rq is not None and self.route is not None
        if pdu_type == pdu.A_ASSOCIATE_RJ:
            result, source, reason = pdu.rj_fields(raw)
            self.state = State.CLOSED
            return [
                Send(Side.REQUESTER, [raw]),
                Close(Side.REQUESTER),
                Close(Side.UPSTREAM),
                AssociationRejected(
                    self.calling_ae,
                    self.called_ae,
                    result,
                    source,
                    reason,
                    "upstream_rejected",
                    "the upstream rejected the association",
                    True,
                ),
            ]
        if pdu_type == pdu.A_ABORT:
            self.state = State.CLOSED
            return [
                Send(Side.REQUESTER, [raw]),
                Close(Side.REQUESTER),
                Close(Side.UPSTREAM),
                AssociationEnded("aborted", "upstream_aborted_setup"),
            ]
        if pdu_type != pdu.A_ASSOCIATE_AC:
            raise RemoteProtocolError(
                f"expected A-ASSOCIATE-AC, got {pdu.PDU_NAMES[pdu_type]}", pdu.ABORT_UNEXPECTED_PDU
            )
        ac = acse.decode_ac(raw)
        offered = {c.context_id for c in self._rq.contexts} - set(self._refused_contexts)
        answered = {c.context_id for c in ac.contexts}
        if not answered <= offered:
            raise RemoteProtocolError(
                f"upstream answered presentation contexts it was not offered: "
                f"{sorted(answered - offered)}",
                pdu.ABORT_INVALID_PARAMETER,
            )
        for context in ac.contexts:
            if (
                context.result == PC_ACCEPTANCE
                and context.transfer_syntax not in self._narrowed[context.context_id]
            ):
                raise RemoteProtocolError(
                    f"upstream accepted presentation context {context.context_id} with transfer "
                    f"syntax {context.transfer_syntax!r}, which it was not offered",
                    pdu.ABORT_INVALID_PARAMETER,
                )
        accepted = frozenset(c.context_id for c in ac.contexts if c.result == PC_ACCEPTANCE)
        self._to_upstream = DataStream(
            accepted, self._max_pdu, self._decide_request, self._inspect_request
        )
        self._to_requester = DataStream(
            accepted, self._max_pdu, self._observe_upstream, self._inspect_response
        )
        self._transfer_syntax = {
            c.context_id: c.transfer_syntax for c in ac.contexts if c.result == PC_ACCEPTANCE
        }
        self.state = State.ESTABLISHED
        ac_for_requester = acse.encode_ac_for_requester(
            raw, ac, self._rq, self._refused_contexts, self._max_pdu
        )
        commands: list[Command] = [
            Send(Side.REQUESTER, [ac_for_requester]),
            AssociationAccepted(
                self.route.name,
                self.calling_ae,
                self.called_ae,
                len(accepted),
                tuple(
                    (cid, self._abstract_syntax[cid], self._refused_why[cid])
                    for cid in sorted(self._refused_contexts)
                ),
                tuple(
                    (self._abstract_syntax[c.context_id], c.transfer_syntax)
                    for c in ac.contexts
                    if c.result == PC_ACCEPTANCE
                ),
            ),
        ]
        # What only the set-up needed is not kept for the association's lifetime: a modality's
        # request with 128 contexts is ~55 KB of objects, per open association.
        self._rq = None
        self._upstream_rq = b""
        self._refused_contexts, self._refused_why, self._narrowed = {}, {}, {}
        self._abstract_syntax = {cid: self._abstract_syntax[cid] for cid in accepted}
        # Each side's bytes that came early are its own: an error in them is that side's.
        rest = self._rest_after(pdus)
        if rest:
            commands += self._feed(Side.UPSTREAM, rest)
        if self._early and self.state is State.ESTABLISHED:
            early, self._early = bytes(self._early), bytearray()
            commands += self._feed(Side.REQUESTER, early)
        return commands

    def _rest_after(self, pdus: list[tuple[int, bytes]]) -> bytes:
        """What followed the set-up PDU in the same reads: more whole PDUs, then a partial one."""
        return b"".join(raw for _, raw in pdus[1:]) + self._setup.take_rest()

    def _reject(self, reject: Reject) -> list[Command]:
        self.state = State.CLOSED
        return [
            Send(Side.REQUESTER, [pdu.associate_rj(reject.result, reject.source, reject.reason)]),
            Close(Side.REQUESTER),
            AssociationRejected(
                self.calling_ae,
                self.called_ae,
                reject.result,
                reject.source,
                reject.reason,
                reject.why,
                reject.detail,
            ),
        ]

    # ---- data phase ----------------------------------------------------------------------------

    def _feed(self, side: Side, data: bytes) -> list[Command]:
        """The data phase for ``side``'s bytes; whatever goes wrong in them is ``side``'s."""
        try:
            return self._data_phase(side, data)
        except RemoteProtocolError as error:
            return self._fail(side, error)
        except _CutOff as cut:
            return self._end_feed(
                Side.REQUESTER, pdu.ABORT_REASON_NOT_SPECIFIED, "too_many_refusals", str(cut)
            )
        except _ContentAbort as late:
            self._report(self._content_event(late.side, late.hold, late.finding, "aborted", 0))
            detail = f"{late.finding.check}: {late.finding.detail}"
            reason = pdu.ABORT_REASON_NOT_SPECIFIED
            return self._end_feed(late.side, reason, "content_violation", detail)

    def _fail(self, side: Side, error: RemoteProtocolError) -> list[Command]:
        """``side`` broke the protocol: A-ABORT both sides."""
        return self._end_feed(side, error.abort_reason, f"{side.value}_protocol_error", str(error))

    def _end_feed(self, culprit: Side, reason: int, why: str, detail: str) -> list[Command]:
        """A-ABORT both sides in the middle of a read, after what the read already produced for
        the requester and the observers: the refusals answered and reported before the end
        are the same however the requester's bytes were split into reads."""
        events, self._events = self._events, []
        answered: list[Command] = [Send(Side.REQUESTER, self._replies)] if self._replies else []
        if self._upstream_replies:
            answered.append(Send(Side.UPSTREAM, self._upstream_replies))
        return [*answered, *events, *self._abort(culprit, reason, why, detail)]

    def _data_phase(self, side: Side, data: bytes) -> list[Command]:
        stream = self._to_upstream if side is Side.REQUESTER else self._to_requester
        assert stream is not None and self._to_requester is not None
        self._events = []
        forwarded = stream.feed(data)
        unread = stream.take_unread()
        if unread:  # the stream halted (our answers pile up, a message is held): the rest waits
            self._deferred[side][:0] = unread
        if stream.waiting:  # a held message has ended: nothing more until its answer
            self._settling.add(side)
        commands: list[Command] = []
        if forwarded:
            commands.append(Send(side.other, forwarded))
        commands += self._take_replies()
        commands += self._events
        self._events = []
        if stream.control_pdus:
            commands += self._control(side, stream.control_pdus)
            stream.control_pdus.clear()
        if self.state is not State.ESTABLISHED:
            return commands
        # Our answers wait for the upstream's message toward the requester to end: past a
        # bound, stop reading the requester until every one of them has gone out.
        queued = self._to_requester.queued_bytes
        if side is Side.REQUESTER:
            self._backlog = queued > MAX_QUEUED_REPLY_BYTES
        elif not queued:
            self._backlog = False
        return commands + self._flow()

    def _reading(self, side: Side) -> bool:
        if side is Side.REQUESTER and self._backlog:
            return False
        return side not in self._settling

    def _flow(self) -> list[Command]:
        """Once a side may be read again, what it sent meanwhile comes first; then the relay is
        told whether to read each side, where that changed since it was last told."""
        commands: list[Command] = []
        for side in (Side.REQUESTER, Side.UPSTREAM):
            deferred = self._deferred[side]
            if deferred and self._reading(side) and self.state is State.ESTABLISHED:
                self._deferred[side] = bytearray()
                commands += self._feed(side, bytes(deferred))
        for side in (Side.REQUESTER, Side.UPSTREAM):
            reading = self._reading(side)
            if self.state is State.ESTABLISHED and reading is not self._told_reading[side]:
                self._told_reading[side] = reading
                commands.append(ResumeReading(side) if reading else PauseReading(side))
        return commands

    def _control(self, side: Side, pdu_types: list[int]) -> list[Command]:
        """React to release/abort PDUs that were just forwarded from ``side``."""
        commands: list[Command] = []
        for pdu_type in pdu_types:
            if pdu_type == pdu.A_ABORT:
                self.state = State.CLOSED
                commands += [
                    Close(Side.REQUESTER),
                    Close(Side.UPSTREAM),
                    AssociationEnded("aborted", f"{side.value}_aborted"),
                ]
                break
            if pdu_type == pdu.A_RELEASE_RP:
                self._released = True
        return commands

    def _decide_request(self, context_id: int, command: DimseCommand) -> int:
        """A command from the requester: a request policy must allow, or a reply passing (its
        data set inspected when the route validates content)."""
        if command.is_response or command.command_field == C_CANCEL_RQ:
            if command.is_response and command.message_id in self._cancelled[Side.REQUESTER]:
                if command.status not in _PENDING_STATUSES:
                    self._cancelled[Side.REQUESTER].discard(command.message_id or 0)
                return SWALLOW
            return self._hold_for_inspection(Side.REQUESTER, context_id, command)
        route = self.route
        assert route is not None
        monitor = route.mode == MONITOR
        service = SERVICE_BY_COMMAND.get(command.command_field)
        sop_class = command.sop_class or self._abstract_syntax.get(context_id, "")
        stage = "request"
        if service is None:
            refusal: Refuse | None = Refuse(
                0x0211, "unrecognized_operation", f"command 0x{command.command_field:04x}"
            )
        else:
            verdict = self.policy.decide_request(
                route, service, sop_class, command.move_destination
            )
            refusal = None if isinstance(verdict, Allow) else verdict
        hold: _Hold | None = None
        gate = self._gate
        if refusal is None and service is not None and gate is not None:
            metered = gate.request(service, self._clock())
            if isinstance(metered, Refuse):
                refusal, stage = metered, "limit"
            elif isinstance(metered, Delay) and monitor:
                delayed = Refuse(0, "request_rate_exceeded", f"would wait {metered.seconds:.1f} s")
                self._report(
                    WouldRefuse(
                        "limit",
                        delayed.why,
                        delayed.detail,
                        "delayed",
                        service,
                        move_destination=command.move_destination,
                    )
                )
            elif isinstance(metered, Delay):
                hold = _Hold(context_id, command, sop_class)
                hold.delayed = True
                self._events.append(Wakeup(metered.seconds))
            query = None if refusal is not None else gate.shared_request(service, not monitor)
            if query is not None:
                hold = hold or _Hold(context_id, command, sop_class)
                hold.waiting = True
                self._events.append(CheckLimits(query))
        if refusal is not None and monitor:
            stand_in = _Hold(context_id, command, sop_class)
            self._report(_would_refuse_request(stage, refusal, stand_in))
            refusal = None
        if refusal is not None:
            self._refuse_request(context_id, command, sop_class, refusal)
            if self._to_requester is not None and (
                self._to_requester.queued_bytes > MAX_QUEUED_REPLY_BYTES
            ):
                assert self._to_upstream is not None
                self._to_upstream.halt()  # read no more of the requester until they have gone
            return SWALLOW
        inspector = self._inspector(context_id, command)
        if inspector is not None:
            hold = hold or _Hold(context_id, command, sop_class)
            hold.inspector = inspector
            hold.scan = self._scan_buffer(command)
        if hold is not None:
            self._holds[Side.REQUESTER] = hold
            return HOLD
        self._forwarded(context_id, command, sop_class)
        return FORWARD

    def _forwarded(self, context_id: int, command: DimseCommand, sop_class: str) -> None:
        """A request of the requester goes to the upstream: count it, time its answer."""
        service = SERVICE_BY_COMMAND.get(command.command_field)
        if command.message_id is not None and service is not None:
            self._outstanding[command.message_id] = (service, sop_class, self._clock())
            self._tally.of(service, sop_class).forwarded += 1
        destination = command.move_destination
        if (
            service == "C-MOVE"
            and destination
            and destination not in self._destinations
            and len(self._destinations) < MAX_MOVE_DESTINATIONS
        ):
            self._destinations.add(destination)
            self._tally.move_destinations.add(destination)

    def _count_refusal(self) -> None:
        """One more request of the requester refused; past ``max_refusals`` it is cut off."""
        self._refusals += 1
        if self._max_refusals and self._refusals > self._max_refusals:
            raise _CutOff(f"more than {self._max_refusals} requests refused on one association")

    def _refuse_request(
        self, context_id: int, command: DimseCommand, sop_class: str, refusal: Refuse
    ) -> None:
        """Answer a request of the requester ourselves, with ``refusal``'s status; past
        ``max_refusals`` cut the requester off instead (``_CutOff``)."""
        self._count_refusal()
        # The Error Comment tells the modality's operator it was the firewall, without
        # revealing rule names to whoever is on the other end.
        response = encode_response(command, refusal.status, f"dicomfw: {refusal.why}")
        self._reply(Side.REQUESTER, context_id, response)
        self._report(
            RequestRefused(
                SERVICE_BY_COMMAND.get(command.command_field, "unknown"),
                sop_class,
                refusal.status,
                refusal.why,
                refusal.detail,
                command.message_id,
                move_destination=command.move_destination,
            )
        )

    def _inspector(self, context_id: int, command: DimseCommand) -> DataSetInspector | None:
        """Content validation for a message's data set, when its route validates content."""
        route = self.route
        content = route.content if route is not None else None
        if content is None or not command.has_data_set:
            return None
        message = Message(
            command.command_field,
            command.sop_class,
            command.sop_instance,
            self._abstract_syntax.get(context_id, ""),
            self._transfer_syntax.get(context_id, ""),
        )
        return DataSetInspector(content.rules, message)

    def _inspect_request(self, fragment: memoryview, last: bool) -> int:
        return self._inspect(Side.REQUESTER, fragment, last)

    def _inspect_response(self, fragment: memoryview, last: bool) -> int:
        return self._inspect(Side.UPSTREAM, fragment, last)

    def _inspect(self, side: Side, fragment: memoryview, last: bool) -> int:
        """A data-set fragment of the message ``side``'s stream holds (or forwarded and still
        inspects). Held until every answer has come and its first part passed content
        validation; past ``MAX_HELD_BYTES`` the side is no longer read meanwhile."""
        hold = self._holds.get(side)
        if hold is None:
            return FORWARD
        hold.held += len(fragment)
        hold.ended = last
        if hold.scan is not None and not hold.forwarded:
            unscanned = self._collect_for_scan(side, hold, fragment)
            if unscanned is not None:
                return self._refuse_content(side, hold, unscanned)
        inspector = hold.inspector
        if inspector is not None:
            for finding in inspector.feed(fragment, last):
                if not self._enforced(finding):
                    self._report(self._would_refuse_content(hold, finding))
                elif hold.forwarded:
                    del self._holds[side]
                    raise _ContentAbort(side, hold, finding)
                else:
                    return self._refuse_content(side, hold, finding)
        if last and hold.scan is not None and not hold.forwarded:
            self._events.append(Scan(side, bytes(hold.scan)))
        if not hold.forwarded and hold.ready and self._first_part_passed(hold):
            hold.forwarded = True
            self._passed(side, hold)
        if hold.forwarded:
            if last:
                del self._holds[side]
            return FORWARD
        if hold.held > MAX_HELD_BYTES and not last and hold.scan is None:
            self._stream_from(side).halt()
            self._settling.add(side)
        return HOLD

    def _collect_for_scan(self, side: Side, hold: _Hold, fragment: memoryview) -> Finding | None:
        """Keep a fragment for the scanner, up to what it takes; a data set larger than that is
        not scanned: with ``fail: closed`` it is refused (the finding returned), else it goes
        on unscanned."""
        content = self.route.content if self.route is not None else None
        assert content is not None and hold.scan is not None
        if len(hold.scan) + len(fragment) <= content.scan_max_bytes:
            hold.scan += fragment
            return None
        hold.scan = None
        detail = f"larger than the {content.scan_max_bytes} bytes the scanner takes"
        service = _service_name(hold.command.command_field)
        self._events.append(Scanned(side.value, service, hold.sop_class, "skipped", detail))
        finding = Finding("scan_unavailable", Kind.TOO_LARGE, f"not scanned: {detail}")
        if content.scan_fail == "closed" and self._enforced(finding):
            return finding
        return None

    def _scan_buffer(self, command: DimseCommand) -> bytearray | None:
        """An empty buffer when the route's ``scan`` wants this message's data set scanned:
        ``instances`` every C-STORE, ``documents`` those of an Encapsulated Document class."""
        content = self.route.content if self.route is not None else None
        if content is None or command.command_field != 0x0001 or content.scan == "off":
            return None
        if content.scan == "documents" and not command.sop_class.startswith(_DOCUMENTS):
            return None
        return bytearray()

    def scan_done(self, side: Side, result: str, detail: str = "") -> list[Command]:
        """The scanner's verdict on the data set ``Scan`` handed it: ``clean``, ``found``
        (``detail``: the signature), or ``error`` (``detail``: why it could not answer)."""
        hold = self._holds.get(side)
        if self.state is not State.ESTABLISHED or hold is None or hold.scan is None:
            return []
        assert self.route is not None and self.route.content is not None
        content = self.route.content
        hold.scan = None
        self._events = []
        service = _service_name(hold.command.command_field)
        self._events.append(Scanned(side.value, service, hold.sop_class, result, detail))
        finding = None
        if result == "found":
            finding = Finding("malware", Kind.FORBIDDEN, f"the scanner found {detail}")
        elif result != "clean" and content.scan_fail == "closed":
            finding = Finding("scan_unavailable", Kind.TOO_LARGE, f"not scanned: {detail}")
        if finding is not None and not self._enforced(finding):
            self._report(self._would_refuse_content(hold, finding))
            finding = None
        if finding is None:
            events, self._events = self._events, []
            return events + self._answered(side, hold)
        refused = finding
        return self._settle_refused(side, lambda: self._refuse_content(side, hold, refused))

    def _first_part_passed(self, hold: _Hold) -> bool:
        """No content check holds the message any longer: the checks of its first part ran, or
        the route's hold bound was reached (the rest streams; a late violation aborts)."""
        inspector = hold.inspector
        if inspector is None or inspector.header_checked or hold.ended:
            return True
        content = self.route.content if self.route is not None else None
        return content is None or hold.held >= content.hold_bytes

    def _enforced(self, finding: Finding) -> bool:
        route = self.route
        assert route is not None and route.content is not None
        return route.mode != MONITOR and finding.check not in route.content.monitor

    def _stream_from(self, side: Side) -> DataStream:
        stream = self._to_upstream if side is Side.REQUESTER else self._to_requester
        assert stream is not None
        return stream

    def _take_replies(self) -> list[Command]:
        """The answers the firewall itself wrote while handling an input, to be sent now."""
        commands: list[Command] = []
        if self._replies:
            commands.append(Send(Side.REQUESTER, self._replies))
            self._replies = []
        if self._upstream_replies:
            commands.append(Send(Side.UPSTREAM, self._upstream_replies))
            self._upstream_replies = []
        return commands

    def _passed(self, side: Side, hold: _Hold) -> None:
        """A held message goes on its way: a request is counted, a final response completes."""
        if side is Side.REQUESTER and not hold.command.is_response:
            self._forwarded(hold.context_id, hold.command, hold.sop_class)
        elif side is Side.UPSTREAM:
            self._responded(hold.command)

    def _answered(self, side: Side, hold: _Hold) -> list[Command]:
        """An answer a held message waited for came: once all have (and its first part passed
        content validation), it goes on its way."""
        if not (hold.ready and self._first_part_passed(hold)):
            return []
        out = self._stream_from(side).settle(True)
        hold.forwarded = True
        self._passed(side, hold)
        if hold.ended:
            del self._holds[side]
        self._settling.discard(side)
        commands: list[Command] = [Send(side.other, out)] if out else []
        return commands + self._flow()

    def _refuse_content(self, side: Side, hold: _Hold, finding: Finding) -> int:
        """Content validation refused a held message: it is cut out (``SWALLOW``) and answered.
        A request's sender gets its failure response; a response is replaced by a failure
        toward the other side, and a pending one's request is cancelled at its sender (whose
        further responses to it are dropped)."""
        self._holds.pop(side, None)
        command, context_id = hold.command, hold.context_id
        status = content_status(finding.kind, command.command_field)
        answer = encode_response(command, status, f"dicomfw: {finding.check}")
        if command.is_response:
            self._reply(side.other, context_id, answer)
            if command.status in _PENDING_STATUSES and command.message_id is not None:
                self._reply(side, context_id, encode_cancel(command.message_id))
                self._cancelled[side].add(command.message_id)
            if side is Side.UPSTREAM:
                self._responded(command, status)
            action = "replaced"
        else:
            if side is Side.REQUESTER:
                self._count_refusal()
            self._reply(side, context_id, answer)
            action = "refused"
        self._report(self._content_event(side, hold, finding, action, status))
        return SWALLOW

    def _content_event(
        self, side: Side, hold: _Hold, finding: Finding, action: str, status: int
    ) -> ContentRefused:
        command = hold.command
        return ContentRefused(
            side.value,
            _service_name(command.command_field),
            hold.sop_class,
            finding.check,
            finding.kind.value,
            status,
            action,
            finding.detail,
            command.message_id,
        )

    def _would_refuse_content(self, hold: _Hold, finding: Finding) -> WouldRefuse:
        status = content_status(finding.kind, hold.command.command_field)
        service = _service_name(hold.command.command_field)
        return WouldRefuse(
            "content", finding.check, finding.detail, f"0x{status:04X}", service, hold.sop_class
        )

    def _reply(self, toward: Side, context_id: int, command_set: bytes) -> None:
        """A command of our own toward ``toward``, at its stream's next message boundary."""
        pdu_bytes = pdu.p_data_tf([pdu.pdv(context_id, 0x03, command_set)])
        if toward is Side.REQUESTER:
            self._replies += self._stream_from(Side.UPSTREAM).inject(pdu_bytes)
        else:
            self._upstream_replies += self._stream_from(Side.REQUESTER).inject(pdu_bytes)

    def _refuse_held(self, hold: _Hold, refusal: Refuse) -> list[Command]:
        """The shared store refused a held request: cut it out and answer it ourselves."""
        self._events = []
        del self._holds[Side.REQUESTER]
        return self._settle_refused(
            Side.REQUESTER,
            lambda: self._refuse_request(hold.context_id, hold.command, hold.sop_class, refusal),
        )

    def _settle_refused(self, side: Side, answer: Callable[[], object]) -> list[Command]:
        """A held message refused outside a read (an answer that came later): cut it out of
        ``side``'s stream, let ``answer`` answer it, then read ``side`` again."""
        out = self._stream_from(side).settle(False)
        self._holds.pop(side, None)
        self._settling.discard(side)
        commands: list[Command] = [Send(side.other, out)] if out else []
        try:
            answer()
        except _CutOff as cut:
            reason = pdu.ABORT_REASON_NOT_SPECIFIED
            return commands + self._end_feed(Side.REQUESTER, reason, "too_many_refusals", str(cut))
        commands += self._take_replies()
        events, self._events = self._events, []
        return commands + events + self._flow()

    def _report(self, event: RequestRefused | ContentRefused | WouldRefuse) -> None:
        """Report a refusal (or what monitor mode let pass), or past
        ``REFUSALS_REPORTED_ONE_BY_ONE`` of its kind count it for ``take_report``, keyed by
        what the rules and the negotiation bound: no detail, message ID or move destination
        (the requester chooses those freely), and a SOP class the association did not
        negotiate counts as ""."""
        kind = (type(event).__name__, event.why)
        seen = self._reported_by_why.get(kind, 0) + 1
        self._reported_by_why[kind] = seen
        if seen <= REFUSALS_REPORTED_ONE_BY_ONE:
            self._events.append(event)
            return
        sop_class = event.sop_class if event.sop_class in self._abstract_syntax.values() else ""
        if isinstance(event, WouldRefuse):
            key: RequestRefused | ContentRefused | WouldRefuse = replace(
                event, detail="", sop_class=sop_class, move_destination=None
            )
        elif isinstance(event, RequestRefused):
            key = replace(
                event, detail="", sop_class=sop_class, message_id=None, move_destination=None
            )
        else:
            key = replace(event, detail="", sop_class=sop_class, message_id=None)
        self._unreported[key] = self._unreported.get(key, 0) + 1

    def _observe_upstream(self, context_id: int, command: DimseCommand) -> int:
        """A command from the upstream passes, its data set once inspected (when the route
        validates content); final responses complete a request. Responses to a request we
        cancelled (we refused one of its responses) are dropped."""
        if command.is_response and command.message_id in self._cancelled[Side.UPSTREAM]:
            if command.status not in _PENDING_STATUSES:
                self._cancelled[Side.UPSTREAM].discard(command.message_id or 0)
            return SWALLOW
        verdict = self._hold_for_inspection(Side.UPSTREAM, context_id, command)
        if verdict == FORWARD:
            self._responded(command)
        return verdict

    def _hold_for_inspection(self, side: Side, context_id: int, command: DimseCommand) -> int:
        """HOLD a message whose data set the route validates, else FORWARD it."""
        inspector = self._inspector(context_id, command)
        if inspector is None:
            return FORWARD
        hold = _Hold(context_id, command, command.sop_class)
        hold.inspector = inspector
        hold.scan = self._scan_buffer(command)
        self._holds[side] = hold
        return HOLD

    def _responded(self, command: DimseCommand, status: int | None = None) -> None:
        """A response of the upstream went to the requester (or, with ``status``, our failure
        in its place): a final one completes its request."""
        if command.is_response and command.status not in _PENDING_STATUSES:
            done = self._outstanding.pop(command.message_id or 0, None)
            if done is not None:
                answer = (command.status or 0) if status is None else status
                self._completed(done, answer, command.message_id)

    def _completed(
        self, request: tuple[str, str, float], status: int, message_id: int | None
    ) -> None:
        """Count a request's final answer; a failure is also an event (the audit records it)."""
        service, sop_class, sent_at = request
        tally = self._tally
        counts = tally.of(service, sop_class)
        answer = status_class(status)
        if answer == "success":
            counts.success += 1
        elif answer == "warning":
            counts.warning += 1
        elif answer == "cancel":
            counts.cancel += 1
        else:
            counts.failure += 1
            self._events.append(RequestFailed(service, sop_class, status, message_id))
        if self._timed:
            tally.round_trips.append((service, self._clock() - sent_at))
            if len(tally.round_trips) >= TALLY_ROUND_TRIPS:
                self._events.append(tally)
                self._tally = RequestTally()

    # ---- failure -------------------------------------------------------------------------------

    def _abort(self, culprit: Side | None, reason: int, why: str, detail: str) -> list[Command]:
        """A-ABORT every side that is connected; ``culprit`` (if any) gets the PS3.8 reason."""
        previous = self.state
        self.state = State.CLOSED
        self._replies, self._upstream_replies, self._holds = [], [], {}
        self._deferred = {Side.REQUESTER: bytearray(), Side.UPSTREAM: bytearray()}
        commands: list[Command] = []
        for side in (Side.REQUESTER, Side.UPSTREAM):
            if side is Side.UPSTREAM and previous is State.AWAIT_UPSTREAM:
                commands.append(Close(side))  # still connecting: nothing to abort yet
            elif side is Side.REQUESTER or previous in (State.AWAIT_AC, State.ESTABLISHED):
                side_reason = reason if side is culprit else pdu.ABORT_REASON_NOT_SPECIFIED
                commands += [Send(side, [pdu.abort(reason=side_reason)]), Close(side)]
        return [*commands, AssociationEnded("aborted", why, detail)]
