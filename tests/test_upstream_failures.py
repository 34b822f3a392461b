"""An upstream that is down and an upstream whose certificate does not verify are different
problems, fixed in different places: the log, the audit trail and /metrics tell them apart. The
modality gets the same transient A-ASSOCIATE-RJ for both (it can only retry later)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomfw.core.session import AssociationRejected
from dicomfw.pki import certs
from tests.harness import (
    Pki,
    associate_rq,
    exchange,
    free_port,
    running_scp,
    server_context,
)
from tests.obs_harness import observed_firewall, scrape, series, wait_until

#: A-ASSOCIATE-RJ rejected-transient (2), service-provider presentation (3), temporary
#: congestion (1): PS3.8 Table 9-21.
TRANSIENT_RJ = bytes((0x03, 0, 0, 0, 0, 4, 0, 2, 3, 1))


def upstream_rules(pki: Pki, impostor_port: int, down_port: int) -> str:
    tls = f"{{ca: {pki.ca}, cert: {pki.fw_client.cert}, key: {pki.fw_client.key}}}"
    return f"""\
listeners:
  - {{name: front, bind: "127.0.0.1:0"}}
upstreams:
  impostor: {{host: 127.0.0.1, port: {impostor_port}, tls: {tls}}}
  down: {{host: 127.0.0.1, port: {down_port}, tls: {tls}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8]}}
routes:
  - {{listener: front, called_ae: PACS, upstream: impostor, allow: [{{services: [C-ECHO]}}]}}
  - {{listener: front, called_ae: ARCHIVE, upstream: down, allow: [{{services: [C-ECHO]}}]}}
limits: {{connect_timeout_seconds: 3}}
metrics: {{bind: "127.0.0.1:0"}}
audit: {{file: audit.jsonl}}
"""


def test_an_upstream_with_a_wrong_certificate_is_not_reported_as_down(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    other_ca = pki.ca_dir.parent / "other-ca"
    impostor = certs.issue(other_ca, "pacs", "server", tmp_path / "impostor", ["localhost"],
                           ["127.0.0.1"])  # fmt: skip
    with (
        running_scp(ssl_context=server_context(pki, impostor)) as scp,
        observed_firewall(tmp_path, upstream_rules(pki, scp.port, free_port())) as (fw, obs),
    ):
        assert obs.server is not None
        front = fw.port("front")
        assert exchange(front, associate_rq("CT01", "PACS")) == TRANSIENT_RJ
        assert exchange(front, associate_rq("CT01", "ARCHIVE")) == TRANSIENT_RJ
        port = obs.server.port
        wait_until(
            lambda: len(series(scrape(port), "dicomfw_upstream_connect_failures_total")) == 2,
            "both failures counted",
        )
        samples = scrape(port)
    rejected = {e.called_ae: e for _, e in fw.events if isinstance(e, AssociationRejected)}
    assert rejected["PACS"].why == "upstream_certificate_invalid"
    [presented] = certs.inspect(impostor.cert)
    assert rejected["PACS"].detail == (
        "impostor: CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate (it"
        f" presented CN=pacs, issued by CN=somebody else's CA, serial {presented.serial})"
    )
    assert rejected["ARCHIVE"].why == "upstream_unreachable"
    assert series(samples, "dicomfw_upstream_connect_failures_total") == {
        frozenset({("upstream", "impostor"), ("cause", "certificate_invalid")}): 1,
        frozenset({("upstream", "down"), ("cause", "refused")}): 1,
    }
    assert (
        "event=association_rejected listener=front" in caplog.text
        and "called_ae=PACS why=upstream_certificate_invalid" in caplog.text
        and "called_ae=ARCHIVE why=upstream_unreachable" in caplog.text
    )
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    reasons = {r["called_ae"]: r["reason"] for r in records if r["event"] == "association_rejected"}
    assert reasons == {"PACS": "upstream_certificate_invalid", "ARCHIVE": "upstream_unreachable"}
