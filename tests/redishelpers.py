"""A real redis-server (Debian's) for the shared-limits tests: on a free loopback port, in a
temporary directory, persisting nothing, stopped and started again on the same port when a
test takes Redis away mid-run."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.harness import WAIT, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
needs_redis = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(), reason="redis-server is not installed (Debian redis-server)"
)


class RedisServer:
    """One redis-server process; ``stop`` and ``start`` keep its port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + WAIT
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Gone at once, as a crash or a network cut would leave it (no save, no goodbye)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(WAIT)
            self.process = None

    def client(self) -> redis.Redis:
        """A client of its own, for a test to look inside, flush, or wait for."""
        return redis.Redis.from_url(self.url, socket_timeout=WAIT)

    def _answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
