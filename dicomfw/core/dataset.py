"""An incremental, strict walker of DICOM data sets (PS3.5 §7), fed in pieces of any size.

The firewall reads a data set so that a known-bad one is refused before the system behind it
parses it. Where the two could read the same bytes differently, the walker refuses instead of
guessing (``Finding`` of kind MALFORMED, after which the walk stops):

* every element header is complete, of a known VR (explicit VR, PS3.5 Table 6.2-1), and its
  value fits its container: the data set, a defined-length sequence or item (``length_overrun``);
* elements come in ascending tag order inside each data set and item, each at most once
  (PS3.5 §7.1: DCMTK keeps the first of a repeated element, other readers the last):
  ``element_order``;
* every value length is even (PS3.5 §7.1.1) (``odd_length``) and a multiple of its VR's unit
  size for binary VRs (``vr_value``);
* defined-length sequences and items add up exactly; undefined-length ones end with their
  delimiter (PS3.5 §7.5); a delimiter appears only where it closes something (``length_overrun``,
  ``delimiter``); the data set does not end inside an element (``truncated``);
* sequence nesting and the number of elements (items and fragments included) are bounded
  (``nesting_depth``, ``element_count``);
* encapsulated Pixel Data (PS3.5 §A.4) is a Basic Offset Table item (empty, or a multiple of 4
  bytes of increasing offsets, each at the start of a fragment) then fragment items, ended by a
  sequence delimiter (``encapsulated_fragments``); it is accepted only in a transfer syntax that
  is not native (Implicit/Explicit VR Little/Big Endian, Deflated).

Transfer syntaxes: Implicit VR LE, Explicit VR LE, Explicit VR BE, Deflated Explicit VR LE
(raw deflate, PS3.5 §A.5, inflated here in bounded steps: ``deflate_bound``), and every other
transfer syntax under the DICOM root ``1.2.840.10008.1.2.``: the standard has defined each of
them since 1993 as Explicit VR LE with encapsulated Pixel Data. A transfer syntax outside that
root (a vendor's private one, GE's implicit big endian among them) cannot be read as its owner
reads it, so it is refused (``transfer_syntax``, UNSUPPORTED). An element of Unknown VR (UN)
with undefined length is a sequence in Implicit VR LE (PS3.5 §6.2.2), as is an undefined-length
element whose Implicit VR is UN (a private sequence).

What the walker does not decide it hands to a ``Visitor``: each element's header (the visitor
answers whether it wants the value, its first bytes, or nothing), the values it asked for,
the start and end of each item, and the end of the header (the top-level Pixel Data, or the end
of the data set). Memory: a header in progress (at most 12 bytes), one value the visitor asked
for (the visitor bounds its size), the first ``head`` bytes of an opaque value, a Basic Offset
Table (``MAX_OFFSET_TABLE_BYTES``) and a stack of a few integers per open sequence or item
(bounded by the depth); nothing grows with the size of the data set.

Speed: the walk runs over ``bytes`` windows of the received fragments with local integers and
no object per element (like ``dicomfw.core.dimse``); a value the visitor does not want is
skipped by its length, so native pixel data costs O(1) per fragment.
"""

from __future__ import annotations

import zlib
from typing import Final

from dicomfw.core.dictionary import (
    OB,
    OW,
    SQ,
    UN,
    VR_KNOWN,
    VR_LONG,
    VR_TABLE,
    implicit_vr,
    unit_size,
)
from dicomfw.core.findings import Finding, Kind, tag_text

UNDEFINED: Final = 0xFFFFFFFF
ITEM: Final = 0xFFFEE000
ITEM_DELIMITER: Final = 0xFFFEE00D
SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
PIXEL_DATA: Final = 0x7FE00010
FLOAT_PIXEL_DATA: Final = 0x7FE00008
DOUBLE_FLOAT_PIXEL_DATA: Final = 0x7FE00009

# What the visitor wants of a value.
SKIP: Final = 0
VALUE: Final = 1
HEAD: Final = 2

# Encodings (per level: an undefined-length UN switches its content to Implicit VR LE).
IMPLICIT_LE: Final = 0
EXPLICIT_LE: Final = 1
EXPLICIT_BE: Final = 2

