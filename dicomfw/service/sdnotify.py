"""systemd's readiness protocol, sd_notify(3), without libsystemd: one datagram per message.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for Linux's abstract
namespace) and waits for ``READY=1`` before it counts the service as started, so units ordered
after dicomfw start only once every listener is bound. ``RELOADING=1`` (with ``MONOTONIC_USEC``,
as systemd ≥ 253 requires) and ``READY=1`` bracket a reload, ``STOPPING=1`` announces the drain,
``STATUS=`` is the line ``systemctl status`` shows, and ``WATCHDOG=1`` must arrive at least every
``WATCHDOG_USEC`` or systemd kills and restarts the service (``WatchdogSec=``).

The watchdog is pinged by a timer on the event loop itself, not by a thread: if the loop is
stuck (a blocking call, a busy loop), the pings stop and systemd restarts the service. Outside
systemd (no ``NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

from dicomfw.logsetup import log_event

log = logging.getLogger("dicomfw.sdnotify")

#: How often STATUS= is refreshed when no watchdog asks for more frequent ticks.
STATUS_INTERVAL_SECONDS: Final = 5.0


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET``; a no-op when it is not set."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_seconds = _watchdog_seconds(env)
        self._status = ""

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *assignments: str) -> None:
        """One message of ``KEY=value`` lines. Failures are logged, never raised: the service
        must keep serving even if systemd went away."""
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError as error:
            log_event(log, logging.WARNING, "sd_notify_failed", error=str(error))

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """MONOTONIC_USEC lets systemd tell this reload's READY=1 from an earlier one."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self, status: str) -> None:
        self._status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """STATUS= only when it changed (``systemctl status`` shows the latest)."""
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def start_heartbeat(self, status: Callable[[], str]) -> Callable[[], None]:
        """Ping the watchdog at half its period (systemd's advice) and refresh STATUS= with
        ``status()``, from timers on the running loop. Returns a function that stops it."""
        if not self.enabled:
            return lambda: None
        loop = asyncio.get_running_loop()
        interval = STATUS_INTERVAL_SECONDS
        if self.watchdog_seconds is not None:
            interval = min(interval, self.watchdog_seconds / 2)
        handle: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal handle
            if self.watchdog_seconds is not None:
                self.watchdog()
            self.status(status())
            handle = loop.call_later(interval, tick)

        tick()

        def stop() -> None:
            if handle is not None:
                handle.cancel()

        return stop

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(value: str) -> str | None:
    """``/run/systemd/notify`` as is; ``@name`` is the abstract socket ``\\0name``."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """WATCHDOG_USEC, if it is meant for this process (WATCHDOG_PID unset or ours)."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000
