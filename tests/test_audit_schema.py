"""Every audit record says how it came out (``outcome``), and every record the firewall writes
matches the documented schema, ``docs/audit.schema.json``: records of every kind from real
traffic (accepted and released, aborted, closed during set-up, rejected by policy, refused in
the TLS handshake, a request refused, a request the PACS failed, content refused, what monitor
mode let through), checked against the schema; and the schema is strict enough to refuse a
record that breaks it."""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import jsonschema
import pydicom
import pytest

from dicomfw.core.session import AssociationEnded
from dicomfw.observe.audit import OUTCOMES
from tests.harness import (
    CT,
    FIND,
    VERIFICATION,
    WAIT,
    Pki,
    associate_rq,
    client_context,
    ct_image,
    exchange,
    running_scp,
    scu,
)
from tests.obs_harness import drive_mix, mixed_rules, observed_firewall, wait_until

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / "docs" / "audit.schema.json"


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def _rules(pki: Pki, pacs: int, failing: int, audit: Path) -> str:
    return f"""\
listeners:
  - {{name: front, bind: "127.0.0.1:0"}}
  - name: secure
    bind: "127.0.0.1:0"
    tls: {{cert: {pki.fw_server.cert}, key: {pki.fw_server.key}, ca: {pki.ca}}}
  - {{name: watch, bind: "127.0.0.1:0", mode: monitor}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs}}}
  failing: {{host: 127.0.0.1, port: {failing}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8]}}
routes:
  - listener: front
    called_ae: PACS
    upstream: pacs
    allow: [{{services: [C-ECHO, C-STORE], sop_classes: [CTImageStorage, {FIND}]}}]
    validate: {{required: [PatientID]}}
  - {{listener: front, called_ae: FAILING, upstream: failing,
      allow: [{{services: [C-STORE], sop_classes: [CTImageStorage]}}]}}
  - {{listener: secure, called_ae: PACS, upstream: pacs, allow: [{{services: [C-ECHO]}}]}}
  - {{listener: watch, called_ae: PACS, upstream: pacs, allow: [{{services: [C-ECHO]}}]}}
limits: {{artim_seconds: 5, idle_seconds: 30, connect_timeout_seconds: 3}}
audit: {{file: {audit}}}
"""


def _store(port: int, called: str, image: pydicom.Dataset) -> int:
    association = scu("CT01", (CT,)).associate("127.0.0.1", port, ae_title=called)
    assert association.is_established
    status = int(association.send_c_store(image).Status)
    association.release()
    return status


def test_every_record_of_every_outcome_carries_it_and_matches_the_schema(
    tmp_path: Path, pki: Pki
) -> None:
    audit = tmp_path / "audit.jsonl"
    no_patient_id = ct_image(seed=3)
    del no_patient_id.PatientID
    with (
        running_scp() as pacs,
        running_scp(store_status=0xA700) as failing,  # Refused: Out of Resources
        observed_firewall(tmp_path, _rules(pki, pacs.port, failing.port, audit)) as (fw, _),
    ):
        front, secure, watch = fw.port("front"), fw.port("secure"), fw.port("watch")
        # released, with a request refused by the rules and a data set refused by validation
        association = scu("CT01", (CT, FIND, VERIFICATION)).associate(
            "127.0.0.1", front, ae_title="PACS"
        )
        assert association.is_established and association.send_c_echo().Status == 0
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        assert [s.Status for s, _ in association.send_c_find(query, FIND)] == [0x0124]
        assert association.send_c_store(no_patient_id).Status != 0x0000
        association.release()
        assert _store(front, "FAILING", ct_image(seed=4)) == 0xA700  # the PACS failed it
        assert _store(watch, "PACS", ct_image(seed=5)) == 0x0000  # monitor mode let it pass
        assert exchange(front, associate_rq("STRANGER", "PACS"))[0] == 0x03  # rejected
        with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):  # no certificate
            exchange(secure, associate_rq("CT01", "PACS"), tls=client_context(pki, None))
        assert exchange(front, bytes((0x01, 0, 0, 0, 0, 8)) + b"\x00\x01xxxxxx")[0] == 0x07
        with socket.create_connection(("127.0.0.1", front), WAIT) as sock:
            sock.sendall(b"\x01\x00\x00")  # half a PDU header, then gone: closed in set-up
        fw.wait_for(lambda e: isinstance(e, AssociationEnded) and e.how == "closed")
        time.sleep(0.2)  # the last ends reach the audit
    records = [json.loads(line) for line in audit.read_text().splitlines()]

    check = validator()
    for record in records:
        errors = sorted(check.iter_errors(record), key=str)
        assert not errors, (record, [e.message for e in errors])
        assert record["outcome"] in OUTCOMES[record["event"]]
    seen = {(r["event"], r["outcome"]) for r in records}
    assert seen >= {
        ("application_start", "started"),
        ("association", "released"),
        ("request_refused", "refused"),
        ("content_refused", "refused"),
        ("request_failed", "failed"),
        ("would_refuse", "would_refuse"),
        ("association_rejected", "rejected"),
        ("connection_refused", "refused"),
        ("association", "aborted"),
        ("association", "closed"),
        ("application_stop", "stopped"),
    }, seen
    refused = next(r for r in records if r["event"] == "connection_refused")
    assert (refused["reason"], refused["cause"]) == ("tls_handshake_failed", "no_certificate")


