"""How many bytes an object of the core keeps alive: ``sys.getsizeof`` summed over what it owns.

tracemalloc would count every allocation of the process (hypothesis' own included) and needs a
quiet interpreter; this walks the object graph of one session or stream instead, which is
deterministic and cheap enough to run at every step of a property. A memoryview counts the
whole buffer it keeps alive, not just its own header: a view of a 256 KB read held by a waiting
command keeps the whole read, which is the leak this accounting is meant to catch.
"""

from __future__ import annotations

import enum
import sys
import types
from collections.abc import Iterable
from typing import Any


def retained_bytes(root: object, shared: Iterable[object] = ()) -> int:
    """Bytes ``root`` owns: itself, its attributes (``__dict__`` and ``__slots__``), container
    items, recursively, each object once. ``shared`` objects (the policy, the rate-limit gate,
    a clock: one per process, not per session) and what only they reach are not counted;
    neither are functions, classes, modules or enum members, which exist once per process."""
    seen = {id(item) for item in shared}
    total = 0
    stack: list[Any] = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or _global(item):
            continue
        seen.add(id(item))
        if isinstance(item, memoryview):
            owner = item.obj
            if id(owner) not in seen:
                seen.add(id(owner))
                total += sys.getsizeof(owner)
            total += sys.getsizeof(item)
            continue
        total += sys.getsizeof(item)
        if isinstance(item, str | bytes | bytearray | int | float | bool):
            continue
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        stack.extend(_attributes(item))
    return total


_PER_PROCESS = (
    type,
    enum.Enum,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    types.ModuleType,
)


def _global(item: object) -> bool:
    return item is None or isinstance(item, _PER_PROCESS)


#: How attributes are stored: in ``__slots__`` (member descriptors) or, in a class mypyc
#: compiled, as native fields behind getset descriptors; ``__dict__`` holds the rest.
_FIELDS = (types.MemberDescriptorType, types.GetSetDescriptorType)


def _attributes(item: object) -> list[object]:
    """The values of ``item``'s attributes, whether interpreted (``__dict__``, ``__slots__``)
    or compiled by mypyc (the suite runs against either install)."""
    found: list[object] = list(vars(item).values()) if hasattr(item, "__dict__") else []
    for klass in type(item).__mro__:
        for name, descriptor in vars(klass).items():
            if isinstance(descriptor, _FIELDS) and name not in ("__dict__", "__weakref__"):
                try:
                    found.append(getattr(item, name))
                except AttributeError:  # a slot never assigned
                    continue
    return found
