"""The session driven step by step through random interleavings (hypothesis' stateful testing).

tests/test_core_contract.py generates one whole exchange and feeds it; here a rule-based state
machine plays both peers and the relay one step at a time, and checks the session's contract
after every single step: the requester queues messages and sends the next few bytes of its
stream (any number, so every split happens), the upstream likewise once it is connected,
either side may turn hostile (its next bytes mutated, or noise), and in between the relay's
own inputs arrive in any order: the upstream connects or is unreachable, the idle timer fires,
a delayed request's ``Wakeup`` comes due, a connection is lost, the daemon shuts down, a
report is taken.

After every step: no exception; at most one end, last in its answer, nothing after it; an end
for a protocol error names a side that was hostile; and the session holds no more than a
constant plus twice the bytes it was fed (measured with ``tests/sizes.py``), so no PDV layout,
split or interleaving makes it keep more than what arrived. When both connections are gone the
association has ended.
"""

from __future__ import annotations

from ipaddress import ip_address

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dicomfw.core.ratelimit import Gate, Limiter, LimitRules, RateLimits
from dicomfw.core.session import (
    AssociationEnded,
    AssociationRejected,
    Command,
    ConnectUpstream,
    Session,
    Side,
    Wakeup,
)
from tests.corehelpers import Clock, associate_rq, release_rp, release_rq
from tests.sizes import retained_bytes
from tests.test_core_contract import REQUESTER_MESSAGES, UPSTREAM_MESSAGES, mutated
from tests.test_core_session import CAP, PACS_AC, PACS_CONTEXTS, POLICY

