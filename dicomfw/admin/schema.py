"""The rules file as a JSON Schema (draft 2020-12), generated from the loader's own tables.

An editor that knows the schema (VS Code's YAML extension, any yaml-language-server client)
completes keys, SOP class and transfer syntax keywords, and flags a mistake while the admin
types, long before ``dicomfw check``. One source of truth: which keys exist, which are
required and what each value is come from ``config/load.py``'s tables (``_TOP``, ``_LISTENER``,
``_ROUTE``, ...) and the checks they name, read here; nothing is listed twice. A check this
module has no JSON form for stops the generator with its name, and a test compares the shipped
``dicomfw/config/rules.schema.json`` with what the generator makes now, so a key added to the
loader cannot be missing from the schema.

The schema is honest about what JSON Schema can say: types, ranges, patterns (CIDR, AE titles
of at most 16 characters, ``host:port``), the keyword lists, and a few rules across keys. The
loader stays the final judge of what only it can know: that a route's listener, upstream and
peers are defined, that names are unique, that a network has no host bits set, that files
exist. Regenerate after changing the loader (or upgrading pydicom, whose registry the keyword
lists come from)::

    python -m dicomfw.admin.schema > dicomfw/config/rules.schema.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

from pydicom._uid_dict import UID_dictionary

from dicomfw.config import load
from dicomfw.core import uids
from dicomfw.core.content import CHECKS
from dicomfw.core.policy import SERVICE_COMMANDS

__all__ = ["SCHEMA_FILE", "generate", "shipped"]

Fragment = dict[str, Any]
Check = Callable[..., Any]

#: Where the generated schema ships, inside the package.
SCHEMA_FILE: Final = "rules.schema.json"
_DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"

_NON_BLANK: Final = r"\S"
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4: Final = rf"{_OCTET}(?:\.{_OCTET}){{3}}(?:/(?:3[0-2]|[12]?[0-9]))?"
_IPV6: Final = r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))?"
#: PS3.5 VR AE: 1-16 printable ASCII characters but backslash; padding spaces do not count.
_AE_CHAR: Final = r"[ -\[\]-~]"
_AE_EDGE: Final = r"[!-\[\]-~]"
_AE_TITLE: Final = rf"^ *{_AE_EDGE}(?:{_AE_CHAR}{{0,14}}{_AE_EDGE})? *$"


def _text(description: str, **more: Any) -> Fragment:
    return {"type": "string", "pattern": _NON_BLANK, **more, "description": description}


def _anchored(pattern: str) -> str:
    return pattern if pattern.startswith("^") else f"^(?:{pattern})$"


@dataclass(frozen=True)
class _Section:
    """A check that reads a mapping with one of the loader's tables. ``extra``: the rules
    across keys the check applies besides the table, in JSON Schema; ``or_false``: ``false``
    is accepted too (``tls: false``)."""

    table: load.Schema
    extra: Fragment = field(default_factory=dict)
    or_false: bool = False


def _sections() -> dict[Check, _Section]:
    both = {"cert": ["key"], "key": ["cert"]}
    proxied = {"properties": {"proxy_protocol": {"const": True}}, "required": ["proxy_protocol"]}
    shared = {"properties": {"store": {"const": "redis"}}, "required": ["store"]}
    rediss = {"properties": {"url": {"pattern": "^rediss://"}}, "required": ["url"]}
    return {
        load._listener: _Section(
            load._LISTENER,
            {
                "dependentSchemas": {"proxy_from": proxied},
                "if": proxied,
                "then": {"required": ["proxy_from"]},
            },
        ),
        load._server_tls: _Section(load._SERVER_TLS, or_false=True),
        load._client_tls: _Section(
            load._CLIENT_TLS,
            {"dependentRequired": {**both, "key_password_file": ["key"]}},
            or_false=True,
        ),
        load._certificate: _Section(load._CERTIFICATE, {"minProperties": 1}),
        load._peer: _Section(load._PEER),
        load._allow_rule: _Section(
            load._ALLOW,
            {
                "dependentSchemas": {
                    "move_destinations": {
                        "properties": {"services": {"contains": {"const": "C-MOVE"}}}
                    }
                }
            },
        ),
        load._rewrite: _Section(load._REWRITE, {"minProperties": 1}),
        load._route: _Section(load._ROUTE),
        load._limits: _Section(
            load._LIMITS,
            {"dependentSchemas": {"redis": shared}, "if": shared, "then": {"required": ["redis"]}},
        ),
        load._redis: _Section(
            load._REDIS,
            {
                "if": rediss,
                "then": {"required": ["tls"], "properties": {"tls": {"not": {"const": False}}}},
                "else": {"properties": {"tls": {"const": False}}},
            },
        ),
        load._metrics: _Section(load._METRICS),
        load._atna: _Section(
            load._ATNA,
            {
                "dependentRequired": both,
                "if": {"properties": {"transport": {"const": "udp"}}, "required": ["transport"]},
                "then": {"properties": {"ca": False, "cert": False, "key": False}},
                "else": {"required": ["ca"]},
            },
        ),
        load._audit: _Section(
            load._AUDIT, {"anyOf": [{"required": ["file"]}, {"required": ["atna"]}]}
        ),
        load._site_validation: _Section(load._SITE_VALIDATION),
        load._scanner: _Section(load._SCANNER),
    }


class _Generator:
    """Turns the loader's checks into schema fragments, collecting named parts in ``defs``."""

    def __init__(self) -> None:
        self.defs: dict[str, Fragment] = {}
        self.sections = _sections()
        # Checks that are plain functions, by identity.
        self.plain: dict[Check, Callable[[], Fragment]] = {
            load._string: lambda: _text("text"),
            load._boolean: lambda: {"type": "boolean"},
            load._name: lambda: _text(
                "a name: letters, digits, '_', '.' and '-'", pattern=_anchored(load._NAME.pattern)
            ),
            load._host: lambda: _text(
                "an IP address or a DNS name, without a port",
                pattern=r"^[A-Za-z0-9_.:%-]+$",
                maxLength=253,
            ),
            load._bind: lambda: _text(
                'host:port to listen on; IPv6 in brackets, quoted: "[::]:104"',
                pattern=r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?:0|[1-9][0-9]{0,4})$",
            ),
            load._file: lambda: _text("a file; relative to the rules file's directory"),
            load._output_file: lambda: _text(
                'a file to append to, relative to the rules file\'s directory; "-": stdout'
            ),
            load._tls_version: lambda: {
                "enum": list(load._TLS_VERSIONS),
                "description": 'the oldest TLS version accepted, in quotes: "1.2" or "1.3"',
            },
            load._ae_title: lambda: _text(
                "an AE title: 1 to 16 printable ASCII characters, no backslash",
                pattern=_AE_TITLE,
            ),
            load._network: lambda: _text(
                'an IPv4 or IPv6 network (10.1.2.0/24, "2001:db8::/64") or a single address',
                pattern=f"^(?:{_IPV4}|{_IPV6})$",
            ),
            load._fingerprint: lambda: _text(
                "a SHA-256 certificate fingerprint: 64 hex digits, colons optional",
                pattern=r"^:*(?:[0-9A-Fa-f]:*){64}$",
            ),
            load._service: lambda: {"enum": list(SERVICE_COMMANDS)},
            load._check_name: lambda: {"enum": sorted(CHECKS)},
            load._attribute: lambda: _text(
                "a data element: a PS3.6 keyword (PatientID) or a tag ((0010,0020), 00100020)",
                pattern=r"^(?:[A-Za-z][A-Za-z0-9]*|\(?[0-9A-Fa-f]{4},?[0-9A-Fa-f]{4}\)?)$",
            ),
            load._attribute_values: lambda: {
                "type": "object",
                "minProperties": 1,
                "propertyNames": self.value(load._attribute),
                "additionalProperties": self._list(load._string, non_empty=True),
                "description": "the values an attribute may have, e.g. {Modality: [CT, MR]}",
            },
            load._universal_match: lambda: {
                "type": "object",
                "propertyNames": {"enum": list(load._QUERY_LEVELS)},
                "additionalProperties": self._list(load._attribute, non_empty=True),
                "description": "keys a C-FIND may not match universally, by query level",
            },
            load._route_validation: lambda: {
                "anyOf": [{"type": "boolean"}, self.table(load._VALIDATION)],
                "description": "false, true (the file's validation:), or keys overriding it",
            },
            load._scanner_address: lambda: _text(
                "clamd's socket: unix:/run/clamav/clamd.ctl or HOST:PORT",
                pattern=r"^(?:unix:.+|.+:[0-9]{1,5})$",
            ),
            load._site_mode: lambda: self.value(load._MODE),
            load._redis_url: lambda: _text(
                "redis://[user:password@]host[:port][/db], rediss://... (TLS) or unix:///path",
                pattern=r"^(?:rediss?://[^/]+|unix:///?.+)",
            ),
            load._key_prefix: lambda: _text(
                "what every key of the shared limits starts with: up to 64 printable ASCII "
                "characters without spaces",
                pattern=r"^[!-~]{1,64}$",
            ),
            load._workers: lambda: {
                "anyOf": [
                    {"type": "integer", "minimum": 1, "maximum": load._MAX_WORKERS},
                    {"const": "auto"},
                ],
                "description": "worker processes, or auto (one per CPU)",
            },
            load._listeners: lambda: self._list(load._listener, non_empty=True),
            load._peers: lambda: self._list(load._peer, non_empty=False),
            load._upstreams: lambda: {
                "type": "object",
                "minProperties": 1,
                "propertyNames": self.value(load._name),
                "additionalProperties": self._named(load._UPSTREAM),
            },
            load._service_rates: lambda: {
                "type": "object",
                "minProperties": 1,
                "propertyNames": self.value(load._service),
                "additionalProperties": self.value(load._PER_MINUTE),
                "description": "requests per minute by service, e.g. {C-FIND: 60}",
            },
        }
        # Checks made by a factory (``_int_in(1, 65535)``), by the factory's name; they get
        # the factory's arguments, read from the closure.
        self.made: dict[str, Callable[..., Fragment]] = {
            "_int_in": lambda low, high: {"type": "integer", "minimum": low, "maximum": high},
            "_seconds": lambda high: {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": high,
                "description": "seconds",
            },
            "_choice": lambda options: {"enum": list(options)},
            "_uid": self._uid,
            "_reference": lambda check_name, kind: {
                **self.value(check_name),
                "description": f"the name of a {kind} defined in this file",
            },
            "_list_of": lambda check, non_empty: self._list(check, non_empty),
            "_rate_limits": lambda schema: {**self._named(schema), "minProperties": 1},
        }

    def value(self, check: Check) -> Fragment:
        """The schema of what ``check`` accepts."""
        if check in self.sections:
            section = self.sections[check]
            mapping = self._named(section.table, section.extra)
            return {"anyOf": [{"const": False}, mapping]} if section.or_false else mapping
        if check in self.plain:
            return self.plain[check]()
        factory = check.__qualname__.split(".<locals>.", 1)[0]
        if factory in self.made and check.__closure__ is not None:
            arguments = zip(check.__code__.co_freevars, check.__closure__, strict=True)
            return self.made[factory](**{name: cell.cell_contents for name, cell in arguments})
        raise LookupError(
            f"no JSON Schema for the loader's check {check.__qualname__}: "
            "add it to dicomfw/admin/schema.py"
        )

    def table(self, table: load.Schema, extra: Fragment | None = None) -> Fragment:
        """A mapping checked by ``table``: its keys, those required, nothing else."""
        return {
            "type": "object",
            "properties": {key: self.value(check) for key, (_, check) in table.items()},
            "required": [key for key, (required, _) in table.items() if required],
            "additionalProperties": False,
            **(extra or {}),
        }

    def _named(self, table: load.Schema, extra: Fragment | None = None) -> Fragment:
        """``table`` as an entry of ``$defs``, named after the loader's constant for it."""
        constant = next(name for name, value in vars(load).items() if value is table)
        name = constant.strip("_").lower()
        if name not in self.defs:
            self.defs[name] = {}  # reserved before recursing
            self.defs[name] = self.table(table, extra)
        return {"$ref": f"#/$defs/{name}"}

    def _list(self, check: Check, non_empty: bool) -> Fragment:
        return {"type": "array", "items": self.value(check), "minItems": 1 if non_empty else 0}

    def _uid(self, kind: str) -> Fragment:
        """A UID, or a PS3.6 keyword the loader resolves to one of this ``kind``."""
        name = kind.lower().replace(" ", "_")
        if name not in self.defs:
            keywords = []
            for entry in UID_dictionary.values():
                try:
                    uids.resolve(entry[4], kind)
                except ValueError:
                    continue
                keywords.append(entry[4])
            self.defs[name] = {
                "anyOf": [
                    {"enum": sorted(keywords)},
                    {
                        "type": "string",
                        "pattern": uids._UID_SYNTAX.pattern,
                        "maxLength": 64,
                        "description": "a UID",
                    },
                ],
                "description": f"a {kind}: a PS3.6 keyword or a UID",
            }
        return {"$ref": f"#/$defs/{name}"}


def generate() -> Fragment:
    """The JSON Schema of the rules file, as the loader's tables describe it now."""
    generator = _Generator()
    top = generator.table(load._TOP)
    return {
        "$schema": _DRAFT,
        "title": "dicomfw rules file",
        "description": "What the dicomfw firewall lets through (README.md, Configuration "
        "reference). `dicomfw check` is the final judge: it also checks references between "
        "sections, unique names and the files named.",
        **top,
        "$defs": dict(sorted(generator.defs.items())),
    }


def render(schema: Fragment) -> str:
    """The schema as it is written to the shipped file."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def shipped() -> str:
    """The schema file in the installed package, as ``dicomfw schema`` prints it."""
    return resources.files("dicomfw.config").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


if __name__ == "__main__":
    sys.stdout.write(render(generate()))
