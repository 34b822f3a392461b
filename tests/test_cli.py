"""The command line as an admin uses it: `dicomfw check`, `dicomfw run`, reload and stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomfw import __version__
from tests.harness import (
    WAIT,
    Pki,
    associate_rq,
    daemon_rules,
    dcmtk,
    first_pdu,
    free_port,
    rules,
    running_process,
    running_scp,
)

DICOMFW = shutil.which("dicomfw")


def dicomfw(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert DICOMFW is not None, "the dicomfw console script is not installed"
    return subprocess.run(
        [DICOMFW, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    "args", [("--help",), ("--version",), ("certs", "issue", "--help"), ("run", "--help")]
)
def test_python_m_dicomfw_is_the_console_script(tmp_path: Path, args: tuple[str, ...]) -> None:
    """``python -m dicomfw`` (dicomfw/__main__.py) prints what the ``dicomfw`` script prints, run
    from elsewhere than the checkout, so it is the installed package that answers."""
    assert DICOMFW is not None, "the dicomfw console script is not installed"
    env = {**os.environ, "COLUMNS": "100"}  # argparse wraps help to the terminal's width
    script, module = (
        subprocess.run(
            [*launcher, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
        )
        for launcher in ([DICOMFW], [sys.executable, "-m", "dicomfw"])
    )
    assert script.returncode == 0, script.stderr
    assert script.stdout.startswith(f"dicomfw {__version__}" if "--version" in args else "usage:")
    assert (module.returncode, module.stdout, module.stderr) == (
        script.returncode,
        script.stdout,
        script.stderr,
    )


def test_check_prints_what_it_understood(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules(pki, 11112))
    result = dicomfw("check", "--config", path)
    assert result.returncode == 0, result.stderr
    for fact in ("front", "127.0.0.1:11112", "CT01", "127.0.0.0/8", "CTImageStorage", "OK"):
        assert fact in result.stdout


def test_check_names_file_line_and_key_of_every_error(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "listeners:\n"
        "  - {name: front, bind: '127.0.0.1:11112'}\n"
        "upstreams:\n"
        "  pacs: {host: 127.0.0.1, port: 104}\n"
        "peers:\n"
        "  - {ae_title: CT01, networks: [10.0.0.300/8]}\n"
        "routes:\n"
        "  - listener: front\n"
        "    called_ae: PACS\n"
        "    upstream: pacs\n"
        "    allow: [{services: [C-STORE], sop_classes: [CTImageStorag]}]\n"
        "    colour: blue\n"
    )
    result = dicomfw("check", "--config", path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{path}:6: peers[0].networks[0]: ")
    assert lines[1].startswith(f"{path}:11: routes[0].allow[0].sop_classes[0]: unknown SOP Class")
    assert lines[2].startswith(f"{path}:12: routes[0].colour: unknown key")
    assert "3 error(s)" in lines[3]


def test_check_reports_a_key_that_does_not_match_its_certificate(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        rules(pki, 11112, listener_tls=True).replace(
            f"key: {pki.fw_server.key}", f"key: {pki.pacs.key}"
        )
    )
    result = dicomfw("check", "--config", path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f"{pki.pacs.key}: listeners.front.tls.key: does not belong to the certificate"
        f" {pki.fw_server.cert} (their public keys differ: a key of another certificate, or a"
        " certificate renewed with a new key?)"
    )


def test_run_serves_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    with running_scp() as pacs:
        path = daemon_rules(tmp_path, pki, pacs.port, port, upstream_tls=False)
        assert DICOMFW is not None
        pid_file = tmp_path / "dicomfw.pid"
        command = (DICOMFW, "run", "--config", path, "--pid-file", pid_file)
        with running_process(*command, ready_port=port) as daemon:
            assert (
                dcmtk("echoscu", "-aet", "CT01", "-aec", "PACS", "127.0.0.1", str(port)).returncode
                == 0
            )
            # Reload with CT01 removed: new associations from CT01 are now rejected.
            path.write_text(path.read_text().replace("ae_title: CT01", "ae_title: CT02"))
            daemon.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + WAIT
            answer = b""
            while time.monotonic() < deadline:
                answer = first_pdu(port, associate_rq("CT01", "PACS"))
                if answer[:1] == b"\x03":
                    break
                time.sleep(0.05)
            assert answer == bytes((0x03, 0, 0, 0, 0, 4, 0, 1, 1, 3))
            # A broken reload, asked for with `dicomfw reload`, keeps the running rules.
            path.write_text("listeners: [oops\n")
            assert dicomfw("reload", "--pid-file", pid_file).returncode == 0
            time.sleep(0.3)
            assert first_pdu(port, associate_rq("CT02", "PACS"))[:1] == b"\x02"
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(WAIT) == 0
            log = daemon.stderr.read().decode() if daemon.stderr else ""
    assert "event=ready" in log and "event=reloaded" in log
    assert "event=reload_failed" in log and "rules.yaml:2: YAML syntax error" in log
    assert "event=stopped" in log
    assert not pid_file.exists()  # removed on exit
