"""Content validation on crafted data sets: each bad one trips exactly its check.

The corpus of ``tests/test_core_dataset.py`` shows that real files pass; this one shows that
what a parser exploit, a bulk exfiltration or a malicious document needs is refused, with the
Finding a session maps to a DIMSE status.
"""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from dicomfw.core.content import CHECKS, ContentRules, DataSetInspector, Kind, Message
from dicomfw.core.executable import executable_kind
from tests.datasets import (
    CT,
    DEFLATED,
    ENCAPSULATED_PDF,
    EXPLICIT_BE,
    IMPLICIT_LE,
    INSTANCE,
    JPEG_BASELINE,
    PATIENT_FIND,
    STUDY_MOVE,
    UNDEFINED,
    WORKLIST,
    checks,
    element,
    fragments,
    image,
    implicit,
    item,
    query,
    sequence,
    sop,
    store,
    text,
    us,
)

PATIENT_ID = 0x00100020


def test_a_well_formed_image_passes_in_any_split() -> None:
    data = image(rows=8, columns=8, frames=2)
    assert store(data) == []
    for split in (1, 2, 3, 7, 64):
        assert store(data, split=split) == []


# ---- UIDs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uid",
    ["1.2.3/../../etc/passwd", "1.2.3;rm -rf /", "1.2.$(reboot)", "1." + "2" * 63, "1..2", ".1"],
)
def test_a_uid_that_is_not_one_is_refused(uid: str) -> None:
    data = text(0x00080016, "UI", CT) + text(0x00080018, "UI", uid)
    found = store(data, instance=uid)
    assert checks(found) == ["uid_syntax"]
    assert found[0].kind is Kind.MALFORMED
    assert ";" not in found[0].detail and "$" not in found[0].detail  # never echoed


def test_a_leading_zero_is_conformance_tier() -> None:
    data = sop(instance="1.2.0123.4") + us(0x00280010, 1)
    assert store(data, instance="1.2.0123.4") == []
    found = store(data, ContentRules(conformance=True), instance="1.2.0123.4")
    assert checks(found) == ["uid_leading_zero"] and found[0].conformance


# ---- consistency ------------------------------------------------------------------------------


def test_the_command_and_the_data_set_must_name_the_same_instance() -> None:
    assert checks(store(sop(), sop_class="1.2.840.10008.5.1.4.1.1.4", context=CT)) == [
        "sop_class_mismatch"
    ]
    assert checks(store(sop(), instance="1.2.3")) == ["sop_instance_mismatch"]
    assert checks(store(sop(), context="1.2.840.10008.5.1.4.1.1.4")) == ["context_mismatch"]
    assert checks(store(us(0x00280010, 1))) == ["sop_class_mismatch", "sop_instance_mismatch"]


# ---- pixel data and overlays ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "check"),
    [
        (image(pixels=31), "odd_length"),  # one byte short: odd, refused before its value
        (image(pixels=30), "pixel_data_length"),
        (image(frames=2, pixels=96), "pixel_data_length"),  # one frame long
        (image(bits=1, rows=3, columns=3, pixels=2), None),  # 9 bits -> 2 bytes, even
        (image(bits=8, rows=3, columns=3, pixels=10), None),  # 9 bytes + one padding byte
        (image(bits=8, rows=3, columns=3, pixels=12), "pixel_data_length"),
    ],
)
def test_native_pixel_data_is_as_long_as_its_attributes_say(data: bytes, check: str | None) -> None:
    assert checks(store(data)) == ([check] if check else [])


def _overlay(rows: int, columns: int, size: int) -> bytes:
    return (
        us(0x60000010, rows)
        + us(0x60000011, columns)
        + element(0x60000100, "US", struct.pack("<H", 1))
        + element(0x60003000, "OW", bytes(size))
    )


def test_overlay_data_is_as_long_as_its_attributes_say() -> None:
    good = sop() + _overlay(5, 5, 4)  # 25 bits -> 4 bytes
    assert store(good) == []
    assert checks(store(sop() + _overlay(5, 5, 2))) == ["overlay_data_length"]
    assert checks(store(sop() + element(0x60003000, "OW", bytes(4)))) == ["overlay_data_length"]


