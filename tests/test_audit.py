"""The audit trail: one JSON line per association and per refusal, field by field, and a sink that
blocks costs audit events (counted), never relay time."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import ssl
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from dicomfw.core.session import AssociationEnded
from tests.harness import CT, VERIFICATION, Pki, ct_image, running_scp, scu
from tests.obs_harness import drive_mix, mixed_rules, observed_firewall, scrape, value

VOLATILE = ("time", "pid", "instance", "start", "end", "duration_seconds")


def _fingerprint(pem: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.read_text())).hexdigest()


def _stable(record: dict[str, Any]) -> dict[str, Any]:
    """The record without what differs from run to run, after checking those fields' form."""
    moments = [
        datetime.fromisoformat(record[key]) for key in ("time", "start", "end") if key in record
    ]
    assert record["pid"] == os.getpid()  # the firewall runs in the test process
    assert record["instance"] == socket.gethostname()  # the default instance name
    assert all(m.utcoffset() is not None and m.utcoffset().total_seconds() == 0 for m in moments)  # type: ignore[union-attr]
    if "start" in record:
        assert record["start"] <= record["end"] == record["time"]
        assert 0 <= record["duration_seconds"] < 10
    stable = {k: v for k, v in record.items() if k not in VOLATILE}
    if "source" in stable:
        assert stable["source"]["address"] == "127.0.0.1" and stable["source"]["port"] > 0
        assert stable["source"]["via"] is None  # no load balancer in between
        stable["source"] = "127.0.0.1:*"
    for key in ("bytes_from_requester", "bytes_from_upstream"):
        if key in stable:
            stable[key] = stable[key] > 0
    return stable


def _ctx(sop_class: str, uid: str) -> dict[str, str]:
    """An accepted context, as pynetdicom's SCP accepts them here: explicit VR little endian."""
    return {"sop_class": sop_class, "sop_class_uid": uid, "transfer_syntax": "1.2.840.10008.1.2.1"}


def _op(service: str, sop_class: str, uid: str, **counts: int) -> dict[str, Any]:
    base = {"requests": 0, "success": 0, "warning": 0, "failure": 0, "cancel": 0, "refused": 0}
    return {"service": service, "sop_class": sop_class, "sop_class_uid": uid} | base | counts


