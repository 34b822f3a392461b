"""The strict rules-file loader: YAML in, a validated ``Config`` out, or every problem at once.

A firewall that starts with a half-understood rules file is worse than one that refuses to
start, so nothing is guessed: unknown keys, duplicate keys, wrong types (``"false"`` for
``false``, ``"104"`` for ``104``), bad CIDRs, unknown UID keywords, dangling references and
missing certificate files are all errors. They are collected in one pass and raised together
as ``ConfigErrors``, each located as ``FILE:LINE: key.path: message`` so an admin can fix the
whole file in one edit instead of one error per restart.

Positions come from PyYAML's node tree (``yaml.compose``), which we walk ourselves: the usual
``safe_load`` would hand back plain dicts without line numbers and would silently keep the last
of two duplicate keys. The schema is written as tables of ``key -> (required, check)`` over a
handful of checks ("string", "int in range", "list of", "AE title", ...); each check returns the
model value or raises ``_Invalid`` and the table walker records it and carries on.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import yaml
from pydicom import datadict
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from dicomfw.config.model import (
    AtnaCollector,
    Audit,
    ClientTLS,
    Config,
    Limits,
    Listener,
    MetricsEndpoint,
    RedisStore,
    Scanner,
    ServerTLS,
    Upstream,
)
from dicomfw.core import uids
from dicomfw.core.content import CHECKS, ContentRules
from dicomfw.core.policy import (
    ENFORCE,
    MONITOR,
    SERVICE_COMMANDS,
    AllowRule,
    CertificateIdentity,
    ContentPolicy,
    IPNetwork,
    Peer,
    Policy,
    Route,
)
from dicomfw.core.ratelimit import LimitRules, RateLimits
from dicomfw.errors import ConfigError, ConfigErrors

__all__ = ["load_config"]

T = TypeVar("T")

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TLS_VERSIONS: Final = {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}
#: More worker processes than this is a typo, not a machine.
_MAX_WORKERS: Final = 64


def load_config(path: str | Path, check_files: bool = True) -> Config:
    """Read and validate a rules file; raise ``ConfigErrors`` listing every problem found.

    Relative paths inside the file (certificates, keys, CRLs) are resolved against the rules
    file's directory and must name readable files, so a config that loads is one the daemon can
    actually start with. ``check_files=False`` skips that (and the audit file's directory): to
    check a file's syntax and rules on a machine that does not hold its certificates.
    """
    shown = str(path)
    source = Path(path).absolute()
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise ConfigErrors([ConfigError(shown, None, "", f"cannot read: {exc.strerror}")]) from None
    # The directory is resolved so that "../certs" means what the shell would take it to mean
    # even if the rules directory is a symlink; the files named in it are not resolved, so a
    # certificate symlink that is renewed in place keeps working.
    loader = _Loader(shown, source.parent.resolve(), check_files)
    config = loader.load(text, source)
    if loader.errors:
        raise ConfigErrors(sorted(loader.errors, key=lambda e: e.line or 0))
    assert config is not None
    return config


class _Invalid(Exception):
    """A check failed. With a message, the caller records it at the value's position; without
    one, the problems were already recorded deeper down and the value is merely unusable."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class _At:
    """A YAML node and the key path that reached it, e.g. ``routes[0].allow[1].services``."""

    node: Node
    path: str

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def child(self, node: Node, name: str) -> _At:
        return _At(node, f"{self.path}.{name}" if self.path else name)

    def item(self, node: Node, index: int) -> _At:
        return _At(node, f"{self.path}[{index}]")


#: A check turns a node into a model value or raises ``_Invalid``.
Check = Callable[["_Loader", _At], T]
#: A mapping's schema: key -> (required?, check), in the order the checks should run.
Schema = dict[str, tuple[bool, Check[Any]]]
REQUIRED, OPTIONAL = True, False


@dataclass
class _Fields:
    """The known keys of one mapping: where each was given, and the values that passed."""

    given: dict[str, _At] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    ok: bool = True

    def require_ok(self) -> None:
        if not self.ok:
            raise _Invalid()


@dataclass(frozen=True, slots=True)
class _RouteKey:
    """What an earlier route claimed, to catch two routes that would take the same association."""

    listener: str
    called_ae: str
    calling_aes: frozenset[str] | None
    at: _At


class _Loader:
    """One pass over one rules file; accumulates errors and the names later checks refer to."""

    def __init__(self, file: str, base_dir: Path, check_files: bool = True) -> None:
        self.file = file
        self.base_dir = base_dir
        self.check_files = check_files
        self.errors: list[ConfigError] = []
        # kind ("listener", "upstream", "peer", "route") -> name -> where it was defined. A kind
        # is absent while its section is unusable, so references to it are not also reported.
        self.names: dict[str, dict[str, _At]] = {}
        self.route_keys: list[_RouteKey] = []
        # ``listeners[].limits`` and ``peers[].limits``, folded into ``Limits.rates`` at the end.
        self.listener_limits: dict[str, RateLimits] = {}
        self.peer_limits: dict[str, RateLimits] = {}
        # ``mode`` of the file and of each listener that sets one: a route without its own
        # takes its listener's, else the file's.
        self.site_mode = ENFORCE
        self.listener_modes: dict[str, str] = {}
        # ``validation:`` of the file, as given: what a route's ``validate:`` starts from
        self.site_validation: dict[str, Any] | None = None
        self.scanner: Scanner | None = None  # ``validation.scanner``
        self._constructor = SafeConstructor()

    # -- reporting ---------------------------------------------------------------------------

    def where(self, at: _At) -> str:
        """``FILE:LINE`` of a node, for rule objects to say where they were defined."""
        return f"{self.file}:{at.line}"

    def error(self, at: _At, message: str, line: int | None = None) -> None:
        self.errors.append(ConfigError(self.file, line or at.line, at.path, message))

    def run(self, check: Check[T], at: _At) -> T:
        """Apply a check, recording its message at ``at``; re-raise so the caller skips it."""
        try:
            return check(self, at)
        except _Invalid as exc:
            if exc.message:
                self.error(at, exc.message)
            raise _Invalid() from None

    def claim(self, kind: str, name: str, at: _At, hint: str = "") -> None:
        """Register a name that must be unique within its kind."""
        seen = self.names.setdefault(kind, {})
        if name in seen:
            what = _NAME_OF_KIND.get(kind, f"{kind} name")
            first = seen[name].line
            self.error(at, f"duplicate {what} {name!r} (first used on line {first}){hint}")
        else:
            seen[name] = at

    # -- the file ----------------------------------------------------------------------------

    def load(self, text: bytes, source: Path) -> Config | None:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            where = ""
            if exc.context and exc.context_mark and exc.context_mark is not mark:
                where = f" ({exc.context} on line {exc.context_mark.line + 1})"
            self.errors.append(
                ConfigError(self.file, line, "", f"YAML syntax error: {exc.problem}{where}")
            )
            return None
        except yaml.YAMLError as exc:  # e.g. undecodable bytes: no line to point at
            self.errors.append(ConfigError(self.file, None, "", f"not valid YAML: {exc}"))
            return None
        if root is None:
            self.errors.append(
                ConfigError(
                    self.file,
                    None,
                    "",
                    "the rules file is empty; it needs the sections listeners, upstreams, "
                    "peers and routes (see rules/example.yaml)",
                )
            )
            return None
        try:
            top = self.fields(_At(root, ""), _TOP, what="a mapping of sections")
            top.require_ok()
        except _Invalid as exc:
            if exc.message:
                self.error(_At(root, ""), exc.message)
            return None
        values = top.values
        return Config(
            source=source,
            listeners=tuple(values["listeners"]),
            upstreams=tuple(values["upstreams"]),
            policy=Policy(
                peers=tuple(values["peers"]),
                routes=tuple(values["routes"]),
                mode=self.site_mode,
                listener_modes=self.listener_modes,
            ),
            limits=self.with_overrides(values.get("limits", Limits())),
            metrics=values.get("metrics"),
            audit=values.get("audit"),
            scanner=values.get("validation", {}).get("scanner"),
            workers=values.get("workers", 1),
            **{key: values[key] for key in ("instance",) if key in values},
        )

    def with_overrides(self, limits: Limits) -> Limits:
        rules = LimitRules(limits.rates.default, self.listener_limits, self.peer_limits)
        return replace(limits, rates=rules)

    # -- structure ---------------------------------------------------------------------------

    def pairs(self, at: _At, what: str = "a mapping") -> list[tuple[str, _At, _At]]:
        """(key, key position, value position) of a mapping; rejects non-string and duplicate
        keys here, since YAML itself would keep the last duplicate without a word."""
        if not isinstance(at.node, MappingNode):
            raise _Invalid(f"expected {what}, got {_kind(self, at)}")
        seen: dict[str, int] = {}
        result = []
        for key_node, value_node in at.node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STR_TAG:
                self.error(at, _bad_key(key_node), line=key_node.start_mark.line + 1)
                continue
            key = key_node.value
            key_at = at.child(key_node, key)
            if key in seen:
                self.error(key_at, f"duplicate key {key!r} (first given on line {seen[key]})")
                continue
            seen[key] = key_at.line
            result.append((key, key_at, at.child(value_node, key)))
        return result

    def fields(
        self, at: _At, schema: Schema, at_least_one: bool = False, what: str = "a mapping"
    ) -> _Fields:
        """Check a mapping against its schema. Never raises for a bad key or value (those are
        recorded and clear ``ok``), so callers can still use the parts that were fine."""
        found = _Fields()
        for key, key_at, value_at in self.pairs(at, what):
            if key in schema:
                found.given[key] = value_at
                continue
            allowed = ", ".join(schema)
            close = difflib.get_close_matches(key, schema, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.error(key_at, f"unknown key {key!r} (allowed: {allowed}){hint}")
            found.ok = False
        for key, (required, check) in schema.items():
            if key in found.given:
                try:
                    found.values[key] = self.run(check, found.given[key])
                except _Invalid:
                    found.ok = False
            elif required:
                self.error(at, f"missing required key {key!r}")
                found.ok = False
        if at_least_one and not found.given and found.ok:
            self.error(at, f"give at least one of {', '.join(schema)}")
            found.ok = False
        return found

    def sequence(self, at: _At, non_empty: bool = True) -> list[_At]:
        if not isinstance(at.node, SequenceNode):
            raise _Invalid(f"expected a list, got {_kind(self, at)}")
        if non_empty and not at.node.value:
            raise _Invalid("expected a non-empty list")
        return [at.item(node, i) for i, node in enumerate(at.node.value)]

    def each(self, items: list[_At], check: Check[T]) -> list[T]:
        """Check every item, reporting all bad ones before giving up on the list."""
        values: list[T] = []
        failed = False
        for item in items:
            try:
                values.append(self.run(check, item))
            except _Invalid:
                failed = True
        if failed:
            raise _Invalid()
        return values

    def scalar(self, at: _At) -> object:
        """The Python value YAML gives a scalar (str, int, float, bool, None, date, ...)."""
        if not isinstance(at.node, ScalarNode):
            return _NOT_SCALAR
        try:
            return self._constructor.construct_object(at.node)
        except yaml.YAMLError:
            raise _Invalid(f"unsupported YAML tag {at.node.tag!r}") from None


_NAME_OF_KIND: Final = {"peer": "peer AE title"}
_STR_TAG: Final = "tag:yaml.org,2002:str"
_NOT_SCALAR: Final = object()


def _bad_key(node: Node) -> str:
    if node.tag == "tag:yaml.org,2002:merge":
        return "YAML merge keys (<<) are not supported; write the keys out"
    if isinstance(node, ScalarNode):
        return f'key {node.value} must be a string; quote it: "{node.value}"'
    return "keys must be plain strings, not a list or a mapping"


def _kind(ld: _Loader, at: _At) -> str:
    """Name what YAML made of a value, for "expected X, got Y" messages."""
    node = at.node
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    value = ld.scalar(at)
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({node.value})"
    if isinstance(value, int):
        return f"an integer ({node.value})"
    if isinstance(value, float):
        return f"a number ({node.value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return f"a {type(value).__name__} ({node.value})"


# -- scalar checks ---------------------------------------------------------------------------


def _string(ld: _Loader, at: _At) -> str:
    value = ld.scalar(at)
    if isinstance(value, str):
        if not value.strip():
            raise _Invalid("must not be empty or only spaces")
        return value
    hint = f'; quote it: "{at.node.value}"' if ld.scalar(at) is not None else ""
    raise _Invalid(f"expected a string, got {_kind(ld, at)}{hint}")


def _quoted_hint(at: _At) -> str:
    quoted = isinstance(at.node, ScalarNode) and at.node.style in ("'", '"')
    return " (write it without quotes)" if quoted else ""


def _boolean(ld: _Loader, at: _At) -> bool:
    value = ld.scalar(at)
    if isinstance(value, bool):
        return value
    raise _Invalid(f"expected true or false, got {_kind(ld, at)}{_quoted_hint(at)}")


def _integer(ld: _Loader, at: _At) -> int:
    value = ld.scalar(at)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Invalid(f"expected an integer, got {_kind(ld, at)}{_quoted_hint(at)}")


def _int_in(low: int, high: int) -> Check[int]:
    def check(ld: _Loader, at: _At) -> int:
        value = _integer(ld, at)
        if not low <= value <= high:
            raise _Invalid(f"must be between {low} and {high}, got {value}")
        return value

    return check


def _seconds(high: float) -> Check[float]:
    """A duration: any positive number up to ``high`` seconds (ints welcome, stored as float)."""

    def check(ld: _Loader, at: _At) -> float:
        value = ld.scalar(at)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(f"expected a number of seconds, got {_kind(ld, at)}{_quoted_hint(at)}")
        if not 0 < value <= high:
            raise _Invalid(f"must be more than 0 and at most {high:g} seconds, got {value}")
        return float(value)

    return check


def _name(ld: _Loader, at: _At) -> str:
    value = _string(ld, at)
    if not _NAME.fullmatch(value):
        raise _Invalid(f"invalid name {value!r}: use letters, digits, '_', '.' and '-'")
    return value


def _host(ld: _Loader, at: _At) -> str:
    """An IP address or DNS name (no port)."""
    value = _string(ld, at)
    if _is_host(value):
        return value
    raise _Invalid(f"{value!r} is neither an IP address nor a valid host name")


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        labels = text.removesuffix(".").split(".")
        return len(text) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels)


def _port_number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535 else None


def _bind(ld: _Loader, at: _At) -> tuple[str, int]:
    """``host:port``, with IPv6 in brackets (``[::]:104``) as in URLs (RFC 3986 §3.2.2)."""
    value = _string(ld, at)
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        try:
            valid_host = sep != "" and ipaddress.ip_address(host).version == 6
        except ValueError:
            valid_host = False
        if not valid_host:
            raise _Invalid(f"expected [IPv6 address]:port, got {value!r}")
    else:
        host, sep, port_text = value.rpartition(":")
        if ":" in host:
            raise _Invalid(f"write IPv6 addresses in brackets, e.g. [::]:104, got {value!r}")
        if not sep or not host:
            raise _Invalid(f"expected host:port such as 0.0.0.0:11112, got {value!r}")
        if not _is_host(host):
            raise _Invalid(f"{host!r} is neither an IP address nor a valid host name")
    port = 0 if port_text == "0" else _port_number(port_text)
    if port is None:
        raise _Invalid(
            f"port must be a number from 1 to 65535 (or 0: any free port), got {port_text!r}"
        )
    return host, port


def _file(ld: _Loader, at: _At) -> Path:
    """A file the daemon will need: resolved against the rules file's directory, and opened now
    so a missing or unreadable certificate stops the load, not the first TLS handshake."""
    path = Path(os.path.normpath(ld.base_dir / _string(ld, at)))
    if not ld.check_files:
        return path
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise _Invalid(f"file not found: {path}") from None
    except OSError as exc:
        raise _Invalid(f"cannot read {path}: {exc.strerror}") from None
    return path


def _tls_version(ld: _Loader, at: _At) -> str:
    value = ld.scalar(at)
    if isinstance(value, str) and value in _TLS_VERSIONS:
        return _TLS_VERSIONS[value]
    if isinstance(value, float):
        raise _Invalid(
            f'write the version in quotes, "{at.node.value}" (YAML reads {value} as a number)'
        )
    raise _Invalid(f'expected "1.2" or "1.3", got {_kind(ld, at)}')


def _ae_title(ld: _Loader, at: _At) -> str:
    """An AE title per PS3.5 §6.2 (VR AE): 1-16 characters of the default repertoire, no
    backslash or control characters; leading and trailing spaces are not significant."""
    title = _string(ld, at).strip(" ")
    if len(title) > 16:
        raise _Invalid(f"AE title {title!r} has {len(title)} characters; the maximum is 16")
    if "\\" in title:
        raise _Invalid(f"AE title {title!r} contains a backslash, which DICOM does not allow")
    if not all(" " <= char <= "~" for char in title):
        raise _Invalid(f"AE title {title!r} may only contain printable ASCII characters")
    return title


def _network(ld: _Loader, at: _At) -> IPNetwork:
    text = _string(ld, at)
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        meant = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _Invalid(
            f"{text!r} is not an IP network (expected e.g. 10.1.2.0/24, "
            "2001:db8::/32 or a single address)"
        ) from None
    raise _Invalid(f"{text!r} has host bits set (did you mean {meant}?)")


def _fingerprint(ld: _Loader, at: _At) -> str:
    digits = _string(ld, at).replace(":", "").lower()
    if not _HEX64.fullmatch(digits):
        raise _Invalid("expected a SHA-256 fingerprint: 64 hex digits, colons optional")
    return digits


def _service(ld: _Loader, at: _At) -> str:
    value = _string(ld, at)
    if value in SERVICE_COMMANDS:
        return value
    hint = f"; did you mean {value.upper()!r}?" if value.upper() in SERVICE_COMMANDS else ""
    raise _Invalid(f"unknown service {value!r} (one of {', '.join(SERVICE_COMMANDS)}){hint}")


def _uid(kind: str) -> Check[str]:
    def check(ld: _Loader, at: _At) -> str:
        try:
            return uids.resolve(_string(ld, at), kind)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None

    return check


def _reference(kind: str) -> Check[str]:
    """A name that must be defined in another section (checked only if that section parsed)."""
    check_name = _ae_title if kind == "peer" else _string

    def check(ld: _Loader, at: _At) -> str:
        name = check_name(ld, at)
        known = ld.names.get(kind)
        if known is not None and name not in known:
            defined = ", ".join(known) or "none"
            raise _Invalid(f"{name!r} is not a defined {kind} (defined: {defined})")
        return name

    return check


def _list_of(check: Check[T], non_empty: bool = True) -> Check[list[T]]:
    def check_list(ld: _Loader, at: _At) -> list[T]:
        return ld.each(ld.sequence(at, non_empty), check)

    return check_list


# -- content validation ----------------------------------------------------------------------


def _attribute(ld: _Loader, at: _At) -> int:
    """A data element by PS3.6 keyword (``PatientID``) or tag (``(0010,0020)``, ``00100020``)."""
    text = _string(ld, at).strip()
    tag = datadict.tag_for_keyword(text)
    if tag is not None:
        return int(tag)
    digits = text.strip("()").replace(",", "")
    if _TAG.fullmatch(digits):
        return int(digits, 16)
    close = difflib.get_close_matches(text, datadict.keyword_dict, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise _Invalid(f"{text!r} is neither a PS3.6 keyword nor a tag like (0010,0020){hint}")


def _attribute_values(ld: _Loader, at: _At) -> dict[int, frozenset[str]]:
    """``{Modality: [CT, MR]}``: the values an attribute may have."""
    values: dict[int, frozenset[str]] = {}
    failed = False
    for _, key_at, value_at in ld.pairs(at, "a mapping of attribute to allowed values"):
        try:
            values[ld.run(_attribute, key_at)] = frozenset(ld.run(_list_of(_string), value_at))
        except _Invalid:
            failed = True
    if failed:
        raise _Invalid()
    return values


def _universal_match(ld: _Loader, at: _At) -> dict[str, frozenset[int]]:
    """``{PATIENT: [PatientID, PatientName]}``: keys a C-FIND may not match universally."""
    refused: dict[str, frozenset[int]] = {}
    failed = False
    for level, key_at, value_at in ld.pairs(at, "a mapping of query level to keys"):
        if level not in _QUERY_LEVELS:
            ld.error(key_at, f"unknown query level {level!r} (one of {', '.join(_QUERY_LEVELS)})")
            failed = True
            continue
        try:
            refused[level] = frozenset(ld.run(_list_of(_attribute), value_at))
        except _Invalid:
            failed = True
    if failed:
        raise _Invalid()
    return refused


def _check_name(ld: _Loader, at: _At) -> str:
    name = _string(ld, at)
    if name not in CHECKS:
        close = difflib.get_close_matches(name, CHECKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise _Invalid(f"unknown check {name!r}{hint}")
    return name


def _site_validation(ld: _Loader, at: _At) -> dict[str, Any]:
    """``validation:``: what every route checks unless its ``validate:`` says otherwise."""
    found = ld.fields(at, _SITE_VALIDATION)
    found.require_ok()
    ld.site_validation = {k: v for k, v in found.values.items() if k != "scanner"}
    ld.scanner = found.values.get("scanner")
    return found.values


def _route_validation(ld: _Loader, at: _At) -> bool | dict[str, Any]:
    """A route's ``validate:``: false (none), true (the file's ``validation:``), or keys that
    override the file's."""
    value = ld.scalar(at)
    if isinstance(value, bool):
        return value
    found = ld.fields(at, _VALIDATION, what="true, false or a mapping of validation settings")
    found.require_ok()
    return found.values


def _content_policy(scanner: Scanner | None, values: dict[str, Any]) -> ContentPolicy:
    """The rules of ``dicomfw.core.content`` and the session's settings, from the merged keys."""
    rules = ContentRules(
        conformance=values.get("conformance", False),
        max_depth=values.get("max_depth", 16),
        max_elements=values.get("max_elements", 100_000),
        max_instance_bytes=values.get("max_instance_bytes"),
        required=tuple(values.get("required", ())),
        allowed_values=values.get("allowed_values", {}),
        refused=frozenset(values.get("refused_attributes", ())),
        private_creators=_frozen(values.get("private_creators")),
        universal_match_refused=values.get("universal_match", {}),
        document_types=_frozen(values.get("document_types")),
        active_content=values.get("active_content", "refuse") == "refuse",
        executables=values.get("executables", "refuse") == "refuse",
    )
    return ContentPolicy(
        rules=rules,
        monitor=frozenset(values.get("monitor", ())),
        hold_bytes=values.get("hold_bytes", 1_048_576),
        scan=values.get("scan", "off"),
        scan_max_bytes=scanner.max_bytes if scanner is not None else 64 * 1_048_576,
        scan_fail=scanner.fail if scanner is not None else "open",
    )


def _scanner(ld: _Loader, at: _At) -> Scanner:
    found = ld.fields(at, _SCANNER)
    found.require_ok()
    return Scanner(**found.values)


def _scanner_address(ld: _Loader, at: _At) -> str:
    """clamd's socket: ``unix:/run/clamav/clamd.ctl`` or ``HOST:PORT``."""
    value = _string(ld, at)
    if value.startswith("unix:") and len(value) > 5:
        return value
    host, _, port = value.rpartition(":")
    if host and _is_host(host.strip("[]")) and port.isdigit() and 0 < int(port) < 65536:
        return value
    raise _Invalid(f"expected unix:/path/to/clamd.ctl or HOST:PORT, got {value!r}")


# -- sections --------------------------------------------------------------------------------


def _server_tls(ld: _Loader, at: _At) -> ServerTLS | None:
    if ld.scalar(at) is False:
        return None
    if ld.scalar(at) is True:
        raise _Invalid("tls: true needs its files; give a mapping with cert, key and ca")
    found = ld.fields(at, _SERVER_TLS, what="false or a mapping with cert, key and ca")
    found.require_ok()
    return ServerTLS(**found.values)


def _client_tls(ld: _Loader, at: _At) -> ClientTLS | None:
    if ld.scalar(at) is False:
        return None
    if ld.scalar(at) is True:
        raise _Invalid("tls: true needs settings; give a mapping with at least ca")
    found = ld.fields(at, _CLIENT_TLS, what="false or a mapping with at least ca")
    if ("cert" in found.given) != ("key" in found.given):
        ld.error(at, "give both cert and key (a client certificate), or neither")
        found.ok = False
    if "key_password_file" in found.given and "key" not in found.given:
        ld.error(found.given["key_password_file"], "key_password_file needs a key")
        found.ok = False
    found.require_ok()
    return ClientTLS(**found.values)


def _listener(ld: _Loader, at: _At) -> Listener:
    found = ld.fields(at, _LISTENER)
    if "name" in found.values:
        ld.claim("listener", found.values["name"], found.given["name"])
    values, given = found.values, found.given
    proxied = values.get("proxy_protocol", False)
    parsed = all(key in values or key not in given for key in ("proxy_protocol", "proxy_from"))
    if parsed and proxied != ("proxy_from" in values):
        where = given.get("proxy_from", given.get("proxy_protocol", at))
        ld.error(where, "proxy_protocol: true and proxy_from (the balancers' networks) go together")
        found.ok = False
    found.require_ok()
    if "limits" in values:
        ld.listener_limits[values["name"]] = values["limits"]
    if "mode" in values:
        ld.listener_modes[values["name"]] = values["mode"]
    host, port = values["bind"]
    return Listener(
        values["name"], host, port, values.get("tls"), proxied, tuple(values.get("proxy_from", ()))
    )


def _listeners(ld: _Loader, at: _At) -> list[Listener]:
    items = ld.sequence(at)
    ld.names["listener"] = {}
    return ld.each(items, _listener)


def _upstreams(ld: _Loader, at: _At) -> list[Upstream]:
    pairs = ld.pairs(at, "a mapping of upstream name to its settings")
    if not at.node.value:
        raise _Invalid("expected at least one upstream")
    ld.names["upstream"] = {}
    result: list[Upstream] = []
    failed = False
    for name, key_at, value_at in pairs:
        try:
            ld.run(_name, key_at)
        except _Invalid:
            failed = True
            continue
        ld.claim("upstream", name, key_at)
        found = ld.fields(value_at, _UPSTREAM)
        if found.ok:
            values = found.values
            result.append(Upstream(name, values["host"], values["port"], values.get("tls")))
        failed = failed or not found.ok
    if failed or len(pairs) != len(at.node.value):
        raise _Invalid()
    return result


def _certificate(ld: _Loader, at: _At) -> CertificateIdentity:
    found = ld.fields(at, _CERTIFICATE, at_least_one=True)
    found.require_ok()
    return CertificateIdentity(**found.values)


def _peer(ld: _Loader, at: _At) -> Peer:
    found = ld.fields(at, _PEER)
    if "ae_title" in found.values:
        ld.claim("peer", found.values["ae_title"], found.given["ae_title"])
    found.require_ok()
    values = found.values
    if "limits" in values:
        ld.peer_limits[values["ae_title"]] = values["limits"]
    return Peer(
        values["ae_title"], tuple(values["networks"]), values.get("certificate"), ld.where(at)
    )


def _peers(ld: _Loader, at: _At) -> list[Peer]:
    items = ld.sequence(at, non_empty=False)
    ld.names["peer"] = {}
    return ld.each(items, _peer)


def _allow_rule(ld: _Loader, at: _At) -> AllowRule:
    found = ld.fields(at, _ALLOW)
    values = found.values
    services = frozenset(values.get("services", ()))
    if "move_destinations" in found.given and "services" in values and "C-MOVE" not in services:
        ld.error(
            found.given["move_destinations"],
            "move_destinations only applies to C-MOVE, which this rule's services lack",
        )
        found.ok = False
    found.require_ok()
    return AllowRule(
        services=services,
        sop_classes=_frozen(values.get("sop_classes")),
        transfer_syntaxes=_frozen(values.get("transfer_syntaxes")),
        move_destinations=_frozen(values.get("move_destinations")),
        where=ld.where(at),
    )


def _frozen(items: list[str] | None) -> frozenset[str] | None:
    return None if items is None else frozenset(items)


def _rewrite(ld: _Loader, at: _At) -> dict[str, str]:
    found = ld.fields(at, _REWRITE, at_least_one=True)
    found.require_ok()
    return found.values


def _route(ld: _Loader, at: _At) -> Route:
    found = ld.fields(at, _ROUTE)
    values = found.values
    if "name" in values:
        ld.claim("route", values["name"], found.given["name"])
    found.require_ok()
    listener, called_ae = values["listener"], values["called_ae"]
    calling_aes = _frozen(values.get("calling_ae"))
    distinct = _check_overlap(ld, _RouteKey(listener, called_ae, calling_aes, at))
    name = values.get("name")
    if name is None:
        name = f"{listener}/{called_ae}"
        if distinct:  # else the overlap is the problem to report, not the name
            hint = "; routes for the same listener and called AE need a name each"
            ld.claim("route", name, at, hint)
    rewrite = values.get("rewrite", {})
    validate = values.get("validate", True)
    if isinstance(validate, dict):
        content = _content_policy(ld.scanner, {**(ld.site_validation or {}), **validate})
    elif validate and ld.site_validation is not None:
        content = _content_policy(ld.scanner, ld.site_validation)
    else:
        content = None
    if content is not None and content.scan != "off" and ld.scanner is None:
        ld.error(found.given.get("validate", at), "scan needs a scanner: validation.scanner")
        raise _Invalid()
    return Route(
        name=name,
        listener=listener,
        called_ae=called_ae,
        upstream=values["upstream"],
        allow=tuple(values["allow"]),
        calling_aes=calling_aes,
        upstream_called_ae=rewrite.get("called_ae"),
        upstream_calling_ae=rewrite.get("calling_ae"),
        mode=values.get("mode") or ld.listener_modes.get(listener, ld.site_mode),
        content=content,
        where=ld.where(at),
    )


def _check_overlap(ld: _Loader, new: _RouteKey) -> bool:
    """Refuse two routes that could take the same association: the policy takes the first
    route whose calling_ae admits the caller, so the file's order would decide silently.

    A route for every peer after more specific ones is a deliberate fallback and fine; before
    them it hides them. Returns whether the new route is distinct from all earlier ones.
    """
    for old in ld.route_keys:
        if (old.listener, old.called_ae) != (new.listener, new.called_ae):
            continue
        earlier = f"{old.at.path} (line {old.at.line})"
        same = f"called AE {new.called_ae!r} on listener {new.listener!r}"
        if old.calling_aes is None and new.calling_aes is None:
            message = (
                f"ambiguous route: {earlier} already takes every calling AE for {same}; "
                "give the routes calling_ae lists that do not overlap"
            )
        elif old.calling_aes is None:
            message = (
                f"unreachable route: {earlier} already takes every calling AE for {same}; "
                "move this more specific route above it"
            )
        elif new.calling_aes is None or not old.calling_aes & new.calling_aes:
            continue
        else:
            shared = ", ".join(sorted(old.calling_aes & new.calling_aes))
            message = f"ambiguous route: {earlier} already takes calling AE {shared} for {same}"
        ld.error(new.at, message)
        return False
    ld.route_keys.append(new)
    return True


def _limits(ld: _Loader, at: _At) -> Limits:
    found = ld.fields(at, _LIMITS)
    values, given = found.values, found.given
    if "store" in values or "store" not in given:  # else already reported
        found.ok = _check_store(ld, given, values.get("store", "local")) and found.ok
    found.require_ok()
    values = dict(values)
    store = values.pop("redis", None) if values.pop("store", "local") == "redis" else None
    rates = {key: values.pop(key) for key in _RATE_LIMITS if key in values}
    return Limits(**values, rates=LimitRules(RateLimits(**rates)), store=store)


def _check_store(ld: _Loader, given: dict[str, _At], store: str) -> bool:
    """``store: redis`` goes with a ``redis`` section, and needs the redis client installed
    (an optional extra: a firewall that counts its limits alone does without it)."""
    if store == "redis" and "redis" not in given:
        ld.error(given["store"], "store: redis needs a redis section with at least url")
    elif store != "redis" and "redis" in given:
        ld.error(given["redis"], "the redis settings apply only with store: redis")
    elif store == "redis" and not _installed("redis"):
        ld.error(
            given["store"],
            "store: redis needs the Python package redis: pip install 'dicomfw[redis]'",
        )
    else:
        return True
    return False


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # a module in sys.modules without a spec
        return False


def _redis(ld: _Loader, at: _At) -> RedisStore:
    found = ld.fields(at, _REDIS)
    values, given = found.values, found.given
    tls = values.get("tls")
    if tls is not None and tls.server_name is not None:
        ld.error(given["tls"], "server_name does not apply: the url's host name is verified")
        found.ok = False
    if "url" in values and (tls is not None) != values["url"].startswith("rediss://"):
        ld.error(given["url"], "a rediss:// url and tls settings go together")
        found.ok = False
    found.require_ok()
    return RedisStore(**values)


def _redis_url(ld: _Loader, at: _At) -> str:
    """``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS) or ``unix:///path``."""
    text = _string(ld, at)
    try:
        parts = urlsplit(text)
        valid = (parts.port is None or parts.port > 0) and (
            (parts.scheme == "unix" and bool(parts.path))
            or (parts.scheme in ("redis", "rediss") and bool(parts.hostname))
        )
    except ValueError:  # e.g. a port that is no number
        valid = False
    if valid:
        return text
    raise _Invalid(
        f"expected redis://host:port, rediss://host:port (TLS) or unix:///path, got {text!r}"
    )


def _key_prefix(ld: _Loader, at: _At) -> str:
    """What every key of the shared limits starts with: several sites can share one Redis."""
    text = _string(ld, at)
    if len(text) > 64 or not all("!" <= char <= "~" for char in text):
        raise _Invalid("expected at most 64 printable ASCII characters without spaces")
    return text


def _rate_limits(schema: Schema) -> Check[RateLimits]:
    """A ``limits:`` override on a listener or a peer: the keys that make sense there."""

    def check(ld: _Loader, at: _At) -> RateLimits:
        found = ld.fields(at, schema, at_least_one=True)
        found.require_ok()
        return RateLimits(**found.values)

    return check


def _service_rates(ld: _Loader, at: _At) -> dict[str, int]:
    """``{C-FIND: 60, C-MOVE: 10}``: DIMSE requests per minute, by service."""
    pairs = ld.pairs(at, "a mapping of service to requests per minute, e.g. {C-FIND: 60}")
    if not pairs:
        raise _Invalid("expected at least one service, e.g. {C-FIND: 60}")
    rates: dict[str, int] = {}
    failed = False
    for _, key_at, value_at in pairs:
        try:
            service = ld.run(_service, key_at)
            rates[service] = ld.run(_PER_MINUTE, value_at)
        except _Invalid:
            failed = True
    if failed:
        raise _Invalid()
    return rates


def _metrics(ld: _Loader, at: _At) -> MetricsEndpoint:
    found = ld.fields(at, _METRICS)
    found.require_ok()
    return MetricsEndpoint(*found.values["bind"])


def _choice(*options: str) -> Check[str]:
    def check(ld: _Loader, at: _At) -> str:
        value = _string(ld, at)
        if value not in options:
            raise _Invalid(f"expected one of {', '.join(options)}, got {value!r}")
        return value

    return check


_MODE: Final = _choice(ENFORCE, MONITOR)


def _site_mode(ld: _Loader, at: _At) -> str:
    """``mode:`` of the whole file: read first, since listeners and routes default to it."""
    ld.site_mode = _MODE(ld, at)
    return ld.site_mode


def _workers(ld: _Loader, at: _At) -> int:
    """``workers: N`` (1 to 64) or ``auto``: one per CPU, as this machine counts them now."""
    value = ld.scalar(at)
    if value == "auto":
        return min(os.cpu_count() or 1, _MAX_WORKERS)
    if isinstance(value, int) and not isinstance(value, bool):
        return _int_in(1, _MAX_WORKERS)(ld, at)
    raise _Invalid(
        f"expected an integer from 1 to {_MAX_WORKERS} or auto, got {_kind(ld, at)}"
        + _quoted_hint(at)
    )


def _output_file(ld: _Loader, at: _At) -> Path | None:
    """A file the daemon appends to (None for "-", stdout). Its directory must exist now, so a
    typo stops the load instead of the first audit event."""
    text = _string(ld, at)
    if text == "-":
        return None
    path = Path(os.path.normpath(ld.base_dir / text))
    if not ld.check_files:
        return path
    if path.is_dir():
        raise _Invalid(f"{path} is a directory; name a file in it")
    if not path.parent.is_dir():
        raise _Invalid(f"directory not found: {path.parent}")
    return path


def _atna(ld: _Loader, at: _At) -> AtnaCollector:
    found = ld.fields(at, _ATNA)
    values, given = found.values, found.given
    transport = values.get("transport", "tls")
    known = "transport" in values or "transport" not in given  # else already reported
    if known and transport == "udp":
        for key in ("ca", "cert", "key"):
            if key in given:
                ld.error(given[key], f"{key} applies to transport: tls only")
                found.ok = False
    elif known and "ca" not in given:
        ld.error(at, "transport: tls needs ca, to verify the collector's certificate")
        found.ok = False
    if ("cert" in given) != ("key" in given):
        ld.error(at, "give both cert and key (a client certificate), or neither")
        found.ok = False
    found.require_ok()
    return AtnaCollector(
        values["host"],
        values.get("port", 6514 if transport == "tls" else 514),  # RFC 5425 / RFC 5426 ports
        transport,
        values.get("ca"),
        values.get("cert"),
        values.get("key"),
    )


def _audit(ld: _Loader, at: _At) -> Audit:
    found = ld.fields(at, _AUDIT)
    if found.ok and "file" not in found.given and "atna" not in found.given:
        ld.error(at, 'give file (JSON lines; "-" for stdout), atna, or both')
        found.ok = False
    found.require_ok()
    values = dict(found.values)
    if "file" in values and values["file"] is None:
        values["stdout"] = True
    return Audit(**values)


_PER_MINUTE: Final = _int_in(1, 1_000_000)
_COUNT: Final = _int_in(1, 1_000_000)
#: What a peer's ``limits:`` may set: the limits that are about a peer and its requests.
_PEER_RATE_LIMITS: Final[Schema] = {
    "associations_per_minute_per_peer": (OPTIONAL, _PER_MINUTE),
    "max_concurrent_per_peer": (OPTIONAL, _COUNT),
    "requests_per_minute_per_association": (OPTIONAL, _service_rates),
    "requests_per_minute_per_peer": (OPTIONAL, _service_rates),
    "request_limit_action": (OPTIONAL, _choice("delay", "refuse")),
}
#: A listener's ``limits:`` adds the per-address ones (the process-wide total stays global).
_LISTENER_RATE_LIMITS: Final[Schema] = {
    "associations_per_minute_per_ip": (OPTIONAL, _PER_MINUTE),
    "max_concurrent_per_ip": (OPTIONAL, _COUNT),
    "max_pending_per_ip": (OPTIONAL, _COUNT),
    **_PEER_RATE_LIMITS,
}
_RATE_LIMITS: Final[Schema] = {
    **_LISTENER_RATE_LIMITS,
    "max_concurrent_total": (OPTIONAL, _COUNT),
}
_SERVER_TLS: Final[Schema] = {
    "cert": (REQUIRED, _file),
    "key": (REQUIRED, _file),
    "ca": (REQUIRED, _file),
    "crl": (OPTIONAL, _file),
    "min_version": (OPTIONAL, _tls_version),
    "key_password_file": (OPTIONAL, _file),
}
_CLIENT_TLS: Final[Schema] = {
    "ca": (REQUIRED, _file),
    "cert": (OPTIONAL, _file),
    "key": (OPTIONAL, _file),
    "server_name": (OPTIONAL, _host),
    "verify_hostname": (OPTIONAL, _boolean),
    "min_version": (OPTIONAL, _tls_version),
    "key_password_file": (OPTIONAL, _file),
}
_LISTENER: Final[Schema] = {
    "name": (REQUIRED, _name),
    "bind": (REQUIRED, _bind),
    "tls": (OPTIONAL, _server_tls),
    "proxy_protocol": (OPTIONAL, _boolean),
    "proxy_from": (OPTIONAL, _list_of(_network)),
    "limits": (OPTIONAL, _rate_limits(_LISTENER_RATE_LIMITS)),
    "mode": (OPTIONAL, _MODE),
}
_UPSTREAM: Final[Schema] = {
    "host": (REQUIRED, _host),
    "port": (REQUIRED, _int_in(1, 65535)),
    "tls": (OPTIONAL, _client_tls),
}
_CERTIFICATE: Final[Schema] = {
    "subject_cn": (OPTIONAL, _string),
    "san_dns": (OPTIONAL, _string),
    "san_uri": (OPTIONAL, _string),
    "fingerprint_sha256": (OPTIONAL, _fingerprint),
}
_PEER: Final[Schema] = {
    "ae_title": (REQUIRED, _ae_title),
    "networks": (REQUIRED, _list_of(_network)),
    "certificate": (OPTIONAL, _certificate),
    "limits": (OPTIONAL, _rate_limits(_PEER_RATE_LIMITS)),
}
_ALLOW: Final[Schema] = {
    "services": (REQUIRED, _list_of(_service)),
    "sop_classes": (OPTIONAL, _list_of(_uid("SOP Class"))),
    "transfer_syntaxes": (OPTIONAL, _list_of(_uid("Transfer Syntax"))),
    "move_destinations": (OPTIONAL, _list_of(_ae_title)),
}
_REWRITE: Final[Schema] = {
    "called_ae": (OPTIONAL, _ae_title),
    "calling_ae": (OPTIONAL, _ae_title),
}
_QUERY_LEVELS: Final = ("PATIENT", "STUDY", "SERIES", "IMAGE", "WORKLIST")
_TAG: Final = re.compile(r"[0-9A-Fa-f]{8}")
_VALIDATION: Final[Schema] = {
    "conformance": (OPTIONAL, _boolean),
    "monitor": (OPTIONAL, _list_of(_check_name)),
    "hold_bytes": (OPTIONAL, _int_in(1024, 67_108_864)),
    "max_depth": (OPTIONAL, _int_in(1, 64)),
    "max_elements": (OPTIONAL, _int_in(100, 100_000_000)),
    "max_instance_bytes": (OPTIONAL, _int_in(1024, 1 << 40)),
    "required": (OPTIONAL, _list_of(_attribute)),
    "allowed_values": (OPTIONAL, _attribute_values),
    "refused_attributes": (OPTIONAL, _list_of(_attribute)),
    "private_creators": (OPTIONAL, _list_of(_string)),
    "universal_match": (OPTIONAL, _universal_match),
    "document_types": (OPTIONAL, _list_of(_string)),
    "active_content": (OPTIONAL, _choice("refuse", "allow")),
    "executables": (OPTIONAL, _choice("refuse", "allow")),
    "scan": (OPTIONAL, _choice("off", "documents", "instances")),
}
_SCANNER: Final[Schema] = {
    "address": (REQUIRED, _scanner_address),
    "timeout_seconds": (OPTIONAL, _seconds(600)),
    "max_bytes": (OPTIONAL, _int_in(1024, 1 << 32)),
    "fail": (OPTIONAL, _choice("open", "closed")),
}
_SITE_VALIDATION: Final[Schema] = {**_VALIDATION, "scanner": (OPTIONAL, _scanner)}
_ROUTE: Final[Schema] = {
    "name": (OPTIONAL, _name),
    "listener": (REQUIRED, _reference("listener")),
    "called_ae": (REQUIRED, _ae_title),
    "upstream": (REQUIRED, _reference("upstream")),
    "calling_ae": (OPTIONAL, _list_of(_reference("peer"))),
    "rewrite": (OPTIONAL, _rewrite),
    "allow": (REQUIRED, _list_of(_allow_rule)),
    "mode": (OPTIONAL, _MODE),
    "validate": (OPTIONAL, _route_validation),
}
_LIMITS: Final[Schema] = {
    "max_pdu_bytes": (OPTIONAL, _int_in(4096, 67_108_864)),
    "artim_seconds": (OPTIONAL, _seconds(3600)),
    "idle_seconds": (OPTIONAL, _seconds(86400)),
    "connect_timeout_seconds": (OPTIONAL, _seconds(600)),
    "tls_handshake_seconds": (OPTIONAL, _seconds(600)),
    "drain_seconds": (OPTIONAL, _seconds(3600)),
    "drain_notice_seconds": (OPTIONAL, _seconds(600)),
    "max_refusals_per_association": (OPTIONAL, _int_in(0, 1_000_000)),
    **_RATE_LIMITS,
    "store": (OPTIONAL, _choice("local", "redis")),
    "redis": (OPTIONAL, _redis),
}
_REDIS: Final[Schema] = {
    "url": (REQUIRED, _redis_url),
    "tls": (OPTIONAL, _client_tls),
    "password_file": (OPTIONAL, _file),
    "timeout_ms": (OPTIONAL, _int_in(1, 10_000)),
    "fail": (OPTIONAL, _choice("open", "closed")),
    "lease_seconds": (OPTIONAL, _int_in(3, 3600)),
    "key_prefix": (OPTIONAL, _key_prefix),
}
_METRICS: Final[Schema] = {"bind": (REQUIRED, _bind)}
_ATNA: Final[Schema] = {
    "host": (REQUIRED, _host),
    "port": (OPTIONAL, _int_in(1, 65535)),
    "transport": (OPTIONAL, _choice("tls", "udp")),
    "ca": (OPTIONAL, _file),
    "cert": (OPTIONAL, _file),
    "key": (OPTIONAL, _file),
}
_AUDIT: Final[Schema] = {
    "file": (OPTIONAL, _output_file),
    "queue_size": (OPTIONAL, _int_in(1, 10_000_000)),
    "atna": (OPTIONAL, _atna),
}
# Order matters: routes refer to listeners, upstreams and peers, so those are checked first.
_TOP: Final[Schema] = {
    "mode": (OPTIONAL, _site_mode),
    "validation": (OPTIONAL, _site_validation),
    "listeners": (REQUIRED, _listeners),
    "upstreams": (REQUIRED, _upstreams),
    "peers": (REQUIRED, _peers),
    "routes": (REQUIRED, _list_of(_route)),
    "limits": (OPTIONAL, _limits),
    "metrics": (OPTIONAL, _metrics),
    "audit": (OPTIONAL, _audit),
    "workers": (OPTIONAL, _workers),
    "instance": (OPTIONAL, _name),
}
