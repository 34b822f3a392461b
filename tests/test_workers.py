"""`workers: 2`: connections spread over both workers, a killed worker is replaced while the other
one's associations go on, SIGHUP reaches every worker (after the supervisor validated the file),
SIGTERM drains them all, limits count per worker, and only the supervisor speaks to systemd.

Real processes on loopback. Which worker serves a connection is read from /proc: the process
that holds the accepted socket (the audit file says it too, in each record's ``pid``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.corehelpers import (
    c_echo_rq,
    command_pdv,
    decoded_command,
    p_data,
    pdvs_of,
    release_rp,
    release_rq,
)
from tests.harness import WAIT, Pki, associate_rq, daemon_rules, free_port, running_scp
from tests.obs_harness import scrape, value, wait_until
from tests.opshelpers import (
    A_ASSOCIATE_AC,
    LOCAL_LIMIT_RJ,
    NotifySocket,
    installed_dicomfw,
    notify_socket,
)


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    audit: Path
    rules: Path

    def workers(self) -> list[int]:
        """The supervisor's child processes, from /proc."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def serving(self, client_port: int) -> int:
        """The worker holding the accepted end of the connection from ``client_port``."""
        local, remote = f"0100007F:{self.port:04X}", f"0100007F:{client_port:04X}"
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            inodes = {
                f"socket:[{fields[9]}]"
                for fields in (line.split() for line in _tcp_table())
                if fields[1] == local and fields[2] == remote
            }
            for pid in self.workers():
                with contextlib.suppress(OSError):
                    if inodes & {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}:
                        return pid
            time.sleep(0.02)
        raise AssertionError(f"no worker holds the connection from port {client_port}")

    def log(self) -> str:
        assert self.process.stderr is not None
        return self.process.stderr.read().decode()


def _tcp_table() -> list[str]:
    return Path("/proc/net/tcp").read_text().splitlines()[1:]


def two_worker_rules(
    tmp_path: Path, pki: Pki, upstream_port: int, limits: str = "", audit: str = ""
) -> tuple[Path, int, int, Path]:
    """(rules file, listener port, metrics port, audit file) of a ``workers: 2`` daemon."""
    port, metrics_port, audit_file = free_port(), free_port(), tmp_path / "audit.jsonl"
    path = daemon_rules(
        tmp_path,
        pki,
        upstream_port,
        port,
        upstream_tls=False,
        limits=f"{{artim_seconds: 5, idle_seconds: 60, drain_seconds: 20{limits}}}",
    )
    with path.open("a") as rules_file:
        rules_file.write(
            f'metrics: {{bind: "127.0.0.1:{metrics_port}"}}\n'
            f"audit: {{file: {audit or audit_file}}}\nworkers: 2\n"
        )
    return path, port, metrics_port, audit_file


@contextlib.contextmanager
def running_daemon(
    tmp_path: Path, pki: Pki, upstream_port: int, env: dict[str, str], limits: str = ""
) -> Iterator[Daemon]:
    path, port, metrics_port, audit = two_worker_rules(tmp_path, pki, upstream_port, limits)
    process = subprocess.Popen(
        [installed_dicomfw(), "run", "--config", str(path)],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
    )
    try:
        yield Daemon(process, port, metrics_port, audit, path)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)


def _notify() -> dict[str, str]:
    return {"NOTIFY_SOCKET": f"@dicomfw-test-{uuid.uuid4().hex}"}