def test_audit_records_of_a_known_sequence_match_field_by_field(tmp_path: Path, pki: Pki) -> None:
    ct, find, verification = (
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.2.2.1",
        VERIFICATION,
    )
    with running_scp() as pacs:
        rules = mixed_rules(pki, pacs.port, "audit: {file: audit.jsonl}\n")
        with observed_firewall(tmp_path, rules) as (firewall, _):
            drive_mix(firewall, pki)
            time.sleep(0.3)  # the last association's end reaches the firewall
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    upstream = {"name": "pacs", "host": "127.0.0.1", "port": pacs.port}
    front = {"listener": "front", "source": "127.0.0.1:*", "certificate": None}
    released = {"outcome": "released", "reason": "released", "detail": ""}
    traffic = {"bytes_from_requester": True, "bytes_from_upstream": True}
    config = str(tmp_path / "rules.yaml")
    assert [_stable(r) for r in records] == [
        {"event": "application_start", "outcome": "started", "config": config},
        {"event": "association", **front, "calling_ae": "CT01", "called_ae": "PACS",
         "route": "front/PACS", "upstream": upstream, **released, **traffic,
         "operations": [_op("C-ECHO", "Verification", verification, requests=1, success=1),
                        _op("C-STORE", "CTImageStorage", ct, requests=2, success=2)],
         "instances_stored": 2,
         "contexts": [_ctx("CTImageStorage", ct), _ctx("Verification", verification)],
         "refused_contexts": [], "move_destinations": []},
        {"event": "request_refused", "outcome": "refused", **front,
         "calling_ae": "CT01", "called_ae": "PACS",
         "route": "front/PACS", "service": "C-FIND",
         "sop_class": "StudyRootQueryRetrieveInformationModelFind", "sop_class_uid": find,
         "message_id": 1, "status": "0x0124", "count": 1, "reason": "service_not_allowed",
         "detail": f"C-FIND of {find} is not allowed on route 'front/PACS'",
         "move_destination": None},
        {"event": "association", **front, "calling_ae": "CT01", "called_ae": "PACS",
         "route": "front/PACS", "upstream": upstream, **released, **traffic,
         "operations": [_op("C-ECHO", "Verification", verification, requests=1, success=1),
                        _op("C-FIND", "StudyRootQueryRetrieveInformationModelFind", find,
                            requests=1, refused=1)],
         "instances_stored": 0,
         "contexts": [_ctx("CTImageStorage", ct),
                      _ctx("StudyRootQueryRetrieveInformationModelFind", find),
                      _ctx("Verification", verification)],
         "refused_contexts": [{"sop_class": "MRImageStorage",
                               "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
                               "reason": "sop_class_not_allowed"}],
         "move_destinations": []},
        {"event": "association", "listener": "secure", "source": "127.0.0.1:*",
         "certificate": {"subject_cn": "remote", "san_dns": [], "san_uri": ["urn:dicom:ae:REMOTE"],
                         "sha256": _fingerprint(pki.remote.cert)},
         "calling_ae": "REMOTE", "called_ae": "PACS", "route": "secure/PACS",
         "upstream": upstream, **released, **traffic,
         "operations": [_op("C-ECHO", "Verification", verification, requests=1, success=1)],
         "instances_stored": 0, "contexts": [_ctx("Verification", verification)],
         "refused_contexts": [], "move_destinations": []},
        {"event": "association_rejected", "outcome": "rejected", **front,
         "calling_ae": "STRANGER", "called_ae": "PACS",
         "route": None, "reason": "calling_ae_unknown",
         "detail": "calling AE 'STRANGER' is not a peer", "by_upstream": False,
         "rejection": {"result": 1, "source": 1, "reason": 3}},
        {"event": "association_rejected", "outcome": "rejected", **front, "calling_ae": "CT01",
         "called_ae": "NOT_A_PACS", "route": None, "reason": "called_ae_unknown",
         "detail": "no route for called AE 'NOT_A_PACS' on listener 'front'",
         "by_upstream": False, "rejection": {"result": 1, "source": 1, "reason": 7}},
        {"event": "association_rejected", "outcome": "rejected", **front,
         "calling_ae": "CT01", "called_ae": "DEAD",
         "route": "front/DEAD", "reason": "upstream_unreachable",
         "detail": records[7]["detail"], "by_upstream": False,
         "rejection": {"result": 2, "source": 3, "reason": 1}},
        {"event": "connection_refused", "outcome": "refused", "listener": "secure",
         "source": "127.0.0.1:*",
         "certificate": None, "reason": "tls_handshake_failed", "cause": "no_certificate",
         "detail": "PEER_DID_NOT_RETURN_A_CERTIFICATE", "presented_certificate": None},
        {"event": "association", **front, "calling_ae": None, "called_ae": None, "route": None,
         "upstream": None, "outcome": "aborted", "reason": "requester_protocol_error",
         "detail": "association PDU too short", "bytes_from_requester": True,
         "bytes_from_upstream": False, "operations": [], "instances_stored": 0,
         "contexts": [], "refused_contexts": [], "move_destinations": []},
        {"event": "application_stop", "outcome": "stopped", "config": config},
    ]  # fmt: skip
    assert records[7]["detail"].startswith("dead: ")


