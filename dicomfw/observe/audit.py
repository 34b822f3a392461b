"""The audit trail: who connected, what they did, what was refused and why.

One JSON object per line: one per association when it ends (who: AE titles, source address,
certificate; what: services and SOP classes with counts, instances stored, bytes both ways;
outcome, reason and timing), one per refused connection, rejected association, refused request
and failed request, one per thing monitor mode let pass that enforce mode would have refused,
and one when the daemon starts and stops. The same records feed the IHE ATNA
sink (``dicomfw.observe.atna``). Unlike metrics, the audit keeps AE titles and addresses exactly
as received: that is what an investigation needs.

It must never slow the relay. While an association runs the observer only counts into a small
per-association dict; a record is built once per association (or refusal), and serialising and
writing happen on a writer thread behind a bounded queue. When a sink falls ``queue_size``
events behind, new events are dropped instead of waited for: a stuck disk or collector costs
audit events, never DICOM traffic.

Every record a sink was handed and did not deliver is counted, by sink and cause
(``dicomfw_audit_events_lost_total``): ``queue_full`` (dropped at the queue),
``write_error`` (the write failed: a full disk, a broken connection to the collector; the
file sink counts only the records not wholly written) and ``collector_unreachable`` (the ATNA
collector could not be connected to). A record a sink never takes (the ATNA sink has no
message for a ``request_failed`` or ``would_refuse`` record) is not lost.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from dicomfw.config.model import Config
from dicomfw.core.session import (
    ANSWER_CLASSES,
    AssociationAccepted,
    AssociationEnded,
    AssociationRejected,
    ContentRefused,
    Event,
    RequestFailed,
    RequestRefused,
    RequestTally,
    WouldRefuse,
)
from dicomfw.core.uids import name_of
from dicomfw.logsetup import log_event
from dicomfw.relay.server import AssociationInfo, Refused

log = logging.getLogger("dicomfw.audit")

Record = dict[str, Any]
#: Per (service, SOP class): requests, then answers by status class, then firewall refusals.
COUNTS: Final = ("requests", "success", "warning", "failure", "cancel", "refused")
_INDEX: Final = {name: i for i, name in enumerate(COUNTS)}
_BATCH: Final = 512  # records written per write()+flush() at most
#: How often a writer thread looks for records to write (also the most an event waits).
_INTERVAL_SECONDS: Final = 0.05


#: Every record's ``outcome``, by its ``event``: how the association ended; what the firewall
#: did (a rejection, a refusal; for content, whether it answered a request, replaced a response
#: or aborted the association); a request the upstream failed; what monitor mode let pass.
#: ``docs/audit.schema.json`` is the schema of every record.
OUTCOMES: Final = {
    "application_start": ("started",),
    "application_stop": ("stopped",),
    "association": ("released", "aborted", "closed"),
    "association_rejected": ("rejected",),
    "connection_refused": ("refused",),
    "request_refused": ("refused",),
    "request_failed": ("failed",),
    "content_refused": ("refused", "replaced", "aborted"),
    "would_refuse": ("would_refuse",),
}


def timestamp(seconds: float) -> str:
    """RFC 3339 / xsd:dateTime in UTC with milliseconds, e.g. 2025-01-31T09:30:00.125Z."""
    moment = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


# ---- sinks: a bounded queue in front of a slow writer -------------------------------------------


#: Why a record was lost: ``dicomfw_audit_events_lost_total``'s cause label.
QUEUE_FULL: Final = "queue_full"
WRITE_ERROR: Final = "write_error"
COLLECTOR_UNREACHABLE: Final = "collector_unreachable"


class WriteFailed(Exception):
    """A writer delivered only part of a batch: ``lost`` of its records were not written, for
    ``cause`` (one of the writer's ``causes``)."""

    def __init__(self, cause: str, lost: int, error: BaseException) -> None:
        super().__init__(f"{cause}: {error!r}")
        self.cause = cause
        self.lost = lost
        self.error = error


class Writer(Protocol):
    #: The causes of loss its writes can report (``WriteFailed.cause``), besides a full queue.
    causes: tuple[str, ...]

    def wants(self, record: Record) -> bool:
        """Whether it has anything to write for ``record``: what it does not want never
        enters its queue, so it can be neither dropped nor lost."""
        ...

    def write(self, batch: list[Record]) -> None: ...

    def close(self) -> None: ...


Losses = Callable[[str, int], None]  # (cause, records lost)


class QueuedSink:
    """Hands records to ``writer`` on a thread of its own, through at most ``queue_size``
    pending records.

    ``submit`` never blocks and never signals the writer thread: it appends to a deque (atomic
    under the GIL, ~0.1 µs), and the writer wakes every ``_INTERVAL_SECONDS`` to write what
    has gathered in one batch. Waking the writer per record would cost the relay a GIL
    hand-over per record. Every record it took and did not deliver is reported to ``on_lost``
    with its cause: dropped because ``queue_size`` records were pending, or not written (the
    batch, or the part of it ``WriteFailed`` names).
    """

    def __init__(
        self, name: str, writer: Writer, queue_size: int, on_lost: Losses | None = None
    ) -> None:
        self.name = name
        self.causes = (QUEUE_FULL, *writer.causes)
        self.lost = dict.fromkeys(self.causes, 0)  # records lost so far, by cause
        self.on_lost = on_lost
        self._writer = writer
        self._pending: deque[Record] = deque()
        self._capacity = queue_size
        self._dropping = False  # log once per episode of drops, not per event
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"audit-{name}", daemon=True)
        self._thread.start()

    def submit(self, record: Record) -> None:
        if not self._writer.wants(record):
            return
        if len(self._pending) < self._capacity:
            self._pending.append(record)
            return
        self._lose(QUEUE_FULL, 1)
        if not self._dropping:
            self._dropping = True
            log_event(
                log, logging.WARNING, "audit_events_dropped", sink=self.name, cause=QUEUE_FULL
            )

    def _lose(self, cause: str, count: int) -> None:
        self.lost[cause] += count
        if self.on_lost is not None:
            self.on_lost(cause, count)

    def _run(self) -> None:
        pending = self._pending
        while True:
            closing = self._closing.wait(_INTERVAL_SECONDS)
            while pending:
                batch = [pending.popleft() for _ in range(min(len(pending), _BATCH))]
                self._write(batch)
            if closing:
                return

    def _write(self, batch: list[Record]) -> None:
        try:
            self._writer.write(batch)
        except WriteFailed as failure:
            self._failed(failure.cause, failure.lost, failure.error)
        except Exception as error:  # a sink failure must not end the thread
            self._failed(WRITE_ERROR, len(batch), error)
        else:
            self._dropping = False

    def _failed(self, cause: str, lost: int, error: BaseException) -> None:
        if lost:
            self._lose(cause, lost)
        log_event(
            log,
            logging.ERROR,
            "audit_write_failed",
            sink=self.name,
            cause=cause,
            lost=lost,
            error=repr(error),
        )

    def close(self, timeout: float) -> None:
        """Write what is pending (waiting at most ``timeout``), then close the writer."""
        self._closing.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            pending = len(self._pending)
            self._lose(WRITE_ERROR, pending)  # the writer is stuck: they will not be written
            log_event(
                log, logging.WARNING, "audit_flush_incomplete", sink=self.name, pending=pending
            )
            return  # leave it (a daemon thread) rather than hang the exit
        try:
            self._writer.close()
        except OSError as error:
            log_event(log, logging.ERROR, "audit_close_failed", sink=self.name, error=repr(error))


