"""``/ready`` and ``/live`` beside ``/metrics``: what a load balancer and an orchestrator ask.

``/ready`` answers 200 while this instance should get new associations, and 503 (with the
reason as text) before it has started, as soon as it begins to drain, and while a readiness
condition fails (the shared limit store is down under ``fail: closed``): a balancer polling it
stops sending before the listeners close, so a rolling restart refuses no one. ``/live``
answers 503 only when the process's loop has not reported in for ``stall_seconds`` (it is
stuck, and restarting it is the cure); a dependency that is down never makes it fail, or an
orchestrator would restart every instance at once for a Redis outage.

The answers are computed on the HTTP server's thread from a few attributes the event loop sets:
no lock, nothing waits for the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Final
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

#: A loop that has not reported for this long is stuck (the supervisor's limit for a worker).
STALL_SECONDS: Final = 10.0


class Health:
    """What ``/ready`` and ``/live`` say; the daemon (or the supervisor) keeps it current."""

    def __init__(self, stall_seconds: float = STALL_SECONDS) -> None:
        self._stall_seconds = stall_seconds
        self._started = False
        self._draining = False
        self._conditions: list[tuple[str, Callable[[], bool]]] = []
        self._last_beat = time.monotonic()

    def started(self) -> None:
        """Every listener accepts."""
        self._started = True

    def draining(self) -> None:
        """From now on, for good: new associations should go elsewhere."""
        self._draining = True

    def require(self, reason: str, condition: Callable[[], bool]) -> None:
        """Ready only while ``condition()`` holds; ``reason`` says what is wrong otherwise."""
        self._conditions.append((reason, condition))

    def beat(self) -> None:
        """The loop is running (called from a timer on it)."""
        self._last_beat = time.monotonic()

    def beat_on(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Beat every second from a timer on ``loop``; returns a function that stops it."""
        handle: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal handle
            self.beat()
            handle = loop.call_later(1.0, tick)

        tick()
        return lambda: handle.cancel() if handle is not None else None

    def not_ready(self) -> str | None:
        """Why this instance should get no new association now, or None."""
        if self._draining:
            return "draining"
        if not self._started:
            return "starting"
        return next((reason for reason, holds in self._conditions if not holds()), None)

    def not_live(self) -> str | None:
        silent = time.monotonic() - self._last_beat
        if silent > self._stall_seconds:
            return f"the event loop has not run for {silent:.0f} s"
        return None


def with_health(app: WSGIApplication, health: Health) -> WSGIApplication:
    """``app`` (the metrics) with ``/ready`` and ``/live`` answered from ``health``."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path not in ("/ready", "/live"):
            return app(environ, start_response)
        problem = health.not_ready() if path == "/ready" else health.not_live()
        body = f"{problem or 'ok'}\n".encode()
        status = "200 OK" if problem is None else "503 Service Unavailable"
        start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return serve
