"""/ready and /live on the metrics port: what each state of the instance answers, over HTTP."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from dicomfw.config.model import MetricsEndpoint
from dicomfw.observe.health import Health
from dicomfw.observe.metrics import MetricsServer
from tests.harness import WAIT


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    server = MetricsServer(MetricsEndpoint("127.0.0.1", 0), CollectorRegistry())
    try:
        yield server
    finally:
        server.close()


def get(server: MetricsServer, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_ready_says_why_not_until_started_then_while_a_condition_fails_and_once_draining(
    server: MetricsServer,
) -> None:
    store_up = True
    health = server.health
    health.require("the shared limit store does not answer", lambda: store_up)
    assert get(server, "/ready") == (503, "starting\n")
    health.started()
    assert get(server, "/ready") == (200, "ok\n")
    store_up = False
    assert get(server, "/ready") == (503, "the shared limit store does not answer\n")
    store_up = True
    health.draining()
    assert get(server, "/ready") == (503, "draining\n")
    assert get(server, "/live") == (200, "ok\n")  # draining is no reason to restart it
    status, body = get(server, "/metrics")
    assert status == 200 and "# HELP" not in body  # the empty registry, still served


def test_live_fails_only_when_the_loop_stops_beating() -> None:
    health = Health(stall_seconds=0.05)
    health.require("down", lambda: False)  # a dependency down does not make it unlive
    assert health.not_live() is None
    time.sleep(0.1)
    assert health.not_live() is not None and "has not run" in (health.not_live() or "")
    health.beat()
    assert health.not_live() is None