ADDRESS = ip_address("10.1.2.3")
#: What a session may hold beyond twice the bytes it was fed: its own objects, the decoded
#: request's contexts, a tally, a few refusals waiting to go out.
SLACK_BYTES = 24_000
#: Inputs that end the association or turn a side hostile happen on one roll in eight, so
#: that most runs get past the set-up and into the data phase before something ends them.
ROLL = st.integers(0, 7)
SET_UP = ("nothing sent", "request sent", "established", "established")


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        rates = RateLimits(requests_per_minute_per_association={"C-ECHO": 1})
        self.gate = Limiter().connect(LimitRules(rates), "modalities", ADDRESS)
        assert isinstance(self.gate, Gate)
        self.session = Session(POLICY, "modalities", ADDRESS, None, CAP, self.gate, self.clock, 3)
        self.base = self.held()
        self.to_send = {
            Side.REQUESTER: bytearray(associate_rq("CT01", "PACS", PACS_CONTEXTS)),
            Side.UPSTREAM: bytearray(),
        }
        self.open = {Side.REQUESTER: True, Side.UPSTREAM: False}
        self.hostile: set[Side] = set()
        self.fed = 0
        self.ended: Command | None = None
        self.connecting = False
        self.waking = False
        self.upstream_answered = False

    def held(self) -> int:
        return retained_bytes(self.session, (POLICY, self.gate, self.clock))

    def answer(self, commands: list[Command]) -> None:
        if self.ended is not None:
            assert commands == [], f"commands after the end: {commands}"
            return
        ends = [c for c in commands if isinstance(c, AssociationEnded | AssociationRejected)]
        assert len(ends) <= 1, commands
        if ends:
            assert commands[-1] is ends[0], f"the end is not last: {commands}"
            self.ended = ends[0]
            why = getattr(self.ended, "why", "")
            if why.endswith("_protocol_error"):
                assert why.removesuffix("_protocol_error") in {s.value for s in self.hostile}, (
                    why,
                    self.hostile,
                )
        self.connecting |= any(isinstance(c, ConnectUpstream) for c in commands)
        self.waking |= any(isinstance(c, Wakeup) for c in commands)

    def send(self, side: Side, data: bytes) -> None:
        self.fed += len(data)
        # The upstream's honest A-ASSOCIATE-AC answers the honest request: once the request
        # is not that, the answer is no longer honest either.
        if side is Side.REQUESTER and side in self.hostile and not self.upstream_answered:
            self.hostile.add(Side.UPSTREAM)
        self.answer(self.session.receive(side, data))

    @initialize(how_far=st.sampled_from(SET_UP), data=st.data())
    def set_up(self, how_far: str, data: st.DataObject) -> None:
        """Start from a fresh connection, or with the set-up already done honestly in drawn
        splits, so that most runs spend their steps in the data phase."""
        if how_far == "nothing sent":
            return
        while self.to_send[Side.REQUESTER]:
            self.requester_sends(data.draw(st.integers(1, 1000)))
        if how_far == "established":
            self.upstream_connects()
            while self.to_send[Side.UPSTREAM]:
                self.upstream_sends(data.draw(st.integers(1, 1000)))

    # ---- the peers ------------------------------------------------------------------------------

    @rule(message=st.sampled_from(REQUESTER_MESSAGES))
    def requester_queues_a_message(self, message: bytes) -> None:
        self.to_send[Side.REQUESTER] += message

    @rule(message=st.sampled_from(UPSTREAM_MESSAGES))
    def upstream_queues_a_message(self, message: bytes) -> None:
        self.to_send[Side.UPSTREAM] += message

    @rule()
    def requester_asks_for_release_and_upstream_answers(self) -> None:
        self.to_send[Side.REQUESTER] += release_rq()
        self.to_send[Side.UPSTREAM] += release_rp()

    @precondition(lambda self: self.open[Side.REQUESTER] and self.to_send[Side.REQUESTER])
    @rule(size=st.integers(1, 1000))
    def requester_sends(self, size: int) -> None:
        self.send(Side.REQUESTER, self.take(Side.REQUESTER, size))

    @precondition(lambda self: self.open[Side.UPSTREAM] and self.to_send[Side.UPSTREAM])
    @rule(size=st.integers(1, 1000))
    def upstream_sends(self, size: int) -> None:
        self.upstream_answered = True
        self.send(Side.UPSTREAM, self.take(Side.UPSTREAM, size))

    @precondition(lambda self: self.open[Side.REQUESTER])
    @rule(data=st.data(), roll=ROLL)
    def requester_turns_hostile(self, data: st.DataObject, roll: int) -> None:
        if roll:
            return
        self.hostile.add(Side.REQUESTER)
        self.send(Side.REQUESTER, self.hostile_bytes(data, Side.REQUESTER))

    @precondition(lambda self: self.open[Side.UPSTREAM])
    @rule(data=st.data(), roll=ROLL)
    def upstream_turns_hostile(self, data: st.DataObject, roll: int) -> None:
        if roll:
            return
        self.hostile.add(Side.UPSTREAM)
        self.upstream_answered = True
        self.send(Side.UPSTREAM, self.hostile_bytes(data, Side.UPSTREAM))

    def take(self, side: Side, size: int) -> bytes:
        queue = self.to_send[side]
        piece = bytes(queue[:size])
        del queue[:size]
        return piece

    def hostile_bytes(self, data: st.DataObject, side: Side) -> bytes:
        """The side's next honest bytes mutated, or noise."""
        honest = self.take(side, data.draw(st.integers(1, 300)))
        if not honest or data.draw(st.booleans()):
            return data.draw(st.binary(min_size=1, max_size=200))
        return mutated(data, honest)

    # ---- the relay ------------------------------------------------------------------------------

    @precondition(lambda self: self.connecting and self.ended is None)
    @rule()
    def upstream_connects(self) -> None:
        """(Once the association has ended, the relay closes a connection that completes
        late without asking the session: ``Association._connect``.)"""
        self.connecting = False
        self.open[Side.UPSTREAM] = True
        self.to_send[Side.UPSTREAM][:0] = PACS_AC
        self.answer(self.session.upstream_connected())

    @precondition(lambda self: self.connecting)
    @rule(roll=ROLL)
    def upstream_is_unreachable(self, roll: int) -> None:
        if roll:
            return
        self.connecting = False
        self.answer(self.session.upstream_failed("connection refused"))

    @precondition(lambda self: self.waking)
    @rule()
    def delayed_request_comes_due(self) -> None:
        self.waking = False
        self.clock.now += 60.0
        self.answer(self.session.wakeup())

    @rule(roll=ROLL)
    def idle_timer_fires(self, roll: int) -> None:
        if roll:
            return
        self.answer(self.session.timed_out("idle"))

    @rule(side=st.sampled_from((Side.REQUESTER, Side.UPSTREAM)), roll=ROLL)
    def connection_is_lost(self, side: Side, roll: int) -> None:
        if roll:
            return
        self.open[side] = False
        self.answer(self.session.connection_lost(side))

    @rule(roll=ROLL)
    def daemon_shuts_down(self, roll: int) -> None:
        if roll:
            return
        self.answer(self.session.abort("shutdown", "the daemon is stopping"))

    @rule()
    def relay_takes_a_report(self) -> None:
        self.clock.now += 11.0
        self.session.take_report()

    # ---- after every step -----------------------------------------------------------------------

    @invariant()
    def holds_no_more_than_what_it_was_fed(self) -> None:
        held = self.held() - self.base
        assert held <= 2 * self.fed + SLACK_BYTES, (held, self.fed)

    def teardown(self) -> None:
        for side in (Side.REQUESTER, Side.UPSTREAM):
            self.answer(self.session.connection_lost(side))
        assert self.ended is not None, "both connections are gone and the association goes on"


SessionMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_random_interleavings_of_both_sides_timers_and_closes_keep_the_sessions_contract = (
    SessionMachine.TestCase
)