class JsonLines:
    """One compact JSON object per line, appended to a file (or stdout), one write per batch.

    Written to the file descriptor without a buffer in between, so a failed write says exactly
    which records are not in the file (those not wholly written; ``WriteFailed``) and none of
    them turns up later from a buffer that was kept. A line cut short by a failed write is
    ended before the next record, which so starts a line of its own."""

    causes: tuple[str, ...] = (WRITE_ERROR,)

    def __init__(self, path: Path | None) -> None:
        self._fd = sys.stdout.fileno() if path is None else _open_for_append(path)
        self._owned = path is not None
        self._torn = False  # the last write ended inside a line

    def wants(self, record: Record) -> bool:
        return True

    def write(self, batch: list[Record]) -> None:
        lines = [json.dumps(r, separators=(",", ":")).encode("ascii") + b"\n" for r in batch]
        end_torn_line = b"\n" if self._torn else b""
        data = memoryview(end_torn_line + b"".join(lines))
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError as error:
            whole = 0
            if done >= len(end_torn_line):  # the torn line, if any, was ended
                whole, boundary = _whole(lines, done - len(end_torn_line))
                self._torn = done - len(end_torn_line) > boundary
            raise WriteFailed(WRITE_ERROR, len(lines) - whole, error) from error
        self._torn = False

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)


