"""How long native Pixel Data and Overlay Data must be (PS3.3 §C.7.6.3, §C.9.2; PS3.5 §8).

A decoder sizes its buffers from Rows, Columns, Samples per Pixel, Bits Allocated and Number of
Frames, then copies the value in: a value shorter or longer than that product is what heap
overflows in DICOM parsers are made of. So native pixel data must be exactly as long as the
attributes say (pydicom's ``get_expected_length``: bits rounded up to bytes, YBR_FULL_422 two
thirds of that, PS3.3 §C.7.6.3.1.2), plus one padding byte when that is odd (PS3.5 §8.1.1);
Overlay Data is Overlay Rows x Overlay Columns x Number of Frames in Overlay bits, rounded up to
bytes, then to even length.

The attributes are read from the data set the pixel data is in (top level, or an item such as
an Icon Image Sequence's), so the inspector keeps one ``ImageAttributes`` per open data set.
"""

from __future__ import annotations

from typing import Final

SAMPLES_PER_PIXEL: Final = 0x00280002
PHOTOMETRIC_INTERPRETATION: Final = 0x00280004
NUMBER_OF_FRAMES: Final = 0x00280008
ROWS: Final = 0x00280010
COLUMNS: Final = 0x00280011
BITS_ALLOCATED: Final = 0x00280100
PIXEL_ATTRIBUTES: Final = frozenset(
    (SAMPLES_PER_PIXEL, PHOTOMETRIC_INTERPRETATION, NUMBER_OF_FRAMES, ROWS, COLUMNS, BITS_ALLOCATED)
)
# Overlay attributes, as element numbers within an overlay group 60xx (PS3.3 §C.9.2).
OVERLAY_ROWS: Final = 0x0010
OVERLAY_COLUMNS: Final = 0x0011
OVERLAY_FRAMES: Final = 0x0015
OVERLAY_DATA: Final = 0x3000

_ABSENT: Final = -1
_INVALID: Final = -2


def is_overlay_group(group: int) -> bool:
    """Overlay groups are 6000-601E, even (PS3.5 §7.6)."""
    return 0x6000 <= group <= 0x601E and not group & 1


def _unsigned(value: bytes, little: bool) -> int:
    return int.from_bytes(value[:2], "little" if little else "big") if len(value) >= 2 else _INVALID


def _integer_string(value: bytes) -> int:
    text = value.strip(b"\x00 ")
    return int(text) if text.isdigit() and len(text) <= 10 else _INVALID


def _allowed(actual: int, expected: int) -> bool:
    return actual == expected or (expected & 1 == 1 and actual == expected + 1)


class ImageAttributes:
    """The pixel and overlay attributes of one data set, as far as read."""

    __slots__ = ("bits", "columns", "frames", "overlays", "rows", "samples", "ybr_422")

    def __init__(self) -> None:
        self.rows = _ABSENT
        self.columns = _ABSENT
        self.samples = _ABSENT
        self.bits = _ABSENT
        self.frames = _ABSENT
        self.ybr_422 = False
        #: overlay group -> [rows, columns, frames]
        self.overlays: dict[int, list[int]] | None = None

    def read(self, tag: int, value: bytes, little: bool) -> None:
        """Note a pixel attribute's value (``tag`` in ``PIXEL_ATTRIBUTES``)."""
        if tag == ROWS:
            self.rows = _unsigned(value, little)
        elif tag == COLUMNS:
            self.columns = _unsigned(value, little)
        elif tag == SAMPLES_PER_PIXEL:
            self.samples = _unsigned(value, little)
        elif tag == BITS_ALLOCATED:
            self.bits = _unsigned(value, little)
        elif tag == NUMBER_OF_FRAMES:
            self.frames = _integer_string(value)
        else:
            self.ybr_422 = value.strip(b"\x00 ") == b"YBR_FULL_422"

    def read_overlay(self, group: int, element: int, value: bytes, little: bool) -> None:
        """Note an overlay attribute (``element`` one of OVERLAY_ROWS/COLUMNS/FRAMES)."""
        if self.overlays is None:
            self.overlays = {}
        found = self.overlays.setdefault(group, [_ABSENT, _ABSENT, _ABSENT])
        if element == OVERLAY_FRAMES:
            found[2] = _integer_string(value)
        else:
            found[element - OVERLAY_ROWS] = _unsigned(value, little)

    def pixel_problem(self, length: int) -> str | None:
        """Why native pixel data of ``length`` bytes does not match the attributes, or None."""
        if self.rows < 0 or self.columns < 0 or self.bits < 0:
            return "Rows, Columns or Bits Allocated is missing or invalid"
        if self.bits != 1 and self.bits % 8:
            return f"Bits Allocated {self.bits} is neither 1 nor a multiple of 8"
        if self.frames == _INVALID or self.samples == _INVALID:
            return "Number of Frames or Samples per Pixel is invalid"
        samples = 1 if self.samples == _ABSENT else self.samples
        frames = 1 if self.frames == _ABSENT else self.frames
        pixels = self.rows * self.columns * samples * frames
        expected = (pixels + 7) // 8 if self.bits == 1 else pixels * (self.bits // 8)
        if self.ybr_422:
            expected = expected // 3 * 2
        if _allowed(length, expected):
            return None
        return f"{length} bytes where the image attributes say {expected}"

    def overlay_problem(self, group: int, length: int) -> str | None:
        """Why Overlay Data of ``length`` bytes in ``group`` does not match, or None."""
        found = self.overlays.get(group) if self.overlays is not None else None
        if found is None or found[0] < 0 or found[1] < 0 or found[2] == _INVALID:
            return "Overlay Rows or Columns is missing or invalid"
        frames = 1 if found[2] == _ABSENT else found[2]
        expected = (found[0] * found[1] * frames + 7) // 8
        if _allowed(length, expected):
            return None
        return f"{length} bytes where the overlay attributes say {expected}"
