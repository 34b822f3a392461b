"""Every series whose labels the rules make known exists from the start at 0: a dashboard panel
shows 0 instead of "No data", and the first refusal of a kind counts in ``increase()`` (a series
born at 1 has no earlier sample to increase from). A reload adds the series of new names."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from dicomfw.core.content import CHECKS
from dicomfw.service.daemon import reload
from tests.harness import Pki, free_port, running_scp
from tests.obs_harness import (
    Samples,
    drive_mix,
    mixed_rules,
    observed_firewall,
    scrape,
    wait_until,
)
from tests.opshelpers import installed_dicomfw

CT = "CTImageStorage"
#: What the test expects, written out here rather than taken from the code under test.
HANDSHAKE_CAUSES = [
    "no_certificate",
    "unknown_ca",
    "certificate_expired",
    "certificate_revoked",
    "certificate_invalid",
    "crl_expired",
    "crl_invalid",
    "protocol_version",
    "no_shared_cipher",
    "not_tls",
    "peer_alert",
    "timeout",
    "connection_lost",
    "other",
]
ASSOCIATION_REASONS = [
    "calling_ae_unknown",
    "source_network_denied",
    "certificate_mismatch",
    "called_ae_unknown",
    "route_denies_calling_ae",
    "no_context_allowed",
    "ip_association_rate_exceeded",
    "peer_association_rate_exceeded",
    "ip_concurrency_exceeded",
    "peer_concurrency_exceeded",
    "total_concurrency_exceeded",
    "upstream_unreachable",
    "upstream_certificate_invalid",
    "upstream_tls_failed",
    "upstream_rejected",
]
REQUEST_REASONS = [
    "service_not_allowed",
    "move_destination_denied",
    "unrecognized_operation",
    "request_rate_exceeded",
]
PROTOCOL_REASONS = [
    "requester_protocol_error",
    "upstream_protocol_error",
    "artim_timeout",
    "idle_timeout",
    "too_many_refusals",
]


def _rules(pki: Pki, pacs: int, ports: dict[str, int], audit: Path) -> str:
    tls = f"{{cert: {pki.fw_server.cert}, key: {pki.fw_server.key}, ca: {pki.ca}}}"
    client = f"{{ca: {pki.ca}, cert: {pki.fw_client.cert}, key: {pki.fw_client.key}}}"
    return f"""\
listeners:
  - {{name: front, bind: "127.0.0.1:{ports["front"]}"}}
  - {{name: secure, bind: "127.0.0.1:{ports["secure"]}", tls: {tls}}}
  - {{name: watch, bind: "127.0.0.1:{ports["watch"]}", mode: monitor}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs}}}
  archive: {{host: 127.0.0.1, port: {free_port()}, tls: {client}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8]}}
  - {{ae_title: REMOTE, networks: [127.0.0.0/8], certificate: {{san_uri: "urn:dicom:ae:REMOTE"}}}}
routes:
  - listener: front
    called_ae: PACS
    upstream: pacs
    allow: [{{services: [C-ECHO, C-STORE], sop_classes: [{CT}]}}]
    validate: {{required: [PatientID]}}
  - {{listener: secure, called_ae: ARCHIVE, upstream: archive, calling_ae: [REMOTE],
      allow: [{{services: [C-FIND], sop_classes: [StudyRootQueryRetrieveInformationModelFind]}}]}}
  - {{listener: watch, called_ae: PACS, upstream: pacs, allow: [{{services: [C-ECHO]}}]}}
