"""Content validation cost per data set: the DataSetInspector on pydicom's files vs bytes only.

The inspector runs on every data set a route validates, so its cost is paid per message: the
header walk (every element before the pixel data) must stay near 0.3 µs per element, and pixel
data must cost O(1) per fragment (skipped by its length). Each data set is fed as the session
would, in 16 KiB PDV fragments (memoryview slices); the baseline only slices the same fragments
and touches nothing, which is what forwarding costs today.

Run: python bench/bench_content.py           (compiled when `pip install -e .` built the .so files)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import timeit
import warnings
from pathlib import Path

from pydicom import dcmread

from dicomfw.core import content
from dicomfw.core.content import ContentRules, DataSetInspector, Message
from dicomfw.core.dataset import Visitor, Walker
from dicomfw.core.executable import HEAD_BYTES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.dicomfiles import DATA, data_set

FRAGMENT = 16_384
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


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


def _fragments(data: bytes) -> list[tuple[memoryview, bool]]:
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


def _best(function: object, number: int) -> float:
    assert callable(function)
    return min(timeit.repeat(function, number=number, repeat=7)) / number * 1e6


def main() -> None:
    compiled = content.__file__.endswith(".so")
    print(f"dicomfw.core.content: {'compiled (mypyc)' if compiled else 'pure Python'}")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [
            ("CT_small.dcm", DATA / "test_files" / "CT_small.dcm"),
            ("MR_small.dcm", DATA / "test_files" / "MR_small.dcm"),
            ("DCMTK-made CT", _dcmtk_ct(Path(tmp))),
            ("JPEG2000.dcm (encapsulated)", DATA / "test_files" / "JPEG2000.dcm"),
            ("rtplan.dcm (implicit VR)", DATA / "test_files" / "rtplan.dcm"),
        ]
        rows = []
        for name, path in cases:
            syntax, data = data_set(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path, stop_before_pixels=True)
            sop_class, instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
            message = Message(1, sop_class, instance, sop_class, syntax)
            rules = ContentRules()
            pixels = data.rfind(PIXEL_DATA_TAG)
            header = data[: pixels if pixels > 0 else len(data)]
            count = _elements(syntax, header) if pixels > 0 else _elements(syntax, data)
            whole = _fragments(data)
            head_only = _fragments(header)

            # Each closure is timed in this iteration: the loop's values are bound as defaults.
            def inspect(
                fragments: list[tuple[memoryview, bool]] = whole,
                rules: ContentRules = rules,
                message: Message = message,
            ) -> None:
                inspector = DataSetInspector(rules, message)
                for fragment, last in fragments:
                    inspector.feed(fragment, last)

            def header_walk(head_only: list[tuple[memoryview, bool]] = head_only) -> None:
                inspect(head_only)

            def baseline(whole: list[tuple[memoryview, bool]] = whole) -> None:
                for fragment, _ in whole:
                    len(fragment)

            assert DataSetInspector(rules, message).feed(data, True) == [], name
            header_us = _best(header_walk, 200)
            rows.append(
                (name, len(data), count, header_us, header_us / count, _best(inspect, 200),
                 _best(baseline, 2000))
            )  # fmt: skip
    print(
        f"{'data set':30} {'bytes':>7} {'elements':>8} {'header µs':>10} {'µs/elem':>8} "
        f"{'whole µs':>9} {'baseline µs':>11}"
    )
    for name, size, count, header_us, per_element, whole_us, base_us in rows:
        print(
            f"{name:30} {size:7} {count:8} {header_us:10.1f} {per_element:8.3f} "
            f"{whole_us:9.1f} {base_us:11.2f}"
        )


if __name__ == "__main__":
    main()
