"""Helpers for the operations tests (limits, systemd, drain, PROXY): clients bound to a chosen
loopback address (all of 127.0.0.0/8 is local, so a test can be several hosts), the installed
console script, and the NOTIFY_SOCKET a test owns to read what the daemon announces."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.harness import WAIT

#: A-ASSOCIATE-RJ rejected-transient (2), service-provider presentation (3), local-limit-
#: exceeded (2): PS3.8 Table 9-21.
LOCAL_LIMIT_RJ = bytes((0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2))
A_ASSOCIATE_AC = 0x02
#: struct ucred (pid, uid, gid), as SCM_CREDENTIALS carries it.
_UCRED = struct.Struct("iII")


def connect_from(source: str, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), WAIT, source_address=(source, 0))
    sock.settimeout(WAIT)
    return sock


def first_pdu_from(source: str, port: int, data: bytes) -> bytes:
    """Send ``data`` from ``source`` and return the first whole PDU of the answer."""
    with connect_from(source, port) as sock:
        sock.sendall(data)
        header = sock.recv(6, socket.MSG_WAITALL)
        if len(header) < 6:
            return b""
        return header + sock.recv(int.from_bytes(header[2:], "big"), socket.MSG_WAITALL)


def installed_dicomfw() -> str:
    """The console script pip installed (not a version manager's shim in front of it)."""
    beside_python = Path(sys.executable).parent / "dicomfw"
    found = str(beside_python) if beside_python.exists() else shutil.which("dicomfw")
    assert found is not None, "the dicomfw console script is not installed"
    return found


def dicomfw(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``dicomfw ARGS…`` as an admin runs it; its exit status, output and errors."""
    return subprocess.run(
        [installed_dicomfw(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cli(*args: str | Path) -> str:
    """``dicomfw ARGS…``, which must succeed: its output."""
    result = dicomfw(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


class NotifySocket:
    """The datagram socket systemd would own; collects what the daemon sends, and which
    processes sent it (``NotifyAccess=main`` ignores all but the main process)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.address = address
        self.messages: list[dict[str, str]] = []
        self.senders: set[int] = set()

    def next(self, timeout: float = WAIT) -> dict[str, str]:
        self.sock.settimeout(timeout)
        raw, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                self.senders.add(_UCRED.unpack(data[: _UCRED.size])[0])
        message = dict(line.split("=", 1) for line in raw.decode().splitlines())
        self.messages.append(message)
        return message

    def wait_for(self, key: str, timeout: float = WAIT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def notify_socket(address: str) -> Iterator[NotifySocket]:
    listener = NotifySocket(address)
    try:
        yield listener
    finally:
        listener.close()
