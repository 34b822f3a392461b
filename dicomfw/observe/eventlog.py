"""The log observer: one structured line per association outcome, refusal and rejection.

It subscribes to the same events audit and metrics will, so the log never says something the
firewall did not decide. Per-PDU activity is never logged (it would cost more than relaying).
"""

from __future__ import annotations

import logging
import time

from dicomfw.core.session import (
    AssociationAccepted,
    AssociationEnded,
    AssociationRejected,
    ContentRefused,
    Event,
    RequestFailed,
    RequestRefused,
    RequestTally,
    Scanned,
    WouldRefuse,
)
from dicomfw.core.uids import name_of
from dicomfw.logsetup import log_event
from dicomfw.relay.server import AssociationInfo, Refused

log = logging.getLogger("dicomfw.events")


def log_observer(info: AssociationInfo, event: Event | Refused) -> None:
    """Write ``event`` for the association described by ``info`` as one logfmt line."""
    kind = type(event)
    if kind is RequestTally:  # about once a second per association: keep it cheap
        assert isinstance(event, RequestTally)
        info.requests += sum(counts.completed for counts in event.counts.values())
        info.requests_sent += sum(counts.forwarded for counts in event.counts.values())
        return
    if kind is RequestFailed:  # the audit trail records each one
        return
    where = {
        "listener": info.listener,
        "peer": f"{info.address}:{info.port}",
        "via": info.proxied_by,  # the load balancer that reported ``peer`` (PROXY protocol)
    }
    if isinstance(event, Refused):
        presented = event.certificate  # a refused TLS client's certificate: which one it was
        log_event(
            log,
            logging.WARNING,
            "connection_refused",
            **where,
            why=event.why,
            cause=event.cause or None,
            detail=event.detail,
            subject=presented.subject if presented is not None else None,
            issuer=presented.issuer if presented is not None else None,
            serial=presented.serial if presented is not None else None,
        )
    elif isinstance(event, AssociationRejected):
        log_event(
            log,
            logging.WARNING,
            "association_rejected",
            **where,
            calling_ae=event.calling_ae,
            called_ae=event.called_ae,
            why=event.why,
            result=event.result,
            source=event.source,
            reason=event.reason,
            detail=event.detail,
        )
    elif isinstance(event, AssociationAccepted):
        log_event(
            log,
            logging.INFO,
            "association_accepted",
            **where,
            calling_ae=event.calling_ae,
            called_ae=event.called_ae,
            route=event.route,
            contexts=event.accepted_contexts,
            # A modality proposing 128 contexts would make this line 7 KB; the names of the
            # refused ones are at debug level.
            refused_contexts=len(event.refused_contexts),
            tls_resumed_upstream=info.tls_resumed_upstream,
        )
        if event.refused_contexts:
            log_event(
                log,
                logging.DEBUG,
                "contexts_refused",
                **where,
                contexts=",".join(f"{name_of(u)}:{why}" for _, u, why in event.refused_contexts),
            )
    elif isinstance(event, RequestRefused):
        log_event(
            log,
            logging.WARNING,
            "request_refused",
            **where,
            calling_ae=info.calling_ae,
            service=event.service,
            sop_class=name_of(event.sop_class),
            status=f"0x{event.status:04X}",
            why=event.why,
            count=event.count,
            detail=event.detail,
        )
    elif isinstance(event, ContentRefused):
        log_event(
            log,
            logging.WARNING,
            "content_refused",
            **where,
            calling_ae=info.calling_ae,
            side=event.side,
            service=event.service,
            sop_class=name_of(event.sop_class) if event.sop_class else None,
            check=event.check,
            action=event.action,
            status=f"0x{event.status:04X}" if event.status else None,
            count=event.count,
            detail=event.detail,
        )
    elif isinstance(event, Scanned):
        log_event(
            log,
            logging.DEBUG if event.result == "clean" else logging.WARNING,
            "scanned",
            **where,
            calling_ae=info.calling_ae,
            side=event.side,
            service=event.service,
            sop_class=name_of(event.sop_class) if event.sop_class else None,
            result=event.result,
            detail=event.detail or None,
        )
    elif isinstance(event, WouldRefuse):
        log_event(
            log,
            logging.INFO,
            "would_refuse",
            **where,
            calling_ae=info.calling_ae,
            called_ae=info.called_ae,
            stage=event.stage,
            service=event.service or None,
            sop_class=name_of(event.sop_class) if event.sop_class else None,
            why=event.why,
            answer=event.answer,
            count=event.count,
            detail=event.detail,
        )
    elif isinstance(event, AssociationEnded) and event.how == "probe":
        # a balancer's or a monitor's health check: connected, closed, said nothing
        log_event(log, logging.INFO, "probe", **where)
    elif isinstance(event, AssociationEnded):
        log_event(
            log,
            logging.INFO if event.how == "released" else logging.WARNING,
            "association_ended",
            **where,
            calling_ae=info.calling_ae,
            called_ae=info.called_ae,
            how=event.how,
            why=event.why,
            detail=event.detail or None,
            seconds=round(time.monotonic() - info.started, 3),
            bytes_from_requester=info.bytes_from_requester,
            bytes_from_upstream=info.bytes_from_upstream,
            requests_sent=info.requests_sent,
            requests_answered=info.requests,
        )
