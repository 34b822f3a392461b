"""dicomfw instances as processes for the scale-out tests: their rules (one Redis for the limits,
a listener behind HAProxy), what their /ready and /metrics say, and what a test does to them
(kill -9, SIGTERM); and HAProxy configured from the repository's own example,
``deploy/haproxy/haproxy.cfg``, with only addresses and check timings changed."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness import WAIT, free_port, running_process
from tests.obs_harness import scrape
from tests.opshelpers import installed_dicomfw

REPO = Path(__file__).resolve().parent.parent
HAPROXY = Path("/usr/sbin/haproxy")
HAPROXY_EXAMPLE = REPO / "deploy" / "haproxy" / "haproxy.cfg"
LEASE_SECONDS = 3

RULES = """\
instance: {name}
listeners:
  - {{name: modalities, bind: "127.0.0.1:{port}"{proxy}}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8], limits: {{max_concurrent_per_peer: 4}}}}
  - ae_title: FINDER
    networks: [127.0.0.0/8]
    limits: {{requests_per_minute_per_peer: {{C-FIND: 4}}, request_limit_action: refuse}}
  - {{ae_title: RATED, networks: [127.0.0.0/8]}}
routes:
  - listener: modalities
    called_ae: PACS
    upstream: pacs
    allow:
      - {{services: [C-ECHO, C-FIND], sop_classes: [StudyRootQueryRetrieveInformationModelFind]}}
limits:
  artim_seconds: 5
  idle_seconds: 60
  drain_seconds: 5
  drain_notice_seconds: {notice}
  associations_per_minute_per_ip: 4
  store: redis
  redis: {{url: "{redis}", timeout_ms: 200, lease_seconds: {lease}, fail: {fail}}}
metrics: {{bind: "127.0.0.1:{metrics}"}}
"""
PROXIED = ", proxy_protocol: true, proxy_from: [127.0.0.1/32]"


@dataclass
class Instance:
    """One ``dicomfw run`` process with its listener, metrics port and log."""

    name: str
    rules: Path
    port: int
    metrics_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Instance:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [installed_dicomfw(), "run", "--config", str(self.rules)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_until(lambda: "event=ready" in self.log_text()[offset:], f"{self.name} ready")
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9: no drain, no release, nothing written."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(WAIT)

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)

    def status(self, path: str) -> int | None:
        """The HTTP status of ``path`` on the metrics port (None: nothing answers)."""
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=WAIT) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def metric(self, sample: str, /, **labels: str) -> float:
        """The sum of the series of ``sample`` with these labels (0: none yet)."""
        wanted = set(labels.items())
        return sum(
            value
            for (name, found), value in scrape(self.metrics_port).items()
            if name == sample and wanted <= found
        )

    def refused(self, reason: str) -> float:
        return self.metric("dicomfw_refusals_total", stage="association", reason=reason)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def make_instance(
    directory: Path,
    name: str,
    pacs_port: int,
    redis_url: str,
    fail: str = "open",
    proxied: bool = True,
    notice: float = 1,
    extra: str = "",
) -> Instance:
    """An instance's rules (``extra`` appended), not started yet."""
    port, metrics_port = free_port(), free_port()
    rules = directory / f"{name}.yaml"
    rules.write_text(
        RULES.format(
            name=name,
            port=port,
            proxy=PROXIED if proxied else "",
            pacs=pacs_port,
            redis=redis_url,
            lease=LEASE_SECONDS,
            fail=fail,
            notice=notice,
            metrics=metrics_port,
        )
        + extra
    )
    return Instance(name, rules, port, metrics_port, directory / f"{name}.log")


def haproxy_config(port: int, instances: Sequence[Instance]) -> str:
    """The example with the test's addresses, round robin (so the test knows the order), and
    health checks every 100 ms instead of 2 s; everything else as shipped."""
    text = HAPROXY_EXAMPLE.read_text()
    for old, new in (
        ("bind :104", f"bind 127.0.0.1:{port}"),
        ("balance leastconn", "balance roundrobin"),
        ("inter 2s fall 2 rise 2", "inter 100ms fall 1 rise 1"),
    ):
        assert old in text, f"{old!r} is no longer in {HAPROXY_EXAMPLE}"
        text = text.replace(old, new)
    text = re.sub(r"(?m)^    server .*\n", "", text)
    servers = [f"    server {i.name} 127.0.0.1:{i.port} port {i.metrics_port}\n" for i in instances]
    return text + "".join(servers)


@contextlib.contextmanager
def running_haproxy(directory: Path, instances: Sequence[Instance]) -> Iterator[int]:
    port = free_port()
    config = directory / "haproxy.cfg"
    config.write_text(haproxy_config(port, instances))
    with running_process(HAPROXY, "-f", config, "-db", ready_port=port):
        yield port


def wait_until(condition: Callable[[], bool], what: str, seconds: float = WAIT) -> float:
    """Poll until ``condition()``; returns how long it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started
