"""A fault-injecting TCP proxy for the end-to-end fault tests (loopback only, every wait bounded).

Put it between a client and dicomfw, or between dicomfw and its upstream. Each accepted
connection gets the next ``Fault`` of a schedule and is relayed byte for byte until the fault's
byte offset in its direction, where the fault strikes:

``cut``         both connections closed (FIN both ways), mid-PDU if the offset is
``reset``       both connections reset (RST: ``SO_LINGER`` 0)
``half_close``  that direction closed (its receiver reads EOF); the other one goes on
``stall``       that direction stops: what its sender sends next is dropped, nothing more
                arrives, until the sender gives up and closes, which is passed on — for the
                receiver, a peer hung mid-PDU; at offset 0, a silent one
``trickle``     that direction relayed one byte per write for the ``TRICKLE_BYTES`` before the
                offset, normally before and after: every PDU there split at every byte
``pass``        nothing

Directions: ``up`` is what the connecting side sends (client → server), ``down`` the answers.
``record=True`` keeps every byte of both directions (for a calibration run that finds where
each protocol phase lies in the byte stream).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from tests.harness import WAIT

Kind = Literal["pass", "cut", "reset", "half_close", "stall", "trickle"]
Direction = Literal["up", "down"]
KINDS: tuple[Kind, ...] = ("pass", "cut", "reset", "half_close", "stall", "trickle")
#: How long a stalled or trickling connection may last at most: the proxy closes it then, so no
#: test can hang on it (the firewall's and the clients' timeouts are far shorter).
MAX_CONNECTION_SECONDS = 30.0
_TRICKLE_PAUSE = 0.0005
#: How many bytes a trickle fault sends one at a time (a second's worth at most, so that the
#: peers' own timeouts do not strike).
TRICKLE_BYTES = 512


@dataclass(frozen=True)
class Fault:
    kind: Kind = "pass"
    direction: Direction = "up"
    after: int = 0  # bytes relayed in ``direction`` before the fault strikes
    phase: str = ""  # what the offset falls in, for the test's report

    def __str__(self) -> str:
        if self.kind == "pass":
            return "pass"
        return f"{self.kind} {self.direction} after {self.after} bytes ({self.phase})"


@dataclass
class Connection:
    """One proxied connection: its fault, what passed, and (when recording) the bytes."""

    fault: Fault
    passed: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    recorded: dict[str, bytearray] = field(
        default_factory=lambda: {"up": bytearray(), "down": bytearray()}
    )
    struck: bool = False


class FaultProxy:
    def __init__(
        self, target_port: int, schedule: Callable[[int], Fault], record: bool = False
    ) -> None:
        self.target_port = target_port
        self.schedule = schedule
        self.record = record
        self.connections: list[Connection] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port = int(self._listener.getsockname()[1])

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        deadline = time.monotonic() + WAIT
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    # ---- relaying ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection = Connection(self.schedule(len(self.connections)))
            self.connections.append(connection)
            self._spawn(self._serve, client, connection)

    def _serve(self, client: socket.socket, connection: Connection) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), WAIT)
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(0.1)
        ended = {"up": threading.Event(), "down": threading.Event()}
        pumps = [
            threading.Thread(
                target=self._pump, args=(client, server, "up", connection, ended), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(server, client, "down", connection, ended), daemon=True
            ),
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join(MAX_CONNECTION_SECONDS + WAIT)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.close()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        direction: str,
        connection: Connection,
        ended: dict[str, threading.Event],
    ) -> None:
        fault = connection.fault
        mine = fault.direction == direction and fault.kind != "pass"
        other = ended["down" if direction == "up" else "up"]
        started = time.monotonic()
        try:
            while not self._stop.is_set() and time.monotonic() - started < MAX_CONNECTION_SECONDS:
                if connection.struck and fault.kind in ("cut", "reset"):
                    return
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    if other.is_set() and connection.struck:
                        return
                    continue
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)  # pass the half-close on
                    return
                passed = connection.passed[direction]
                if mine and fault.kind == "trickle" and passed < fault.after:
                    start = max(0, fault.after - TRICKLE_BYTES - passed)
                    self._send(sink, data[:start], direction, connection)
                    head, data = data[start : fault.after - passed], data[fault.after - passed :]
                    for byte in range(len(head)):
                        self._send(sink, head[byte : byte + 1], direction, connection)
                        time.sleep(_TRICKLE_PAUSE)
                elif mine and fault.kind != "trickle" and passed + len(data) >= fault.after:
                    self._send(sink, data[: fault.after - passed], direction, connection)
                    self._strike(source, sink, fault, connection)
                    return
                self._send(sink, data, direction, connection)
        except OSError:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)
        finally:
            ended[direction].set()

    def _send(self, sink: socket.socket, data: bytes, direction: str, c: Connection) -> None:
        if not data:
            return
        sink.settimeout(WAIT)
        sink.sendall(data)
        sink.settimeout(0.1)
        c.passed[direction] += len(data)
        if self.record:
            c.recorded[direction] += data

    def _strike(
        self,
        source: socket.socket,
        sink: socket.socket,
        fault: Fault,
        connection: Connection,
    ) -> None:
        connection.struck = True
        if fault.kind == "half_close":
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            return
        if fault.kind == "stall":
            # Nothing more is relayed this way (the other direction goes on) until the sender
            # closes, or the proxy's own bound.
            deadline = time.monotonic() + MAX_CONNECTION_SECONDS
            with contextlib.suppress(OSError):
                while not self._stop.is_set() and time.monotonic() < deadline:
                    try:
                        if not source.recv(65536):
                            break
                    except TimeoutError:
                        continue
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            return
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                if fault.kind == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                else:
                    sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def fault_proxy(
    target_port: int, schedule: Callable[[int], Fault], record: bool = False
) -> Iterator[FaultProxy]:
    proxy = FaultProxy(target_port, schedule, record).start()
    try:
        yield proxy
    finally:
        proxy.stop()


# ---- where the protocol phases lie in a byte stream ---------------------------------------------


def phases(stream: bytes) -> list[tuple[str, int, int]]:
    """(phase, start, end) byte ranges of a recorded DICOM stream, one per PDU: the
    A-ASSOCIATE PDUs, release and abort by name, a P-DATA-TF as ``command`` or ``data set``
    after its first PDV, so a fault offset drawn inside a range strikes in that phase."""
    names = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 5: "A-RELEASE-RQ",
             6: "A-RELEASE-RP", 7: "A-ABORT"}  # fmt: skip
    found = []
    pos = 0
    while len(stream) - pos >= 6:
        pdu_type, length = struct.unpack_from(">BxL", stream, pos)
        name = names.get(pdu_type, "P-DATA")
        if pdu_type == 4 and len(stream) - pos >= 12:
            name = "P-DATA command" if stream[pos + 11] & 1 else "P-DATA data set"
        found.append((name, pos, pos + 6 + length))
        pos += 6 + length
    return found