def test_a_request_the_upstream_failed_gets_its_own_record(tmp_path: Path, pki: Pki) -> None:
    with running_scp(store_status=0xA700) as pacs:  # Refused: Out of Resources
        rules = mixed_rules(pki, pacs.port, "audit: {file: audit.jsonl}\n")
        with observed_firewall(tmp_path, rules) as (firewall, _):
            association = scu("CT01", (CT,)).associate(
                "127.0.0.1", firewall.port("front"), ae_title="PACS"
            )
            assert association.send_c_store(ct_image(seed=1)).Status == 0xA700
            association.release()
            firewall.wait_for(lambda e: isinstance(e, AssociationEnded))
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    front = {"listener": "front", "source": "127.0.0.1:*", "certificate": None}
    assert [_stable(r) for r in records[1:3]] == [
        {"event": "request_failed", "outcome": "failed", **front,
         "calling_ae": "CT01", "called_ae": "PACS",
         "route": "front/PACS", "service": "C-STORE", "sop_class": "CTImageStorage",
         "sop_class_uid": CT, "message_id": 1, "status": "0xA700", "count": 1},
        {"event": "association", **front, "calling_ae": "CT01", "called_ae": "PACS",
         "route": "front/PACS",
         "upstream": {"name": "pacs", "host": "127.0.0.1", "port": pacs.port},
         "outcome": "released", "reason": "released", "detail": "",
         "bytes_from_requester": True, "bytes_from_upstream": True,
         "operations": [_op("C-STORE", "CTImageStorage", CT, requests=1, failure=1)],
         "instances_stored": 0, "contexts": [_ctx("CTImageStorage", CT)],
         "refused_contexts": [], "move_destinations": []},
    ]  # fmt: skip


def _echo_associations(port: int, count: int) -> float:
    """Seconds for ``count`` associations of one C-ECHO each, one after another."""
    ae = scu("CT01", (VERIFICATION,))
    started = time.perf_counter()
    for _ in range(count):
        association = ae.associate("127.0.0.1", port, ae_title="PACS")
        assert association.is_established
        assert association.send_c_echo().Status == 0
        association.release()
    return time.perf_counter() - started


def test_a_blocked_audit_sink_does_not_slow_the_relay_and_its_drops_are_counted_as_lost(
    tmp_path: Path, pki: Pki
) -> None:
    count = 40
    fifo = tmp_path / "blocked" / "audit.fifo"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    # A reader that never reads, on a pipe of one page: a few records and the writer blocks.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
    timings = {}
    with running_scp() as pacs:
        for name, audit_file in (("file", tmp_path / "audit.jsonl"), ("blocked", fifo)):
            extra = (
                f'metrics: {{bind: "127.0.0.1:0"}}\naudit: {{file: {audit_file}, queue_size: 4}}\n'
            )
            directory = tmp_path / name
            directory.mkdir(exist_ok=True)
            with observed_firewall(directory, mixed_rules(pki, pacs.port, extra)) as (fw, obs):
                _echo_associations(fw.port("front"), 5)  # warm up
                timings[name] = _echo_associations(fw.port("front"), count)
                time.sleep(0.2)
                assert obs.server is not None and obs.audit is not None
                dropped = value(
                    scrape(obs.server.port), "dicomfw_audit_events_lost_total", cause="queue_full"
                )
                counted = sum(sink.lost["queue_full"] for sink in obs.audit.sinks)
                if name == "blocked":
                    os.close(reader)  # unblocks the writer (EPIPE), so the close is quick
            assert dropped == counted
            if name == "file":
                assert dropped == 0
                lines = (tmp_path / "audit.jsonl").read_text().splitlines()
                assert len(lines) == 1 + 5 + count + 1  # start, associations, stop
            else:
                # Of the start and 45 association records, all but those in the pipe (8 of
                # 500+ bytes at most), in the writer's hands and pending (4 each) are dropped.
                assert dropped >= 1 + 5 + count - (8 + 4 + 4)
    assert pacs.requests.count("C-ECHO") == 2 * (count + 5)
    assert timings["blocked"] < 1.5 * timings["file"] + 0.5, timings