# ---- encapsulated pixel data ------------------------------------------------------------------


def _jpeg(pixel_data: bytes) -> list[str]:
    header = sop() + us(0x00280002, 1) + us(0x00280010, 4) + us(0x00280011, 4)
    return checks(store(header + us(0x00280100, 8) + pixel_data, syntax=JPEG_BASELINE))


def test_encapsulated_fragments() -> None:
    table = struct.pack("<2L", 0, 12)
    assert _jpeg(fragments(b"\xff\xd8ab", b"\xff\xd9", table=table)) == []
    assert _jpeg(fragments(b"\xff\xd8ab")) == []
    wrong_tag = element(0x7FE00010, "OB", struct.pack("<HHL", 0xFFFE, 0xE000, 0), length=UNDEFINED)
    wrong_tag += struct.pack("<HHL", 0x0008, 0x0016, 2) + b"ab"
    assert _jpeg(wrong_tag) == ["encapsulated_fragments"]
    overrun = element(
        0x7FE00010,
        "OB",
        struct.pack("<HHLHHL", 0xFFFE, 0xE000, 0, 0xFFFE, 0xE000, 64),
        length=UNDEFINED,
    )
    assert _jpeg(overrun + b"ab") == ["encapsulated_fragments"]
    assert _jpeg(fragments(b"\xff\xd8ab", delimiter=False)) == ["encapsulated_fragments"]
    assert _jpeg(fragments(b"ab", table=b"\x00\x00\x00")) == ["encapsulated_fragments"]
    assert _jpeg(fragments(b"ab", table=b"\x00" * 6)) == ["encapsulated_fragments"]
    assert _jpeg(fragments(b"ab", b"cd", table=struct.pack("<2L", 10, 0))) == [
        "encapsulated_fragments"
    ]
    assert _jpeg(fragments(b"ab", b"cd", table=struct.pack("<2L", 0, 4))) == [
        "encapsulated_fragments"  # 4 is inside the first fragment, not at an item
    ]
    assert _jpeg(fragments(b"ab", table=struct.pack("<2L", 0, 80))) == ["encapsulated_fragments"]


def test_encapsulated_pixel_data_in_a_native_transfer_syntax_is_refused() -> None:
    assert checks(store(sop() + fragments(b"ab"))) == ["encapsulated_fragments"]


# ---- structure --------------------------------------------------------------------------------


def test_sequences_and_items_must_add_up() -> None:
    inner = text(0x00081150, "UI", CT)
    good = sop() + sequence(0x00081140, [item(inner), item(inner, defined=False)])
    assert store(good) == []
    assert store(sop() + sequence(0x00081140, [item(inner)], defined=False)) == []
    overrun = sop() + element(0x00081140, "SQ", item(inner), length=len(item(inner)) + 8)
    assert checks(store(overrun)) == ["truncated"]
    short_item = sop() + sequence(0x00081140, [item(inner, length=len(inner) - 4)])
    assert checks(store(short_item)) == ["length_overrun"]
    long_sequence = element(0x00081140, "SQ", item(inner) + us(0x00081155, 0))
    assert checks(store(sop() + long_sequence)) == ["delimiter"]


def test_nesting_and_element_count_are_bounded() -> None:
    nested = text(0x00081150, "UI", CT)
    for _ in range(17):
        nested = sequence(0x00081140, [item(nested)], defined=False)
    assert checks(store(sop() + nested)) == ["nesting_depth"]
    assert store(sop() + nested, ContentRules(max_depth=17)) == []
    many = sop() + b"".join(element(0x00090000 | (0x1000 + n), "SH", b"") for n in range(50))
    assert checks(store(many, ContentRules(max_elements=20))) == ["element_count"]
    assert store(many, ContentRules(max_elements=52)) == []


