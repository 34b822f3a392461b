"""A lean DICOM client for the benchmark: pre-encoded PDUs on raw (optionally TLS) sockets.

The client's own cost must not hide the firewall's, so every PDU is encoded once up front and
the loops only ``sendall`` and read PDU headers. Modes (each prints one JSON line on stdout):

  assoc  COUNT sequential associations, each: A-ASSOCIATE, one C-ECHO or one C-STORE, release;
         the time per association (p50/p99) too
  echo   one association, COUNT C-ECHOs back to back; per-request round trip p50/p99
  hold   COUNT associations opened and held; prints {"held": ...}, waits for a line on stdin
         (or --hold-seconds), then releases them all and prints {"released": ...}

    python bench/lean_client.py assoc --port 11112 --count 200 --op store --file ct.dcm
    python bench/lean_client.py echo --port 2762 --count 2000 --tls-ca ca.pem \
        --tls-cert client.pem --tls-key client.key
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcm_pdus import (
    A_ASSOCIATE_AC_TYPE,
    A_RELEASE_RP_TYPE,
    ECHO_CONTEXT,
    STORE_CONTEXT,
    ClientPdus,
    ProtocolFailure,
    Sock,
    accepted_contexts,
    client_pdus,
    expect,
    read_response_status,
)


@dataclass
class Target:
    """Where to connect and how; remembers the last TLS session to resume it."""

    host: str
    port: int
    timeout: float
    tls: ssl.SSLContext | None = None
    server_name: str | None = None
    session: ssl.SSLSession | None = None
    resumed: int = 0
    handshakes: int = 0

    def connect(self) -> Sock:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            return sock
        tls_sock = self.tls.wrap_socket(
            sock, server_hostname=self.server_name or self.host, session=self.session
        )
        self.handshakes += 1
        self.resumed += 1 if tls_sock.session_reused else 0
        return tls_sock

    def remember(self, sock: Sock) -> None:
        """Keep the session (TLS 1.3: the ticket arrives after the handshake, so at the end)."""
        if isinstance(sock, ssl.SSLSocket) and sock.session is not None:
            self.session = sock.session


@dataclass
class Association:
    sock: Sock
    pdus: ClientPdus
    contexts: dict[int, int] = field(default_factory=dict)

    def echo(self) -> None:
        self.sock.sendall(self.pdus.echo_rq)
        status = read_response_status(self.sock)
        if status != 0:
            raise ProtocolFailure(f"C-ECHO status 0x{status:04X}")

    def store(self) -> None:
        if self.contexts.get(STORE_CONTEXT) != 0:
            raise ProtocolFailure("CT Image Storage context was not accepted")
        self.sock.sendall(self.pdus.store_rq)
        status = read_response_status(self.sock)
        if status != 0:
            raise ProtocolFailure(f"C-STORE status 0x{status:04X}")

    def release(self) -> None:
        self.sock.sendall(self.pdus.release_rq)
        expect(self.sock, A_RELEASE_RP_TYPE)


def associate(target: Target, pdus: ClientPdus) -> Association:
    sock = target.connect()
    try:
        sock.sendall(pdus.associate_rq)
        raw = expect(sock, A_ASSOCIATE_AC_TYPE)
    except BaseException:
        sock.close()
        raise
    association = Association(sock, pdus, accepted_contexts(raw))
    if association.contexts.get(ECHO_CONTEXT) != 0:
        sock.close()
        raise ProtocolFailure("Verification context was not accepted")
    return association


def finish(target: Target, association: Association) -> None:
    association.release()
    target.remember(association.sock)
    association.sock.close()


# ---- modes -----------------------------------------------------------------------------------


def run_assoc(target: Target, pdus: ClientPdus, count: int, op: str) -> dict[str, Any]:
    durations: list[float] = []
    start = time.perf_counter()
    for _ in range(count):
        begin = time.perf_counter()
        association = associate(target, pdus)
        if op == "echo":
            association.echo()
        elif op == "store":
            association.store()
        finish(target, association)
        durations.append(time.perf_counter() - begin)
    seconds = time.perf_counter() - start
    return {
        "mode": "assoc",
        "op": op,
        "count": count,
        "seconds": seconds,
        "per_second": count / seconds,
        "p50_ms": percentile(durations, 0.50) * 1000,
        "p99_ms": percentile(durations, 0.99) * 1000,
        "tls_handshakes": target.handshakes,
        "tls_resumed": target.resumed,
    }


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def run_echo(target: Target, pdus: ClientPdus, count: int, warmup: int) -> dict[str, Any]:
    association = associate(target, pdus)
    for _ in range(warmup):
        association.echo()
    rtts: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(count):
        begin = clock()
        association.echo()
        rtts.append((clock() - begin) / 1000.0)
    finish(target, association)
    return {
        "mode": "echo",
        "count": count,
        "p50_us": percentile(rtts, 0.50),
        "p99_us": percentile(rtts, 0.99),
        "mean_us": statistics.fmean(rtts),
        "min_us": min(rtts),
    }


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def run_hold(target: Target, pdus: ClientPdus, count: int, hold_seconds: float) -> dict[str, Any]:
    held: list[Association] = []
    start = time.perf_counter()
    try:
        for _ in range(count):
            held.append(associate(target, pdus))
        _emit({"mode": "hold", "held": len(held), "seconds": time.perf_counter() - start})
        # Wait for the orchestrator's go (a line on stdin), bounded by hold_seconds.
        select.select([sys.stdin], [], [], hold_seconds)
        for association in held:
            finish(target, association)
    finally:
        for association in held:
            association.sock.close()
    return {"mode": "hold", "released": len(held)}


# ---- command line ----------------------------------------------------------------------------


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_ca is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(args.tls_ca)
    if args.tls_cert is not None:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["assoc", "echo", "hold"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--op", choices=["none", "echo", "store"], default="echo")
    parser.add_argument("--file", type=Path, help="CT file to C-STORE (--op store)")
    parser.add_argument("--warmup", type=int, default=100, help="echo mode: untimed echoes")
    parser.add_argument("--hold-seconds", type=float, default=60.0)
    parser.add_argument(
        "--start-at", type=float, help="begin at this time.time() (several clients at once)"
    )
    parser.add_argument("--calling-ae", default="CT01")
    parser.add_argument("--called-ae", default="PACS")
    parser.add_argument("--timeout", type=float, default=30.0, help="per socket operation")
    parser.add_argument("--tls-ca", type=Path, help="connect with TLS, verifying against this CA")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--server-name", default="127.0.0.1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.op == "store" and args.file is None:
        sys.stderr.write("lean_client: --op store needs --file\n")
        return 2
    target = Target(args.host, args.port, args.timeout, tls_context(args), args.server_name)
    pdus = client_pdus(args.calling_ae, args.called_ae, args.file)
    if args.start_at is not None:  # start-up (imports, encoding) is over: wait for the others
        time.sleep(max(0.0, args.start_at - time.time()))
    try:
        if args.mode == "assoc":
            result = run_assoc(target, pdus, args.count, args.op)
        elif args.mode == "echo":
            result = run_echo(target, pdus, args.count, args.warmup)
        else:
            result = run_hold(target, pdus, args.count, args.hold_seconds)
    except (OSError, ProtocolFailure) as error:
        sys.stderr.write(f"lean_client: {type(error).__name__}: {error}\n")
        return 1
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
