"""Data sets built byte by byte for content-validation tests: well-formed and crafted ones.

pydicom writes the well-formed ones; the malformed ones (a repeated element, an overrunning
length) pydicom would not write, so they are put together here element by element.
"""

from __future__ import annotations

import random
import struct

from dicomfw.core.content import ContentRules, DataSetInspector, Finding, Message

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
CT = "1.2.840.10008.5.1.4.1.1.2"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
INSTANCE = "1.2.826.0.1.3680043.8.498.10"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
WORKLIST = "1.2.840.10008.5.1.4.31"
UNDEFINED = 0xFFFFFFFF
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}


def element(tag: int, vr: str, value: bytes, *, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element; ``length`` overrides the value's."""
    size = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in _LONG:
        return head + struct.pack("<HL", 0, size) + value
    return head + struct.pack("<H", size) + value


def implicit(tag: int, value: bytes, *, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, size) + value


def text(tag: int, vr: str, value: str) -> bytes:
    raw = value.encode("latin-1")
    pad = b"\x00" if vr == "UI" else b" "
    return element(tag, vr, raw + pad if len(raw) % 2 else raw)


def us(tag: int, value: int) -> bytes:
    return element(tag, "US", struct.pack("<H", value))


def item(body: bytes, *, defined: bool = True, length: int | None = None) -> bytes:
    if not defined:
        return (
            struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED)
            + body
            + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        )
    size = len(body) if length is None else length
    return struct.pack("<HHL", 0xFFFE, 0xE000, size) + body


def sequence(tag: int, items: list[bytes], *, defined: bool = True) -> bytes:
    body = b"".join(items)
    if defined:
        return element(tag, "SQ", body)
    return element(tag, "SQ", body, length=UNDEFINED) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def sop(sop_class: str = CT, instance: str = INSTANCE) -> bytes:
    return text(0x00080016, "UI", sop_class) + text(0x00080018, "UI", instance)


def image(
    rows: int = 4,
    columns: int = 4,
    bits: int = 16,
    frames: int | None = None,
    pixels: int | None = None,
    before: bytes = b"",
    after: bytes = b"",
) -> bytes:
    """A CT image: SOP common, image pixel attributes, native pixel data of ``pixels`` bytes
    (default: exactly what the attributes say)."""
    expected = rows * columns * bits // 8 * (frames or 1)
    size = expected if pixels is None else pixels
    return (
        sop()
        + before
        + us(0x00280002, 1)
        + (text(0x00280008, "IS", str(frames)) if frames is not None else b"")
        + us(0x00280010, rows)
        + us(0x00280011, columns)
        + us(0x00280100, bits)
        + after
        + element(0x7FE00010, "OW", bytes(size))
    )


def fragments(*items: bytes, table: bytes = b"", delimiter: bool = True) -> bytes:
    """Encapsulated Pixel Data (PS3.5 §A.4): offset table item, fragment items, delimiter."""
    body = struct.pack("<HHL", 0xFFFE, 0xE000, len(table)) + table
    body += b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(one)) + one for one in items)
    if delimiter:
        body += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return element(0x7FE00010, "OB", body, length=UNDEFINED)


def store(
    data: bytes,
    rules: ContentRules | None = None,
    *,
    syntax: str = EXPLICIT_LE,
    sop_class: str = CT,
    instance: str = INSTANCE,
    context: str | None = None,
    command: int = 0x0001,
    split: int | None = None,
) -> list[Finding]:
    """Everything the inspector finds in ``data`` sent as the data set of ``command``."""
    message = Message(command, sop_class, instance, context or sop_class, syntax)
    return feed(DataSetInspector(rules or ContentRules(), message), data, split)


def feed(inspector: DataSetInspector, data: bytes, split: int | None = None) -> list[Finding]:
    """Feed ``data`` whole, or in random pieces of 1..``split`` bytes (seeded)."""
    if split is None:
        return inspector.feed(data, True)
    found: list[Finding] = []
    chooser = random.Random(len(data) * 31 + split)
    pos = 0
    while pos < len(data):
        step = chooser.randint(1, split)
        found += inspector.feed(memoryview(data)[pos : pos + step], pos + step >= len(data))
        pos += step
    if not data:
        found += inspector.feed(b"", True)
    return found


def checks(found: list[Finding]) -> list[str]:
    return [one.check for one in found]


def query(
    data: bytes,
    rules: ContentRules | None = None,
    *,
    model: str = STUDY_FIND,
    command: int = 0x0020,
) -> list[str]:
    """The checks a C-FIND (or ``command``) identifier trips."""
    return checks(store(data, rules, sop_class=model, instance="", command=command))