def test_repeated_and_out_of_order_elements_are_refused() -> None:
    assert checks(store(sop() + text(0x00080018, "UI", INSTANCE))) == ["element_order"]
    assert checks(store(text(0x00080018, "UI", INSTANCE) + text(0x00080016, "UI", CT))) == [
        "element_order"
    ]
    in_item = item(text(0x00081155, "UI", CT) + text(0x00081150, "UI", CT))
    assert checks(store(sop() + sequence(0x00081140, [in_item]))) == ["element_order"]
    twice = item(text(0x00081150, "UI", CT) + text(0x00081150, "UI", CT))
    assert checks(store(sop() + sequence(0x00081140, [twice]))) == ["element_order"]


def test_odd_lengths_and_unit_sizes() -> None:
    assert checks(store(sop() + element(0x00100010, "PN", b"abc"))) == ["odd_length"]
    assert checks(store(sop() + element(0x00280010, "US", b"\x01\x00\x02\x00")[:-2])) == [
        "truncated"
    ]
    assert checks(store(sop() + element(0x00181310, "US", b"\x01\x00\x02\x00\x03\x00"))) == []
    assert checks(store(sop() + element(0x00209172, "FD", b"\x00" * 6))) == ["vr_value"]


def test_an_unknown_explicit_vr_is_refused() -> None:
    assert checks(store(sop() + element(0x00100010, "QQ", b"ab"))) == ["vr_unknown"]


def test_an_oversized_instance_is_refused_as_it_arrives() -> None:
    inspector = DataSetInspector(
        ContentRules(max_instance_bytes=100), Message(1, CT, INSTANCE, CT, "1.2.840.10008.1.2.1")
    )
    data = image(rows=16, columns=16)
    assert inspector.feed(data[:80], False) == []
    found = inspector.feed(data[80:160], False)
    assert checks(found) == ["instance_size"] and found[0].kind is Kind.TOO_LARGE
    assert inspector.feed(data[160:], True) == []  # nothing after a structural finding


def test_a_private_transfer_syntax_is_unsupported() -> None:
    found = store(image(), syntax="1.2.840.113619.5.2")
    assert checks(found) == ["transfer_syntax"] and found[0].kind is Kind.UNSUPPORTED
    assert store(image(), syntax="1.2.840.10008.1.2.4.999") == []  # DICOM root: explicit LE


def test_other_transfer_syntaxes() -> None:
    body = implicit(0x00080016, CT.encode() + b"\x00") + implicit(0x00080018, INSTANCE.encode())
    assert store(body, syntax=IMPLICIT_LE) == []
    big = struct.pack(">HH", 8, 0x16) + b"UI" + struct.pack(">H", 26) + CT.encode() + b"\x00"
    big += struct.pack(">HH", 8, 0x18) + b"UI" + struct.pack(">H", 28) + INSTANCE.encode()
    assert store(big, syntax=EXPLICIT_BE) == []
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(image()) + deflater.flush()
    assert store(deflated, syntax=DEFLATED) == []
    assert store(deflated, syntax=DEFLATED, split=3) == []
    assert checks(store(deflated[:-4], syntax=DEFLATED)) == ["truncated"]
    assert checks(store(b"\xff" * 40, syntax=DEFLATED)) == ["deflate_stream"]


def test_a_deflate_bomb_stops_at_the_bound() -> None:
    found = store(_bomb(64), ContentRules(max_inflated_bytes=8 << 20), syntax=DEFLATED)
    assert checks(found) == ["deflate_bound"] and found[0].kind is Kind.TOO_LARGE