class Association:
    """A raw association for C-ECHO (context 1), so that the end of the connection is seen
    the moment it happens (pynetdicom notices only at its network timeout)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), WAIT)
        self.sock.settimeout(WAIT)
        self.sock.sendall(associate_rq("CT01", "PACS"))
        self.answer = self.pdu()
        self.port = self.sock.getsockname()[1]

    def pdu(self) -> bytes:
        header = self.sock.recv(6, socket.MSG_WAITALL)
        if len(header) < 6:
            return b""
        return header + self.sock.recv(int.from_bytes(header[2:], "big"), socket.MSG_WAITALL)

    def echo(self) -> int:
        self.sock.sendall(p_data(command_pdv(1, c_echo_rq(7))))
        [(_, _, command)] = pdvs_of(self.pdu())
        return int(decoded_command(command).Status)

    def release(self) -> None:
        self.sock.sendall(release_rq())
        assert self.pdu() == release_rp()
        self.sock.close()

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def one_on_each_worker(daemon: Daemon) -> dict[int, Association]:
    """Open associations until each worker holds one (released ones reach the audit)."""
    held: dict[int, Association] = {}
    for _ in range(40):
        association = Association(daemon.port)
        assert association.answer[0] == A_ASSOCIATE_AC
        pid = daemon.serving(association.port)
        if pid in held:
            assert association.echo() == 0x0000
            association.release()
        else:
            held[pid] = association
        if len(held) == 2:
            return held
    raise AssertionError(f"40 associations, all on {set(held)}")


def _audit_pids(audit: Path, event: str) -> set[int]:
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    return {record["pid"] for record in records if record["event"] == event}


def test_associations_spread_and_a_killed_worker_is_replaced_while_the_other_serves_on(
    tmp_path: Path, pki: Pki
) -> None:
    env = _notify()
    with (
        running_scp() as pacs,
        notify_socket(env["NOTIFY_SOCKET"]) as systemd,
        running_daemon(tmp_path, pki, pacs.port, env) as daemon,
    ):
        systemd.wait_for("READY")
        first = daemon.workers()
        assert len(first) == 2
        held = one_on_each_worker(daemon)
        assert set(held) == set(first)
        victim, survivor = first
        wait_until(
            lambda: value(scrape(daemon.metrics_port), "dicomfw_active_associations") == 2,
            "both open associations in the summed gauge",
        )

        os.kill(victim, signal.SIGKILL)
        assert held[victim].closed_by_peer()  # the connection went, without a release
        # The other worker's association is untouched: it still relays and releases.
        assert held[survivor].echo() == 0x0000
        # The dead worker's open association left the sum (mark_process_dead).
        assert value(scrape(daemon.metrics_port), "dicomfw_active_associations") == 1
        held[survivor].release()

        wait_until(lambda: len(set(daemon.workers()) - {survivor}) == 1, "a replacement worker")
        [replacement] = set(daemon.workers()) - {survivor}
        assert replacement != victim
        for _ in range(40):  # the replacement accepts connections
            association = Association(daemon.port)
            serving = daemon.serving(association.port)
            assert association.echo() == 0x0000
            association.release()
            if serving == replacement:
                break
        else:
            raise AssertionError("the replacement worker never served a connection")
        assert value(scrape(daemon.metrics_port), "dicomfw_worker_restarts_total") == 1

        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(WAIT) == 0
        log = daemon.log()
    assert systemd.senders == {daemon.process.pid}
    assert re.search(rf'event=worker_died worker=\d pid={victim} how="killed by SIGKILL"', log)
    # (The victim's own records may not have made it: a writer thread flushes every 50 ms.)
    assert {survivor, replacement} <= _audit_pids(daemon.audit, "association")
    assert pacs.requests.count("C-ECHO") >= 2


def _ready_after(systemd: NotifySocket, event: str) -> dict[str, str]:
    systemd.wait_for(event)
    return systemd.wait_for("READY")


def test_only_the_supervisor_notifies_reload_reaches_every_worker_and_sigterm_drains_all(
    tmp_path: Path, pki: Pki
) -> None:
    env = {**_notify(), "WATCHDOG_USEC": "400000"}
    with (
        running_scp() as pacs,
        notify_socket(env["NOTIFY_SOCKET"]) as systemd,
        running_daemon(tmp_path, pki, pacs.port, env) as daemon,
    ):
        ready = systemd.wait_for("READY")
        assert ready["STATUS"] == "serving: 2 workers, 0 associations, 0 connecting"
        workers = daemon.workers()
        started = time.monotonic()
        pings = 0
        while time.monotonic() - started < 1.0:
            pings += "WATCHDOG" in systemd.next()
        assert pings >= 3  # every 0.2 s while both workers report in

        daemon.process.send_signal(signal.SIGHUP)
        assert _ready_after(systemd, "RELOADING")["STATUS"].startswith("serving: 2 workers")
        metrics = scrape(daemon.metrics_port)
        assert value(metrics, "dicomfw_rule_reloads_total", result="success") == 1  # not 2

        good = daemon.rules.read_text()
        daemon.rules.write_text("listeners: [oops\n")
        daemon.process.send_signal(signal.SIGHUP)
        failed = _ready_after(systemd, "RELOADING")
        assert failed["STATUS"].startswith("serving the old rules (reload failed)")
        metrics = scrape(daemon.metrics_port)
        assert value(metrics, "dicomfw_rule_reloads_total", result="failure") == 1
        assert value(metrics, "dicomfw_rules_last_reload_successful") == 0
        daemon.rules.write_text(good)

        held = one_on_each_worker(daemon)  # an open association on each worker
        daemon.process.send_signal(signal.SIGTERM)
        assert systemd.wait_for("STOPPING")["STATUS"].startswith("draining: 2 workers")
        assert not _connects(daemon.port)  # the ports closed: newcomers are refused
        for association in held.values():  # both finish their work during the drain
            assert association.echo() == 0x0000
            association.release()
        assert daemon.process.wait(WAIT) == 0
        log = daemon.log()
    assert systemd.senders == {daemon.process.pid}  # never a worker
    readies = [m for m in systemd.messages if "READY" in m]
    first_reload = next(i for i, m in enumerate(systemd.messages) if "RELOADING" in m)
    assert sum("READY" in m for m in systemd.messages[:first_reload]) == 1
    assert len(readies) == 3  # start, the reload, the refused reload
    reloaded = {int(pid) for pid in re.findall(r"pid=(\d+) event=reloaded", log)}
    assert reloaded == set(workers)  # each worker reloaded once; the broken file reached none
    assert log.count("event=reload_failed") == 1 and "worker=" not in _line(log, "reload_failed")
    worker_ready = [m.end() for m in re.finditer(r"worker=\d pid=\d+ event=ready", log)]
    supervisor_ready = log.index(f"level=info instance={socket.gethostname()} event=ready")
    assert len(worker_ready) == 2 and max(worker_ready) < supervisor_ready
    assert sorted(map(int, re.findall(r"pid=(\d+) event=stopped", log))) == sorted(workers)
    assert _audit_pids(daemon.audit, "association") == set(workers)


def _line(log: str, event: str) -> str:
    return next(line for line in log.splitlines() if f"event={event}" in line)


def test_limits_count_per_worker(tmp_path: Path, pki: Pki) -> None:
    """``max_concurrent_total: 1`` with two workers: one association on each at once, and a
    third is refused by whichever worker gets it (README: limits hold per process)."""
    with (
        running_scp() as pacs,
        running_daemon(tmp_path, pki, pacs.port, {}, ", max_concurrent_total: 1") as daemon,
    ):
        wait_until(lambda: _connects(daemon.port), "the listener")
        held: dict[int, Association] = {}
        for _ in range(40):
            association = Association(daemon.port)
            if association.answer[0] == A_ASSOCIATE_AC:
                pid = daemon.serving(association.port)
                assert pid not in held, "a worker took a second association over its cap"
                held[pid] = association
                if len(held) == 2:
                    break
            else:  # the worker that already has one
                assert association.answer == LOCAL_LIMIT_RJ
                association.sock.close()
        assert set(held) == set(daemon.workers())
        third = Association(daemon.port)
        assert third.answer == LOCAL_LIMIT_RJ  # both workers are at their cap
        third.sock.close()
        for association in held.values():
            association.release()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(WAIT) == 0


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return False
    return True


def test_the_service_does_not_start_when_a_worker_cannot(tmp_path: Path, pki: Pki) -> None:
    """A worker that fails at start (here: its audit file cannot be opened for appending, which
    the rules-file check cannot see) stops the others: exit 1, nothing left running."""
    path, *_ = two_worker_rules(tmp_path, pki, free_port(), audit="/proc/version")
    failing = subprocess.run(
        [installed_dicomfw(), "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert failing.returncode == 1
    assert 'event=worker_failed error="cannot start: [Errno 22] Invalid argument' in failing.stderr
    assert "event=worker_failed_to_start" in failing.stderr
    assert "event=stopped status=1" in failing.stderr
