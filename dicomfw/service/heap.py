"""Keep the heap small: large blocks mapped on their own, free pages given back after a burst.

Every association allocates and frees tens of KB (TLS handshake: certificate parsing, key
exchange, record buffers; the A-ASSOCIATE codec), and glibc keeps freed pages resident for
reuse. Measured: after 1,000 associations were opened at once and released, dicomfw's RSS stayed
63 MB above where it started; with a trim once they were gone, 10.5 MB. An admin sizing a host
by RSS, or a systemd ``MemoryMax=``, would see the former for as long as the daemon runs. (Pages
still in use are not affected: an open TLS association costs the same ~34 KB either way.) So
the daemon trims when the set of connections has stopped changing for a tick, and at least
every ``max_delay`` seconds under constant churn. A trim walks the heap's free chunks (~5 ms
after 1,000 associations), so it runs on a worker thread: the event loop keeps relaying
meanwhile (ctypes releases the GIL; Python's small objects do not use glibc's heap).

Only glibc has ``malloc_trim`` and ``mallopt``; elsewhere this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Callable, Hashable
from typing import Final

from dicomfw.logsetup import log_event

log = logging.getLogger("dicomfw.heap")

_M_TRIM_THRESHOLD: Final = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD: Final = -3
#: Blocks from this size on get a mapping of their own: uvloop's TLS read buffer is exactly this.
MMAP_THRESHOLD_BYTES: Final = 256 * 1024
#: Free memory at the top of the heap that glibc keeps instead of returning at each ``free``.
TRIM_THRESHOLD_BYTES: Final = 16 * 1024 * 1024


def map_large_blocks() -> bool:
    """Have glibc map every block of 256 KiB or more on its own, for the life of the process.

    glibc starts out doing that from 128 KiB, but raises the threshold to the size of the first
    such block freed; after that, uvloop's 256 KiB read buffer of each TLS connection (allocated
    with the connection; an idle one touches only its first page) comes from the heap, between
    the small allocations of the other connections, and fragments it. Measured with 1,000 idle
    associations: 42 KB of RSS each, 34 KB with the threshold fixed here. (glibc maps a block
    only when the heap's top cannot hold it; ``HeapTrimmer`` trims the top whenever association
    churn stops, so this is the case for associations that open and then stay open.) The relay
    never makes a per-read block this large (``relay.server.READ_BYTES``): with uvloop's 256 KiB
    bytes object per TLS read, mapping would cost ~20 µs per C-ECHO round trip.

    Fixing the threshold also stops glibc's adjustment of the trim threshold. Left at twice the
    mmap threshold (what the adjustment would have made it), the heap's top shrank and grew
    again with nearly every 0.5 MB image, its pages faulted in afresh each time (measured: six
    ``brk`` calls per one-image association, +30 % CPU). Giving memory back is ``HeapTrimmer``'s
    job, so the automatic trim waits until the top holds ``TRIM_THRESHOLD_BYTES``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` after churn, debounced by ``tick`` seconds.

    ``state`` returns anything that changes when connections come and go (e.g. the number
    accepted so far and the number open); the trimmer compares it once per tick.
    """

    def __init__(
        self, state: Callable[[], Hashable], tick: float = 1.0, max_delay: float = 30.0
    ) -> None:
        self._state = state
        self._tick = tick
        self._max_delay = max_delay
        self._trim = _malloc_trim()
        self._last = state()
        self._dirty_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.trims = 0

    def start(self) -> None:
        if self._trim is not None:
            self._timer = asyncio.get_running_loop().call_later(self._tick, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        now = time.monotonic()
        current = self._state()
        changed, self._last = current != self._last, current
        if changed and self._dirty_since is None:
            self._dirty_since = now
        loop = asyncio.get_running_loop()
        if self._dirty_since is not None and (
            not changed or now - self._dirty_since >= self._max_delay
        ):
            self._dirty_since = None
            trimming = loop.run_in_executor(None, self.trim_now)
            trimming.add_done_callback(self._schedule)  # the next check once it is done
        else:
            self._schedule()

    def _schedule(self, _: object = None) -> None:
        if self._timer is not None:  # not stopped meanwhile
            self._timer = asyncio.get_running_loop().call_later(self._tick, self._check)

    def trim_now(self) -> None:
        """Trim at once, in the calling thread."""
        if self._trim is None:
            return
        started = time.perf_counter()
        released = self._trim(0)
        self.trims += 1
        log_event(
            log,
            logging.DEBUG,
            "heap_trimmed",
            released=bool(released),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