def _bomb(megabytes: int) -> bytes:
    """A deflated data set of one private OB element declaring 4 GB, inflating to
    ``megabytes`` of zeros."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [deflater.compress(sop() + element(0x00091010, "OB", b"", length=0xFFFFFFF0))]
    zeros = bytes(1 << 20)
    out += [deflater.compress(zeros) for _ in range(megabytes)]
    return b"".join(out) + deflater.flush()


# ---- queries ----------------------------------------------------------------------------------


def _find(level: str, *keys: bytes) -> bytes:
    elements = {0x00080052: text(0x00080052, "CS", level)}
    for one in keys:
        elements[struct.unpack("<HH", one[:4])[0] << 16 | struct.unpack("<HH", one[:4])[1]] = one
    return b"".join(elements[tag] for tag in sorted(elements))


NO_BULK = ContentRules(universal_match_refused={"STUDY": frozenset({PATIENT_ID})})


def test_a_study_query_passes() -> None:
    data = _find("STUDY", text(PATIENT_ID, "LO", "12345"), text(0x00100010, "PN", "DOE^J*"))
    assert query(data + text(0x0020000D, "UI", "")) == []
    assert query(data, NO_BULK) == []


@pytest.mark.parametrize("value", ["*", "", "**"])
def test_a_refused_universal_match(value: str) -> None:
    assert query(_find("STUDY", text(PATIENT_ID, "LO", value)), NO_BULK) == ["universal_match"]


def test_an_absent_key_matches_universally_too() -> None:
    assert query(_find("STUDY", text(0x00100010, "PN", "*")), NO_BULK) == ["universal_match"]


def test_query_levels_and_keys() -> None:
    assert query(_find("FOO")) == ["query_level"]
    assert query(_find("PATIENT")) == ["query_level"]  # not in Study Root
    assert query(text(PATIENT_ID, "LO", "1")) == ["query_level"]
    assert query(_find("PATIENT", text(0x00100010, "PN", "*")), model=PATIENT_FIND) == []
    below = _find("STUDY", text(0x00080018, "UI", ""), text(0x00080060, "CS", "CT"))
    assert query(below) == ["query_keys", "query_keys"]


def test_a_move_names_unique_keys_only() -> None:
    move = _find("STUDY", text(0x0020000D, "UI", "1.2.3"))
    assert query(move, model=STUDY_MOVE, command=0x0021) == []
    extra = _find("STUDY", text(0x0020000D, "UI", "1.2.3"), text(0x00081030, "LO", "HEAD"))
    assert query(extra, model=STUDY_MOVE, command=0x0021) == ["query_keys"]
    universal = _find("STUDY", text(0x0020000D, "UI", ""))
    assert query(universal, model=STUDY_MOVE, command=0x0010) == ["query_keys"]


def _worklist(name: str, accession: str = "A1", extra: bytes = b"") -> bytes:
    step = item(text(0x00080060, "CS", "CT") + text(0x00400001, "AE", "CT01"))
    return (
        text(0x00080050, "SH", accession)
        + text(0x00100010, "PN", name)
        + extra
        + sequence(0x00400100, [step])
    )


def test_a_worklist_query() -> None:
    assert query(_worklist("DOE^JANE"), model=WORKLIST) == []
    assert query(_worklist("DOE\x07JANE"), model=WORKLIST) == ["worklist_characters"]
    assert query(_worklist("DOE", accession="A\\B"), model=WORKLIST) == ["worklist_characters"]
    assert query(_worklist("DOE", extra=text(0x00181000, "LO", "1")), model=WORKLIST) == [
        "query_keys"
    ]
    bad_step = sequence(0x00400100, [item(text(0x00180015, "CS", "HEAD"))])
    assert query(bad_step, model=WORKLIST) == ["query_keys"]
    refuse = ContentRules(universal_match_refused={"WORKLIST": frozenset({0x00080050})})
    assert query(_worklist("DOE", accession="*"), refuse, model=WORKLIST) == ["universal_match"]


def test_a_find_response_keeps_to_its_level() -> None:
    response = _find("STUDY", text(0x0020000D, "UI", "1.2.3"))
    assert query(response, command=0x8020) == []
    assert query(_find("STUDY", text(0x00080018, "UI", "1.2")), command=0x8020) == ["query_keys"]
    assert query(text(0x0020000D, "UI", "1.2.3"), command=0x8020) == []


# ---- content policy ---------------------------------------------------------------------------


def test_required_allowed_and_refused_attributes() -> None:
    rules = ContentRules(
        required=(0x00100020, 0x00080060),
        allowed_values={0x00080060: frozenset({"CT", "MR"})},
        refused=frozenset({0x00101000}),
    )
    good = sop() + text(0x00080060, "CS", "CT") + text(0x00100020, "LO", "P1")
    assert store(good, rules) == []
    assert checks(store(sop() + text(0x00080060, "CS", "CT"), rules)) == ["required_attribute"]
    empty = sop() + text(0x00080060, "CS", "CT") + text(0x00100020, "LO", "  ")
    assert checks(store(empty, rules)) == ["required_attribute"]
    other = sop() + text(0x00080060, "CS", "US") + text(0x00100020, "LO", "P1")
    assert checks(store(other, rules)) == ["value_not_allowed"]
    refused = good + text(0x00101000, "LO", "X")
    assert checks(store(refused, rules)) == ["refused_attribute"]


def test_private_creators() -> None:
    rules = ContentRules(private_creators=frozenset({"SIEMENS CSA HEADER"}))
    allowed = (
        sop() + text(0x00290010, "LO", "SIEMENS CSA HEADER") + element(0x00291010, "OB", b"ab")
    )
    assert store(allowed, rules) == []
    unlisted = sop() + text(0x00090010, "LO", "EVIL CORP") + element(0x00091010, "OB", b"ab")
    assert checks(store(unlisted, rules)) == ["private_creator", "private_creator"]
    orphan = sop() + element(0x00291010, "OB", b"ab")
    assert checks(store(orphan, rules)) == ["private_creator"]
    assert store(orphan) == []  # no list: any private element passes
    in_item = sop() + sequence(0x00081140, [item(element(0x00291010, "OB", b"ab"))])
    assert checks(store(in_item, rules)) == ["private_creator"]


# ---- documents --------------------------------------------------------------------------------


def _pdf(*objects: bytes) -> bytes:
    body = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
    for number, one in enumerate(objects, 1):
        body += b"%d 0 obj\n" % number + one + b"\nendobj\n"
    return body + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"


def _stream(dictionary: bytes, content: bytes, *, flate: bool = True) -> bytes:
    data = zlib.compress(content) if flate else content
    filters = b" /Filter /FlateDecode" if flate else b""
    return (
        b"<< "
        + dictionary
        + filters
        + b" /Length %d >>\nstream\n" % len(data)
        + data
        + b"\nendstream"
    )


PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>"
BENIGN = _pdf(
    b"<< /Type /Catalog /Pages 2 0 R /OpenAction [3 0 R /Fit] >>",
    b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
    PAGE,
    _stream(b"", b"BT /F1 12 Tf 72 712 Td (Report: no findings) Tj ET"),
    _stream(b"/Type /XObject /Subtype /Image", random.Random(7).randbytes(50_000)),
)


def _document(pdf: bytes, mime: str = "application/pdf") -> bytes:
    value = pdf + b"\x00" * (len(pdf) % 2)
    return sop(ENCAPSULATED_PDF) + element(0x00420011, "OB", value) + text(0x00420012, "LO", mime)


def _pdf_checks(pdf: bytes, rules: ContentRules | None = None) -> list[str]:
    return checks(store(_document(pdf), rules, sop_class=ENCAPSULATED_PDF))


def test_a_benign_pdf_passes() -> None:
    assert _pdf_checks(BENIGN) == []
    inspector = DataSetInspector(
        ContentRules(),
        Message(1, ENCAPSULATED_PDF, INSTANCE, ENCAPSULATED_PDF, "1.2.840.10008.1.2.1"),
    )
    assert inspector.feed(_document(BENIGN), True) == []
    assert inspector.needs_scan and inspector.header_checked


@pytest.mark.parametrize(
    "pdf",
    [
        _pdf(b"<< /Type /Catalog /OpenAction << /S /JavaScript /JS (app.alert(1)) >> >>"),
        _pdf(b"<< /Type /Catalog /OpenAction << /S /J#61vaScript /J#53 (x) >> >>"),
        _pdf(
            b"<< /Type /Catalog /Pages 2 0 R >>",
            _stream(b"/Type /ObjStm /N 1 /First 4", b"5 0 << /Type /Catalog /OpenAction 6 0 R >>"),
        ),
        _pdf(b"<< /Type /Catalog >>", _stream(b"/Type /EmbeddedFile", b"MZ...")),
        _pdf(b"<< /Type /Catalog /AA << /O 3 0 R >> >>"),
        _pdf(b"<< /Type /Catalog /Names << /EmbeddedFiles 3 0 R >> >>"),
        _pdf(b"<< /Type /Annot /Subtype /Launch /F (cmd.exe) >>"),
        _pdf(b"<< /AcroForm << /XFA 5 0 R >> >>"),
    ],
    ids=[
        "javascript",
        "escaped",
        "objstm-openaction",
        "embedded-file",
        "aa",
        "names",
        "launch",
        "xfa",
    ],
)
def test_a_pdf_with_active_content_is_refused(pdf: bytes) -> None:
    assert _pdf_checks(pdf) == ["pdf_active_content"]
    assert _pdf_checks(pdf, ContentRules(active_content=False)) in ([], ["executable_content"])


def test_an_object_stream_that_cannot_be_read_is_refused() -> None:
    broken = _pdf(
        b"<< /Type /ObjStm /N 1 /First 4 /Filter /FlateDecode /Length 9 >>\n"
        b"stream\nxxxxxxxxx\nendstream"
    )
    assert _pdf_checks(broken) == ["pdf_uninspectable"]
    bomb = _pdf(_stream(b"/Type /ObjStm", bytes(4 << 20)))
    assert _pdf_checks(bomb, ContentRules(max_inflated_bytes=1 << 20)) == ["deflate_bound"]


def test_document_types_and_size() -> None:
    rules = ContentRules(document_types=frozenset({"application/pdf"}))
    assert checks(store(_document(BENIGN), rules, sop_class=ENCAPSULATED_PDF)) == []
    stl = _document(b"solid x\nendsolid x\n", "model/stl")
    assert checks(store(stl, rules, sop_class=ENCAPSULATED_PDF)) == ["document_type"]
    small = ContentRules(max_value_bytes=1024, max_document_bytes=2048)
    assert checks(store(_document(BENIGN), small, sop_class=ENCAPSULATED_PDF)) == ["document_size"]


# ---- executables ------------------------------------------------------------------------------

ELF = b"\x7fELF\x02\x01\x01" + bytes(57)
PE = b"MZ" + bytes(0x3A) + struct.pack("<L", 0x80) + bytes(0x40) + b"PE\x00\x00" + bytes(20)
SCRIPT = b"#!/bin/sh\nrm -rf /tmp/x\n"
MACHO = b"\xcf\xfa\xed\xfe" + struct.pack("<LLL", 0x0100000C, 0, 2) + bytes(16)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (text(0x00090010, "LO", "ACME") + element(0x00091010, "OB", ELF), "(0009,1010)"),
        (element(0x00091010, "UN", PE), "(0009,1010)"),
        (element(0x00204000, "LT", SCRIPT), "(0020,4000)"),
        (element(0x00091010, "OB", MACHO), "(0009,1010)"),
    ],
)
def test_an_executable_is_refused(data: bytes, where: str) -> None:
    found = store(sop() + data)
    assert checks(found) == ["executable_content"]
    assert where in found[0].detail and found[0].kind is Kind.FORBIDDEN
    assert store(sop() + data, ContentRules(executables=False)) == []


def test_an_executable_in_an_encapsulated_fragment_or_pixel_data_is_refused() -> None:
    header = sop() + us(0x00280010, 4) + us(0x00280011, 4) + us(0x00280100, 8)
    found = store(header + fragments(b"\xff\xd8", ELF), syntax=JPEG_BASELINE)
    assert checks(found) == ["executable_content"] and "fragment" in found[0].detail
    native = image(rows=16, columns=16, bits=8, pixels=256)
    poisoned = native[:-256] + PE + bytes(256 - len(PE))
    assert checks(store(poisoned)) == ["executable_content"]
    assert checks(store(poisoned, split=5)) == ["executable_content"]


def test_an_executable_in_big_endian_ow_is_seen_swapped() -> None:
    swapped = bytearray(PE)
    swapped[0::2], swapped[1::2] = PE[1::2], PE[0::2]
    value = bytes(swapped)
    head = struct.pack(">HH", 8, 0x16) + b"UI" + struct.pack(">H", 26) + CT.encode() + b"\x00"
    head += struct.pack(">HH", 8, 0x18) + b"UI" + struct.pack(">H", 28) + INSTANCE.encode()
    big = head + struct.pack(">HH", 0x0009, 0x1010) + b"OW\x00\x00" + struct.pack(">L", len(value))
    assert checks(store(big + value, syntax=EXPLICIT_BE)) == ["executable_content"]


def test_random_pixel_buffers_are_never_executables() -> None:
    chooser = random.Random(2024)
    for _ in range(10_000):
        head = chooser.randbytes(4096)
        assert executable_kind(head) is None
        assert executable_kind(b"MZ" + head[2:]) is None  # 1 in 65,536 images start so


# ---- the API ----------------------------------------------------------------------------------


def test_every_check_has_a_stable_kind() -> None:
    assert all(name.islower() and " " not in name for name in CHECKS)
    conformance = {name for name, (_, tier) in CHECKS.items() if tier}
    assert conformance == {"uid_leading_zero", "value_syntax", "deflate_trailing"}


def test_header_checked_comes_with_the_pixel_data() -> None:
    inspector = DataSetInspector(
        ContentRules(), Message(1, CT, INSTANCE, CT, "1.2.840.10008.1.2.1")
    )
    data = image(rows=64, columns=64)
    pixel_at = data.index(b"\xe0\x7f\x10\x00")
    assert inspector.feed(data[:pixel_at], False) == [] and not inspector.header_checked
    assert inspector.feed(data[pixel_at : pixel_at + 12], False) == []
    assert inspector.header_checked and inspector.fed == pixel_at + 12
    assert inspector.feed(data[pixel_at + 12 :], True) == []


def test_value_syntax_is_conformance_tier() -> None:
    old_date = sop() + text(0x00080020, "DA", "1997.04.24") + text(0x00080060, "CS", "ct")
    assert store(old_date) == []
    found = store(old_date, ContentRules(conformance=True))
    assert checks(found) == ["value_syntax", "value_syntax"]
    assert all(one.conformance for one in found)


def test_pixel_data_in_an_item_is_held_to_the_item_s_attributes() -> None:
    icon = us(0x00280010, 2) + us(0x00280011, 2) + us(0x00280100, 8)
    good = sop() + sequence(0x00880200, [item(icon + element(0x7FE00010, "OB", bytes(4)))])
    assert store(good) == []
    short = sop() + sequence(0x00880200, [item(icon + element(0x7FE00010, "OB", bytes(2)))])
    assert checks(store(short)) == ["pixel_data_length"]
    # the top level's attributes do not reach into an item
    bare_icon = sequence(0x00880200, [item(element(0x7FE00010, "OB", bytes(32)))])
    leaked = image(rows=4, columns=4, after=bare_icon)
    assert checks(store(leaked)) == ["pixel_data_length"]
    assert store(image(rows=4, columns=4, after=sequence(0x00880200, [item(icon)]))) == []


def test_required_binary_attributes_and_sequences() -> None:
    rules = ContentRules(required=(0x00081140, 0x7FE00010))
    with_items = sop() + sequence(0x00081140, [item(text(0x00081150, "UI", CT))])
    assert checks(store(with_items + element(0x7FE00010, "OB", b"ab"), rules)) == [
        "pixel_data_length"
    ]
    assert checks(store(with_items, rules)) == ["required_attribute"]
    empty = sop() + sequence(0x00081140, [], defined=False)
    assert checks(store(empty, rules)) == ["required_attribute", "required_attribute"]
    header = sop() + sequence(0x00081140, [item(b"")]) + us(0x00280010, 4)
    encapsulated = header + us(0x00280011, 4) + us(0x00280100, 8) + fragments(b"ab")
    assert checks(store(encapsulated, rules, syntax=JPEG_BASELINE)) == []
