"""``FILE:LINE`` of any key of a rules file that loaded.

Peers, routes and allow rules carry ``where`` from the loader; listeners, upstreams, TLS files
and the sections themselves do not, and the model has no reason to. A message about them
(``dicomfw check``'s warnings, ``dicomfw explain``'s chain) finds the line here, in the same
YAML node tree the loader walked, named the way the loader names the file.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from dicomfw.config.model import Config

__all__ = ["Locator"]

Key = str | int


class Locator:
    """Lines of one rules file. ``file`` is the path as the loader was given it."""

    def __init__(self, file: str | Path) -> None:
        self.file = str(file)
        self._root = yaml.compose(Path(file).read_bytes(), Loader=yaml.SafeLoader)

    def where(self, *path: Key) -> str:
        """``FILE:LINE`` of the key (or list item) at ``path``, e.g. ``("listeners", 0, "tls",
        "cert")``; of the deepest part that exists, if the file changed since it loaded."""
        node, line = self._root, 1
        for key in path:
            found = _child(node, key)
            if found is None:
                break
            line, node = found
        return f"{self.file}:{line}"

    def listener(self, config: Config, name: str) -> str:
        index = next(i for i, listener in enumerate(config.listeners) if listener.name == name)
        return self.where("listeners", index)

    def upstream(self, name: str) -> str:
        return self.where("upstreams", name)


def _child(node: Node | None, key: Key) -> tuple[int, Node] | None:
    """The line and node of ``key`` in a mapping (the key's line) or a list (the item's)."""
    if isinstance(node, MappingNode) and isinstance(key, str):
        for key_node, value in node.value:
            if key_node.value == key:
                return key_node.start_mark.line + 1, value
    if isinstance(node, SequenceNode) and isinstance(key, int) and key < len(node.value):
        item = node.value[key]
        return item.start_mark.line + 1, item
    return None