metrics: {{bind: "127.0.0.1:{ports["metrics"]}"}}
audit: {{file: {audit}}}
"""


def _zero(samples: Samples, name: str, **labels: str) -> bool:
    """The series exists and is 0."""
    return samples.get((name, frozenset(labels.items()))) == 0


def test_a_fresh_daemons_metrics_have_every_series_the_rules_make_known_at_0(
    tmp_path: Path, pki: Pki
) -> None:
    ports = {name: free_port() for name in ("front", "secure", "watch", "metrics")}
    rules, log = tmp_path / "rules.yaml", tmp_path / "daemon.log"
    with running_scp() as pacs:
        rules.write_text(_rules(pki, pacs.port, ports, tmp_path / "audit.jsonl"))
        with log.open("wb") as output:
            daemon = subprocess.Popen(
                [installed_dicomfw(), "run", "--config", str(rules)], stderr=output
            )
        try:
            wait_until(lambda: "event=ready" in log.read_text(), "the daemon to be ready")
            samples = scrape(ports["metrics"])  # nothing has connected
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(10)

    missing = []

    def expect(name: str, **labels: str) -> None:
        if not _zero(samples, name, **labels):
            missing.append((name, labels))

    for listener in ("front", "secure", "watch"):
        expect("dicomfw_active_associations", listener=listener)
        for outcome in ("refused", "rejected", "aborted", "closed", "probe"):
            expect(
                "dicomfw_associations_total",
                listener=listener,
                route="none",
                peer="unknown",
                outcome=outcome,
            )
        for reason in ASSOCIATION_REASONS:
            expect("dicomfw_refusals_total", listener=listener, stage="association", reason=reason)
        for reason in REQUEST_REASONS:
            expect("dicomfw_refusals_total", listener=listener, stage="request", reason=reason)
        for reason in PROTOCOL_REASONS:
            expect("dicomfw_refusals_total", listener=listener, stage="protocol", reason=reason)
        for reason in ("sop_class_not_allowed", "transfer_syntax_not_allowed"):
            expect("dicomfw_refusals_total", listener=listener, stage="context", reason=reason)
        for reason in ("source_address_denied", "pending_limit_exceeded"):
            expect("dicomfw_refusals_total", listener=listener, stage="connection", reason=reason)
        expect("dicomfw_association_duration_seconds_count", listener=listener, route="none")
    for outcome in ("released", "aborted", "closed", "rejected"):
        for peer in ("CT01", "REMOTE"):
            expect(
                "dicomfw_associations_total",
                listener="front",
                route="front/PACS",
                peer=peer,
                outcome=outcome,
            )
        expect(  # the route admits REMOTE only
            "dicomfw_associations_total",
            listener="secure",
            route="secure/ARCHIVE",
            peer="REMOTE",
            outcome=outcome,
        )
        expect(  # monitor mode lets an unknown calling AE through
            "dicomfw_associations_total",
            listener="watch",
            route="watch/PACS",
            peer="unknown",
            outcome=outcome,
        )
    for cause in HANDSHAKE_CAUSES:
        expect("dicomfw_tls_handshake_failures_total", listener="secure", cause=cause)
    expect(
        "dicomfw_refusals_total",
        listener="secure",
        stage="connection",
        reason="tls_handshake_failed",
    )
    for check in CHECKS:  # content validation on front's route
        expect("dicomfw_refusals_total", listener="front", stage="content", reason=check)
        expect(
            "dicomfw_content_refusals_total",
            listener="front",
            side="requester",
            check=check,
            action="refused",
        )
    for reason in ("calling_ae_unknown", "service_not_allowed", "sop_class_not_allowed"):
        stage = {"calling_ae_unknown": "association", "service_not_allowed": "request"}.get(
            reason, "context"
        )
        expect("dicomfw_would_refuse_total", listener="watch", stage=stage, reason=reason)
    for cause in ("refused", "timeout", "unreachable", "connection_lost", "other"):
        expect("dicomfw_upstream_connect_failures_total", upstream="pacs", cause=cause)
        expect("dicomfw_upstream_connect_failures_total", upstream="archive", cause=cause)
    for cause in ("certificate_invalid", "tls_handshake_failed"):
        expect("dicomfw_upstream_connect_failures_total", upstream="archive", cause=cause)
    for status in ("success", "warning", "failure", "cancel"):
        expect(
            "dicomfw_dimse_requests_total",
            route="front/PACS",
            service="C-STORE",
            sop_class=CT,
            status=status,
        )
        expect(
            "dicomfw_dimse_requests_total",
            route="front/PACS",
            service="C-ECHO",
            sop_class="Verification",
            status=status,
        )
        expect(
            "dicomfw_dimse_requests_total",
            route="secure/ARCHIVE",
            service="C-FIND",
            sop_class="StudyRootQueryRetrieveInformationModelFind",
            status=status,
        )
    expect("dicomfw_dimse_round_trip_seconds_count", route="front/PACS", service="C-STORE")
    expect("dicomfw_dimse_round_trip_seconds_count", route="secure/ARCHIVE", service="C-FIND")
    for direction in ("from_requester", "from_upstream"):
        expect("dicomfw_bytes_total", listener="front", route="front/PACS", direction=direction)
    for cause in ("queue_full", "write_error"):
        expect("dicomfw_audit_events_lost_total", sink="file", cause=cause)
    for result in ("success", "failure"):
        expect("dicomfw_rule_reloads_total", result=result)
    assert missing == []
    # what a plain listener cannot do, it has no series for
    assert (
        "dicomfw_tls_handshake_failures_total",
        frozenset({("listener", "front"), ("cause", "other")}),
    ) not in samples


def test_traffic_creates_no_series_the_rules_did_not_make_known_at_start(
    tmp_path: Path, pki: Pki
) -> None:
    """The known mix (every outcome, refusals at every stage, a TLS failure, an unreachable
    upstream): every series it counts in was already there, but that of a request the route's
    rules do not list (C-FIND on a C-STORE route), whose refusal was."""
    extra = 'metrics: {bind: "127.0.0.1:0"}\n'
    with (
        running_scp() as pacs,
        observed_firewall(tmp_path, mixed_rules(pki, pacs.port, extra)) as (firewall, obs),
    ):
        assert obs.server is not None
        port = obs.server.port
        before = set(scrape(port))
        mix = drive_mix(firewall, pki)
        wait_until(
            lambda: (
                sum(v for (n, _), v in scrape(port).items() if n == "dicomfw_associations_total")
                == mix.associations
            ),
            "every association to end",
        )
        after = scrape(port)
    born = {key for key in after if key not in before}
    assert born == {
        (
            "dicomfw_dimse_requests_total",
            frozenset(
                {
                    ("route", "front/PACS"),
                    ("service", "C-FIND"),
                    ("sop_class", "StudyRootQueryRetrieveInformationModelFind"),
                    ("status", "failure"),
                }
            ),
        )
    }
    assert (
        after[
            (
                "dicomfw_refusals_total",
                frozenset(
                    {("listener", "front"), ("stage", "request"), ("reason", "service_not_allowed")}
                ),
            )
        ]
        == 1
    )


def test_a_reload_adds_the_series_of_a_new_upstream_and_route_at_0(
    tmp_path: Path, pki: Pki
) -> None:
    extra = 'metrics: {bind: "127.0.0.1:0"}\n'
    with (
        running_scp() as pacs,
        observed_firewall(tmp_path, mixed_rules(pki, pacs.port, extra)) as (firewall, obs),
    ):
        assert obs.server is not None and firewall.relay is not None
        path = tmp_path / "rules.yaml"
        text = path.read_text()
        text = text.replace(
            "upstreams:\n", f"upstreams:\n  archive: {{host: 127.0.0.1, port: {free_port()}}}\n"
        ).replace(
            "routes:\n",
            "routes:\n  - {listener: secure, called_ae: ARCHIVE, upstream: archive,"
            " allow: [{services: [C-ECHO]}]}\n",
        )
        path.write_text(text)
        relay = firewall.relay
        assert not _zero(
            scrape(obs.server.port),
            "dicomfw_upstream_connect_failures_total",
            upstream="archive",
            cause="refused",
        )
        assert firewall.call(lambda: reload(relay, path, obs))
        samples = scrape(obs.server.port)
    assert _zero(
        samples, "dicomfw_upstream_connect_failures_total", upstream="archive", cause="refused"
    )
    assert _zero(
        samples,
        "dicomfw_dimse_requests_total",
        route="secure/ARCHIVE",
        service="C-ECHO",
        sop_class="Verification",
        status="success",
    )
    assert _zero(
        samples,
        "dicomfw_associations_total",
        listener="secure",
        route="secure/ARCHIVE",
        peer="REMOTE",
        outcome="released",
    )


def test_every_reason_the_rules_decide_has_its_series() -> None:
    """The reasons ``dicomfw explain`` knows the rules give are among those the metrics
    create at start."""
    from dicomfw.admin.explain import RULE_REASONS
    from dicomfw.observe import metrics

    known = {
        *metrics.CONNECTION_REASONS,
        *metrics.ASSOCIATION_REASONS,
        *metrics.CONTEXT_RULE_REASONS,
        *metrics.REQUEST_REASONS,
    }
    assert set(RULE_REASONS) <= known
    assert set(metrics.PROTOCOL_REFUSALS) == set(PROTOCOL_REASONS)
    assert set(metrics.HANDSHAKE_CAUSES) == set(HANDSHAKE_CAUSES)
