"""Value syntax of the string VRs a parser relies on (PS3.5 §6.2, Table 6.2-1).

Each check takes a raw value (its padding included) and returns ``None`` when it conforms, or
a short reason for a Finding's detail (never the value itself). Character classes are tested
with ``bytes.translate(None, allowed)``, which deletes the allowed bytes at C speed and leaves
whatever else there is.

Two tiers (see ``dicomfw.core.content``): the UID syntax that path and shell tricks need to be
refused is a *safety* check (``uid_problem``); a leading zero in a UID component and the
syntax of AE, CS, DA, TM, DT and AS values are *conformance* checks, since real archives carry
values that break them and read the same everywhere (pydicom's ``rtdose.dcm`` has a UID
component "0123", its ``ExplVR_BigEnd.dcm`` the ACR-NEMA date "1997.04.24").

In query identifiers (C-FIND, C-GET, C-MOVE) the matching syntax of PS3.4 §C.2.2.2 is allowed:
wildcards ``*`` and ``?`` in AE and CS, ranges ``a-b``, ``-b``, ``a-`` in DA, TM and DT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from dicomfw.core.dictionary import AE, AS, CS, DA, DS, DT, IS, LT, ST, TM, UI, UR, UT

_DIGITS: Final = b"0123456789"
_UID_BYTES: Final = b"0123456789."
_CS_BYTES: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _"
_WILDCARDS: Final = b"*?"
_CONTROL: Final = bytes(range(0x20)) + b"\x7f"
_PRINTABLE: Final = bytes(range(0x20, 0x7F))
MAX_UID_LENGTH: Final = 64


def strip_padding(value: bytes) -> bytes:
    """A value without the padding writers use: trailing NULs and spaces (PS3.5 §6.2)."""
    return value.rstrip(b"\x00 ")


def uid_problem(value: bytes) -> str | None:
    """PS3.5 §9.1: each UID (values split at backslash) is 1-64 characters of digits and dots,
    with no empty component. An empty value is allowed (type 2 attributes)."""
    value = strip_padding(value)
    if not value:
        return None
    for uid in value.split(b"\\"):
        if not uid:
            return "an empty UID among several"
        if len(uid) > MAX_UID_LENGTH:
            return f"a UID of {len(uid)} characters (at most 64)"
        if uid.translate(None, _UID_BYTES):
            return "a UID with characters other than digits and dots"
        if uid[0] == 0x2E or uid[-1] == 0x2E or b".." in uid:
            return "a UID with an empty component"
    return None


def uid_leading_zero(value: bytes) -> bool:
    """True when a UID component has a leading zero ("1.2.0123"), which PS3.5 §9.1 forbids."""
    for uid in strip_padding(value).split(b"\\"):
        for component in uid.split(b"."):
            if len(component) > 1 and component[0] == 0x30:
                return True
    return False


def _date(text: bytes) -> bool:
    if len(text) != 8 or text.translate(None, _DIGITS):
        return False
    month, day = int(text[4:6]), int(text[6:8])
    return 1 <= month <= 12 and 1 <= day <= 31


def _time(text: bytes) -> bool:
    """HH[MM[SS[.F{1,6}]]] (PS3.5 Table 6.2-1, TM)."""
    whole, _, fraction = text.partition(b".")
    if fraction and (len(whole) != 6 or len(fraction) > 6 or fraction.translate(None, _DIGITS)):
        return False
    if len(whole) not in (2, 4, 6) or whole.translate(None, _DIGITS):
        return False
    if b"." in text and not fraction:
        return False
    limits = (23, 59, 60)
    return all(int(whole[i : i + 2]) <= limits[i // 2] for i in range(0, len(whole), 2))


def _datetime(text: bytes) -> bool:
    """YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX] (PS3.5 Table 6.2-1, DT)."""
    offset = b""
    for sign in (b"+", b"-"):
        if sign in text:
            text, _, offset = text.partition(sign)
            break
    if offset and (len(offset) != 4 or offset.translate(None, _DIGITS)):
        return False
    whole = text.partition(b".")[0]
    if len(whole) < 4 or len(whole) > 14 or len(whole) & 1:
        return False
    if len(whole) >= 8 and not _date(whole[:8]):
        return False
    if len(whole) > 8:
        return _time(text[8:])
    return not whole.translate(None, _DIGITS)


def _ranged(text: bytes, check: Callable[[bytes], bool], query: bool) -> bool:
    """A value, or in a query a range of two (either may be absent, not both)."""
    if query and b"-" in text:
        low, _, high = text.partition(b"-")
        return bool(low or high) and (not low or check(low)) and (not high or check(high))
    return check(text)


def syntax_problem(vr: int, value: bytes, query: bool) -> str | None:
    """Conformance of an AE, CS, DA, TM, DT or AS value; None for other VRs."""
    text = value.rstrip(b"\x00 ")
    if not text:
        return None
    if vr == AE:
        for one in text.split(b"\\"):
            if len(one.strip(b" ")) > 16 or one.translate(None, _PRINTABLE):
                return "an AE title longer than 16 characters or with control characters"
        return None
    if vr == CS:
        allowed = _CS_BYTES + _WILDCARDS if query else _CS_BYTES
        for one in text.split(b"\\"):
            if len(one) > 16 or one.translate(None, allowed):
                return "a code string longer than 16 or outside A-Z, 0-9, space, underscore"
        return None
    if vr == DA:
        if b"." in text and not query:
            return "a date in the ACR-NEMA form YYYY.MM.DD"
        return None if _ranged(text, _date, query) else "not a date YYYYMMDD"
    if vr == TM:
        return None if _ranged(text, _time, query) else "not a time HHMMSS.FFFFFF"
    if vr == DT:
        ok = _datetime(text) or (query and _ranged(text, _datetime, True))
        return None if ok else "not a date-time YYYYMMDDHHMMSS.FFFFFF&ZZXX"
    if vr == AS:
        ok = len(text) == 4 and not text[:3].translate(None, _DIGITS) and text[3:] in b"DWMY"
        return None if ok else "not an age string nnnD/W/M/Y"
    return None


#: Characters a query key of each VR may hold, matching syntax included (PS3.4 §C.2.2.2);
#: VRs not listed may hold any character but controls (and backslash where VM is 1).
_QUERY_BYTES: Final[dict[int, bytes]] = {
    DA: _DIGITS + b"-. ",
    TM: _DIGITS + b"-. ",
    DT: _DIGITS + b"-.+ ",
    UI: _UID_BYTES + b"\\",
    CS: _CS_BYTES + _WILDCARDS + b"\\",
    AS: _DIGITS + b"DWMY",
    IS: _DIGITS + b"+- \\",
    DS: _DIGITS + b"+-.eE \\",
}
#: The text VRs that may hold line breaks, tabs and form feeds (PS3.5 §6.1.3).
_TEXT_VRS: Final = frozenset((LT, ST, UT))
_TEXT_CONTROLS: Final = b"\t\n\f\r"
_ESC: Final = b"\x1b"  # ISO 2022 code extension (PS3.5 §6.1.2.5)


def query_characters_problem(vr: int, value: bytes, single: bool) -> str | None:
    """Characters a query key of ``vr`` may not hold: control characters (but ESC, and the
    line breaks of LT/ST/UT), a backslash in a single-valued key or a text VR, and characters
    outside the VR's repertoire for the VRs with one."""
    text = value.rstrip(b"\x00 ")
    allowed = _QUERY_BYTES.get(vr)
    if allowed is not None:
        if single:
            allowed = allowed.replace(b"\\", b"")
        return "characters outside the VR's repertoire" if text.translate(None, allowed) else None
    controls = text.translate(None, _ESC + (_TEXT_CONTROLS if vr in _TEXT_VRS else b""))
    if controls.translate(None, _CONTROL) != controls:
        return "control characters"
    if (single or vr in _TEXT_VRS or vr == UR) and b"\\" in text:
        return "a backslash in a single-valued key"
    return None
