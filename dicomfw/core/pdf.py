"""Active content in an encapsulated PDF (PS3.3 §A.45 Encapsulated PDF IOD, ISO 32000-1).

A PDF report crossing the firewall is opened later by a workstation's PDF reader, the usual
target of a malicious PDF. ``pdf_problem`` refuses what makes a PDF act rather than show:

* the names of active content (ISO 32000-1 §12.6 actions, §7.11.4 embedded files, §12.7.8
  XFA, Adobe's RichMedia): ``/JavaScript``, ``/JS``, ``/Launch``, ``/EmbeddedFile(s)``,
  ``/RichMedia``, ``/XFA``, ``/AA`` (additional actions), and ``/OpenAction`` when its value is
  an action (a dictionary or an indirect reference; a destination array only turns a page);
  XFA's own XML (``xdp:xdp``, the xfa.org schema) counts too;
* names are compared after decoding their ``#xx`` escapes (§7.3.5: ``/J#61vaScript`` is
  ``/JavaScript`` to every reader);
* FlateDecode streams are inflated (bounded, all streams together, by ``max_inflated``) and
  their content scanned too: an object stream (§7.5.7 ``/ObjStm``) keeps dictionaries
  compressed, where a raw scan would not see them;
* what cannot be inspected is refused (``pdf_uninspectable``): an object stream that does not
  inflate (an encrypted PDF's do not) or is filtered by anything but FlateDecode.

The scan looks at every byte, inside streams too, since a reader that follows the
cross-reference table can find an object anywhere, even inside another stream's data. Short
names (``/JS``, ``/AA``, ``/XFA``) are looked for only in text-like bytes: random bytes (a
compressed image) spell one followed by a delimiter about once in 10^8 bytes; the long names
are looked for everywhere. A name inside a string or comment counts too: a false refusal of a
crafted document is the safe error.
"""

from __future__ import annotations

import re
import zlib
from typing import Final

_PDF_HEADER_WINDOW: Final = 1024  # readers accept "%PDF-" within the first 1024 bytes
_NAME: Final = re.compile(rb"/([^\x00\t\n\x0c\r ()<>\[\]{}/%]*)")
_STREAM: Final = re.compile(rb"(?<![A-Za-z])stream(?:\r\n|\n|\r)")
_ACTION_VALUE: Final = re.compile(
    rb"[\x00\t\n\x0c\r ]*(?:<<|\d+[\x00\t\n\x0c\r ]+\d+[\x00\t\n\x0c\r ]+R)"
)
_ESCAPE: Final = re.compile(rb"#([0-9A-Fa-f]{2})")
_LONG_NAMES: Final = frozenset(
    (b"JavaScript", b"Launch", b"EmbeddedFile", b"EmbeddedFiles", b"RichMedia")
)
_SHORT_NAMES: Final = frozenset((b"JS", b"AA", b"XFA"))
_XFA_MARKERS: Final = (b"xdp:xdp", b"http://www.xfa.org/schema")
_TEXT: Final = bytes(range(0x20, 0x7F)) + b"\t\n\x0c\r"
_TEXT_SAMPLE: Final = 1024
_DICTIONARY_WINDOW: Final = 4096  # how far before "stream" its dictionary is looked for
_FILTERS: Final = frozenset(
    (b"ASCIIHexDecode", b"AHx", b"ASCII85Decode", b"A85", b"LZWDecode", b"LZW",
     b"RunLengthDecode", b"RL", b"Crypt")
)  # fmt: skip


def is_pdf(document: bytes) -> bool:
    """Whether a PDF reader would take ``document`` for a PDF."""
    return b"%PDF-" in document[:_PDF_HEADER_WINDOW]


def _decode(name: bytes) -> bytes:
    if b"#" not in name:
        return name
    return _ESCAPE.sub(lambda match: bytes((int(match.group(1), 16),)), name)


def _text_like(region: bytes) -> bool:
    sample = region[:_TEXT_SAMPLE]
    return len(sample.translate(None, _TEXT)) * 10 <= len(sample)


def _active_name(region: bytes, text: bool) -> str | None:
    """The first active-content name in ``region``, as "/Name"; short names only if ``text``."""
    for match in _NAME.finditer(region):
        name = _decode(match.group(1))
        if name in _LONG_NAMES or (text and name in _SHORT_NAMES):
            return "/" + name.decode("ascii")
        if name == b"OpenAction" and _ACTION_VALUE.match(region, match.end()):
            return "/OpenAction with an action"
    for marker in _XFA_MARKERS:
        if marker in region:
            return "an XFA form"
    return None


def _names(window: bytes) -> set[bytes]:
    return {_decode(match.group(1)) for match in _NAME.finditer(window)}


class _Inflater:
    """Inflates FlateDecode streams within one budget for the whole document."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.left = budget
        self.exceeded = False

    def inflate(self, data: bytes) -> bytes | None:
        """The inflated stream, or None if it does not inflate; sets ``exceeded`` past the
        budget."""
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(data, self.left + 1)
        except zlib.error:
            return None
        if len(out) > self.left:
            self.exceeded = True
            return None
        self.left -= len(out)
        return out if inflater.eof else None


def pdf_problem(document: bytes, max_inflated: int) -> tuple[str, str] | None:
    """(check, detail) for the first reason to refuse ``document``, or None. Checks:
    ``pdf_active_content``, ``pdf_uninspectable``, ``deflate_bound`` (the inflation bound)."""
    if not is_pdf(document):
        return None
    inflater = _Inflater(max_inflated)
    position = 0  # end of the last stream's data
    for match in _STREAM.finditer(document):
        if match.start() < position:
            continue  # the word inside a stream's data
        found = _active_name(document[position : match.start()], True)
        if found:
            return _active(found, "")
        start = match.end()
        stop = document.find(b"endstream", start)
        position = stop if stop >= 0 else len(document)
        problem = _stream_problem(document, match.start(), document[start:position], inflater)
        if problem:
            return problem
    found = _active_name(document[position:], True)
    return _active(found, "") if found else None


def _active(found: str, where: str) -> tuple[str, str]:
    return "pdf_active_content", f"Encapsulated Document: a PDF with {found}{where}"


def _stream_problem(
    document: bytes, keyword: int, data: bytes, inflater: _Inflater
) -> tuple[str, str] | None:
    """A stream's raw data, and its content when it is FlateDecode."""
    found = _active_name(data, _text_like(data))
    if found:
        return _active(found, " in a stream")
    before = document[max(0, keyword - _DICTIONARY_WINDOW) : keyword]
    names = _names(before[before.rfind(b"obj") + 1 :])
    object_stream = b"ObjStm" in names
    if object_stream and names & _FILTERS:
        return (
            "pdf_uninspectable",
            "Encapsulated Document: an object stream filtered otherwise than by FlateDecode",
        )
    if b"FlateDecode" not in names and b"Fl" not in names:
        return None
    inflated = inflater.inflate(data)
    if inflater.exceeded:
        return (
            "deflate_bound",
            f"Encapsulated Document: PDF streams inflate past {inflater.budget} bytes",
        )
    if inflated is None:
        if object_stream:
            return "pdf_uninspectable", "Encapsulated Document: an object stream does not inflate"
        return None
    found = _active_name(inflated, _text_like(inflated))
    return _active(found, " in a compressed stream") if found else None