def _open_for_append(path: Path) -> int:
    """As ``open(path, "a")`` opens it, without the buffer: a file that cannot be appended to
    (its end cannot be found, as for ``/proc`` files) fails here, at start, rather than at the
    first record; a pipe, which has no end to seek to, is fine."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        os.lseek(fd, 0, os.SEEK_END)
    except OSError as error:
        if error.errno != errno.ESPIPE:
            os.close(fd)
            raise
    return fd


def _whole(lines: list[bytes], written: int) -> tuple[int, int]:
    """How many of ``lines`` the first ``written`` bytes hold whole, and where they end."""
    count = boundary = 0
    for line in lines:
        if boundary + len(line) > written:
            break
        boundary += len(line)
        count += 1
    return count, boundary


# ---- the observer ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Facts:
    """What one established association did, accumulated until it ends."""

    upstream: Record | None
    refused_contexts: list[Record]
    contexts: list[Record] = field(default_factory=list)
    operations: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    move_destinations: set[str] = field(default_factory=set)
    instances_stored: int = 0

    def row(self, service: str, sop_class: str) -> list[int]:
        counts = self.operations.get((service, sop_class))
        if counts is None:
            counts = self.operations[(service, sop_class)] = [0] * len(COUNTS)
        return counts

    def add(self, tally: RequestTally) -> None:
        for (service, sop_class), counts in tally.counts.items():
            row = self.row(service, sop_class)
            row[_INDEX["requests"]] += counts.forwarded
            for answer in ANSWER_CLASSES:
                row[_INDEX[answer]] += getattr(counts, answer)
            if service == "C-STORE":
                self.instances_stored += counts.success + counts.warning
        self.move_destinations |= tally.move_destinations


class AuditTrail:
    """The audit observer: turns relay events into records for every sink."""

    def __init__(self, sinks: Sequence[QueuedSink]) -> None:
        self.sinks = list(sinks)
        self._facts: dict[int, _Facts] = {}  # id(AssociationInfo) -> facts, until its end
        self._upstream_of_route: dict[str, Record] = {}
        self._pid = os.getpid()  # several workers may write to one file: which one was it
        self._instance = ""  # and several instances to one collector

    def configure(self, config: Config) -> None:
        """Learn where each route goes (for the records of associations that start from now)."""
        self._instance = self._instance or config.instance  # start-only, like the metrics'
        upstreams = {u.name: u for u in config.upstreams}
        self._upstream_of_route = {
            route.name: {
                "name": route.upstream,
                "host": upstreams[route.upstream].host,
                "port": upstreams[route.upstream].port,
            }
            for route in config.policy.routes
        }

    def application(self, what: str, config_path: Path) -> None:
        """The daemon started or is stopping (``what``: "start" or "stop")."""
        self._submit(
            {
                "event": f"application_{what}",
                "outcome": "started" if what == "start" else "stopped",
                "time": timestamp(time.time()),
                "pid": self._pid,
                "config": str(config_path),
            }
        )

    def close(self, timeout: float = 5.0) -> None:
        for sink in self.sinks:
            sink.close(timeout)

    def _submit(self, record: Record) -> None:
        record["instance"] = self._instance
        for sink in self.sinks:
            sink.submit(record)

    def __call__(self, info: AssociationInfo, event: Event | Refused) -> None:
        kind = type(event)
        if kind is RequestTally:
            assert isinstance(event, RequestTally)
            facts = self._facts.get(id(info))
            if facts is not None:
                facts.add(event)
        elif kind is RequestFailed:
            assert isinstance(event, RequestFailed)
            self._request_record(
                info,
                "request_failed",
                event.service,
                event.sop_class,
                event.status,
                event.message_id,
                "",
                "",
            )
        elif kind is RequestRefused:
            assert isinstance(event, RequestRefused)
            facts = self._facts.get(id(info))
            if facts is not None:
                row = facts.row(event.service, event.sop_class)
                row[_INDEX["requests"]] += event.count
                row[_INDEX["refused"]] += event.count
            self._request_record(
                info,
                "request_refused",
                event.service,
                event.sop_class,
                event.status,
                event.message_id,
                event.why,
                event.detail,
                event.count,
                event.move_destination,
            )
        elif kind is AssociationAccepted:
            assert isinstance(event, AssociationAccepted)
            refused = [
                {"sop_class": name_of(uid), "sop_class_uid": uid, "reason": why}
                for _, uid, why in event.refused_contexts
            ]
            contexts = [
                {"sop_class": name_of(uid), "sop_class_uid": uid, "transfer_syntax": ts}
                for uid, ts in event.contexts
            ]
            self._facts[id(info)] = _Facts(
                self._upstream_of_route.get(event.route), refused, contexts
            )
        elif kind is AssociationEnded:
            assert isinstance(event, AssociationEnded)
            if event.how != "probe":  # a health check said nothing: counted, not audited
                self._association_record(info, event)
        elif kind is AssociationRejected:
            assert isinstance(event, AssociationRejected)
            record = _who(self._pid, info, "association_rejected", "rejected")
            record.update(
                calling_ae=event.calling_ae,
                called_ae=event.called_ae,
                route=info.route,
                reason=event.why,
                detail=event.detail,
                by_upstream=event.by_upstream,
                rejection={"result": event.result, "source": event.source, "reason": event.reason},
            )
            self._submit(record)
        elif kind is ContentRefused:
            assert isinstance(event, ContentRefused)
            facts = self._facts.get(id(info))
            if facts is not None and event.side == "requester" and event.action == "refused":
                row = facts.row(event.service, event.sop_class)
                row[_INDEX["requests"]] += event.count
                row[_INDEX["refused"]] += event.count
            record = _who(self._pid, info, "content_refused", event.action)
            record.update(
                calling_ae=info.calling_ae,
                called_ae=info.called_ae,
                route=info.route,
                side=event.side,
                service=event.service,
                sop_class=name_of(event.sop_class) if event.sop_class else None,
                sop_class_uid=event.sop_class or None,
                message_id=event.message_id,
                action=event.action,
                status=f"0x{event.status:04X}" if event.status else None,
                reason=event.check,
                kind=event.kind,
                detail=event.detail,
                count=event.count,
            )
            self._submit(record)
        elif kind is WouldRefuse:
            assert isinstance(event, WouldRefuse)
            record = _who(self._pid, info, "would_refuse", "would_refuse")
            record.update(
                calling_ae=info.calling_ae,
                called_ae=info.called_ae,
                route=info.route,
                stage=event.stage,
                reason=event.why,
                detail=event.detail,
                answer=event.answer,
                service=event.service or None,
                sop_class=name_of(event.sop_class) if event.sop_class else None,
                sop_class_uid=event.sop_class or None,
                move_destination=event.move_destination,
                count=event.count,
            )
            self._submit(record)
        elif kind is Refused:
            assert isinstance(event, Refused)
            record = _who(self._pid, info, "connection_refused", "refused")
            presented = event.certificate
            record.update(
                reason=event.why,
                cause=event.cause or None,
                detail=event.detail,
                presented_certificate=None
                if presented is None
                else {
                    "subject": presented.subject,
                    "issuer": presented.issuer,
                    "serial": presented.serial,
                    "sha256": presented.sha256,
                },
            )
            self._submit(record)

    def _request_record(
        self,
        info: AssociationInfo,
        name: str,
        service: str,
        sop_class: str,
        status: int,
        message_id: int | None,
        why: str,
        detail: str,
        count: int = 1,
        move_destination: str | None = None,
    ) -> None:
        """One request, or ``count`` alike reported together (a refusal flood, counted)."""
        record = _who(self._pid, info, name, "refused" if why else "failed")
        record.update(
            calling_ae=info.calling_ae,
            called_ae=info.called_ae,
            route=info.route,
            service=service,
            sop_class=name_of(sop_class),
            sop_class_uid=sop_class,
            message_id=message_id,
            status=f"0x{status:04X}",
            count=count,
        )
        if why:
            record.update(reason=why, detail=detail, move_destination=move_destination)
        self._submit(record)

    def _association_record(self, info: AssociationInfo, event: AssociationEnded) -> None:
        facts = self._facts.pop(id(info), None)
        now = time.time()
        duration = time.monotonic() - info.started
        record = _who(self._pid, info, "association", event.how)
        record.update(
            calling_ae=info.calling_ae,
            called_ae=info.called_ae,
            route=info.route,
            upstream=facts.upstream if facts is not None else None,
            reason=event.why,
            detail=event.detail,
            start=timestamp(now - duration),
            end=timestamp(now),
            duration_seconds=round(duration, 6),
            bytes_from_requester=info.bytes_from_requester,
            bytes_from_upstream=info.bytes_from_upstream,
            operations=[
                {"service": service, "sop_class": name_of(uid), "sop_class_uid": uid}
                | dict(zip(COUNTS, counts, strict=True))
                for (service, uid), counts in sorted(facts.operations.items() if facts else ())
            ],
            instances_stored=facts.instances_stored if facts is not None else 0,
            contexts=facts.contexts if facts is not None else [],
            refused_contexts=facts.refused_contexts if facts is not None else [],
            move_destinations=sorted(facts.move_destinations) if facts is not None else [],
        )
        self._submit(record)


def _who(pid: int, info: AssociationInfo, name: str, outcome: str) -> Record:
    """The fields every record has: what happened and how it came out (``OUTCOMES``), when, in
    which process (worker), on which listener, from where."""
    identity = info.identity
    return {
        "event": name,
        "outcome": outcome,
        "time": timestamp(time.time()),
        "pid": pid,
        "listener": info.listener,
        "source": {
            "address": str(info.address),
            "port": info.port,
            "via": None if info.proxied_by is None else str(info.proxied_by),  # PROXY protocol
        },
        "certificate": None
        if identity is None
        else {
            "subject_cn": identity.subject_cn,
            "san_dns": list(identity.san_dns),
            "san_uri": list(identity.san_uri),
            "sha256": identity.fingerprint_sha256,
        },
    }


def json_lines_sink(
    path: Path | None, queue_size: int, on_lost: Losses | None = None
) -> QueuedSink:
    """The JSON-lines sink for ``path`` (None: stdout). Opens the file now, so a bad path fails
    the start rather than the first event."""
    return QueuedSink("file", JsonLines(path), queue_size, on_lost)