# Container kinds on the stack.
_DATASET: Final = 0  # the top-level data set or an item: elements
_SEQUENCE: Final = 1  # a sequence: items
_FRAGMENTS: Final = 2  # encapsulated pixel data: offset table + fragments

# Modes of the walk between two feeds.
_HEADER: Final = 0  # reading element / item headers
_SKIPPING: Final = 1  # skipping a value (collecting its first bytes for ``head``)
_COLLECTING: Final = 2  # collecting a whole value for ``value``

#: ``_vr`` while the Basic Offset Table is collected (no VR code is negative).
_OFFSET_TABLE: Final = -1

#: Bytes copied out of a fragment at a time for the header walk: a header is parsed from a
#: ``bytes`` window (cheapest to index in compiled code); the rest of a long value is skipped
#: in the fragment itself, never copied.
_WINDOW: Final = 16_384
#: Inflated bytes produced per step, so a deflate bomb is stopped at the bound, not after it.
_INFLATE_STEP: Final = 65_536
#: A Basic Offset Table larger than this (262,144 frames) is refused rather than held.
MAX_OFFSET_TABLE_BYTES: Final = 1_048_576

_DICOM_ROOT: Final = "1.2.840.10008.1.2."
IMPLICIT_VR_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_LE: Final = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE: Final = "1.2.840.10008.1.2.2"
#: Transfer syntaxes whose data set is deflated (PS3.5 §A.5; JPIP Referenced Deflate, §A.7).
DEFLATED: Final = frozenset(
    ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205")
)
#: Transfer syntaxes without encapsulation: undefined-length Pixel Data is refused in them.
NATIVE: Final = frozenset(
    (IMPLICIT_VR_LE, EXPLICIT_VR_LE, EXPLICIT_VR_BE, "1.2.840.10008.1.2.1.99",
     "1.2.840.10008.1.20")
)  # fmt: skip


def encoding_of(transfer_syntax: str) -> int:
    """The encoding of a transfer syntax, or -1 when the walker cannot read it (see the module
    docstring: private transfer syntaxes)."""
    if transfer_syntax in (IMPLICIT_VR_LE, "1.2.840.10008.1.20"):  # Papyrus 3 implicit
        return IMPLICIT_LE
    if transfer_syntax == EXPLICIT_VR_BE:
        return EXPLICIT_BE
    if transfer_syntax == EXPLICIT_VR_LE or transfer_syntax.startswith(_DICOM_ROOT):
        return EXPLICIT_LE
    return -1


class Visitor:
    """What the walker tells about the elements it reads; the inspector overrides these.

    ``depth`` is the number of sequences around the element (0: the top-level data set).
    """

    def element(self, tag: int, vr: int, length: int, depth: int) -> int:
        """A data element's header; answer SKIP, VALUE (whole value to ``value``) or HEAD
        (its first bytes to ``head``). Sequences and encapsulated pixel data are walked by the
        walker whatever the answer."""
        return SKIP

    def value(self, tag: int, vr: int, value: bytes, depth: int) -> None:
        """The whole value of an element the visitor answered VALUE for."""

    def head(self, tag: int, vr: int, head: bytes, depth: int) -> None:
        """The first bytes (up to ``Walker.head_bytes``) of an element answered HEAD, or of an
        encapsulated fragment (``tag`` is then the pixel data's)."""

    def item_start(self, depth: int) -> None:
        """An item (a nested data set at ``depth``) begins."""

    def item_end(self, depth: int) -> None:
        """The item at ``depth`` ends."""

    def header_end(self) -> None:
        """Every element before the top-level pixel data (or all elements) has been read."""


