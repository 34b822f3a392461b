"""`dicomfw run` as an admin starts it: metrics and audit wired in, reloads counted, certificate
gauges refreshed on reload, and prometheus-client's multiprocess mode across processes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from dicomfw.pki import certs
from tests.harness import WAIT, Pki, free_port, running_process
from tests.obs_harness import scrape, series, value, wait_until

DICOMFW = shutil.which("dicomfw")


def _rules(pki: Pki, cert: certs.CertPaths, metrics_port: int, audit: Path) -> str:
    return f"""\
listeners:
  - name: secure
    bind: "127.0.0.1:{free_port()}"
    tls: {{cert: {cert.cert}, key: {cert.key}, ca: {pki.ca}}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {free_port()}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8]}}
routes:
  - {{listener: secure, called_ae: PACS, upstream: pacs, allow: [{{services: [C-ECHO]}}]}}
metrics: {{bind: "127.0.0.1:{metrics_port}"}}
audit: {{file: {audit}}}
"""


def _not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_daemon_counts_reloads_and_refreshes_certificate_expiry_on_reload(
    tmp_path: Path, pki: Pki
) -> None:
    assert DICOMFW is not None
    cert = certs.issue(pki.ca_dir, "fw-daemon", "server", tmp_path, ["localhost"], days=100)
    port, audit, path = free_port(), tmp_path / "audit.jsonl", tmp_path / "rules.yaml"
    path.write_text(_rules(pki, cert, port, audit))
    role = ("dicomfw_certificate_not_after_timestamp_seconds", "listener:secure:cert")

    def cert_expiry() -> float:
        return value(scrape(port), role[0], role=role[1])

    with running_process(DICOMFW, "run", "--config", path, ready_port=port) as daemon:
        first = scrape(port)
        assert value(first, "dicomfw_rules_info", sha256=_sha256(path)) == 1
        assert value(first, "dicomfw_rules_last_reload_successful") == 1
        assert cert_expiry() == _not_after(cert.cert)

        # Renew the certificate in place (shorter), edit the rules, reload: gauges follow.
        renewed = certs.issue(
            pki.ca_dir, "fw-daemon", "server", tmp_path, ["localhost"], days=30, force=True
        )
        old_hash = _sha256(path)
        path.write_text(path.read_text() + "# renewed the listener certificate\n")
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: cert_expiry() == _not_after(renewed.cert), "the renewed expiry")
        after_reload = scrape(port)
        assert value(after_reload, "dicomfw_rule_reloads_total", result="success") == 1
        assert series(after_reload, "dicomfw_rules_info") == {
            frozenset({("sha256", _sha256(path))}): 1
        }
        assert _sha256(path) != old_hash

        # A broken rules file: the reload fails, the old rules stay, the gauge says so.
        path.write_text("listeners: [oops\n")
        daemon.send_signal(signal.SIGHUP)
        wait_until(
            lambda: value(scrape(port), "dicomfw_rule_reloads_total", result="failure") == 1,
            "the failed reload to be counted",
        )
        assert value(scrape(port), "dicomfw_rules_last_reload_successful") == 0

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(WAIT) == 0
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert events == ["application_start", "application_stop"]


def test_multiprocess_mode_serves_the_sum_over_every_worker_process(
    tmp_path: Path, pki: Pki
) -> None:
    """Two processes write to one PROMETHEUS_MULTIPROC_DIR: the daemon and a stand-in for a
    second worker. The daemon's /metrics serves the sum of both."""
    assert DICOMFW is not None
    shared = tmp_path / "prometheus-multiproc"
    shared.mkdir()
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    worker = (
        "from dicomfw.observe.metrics import Metrics\n"
        "metrics = Metrics()\n"
        "metrics.associations.labels('secure', 'none', 'unknown', 'refused').inc(5)\n"
        "metrics.active.labels('secure').inc(2)\n"
    )
    subprocess.run([sys.executable, "-c", worker], env=environment, check=True, timeout=60)
    cert = certs.issue(pki.ca_dir, "fw-multi", "server", tmp_path, ["localhost"])
    port, path = free_port(), tmp_path / "rules.yaml"
    path.write_text(_rules(pki, cert, port, tmp_path / "audit.jsonl"))
    process = subprocess.Popen(
        [DICOMFW, "run", "--config", str(path)], env=environment, stderr=subprocess.PIPE
    )
    try:
        wait_until(lambda: _serving(port), "the daemon's metrics endpoint")
        samples = scrape(port)
        assert value(samples, "dicomfw_associations_total", outcome="refused") == 5
        assert value(samples, "dicomfw_active_associations", listener="secure") == 2
        assert value(samples, "dicomfw_rules_info", sha256=_sha256(path)) == 1
        assert len(list(shared.glob("*.db"))) >= 2  # one set of files per process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(WAIT)


def _serving(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True
