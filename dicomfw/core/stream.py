"""One direction of the data phase: relay P-DATA-TF without re-framing, learn each DIMSE message.

This is the per-byte hot path (DCMTK sends 16 KB PDUs: ~65,000 per GB), so it is written for
what the common case costs:

* A P-DATA-TF holding one data-set PDV of a message being forwarded is recognised from its
  first 12 bytes (PDU header + PDV header) and then forwarded as it arrives, as slices of the
  received buffer. Consecutive such PDUs in one read leave as *one* slice: no copy, no
  per-PDU allocation.
* Everything else (command PDVs, PDUs with several PDVs, release/abort PDUs) is held whole
  (bounded by the PDU cap) and parsed: command fragments are reassembled and decoded, the
  ``decide`` callback says whether the message may pass, and a refused message's PDVs, data set
  included, are swallowed. Only a PDU that must change is re-framed.

PS3.8 §9.3.5 and Annex E: a PDV's message control header has bit 0 = command, bit 1 = last
fragment. Fragments of different messages are not interleaved, which the state machine enforces.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import Enum
from typing import Final

from dicomfw.core.dimse import MAX_COMMAND_BYTES, DimseCommand, decode_command
from dicomfw.core.pdu import (
    A_ABORT,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_UNEXPECTED_PARAMETER,
    ABORT_UNEXPECTED_PDU,
    HEADER,
    HEADER_SIZE,
    P_DATA_TF,
    PDU_NAMES,
    check_header,
)
from dicomfw.errors import RemoteProtocolError

_PDV_HEADER: Final = struct.Struct(">LBB")
_PEEK: Final = HEADER_SIZE + 6  # PDU header + first PDV header
_PEEK_HEADER: Final = struct.Struct(">BxLLBB")  # both at once
_COMMAND: Final = 0x01
_LAST: Final = 0x02

Buffer = bytes | memoryview

# What becomes of a message: the answer of ``Decide`` and ``Inspect``.
#: Forward the message (``Inspect``: forward what is held, go on inspecting what follows).
FORWARD: Final = 0
#: Cut the message out, data set included (the firewall answers for it).
SWALLOW: Final = 1
#: Hold the message, and show each of its data-set fragments to ``Inspect`` until it answers
#: otherwise (or ``settle`` decides). Once the message has ended (its command, when it has no
#: data set), the stream reads no further until ``settle``.
HOLD: Final = 2

#: Called with each complete command: FORWARD, SWALLOW, or HOLD (for a message with a data set).
Decide = Callable[[int, DimseCommand], int]
#: Called with each data-set fragment of a message ``Decide`` held, and whether it is the last:
#: FORWARD, SWALLOW while the message is still held, HOLD to keep holding it. To stop a message
#: already forwarded, raise: the association cannot go on.
Inspect = Callable[[memoryview, bool], int]


class _Message(Enum):
    IDLE = "idle"  # between messages
    COMMAND = "command"  # command fragments arriving
    DATA_SET = "data_set"  # data set fragments arriving
    INSPECTED = "inspected"  # data set fragments arriving, each shown to ``Inspect``


class DataStream:
    """Inspects and forwards one direction of an established association."""

    __slots__ = (
        "_command",
        "_command_size",
        "_context",
        "_contexts",
        "_decide",
        "_drop",
        "_halted",
        "_held",
        "_inject",
        "_injected",
        "_inspect",
        "_left",
        "_max_length",
        "_need",
        "_partial",
        "_pending",
        "_state",
        "_unread",
        "control_pdus",
    )

    def __init__(
        self,
        contexts: frozenset[int],
        max_length: int,
        decide: Decide,
        inspect: Inspect | None = None,
    ) -> None:
        """``inspect`` is needed only when ``decide`` may answer HOLD."""
        self._contexts = contexts  # accepted presentation context IDs
        self._max_length = max_length
        self._decide = decide
        self._inspect = inspect
        self._left = 0  # bytes of the current fast-path PDU still to pass
        self._drop = False  # whether the current message's PDVs are swallowed
        self._partial: bytearray | None = None
        self._need = 0
        self._state = _Message.IDLE
        self._context = 0
        self._command = bytearray()
        self._command_size = 0  # wire bytes of the command's PDVs, headers included
        #: PDUs held while the fate of their message is pending (its command is incomplete, or
        #: the message is held), copied out of the read they came in: (PDU, ranges of the PDVs
        #: that pass whatever the fate, ranges of the pending message's PDVs).
        self._held: list[tuple[bytes, list[int], list[int]]] = []
        self._pending = False
        self._inject: list[bytes] = []
        self._injected = 0  # bytes in ``_inject``
        self._halted = False  # stop reading after the current PDU (``halt``, or an A-ABORT)
        self._unread = b""  # what ``feed`` did not read because it halted
        #: Types of the release/abort PDUs forwarded so far, for the session to act on.
        self.control_pdus: list[int] = []

    @property
    def at_message_boundary(self) -> bool:
        """Between two messages in what was forwarded so far.

        A PDU buffered while idle has not been forwarded at all (only a data-set PDU goes out
        before it is complete), so it does not keep an injected PDU waiting; a held message
        whose data set has ended does.
        """
        return self._state is _Message.IDLE and not self._left and not self._pending

    @property
    def waiting(self) -> bool:
        """A held message has ended and the stream reads nothing more until ``settle``."""
        return self._pending and self._state is _Message.IDLE

    @property
    def queued_bytes(self) -> int:
        """Bytes of our own PDUs waiting for the next message boundary (see ``inject``)."""
        return self._injected

    def inject(self, pdu: bytes) -> list[Buffer]:
        """Send a PDU of our own in this direction, at the next message boundary.

        Returns what may go out now; otherwise the PDU leaves with a later ``feed`` result, so a
        firewall-made response never lands inside another message's fragments. What waits is
        counted in ``queued_bytes``, for the caller to bound.
        """
        if self.at_message_boundary:
            return [pdu]
        self._inject.append(pdu)
        self._injected += len(pdu)
        return []

    def feed(self, data: bytes) -> list[Buffer]:
        """Consume received bytes; return the buffers to forward, in order.

        Reading stops after a PDU that asked to ``halt`` (what is left waits in
        ``take_unread``), and for good after an A-ABORT: the association ends there, whatever
        follows it.
        """
        out: list[Buffer] = []
        view = memoryview(data)
        end = len(view)
        pos = 0
        run = -1  # start of the current pass-through run in ``view``
        while pos < end and not self._halted:
            left = self._left
            if left:
                take = left if left < end - pos else end - pos
                self._left = left - take
                if self._drop:
                    if run >= 0:
                        out.append(view[run:pos])
                        run = -1
                elif run < 0:
                    run = pos
                pos += take
                if not self._left and self._inject and self.at_message_boundary:
                    if run >= 0:
                        out.append(view[run:pos])
                        run = -1
                    self._flush_injected(out)
                continue
            partial = self._partial
            if partial is not None:
                if self._need == _PEEK and len(partial) < HEADER_SIZE:
                    take = min(HEADER_SIZE - len(partial), end - pos)
                    partial += view[pos : pos + take]
                    pos += take
                    if len(partial) < HEADER_SIZE:
                        break
                if self._need == _PEEK:
                    pdu_type, length = HEADER.unpack_from(partial)
                    check_header(pdu_type, length, self._max_length)
                    # A release or abort PDU is shorter than the peek: it is complete earlier.
                    self._need = min(_PEEK, HEADER_SIZE + length)
                    peeking = HEADER_SIZE + length > _PEEK
                else:
                    peeking = False
                take = min(self._need - len(partial), end - pos)
                partial += view[pos : pos + take]
                pos += take
                if len(partial) < self._need:
                    break
                if not peeking:
                    self._partial = None
                    self._whole_pdu(memoryview(bytes(partial)), out)
                elif self._continues_data_set(*_PEEK_HEADER.unpack_from(partial)):
                    # Its first 12 bytes came across reads: they go now, the rest as it comes.
                    self._partial = None
                    if not self._drop:
                        out.append(bytes(partial))
                    self._left = HEADER_SIZE + HEADER.unpack_from(partial)[1] - len(partial)
                else:
                    self._need = HEADER_SIZE + HEADER.unpack_from(partial)[1]  # hold it whole
                continue
            available = end - pos
            if available < _PEEK:
                if available >= HEADER_SIZE:
                    pdu_type, length = HEADER.unpack_from(view, pos)
                    check_header(pdu_type, length, self._max_length)
                    if HEADER_SIZE + length <= available:
                        if run >= 0:
                            out.append(view[run:pos])
                            run = -1
                        self._whole_pdu(view[pos : pos + HEADER_SIZE + length], out)
                        pos += HEADER_SIZE + length
                        continue
                if run >= 0:
                    out.append(view[run:pos])
                    run = -1
                self._partial = bytearray(view[pos:end])
                self._need = _PEEK
                pos = end
                break
            fields = _PEEK_HEADER.unpack_from(view, pos)
            if self._continues_data_set(*fields):  # the common case, once per 16 KB PDU
                self._left = HEADER_SIZE + fields[1]
                continue
            check_header(fields[0], fields[1], self._max_length)
            # Slow path: the PDU must be complete before anything of it leaves.
            total = HEADER_SIZE + fields[1]
            if end - pos >= total:
                extra: list[Buffer] = []
                if self._whole_pdu(view[pos : pos + total], extra, joinable=True):
                    if run < 0:  # it passes as received: one slice with its neighbours
                        run = pos
                else:
                    if run >= 0:
                        out.append(view[run:pos])
                        run = -1
                    out += extra
                pos += total
            else:
                if run >= 0:
                    out.append(view[run:pos])
                    run = -1
                self._partial = bytearray(view[pos:end])
                self._need = total
                pos = end
        if run >= 0:
            out.append(view if run == 0 and pos == end else view[run:pos])
        if pos < end:  # after what ``_whole_pdu`` left of a PDU it stopped in
            self._unread += view[pos:end]
        return out

    def halt(self) -> None:
        """Read no further than the PDU being read (called from ``decide``)."""
        self._halted = True

    def take_unread(self) -> bytes:
        """What the last ``feed`` left unread because it halted; reading goes on from there."""
        unread, self._unread, self._halted = self._unread, b"", False
        return unread

    def _continues_data_set(
        self, pdu_type: int, length: int, pdv_length: int, context: int, control: int
    ) -> bool:
        """Whether a PDU, judged from its first 12 bytes, is a lone data-set PDV of the message
        in progress: then it is forwarded (or swallowed) as it arrives, never buffered. Anything
        else, errors included, is held whole and judged by ``_whole_pdu``."""
        if not (
            pdu_type == P_DATA_TF
            and pdv_length + 4 == length
            and pdv_length >= 2
            and not control & _COMMAND
            and context == self._context
            and length <= self._max_length
            and self._state is _Message.DATA_SET
        ):
            return False
        if control & _LAST:
            self._state = _Message.IDLE
        return True

    def _flush_injected(self, out: list[Buffer]) -> None:
        if self._inject and self._state is _Message.IDLE and not self._pending:
            out.extend(self._inject)
            self._inject.clear()
            self._injected = 0

    def _whole_pdu(self, pdu: memoryview, out: list[Buffer], joinable: bool = False) -> bool:
        """Slow path: a complete PDU that is not a lone data-set PDV of a known message.

        The PDU leaves as received once the fate of all its PDVs is known, and is re-framed only
        when some of them are swallowed. While the fate of a message is pending (its command is
        incomplete, or ``decide`` held it), its PDUs are held (they may also carry the end of
        the previous message, which then waits with them). A held message whose data set ends
        still held stops the reading: the PDVs after it in the PDU are framed anew and wait
        with the rest of the read (``take_unread``) until ``settle``.

        Which PDVs pass is kept as ranges of offsets, adjacent PDVs merged into one range: a PDU
        of thousands of tiny PDVs costs a few integers, not an object per PDV (a 60 KB PDU of
        10,000 empty command fragments once held ~1.9 MB of memoryviews).

        ``joinable``: the caller would rather forward the PDU itself, as part of a slice of the
        read (an inspected data set's PDUs then leave as one buffer, not one each): True is
        returned, and nothing appended, when the PDU passes as received and nothing else is
        to go out with it.
        """
        appended = len(out)
        pdu_type = pdu[0]
        if pdu_type != P_DATA_TF:
            # Release and abort pass in order; the session acts on them after forwarding.
            if pdu_type != A_ABORT and (
                pdu_type not in (A_RELEASE_RQ, A_RELEASE_RP) or self._state is not _Message.IDLE
            ):
                raise RemoteProtocolError(
                    f"unexpected {PDU_NAMES[pdu_type]} in the data phase", ABORT_UNEXPECTED_PDU
                )
            out.append(pdu)
            self.control_pdus.append(pdu_type)
            self._halted = pdu_type == A_ABORT
            return False
        kept: list[int] = []  # ranges of the PDVs of this PDU that pass
        pending: list[int] = []  # ranges of this PDU's PDVs of the message whose fate is pending
        pos = HEADER_SIZE
        end = len(pdu)
        if pos == end:
            raise RemoteProtocolError("P-DATA-TF without a PDV", ABORT_INVALID_PARAMETER)
        while pos < end:
            if end - pos < 6:
                raise RemoteProtocolError("truncated PDV header", ABORT_INVALID_PARAMETER)
            pdv_length, context, control = _PDV_HEADER.unpack_from(pdu, pos)
            pdv_end = pos + 4 + pdv_length
            if pdv_length < 2 or pdv_end > end:
                raise RemoteProtocolError(
                    "PDV length does not fit its PDU", ABORT_INVALID_PARAMETER
                )
            if context not in self._contexts:
                raise RemoteProtocolError(
                    f"PDV on presentation context {context}, which was not accepted",
                    ABORT_UNEXPECTED_PARAMETER,
                )
            if control & _COMMAND:
                _add_range(pending, pos, pdv_end)
                verdict = self._command_fragment(context, control, pdu[pos + 6 : pdv_end], out)
                if self._pending and self._state is _Message.IDLE:  # held, and complete
                    self._stop_after(pdu, pdv_end)
                    break
            elif self._state is _Message.INSPECTED:
                self._check_data_context(context)
                last = bool(control & _LAST)
                if last:
                    self._state = _Message.IDLE
                assert self._inspect is not None
                verdict = self._inspect(pdu[pos + 6 : pdv_end], last)
                if self._pending:
                    _add_range(pending, pos, pdv_end)
                    if verdict != HOLD:
                        self._settle_held(verdict == FORWARD, out)
                else:  # forwarded already: what follows passes once inspected
                    _add_range(kept, pos, pdv_end)
                    verdict = FORWARD
                if last and self._pending:
                    self._stop_after(pdu, pdv_end)
                    break
                if verdict == SWALLOW:
                    self._state = _Message.IDLE if last else _Message.DATA_SET
                    self._drop = True
            else:
                if self._state is not _Message.DATA_SET:
                    raise RemoteProtocolError(
                        "data set PDV without a command announcing it", ABORT_UNEXPECTED_PARAMETER
                    )
                self._check_data_context(context)
                if control & _LAST:
                    self._state = _Message.IDLE
                if not self._drop:
                    _add_range(kept, pos, pdv_end)
                verdict = HOLD
            if verdict != HOLD and pending:
                if verdict == FORWARD:
                    for at in range(0, len(pending), 2):
                        _add_range(kept, pending[at], pending[at + 1])
                pending = []
            pos = pdv_end
        if self._pending:
            # Copied: a view would keep the whole read it came in alive while the message waits.
            self._held.append((bytes(pdu), kept, pending))
            return False
        if (
            joinable
            and len(out) == appended
            and len(kept) == 2
            and kept[0] == HEADER_SIZE
            and kept[1] == end
            and not (self._inject and self.at_message_boundary)
        ):
            return True
        if kept:
            out.append(_framed(pdu, kept))
        self._flush_injected(out)
        return False

    def _stop_after(self, pdu: memoryview, pdv_end: int) -> None:
        """A held message has ended: read nothing more until ``settle``. The PDVs after it in
        this PDU wait, framed as a PDU of their own, with the rest of the read."""
        self._halted = True
        if pdv_end < len(pdu):
            rest = pdu[pdv_end:]
            self._unread = HEADER.pack(P_DATA_TF, len(rest)) + bytes(rest)

    def _check_data_context(self, context: int) -> None:
        if context != self._context:
            raise RemoteProtocolError(
                f"data set PDV on context {context} while the message uses context {self._context}",
                ABORT_UNEXPECTED_PARAMETER,
            )

    def _command_fragment(
        self, context: int, control: int, fragment: memoryview, out: list[Buffer]
    ) -> int:
        """Collect a command fragment; once the command is complete, decide its message's fate
        and return it (HOLD while it is still pending), sending the PDUs held for it ahead of
        the current one when it is settled.
        """
        if self._state is _Message.DATA_SET or self._state is _Message.INSPECTED:
            raise RemoteProtocolError(
                "command PDV before the previous data set ended", ABORT_UNEXPECTED_PARAMETER
            )
        if self._state is _Message.IDLE:
            self._state = _Message.COMMAND
            self._pending = True
            self._context = context
            self._command.clear()
            self._command_size = 0
        elif context != self._context:
            raise RemoteProtocolError(
                "command fragments on two presentation contexts", ABORT_UNEXPECTED_PARAMETER
            )
        self._command += fragment
        # Count the PDV headers too, so empty fragments cannot make the held PDUs grow unbounded.
        self._command_size += 6 + len(fragment)
        if self._command_size > MAX_COMMAND_BYTES:
            raise RemoteProtocolError("DIMSE command set too large", ABORT_INVALID_PARAMETER)
        if not control & _LAST:
            return HOLD
        command = decode_command(self._command)
        verdict = self._decide(context, command)
        if verdict == HOLD:
            self._state = _Message.INSPECTED if command.has_data_set else _Message.IDLE
            self._drop = False
            return HOLD
        forward = verdict != SWALLOW
        self._settle_held(forward, out)
        self._drop = not forward
        self._state = _Message.DATA_SET if command.has_data_set else _Message.IDLE
        return FORWARD if forward else SWALLOW

    def _settle_held(self, forward: bool, out: list[Buffer]) -> None:
        """The pending message's fate is known: send the PDUs held for it, with or without its
        own PDVs."""
        for held, held_kept, held_pending in self._held:
            passing = held_kept
            if forward:
                passing = list(held_kept)
                for at in range(0, len(held_pending), 2):
                    _add_range(passing, held_pending[at], held_pending[at + 1])
            if passing:
                out.append(_framed(memoryview(held), passing))
        self._held.clear()
        self._pending = False

    def settle(self, forward: bool) -> list[Buffer]:
        """The fate of the held message, decided outside ``feed`` (an answer that had to be
        waited for): what goes out now. A message that has ended stopped the reading, which
        goes on with ``take_unread``; one whose data set is still arriving is forwarded from
        here on (its fragments still shown to ``inspect``) or swallowed to its end."""
        out: list[Buffer] = []
        if not self._pending or self._state is _Message.COMMAND:
            return out
        self._settle_held(forward, out)
        if self._state is _Message.INSPECTED and not forward:
            self._state, self._drop = _Message.DATA_SET, True
        self._flush_injected(out)
        return out


def _add_range(ranges: list[int], start: int, end: int) -> None:
    """Append [start, end) to a flat list of ranges, merged with the last one it touches."""
    if ranges and ranges[-1] == start:
        ranges[-1] = end
    else:
        ranges += (start, end)


def _framed(pdu: memoryview, ranges: list[int]) -> Buffer:
    """The PDU itself when ``ranges`` cover all its PDVs, else a P-DATA-TF of just those."""
    if len(ranges) == 2 and ranges[0] == HEADER_SIZE and ranges[1] == len(pdu):
        return pdu
    body = b"".join(pdu[ranges[at] : ranges[at + 1]] for at in range(0, len(ranges), 2))
    return HEADER.pack(P_DATA_TF, len(body)) + body
