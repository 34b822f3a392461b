"""Observability test helpers: a firewall wired like the daemon wires it, a known mix of traffic,
and a /metrics scrape parsed by prometheus-client's own parser."""

from __future__ import annotations

import contextlib
import re
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dicomfw.config.load import load_config
from dicomfw.observe.observability import Observability
from tests.harness import (
    CT,
    FIND,
    MR,
    VERIFICATION,
    WAIT,
    Firewall,
    Pki,
    associate_rq,
    client_context,
    ct_image,
    exchange,
    free_port,
    scu,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "prometheus" / "dicomfw-alerts.yml"
PROMTOOL = "/usr/bin/promtool"


@contextlib.contextmanager
def observed_firewall(directory: Path, rules: str) -> Iterator[tuple[Firewall, Observability]]:
    """A firewall with the metrics and audit its rules ask for, as ``daemon.serve`` wires them
    (minus the signal handlers, which need the main thread). The audit is closed after the
    firewall stopped, so it holds the end of every association."""
    path = directory / "rules.yaml"
    path.write_text(rules)
    observability = Observability(load_config(path))
    firewall = Firewall(path)
    try:
        firewall.start()
        assert firewall.relay is not None
        relay = firewall.relay
        firewall.call(lambda: relay.observers.extend(observability.observers))
        yield firewall, observability
    finally:
        firewall.stop()
        observability.close()


def scrape(port: int) -> Samples:
    """GET /metrics and parse it: (sample name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name and v}


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- the known mix of traffic -------------------------------------------------------------------


def mixed_rules(pki: Pki, pacs_port: int, extra: str = "") -> str:
    """Two listeners (plain ``front``, mutual-TLS ``secure``), a route that allows C-ECHO and
    C-STORE of CT (and lists the Study Root C-FIND SOP class, for a context that passes and a
    request that does not), and a route to an upstream nobody listens on."""
    dead = free_port()
    return f"""\
listeners:
  - {{name: front, bind: "127.0.0.1:0"}}
  - name: secure
    bind: "127.0.0.1:0"
    tls: {{cert: {pki.fw_server.cert}, key: {pki.fw_server.key}, ca: {pki.ca}}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs_port}}}
  dead: {{host: 127.0.0.1, port: {dead}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8]}}
  - {{ae_title: REMOTE, networks: [127.0.0.0/8], certificate: {{san_uri: "urn:dicom:ae:REMOTE"}}}}
routes:
  - listener: front
    called_ae: PACS
    upstream: pacs
    allow:
      - services: [C-ECHO, C-STORE]
        sop_classes: [CTImageStorage, StudyRootQueryRetrieveInformationModelFind]
  - {{listener: front, called_ae: DEAD, upstream: dead, allow: [{{services: [C-ECHO]}}]}}
  - {{listener: secure, called_ae: PACS, upstream: pacs, allow: [{{services: [C-ECHO]}}]}}
limits: {{artim_seconds: 5, idle_seconds: 30, connect_timeout_seconds: 3}}
{extra}"""


@dataclass(frozen=True)
class Mix:
    """What ``drive_mix`` did, for the assertions."""

    associations: int = 8  # connections that end in some event
    released: int = 3


def drive_mix(firewall: Firewall, pki: Pki) -> Mix:
    """Allowed and refused traffic, each kind a known number of times:

    - CT01 -> PACS on front: C-ECHO, two C-STOREs of CT, released;
    - CT01 -> PACS on front proposing CT, MR (refused context) and Study Root FIND: C-ECHO, a
      C-FIND the route refuses, released;
    - REMOTE -> PACS on secure, with its certificate: C-ECHO, released;
    - STRANGER -> PACS: rejected (calling AE unknown); CT01 -> NOT_A_PACS: rejected (called AE);
    - CT01 -> DEAD: rejected (upstream unreachable);
    - a TLS client without a certificate on secure: handshake failure (no_certificate);
    - a malformed A-ASSOCIATE-RQ on front: aborted (requester protocol error).
    """
    front, secure = firewall.port("front"), firewall.port("secure")

    first = scu("CT01", (CT, VERIFICATION)).associate("127.0.0.1", front, ae_title="PACS")
    assert first.is_established
    assert first.send_c_echo().Status == 0
    assert [first.send_c_store(ct_image(seed=n)).Status for n in range(2)] == [0, 0]
    first.release()

    second = scu("CT01", (CT, MR, FIND, VERIFICATION)).associate(
        "127.0.0.1", front, ae_title="PACS"
    )
    assert second.is_established
    assert second.send_c_echo().Status == 0
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    assert [s.Status for s, _ in second.send_c_find(query, FIND)] == [0x0124]
    second.release()

    remote = scu("REMOTE", (VERIFICATION,)).associate(
        "127.0.0.1",
        secure,
        ae_title="PACS",
        tls_args=(client_context(pki, pki.remote), "localhost"),
    )
    assert remote.is_established and remote.send_c_echo().Status == 0
    remote.release()

    assert exchange(front, associate_rq("STRANGER", "PACS"))[0] == 0x03
    assert exchange(front, associate_rq("CT01", "NOT_A_PACS"))[0] == 0x03
    assert exchange(front, associate_rq("CT01", "DEAD"))[0] == 0x03
    with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
        exchange(secure, associate_rq("CT01", "PACS"), tls=client_context(pki, None))
    garbage = bytes((0x01, 0, 0, 0, 0, 8)) + b"\x00\x01not-a-rq"[:8]
    assert exchange(front, garbage)[0] == 0x07  # A-ABORT
    return Mix()


# ---- alert rules, evaluated by promtool -----------------------------------------------------


def alert_fires(
    directory: Path,
    alert: str,
    inputs: dict[str, str],
    labels: dict[str, str],
    at: str,
    quiet_at: str = "2m",
    value: str = "",
) -> None:
    """``promtool test rules`` on the shipped rules: with ``inputs`` (series selector ->
    promtool values, e.g. what a test scraped from a daemon), ``alert`` is silent at
    ``quiet_at`` and fires at ``at`` with ``labels`` (and the rule's own); its annotations
    are the rule's, templated with those labels (and ``$value`` as ``value``)."""
    rule = next(
        r for r in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"] if r["alert"] == alert
    )
    fields = {**labels}

    def templated(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: fields[m.group(1)], text)
        return re.sub(r"\{\{ \$value[^}]*\}\}", value, text)

    tests: dict[str, Any] = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": k, "values": v} for k, v in inputs.items()],
                "alert_rule_test": [
                    {"eval_time": quiet_at, "alertname": alert, "exp_alerts": []},
                    {
                        "eval_time": at,
                        "alertname": alert,
                        "exp_alerts": [
                            {
                                "exp_labels": {**labels, **rule["labels"]},
                                "exp_annotations": {
                                    key: templated(text)
                                    for key, text in rule["annotations"].items()
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = directory / f"{alert}.test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
