"""Content validation cost per data set: the DataSetInspector on pydicom's files vs bytes only.

The inspector runs on every data set a route validates, so its cost is paid per message: the
header walk (every element before the pixel data) must stay near 0.3 µs per element, and pixel
data must cost O(1) per fragment (skipped by its length). Each data set is fed as the session
would, in 16 KiB PDV fragments (memoryview slices); the baseline only slices the same fragments
and touches nothing, which is what forwarding costs today.

Run: python bench/bench_content.py   (compiled when `pip install -e .` built the .so files;
with DICOMFW_PURE_PYTHON=1, or after deleting them, the pure-Python sources are measured)
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import tempfile
import timeit
import warnings
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread

from dicomfw.core import content
from dicomfw.core.content import ContentRules, DataSetInspector, Message
from dicomfw.core.dataset import Visitor, Walker
from dicomfw.core.executable import HEAD_BYTES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.datasets import CT, EXPLICIT_LE, INSTANCE, image
from tests.dicomfiles import DATA, data_set

FRAGMENT = 16_384
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
Fragments = list[tuple[memoryview, bool]]


def _dcmtk_ct(directory: Path) -> Path:
    """A CT written by DCMTK (dcmconv, explicit VR LE): pydicom's CT_small without its private
    elements, re-encoded; pydicom's own writing when DCMTK is not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(DATA / "test_files" / "CT_small.dcm")
    ds.remove_private_tags()
    source = directory / "ct.dcm"
    ds.save_as(source, enforce_file_format=True)
    if shutil.which("dcmconv") is None:
        return source
    target = directory / "ct_dcmtk.dcm"
    subprocess.run(["dcmconv", "+te", str(source), str(target)], check=True)
    return target


def _fragments(data: bytes) -> Fragments:
    view = memoryview(data)
    return [
        (view[pos : pos + FRAGMENT], pos + FRAGMENT >= len(data))
        for pos in range(0, len(data), FRAGMENT)
    ]


def _elements(syntax: str, data: bytes) -> int:
    walker = Walker(
        Visitor(), syntax, [], max_depth=64, max_elements=1 << 30,
        max_inflated=1 << 30, head_bytes=HEAD_BYTES, fragment_heads=False,
    )  # fmt: skip
    walker.trace = []
    walker.feed(data, True)
    return len(walker.trace)


def _best(function: Callable[[], None], number: int) -> float:
    """µs per call, the best of 7 rounds (the machine is shared: the minimum is the signal)."""
    return min(timeit.repeat(function, number=number, repeat=7)) / number * 1e6


def _inspect(rules: ContentRules, message: Message, fragments: Fragments) -> None:
    inspector = DataSetInspector(rules, message)
    for fragment, last in fragments:
        inspector.feed(fragment, last)


def _forward(fragments: Fragments) -> None:
    for fragment, _ in fragments:
        len(fragment)


def _row(name: str, path: Path) -> str:
    syntax, data = data_set(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path, stop_before_pixels=True)
    sop_class = str(ds.SOPClassUID)
    message = Message(1, sop_class, str(ds.SOPInstanceUID), sop_class, syntax)
    rules = ContentRules()
    assert DataSetInspector(rules, message).feed(data, True) == [], name
    pixels = data.rfind(PIXEL_DATA_TAG)
    header = data[: pixels if pixels > 0 else len(data)]
    count = _elements(syntax, header)
    header_us = _best(functools.partial(_inspect, rules, message, _fragments(header)), 200)
    whole_us = _best(functools.partial(_inspect, rules, message, _fragments(data)), 200)
    base_us = _best(functools.partial(_forward, _fragments(data)), 2000)
    return (
        f"{name:30} {len(data):7} {count:8} {header_us:10.1f} {header_us / count:8.3f} "
        f"{whole_us:9.1f} {base_us:11.2f}"
    )


def _pixel_row(side: int) -> str:
    data = image(rows=side, columns=side)
    fragments = _fragments(data)
    message = Message(1, CT, INSTANCE, CT, EXPLICIT_LE)
    whole = _best(functools.partial(_inspect, ContentRules(), message, fragments), 3)
    return (
        f"{f'{side}x{side}x16':30} {len(data):10} {len(fragments):9} {whole:9.0f} "
        f"{whole / len(fragments):11.3f}"
    )


def main() -> None:
    compiled = content.__file__.endswith(".so")
    print(f"dicomfw.core.content: {'compiled (mypyc)' if compiled else 'pure Python'}")
    print(
        f"{'data set':30} {'bytes':>7} {'elements':>8} {'header µs':>10} {'µs/elem':>8} "
        f"{'whole µs':>9} {'baseline µs':>11}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (
            ("CT_small.dcm", DATA / "test_files" / "CT_small.dcm"),
            ("MR_small.dcm", DATA / "test_files" / "MR_small.dcm"),
            ("DCMTK-made CT", _dcmtk_ct(Path(tmp))),
            ("JPEG2000.dcm (encapsulated)", DATA / "test_files" / "JPEG2000.dcm"),
            ("rtplan.dcm (implicit VR)", DATA / "test_files" / "rtplan.dcm"),
        ):
            print(_row(name, path))
    # Native pixel data is skipped by its length: the cost per fragment stays flat.
    print(
        f"\n{'native CT, 16 KiB fragments':30} {'bytes':>10} {'fragments':>9} {'whole µs':>9} "
        f"{'µs/fragment':>11}"
    )
    for side in (512, 2048, 5120):
        print(_pixel_row(side))


if __name__ == "__main__":
    main()
