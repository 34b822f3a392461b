"""glibc's heap statistics, for tests of what dicomfw leaves on the heap (``mallinfo2``)."""

from __future__ import annotations

import ctypes

_FIELDS = ["arena", "ordblks", "smblks", "hblks", "hblkhd"]
_FIELDS += ["usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"]


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


LIBC = ctypes.CDLL(None)
HAS_MALLINFO2 = hasattr(LIBC, "mallinfo2")  # glibc 2.33 and later


def mallinfo2() -> MallInfo2:
    LIBC.mallinfo2.restype = MallInfo2
    info: MallInfo2 = LIBC.mallinfo2()
    return info


def heap_in_use() -> int:
    """Bytes allocated with malloc and not yet freed, mapped blocks included."""
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)
