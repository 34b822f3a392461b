"""Processes for the benchmark: start, wait until listening, measure from /proc, stop.

Every service runs in its own session (process group) so stopping it also stops what it forked
(``storescp --fork`` children); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger("bench.procs")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK leaves Nagle on otherwise


class BenchError(Exception):
    """Something the benchmark needs did not work; the message says what."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_listening(port: int) -> bool:
    """Whether anything listens on TCP ``port`` (from /proc/net/tcp: no probe connection)."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(wanted) and fields[3] == "0A":
                return True
    return False


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may contain spaces): field 3 onwards."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), from /proc/PID/stat."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_cpu_seconds(pid: int, settle: float = 2.0) -> float:
    """utime + stime of a process plus its reaped children (cutime + cstime): for
    ``storescp --fork``, whose per-association children do the work. Waits (at most ``settle``
    seconds) until no child is left, so a child that just finished is counted."""
    deadline = time.monotonic() + settle
    children = Path(f"/proc/{pid}/task/{pid}/children")
    while children.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.01)
    return sum(int(value) for value in _stat_fields(pid)[11:15]) / CLOCK_TICKS


def reaped_children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have exited and been waited for: the
    clients the benchmark runs (its services are still running, so they are not included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """CPU seconds of one thread, in nanoseconds' precision (its schedstat)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9


def live_threads_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process's live threads, ns-precise: for a daemon whose threads outlive
    the measurement. ``cpu_seconds`` counts 10 ms ticks (±3 % on a 0.3 s run) but includes
    threads that have exited (stunnel's, one per connection)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += thread_cpu_seconds(pid, int(task.name))
    return total


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


@dataclass
class Service:
    """A long-running process (SCP, firewall, stunnel) with its log file."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    _offset: int = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20.0) -> Service:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not is_listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{self.name} did not start listening: see {self.log_path}")
            time.sleep(0.05)
        log.debug("started %s pid=%d port=%d", self.name, self.pid, self.port)
        return self

    def new_log(self) -> str:
        """What the service logged since the previous call."""
        with self.log_path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        return data.decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM the service's process group, then SIGKILL what is left after 10 s."""
        process = self.process
        if process is not None and process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process is not None:
            _signal_group(process.pid, signal.SIGKILL)  # forked children (storescp --fork)
        if self._log is not None:
            self._log.close()
            self._log = None


def service_starter(
    stack: contextlib.ExitStack, workdir: Path
) -> Callable[[str, list[str], int], Service]:
    """``start(name, argv, port)``: a started Service with DCMTK's environment and its log in
    ``workdir``, stopped when ``stack`` closes."""

    def start(name: str, argv: list[str], port: int) -> Service:
        service = Service(name, argv, port, workdir / f"{name}.log", dict(DCMTK_ENV))
        stack.callback(service.stop)
        return service.start()

    return start


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run_timed(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> float:
    """Run a client to completion; return its wall-clock seconds. Non-zero exit is an error."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, timeout=timeout, check=False, start_new_session=True
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"timed out after {timeout}s: {' '.join(argv[:3])} …") from error
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).decode(errors="replace")[-800:]
        raise BenchError(f"{argv[0]} exited {done.returncode}: {tail}")
    return seconds


def paired_rounds(
    daemons: dict[str, Service], run: Callable[[int], float], rounds: int
) -> dict[str, list[tuple[float, float]]]:
    """(wall seconds, daemon CPU seconds) of each round against the daemons ``off`` and ``on``,
    after one warm-up run each; the order alternates from round to round so that neither one
    always runs on the machine the other just warmed."""
    for daemon in daemons.values():
        run(daemon.port)
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for round_number in range(rounds):
        for which in ("off", "on") if round_number % 2 == 0 else ("on", "off"):
            daemon = daemons[which]
            cpu = live_threads_cpu_seconds(daemon.pid)
            seconds = run(daemon.port)
            results[which].append((seconds, live_threads_cpu_seconds(daemon.pid) - cpu))
    return results


def system_busy_seconds() -> float:
    """CPU seconds the whole machine spent in user/nice/system mode since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system = (int(v) for v in fields[1:4])
    return (user + nice + system) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """This process plus its reaped children (every client, SCP and proxy we started)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def busy_fraction(seconds: float = 1.0) -> float:
    """How busy the machine is right now (0..1 of all cores), from a short sample."""
    before = system_busy_seconds() - own_cpu_seconds()
    time.sleep(seconds)
    after = system_busy_seconds() - own_cpu_seconds()
    return max(0.0, after - before) / (seconds * (os.cpu_count() or 1))


@dataclass
class ForeignLoad:
    """CPU used by processes that are not ours while the benchmark ran (noise)."""

    started: float = field(default_factory=time.monotonic)
    busy: float = field(default_factory=system_busy_seconds)
    own: float = field(default_factory=own_cpu_seconds)

    def fraction(self) -> float:
        """Foreign CPU seconds / (wall seconds x cores). Call after every child was reaped."""
        wall = time.monotonic() - self.started
        foreign = (system_busy_seconds() - self.busy) - (own_cpu_seconds() - self.own)
        return max(0.0, foreign) / (wall * (os.cpu_count() or 1))


def _version_text(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).decode(errors="replace")


def _grep(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def machine_info() -> dict[str, str]:
    import uvloop

    cpuinfo = Path("/proc/cpuinfo").read_text()
    dcmtk = _version_text(["/usr/bin/storescu", "--version"])
    stunnel = _version_text(["/usr/bin/stunnel4", "-version"])
    return {
        "nproc": str(os.cpu_count()),
        "cpu": _grep(r"^model name\s*:\s*(.+)$", cpuinfo),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_openssl": ssl.OPENSSL_VERSION,
        "uvloop": str(getattr(uvloop, "__version__", "unknown")),
        "dcmtk": _grep(r"storescu (v\S+ \S+)", dcmtk),
        "dcmtk_openssl": _grep(r"^- (OpenSSL.*)$", dcmtk),
        "stunnel": _grep(r"^(stunnel \S+)", stunnel),
        "stunnel_openssl": _grep(r"^Running\s+with (OpenSSL.*)$", stunnel),
    }
