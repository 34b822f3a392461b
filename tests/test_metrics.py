"""/metrics shows exactly what happened, per reason and per service, with bounded labels."""

from __future__ import annotations

import contextlib
import datetime
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from dicomfw.pki import certs
from tests.harness import (
    CT,
    VERIFICATION,
    Firewall,
    Pki,
    associate_rq,
    client_context,
    ct_image,
    exchange,
    running_scp,
    scu,
)
from tests.obs_harness import (
    drive_mix,
    mixed_rules,
    observed_firewall,
    scrape,
    series,
    value,
    wait_until,
)

METRICS = 'metrics: {bind: "127.0.0.1:0"}\n'


@contextlib.contextmanager
def metered_firewall(tmp_path: Path, pki: Pki, **scp: Any) -> Iterator[tuple[Firewall, int]]:
    """A PACS (``running_scp(**scp)``) behind a firewall running the mixed rules with metrics
    on: the firewall, and the port its /metrics is served on."""
    with (
        running_scp(**scp) as pacs,
        observed_firewall(tmp_path, mixed_rules(pki, pacs.port, METRICS)) as (firewall, obs),
    ):
        assert obs.server is not None
        yield firewall, obs.server.port


def labels(**pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset(pairs.items())


def test_metrics_count_exactly_the_associations_refusals_and_requests_that_happened(
    tmp_path: Path, pki: Pki
) -> None:
    with metered_firewall(tmp_path, pki) as (firewall, port):
        mix = drive_mix(firewall, pki)
        wait_until(
            lambda: value(scrape(port), "dicomfw_associations_total") == mix.associations,
            "every association to end",
        )
        samples = scrape(port)

    assert series(samples, "dicomfw_associations_total") == {
        labels(listener="front", route="front/PACS", peer="CT01", outcome="released"): 2,
        labels(listener="secure", route="secure/PACS", peer="REMOTE", outcome="released"): 1,
        labels(listener="front", route="none", peer="unknown", outcome="rejected"): 1,  # STRANGER
        labels(listener="front", route="none", peer="CT01", outcome="rejected"): 1,  # NOT_A_PACS
        labels(listener="front", route="front/DEAD", peer="CT01", outcome="rejected"): 1,
        labels(listener="secure", route="none", peer="unknown", outcome="refused"): 1,
        labels(listener="front", route="none", peer="unknown", outcome="aborted"): 1,
    }
    assert series(samples, "dicomfw_refusals_total") == {
        labels(listener="front", stage="association", reason="calling_ae_unknown"): 1,
        labels(listener="front", stage="association", reason="called_ae_unknown"): 1,
        labels(listener="front", stage="association", reason="upstream_unreachable"): 1,
        labels(listener="front", stage="context", reason="sop_class_not_allowed"): 1,
        labels(listener="front", stage="request", reason="service_not_allowed"): 1,
        labels(listener="front", stage="protocol", reason="requester_protocol_error"): 1,
        labels(listener="secure", stage="connection", reason="tls_handshake_failed"): 1,
    }
    assert series(samples, "dicomfw_tls_handshake_failures_total") == {
        labels(listener="secure", cause="no_certificate"): 1
    }

    def requests(route: str, service: str, sop_class: str, status: str) -> frozenset[Any]:
        return labels(route=route, service=service, sop_class=sop_class, status=status)

    find = "StudyRootQueryRetrieveInformationModelFind"
    assert series(samples, "dicomfw_dimse_requests_total") == {
        requests("front/PACS", "C-ECHO", "Verification", "success"): 2,
        requests("front/PACS", "C-STORE", "CTImageStorage", "success"): 2,
        requests("front/PACS", "C-FIND", find, "failure"): 1,
        requests("secure/PACS", "C-ECHO", "Verification", "success"): 1,
    }
    assert series(samples, "dicomfw_dimse_round_trip_seconds_count") == {
        labels(route="front/PACS", service="C-ECHO"): 2,
        labels(route="front/PACS", service="C-STORE"): 2,
        labels(route="secure/PACS", service="C-ECHO"): 1,
    }
    assert series(samples, "dicomfw_upstream_connect_failures_total") == {
        labels(upstream="dead", cause="refused"): 1
    }
    assert value(samples, "dicomfw_active_associations") == 0
    assert value(samples, "dicomfw_association_duration_seconds_count") == mix.associations - 1
    stored = value(samples, "dicomfw_bytes_total", route="front/PACS", direction="from_requester")
    assert stored > 2 * 20_000  # two CT images of 20 kB pixel data
    assert value(samples, "dicomfw_bytes_total", direction="from_upstream") > 0
    assert value(samples, "dicomfw_rules_last_reload_successful") == 1
    assert series(samples, "dicomfw_rule_reloads_total") == {}  # exported, and still 0
    assert ("dicomfw_rule_reloads_total", labels(result="failure")) in samples
    assert value(samples, "dicomfw_rules_info") == 1
    # A label value is a configured name or a fixed word, never what a peer sent.
    every_label_value = {v for (_, pairs) in samples for _, v in pairs}
    assert not {"STRANGER", "NOT_A_PACS", "127.0.0.1"} & every_label_value


def test_requests_of_an_open_association_show_up_while_it_is_still_open(
    tmp_path: Path, pki: Pki
) -> None:
    """Requests are counted in the session and reported about once a second, not per request:
    a long association's traffic must still reach /metrics before it ends."""
    with metered_firewall(tmp_path, pki) as (firewall, port):
        association = scu("CT01", (VERIFICATION,)).associate(
            "127.0.0.1", firewall.port("front"), ae_title="PACS"
        )
        try:
            assert [association.send_c_echo().Status for _ in range(3)] == [0, 0, 0]
            wait_until(
                lambda: value(scrape(port), "dicomfw_dimse_requests_total") == 3,
                "the open association's echoes to be counted",
            )
            samples = scrape(port)
            assert value(samples, "dicomfw_active_associations") == 1  # still open
            assert value(samples, "dicomfw_dimse_round_trip_seconds_count") == 3
            assert 0 < value(samples, "dicomfw_dimse_round_trip_seconds_sum") < 3
        finally:
            association.release()


def test_a_failure_status_from_the_upstream_is_counted_as_a_failed_request(
    tmp_path: Path, pki: Pki
) -> None:
    out_of_resources = 0xA700
    with metered_firewall(tmp_path, pki, store_status=out_of_resources) as (firewall, port):
        association = scu("CT01", (CT,)).associate(
            "127.0.0.1", firewall.port("front"), ae_title="PACS"
        )
        assert association.send_c_store(ct_image(seed=1)).Status == out_of_resources
        association.release()
        wait_until(
            lambda: value(scrape(port), "dicomfw_associations_total") == 1, "the association to end"
        )
        samples = scrape(port)
    failed = labels(
        route="front/PACS", service="C-STORE", sop_class="CTImageStorage", status="failure"
    )
    assert series(samples, "dicomfw_dimse_requests_total") == {failed: 1}
    assert value(samples, "dicomfw_dimse_round_trip_seconds_count") == 1


def not_after(path: Path) -> datetime.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def test_certificate_expiry_is_exported_for_every_certificate_in_the_config(
    tmp_path: Path, pki: Pki
) -> None:
    with metered_firewall(tmp_path, pki) as (_, port):
        samples = series(scrape(port), "dicomfw_certificate_not_after_timestamp_seconds")
    files = (("listener:secure:cert", pki.fw_server.cert), ("listener:secure:ca", pki.ca))
    expected = {
        labels(file=str(path), role=role): not_after(path).timestamp() for role, path in files
    }
    assert samples == expected


@pytest.fixture(scope="module")
def bad_clients(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, certs.CertPaths]:
    out = tmp_path_factory.mktemp("bad-clients")
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    expired = certs.issue(pki.ca_dir, "expired", "client", out, days=1, not_before=long_ago)
    revoked = certs.issue(pki.ca_dir, "revoked", "client", out)
    certs.revoke(pki.ca_dir, revoked.cert, out / "ca.crl")
    return {"expired": expired, "revoked": revoked}


def test_tls_handshake_failures_are_counted_by_cause(
    tmp_path: Path, pki: Pki, bad_clients: dict[str, certs.CertPaths]
) -> None:
    crl = bad_clients["revoked"].cert.parent / "ca.crl"
    listener = (
        f'  - {{name: secure, bind: "127.0.0.1:0", tls: {{cert: {pki.fw_server.cert}, '
        f'key: {pki.fw_server.key}, ca: {pki.ca}, crl: {crl}, min_version: "1.3"}}}}\n'
    )
    rules = mixed_rules(pki, 1, METRICS)
    start = rules.index("  - name: secure")
    rules = rules[:start] + listener + rules[rules.index("upstreams:") :]
    tls12 = client_context(pki, pki.remote)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    attempts = {
        "no_certificate": client_context(pki, None),
        "unknown_ca": client_context(pki, pki.stranger),
        "certificate_expired": client_context(pki, bad_clients["expired"]),
        "certificate_revoked": client_context(pki, bad_clients["revoked"]),
        "certificate_invalid": client_context(pki, pki.pacs),  # a server certificate
        "protocol_version": tls12,
        "not_tls": None,  # plain DICOM to a TLS port
    }
    with observed_firewall(tmp_path, rules) as (firewall, obs):
        assert obs.server is not None
        port = obs.server.port
        for context in attempts.values():
            with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
                exchange(firewall.port("secure"), associate_rq("REMOTE", "PACS"), tls=context)
        wait_until(
            lambda: value(scrape(port), "dicomfw_tls_handshake_failures_total") == len(attempts),
            "every handshake failure",
        )
        samples = scrape(port)
    assert series(samples, "dicomfw_tls_handshake_failures_total") == {
        labels(listener="secure", cause=cause): 1 for cause in attempts
    }
