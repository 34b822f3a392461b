"""pydicom's test files as data sets on the wire: the reference corpus of content validation.

A file on disk is a preamble, a File Meta Information group (explicit VR LE, PS3.10 §7.1) and
the data set; on the network only the data set travels, in the negotiated transfer syntax.
``data_set`` strips the first two and says which transfer syntax the rest is in.
``reference_trace`` is pydicom's reading of the same bytes, in the form the walker traces.
"""

from __future__ import annotations

import io
import warnings
import zlib
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import dcmread, read_dataset

from dicomfw.core.dataset import ITEM, UNDEFINED
from dicomfw.core.dictionary import SQ, vr_code

DATA = Path(pydicom.__file__).parent / "data"
_NOT_DICOM = {".py", ".txt", ".json", ".dump", ".icc", ".gz", ".pyc", ".md"}
_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def corpus() -> list[Path]:
    """Every file shipped in pydicom's data directory that is not obviously something else."""
    return sorted(
        path
        for path in DATA.rglob("*")
        if path.is_file()
        and path.suffix not in _NOT_DICOM
        and "__pycache__" not in path.parts
        and path.name not in ("README", "FileInfo.txt")
    )


def corpus_id(path: Path) -> str:
    return str(path.relative_to(DATA))


def _meta_end(raw: bytes) -> int:
    pos = 132 if raw[128:132] == b"DICM" else 0
    while raw[pos : pos + 2] == b"\x02\x00" and len(raw) - pos >= 8:
        if raw[pos + 4 : pos + 6] in _LONG:
            pos += 12 + int.from_bytes(raw[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(raw[pos + 6 : pos + 8], "little")
    return pos


def data_set(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes as they would cross the network). Raises if pydicom
    cannot read the file as DICOM at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom on the odd files
        ds = dcmread(path, force=True)
    raw = path.read_bytes()
    start = _meta_end(raw)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        implicit, little = ds.original_encoding
        syntax = IMPLICIT_LE if implicit else EXPLICIT_LE if little else EXPLICIT_BE
    return str(syntax), raw[start:]


def inflated(syntax: str, data: bytes) -> bytes:
    """The data set as pydicom parses it (a deflated one inflated)."""
    if syntax == DEFLATED:
        return zlib.decompress(data, -zlib.MAX_WBITS)
    return data


def reference_trace(syntax: str, data: bytes) -> list[tuple[int, int, int, int]]:
    """pydicom's elements as (depth, tag, VR code or 0 for implicit, length), in file order,
    items as (depth, ITEM, 0, 0); encapsulated pixel data as one element."""
    implicit = syntax == IMPLICIT_LE
    little = syntax != EXPLICIT_BE
    ds = read_dataset(io.BytesIO(inflated(syntax, data)), implicit, little)
    out: list[tuple[int, int, int, int]] = []
    _trace(ds, 0, implicit, out)
    return out


def _trace(ds: Dataset, depth: int, implicit: bool, out: list[tuple[int, int, int, int]]) -> None:
    for tag in list(ds._dict):  # file order, not sorted
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement):
            vr = raw.VR
            length = raw.length
        else:
            assert isinstance(raw, DataElement)
            vr = raw.VR
            length = UNDEFINED if raw.is_undefined_length else -1
        code = 0 if implicit or vr is None else vr_code(str(vr))
        if isinstance(raw, DataElement) and vr == "SQ" and not implicit:
            code = SQ
        out.append((depth, int(tag), code, length))
        if ds[tag].VR == "SQ":
            # a UN sequence's items are in implicit VR (PS3.5 §6.2.2)
            inner = implicit or vr == "UN"
            for item in ds[tag].value:
                out.append((depth + 1, ITEM, 0, 0))
                _trace(item, depth + 1, inner, out)
