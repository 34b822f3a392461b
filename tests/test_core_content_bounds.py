"""Content validation holds what its rules bound, whatever is sent, and never raises.

Hostile inputs (100,000 tiny elements, 10,000 nested sequences, a 4 GB declared length, a
deflate bomb) are fed while tracemalloc watches what the inspector allocates; then any bytes,
and mutations of pydicom's files, in any split and transfer syntax, end in findings or none.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomfw.core.content import CHECKS, ContentRules, DataSetInspector, Finding, Message
from tests.datasets import (
    CT,
    DEFLATED,
    EXPLICIT_LE,
    INSTANCE,
    UNDEFINED,
    checks,
    element,
    sop,
)
from tests.dicomfiles import corpus, data_set

KIB = 1024
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the odd files


def _pieces(data: bytes, size: int) -> Iterator[tuple[memoryview, bool]]:
    view = memoryview(data)
    for pos in range(0, len(data), size):
        yield view[pos : pos + size], pos + size >= len(data)


def _peak(
    inspector: DataSetInspector, data: bytes, size: int = 16 * KIB
) -> tuple[int, list[Finding]]:
    """What feeding ``data`` in ``size`` pieces allocates at most, beyond ``data`` itself."""
    found: list[Finding] = []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for piece, last in _pieces(data, size):
            found += inspector.feed(piece, last)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, found


def _inspector(rules: ContentRules | None = None, syntax: str = EXPLICIT_LE) -> DataSetInspector:
    return DataSetInspector(rules or ContentRules(), Message(1, CT, INSTANCE, CT, syntax))


def test_a_hundred_thousand_tiny_elements() -> None:
    tiny = b"".join(
        struct.pack("<HH", 0x0011 + (n >> 16), n & 0xFFFF) + b"SH\x00\x00"
        for n in range(0x10, 99_990)
    )
    peak, found = _peak(_inspector(), sop() + tiny)
    assert found == [] and peak < 128 * KIB
    peak, found = _peak(_inspector(ContentRules(max_elements=1_000)), sop() + tiny)
    assert checks(found) == ["element_count"] and peak < 128 * KIB


def test_ten_thousand_nested_sequences() -> None:
    opening = element(0x00081140, "SQ", b"", length=UNDEFINED) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, UNDEFINED
    )
    closing = struct.pack("<HHLHHL", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0)
    nested = sop() + opening * 10_000 + closing * 10_000
    peak, found = _peak(_inspector(), nested)
    assert checks(found) == ["nesting_depth"] and peak < 64 * KIB
    peak, found = _peak(_inspector(ContentRules(max_depth=10_000)), nested)
    assert found == [] and peak < 10_000 * 400  # a few hundred bytes per configured level


def test_a_four_gigabyte_declared_length() -> None:
    data = sop() + element(0x00091010, "OB", b"", length=0xFFFFFFF0) + bytes(8 << 20)
    peak, found = _peak(_inspector(), data, 64 * KIB)
    assert checks(found) == ["truncated"] and peak < 64 * KIB


def test_a_deflate_bomb() -> None:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(sop() + element(0x00091010, "OB", b"", length=0xFFFFFFF0))
    bomb += b"".join(deflater.compress(bytes(1 << 20)) for _ in range(64)) + deflater.flush()
    rules = ContentRules(max_inflated_bytes=16 << 20)
    peak, found = _peak(_inspector(rules, DEFLATED), bomb, 4 * KIB)
    assert checks(found) == ["deflate_bound"] and peak < 512 * KIB


# ---- never an exception ----------------------------------------------------------------------

SYNTAXES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    DEFLATED,
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.5",
    "1.2.840.113619.5.2",
]
COMMANDS = [0x0001, 0x0020, 0x0021, 0x0010, 0x8020, 0x0100, 0x0130]
MODELS = [
    CT,
    "1.2.840.10008.5.1.4.1.2.1.1",
    "1.2.840.10008.5.1.4.1.2.2.2",
    "1.2.840.10008.5.1.4.31",
]
EVERYTHING = ContentRules(
    conformance=True,
    max_depth=8,
    max_elements=2_000,
    max_instance_bytes=1 << 20,
    max_inflated_bytes=1 << 20,
    max_value_bytes=4 * KIB,
    max_document_bytes=64 * KIB,
    required=(0x00100020,),
    allowed_values={0x00080060: frozenset({"CT"})},
    refused=frozenset({0x00101000}),
    private_creators=frozenset({"ACME"}),
    universal_match_refused={"STUDY": frozenset({0x00100020}), "WORKLIST": frozenset({0x00100020})},
    document_types=frozenset({"application/pdf"}),
)
SMALL_FILES = [data_set(path) for path in corpus() if path.stat().st_size < 16 * KIB][:40]


def _feed_all(message: Message, data: bytes, split: int) -> list[Finding]:
    found: list[Finding] = []
    for rules in (EVERYTHING, ContentRules()):
        inspector = DataSetInspector(rules, message)
        for piece, last in _pieces(data, split):
            found += inspector.feed(piece, last)
        assert inspector.header_checked or not data
        assert inspector.fed == len(data)
    for one in found:  # every finding is of its check's kind and tier
        assert CHECKS[one.check] == (one.kind, one.conformance)
    return found


@settings(
    max_examples=250, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    data=st.binary(max_size=800),
    syntax=st.sampled_from(SYNTAXES),
    split=st.integers(1, 97),
    command=st.sampled_from(COMMANDS),
    model=st.sampled_from(MODELS),
)
def test_any_bytes_end_in_findings_or_none(
    data: bytes, syntax: str, split: int, command: int, model: str
) -> None:
    _feed_all(Message(command, model, INSTANCE, model, syntax), data, split)


@settings(
    max_examples=250, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    index=st.integers(0, len(SMALL_FILES) - 1),
    mutations=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6),
    cut=st.floats(0.2, 1.0),
    split=st.integers(1, 4096),
    command=st.sampled_from(COMMANDS),
)
def test_mutated_pydicom_files_end_in_findings_or_none(
    index: int, mutations: list[tuple[float, int]], cut: float, split: int, command: int
) -> None:
    syntax, original = SMALL_FILES[index]
    data = bytearray(original[: max(1, int(len(original) * cut))])
    for where, byte in mutations:
        data[min(len(data) - 1, int(where * len(data)))] = byte
    _feed_all(Message(command, CT, INSTANCE, CT, syntax), bytes(data), split)


_VRS = ["UI", "US", "OB", "OW", "UN", "SQ", "LT", "CS", "DA", "FD", "AT", "LO", "XX"]
_MARKERS = [
    struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED),
    struct.pack("<HHL", 0xFFFE, 0xE00D, 0),
    struct.pack("<HHL", 0xFFFE, 0xE0DD, 0),
    struct.pack("<HHL", 0xFFFE, 0xE000, 0),
]
_PIECE = st.one_of(
    st.builds(
        lambda group, number, vr, value, undefined: element(
            group << 16 | number,
            vr,
            value,
            length=UNDEFINED if undefined and vr in ("OB", "OW", "UN", "SQ") else None,
        ),
        st.sampled_from([0x0008, 0x0009, 0x0028, 0x0042, 0x6000, 0x7FE0, 0x0001, 0xFFFE]),
        st.sampled_from([0x0010, 0x0011, 0x0016, 0x0018, 0x0100, 0x1010, 0x3000]),
        st.sampled_from(_VRS),
        st.sampled_from([b"", b"\x00\x01", b"1.2.3\x00", b"MZ" + bytes(62), b"%PDF-1.4 /JS"]),
        st.booleans(),
    ),
    st.sampled_from(_MARKERS),
)


@settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    pieces=st.lists(_PIECE, max_size=24),
    syntax=st.sampled_from([*SYNTAXES[:3], "1.2.840.10008.1.2.4.50"]),
    split=st.integers(1, 64),
    command=st.sampled_from(COMMANDS),
)
def test_element_soup_ends_in_findings_or_none(
    pieces: list[bytes], syntax: str, split: int, command: int
) -> None:
    """Pieces of data sets (elements, items, delimiters, sequences left open) in any order."""
    _feed_all(Message(command, CT, INSTANCE, CT, syntax), b"".join(pieces), split)
