"""Audit records read back: what an association (or a refused connection) asked the firewall.

``dicomfw explain`` puts an audit event to the rules again, and ``dicomfw learn`` writes rules
from a period of them; both need the same reading of a record. An ``Attempt`` holds the inputs
of the policy's questions (listener, address, AE titles, certificate, presentation contexts,
requests) as far as the record kept them: a field it did not keep is empty, never guessed.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from dicomfw.core.policy import IPAddress, PresentedIdentity

__all__ = [
    "Attempt",
    "BadRecord",
    "Context",
    "Request",
    "attempt_of",
    "moment",
    "parse_line",
    "read_audit",
]

#: Records that describe an association or a connection; the rest (start, stop) do not.
EVENTS: Final = (
    "association",
    "association_rejected",
    "request_refused",
    "request_failed",
    "would_refuse",
    "connection_refused",
)


class BadRecord(ValueError):
    """Not an audit record explain or learn can read; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Context:
    """A proposed presentation context. ``transfer_syntaxes`` empty: not recorded."""

    sop_class: str
    transfer_syntaxes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Request:
    """A DIMSE request from the requester; ``destination`` only for C-MOVE (None: unknown)."""

    service: str
    sop_class: str
    destination: str | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """An association as the policy sees it. ``calling_ae`` is None for a connection that was
    closed before any DICOM was read. ``every_context``: ``contexts`` are all it proposed (a
    record of one refused context lists only that one). ``event``, ``reason`` and ``stage`` are
    what the record says happened (empty for an association described on the command line)."""

    listener: str
    address: IPAddress
    calling_ae: str | None
    called_ae: str | None
    identity: PresentedIdentity | None = None
    contexts: tuple[Context, ...] = ()
    requests: tuple[Request, ...] = ()
    every_context: bool = True
    event: str = ""
    reason: str = ""
    stage: str = ""
    time: str = ""


def moment(text: str) -> datetime:
    """An ISO 8601 time; one without a UTC offset is taken as UTC (the audit trail's zone)."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def attempt_of(record: dict[str, Any]) -> Attempt:
    """What ``record`` (one parsed line of the audit file) asked; raises ``BadRecord``."""
    event = record.get("event")
    if event not in EVENTS:
        raise BadRecord(
            f"not an audit record of a connection or an association (event {event!r}; "
            f"one of {', '.join(EVENTS)})"
        )
    try:
        return _attempt(event, record)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise BadRecord(f"{event} record without the fields it should have ({error})") from None


def _attempt(event: str, record: dict[str, Any]) -> Attempt:
    stage = record.get("stage") or ""
    contexts: tuple[Context, ...] = ()
    requests: tuple[Request, ...] = ()
    if event == "association":
        contexts = tuple(
            Context(c["sop_class_uid"], (c["transfer_syntax"],)) for c in record["contexts"]
        ) + tuple(Context(c["sop_class_uid"]) for c in record["refused_contexts"])
        requests = tuple(_operations(record))
    elif event in ("request_refused", "request_failed") or stage == "request":
        requests = (_request(record),)
    elif event == "would_refuse" and stage == "context":
        contexts = (Context(record["sop_class_uid"]),)
    connection = event == "connection_refused" or stage == "connection"
    return Attempt(
        listener=record["listener"],
        address=ipaddress.ip_address(record["source"]["address"]),
        calling_ae=None if connection else record["calling_ae"],
        called_ae=None if connection else record["called_ae"],
        identity=_identity(record.get("certificate")),
        contexts=contexts,
        requests=requests,
        every_context=event == "association",
        event=event,
        reason=record.get("reason") or "",
        stage=stage,
        time=record.get("time") or "",
    )


def _operations(record: dict[str, Any]) -> Iterator[Request]:
    """The requests of an association: one per (service, SOP class), and a C-MOVE once per
    destination it moved to (the record keeps them per association, not per request)."""
    destinations: list[str | None] = list(record["move_destinations"]) or [None]
    for operation in record["operations"]:
        service, sop_class = operation["service"], operation["sop_class_uid"]
        for destination in destinations if service == "C-MOVE" else [None]:
            yield Request(service, sop_class, destination)


def _request(record: dict[str, Any]) -> Request:
    service = record["service"]
    destination = record["move_destination"] if service == "C-MOVE" else None
    return Request(service, record["sop_class_uid"], destination)


def _identity(certificate: dict[str, Any] | None) -> PresentedIdentity | None:
    if certificate is None:
        return None
    return PresentedIdentity(
        subject_cn=certificate.get("subject_cn"),
        san_dns=tuple(certificate.get("san_dns") or ()),
        san_uri=tuple(certificate.get("san_uri") or ()),
        fingerprint_sha256=certificate.get("sha256") or "",
    )


def parse_line(line: str) -> dict[str, Any]:
    """One line of an audit file as a record; raises ``BadRecord``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadRecord(f"not JSON: {error}") from None
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    return record


def read_audit(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRecord]]:
    """The records of an audit file with their line numbers; a line that is not one (a record
    cut short when the disk filled up) comes as the ``BadRecord`` saying why."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield number, parse_line(line)
                except BadRecord as error:
                    yield number, error
