"""A real redis-server (Debian's) for the shared-limits tests: on a free loopback port, in a
temporary directory, persisting nothing, stopped and started again on the same port when a
test takes Redis away mid-run."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from dicomfw.pki.certs import CertPaths
from tests.harness import WAIT, free_port, written

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
needs_redis = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(), reason="redis-server is not installed (Debian redis-server)"
)


@dataclass(frozen=True)
class ServerTls:
    """TLS only, with client certificates from ``ca`` required (``--tls-auth-clients yes``);
    ``client`` is the certificate the test's own client presents."""

    cert: CertPaths
    ca: Path
    client: CertPaths


class RedisServer:
    """One redis-server process; ``stop`` and ``start`` keep its port."""

    def __init__(self, directory: Path, tls: ServerTls | None = None) -> None:
        self.directory = directory
        self.port = free_port()
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        port = ["--port", str(self.port)]
        if self.tls is not None:
            tls = self.tls
            port = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "yes",
                    "--tls-cert-file", str(tls.cert.cert), "--tls-key-file", str(tls.cert.key),
                    "--tls-ca-cert-file", str(tls.ca)]  # fmt: skip
        log = self.directory / "redis-server.log"  # its log (stdout) and any error
        with log.open("w+b") as output:
            self.process = subprocess.Popen(
                [REDIS_SERVER, *port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.directory)],
                stdout=output,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            deadline = time.monotonic() + WAIT
            while not self._answers():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start: {written(output)}")
                time.sleep(0.02)

    def stop(self) -> None:
        """Gone at once, as a crash or a network cut would leave it (no save, no goodbye)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(WAIT)
            self.process = None

    def client(self) -> redis.Redis:
        """A client of its own, for a test to look inside, flush, or wait for."""
        if self.tls is None:
            return redis.Redis.from_url(self.url, socket_timeout=WAIT)
        return redis.Redis.from_url(
            self.url,
            socket_timeout=WAIT,
            ssl_ca_certs=str(self.tls.ca),
            ssl_certfile=str(self.tls.client.cert),
            ssl_keyfile=str(self.tls.client.key),
        )

    def _answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False


@contextlib.contextmanager
def running_redis(directory: Path, tls: ServerTls | None = None) -> Iterator[RedisServer]:
    server = RedisServer(directory, tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
