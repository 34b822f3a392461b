"""The data-set walker against pydicom's test files: the same elements, no false refusals.

pydicom's ~190 test files are real-world and crafted DICOM. Sent as data sets in their transfer
syntax, every one pydicom reads as a data set passes the safety tier with zero findings, whole
and in random splits down to one byte, and the walker reads the same elements as pydicom
(tag, VR, length, nesting). The files in ``REFUSED`` are refused, each for a reason the
principle of the walker gives (two readers could take them differently); they are listed with
that reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomfw.core.content import ContentRules, DataSetInspector, Message
from dicomfw.core.dataset import UNDEFINED, Visitor, Walker
from dicomfw.core.dictionary import SQ, UN
from dicomfw.core.executable import HEAD_BYTES
from tests.datasets import checks, feed
from tests.dicomfiles import corpus, corpus_id, data_set, reference_trace

#: Files refused, with the check and why it is right to refuse them.
REFUSED = {
    # (0008,0018) SOP Instance UID twice: DCMTK keeps the first, pydicom the last.
    "palettes/winter.dcm": "element_order",
    # Cut short on purpose (pydicom tests its truncation handling).
    "test_files/MR_truncated.dcm": "truncated",
    "test_files/rtplan_truncated.dcm": "truncated",
    # A stray byte before the first element: pydicom "reads" (0820,0500) and garbage after it.
    "test_files/no_meta.dcm": "truncated",
    # Says JPEG Baseline (explicit VR) but is encoded in implicit VR: pydicom switches on the
    # fly, a strict reader fails, so the firewall cannot know which reading the PACS makes.
    "test_files/SC_rgb_jpeg.dcm": "vr_unknown",
    # The last directory record's item is longer than what is left of its sequence.
    "test_files/dicomdirtests/DICOMDIR-nooffset": "length_overrun",
    # Crafted private sequences in group 0001 (not a private group) with odd-length values.
    "test_files/meta_missing_tsyntax.dcm": "odd_length",
    "test_files/nested_priv_SQ.dcm": "odd_length",
    # 128 bytes of padding after the pixel data the attributes describe (pydicom strips them).
    "test_files/MR_small_padded.dcm": "pixel_data_length",
    # Number of Frames "1A": the expected pixel data length cannot be computed.
    "test_files/badVR.dcm": "pixel_data_length",
}

FILES = corpus()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the odd files


def _message(path: Path, syntax: str) -> Message:
    """C-STORE when the file is a SOP instance, else an N-EVENT-REPORT (no consistency checks
    apply to, e.g., a DICOMDIR): every safety check runs either way."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path, force=True, stop_before_pixels=True)
    sop_class = str(ds.get("SOPClassUID", ""))
    instance = str(ds.get("SOPInstanceUID", ""))
    command = 0x0001 if sop_class and instance else 0x0100
    return Message(command, sop_class, instance, sop_class, syntax)


def _inspect(path: Path, split: int | None) -> list[str]:
    syntax, data = data_set(path)
    rules = ContentRules()  # safety tier, every check on
    return checks(feed(DataSetInspector(rules, _message(path, syntax)), data, split))


def test_the_corpus_is_there() -> None:
    assert len(FILES) >= 180
    assert set(REFUSED) <= {corpus_id(path) for path in FILES}


@pytest.mark.parametrize("path", FILES, ids=corpus_id)
def test_pydicom_files_pass_the_safety_tier(path: Path) -> None:
    expected = [REFUSED[corpus_id(path)]] if corpus_id(path) in REFUSED else []
    assert _inspect(path, None) == expected
    # Any split gives the same answer (one-byte pieces for the small files).
    size = path.stat().st_size
    assert _inspect(path, 1 if size < 12_000 else 997) == expected


def _walker_trace(syntax: str, data: bytes) -> list[tuple[int, int, int, int]]:
    found: list = []
    walker = Walker(
        Visitor(),
        syntax,
        found,
        max_depth=16,
        max_elements=100_000,
        max_inflated=1 << 30,
        head_bytes=HEAD_BYTES,
        fragment_heads=False,
    )
    walker.trace = []
    walker.feed(data, True)
    assert not found
    return walker.trace


def _comparable(
    mine: list[tuple[int, int, int, int]], theirs: list[tuple[int, int, int, int]]
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Drop what pydicom does not keep raw: the VR and length of elements it has already
    converted (length -1: undefined-length sequences, UN it re-typed)."""
    left: list[tuple[int, ...]] = []
    right: list[tuple[int, ...]] = []
    for (depth, tag, vr, length), (their_depth, their_tag, their_vr, their_length) in zip(
        mine, theirs, strict=True
    ):
        converted = their_length == -1
        if converted or vr == 0:  # 0: implicit VR here, where pydicom guesses per element
            vr = their_vr = 0
        if vr == UN and their_vr == SQ and length == UNDEFINED:
            vr = SQ  # PS3.5 §6.2.2: pydicom re-types an undefined-length UN as SQ
        left.append((depth, tag, vr, their_length if converted else length))
        right.append((their_depth, their_tag, their_vr, their_length))
    return left, right


@pytest.mark.parametrize(
    "path", [path for path in FILES if corpus_id(path) not in REFUSED], ids=corpus_id
)
def test_the_walker_reads_the_elements_pydicom_reads(path: Path) -> None:
    syntax, data = data_set(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = reference_trace(syntax, data)
    mine = _walker_trace(syntax, data)
    assert len(mine) == len(theirs)
    left, right = _comparable(mine, theirs)
    assert left == right
