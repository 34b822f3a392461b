"""The heap trimmer: freed C-heap pages go back to the OS once association churn stops."""

from __future__ import annotations

import asyncio
import ctypes
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomfw.service.heap import HeapTrimmer
from tests.harness import (
    WAIT,
    Pki,
    daemon_rules,
    dcmtk,
    free_port,
    running_process,
    running_scp,
)
from tests.opshelpers import installed_dicomfw

libc = ctypes.CDLL(None)
if not hasattr(libc, "malloc_trim"):
    pytest.skip("malloc_trim is glibc's", allow_module_level=True)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_trim_returns_the_pages_of_freed_chunks_between_live_ones() -> None:
    """The pattern TLS handshakes leave: most chunks freed, a few live ones pinning the heap."""
    chunks = [libc.malloc(3000) for _ in range(30_000)]  # ~90 MB, below the mmap threshold
    for chunk in chunks:
        libc.memset(chunk, 1, 3000)  # resident now
    kept = chunks[::64]
    for chunk in chunks:
        if chunk not in kept:
            libc.free(chunk)
    before = rss_kb()
    trimmer = HeapTrimmer(lambda: 0)
    trimmer.trim_now()
    after = rss_kb()
    for chunk in kept:
        libc.free(chunk)
    assert trimmer.trims == 1
    assert before - after > 50_000, (before, after)


def test_trims_once_when_churn_stops_and_not_while_nothing_changes() -> None:
    async def scenario() -> list[int]:
        state = [0]
        trimmer = HeapTrimmer(lambda: state[0], tick=0.05, max_delay=60)
        trimmer.start()
        seen = []
        for _ in range(40):  # several changes per tick: still churning
            state[0] += 1
            await asyncio.sleep(0.01)
        seen.append(trimmer.trims)
        await asyncio.sleep(0.4)  # quiet: one trim
        seen.append(trimmer.trims)
        await asyncio.sleep(0.4)  # still quiet: no more
        seen.append(trimmer.trims)
        trimmer.stop()
        return seen

    during, after_quiet, later = asyncio.run(scenario())
    assert during == 0
    assert after_quiet == 1
    assert later == after_quiet


def test_constant_churn_still_trims_every_max_delay() -> None:
    async def scenario() -> int:
        state = [0]
        trimmer = HeapTrimmer(lambda: state[0], tick=0.02, max_delay=0.2)
        trimmer.start()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            state[0] += 1
            await asyncio.sleep(0.01)
        trimmer.stop()
        return trimmer.trims

    assert 2 <= asyncio.run(scenario()) <= 6


def test_the_daemon_trims_after_a_burst_of_associations(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    with running_scp() as pacs:
        path = daemon_rules(tmp_path, pki, pacs.port, port, upstream_tls=False)
        command = (installed_dicomfw(), "run", "--config", path, "--log-level", "debug")
        with running_process(*command, ready_port=port) as daemon:
            for _ in range(3):
                echo = dcmtk("echoscu", "-aet", "CT01", "-aec", "PACS", "127.0.0.1", str(port))
                assert echo.returncode == 0
            time.sleep(2.5)  # one tick sees the burst, the next sees it over
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(WAIT) == 0
            log = daemon.stderr.read().decode() if daemon.stderr else ""
    assert "event=heap_trimmed released=" in log, log[-2000:]


MAPPING_PROBE = """
import ctypes, json, sys
from dicomfw.service.heap import MMAP_THRESHOLD_BYTES, map_large_blocks
from dicomfw.relay.server import READ_BYTES
from tests.mallinfo import LIBC, mallinfo2

LIBC.malloc.restype = ctypes.c_void_p
LIBC.malloc.argtypes = [ctypes.c_size_t]
LIBC.free.argtypes = [ctypes.c_void_p]

def mapped(size):
    LIBC.free(LIBC.malloc(1 << 20))  # a freed 1 MiB block: glibc would raise its threshold
    LIBC.malloc_trim(0)  # no room at the heap's top (where a block would come from first)
    before = mallinfo2().hblks
    block = LIBC.malloc(size)
    grew = mallinfo2().hblks - before
    LIBC.free(block)
    return grew == 1

result = {"default": mapped(MMAP_THRESHOLD_BYTES)}
result["set"] = map_large_blocks()
result["tls_buffer"] = mapped(MMAP_THRESHOLD_BYTES)  # uvloop's SSL_READ_MAX_SIZE
result["relay_read"] = mapped(READ_BYTES + 33)  # a bytes object of one relay read
json.dump(result, sys.stdout)
"""


def test_blocks_of_256_kib_are_mapped_on_their_own_and_a_relay_read_is_not() -> None:
    """In a fresh interpreter (mallopt is process-wide): glibc's own threshold moves above
    uvloop's 256 KiB TLS read buffer once a larger block was freed; after
    ``map_large_blocks`` it stays put, below that buffer and above what one read copies.
    (glibc maps a block only when the heap's top has no room for it; ``HeapTrimmer`` trims
    the top whenever association churn stops.)"""
    probe = subprocess.run(
        [sys.executable, "-c", MAPPING_PROBE],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=Path(__file__).parent.parent,
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {
        "default": False,
        "set": True,
        "tls_buffer": True,
        "relay_read": False,
    }
