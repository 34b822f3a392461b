"""The PS3.6 data dictionary as the data-set walker needs it: tag -> VR code, tag -> VM.

Implicit VR Little Endian carries no VR (PS3.5 §7.1.3): a reader takes it from the data
dictionary, so the firewall must take it from the same dictionary as the system behind it.
pydicom ships PS3.6 (``pydicom.datadict``); it is read once, at import, into plain dicts keyed
by the 32-bit tag with the VR as a 16-bit code (``ord(first) << 8 | ord(second)``), so the
per-element lookup is one dict probe and no string is built on the per-message path.

Rules a reader applies to tags PS3.6 does not list (PS3.5 §6.2.2, §7.8.1), followed here:

* Group Length (gggg,0000) is UL;
* Private Creator (gggg,0010-00FF), gggg odd, is LO;
* any other private element is UN (its VR is known only to its creator's own dictionary);
* repeating groups (60xx overlays, 50xx curves, ...) match PS3.6's "xx" masks;
* anything else is UN.

Where PS3.6 lists alternatives ("US or SS", "OB or OW") the first is taken: the walker only
needs the VR to know a value's unit size and whether it is text, and the alternatives agree
on both where it matters (US/SS are 2 bytes; OB/OW are both skipped as binary).
"""

from __future__ import annotations

from typing import Final

from pydicom._dicom_dict import DicomDictionary, RepeatersDictionary
from pydicom.datadict import tag_for_keyword


def vr_code(text: str) -> int:
    """The 16-bit code of a two-letter VR ("UI" -> 0x5549)."""
    return ord(text[0]) << 8 | ord(text[1])


AE: Final = vr_code("AE")
AS: Final = vr_code("AS")
AT: Final = vr_code("AT")
CS: Final = vr_code("CS")
DA: Final = vr_code("DA")
DS: Final = vr_code("DS")
DT: Final = vr_code("DT")
FD: Final = vr_code("FD")
FL: Final = vr_code("FL")
IS: Final = vr_code("IS")
LO: Final = vr_code("LO")
LT: Final = vr_code("LT")
OB: Final = vr_code("OB")
OD: Final = vr_code("OD")
OF: Final = vr_code("OF")
OL: Final = vr_code("OL")
OV: Final = vr_code("OV")
OW: Final = vr_code("OW")
PN: Final = vr_code("PN")
SH: Final = vr_code("SH")
SL: Final = vr_code("SL")
SQ: Final = vr_code("SQ")
SS: Final = vr_code("SS")
ST: Final = vr_code("ST")
SV: Final = vr_code("SV")
TM: Final = vr_code("TM")
UC: Final = vr_code("UC")
UI: Final = vr_code("UI")
UL: Final = vr_code("UL")
UN: Final = vr_code("UN")
UR: Final = vr_code("UR")
US: Final = vr_code("US")
UT: Final = vr_code("UT")
UV: Final = vr_code("UV")

