"""UID names: resolve the keywords admins write (``CTImageStorage``) to UIDs and back.

pydicom ships the PS3.6 Annex A registry; we only add an index by keyword so a rules file can
say ``CTImageStorage`` and the policy compares plain UID strings on the hot path.
"""

from __future__ import annotations

import re
from functools import cache

from pydicom._uid_dict import UID_dictionary

_UID_SYNTAX = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@cache
def _by_keyword() -> dict[str, tuple[str, str]]:
    """keyword -> (uid, registry type such as 'SOP Class' or 'Transfer Syntax')."""
    return {entry[4]: (uid, entry[1]) for uid, entry in UID_dictionary.items() if entry[4]}


def is_uid(text: str) -> bool:
    """True for a syntactically valid UID (PS3.5 §9.1): dotted numbers, no leading zeros."""
    return len(text) <= 64 and bool(_UID_SYNTAX.match(text))


def resolve(name: str, kind: str) -> str:
    """Return the UID for a keyword or UID of the given registry ``kind``.

    ``kind`` is 'SOP Class' or 'Transfer Syntax'. Raises ``ValueError`` with a message an admin
    can act on (the rules loader adds file and line).
    """
    if is_uid(name):
        return name
    found = _by_keyword().get(name)
    if found is None:
        raise ValueError(f"unknown {kind} keyword {name!r} (use a PS3.6 keyword or a UID)")
    uid, registry_type = found
    if kind == "SOP Class" and registry_type not in ("SOP Class", "Meta SOP Class"):
        raise ValueError(f"{name!r} is a {registry_type}, not a SOP Class")
    if kind == "Transfer Syntax" and registry_type != "Transfer Syntax":
        raise ValueError(f"{name!r} is a {registry_type}, not a Transfer Syntax")
    return uid


def name_of(uid: str) -> str:
    """Keyword for a UID when the registry knows it, else the UID itself (for logs and output)."""
    entry = UID_dictionary.get(uid)
    return entry[4] if entry and entry[4] else uid