def test_the_schema_lists_exactly_the_outcomes_the_code_writes() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    documented = {}
    for event in schema["properties"]["event"]["enum"]:
        outcome = schema["$defs"][event]["properties"]["outcome"]
        documented[event] = tuple(outcome["enum"]) if "enum" in outcome else (outcome["const"],)
    assert documented == OUTCOMES


RELEASED: dict[str, Any] = {
    "event": "association",
    "outcome": "released",
    "time": "2026-11-25T14:58:18.063Z",
    "pid": 2417,
    "instance": "fw1",
    "listener": "front",
    "source": {"address": "10.1.2.7", "port": 44325, "via": None},
    "certificate": None,
    "calling_ae": "CT01",
    "called_ae": "PACS",
    "route": "front/PACS",
    "upstream": {"name": "pacs", "host": "10.9.0.5", "port": 104},
    "reason": "released",
    "detail": "",
    "start": "2026-11-25T14:58:18.042Z",
    "end": "2026-11-25T14:58:18.063Z",
    "duration_seconds": 0.020994,
    "bytes_from_requester": 41281,
    "bytes_from_upstream": 667,
    "operations": [
        {
            "service": "C-STORE",
            "sop_class": "CTImageStorage",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "requests": 2,
            "success": 2,
            "warning": 0,
            "failure": 0,
            "cancel": 0,
            "refused": 0,
        }
    ],
    "instances_stored": 2,
    "contexts": [
        {
            "sop_class": "CTImageStorage",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "transfer_syntax": "1.2.840.10008.1.2.1",
        }
    ],
    "refused_contexts": [],
    "move_destinations": [],
}


def _without(key: str) -> dict[str, Any]:
    record = copy.deepcopy(RELEASED)
    del record[key]
    return record


@pytest.mark.parametrize(
    "broken",
    [
        _without("outcome"),
        _without("time"),
        RELEASED | {"outcome": "rejected"},  # not an association's outcome
        RELEASED | {"event": "association_rejected"},  # an association's fields
        RELEASED | {"patient_id": "FW-0001"},  # a field the schema does not know
        RELEASED | {"time": "2026-11-25 14:58:18"},  # not RFC 3339 UTC
        RELEASED | {"source": {"address": "not-an-address", "port": 1, "via": None}},
    ],
)
def test_the_schema_refuses_a_record_that_breaks_it(broken: dict[str, Any]) -> None:
    check = validator()
    assert check.is_valid(RELEASED)  # the README's example record
    assert not check.is_valid(broken)


def test_records_of_the_known_traffic_mix_match_the_schema(tmp_path: Path, pki: Pki) -> None:
    """The mix the other observability tests drive (TLS listener with a verified client
    certificate, refused contexts, an unreachable upstream, a malformed PDU)."""
    with running_scp() as pacs:
        rules = mixed_rules(pki, pacs.port, "audit: {file: audit.jsonl}\n")
        with observed_firewall(tmp_path, rules) as (firewall, _):
            drive_mix(firewall, pki)
            wait_until(
                lambda: (tmp_path / "audit.jsonl").read_text().count('"aborted"') >= 1,
                "the last record",
            )
    check = validator()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(records) == 11
    for record in records:
        assert check.is_valid(record), [e.message for e in check.iter_errors(record)]


def test_the_readmes_example_record_matches_the_schema() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Audit trail.**") :]
    start = section.index("```json\n") + len("```json\n")
    example = section[start : section.index("\n```", start)]
    record = json.loads(example)
    assert validator().is_valid(record), [e.message for e in validator().iter_errors(record)]
    assert record["outcome"] == "released"