#: VRs whose explicit-VR header has two reserved bytes and a 32-bit length (PS3.5 §7.1.2,
#: Table 7.1-1); all others have a 16-bit length.
LONG_LENGTH_VRS: Final = frozenset((OB, OD, OF, OL, OV, OW, SQ, UC, UN, UR, UT, SV, UV))
#: Every VR of PS3.5 Table 6.2-1: an explicit VR outside it is refused, since readers disagree
#: on how long its length field is (pydicom guesses implicit VR, DCMTK a 32-bit length).
KNOWN_VRS: Final = frozenset(
    (AE, AS, AT, CS, DA, DS, DT, FD, FL, IS, LO, LT, OB, OD, OF, OL, OV, OW, PN, SH, SL, SQ,
     SS, ST, SV, TM, UC, UI, UL, UN, UR, US, UT, UV)
)  # fmt: skip
#: Unit size of the binary VRs: a value's length must be a multiple of it (PS3.5 Table 6.2-1).
UNIT_SIZE: Final[dict[int, int]] = {
    US: 2, SS: 2, OW: 2, UL: 4, SL: 4, FL: 4, OF: 4, OL: 4, AT: 4,
    FD: 8, OD: 8, SV: 8, UV: 8, OV: 8,
}  # fmt: skip
#: The string VRs (PS3.5 Table 6.2-1): their padding is not content, so a value of only
#: spaces or NULs is empty.
TEXT_VRS: Final = frozenset((AE, AS, CS, DA, DS, DT, IS, LO, LT, PN, SH, ST, TM, UC, UI, UR, UT))
#: Values that may carry a file (PS3.5 Table 6.2-1: "other" binary, unknown, unlimited text):
#: the executable check looks at their first bytes.
OPAQUE_VRS: Final = frozenset((OB, OW, UN, UT, LT))
#: Everything the walker and the inspector ask of a VR code in one bytes lookup (64 KiB,
#: indexed by the code, so no int is boxed per element): bit 0 the VR is known, bit 1 it has a
#: 32-bit length in explicit VR, bits 2-3 log2 of its unit size, bit 4 UI or SQ (always read),
#: bit 5 a VR the conformance tier reads, bit 6 a VR that may carry a file.
VR_KNOWN: Final = 0x01
VR_LONG: Final = 0x02
VR_ALWAYS_READ: Final = 0x10
VR_SYNTAX: Final = 0x20
VR_OPAQUE: Final = 0x40
SYNTAX_VRS: Final = frozenset((AE, AS, CS, DA, DT, TM))


def _vr_table() -> bytes:
    table = bytearray(65_536)
    for vr in KNOWN_VRS:
        table[vr] = (
            VR_KNOWN
            | (VR_LONG if vr in LONG_LENGTH_VRS else 0)
            | UNIT_SIZE.get(vr, 1).bit_length() - 1 << 2
            | (VR_ALWAYS_READ if vr in (UI, SQ) else 0)
            | (VR_SYNTAX if vr in SYNTAX_VRS else 0)
            | (VR_OPAQUE if vr in OPAQUE_VRS else 0)
        )
    return bytes(table)


def unit_size(vr: int) -> int:
    """The unit size of a known VR's values (1 for text and OB)."""
    return 1 << (VR_TABLE[vr] >> 2 & 3)


VR_TABLE: Final = _vr_table()


def _first_vr(text: str) -> int:
    """PS3.6 alternatives ("US or SS") -> the first; "NONE" (item tags) -> UN."""
    first = text.split(" or ")[0]
    return vr_code(first) if len(first) == 2 else UN


def _build() -> tuple[dict[int, int], dict[int, bool], list[tuple[int, int, int, bool]]]:
    vrs: dict[int, int] = {}
    single: dict[int, bool] = {}
    for tag, entry in DicomDictionary.items():
        vrs[tag] = _first_vr(entry[0])
        single[tag] = entry[1] == "1"
    repeaters: list[tuple[int, int, int, bool]] = []
    for mask, entry in RepeatersDictionary.items():
        bits = int("".join("0" if c == "x" else "F" for c in mask), 16)
        value = int(mask.replace("x", "0"), 16)
        repeaters.append((bits, value, _first_vr(entry[0]), entry[1] == "1"))
    return vrs, single, repeaters


_VRS, _SINGLE, _REPEATERS = _build()


def implicit_vr(tag: int) -> int:
    """The VR a reader gives ``tag`` in Implicit VR (see the module docstring)."""
    found = _VRS.get(tag, -1)
    if found >= 0:
        return found
    group = tag >> 16
    element = tag & 0xFFFF
    if element == 0:
        return UL
    if group & 1:
        return LO if 0x0010 <= element <= 0x00FF else UN
    for bits, value, vr, _ in _REPEATERS:
        if tag & bits == value:
            return vr
    return UN


def single_valued(tag: int) -> bool:
    """True when PS3.6 gives ``tag`` a value multiplicity of exactly 1 (so a backslash in its
    value cannot be a value separator). Unknown tags: False (nothing to hold them to)."""
    found = _SINGLE.get(tag)
    if found is not None:
        return found
    for bits, value, _, one in _REPEATERS:
        if tag & bits == value:
            return one
    return False


def keyword_tag(keyword: str) -> int:
    """The tag of a PS3.6 keyword (for tables written by keyword); KeyError if unknown."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return int(tag)
