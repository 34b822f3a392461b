"""What content validation reports: a ``Finding`` of a ``Kind``, and how a detail names things.

Kept apart from the walker and the checks so that both report the same type without importing
each other; ``dicomfw.core.content`` re-exports ``Kind`` and ``Finding`` as its API.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class Kind(enum.Enum):
    """What kind of refusal a finding is: the session maps kind x DIMSE service to a status."""

    MALFORMED = "malformed"  # cannot be read as the standard says (C-STORE 0xC000, ...)
    MISMATCH = "mismatch"  # data set does not match SOP class / command / context (0xA900)
    UNSUPPORTED = "unsupported"  # SOP class or transfer syntax not supported (0x0122)
    TOO_LARGE = "too_large"  # over a size limit (0xA700 / 0xA701)
    FORBIDDEN = "forbidden"  # content policy: active content, executable, ... (0x0124)


#: Kinds after which the walk cannot go on: the bytes can no longer be read as elements, or
#: reading on would cost more than the limits allow.
STRUCTURAL: Final = frozenset((Kind.MALFORMED, Kind.TOO_LARGE, Kind.UNSUPPORTED))


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason to refuse a data set.

    ``check`` is a stable snake_case name from a fixed set (a metric label, an audit reason, the
    Error Comment); ``detail`` is for humans and never carries peer bytes unescaped;
    ``conformance`` marks the opt-in conformance tier (the session may run it in monitor only).
    """

    check: str
    kind: Kind
    detail: str
    conformance: bool = False


def tag_text(tag: int) -> str:
    """``(gggg,eeee)`` as PS3.5 writes a tag."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def shown(value: bytes, limit: int = 24) -> str:
    """A peer's bytes fit for a log line: printable ASCII kept, everything else escaped, cut
    at ``limit`` bytes."""
    text = value[:limit].decode("ascii", "backslashreplace")
    escaped = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in text)
    return escaped + ("..." if len(value) > limit else "")
