"""IHE ATNA: the audit trail as DICOM audit messages (PS3.15 Annex A.5) over syslog.

Each message is the XML of PS3.15 §A.5.1 in an RFC 5424 syslog message (facility 10
security/authorization, severity 5 notice, MSGID ``DICOM+RFC3881``, UTF-8 with a BOM per §6.4),
sent over TLS with octet-counting framing (RFC 5425 §4.3) or as one UDP datagram each
(RFC 5426). The records come from ``dicomfw.observe.audit`` and this sink sits behind the same
kind of bounded queue, on its own thread: a slow or absent collector costs audit messages,
never relay time.

Records become messages like this:

- application_start / application_stop: Application Activity (DCM 110100) with Application
  Start / Application Stop (110120 / 110121), PS3.15 §A.5.3.1.
- connection_refused, association_rejected (by the firewall), request_refused: Security Alert
  (110113, §A.5.3.11), typed Node Authentication (110126) when the peer failed to prove who it is
  (address, TLS, AE title, certificate) or TLS toward the upstream failed (its certificate, or
  ours), and Use of Restricted Function (110132) otherwise. The outcome is 4 (minor failure):
  the attempt happened and the firewall stopped it.
- an association that stored instances: Begin Transferring DICOM Instances (110102, dated at
  its start) and DICOM Instances Transferred (110104, at its end), §A.5.3.2 / §A.5.3.4.
- an association that queried: Query (110112, §A.5.3.12), one per queried SOP class.

A relay that never parses data sets cannot fill everything A.5.3 asks for: there are no Study
Instance UIDs, patient IDs or query keys here. The participant objects name the SOP classes
(ParticipantObjectIDTypeCode DCM 110181) with their instance or query counts instead.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import ssl
import time
from collections.abc import Sequence
from functools import cache
from typing import Any, Final

from dicomfw.config.model import AtnaCollector
from dicomfw.observe.audit import (
    COLLECTOR_UNREACHABLE,
    WRITE_ERROR,
    Losses,
    QueuedSink,
    Record,
    WriteFailed,
)

PRI: Final = 10 * 8 + 5  # facility 10 (security/authorization), severity 5 (notice)
MSGID: Final = "DICOM+RFC3881"
APP_NAME: Final = "dicomfw"
_BOM: Final = "\ufeff".encode()
_CONNECT_SECONDS: Final = 5.0
_RETRY_DELAYS: Final = (0.0, 0.5, 2.0)  # per batch; then it is lost and counted

Code = tuple[str, str]  # (code value, code meaning), coding scheme DCM
APPLICATION_ACTIVITY: Final = ("110100", "Application Activity")
BEGIN_TRANSFERRING: Final = ("110102", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED: Final = ("110104", "DICOM Instances Transferred")
QUERY: Final = ("110112", "Query")
SECURITY_ALERT: Final = ("110113", "Security Alert")
APPLICATION_START: Final = ("110120", "Application Start")
APPLICATION_STOP: Final = ("110121", "Application Stop")
NODE_AUTHENTICATION: Final = ("110126", "Node Authentication")
RESTRICTED_FUNCTION: Final = ("110132", "Use of Restricted Function")
ROLE_APPLICATION: Final = ("110150", "Application")
ROLE_DESTINATION: Final = ("110152", "Destination Role ID")
ROLE_SOURCE: Final = ("110153", "Source Role ID")
SOP_CLASS_UID: Final = ("110181", "SOP Class UID")
NODE_ID: Final = ("110182", "Node ID")

#: Refusals that mean a node did not prove who it is (the rest: it asked for too much): the
#: peer, or the upstream, whose certificate did not verify or which refused the firewall's.
_AUTHENTICATION_FAILURES: Final = frozenset(
    {
        "source_address_denied",
        "tls_handshake_failed",
        "calling_ae_unknown",
        "source_network_denied",
        "certificate_mismatch",
        "upstream_certificate_invalid",
        "upstream_tls_failed",
    }
)
#: Rejections that are the upstream's doing or its absence: not a security event.
_NOT_ALERTS: Final = frozenset({"upstream_unreachable", "upstream_rejected"})
#: Records that become a Security Alert.
_ALERTS: Final = frozenset(
    {"connection_refused", "association_rejected", "request_refused", "content_refused"}
)


# ---- PS3.15 A.5.1 XML ---------------------------------------------------------------------------
# Written as strings: ElementTree's serializer costs ~40 µs a message, these ~9 µs, and every
# microsecond on the writer thread is one the relay may wait for the GIL.


def _text(value: object) -> str:
    """Escaped for XML text and attributes. XML 1.0 cannot carry control characters, and AE
    titles and details come from the network: those become '?'."""
    text = str(value)
    if not text.isprintable():
        text = "".join(c if c >= " " else "?" for c in text)
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def _element(tag: str, attributes: dict[str, str], *children: str) -> str:
    written = "".join(f' {name}="{_text(value)}"' for name, value in attributes.items())
    inner = "".join(children)
    return f"<{tag}{written}>{inner}</{tag}>" if inner else f"<{tag}{written}/>"


@cache
def _code(tag: str, code: Code) -> str:
    return _element(tag, {"csd-code": code[0], "codeSystemName": "DCM", "originalText": code[1]})


def _participant(
    user_id: str,
    requestor: bool,
    role: Code,
    address: str | None = None,
    alternative: str | None = None,
) -> str:
    attributes = {"UserID": user_id, "UserIsRequestor": "true" if requestor else "false"}
    if alternative:
        attributes["AlternativeUserID"] = alternative
    if address:
        attributes["NetworkAccessPointID"] = address
        attributes["NetworkAccessPointTypeCode"] = "2" if _is_ip(address) else "1"
    return _element("ActiveParticipant", attributes, _code("RoleIDCode", role))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _object(identifier: str, id_type: Code, type_code: str, role: str, *children: str) -> str:
    """A ParticipantObjectIdentification; ``children`` follow its ID type code, in the schema's
    order (query, details, description, SOP classes)."""
    attributes = {
        "ParticipantObjectID": identifier,
        "ParticipantObjectTypeCode": type_code,
        "ParticipantObjectTypeCodeRole": role,
    }
    return _element(
        "ParticipantObjectIdentification",
        attributes,
        _code("ParticipantObjectIDTypeCode", id_type),
        *children,
    )


def _description(text: str) -> str:
    return f"<ParticipantObjectDescription>{_text(text)}</ParticipantObjectDescription>"


def audit_message(
    event: Code,
    action: str,
    when: str,
    outcome: int,
    participants: Sequence[str],
    source_id: str,
    objects: Sequence[str] = (),
    type_code: Code | None = None,
    description: str = "",
) -> str:
    """An AuditMessage, its parts in the order the schema of PS3.15 §A.5.1 wants them."""
    identification = _element(
        "EventIdentification",
        {"EventActionCode": action, "EventDateTime": when, "EventOutcomeIndicator": str(outcome)},
        _code("EventID", event),
        _code("EventTypeCode", type_code) if type_code is not None else "",
        f"<EventOutcomeDescription>{_text(description)}</EventOutcomeDescription>"
        if description
        else "",
    )
    source = _element(
        "AuditSourceIdentification",
        {"AuditSourceID": source_id},
        _code("AuditSourceTypeCode", ("7", "Network Component")),
    )
    return _element("AuditMessage", {}, identification, *participants, source, *objects)


class Messages:
    """Turns audit records into (EventDateTime, AuditMessage XML) for one audit source."""

    def __init__(self, source_id: str, pid: int) -> None:
        self.source_id = source_id
        self.pid = pid

    @staticmethod
    def wants(record: Record) -> bool:
        """Whether ``record`` becomes a message at all: request_failed and would_refuse records
        do not (the association's messages carry the outcome; monitor mode refused nothing),
        nor a rejection that is the upstream's doing, nor an association that neither stored
        nor queried."""
        event = record["event"]
        if event in _ALERTS:
            return record["reason"] not in _NOT_ALERTS
        if event == "association":
            return any(op["service"] in ("C-STORE", "C-FIND") for op in record["operations"])
        return event in ("application_start", "application_stop")

    def __call__(self, record: Record) -> list[tuple[str, str]]:
        if not self.wants(record):
            return []
        event = record["event"]
        if event in ("application_start", "application_stop"):
            return [(record["time"], self._application(record))]
        if event in _ALERTS:
            return [(record["time"], self._alert(record))]
        return self._association(record)

    def _us(self) -> str:
        return _participant(APP_NAME, False, ROLE_APPLICATION, alternative=str(self.pid))

    def _application(self, record: Record) -> str:
        start = record["event"] == "application_start"
        return audit_message(
            APPLICATION_ACTIVITY,
            "E",
            record["time"],
            0,
            [self._us()],
            self.source_id,
            type_code=APPLICATION_START if start else APPLICATION_STOP,
        )

    def _alert(self, record: Record) -> str:
        address = record["source"]["address"]
        calling = record.get("calling_ae")
        peer = _participant(
            calling or address,
            True,
            ROLE_SOURCE,
            address,
            f"AETITLES={calling}" if calling else None,
        )
        description = f"{record['event']}: {record['reason']}"
        if record.get("detail"):
            description += f": {record['detail']}"
        # The alert subject: a system object (2) whose role is a security resource (13).
        subject = _object(address, NODE_ID, "2", "13", _description(description))
        kind = (
            NODE_AUTHENTICATION
            if record["reason"] in _AUTHENTICATION_FAILURES
            else RESTRICTED_FUNCTION
        )
        return audit_message(
            SECURITY_ALERT,
            "E",
            record["time"],
            4,
            [self._us(), peer],
            self.source_id,
            [subject],
            kind,
            description,
        )

    def _association(self, record: Record) -> list[tuple[str, str]]:
        stores = [op for op in record["operations"] if op["service"] == "C-STORE"]
        finds = [op for op in record["operations"] if op["service"] == "C-FIND"]
        if not stores and not finds:
            return []
        calling, called = record["calling_ae"] or "", record["called_ae"] or ""
        upstream = record["upstream"] or {}
        who = [
            _participant(
                calling, True, ROLE_SOURCE, record["source"]["address"], f"AETITLES={calling}"
            ),
            _participant(
                called, False, ROLE_DESTINATION, upstream.get("host"), f"AETITLES={called}"
            ),
        ]
        messages: list[tuple[str, str]] = []
        if stores:
            failed = sum(op["failure"] + op["refused"] + op["cancel"] for op in stores)
            ok = failed == 0 and record["outcome"] == "released"
            objects = [
                _object(
                    op["sop_class_uid"],
                    SOP_CLASS_UID,
                    "2",  # system object
                    "3",  # report
                    _description(op["sop_class"]),
                    _element(
                        "SOPClass",
                        {
                            "UID": op["sop_class_uid"],
                            "NumberOfInstances": str(op["success"] + op["warning"]),
                        },
                    ),
                )
                for op in stores
            ]
            start, end = record["start"], record["end"]
            messages += [
                (
                    start,
                    audit_message(BEGIN_TRANSFERRING, "E", start, 0, who, self.source_id, objects),
                ),
                (
                    end,
                    audit_message(
                        INSTANCES_TRANSFERRED,
                        "C",
                        end,
                        0 if ok else 4,
                        who,
                        self.source_id,
                        objects,
                        description="" if ok else f"{failed} store(s) failed; {record['reason']}",
                    ),
                ),
            ]
        for op in finds:
            query = _object(
                op["sop_class_uid"],
                SOP_CLASS_UID,
                "2",
                "3",
                "<ParticipantObjectQuery/>",  # the firewall does not parse the query keys
                _description(f"{op['requests']} C-FIND request(s) of {op['sop_class']}"),
            )
            outcome = 0 if op["failure"] + op["refused"] == 0 else 4
            end = record["end"]
            messages.append(
                (end, audit_message(QUERY, "E", end, outcome, who, self.source_id, [query]))
            )
        return messages


# ---- RFC 5424 over RFC 5425 (TLS) or RFC 5426 (UDP) ---------------------------------------------


def syslog_message(xml: str, when: str, hostname: str, pid: int) -> bytes:
    """``<85>1 TIMESTAMP HOSTNAME dicomfw PID DICOM+RFC3881 - BOM<?xml …?><AuditMessage…>``."""
    header = f"<{PRI}>1 {when} {hostname} {APP_NAME} {pid} {MSGID} - "
    body = '<?xml version="1.0" encoding="UTF-8"?>' + xml
    return header.encode("ascii") + _BOM + body.encode("utf-8")


def _hostname() -> str:
    """RFC 5424 §6.2.4: printable US-ASCII, no spaces, at most 255 characters."""
    name = "".join(c for c in socket.getfqdn() if "!" <= c <= "~")[:255]
    return name or "-"


class Unreachable(OSError):
    """The collector could not be connected to (no route, refused, TLS handshake failed), as
    opposed to a connection that broke while sending."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.errno, str(error))


class _Tls:
    """One long-lived TLS connection, re-opened when the collector has closed it."""

    def __init__(self, collector: AtnaCollector) -> None:
        context = ssl.create_default_context(cafile=str(collector.ca) if collector.ca else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if collector.cert is not None and collector.key is not None:
            context.load_cert_chain(collector.cert, collector.key)
        self._context = context
        self._collector = collector
        self._sock: ssl.SSLSocket | None = None

    def send(self, messages: list[bytes]) -> None:
        frames = b"".join(b"%d %s" % (len(m), m) for m in messages)  # RFC 5425 §4.3
        if self._sock is not None and _closed_by_peer(self._sock):
            self.close()
        if self._sock is None:
            try:
                raw = socket.create_connection(
                    (self._collector.host, self._collector.port), _CONNECT_SECONDS
                )
            except OSError as error:
                raise Unreachable(error) from error
            try:
                self._sock = self._context.wrap_socket(raw, server_hostname=self._collector.host)
            except OSError as error:  # ssl.SSLError too: its certificate, or ours
                raw.close()
                raise Unreachable(error) from error
            except BaseException:
                raw.close()
                raise
        try:
            self._sock.sendall(frames)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _closed_by_peer(sock: socket.socket) -> bool:
    """A syslog collector never sends: a readable socket means it closed (or is closing), and
    the next write would vanish into a connection that is gone."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class _Udp:
    def __init__(self, collector: AtnaCollector) -> None:
        self._collector = collector
        self._sock: socket.socket | None = None
        self._address: Any = None

    def send(self, messages: list[bytes]) -> None:
        """Without a connection, a failed send (no route, no such host) means the collector
        cannot be reached."""
        try:
            if self._sock is None:
                family, kind, protocol, _, address = socket.getaddrinfo(
                    self._collector.host, self._collector.port, type=socket.SOCK_DGRAM
                )[0]
                self._sock = socket.socket(family, kind, protocol)
                self._address = address
            for message in messages:
                self._sock.sendto(message, self._address)  # RFC 5426 §3.1: one per datagram
        except OSError as error:
            raise Unreachable(error) from error

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class AtnaWriter:
    """Writes batches of audit records to the collector; runs on the sink's thread only. A
    batch still not sent after the retries is lost whole (``WriteFailed``)."""

    causes: tuple[str, ...] = (WRITE_ERROR, COLLECTOR_UNREACHABLE)

    def __init__(self, collector: AtnaCollector) -> None:
        self._transport = _Tls(collector) if collector.transport == "tls" else _Udp(collector)
        self._hostname = _hostname()
        self._messages = Messages(self._hostname, os.getpid())

    def wants(self, record: Record) -> bool:
        return Messages.wants(record)

    def write(self, batch: list[Record]) -> None:
        pid = self._messages.pid
        payload = [
            syslog_message(xml, when, self._hostname, pid)
            for record in batch
            for when, xml in self._messages(record)
        ]
        if not payload:
            return
        failure: OSError | None = None
        for delay in _RETRY_DELAYS:
            if delay:  # sleep(0) would still hand the GIL to the event loop and wait for it back
                time.sleep(delay)
            try:
                self._transport.send(payload)
                return
            except OSError as error:
                failure = error
        assert failure is not None
        cause = COLLECTOR_UNREACHABLE if isinstance(failure, Unreachable) else WRITE_ERROR
        raise WriteFailed(cause, len(batch), failure)

    def close(self) -> None:
        self._transport.close()


def atna_sink(
    collector: AtnaCollector, queue_size: int, on_lost: Losses | None = None
) -> QueuedSink:
    """The ATNA sink. TLS material is loaded now, so a bad file fails the start."""
    return QueuedSink("atna", AtnaWriter(collector), queue_size, on_lost)
