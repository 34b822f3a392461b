"""Content validation: inspect a data set crossing the firewall before any parser behind it does.

``DataSetInspector`` is fed one data set's PDV fragments in order (any split, down to one byte)
and returns ``Finding``s: the reasons to refuse it. It walks the data set with
``dicomfw.core.dataset.Walker`` (structure: every rule where two parsers could read the bytes
differently) and runs the content checks as the elements go by. Pure and sans-IO: no clock, no
file, no global state; everything it holds is bounded by ``ContentRules`` (see "Memory").

Two tiers. *Safety* checks (what a parser exploit needs) run wherever validation is on;
*conformance* checks (``Finding.conformance``) run only with ``ContentRules.conformance`` and
may be run in monitor mode: real archives break them and read the same everywhere.

Which checks apply to which message (``Message.command_field``):

============================  ==========================================================
every data set                structure (``dataset``), ``uid_syntax``, pixel/overlay
                              lengths wherever pixel data is (an N-SET of a print image
                              box carries some), ``refused_attribute``,
                              ``private_creator``, ``executable_content``; conformance:
                              ``uid_leading_zero``, ``value_syntax``
C-STORE-RQ (either side: a    + ``sop_class_mismatch``, ``sop_instance_mismatch`` (command
C-GET's sub-operations come   vs (0008,0016)/(0008,0018)), ``context_mismatch`` (SOP class
from the upstream)            vs the context's abstract syntax), ``required_attribute``,
                              ``value_not_allowed``, ``instance_size``, ``document_type``,
                              ``pdf_active_content``, ``pdf_uninspectable``,
                              ``document_size``
C-FIND-RQ                     + ``query_level``, ``query_keys``, ``universal_match``;
                              Modality Worklist: its keys, ``worklist_characters``
C-GET-RQ, C-MOVE-RQ           + ``query_level``, ``query_keys`` (unique keys only)
C-FIND-RSP (pending)          + ``query_keys`` at the response's level (Q/R models)
N-* requests and responses,   the "every data set" checks
N-EVENT-REPORT, C-GET/MOVE-RSP
============================  ==========================================================

Check names, kinds and tiers (``CHECKS``); the walker's structural checks stop the walk, the
others do not (so a session in monitor mode sees them all, up to ``MAX_FINDINGS``).

Memory: per data set, one element header (12 bytes), one value the checks read (at most
``max_value_bytes``; an Encapsulated Document at most ``max_document_bytes``), the first 4 KiB
of an opaque value (executable check), a Basic Offset Table (1 MiB), a few integers per open
sequence (``max_depth``), per open data set its image attributes and up to
``MAX_PRIVATE_CREATORS`` private creator blocks, a bounded set of query keys, a deflate state
(~300 KiB) and at most ``MAX_FINDINGS`` findings. Time: linear in the bytes; native pixel data
is skipped by its length.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from dicomfw.core.dataset import (
    DOUBLE_FLOAT_PIXEL_DATA,
    FLOAT_PIXEL_DATA,
    HEAD,
    PIXEL_DATA,
    SKIP,
    UNDEFINED,
    VALUE,
    Visitor,
    Walker,
)
from dicomfw.core.dictionary import (
    OB,
    OPAQUE_VRS,
    OW,
    SQ,
    SYNTAX_VRS,
    TEXT_VRS,
    UI,
    VR_ALWAYS_READ,
    VR_OPAQUE,
    VR_SYNTAX,
    VR_TABLE,
    single_valued,
)
from dicomfw.core.executable import HEAD_BYTES, executable_kind
from dicomfw.core.findings import STRUCTURAL, Finding, Kind, shown, tag_text
from dicomfw.core.pdf import is_pdf, pdf_problem
from dicomfw.core.pixels import (
    OVERLAY_COLUMNS,
    OVERLAY_DATA,
    OVERLAY_FRAMES,
    OVERLAY_ROWS,
    PIXEL_ATTRIBUTES,
    ImageAttributes,
    is_overlay_group,
)
from dicomfw.core.querykeys import (
    LEVEL_NAMES,
    MODALITY_WORKLIST,
    MODELS,
    QUERY_RETRIEVE_LEVEL,
    SCHEDULED_PROCEDURE_STEP_SEQUENCE,
    SCHEDULED_STEP_KEYS,
    UNIQUE_KEYS,
    WORKLIST_KEYS,
    WORKLIST_LEVEL,
    is_universal,
    key_problem,
    level_of,
)
from dicomfw.core.values import (
    query_characters_problem,
    strip_padding,
    syntax_problem,
    uid_leading_zero,
    uid_problem,
)

__all__ = [
    "CHECKS",
    "ContentRules",
    "DataSetInspector",
    "Finding",
    "Kind",
    "Message",
]

MIB: Final = 1_048_576
#: Findings one data set reports at most (a data set of 100,000 bad UIDs is one refusal).
MAX_FINDINGS: Final = 16
#: Private creator blocks one data set (or item) may reserve when creators are restricted.
MAX_PRIVATE_CREATORS: Final = 256

#: check name -> (kind, conformance tier)
CHECKS: Final[dict[str, tuple[Kind, bool]]] = {
    # structure (dicomfw.core.dataset): the walk stops
    "transfer_syntax": (Kind.UNSUPPORTED, False),
    "truncated": (Kind.MALFORMED, False),
    "length_overrun": (Kind.MALFORMED, False),
    "delimiter": (Kind.MALFORMED, False),
    "element_order": (Kind.MALFORMED, False),
    "odd_length": (Kind.MALFORMED, False),
    "vr_unknown": (Kind.MALFORMED, False),
    "vr_value": (Kind.MALFORMED, False),
    "nesting_depth": (Kind.MALFORMED, False),
    "element_count": (Kind.TOO_LARGE, False),
    "encapsulated_fragments": (Kind.MALFORMED, False),
    "deflate_bound": (Kind.TOO_LARGE, False),
    "deflate_stream": (Kind.MALFORMED, False),
    "instance_size": (Kind.TOO_LARGE, False),
    "document_size": (Kind.TOO_LARGE, False),
    # values
    "uid_syntax": (Kind.MALFORMED, False),
    "pixel_data_length": (Kind.MALFORMED, False),
    "overlay_data_length": (Kind.MALFORMED, False),
    "uid_leading_zero": (Kind.MALFORMED, True),
    "value_syntax": (Kind.MALFORMED, True),
    "deflate_trailing": (Kind.MALFORMED, True),
    # consistency
    "sop_class_mismatch": (Kind.MISMATCH, False),
    "sop_instance_mismatch": (Kind.MISMATCH, False),
    "context_mismatch": (Kind.MISMATCH, False),
    "query_level": (Kind.MISMATCH, False),
    "query_keys": (Kind.MISMATCH, False),
    "worklist_characters": (Kind.MISMATCH, False),
    "universal_match": (Kind.FORBIDDEN, False),
    # content policy
    "required_attribute": (Kind.FORBIDDEN, False),
    "value_not_allowed": (Kind.FORBIDDEN, False),
    "refused_attribute": (Kind.FORBIDDEN, False),
    "private_creator": (Kind.FORBIDDEN, False),
    "document_type": (Kind.FORBIDDEN, False),
    "pdf_active_content": (Kind.FORBIDDEN, False),
    "pdf_uninspectable": (Kind.FORBIDDEN, False),
    "executable_content": (Kind.FORBIDDEN, False),
}

C_STORE_RQ: Final = 0x0001
C_GET_RQ: Final = 0x0010
C_FIND_RQ: Final = 0x0020
C_MOVE_RQ: Final = 0x0021
C_FIND_RSP: Final = 0x8020

SOP_CLASS_UID: Final = 0x00080016
SOP_INSTANCE_UID: Final = 0x00080018
ENCAPSULATED_DOCUMENT: Final = 0x00420011
DOCUMENT_MIME_TYPE: Final = 0x00420012

# What a message's data set is (see the table in the module docstring).
_OTHER: Final = 0
_INSTANCE: Final = 1
_QUERY: Final = 2
_RETRIEVE: Final = 3
_QUERY_RESPONSE: Final = 4


@dataclass(frozen=True)
class ContentRules:
    """The content rules of one route, compiled once from the rules file; immutable.

    ``conformance``: run the conformance tier. ``max_depth``: sequence nesting. ``max_elements``:
    elements per data set, all levels (items and fragments count). ``max_instance_bytes``: a
    C-STORE data set's size on the wire. ``max_inflated_bytes``: what a deflated data set, or a
    PDF's FlateDecode streams, may inflate to. ``max_value_bytes``: the largest value a check
    reads (a UID list, a text value); a longer UI value is refused. ``max_document_bytes``: the
    largest Encapsulated Document scanned for active content; a longer PDF is refused.
    ``required``: top-level tags that must be present and not empty (C-STORE).
    ``allowed_values``: top-level tag -> the values it may have, padding stripped, each of a
    multi-valued element (C-STORE). ``refused``: tags refused wherever they appear.
    ``private_creators``: None allows any private element; a set allows only elements of those
    creators (compared without padding), and refuses private elements with no creator.
    ``universal_match_refused``: level ("PATIENT" ... "IMAGE", "WORKLIST") -> keys a C-FIND may
    not match universally. ``document_types``: allowed MIME types of (0042,0012), None: any.
    ``active_content``: refuse PDFs with active content. ``executables``: refuse executables
    at the start of OB/OW/UN/UT/LT values and encapsulated fragments.
    """

    conformance: bool = False
    max_depth: int = 16
    max_elements: int = 100_000
    max_instance_bytes: int | None = None
    max_inflated_bytes: int = 256 * MIB
    max_value_bytes: int = MIB
    max_document_bytes: int = 64 * MIB
    required: tuple[int, ...] = ()
    allowed_values: Mapping[int, frozenset[str]] = field(default_factory=dict)
    refused: frozenset[int] = frozenset()
    private_creators: frozenset[str] | None = None
    universal_match_refused: Mapping[str, frozenset[int]] = field(default_factory=dict)
    document_types: frozenset[str] | None = None
    active_content: bool = True
    executables: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    """What a data set travels with: its command and presentation context."""

    command_field: int  # 0x0001 C-STORE-RQ, 0x0020 C-FIND-RQ, 0x8020 C-FIND-RSP, ...
    sop_class: str  # Affected/Requested SOP Class UID of the command ("" when absent)
    sop_instance: str
    abstract_syntax: str  # the presentation context's
    transfer_syntax: str  # negotiated for that context


def _role(command_field: int) -> int:
    if command_field == C_STORE_RQ:
        return _INSTANCE
    if command_field == C_FIND_RQ:
        return _QUERY
    if command_field in (C_GET_RQ, C_MOVE_RQ):
        return _RETRIEVE
    if command_field == C_FIND_RSP:
        return _QUERY_RESPONSE
    return _OTHER


def _text(value: bytes) -> str:
    return value.strip(b"\x00 ").decode("latin-1")


class DataSetInspector(Visitor):
    """One data set, fed in order as its PDV fragments arrive (any split, including 1 byte)."""

    def __init__(self, rules: ContentRules, message: Message) -> None:
        self._rules = rules
        self._message = message
        self._role = _role(message.command_field)
        self._worklist = message.abstract_syntax == MODALITY_WORKLIST
        model = MODELS.get(message.abstract_syntax)
        self._levels: tuple[int, ...] = model[0] if model is not None else ()
        self._findings: list[Finding] = []
        #: What ``element`` looks at beyond the odd groups, overlays and identifiers: the fast
        #: path skips everything else without a second look.
        #: Top-level tags a C-STORE's policy checks read.
        self._policy_tags = (
            frozenset(rules.required) | frozenset(rules.allowed_values) | {DOCUMENT_MIME_TYPE}
        )
        self._watched = (
            PIXEL_ATTRIBUTES
            | _PIXEL_DATA_TAGS
            | self._policy_tags
            | rules.refused
            | {ENCAPSULATED_DOCUMENT}
        )
        self._watched_vrs = (
            VR_ALWAYS_READ
            | (VR_SYNTAX if rules.conformance else 0)
            | (VR_OPAQUE if rules.executables else 0)
        )
        self._any_private = rules.private_creators is None
        self._reported = 0
        self._fed = 0
        self._instance = self._role == _INSTANCE
        self._identifier = self._role in (_QUERY, _RETRIEVE, _QUERY_RESPONSE)
        self._walker = Walker(
            self,
            message.transfer_syntax,
            self._findings,
            max_depth=rules.max_depth,
            max_elements=rules.max_elements,
            max_inflated=rules.max_inflated_bytes,
            head_bytes=HEAD_BYTES,
            fragment_heads=rules.executables,
        )
        # Per open data set (top level, then items): image attributes, private creator blocks.
        self._images: list[ImageAttributes | None] = [None]
        self._creators: list[set[int] | None] = [None]
        self._top_sequence = 0  # the top-level sequence being walked (required SQ attributes)
        self._step_items = 0  # Scheduled Procedure Step items open (worklist keys)
        # What the header-end checks need, from top-level elements.
        self._sop_class: str | None = None
        self._sop_instance: str | None = None
        self._present: set[int] = set()  # required / document tags seen non-empty
        self._document = False
        #: top-level keys whose universality matters: the route's refused keys, at any level
        self._universal_keys: frozenset[int] = frozenset().union(
            *rules.universal_match_refused.values()
        )
        self._mime_type: str | None = None
        self._level: str | None = None
        self._keys: list[int] = []  # top-level keys of an identifier with a known level
        self._specific: dict[int, bool] = {}  # top-level key -> its value matches universally

    # ---- API --------------------------------------------------------------------------------

    def feed(self, fragment: bytes | memoryview, last: bool) -> list[Finding]:
        """Findings discovered by this fragment ([] mostly). After a finding of a structural
        kind the walk cannot go on: later feeds return []. Never raises; keeps no reference to
        ``fragment``."""
        self._fed += len(fragment)
        walker = self._walker
        limit = self._rules.max_instance_bytes
        # Once stopped or done, only a finding made before the first feed (transfer_syntax)
        # may be left to return.
        if walker.stopped or walker.done:
            return self._take_findings()
        if self._instance and limit is not None and self._fed > limit:
            self._report("instance_size", f"the data set is larger than {limit} bytes")
        else:
            walker.feed(fragment, last)
            if last and walker.done:
                self._end_checks()
        return self._take_findings()

    def _take_findings(self) -> list[Finding]:
        found = list(self._findings)
        self._findings.clear()
        return found

    @property
    def header_checked(self) -> bool:
        """True once every check that needs only the elements before the top-level Pixel Data
        (or Float/Double Float Pixel Data), or before the end of the data set when there is
        none, has run (or a structural finding ended the walk); their findings were returned by
        the feed that made this True."""
        return self._walker.header_done or self._walker.stopped

    @property
    def fed(self) -> int:
        """Bytes fed so far (as received: a deflated data set's compressed bytes)."""
        return self._fed

    @property
    def needs_scan(self) -> bool:
        """The data set carries an Encapsulated Document (0042,0011): it is scanned when its
        value is complete, before ``header_checked`` turns True (a document instance has no
        pixel data), so the session holds the whole data set until then."""
        return self._document

    # ---- reporting --------------------------------------------------------------------------

    def _report(self, check: str, detail: str) -> None:
        kind, conformance = CHECKS[check]
        if conformance and not self._rules.conformance:
            return
        if self._reported < MAX_FINDINGS:
            self._findings.append(Finding(check, kind, detail, conformance))
        self._reported += 1
        if kind in STRUCTURAL and not conformance:
            self._walker.stopped = True

    # ---- the walker's visitor ---------------------------------------------------------------

    def element(self, tag: int, vr: int, length: int, depth: int) -> int:
        group = tag >> 16
        if (
            not VR_TABLE[vr] & self._watched_vrs
            and (self._any_private or not group & 1)
            and length != UNDEFINED
            and not self._identifier
            and not 0x6000 <= group <= 0x601E
            and tag not in self._watched
        ):
            return SKIP  # most elements: nothing to read, nothing to note
        return self._element(tag, vr, length, depth)

    def _element(self, tag: int, vr: int, length: int, depth: int) -> int:
        rules = self._rules
        if tag in rules.refused:
            self._report("refused_attribute", f"{tag_text(tag)} is refused by the rules")
        group = tag >> 16
        if group & 1 and rules.private_creators is not None and not self._private(tag):
            return SKIP
        if depth == 0:
            self._top_element(tag, vr, length)
        elif self._in_step_item(depth) and tag not in SCHEDULED_STEP_KEYS:
            self._report("query_keys", f"{tag_text(tag)} is not a Scheduled Procedure Step key")
        if vr == SQ or length == UNDEFINED:
            return SKIP
        if vr == UI:
            if length > rules.max_value_bytes:
                self._report("uid_syntax", f"{tag_text(tag)}: a UID value of {length} bytes")
                return SKIP
            return VALUE
        if tag in PIXEL_ATTRIBUTES or (is_overlay_group(group) and tag & 0xFFFF < 0x0100):
            return VALUE
        if tag in _PIXEL_DATA_TAGS:
            self._pixel_length(tag, length)
            if depth == 0:
                self._declared_size(length)
        elif is_overlay_group(group) and tag & 0xFFFF == OVERLAY_DATA:
            self._overlay_length(tag, length)
        if length > rules.max_value_bytes:
            return self._large(tag, vr, length, depth)
        if self._wants_value(tag, vr, depth):
            return VALUE
        if rules.executables and vr in OPAQUE_VRS and length:
            return HEAD
        return SKIP

    def _in_step_item(self, depth: int) -> bool:
        """In a Scheduled Procedure Step item of a Modality Worklist query."""
        return self._worklist and depth == 1 and self._step_items > 0 and self._role == _QUERY

    def _wants_value(self, tag: int, vr: int, depth: int) -> bool:
        rules = self._rules
        if depth == 0 and (
            tag == ENCAPSULATED_DOCUMENT
            or (self._instance and tag in self._policy_tags and vr in TEXT_VRS)
        ):
            return True
        return (
            (self._identifier and (depth == 0 or self._worklist))
            or (tag >> 16 & 1 == 1 and rules.private_creators is not None and tag & 0xFF00 == 0)
            or (rules.conformance and vr in SYNTAX_VRS)
        )

    def _large(self, tag: int, vr: int, length: int, depth: int) -> int:
        """A value longer than ``max_value_bytes``: only an Encapsulated Document is read whole
        (up to ``max_document_bytes``), of the others at most the first bytes."""
        if depth == 0:
            self._present.add(tag)  # too long to be empty
            if tag == ENCAPSULATED_DOCUMENT and self._rules.active_content:
                return VALUE if length <= self._rules.max_document_bytes else HEAD
        if self._rules.executables and vr in OPAQUE_VRS:
            return HEAD
        return SKIP

    def value(self, tag: int, vr: int, value: bytes, depth: int) -> None:
        group = tag >> 16
        if vr == UI:
            self._uid(tag, value)
        elif tag in PIXEL_ATTRIBUTES:
            self._image().read(tag, value, self._walker.little)
        elif is_overlay_group(group) and tag & 0xFFFF in _OVERLAY_ATTRIBUTES:
            self._image().read_overlay(group, tag & 0xFFFF, value, self._walker.little)
        if self._rules.conformance:
            problem = syntax_problem(vr, value, self._identifier)
            if problem:
                self._report("value_syntax", f"{tag_text(tag)}: {problem}")
        if group & 1 and tag & 0xFF00 == 0 and self._rules.private_creators is not None:
            self._creator(tag, value)
        if self._identifier:
            self._key_value(tag, vr, value, depth)
        if depth == 0:
            self._top_value(tag, vr, value)
        if vr in OPAQUE_VRS and self._rules.executables:
            self._executable(tag, vr, value[:HEAD_BYTES])

    def head(self, tag: int, vr: int, head: bytes, depth: int) -> None:
        if depth == 0 and tag == ENCAPSULATED_DOCUMENT and self._too_large_pdf(head):
            self._report(
                "document_size",
                f"a PDF Encapsulated Document larger than {self._rules.max_document_bytes} "
                "bytes cannot be inspected",
            )
        if self._rules.executables:
            self._executable(tag, vr, head)

    def _too_large_pdf(self, head: bytes) -> bool:
        """``head`` is the start of an Encapsulated Document too large to scan, and a PDF."""
        return self._rules.active_content and is_pdf(head)

    def item_start(self, depth: int) -> None:
        self._images.append(None)
        self._creators.append(None)
        if depth == 1:
            self._present.add(self._top_sequence)
            if self._top_sequence == SCHEDULED_PROCEDURE_STEP_SEQUENCE:
                self._step_items += 1

    def item_end(self, depth: int) -> None:
        self._images.pop()
        self._creators.pop()
        if depth == 1 and self._top_sequence == SCHEDULED_PROCEDURE_STEP_SEQUENCE:
            self._step_items -= 1

    def header_end(self) -> None:
        if self._instance:
            self._instance_checks()
        elif self._identifier:
            self._identifier_checks()

    # ---- values -----------------------------------------------------------------------------

    def _uid(self, tag: int, value: bytes) -> None:
        problem = uid_problem(value)
        if problem:
            self._report("uid_syntax", f"{tag_text(tag)}: {problem}")
        elif self._rules.conformance and uid_leading_zero(value):
            self._report(
                "uid_leading_zero", f"{tag_text(tag)}: a UID component with a leading zero"
            )

    def _executable(self, tag: int, vr: int, head: bytes) -> None:
        if vr == OW and not self._walker.little:
            head = _swap_words(head)
        kind = executable_kind(head)
        if kind is not None:
            where = "an encapsulated fragment" if tag == PIXEL_DATA and vr == OB else tag_text(tag)
            self._report("executable_content", f"{where} starts with a {kind} executable")

    def _image(self) -> ImageAttributes:
        image = self._images[-1]
        if image is None:
            image = self._images[-1] = ImageAttributes()
        return image

    def _pixel_length(self, tag: int, length: int) -> None:
        image = self._images[-1]
        problem = (
            image.pixel_problem(length)
            if image is not None
            else "Rows, Columns or Bits Allocated is missing or invalid"
        )
        if problem:
            self._report("pixel_data_length", f"{tag_text(tag)}: {problem}")

    def _declared_size(self, length: int) -> None:
        """An instance whose Pixel Data alone would take it past ``max_instance_bytes`` is
        refused from the element's header, before anything of it is forwarded (else the size
        check fires only once the bytes have arrived, and by then the message streams: an
        abort instead of an answer). Deflated data sets are measured as they arrive."""
        limit = self._rules.max_instance_bytes
        walker = self._walker
        if (
            self._instance
            and limit is not None
            and not walker.deflated
            and walker.position + length > limit
        ):
            self._report("instance_size", f"the Pixel Data alone takes it past {limit} bytes")

    def _overlay_length(self, tag: int, length: int) -> None:
        image = self._images[-1]
        problem = (
            image.overlay_problem(tag >> 16, length)
            if image is not None
            else "Overlay Rows or Columns is missing or invalid"
        )
        if problem:
            self._report("overlay_data_length", f"{tag_text(tag)}: {problem}")

    # ---- private elements (PS3.5 §7.8.1) -----------------------------------------------------

    def _private(self, tag: int) -> bool:
        """A private element of an allowed creator (or a creator / group length element)."""
        element = tag & 0xFFFF
        if element == 0 or 0x0010 <= element <= 0x00FF:
            return True
        group = tag >> 16
        creators = self._creators[-1]
        if group <= 0x0007 or group == 0xFFFF:
            self._report("private_creator", f"{tag_text(tag)} is in a group that cannot be private")
            return False
        if creators is None or (group << 8 | element >> 8) not in creators:
            self._report(
                "private_creator",
                f"{tag_text(tag)}: no allowed private creator reserves its block",
            )
            return False
        return True

    def _creator(self, tag: int, value: bytes) -> None:
        allowed = self._rules.private_creators
        assert allowed is not None
        name = _text(value)
        if name not in allowed:
            self._report(
                "private_creator",
                f"{tag_text(tag)}: private creator {shown(value.strip(b' '))} is not allowed",
            )
            return
        creators = self._creators[-1]
        if creators is None:
            creators = self._creators[-1] = set()
        if len(creators) >= MAX_PRIVATE_CREATORS:
            self._report("private_creator", f"more than {MAX_PRIVATE_CREATORS} private creators")
            return
        creators.add((tag >> 16) << 8 | (tag & 0xFF))

    # ---- top-level elements ------------------------------------------------------------------

    def _top_element(self, tag: int, vr: int, length: int) -> None:
        if vr == SQ:
            self._top_sequence = tag  # present (not empty) once it has an item
        elif length and vr not in TEXT_VRS:  # encapsulated pixel data too
            self._present.add(tag)  # a binary value is not empty if it has bytes
        if tag == ENCAPSULATED_DOCUMENT:
            self._document = True
        if self._identifier:
            if len(self._keys) < MAX_KEYS:
                self._keys.append(tag)
            else:
                self._report("query_keys", f"more than {MAX_KEYS} keys")
            if self._worklist and self._role == _QUERY and tag not in WORKLIST_KEYS:
                self._report("query_keys", f"{tag_text(tag)} is not a Modality Worklist key")

    def _top_value(self, tag: int, vr: int, value: bytes) -> None:
        if vr in TEXT_VRS and value.strip(b"\x00 "):
            self._present.add(tag)
        if tag == SOP_CLASS_UID:
            self._sop_class = _text(value)
        elif tag == SOP_INSTANCE_UID:
            self._sop_instance = _text(value)
        elif tag == DOCUMENT_MIME_TYPE:
            self._mime_type = _text(value)
        elif tag == ENCAPSULATED_DOCUMENT and self._rules.active_content:
            found = pdf_problem(value, self._rules.max_inflated_bytes)
            if found is not None:
                self._report(found[0], found[1])
        elif tag == QUERY_RETRIEVE_LEVEL:
            self._level = level_of(value)
        allowed = self._rules.allowed_values.get(tag) if self._instance else None
        if allowed is not None:
            for one in strip_padding(value).split(b"\\"):
                if _text(one) not in allowed:
                    self._report(
                        "value_not_allowed", f"{tag_text(tag)}: {shown(one)} is not allowed"
                    )

    def _key_value(self, tag: int, vr: int, value: bytes, depth: int) -> None:
        if self._worklist and self._role == _QUERY:
            problem = query_characters_problem(vr, value, single_valued(tag))
            if problem:
                self._report("worklist_characters", f"{tag_text(tag)}: {problem}")
        if depth == 0 and (tag in UNIQUE_KEYS or tag in self._universal_keys):
            self._specific[tag] = not is_universal(value)

    # ---- header-end checks -------------------------------------------------------------------

    def _instance_checks(self) -> None:
        message = self._message
        sop_class = self._sop_class
        if sop_class is None:
            self._report("sop_class_mismatch", "the data set has no SOP Class UID (0008,0016)")
        else:
            if message.sop_class and sop_class != message.sop_class:
                self._report(
                    "sop_class_mismatch",
                    f"SOP Class UID {shown(sop_class.encode(), 64)} is not the command's",
                )
            if message.abstract_syntax and sop_class != message.abstract_syntax:
                self._report(
                    "context_mismatch",
                    f"SOP Class UID {shown(sop_class.encode(), 64)} is not the presentation "
                    "context's abstract syntax",
                )
        if self._sop_instance is None:
            self._report(
                "sop_instance_mismatch", "the data set has no SOP Instance UID (0008,0018)"
            )
        elif message.sop_instance and self._sop_instance != message.sop_instance:
            self._report(
                "sop_instance_mismatch",
                f"SOP Instance UID {shown(self._sop_instance.encode(), 64)} is not the command's",
            )
        self._required(True)
        types = self._rules.document_types
        if types is not None and self._document and self._mime_type not in types:
            mime = shown((self._mime_type or "").encode())
            self._report("document_type", f"Encapsulated Document of MIME type '{mime}'")

    def _required(self, before_pixels: bool) -> None:
        for tag in self._rules.required:
            if (tag < FLOAT_PIXEL_DATA) == before_pixels and tag not in self._present:
                self._report("required_attribute", f"{tag_text(tag)} is missing or empty")

    def _end_checks(self) -> None:
        if self._walker.trailing:
            self._report("deflate_trailing", "bytes after the end of the deflated data set")
        if self._instance:
            self._required(False)

    def _identifier_checks(self) -> None:
        if self._worklist:
            if self._role == _QUERY:
                self._universal(WORKLIST_LEVEL)
            return
        if not self._levels:
            return  # a model without key tables: structure and values only
        name = self._level
        if name is None:
            if self._role != _QUERY_RESPONSE:
                self._report("query_level", "Query/Retrieve Level (0008,0052) is missing")
            return
        level = LEVEL_NAMES.index(name) if name in LEVEL_NAMES else -1
        if level not in self._levels:
            self._report(
                "query_level",
                f"Query/Retrieve Level '{shown(name.encode())}' is not one of the model's",
            )
            return
        retrieve = self._role == _RETRIEVE
        for tag in self._keys:
            problem = key_problem(tag, level, retrieve)
            if problem:
                self._report("query_keys", f"{tag_text(tag)} {problem}")
        if retrieve and not self._specific.get(UNIQUE_KEYS[level], False):
            self._report(
                "query_keys",
                f"the unique key {tag_text(UNIQUE_KEYS[level])} of a {name} retrieve is "
                "missing or universal",
            )
        if self._role == _QUERY:
            self._universal(name)

    def _universal(self, level: str) -> None:
        for tag in sorted(self._rules.universal_match_refused.get(level, frozenset())):
            if not self._specific.get(tag, False):
                self._report(
                    "universal_match",
                    f"{tag_text(tag)} may not match universally at the {level} level",
                )


_OVERLAY_ATTRIBUTES: Final = frozenset((OVERLAY_ROWS, OVERLAY_COLUMNS, OVERLAY_FRAMES))
_PIXEL_DATA_TAGS: Final = frozenset((PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_FLOAT_PIXEL_DATA))

#: Top-level keys an identifier may carry (more is no query a person wrote).
MAX_KEYS: Final = 1024


def _swap_words(head: bytes) -> bytes:
    """OW bytes as a little-endian reader stores them (PS3.5 §7.3: OW is byte-swapped in
    Explicit VR Big Endian)."""
    swapped = bytearray(len(head) & ~1)
    swapped[0::2] = head[1 : len(swapped) : 2]
    swapped[1::2] = head[0 : len(swapped) : 2]
    return bytes(swapped)