class Walker:
    """Walks one data set fed in order; findings accumulate in ``findings``.

    ``feed`` never raises for any input and keeps no reference to what it was given.
    """

    def __init__(
        self,
        visitor: Visitor,
        transfer_syntax: str,
        findings: list[Finding],
        *,
        max_depth: int,
        max_elements: int,
        max_inflated: int,
        head_bytes: int,
        fragment_heads: bool,
    ) -> None:
        self._visitor = visitor
        self.findings = findings
        self._max_depth = max_depth
        self._max_elements = max_elements
        self._max_inflated = max_inflated
        self.head_bytes = head_bytes
        self._fragment_heads = fragment_heads
        self.stopped = False
        self.header_done = False
        self.done = False
        #: Tests: every element as (depth, tag, VR or 0 in implicit VR, length), items as ITEM.
        self.trace: list[tuple[int, int, int, int]] | None = None
        encoding = encoding_of(transfer_syntax)
        self._native = transfer_syntax in NATIVE
        self._inflater = (
            zlib.decompressobj(-zlib.MAX_WBITS) if transfer_syntax in DEFLATED else None
        )
        self._inflated = 0
        self.trailing = False  # bytes after the end of a deflated data set (conformance)
        self._offset = 0  # position (in the decoded stream) of the next byte to walk
        self._carry = b""  # an incomplete header left by the previous window
        self._mode = _HEADER
        self._remaining = 0  # value bytes still to skip or collect
        self._buffer = bytearray()  # value or head being collected
        self._head_left = 0  # bytes still wanted for ``head`` while skipping
        self._tag = 0  # the element whose value is being skipped or collected
        self._vr = 0
        self._elements = 0
        # The stack of open containers, one entry per level (0: the data set itself).
        self._kinds: list[int] = [_DATASET]
        self._ends: list[int] = [-1]  # where a defined-length container ends, -1: undefined
        #: Per level, the end of the innermost defined-length container around it (-1: none):
        #: every container fits the one around it, so this is the only bound a value needs.
        self._limits: list[int] = [-1]
        self._previous: list[int] = [-1]  # last tag read in a data set or item
        self._encodings: list[int] = [max(encoding, IMPLICIT_LE)]
        self._depth = 0  # sequences open
        # Encapsulated pixel data in progress: its offset table and where fragments begin.
        self._offsets: list[int] = []
        self._next_offset = 0
        self._fragments_at = -1  # position of the first fragment item, -1: table not read
        self._pixel_tag = 0
        if encoding < 0:
            self._stop(
                "transfer_syntax",
                Kind.UNSUPPORTED,
                "transfer syntax outside the DICOM root: its encoding is unknown",
            )

    @property
    def position(self) -> int:
        """Where the walk is in the data set (as decoded: inflated, for a deflated one)."""
        return self._offset

    @property
    def deflated(self) -> bool:
        return self._inflater is not None

    @property
    def little(self) -> bool:
        """Whether the values being walked are little endian."""
        return self._encodings[-1] != EXPLICIT_BE

    # ---- reporting --------------------------------------------------------------------------

    def _stop(self, check: str, kind: Kind, detail: str) -> None:
        self.findings.append(Finding(check, kind, detail))
        self.stopped = True

    def _malformed(self, check: str, detail: str) -> None:
        self._stop(check, Kind.MALFORMED, detail)

    # ---- input ------------------------------------------------------------------------------

    def feed(self, fragment: bytes | memoryview, last: bool) -> None:
        """Walk the next piece of the data set; ``last`` marks its end."""
        if self.stopped or self.done:
            return
        if self._inflater is not None:
            self._inflate(fragment, last)
        else:
            self._consume(fragment)
        if last and not self.stopped:
            self._finish()

    def _inflate(self, fragment: bytes | memoryview, last: bool) -> None:
        inflater = self._inflater
        assert inflater is not None
        data: bytes | memoryview = fragment
        while data and not self.stopped:
            if inflater.eof:
                # PS3.5 §A.5 allows one trailing NUL; writers leave more (pydicom's
                # image_dfl.dcm: a gzip trailer). Readers stop at the end of the deflate
                # stream and never parse them, so they are noted, not refused.
                self.trailing = self.trailing or bytes(data) != b"\x00"
                return
            try:
                out = inflater.decompress(data, _INFLATE_STEP)
            except zlib.error:
                self._malformed("deflate_stream", "the deflated data set does not inflate")
                return
            data = inflater.unconsumed_tail or inflater.unused_data
            if not self._account(len(out)):
                return
            self._consume(out)
            if not out and not inflater.eof and not inflater.unconsumed_tail:
                break
        if last and not self.stopped:
            try:
                out = inflater.flush(_INFLATE_STEP)
            except zlib.error:
                out = b""
            if out and self._account(len(out)):
                self._consume(out)
            if not inflater.eof and not self.stopped:
                self._malformed("truncated", "deflated data set ends before its deflate stream")

    def _account(self, produced: int) -> bool:
        self._inflated += produced
        if self._inflated > self._max_inflated:
            self._stop(
                "deflate_bound",
                Kind.TOO_LARGE,
                f"deflated data set inflates past {self._max_inflated} bytes",
            )
            return False
        return True

    def _consume(self, fragment: bytes | memoryview) -> None:
        end = len(fragment)
        pos = 0
        while pos < end and not self.stopped:
            if self._mode != _HEADER:
                pos = self._take_value(fragment, pos, end)
                continue
            take = end - pos if end - pos < _WINDOW else _WINDOW
            if pos == 0 and take == end and isinstance(fragment, bytes):
                window = fragment
            else:
                window = bytes(fragment[pos : pos + take])
            if self._carry:
                window = self._carry + window
                self._carry = b""
            pos += take
            self._walk(window)

    def _take_value(self, fragment: bytes | memoryview, pos: int, end: int) -> int:
        """Skip or collect the current value's bytes in ``fragment[pos:end]``; the new pos."""
        take = self._remaining if self._remaining < end - pos else end - pos
        if self._mode == _COLLECTING:
            self._buffer += fragment[pos : pos + take]
        elif self._head_left:
            wanted = take if take < self._head_left else self._head_left
            self._buffer += fragment[pos : pos + wanted]
            self._head_left -= wanted
            if not self._head_left:
                self._deliver_head()
        self._remaining -= take
        self._offset += take
        if not self._remaining:
            collected = self._mode == _COLLECTING
            self._mode = _HEADER
            if collected:
                value = bytes(self._buffer)
                self._buffer = bytearray()
                if self._vr == _OFFSET_TABLE:
                    self._read_offsets(value)
                    self._fragments_at = self._offset
                else:
                    self._visitor.value(self._tag, self._vr, value, self._depth)
        return pos + take

    def _deliver_head(self) -> None:
        head = bytes(self._buffer)
        self._buffer = bytearray()
        self._visitor.head(self._tag, self._vr, head, self._depth)

    # ---- the walk ---------------------------------------------------------------------------

    def _walk(self, data: bytes) -> None:
        """Walk the headers in ``data``; an incomplete header is carried to the next window."""
        end = len(data)
        pos = 0
        base = self._offset  # stream position of data[0]
        visitor = self._visitor
        while not self.stopped and self._mode == _HEADER:
            limit = self._limits[-1]
            if limit >= 0 and base + pos >= limit and not self._close_containers(base + pos):
                return
            if end - pos < 8:
                break
            top = len(self._kinds) - 1
            kind = self._kinds[top]
            encoding = self._encodings[top]
            little = encoding != EXPLICIT_BE
            if little:
                tag = data[pos + 1] << 24 | data[pos] << 16 | data[pos + 3] << 8 | data[pos + 2]
            else:
                tag = data[pos] << 24 | data[pos + 1] << 16 | data[pos + 2] << 8 | data[pos + 3]
            if kind != _DATASET or tag >> 16 == 0xFFFE:
                if little:
                    length = (
                        data[pos + 4]
                        | data[pos + 5] << 8
                        | data[pos + 6] << 16
                        | data[pos + 7] << 24
                    )
                else:
                    length = (
                        data[pos + 4] << 24
                        | data[pos + 5] << 16
                        | data[pos + 6] << 8
                        | data[pos + 7]
                    )
                pos += 8
                self._offset = base + pos
                if kind == _SEQUENCE:
                    self._sequence_header(tag, length)
                elif kind == _FRAGMENTS:
                    pos = self._fragment_header(tag, length, data, pos)
                else:
                    self._delimiter_in_dataset(tag, length)
                continue
            if encoding == IMPLICIT_LE:
                vr = wire_vr = implicit_vr(tag)
                length = (
                    data[pos + 4] | data[pos + 5] << 8 | data[pos + 6] << 16 | data[pos + 7] << 24
                )
                header = 8
            else:
                vr = wire_vr = data[pos + 4] << 8 | data[pos + 5]
                info = VR_TABLE[vr]
                if not info & VR_KNOWN:
                    self._offset = base + pos
                    self._malformed("vr_unknown", f"{tag_text(tag)} has an unknown explicit VR")
                    return
                if info & VR_LONG:
                    if end - pos < 12:
                        break
                    if little:
                        length = (
                            data[pos + 8]
                            | data[pos + 9] << 8
                            | data[pos + 10] << 16
                            | data[pos + 11] << 24
                        )
                    else:
                        length = (
                            data[pos + 8] << 24
                            | data[pos + 9] << 16
                            | data[pos + 10] << 8
                            | data[pos + 11]
                        )
                    header = 12
                elif little:
                    length = data[pos + 6] | data[pos + 7] << 8
                    header = 8
                else:
                    length = data[pos + 6] << 8 | data[pos + 7]
                    header = 8
                if vr == UN and length != UNDEFINED:
                    vr = _known_vr(tag)
                    if vr == SQ:  # PS3.5 §6.2.2: its items are in Implicit VR Little Endian
                        encoding = IMPLICIT_LE
            pos += header
            self._offset = base + pos
            if not self._element_header(tag, vr, length):
                return
            if self.trace is not None:
                self.trace.append(
                    (self._depth, tag, 0 if encoding == IMPLICIT_LE else wire_vr, length)
                )
            if length == UNDEFINED:
                self._open_undefined(tag, vr)
                continue
            if vr == SQ:
                visitor.element(tag, SQ, length, self._depth)
                self._open(_SEQUENCE, base + pos + length, encoding)
                continue
            if tag >= FLOAT_PIXEL_DATA and self._depth == 0 and _is_pixel_tag(tag):
                self._end_header()
            action = visitor.element(tag, vr, length, self._depth)
            if self.stopped:
                return
            if length <= end - pos:
                if action == VALUE:
                    visitor.value(tag, vr, data[pos : pos + length], self._depth)
                elif action == HEAD:
                    cut = length if length < self.head_bytes else self.head_bytes
                    visitor.head(tag, vr, data[pos : pos + cut], self._depth)
                pos += length
                self._offset = base + pos
                continue
            # The value goes on past this window: take what is here, the rest comes later.
            self._start_value(tag, vr, length, action)
            self._take_value(data, pos, end)
            return
        if not self.stopped and self._mode == _HEADER:
            self._carry = data[pos:]  # an incomplete header: walked with the next window
            self._offset = base + pos

    def _start_value(self, tag: int, vr: int, length: int, action: int) -> None:
        """Skip or collect a value over the next feeds (``action``: what the visitor wants)."""
        self._tag = tag
        self._vr = vr
        self._remaining = length
        if action == VALUE:
            self._mode = _COLLECTING
        else:
            self._mode = _SKIPPING
            self._head_left = (
                (length if length < self.head_bytes else self.head_bytes) if action == HEAD else 0
            )

    # ---- containers -------------------------------------------------------------------------

    def _open(self, kind: int, end: int, encoding: int) -> None:
        if kind == _SEQUENCE:
            self._depth += 1
            if self._depth > self._max_depth:
                self._stop(
                    "nesting_depth",
                    Kind.MALFORMED,
                    f"sequences nested deeper than {self._max_depth}",
                )
                return
        self._kinds.append(kind)
        self._ends.append(end)
        self._limits.append(end if end >= 0 else self._limits[-1])
        self._previous.append(-1)
        self._encodings.append(encoding)
        if kind == _DATASET and len(self._kinds) > 1:
            self._visitor.item_start(self._depth)

    def _pop(self) -> None:
        kind = self._kinds.pop()
        self._ends.pop()
        self._limits.pop()
        self._previous.pop()
        self._encodings.pop()
        if kind == _SEQUENCE:
            self._depth -= 1
        elif kind == _DATASET:
            self._visitor.item_end(self._depth)
        else:
            self._fragments_end()

    def _close_containers(self, position: int) -> bool:
        """Pop every defined-length container that ends at ``position``; False if one was
        overrun."""
        while len(self._kinds) > 1 and not self.stopped:
            container_end = self._ends[-1]
            if container_end < 0 or position < container_end:
                return True
            if position > container_end:
                self._malformed("length_overrun", "an element overruns its sequence or item")
                return False
            self._pop()
        return not self.stopped

    def _fits(self, length: int) -> bool:
        """Whether a value of ``length`` after the current position fits every container."""
        limit = self._limits[-1]
        return limit < 0 or self._offset + length <= limit

    def _element_header(self, tag: int, vr: int, length: int) -> bool:
        top = len(self._kinds) - 1
        if tag <= self._previous[top]:
            self._malformed(
                "element_order",
                f"{tag_text(tag)} repeated or out of order (after {tag_text(self._previous[top])})",
            )
            return False
        self._previous[top] = tag
        self._elements += 1
        if self._elements > self._max_elements:
            self._stop(
                "element_count",
                Kind.TOO_LARGE,
                f"more than {self._max_elements} elements",
            )
            return False
        if length == UNDEFINED:
            return True
        if length & 1:
            self._malformed("odd_length", f"{tag_text(tag)} has an odd length ({length})")
            return False
        if not self._fits(length):
            self._malformed("length_overrun", f"{tag_text(tag)} overruns its container")
            return False
        unit = unit_size(vr)
        if length % unit:
            self._malformed(
                "vr_value", f"{tag_text(tag)}: length {length} is not a multiple of {unit}"
            )
            return False
        return True

    def _open_undefined(self, tag: int, vr: int) -> None:
        top = len(self._kinds) - 1
        encoding = self._encodings[top]
        if vr in (SQ, UN):
            self._visitor.element(tag, SQ, UNDEFINED, self._depth)
            # PS3.5 §6.2.2: an undefined-length UN is a sequence of Implicit VR LE items
            self._open(_SEQUENCE, -1, encoding if vr == SQ else IMPLICIT_LE)
        elif tag == PIXEL_DATA and vr in (OB, OW):
            if self._native:
                self._malformed(
                    "encapsulated_fragments",
                    "encapsulated Pixel Data in a native transfer syntax",
                )
                return
            if self._depth == 0:
                self._end_header()
            self._visitor.element(tag, vr, UNDEFINED, self._depth)
            self._pixel_tag = tag
            self._offsets = []
            self._next_offset = 0
            self._fragments_at = -1
            self._open(_FRAGMENTS, -1, encoding)
        else:
            self._malformed("length_overrun", f"{tag_text(tag)} has an undefined length")

    def _sequence_header(self, tag: int, length: int) -> None:
        if tag == ITEM:
            self._elements += 1
            if self._elements > self._max_elements:
                self._stop(
                    "element_count",
                    Kind.TOO_LARGE,
                    f"more than {self._max_elements} elements",
                )
                return
            if self.trace is not None:
                self.trace.append((self._depth, ITEM, 0, 0))
            encoding = self._encodings[-1]
            if length == UNDEFINED:
                self._open(_DATASET, -1, encoding)
            elif length & 1:
                self._malformed("odd_length", f"an item has an odd length ({length})")
            elif not self._fits(length):
                self._malformed("length_overrun", "an item overruns its sequence")
            else:
                self._open(_DATASET, self._offset + length, encoding)
        elif tag == SEQUENCE_DELIMITER and self._ends[-1] < 0:
            if length:
                self._malformed("delimiter", "a sequence delimiter with a length")
            else:
                self._pop()
        else:
            self._malformed("delimiter", f"{tag_text(tag)} where an item was expected")

    def _delimiter_in_dataset(self, tag: int, length: int) -> None:
        if tag == ITEM_DELIMITER and len(self._kinds) > 1 and self._ends[-1] < 0:
            if length:
                self._malformed("delimiter", "an item delimiter with a length")
            else:
                self._pop()
        else:
            self._malformed("delimiter", f"{tag_text(tag)} where a data element was expected")

    # ---- encapsulated pixel data (PS3.5 §A.4) -------------------------------------------------

    def _fragment_header(self, tag: int, length: int, data: bytes, pos: int) -> int:
        """An item header inside encapsulated pixel data; returns where the walk goes on."""
        if tag == SEQUENCE_DELIMITER:
            if length:
                self._fragments_bad("a sequence delimiter with a length")
            elif self._fragments_at < 0:
                self._fragments_bad("no Basic Offset Table item")
            else:
                self._pop()
            return pos
        if tag != ITEM:
            self._fragments_bad(f"{tag_text(tag)} where a fragment item was expected")
            return pos
        self._elements += 1
        if self._elements > self._max_elements:
            self._stop("element_count", Kind.TOO_LARGE, f"more than {self._max_elements} elements")
            return pos
        if length == UNDEFINED or length & 1:
            self._fragments_bad("a fragment item of undefined or odd length")
            return pos
        if self._fragments_at < 0:
            return self._offset_table(length, data, pos)
        self._fragment_start(self._offset - 8)
        if self.stopped:
            return pos
        if length <= len(data) - pos:
            if self._fragment_heads and length:
                cut = length if length < self.head_bytes else self.head_bytes
                self._visitor.head(self._pixel_tag, OB, data[pos : pos + cut], self._depth)
            self._offset += length
            return pos + length
        self._start_value(self._pixel_tag, OB, length, HEAD if self._fragment_heads else SKIP)
        return self._take_value(data, pos, len(data))

    def _offset_table(self, length: int, data: bytes, pos: int) -> int:
        if length % 4 or length > MAX_OFFSET_TABLE_BYTES:
            self._fragments_bad(f"a Basic Offset Table of {length} bytes")
            return pos
        if length <= len(data) - pos:
            self._read_offsets(data[pos : pos + length])
            self._offset += length
            self._fragments_at = self._offset
            return pos + length
        self._start_value(self._pixel_tag, _OFFSET_TABLE, length, VALUE)
        return self._take_value(data, pos, len(data))

    def _read_offsets(self, table: bytes) -> None:
        little = self._encodings[-1] != EXPLICIT_BE
        previous = -1
        offsets: list[int] = []
        for at in range(0, len(table), 4):
            if little:
                offset = table[at] | table[at + 1] << 8 | table[at + 2] << 16 | table[at + 3] << 24
            else:
                offset = table[at] << 24 | table[at + 1] << 16 | table[at + 2] << 8 | table[at + 3]
            if offset <= previous or (previous < 0 and offset != 0):
                self._fragments_bad("Basic Offset Table offsets do not start at 0 and increase")
                return
            previous = offset
            offsets.append(offset)
        self._offsets = offsets
        self._next_offset = 0

    def _fragment_start(self, position: int) -> None:
        """A fragment item starts at ``position``: the offset table may point only at such
        starts (PS3.5 §A.4: offsets are to the first byte of a frame's first fragment)."""
        offsets = self._offsets
        index = self._next_offset
        if index < len(offsets):
            relative = position - self._fragments_at
            if offsets[index] < relative:
                self._fragments_bad("a Basic Offset Table offset points inside a fragment")
            elif offsets[index] == relative:
                self._next_offset = index + 1

    def _fragments_end(self) -> None:
        if self._next_offset < len(self._offsets):
            self._fragments_bad("a Basic Offset Table offset points past the fragments")
        self._offsets = []

    def _fragments_bad(self, detail: str) -> None:
        self._malformed("encapsulated_fragments", f"encapsulated Pixel Data: {detail}")

    # ---- the end ----------------------------------------------------------------------------

    def _end_header(self) -> None:
        if not self.header_done:
            self.header_done = True
            self._visitor.header_end()

    def _finish(self) -> None:
        """``last`` was fed: the data set must end here, at a boundary of its top level."""
        if self._mode != _HEADER or self._carry or len(self._kinds) > 1:
            self._close_containers(self._offset)
            if self.stopped:
                return
        if self._mode != _HEADER or self._carry or len(self._kinds) > 1:
            if _FRAGMENTS in self._kinds:
                self._fragments_bad("the data set ends before the sequence delimiter")
            else:
                self._malformed("truncated", "the data set ends inside an element or sequence")
            return
        self.done = True
        self._end_header()


def _known_vr(tag: int) -> int:
    """The VR readers give an element sent as UN whose tag the dictionary knows: pydicom
    (``replace_un_with_known_vr``) and DCMTK read its value as that VR, so it is checked as that
    VR (a UI sent as UN is still a UID, an SQ a sequence)."""
    return implicit_vr(tag) if tag & 0x10000 == 0 else UN


def _is_pixel_tag(tag: int) -> bool:
    """Pixel Data, Float or Double Float Pixel Data (each at most once per data set)."""
    return tag in (PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_FLOAT_PIXEL_DATA)
