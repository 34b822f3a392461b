"""Graceful drain: SIGTERM stops accepting at once, lets an open transfer finish, aborts what is
left at `limits.drain_seconds`, and exits 0 — a restart never costs a study the sender was told
was stored."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tests.harness import (
    VERIFICATION,
    WAIT,
    Pki,
    ct_image,
    encoded,
    free_port,
    rules,
    running_scp,
    scu,
    slow_tcp_proxy,
)
from tests.opshelpers import installed_dicomfw, notify_socket

FIFTY_MB = 50 * 1024 * 1024


def start_daemon(
    tmp_path: Path, pki: Pki, upstream_port: int, port: int, drain: int, notify: str
) -> subprocess.Popen[bytes]:
    path = tmp_path / "rules.yaml"
    limits = f"{{artim_seconds: 5, idle_seconds: 60, drain_seconds: {drain}}}"
    path.write_text(
        rules(pki, upstream_port, upstream_tls=False, limits=limits).replace(
            'bind: "127.0.0.1:0"', f'bind: "127.0.0.1:{port}"'
        )
    )
    return subprocess.Popen(
        [installed_dicomfw(), "run", "--config", str(path)],
        env={**os.environ, "NOTIFY_SOCKET": notify},
        stderr=subprocess.PIPE,
    )


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1.0).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_during_a_50_mb_c_store_lets_it_finish_refuses_newcomers_and_exits_0(
    tmp_path: Path, pki: Pki
) -> None:
    image = ct_image(seed=7, pixel_bytes=2)
    image[0x7FE00010].value = os.urandom(FIFTY_MB)
    sent = hashlib.sha256(encoded(image)).hexdigest()
    port, address = free_port(), f"@dicomfw-test-{uuid.uuid4().hex}"
    result: dict[str, Any] = {}
    with (
        running_scp() as pacs,
        slow_tcp_proxy(pacs.port, 25 * 1024 * 1024) as slow_pacs,  # ~2 s for the transfer
        notify_socket(address) as systemd,
    ):
        daemon = start_daemon(tmp_path, pki, slow_pacs, port, drain=20, notify=address)
        try:
            systemd.wait_for("READY")
            association = scu("CT01").associate("127.0.0.1", port, ae_title="PACS")
            assert association.is_established

            def store() -> None:
                result["status"] = association.send_c_store(image)
                association.release()

            sender = threading.Thread(target=store)
            sender.start()
            time.sleep(0.5)  # well into the transfer
            assert sender.is_alive()
            daemon.send_signal(signal.SIGTERM)
            term = time.monotonic()
            systemd.wait_for("STOPPING")
            assert refused(port)  # no new connection while the drain runs
            sender.join(30)
            assert daemon.wait(WAIT) == 0
            exited = time.monotonic() - term
        finally:
            if daemon.poll() is None:
                daemon.kill()
            daemon.wait(WAIT)
    assert result["status"].Status == 0x0000
    assert [hashlib.sha256(data).hexdigest() for data in pacs.stored] == [sent]
    assert exited < 20
    log = daemon.stderr.read().decode() if daemon.stderr else ""
    assert "how=released" in log and "event=stopped" in log


def test_what_is_still_open_at_the_drain_deadline_is_aborted_and_the_daemon_exits_0(
    tmp_path: Path, pki: Pki
) -> None:
    port, address = free_port(), f"@dicomfw-test-{uuid.uuid4().hex}"
    with running_scp() as pacs, notify_socket(address) as systemd:
        daemon = start_daemon(tmp_path, pki, pacs.port, port, drain=1, notify=address)
        try:
            systemd.wait_for("READY")
            idle = scu("CT01", (VERIFICATION,)).associate("127.0.0.1", port, ae_title="PACS")
            assert idle.is_established and idle.send_c_echo().Status == 0x0000
            daemon.send_signal(signal.SIGTERM)
            term = time.monotonic()
            assert daemon.wait(WAIT) == 0
            exited = time.monotonic() - term
            deadline = time.monotonic() + WAIT
            while idle.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            if daemon.poll() is None:
                daemon.kill()
            daemon.wait(WAIT)
    assert idle.is_aborted  # an A-ABORT, not a silent close
    assert 1.0 <= exited < 3.0
    log = daemon.stderr.read().decode() if daemon.stderr else ""
    assert "why=shutdown" in log
