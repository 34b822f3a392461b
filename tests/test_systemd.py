"""systemd: the shipped unit passes `systemd-analyze verify` and stays at exposure <= 2.0, the
daemon speaks sd_notify to a socket the test owns, and the unit's own ExecStart line runs it.

There is no running systemd here, so the test plays its part: it binds the NOTIFY_SOCKET,
sets WATCHDOG_USEC, sends the signals systemctl would, and reads what the daemon announces.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from dicomfw.pki import certs
from dicomfw.service.sdnotify import Notifier
from tests.harness import (
    WAIT,
    Pki,
    daemon_rules,
    dcmtk,
    free_port,
    running_scp,
    server_context,
)
from tests.opshelpers import installed_dicomfw, notify_socket

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "dicomfw.service"
CRL_UNIT = REPO / "systemd" / "dicomfw-crl.service"
CRL_TIMER = REPO / "systemd" / "dicomfw-crl.timer"
SHIPPED_CA_DIR = "/root/dicomfw-ca"
SHIPPED_CRL = "/etc/dicomfw/certs/ca.crl"
SHIPPED_BINARY = "/opt/dicomfw/bin/dicomfw"
SHIPPED_RULES = "/etc/dicomfw/rules.yaml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def unit_setting(key: str, unit: Path = UNIT) -> str:
    [value] = re.findall(rf"^{key}=(.*)$", unit.read_text(), flags=re.MULTILINE)
    return value


# ---- the unit file ------------------------------------------------------------------------------


@needs_systemd_analyze
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    # As shipped, only the binary's absence on this machine may be reported ...
    shipped = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    problems = (shipped.stdout + shipped.stderr).strip().splitlines()
    if not Path(SHIPPED_BINARY).exists():
        assert problems == [
            f"dicomfw.service: Command {SHIPPED_BINARY} is not executable: "
            "No such file or directory"
        ]
    else:
        assert shipped.returncode == 0 and problems == []
    # ... and with ExecStart pointing at the dicomfw installed here, nothing at all.
    copy = tmp_path / "dicomfw.service"
    copy.write_text(UNIT.read_text().replace(SHIPPED_BINARY, installed_dicomfw()))
    verified = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0, verified.stderr
    assert (verified.stdout + verified.stderr).strip() == ""


@needs_systemd_analyze
def test_the_units_sandbox_rates_an_exposure_of_at_most_2() -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for dicomfw\.service: (\d+\.\d+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0, result.stdout


@needs_systemd_analyze
def test_the_crl_timer_and_its_service_pass_systemd_analyze(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    for unit in (CRL_UNIT, CRL_TIMER):
        text = unit.read_text().replace(SHIPPED_BINARY, installed_dicomfw())
        (tmp_path / unit.name).write_text(text)
    units = [str(tmp_path / unit.name) for unit in (CRL_UNIT, CRL_TIMER)]
    verified = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *units], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0, verified.stderr
    assert (verified.stdout + verified.stderr).strip() == ""
    security = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", units[0]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(
        r"Overall exposure level for dicomfw-crl\.service: (\d+\.\d+)", security.stdout
    )
    assert found is not None, security.stdout + security.stderr
    assert float(found.group(1)) <= 2.0, security.stdout


def test_the_crl_units_renew_the_crl_daily_and_reload_the_daemon(tmp_path: Path) -> None:
    """The service's own ExecStart line, pointed at a CA here, renews the CRL with what it
    lists; then the running daemon is asked to reload; the timer runs it daily."""
    ca_dir, crl = tmp_path / "ca", tmp_path / "ca.crl"
    certs.init_ca(ca_dir)
    lost = certs.issue(ca_dir, "lost", "client", tmp_path)
    certs.revoke(ca_dir, lost.cert, crl, days=2)
    before = x509.load_pem_x509_crl(crl.read_bytes())
    exec_start = unit_setting("ExecStart", CRL_UNIT)
    assert SHIPPED_CA_DIR in exec_start and SHIPPED_CRL in exec_start
    command = shlex.split(
        exec_start.replace(SHIPPED_BINARY, installed_dicomfw())
        .replace(SHIPPED_CA_DIR, str(ca_dir))
        .replace(SHIPPED_CRL, str(crl))
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    after = x509.load_pem_x509_crl(crl.read_bytes())
    assert [e.serial_number for e in after] == [lost_serial(lost.cert)]
    assert after.next_update_utc is not None and before.next_update_utc is not None
    assert (after.next_update_utc - before.next_update_utc).days == 28  # 30 days, not 2
    assert unit_setting("ExecStartPost", CRL_UNIT) == (
        "+/bin/systemctl try-reload-or-restart dicomfw.service"
    )
    assert unit_setting("OnCalendar", CRL_TIMER) == "daily"
    assert unit_setting("Persistent", CRL_TIMER) == "true"


def lost_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_the_unit_binds_port_104_with_one_capability_as_an_unprivileged_user() -> None:
    assert unit_setting("Type") == "notify"
    assert unit_setting("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit_setting("Restart") == "on-failure"
    assert unit_setting("User") == "dicomfw"
    assert unit_setting("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert unit_setting("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert unit_setting("WatchdogSec")


# ---- sd_notify -----------------------------------------------------------------------------------


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return False
    return True


def test_the_notifier_speaks_to_an_abstract_socket_and_ignores_a_foreign_watchdog() -> None:
    address = f"@dicomfw-test-{uuid.uuid4().hex}"
    with notify_socket(address) as systemd:
        notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
        notifier.ready("serving")
        notifier.status("serving")  # unchanged: not sent again
        notifier.stopping("draining")
        assert systemd.next() == {"READY": "1", "STATUS": "serving"}
        assert systemd.next() == {"STOPPING": "1", "STATUS": "draining"}
        notifier.close()
    assert notifier.watchdog_seconds == 2.0
    foreign = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
    assert Notifier(foreign).watchdog_seconds is None
    assert not Notifier({}).enabled


def test_the_daemon_announces_ready_reload_watchdog_and_stopping(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    address = f"@dicomfw-test-{uuid.uuid4().hex}"
    with running_scp() as pacs, notify_socket(address) as systemd:
        config = daemon_rules(tmp_path, pki, pacs.port, port, upstream_tls=False)
        daemon = subprocess.Popen(
            [installed_dicomfw(), "run", "--config", str(config), "--journald"],
            env={**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"},
            stderr=subprocess.PIPE,
        )
        try:
            ready = systemd.wait_for("READY")
            assert accepts(port)  # READY=1 means the port already accepts connections
            assert ready["STATUS"] == "serving: 0 associations, 0 connecting"
            started = time.monotonic()
            pings = 0
            while time.monotonic() - started < 1.0:
                pings += "WATCHDOG" in systemd.next()
            assert pings >= 3  # every 0.2 s, half of WATCHDOG_USEC

            daemon.send_signal(signal.SIGHUP)
            reloading = systemd.wait_for("RELOADING")
            assert (
                int(reloading["MONOTONIC_USEC"])
                <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            )
            assert systemd.wait_for("READY")["STATUS"].startswith("serving:")

            daemon.send_signal(signal.SIGTERM)
            stopping = systemd.wait_for("STOPPING")
            assert stopping["STATUS"].startswith("draining:")
            assert daemon.wait(WAIT) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
            daemon.wait(WAIT)
    log = daemon.stderr.read().decode() if daemon.stderr else ""
    assert "event=reloaded" in log
    assert not any(line.startswith("ts=") for line in log.splitlines())  # journald adds time


def _sandboxed() -> Callable[[], None]:
    """What of the unit's sandbox a test can apply without systemd: NoNewPrivileges and, where
    the kernel has PR_SET_MDWE (6.3+), MemoryDenyWriteExecute (PR_MDWE_REFUSE_EXEC_GAIN)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def apply() -> None:
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        libc.prctl(65, 1, 0, 0, 0)  # PR_SET_MDWE; EINVAL on older kernels

    return apply


def test_the_units_exec_start_line_starts_the_daemon(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    address = str(tmp_path / "notify")
    with (
        running_scp(ssl_context=server_context(pki, pki.pacs)) as pacs,
        notify_socket(address) as systemd,
    ):
        config = daemon_rules(tmp_path, pki, pacs.port, port)  # mutual TLS to the PACS
        exec_start = unit_setting("ExecStart")
        assert SHIPPED_BINARY in exec_start and SHIPPED_RULES in exec_start
        command = shlex.split(
            exec_start.replace(SHIPPED_BINARY, installed_dicomfw()).replace(
                SHIPPED_RULES, str(config)
            )
        )
        daemon = subprocess.Popen(
            command,
            env={**os.environ, "NOTIFY_SOCKET": address},
            stderr=subprocess.DEVNULL,
            preexec_fn=_sandboxed(),
        )
        try:
            assert "READY" in systemd.wait_for("READY")
            echo = dcmtk("echoscu", "-aet", "CT01", "-aec", "PACS", "127.0.0.1", str(port))
            assert echo.returncode == 0, echo.stderr
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(WAIT) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
            daemon.wait(WAIT)
    assert pacs.requests == ["C-ECHO"]
