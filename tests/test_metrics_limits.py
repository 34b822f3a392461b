"""Capacity: the limits the rules file sets are gauges (``dicomfw_limit``,
``dicomfw_request_limit``), each cap next to what it is compared with now
(``dicomfw_limit_usage``); they follow a reload; and the alert at 80 % of max_concurrent_total
fires on what a daemon holding that many associations exports. Run against ``dicomfw run``."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.harness import WAIT, associate_rq, free_port, running_scp
from tests.obs_harness import Samples, alert_fires, scrape, wait_until
from tests.opshelpers import installed_dicomfw


def _rules(pacs: int, port: int, metrics_port: int, limits: str, peer: str, listener: str) -> str:
    return f"""\
listeners:
  - {{name: front, bind: "127.0.0.1:{port}"{f", limits: {listener}" if listener else ""}}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8], limits: {peer}}}
  - {{ae_title: WS1, networks: [127.0.0.0/8]}}
routes:
  - {{listener: front, called_ae: PACS, upstream: pacs, allow: [{{services: [C-ECHO]}}]}}
limits: {limits}
metrics: {{bind: "127.0.0.1:{metrics_port}"}}
"""


FIRST = {
    "limits": "{max_concurrent_total: 5, max_concurrent_per_ip: 8, max_pending_per_ip: 3,"
    " associations_per_minute_per_peer: 600, requests_per_minute_per_peer: {C-FIND: 30}}",
    "listener": "{max_concurrent_per_ip: 6}",
    "peer": "{max_concurrent_per_peer: 4, requests_per_minute_per_association: {C-ECHO: 120}}",
}
SECOND = {  # the total raised, the listener's override gone, a per-IP rate added
    "limits": "{max_concurrent_total: 50, max_concurrent_per_ip: 8, max_pending_per_ip: 3,"
    " associations_per_minute_per_ip: 120, requests_per_minute_per_peer: {C-FIND: 30}}",
    "listener": "",
    "peer": "{max_concurrent_per_peer: 4}",
}


def _gauges(samples: Samples, name: str) -> dict[tuple[str, ...], float]:
    """(label values, sorted by label name) -> value, for every series of ``name``."""
    return {
        tuple(value for _, value in sorted(labels)): v
        for (n, labels), v in samples.items()
        if n == name
    }


@contextlib.contextmanager
def _held_open(port: int, count: int) -> Iterator[None]:
    """``count`` associations of CT01 held open (A-ASSOCIATE-AC received, nothing more)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), WAIT)
            sockets.append(sock)
            sock.settimeout(WAIT)
            sock.sendall(associate_rq("CT01", "PACS"))
            assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
        yield
    finally:
        for sock in sockets:
            sock.close()


def test_the_limits_are_gauges_as_the_rules_file_sets_them_with_their_use_and_follow_a_reload(
    tmp_path: Path,
) -> None:
    port, metrics_port = free_port(), free_port()
    rules, log = tmp_path / "rules.yaml", tmp_path / "daemon.log"
    with running_scp() as pacs:
        rules.write_text(_rules(pacs.port, port, metrics_port, **FIRST))
        with log.open("wb") as output:
            daemon = subprocess.Popen(
                [installed_dicomfw(), "run", "--config", str(rules)], stderr=output
            )
        try:
            wait_until(lambda: "event=ready" in log.read_text(), "the daemon to be ready")
            fresh = scrape(metrics_port)
            with _held_open(port, 4):
                wait_until(
                    lambda: (
                        _gauges(scrape(metrics_port), "dicomfw_limit_usage")[
                            ("max_concurrent_total", "global")
                        ]
                        == 4
                    ),
                    "the four open associations to be sampled",
                )
                busy = scrape(metrics_port)
            rules.write_text(_rules(pacs.port, port, metrics_port, **SECOND))
            daemon.send_signal(signal.SIGHUP)
            wait_until(lambda: log.read_text().count("event=reloaded") == 1, "the reload")
            reloaded = scrape(metrics_port)
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(WAIT) == 0

    # (kind, scope): exactly what the rules file says, where it says it
    assert _gauges(fresh, "dicomfw_limit") == {
        ("max_concurrent_total", "global"): 5,
        ("max_concurrent_per_ip", "global"): 8,
        ("max_pending_per_ip", "global"): 3,
        ("associations_per_minute_per_peer", "global"): 600,
        ("max_concurrent_per_ip", "listener:front"): 6,
        ("max_concurrent_per_peer", "peer:CT01"): 4,
    }
    # (kind, scope, service)
    assert _gauges(fresh, "dicomfw_request_limit") == {
        ("requests_per_minute_per_peer", "global", "C-FIND"): 30,
        ("requests_per_minute_per_association", "peer:CT01", "C-ECHO"): 120,
    }
    caps = {
        ("max_concurrent_total", "global"),
        ("max_concurrent_per_ip", "global"),
        ("max_pending_per_ip", "global"),
        ("max_concurrent_per_ip", "listener:front"),
        ("max_concurrent_per_peer", "peer:CT01"),
    }
    assert _gauges(fresh, "dicomfw_limit_usage") == dict.fromkeys(caps, 0)
    # four associations of CT01 from one address, all open at once
    assert _gauges(busy, "dicomfw_limit_usage") == {
        ("max_concurrent_total", "global"): 4,
        ("max_concurrent_per_ip", "global"): 4,
        ("max_pending_per_ip", "global"): 0,
        ("max_concurrent_per_ip", "listener:front"): 4,
        ("max_concurrent_per_peer", "peer:CT01"): 4,
    }
    assert _gauges(reloaded, "dicomfw_limit") == {
        ("max_concurrent_total", "global"): 50,
        ("max_concurrent_per_ip", "global"): 8,
        ("max_pending_per_ip", "global"): 3,
        ("associations_per_minute_per_ip", "global"): 120,
        ("max_concurrent_per_peer", "peer:CT01"): 4,
    }
    assert _gauges(reloaded, "dicomfw_request_limit") == {
        ("requests_per_minute_per_peer", "global", "C-FIND"): 30,
    }
    assert set(_gauges(reloaded, "dicomfw_limit_usage")) == caps - {
        ("max_concurrent_per_ip", "listener:front")
    }

    # What the busy daemon exported, as Prometheus would have scraped it for a while: 4 of 5
    # is 80 %, and the alert fires once it has lasted 5 minutes.
    cap = _gauges(busy, "dicomfw_limit")[("max_concurrent_total", "global")]
    used = _gauges(busy, "dicomfw_limit_usage")[("max_concurrent_total", "global")]
    labels = '{instance="fw1",job="dicomfw",kind="max_concurrent_total",scope="global"}'
    alert_fires(
        tmp_path,
        "DicomfwAssociationsNearCap",
        {
            f"dicomfw_limit{labels}": f"{cap:g}x20",
            f"dicomfw_limit_usage{labels}": f"1x5 {used:g}x15",
        },
        {"instance": "fw1", "job": "dicomfw", "kind": "max_concurrent_total", "scope": "global"},
        at="12m",
        quiet_at="8m",  # 80 % since 5m: not for 5 minutes yet
        value="80%",
    )
