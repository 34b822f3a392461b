"""Record the seed corpus from real DICOM peers: ``python -m fuzz.capture [--out fuzz/corpus]``.

A TCP tap sits between a real client and a real server on 127.0.0.1 and records every read of
each direction, in the order they happened. Clients: DCMTK's echoscu, storescu, findscu and
movescu and a pynetdicom SCU; servers: DCMTK's storescp, a pynetdicom SCP (find, get, move,
N-CREATE/N-SET) and a pynetdicom SCP that rejects the association; HAProxy in front of the tap
for the PROXY v2 headers a real balancer writes. From each transcript the tool cuts the seeds of
every target (``fuzz/targets.py``): whole streams for the framer, each A-ASSOCIATE-RQ/AC, the
fixed-size PDUs (RJ, release, abort), each reassembled command set and data set (C-STORE
instances, C-FIND identifiers and matches), each direction's data phase, the PROXY header, and
the transcript itself as a session script.

Every client calls itself MODALITY and every server PACS, as the session target's policy
expects. Seeds are named ``<scenario>-<what>-<sha1 prefix>.bin``, so re-running the capture
gives the same names for the same bytes; streams over ``MAX_SEED_BYTES`` are cut there to keep
the corpus small.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt

from dicomfw.core.acse import decode_ac
from dicomfw.core.dimse import decode_command
from fuzz.targets import DATASET_CONTEXTS, FROM_REQUESTER, FROM_UPSTREAM, script
from tests.harness import (
    CT,
    FIND,
    GET,
    MPPS,
    VERIFICATION,
    WAIT,
    ct_image,
    dcmtk,
    free_port,
    running_process,
    running_scp,
)

MAX_SEED_BYTES = 24_576
REQUESTER, UPSTREAM = "requester", "upstream"


@dataclass
class Transcript:
    """Every read of one connection through the tap: (direction, bytes), in order."""

    reads: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, direction: str, data: bytes) -> None:
        with self.lock:
            self.reads.append((direction, data))

    def stream(self, direction: str) -> bytes:
        return b"".join(data for side, data in self.reads if side == direction)


@contextlib.contextmanager
def tap(target_port: int) -> Iterator[tuple[int, list[Transcript]]]:
    """A recording TCP proxy to ``target_port``: yields its port and the transcripts."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    transcripts: list[Transcript] = []
    stop = threading.Event()
    pumps: list[threading.Thread] = []

    def pump(source: socket.socket, sink: socket.socket, direction: str, log: Transcript) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                log.add(direction, data)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", target_port), WAIT)
            log = Transcript()
            transcripts.append(log)
            for args in ((client, server, REQUESTER, log), (server, client, UPSTREAM, log)):
                thread = threading.Thread(target=pump, args=args, daemon=True)
                thread.start()
                pumps.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield int(listener.getsockname()[1]), transcripts
        for thread in pumps:
            thread.join(WAIT)
    finally:
        stop.set()
        listener.close()
        acceptor.join(WAIT)


# ---- upstreams ----------------------------------------------------------------------------------


@contextlib.contextmanager
def dcmtk_storescp() -> Iterator[int]:
    port = free_port()
    with running_process("/usr/bin/storescp", "-aet", "PACS", "--ignore", port, ready_port=port):
        yield port


@contextlib.contextmanager
def pynetdicom_scp() -> Iterator[int]:
    with running_scp("PACS", find_results=2) as scp:
        yield scp.port


@contextlib.contextmanager
def rejecting_scp() -> Iterator[int]:
    """A pynetdicom SCP that answers any called AE but its own with A-ASSOCIATE-RJ."""
    ae = AE(ae_title="SOMEONE")
    ae.require_called_aet = True
    ae.add_supported_context(VERIFICATION)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield int(server.socket.getsockname()[1])
    finally:
        server.shutdown()


# ---- clients ------------------------------------------------------------------------------------


def dcmtk_client(tool: str, *args: str | Path) -> Callable[[int, Path], None]:
    def run(port: int, files: Path) -> None:
        # Its exit status is not looked at: a refusal (C-MOVE to an unknown destination, a
        # rejected association) is part of what is captured.
        dcmtk(tool, "-aet", "MODALITY", "-aec", "PACS", *args, "127.0.0.1", port)

    return run


def storescu(port: int, files: Path) -> None:
    dcmtk("storescu", "-aet", "MODALITY", "-aec", "PACS", "127.0.0.1", port, *_images(files))


def storescu_per_image(port: int, files: Path) -> None:
    for image in _images(files):
        dcmtk("storescu", "-aet", "MODALITY", "-aec", "PACS", "127.0.0.1", port, image)


def _images(files: Path) -> list[Path]:
    paths = []
    for seed in range(2):
        path = files / f"image{seed}.dcm"
        if not path.exists():
            ct_image(seed=seed, pixel_bytes=1_500).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def pynetdicom_mixed(port: int, files: Path) -> None:
    """Echo, two stores, a find, a get (sub-operations back on the association), N-CREATE."""
    ae = AE(ae_title="MODALITY")
    for uid in (VERIFICATION, CT, FIND, GET, MPPS):
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    association = ae.associate(
        "127.0.0.1",
        port,
        ae_title="PACS",
        ext_neg=[build_role(CT, scu_role=True, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
    )
    if not association.is_established:
        return
    association.send_c_echo()
    for seed in range(2):
        association.send_c_store(ct_image(seed=seed, pixel_bytes=1_000))
    query = _study_query()
    list(association.send_c_find(query, FIND))
    list(association.send_c_get(query, GET))
    association.release()


def pynetdicom_abort(port: int, files: Path) -> None:
    """A store, then A-ABORT instead of a release."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, [ImplicitVRLittleEndian])
    association = ae.associate("127.0.0.1", port, ae_title="PACS")
    if association.is_established:
        association.send_c_store(ct_image(seed=3, pixel_bytes=800))
        association.abort()


def _study_query() -> Any:
    from pydicom.dataset import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3.1"
    return query


STUDY = ("-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.1")

#: name -> (upstream, client)
SCENARIOS: dict[str, tuple[Callable[[], Any], Callable[[int, Path], None]]] = {
    "dcmtk-echo": (dcmtk_storescp, dcmtk_client("echoscu")),
    "dcmtk-store": (dcmtk_storescp, storescu),
    "dcmtk-store-per-image": (dcmtk_storescp, storescu_per_image),
    "dcmtk-find": (pynetdicom_scp, dcmtk_client("findscu", *STUDY)),
    "dcmtk-move": (pynetdicom_scp, dcmtk_client("movescu", "-aem", "WS1", *STUDY)),
    "dcmtk-rejected": (rejecting_scp, dcmtk_client("echoscu")),
    "pynetdicom-mixed": (pynetdicom_scp, pynetdicom_mixed),
    "pynetdicom-abort": (dcmtk_storescp, pynetdicom_abort),
}


# ---- HAProxy: real PROXY v2 headers -------------------------------------------------------------

HAPROXY = """\
global
  maxconn 64
defaults
  mode tcp
  timeout connect 5s
  timeout client 10s
  timeout server 10s
frontend dicom
  bind {bind}
  unique-id-format %{{+X}}o%ci:%cp
  default_backend tap
backend tap
  server tap 127.0.0.1:{tap} send-proxy-v2 {options}
"""


def haproxy_headers(work: Path) -> list[tuple[str, bytes]]:
    """The first bytes HAProxy sends its server for an echoscu connection: a PROXY v2 header
    (IPv4 and IPv6 clients, without and with TLVs) followed by the A-ASSOCIATE-RQ."""
    found = []
    variants = {
        "tcp4": ("127.0.0.1", ""),
        "tcp6-tlvs": ("::1", "proxy-v2-options crc32c,unique-id,authority"),
    }
    for name, (host, options) in variants.items():
        with dcmtk_storescp() as scp, tap(scp) as (tap_port, transcripts):
            port = free_port()
            bind = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            config = work / f"haproxy-{name}.cfg"
            config.write_text(HAPROXY.format(bind=bind, tap=tap_port, options=options))
            process = subprocess.Popen(["/usr/sbin/haproxy", "-f", str(config)])
            try:
                _wait_for(host, port)
                dcmtk("echoscu", "-aet", "MODALITY", "-aec", "PACS", host, port)
            finally:
                process.terminate()
                process.wait(WAIT)
        for transcript in transcripts:
            found.append((name, transcript.stream(REQUESTER)[:2048]))
    return found


def _wait_for(host: str, port: int) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), 0.2).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


# ---- cutting seeds out of transcripts ------------------------------------------------------------


def pdus(stream: bytes) -> list[bytes]:
    """Whole PDUs of a stream (a trailing partial one is dropped)."""
    found, pos = [], 0
    while len(stream) - pos >= 6:
        (length,) = struct.unpack_from(">L", stream, pos + 2)
        if pos + 6 + length > len(stream):
            break
        found.append(stream[pos : pos + 6 + length])
        pos += 6 + length
    return found


def command_sets(stream: bytes) -> list[bytes]:
    """Every DIMSE command set of a stream, its fragments joined."""
    found: list[bytes] = []
    fragments = bytearray()
    for raw in pdus(stream):
        if raw[0] != 0x04:
            continue
        pos = 6
        while pos + 6 <= len(raw):
            length, _, control = struct.unpack_from(">LBB", raw, pos)
            if control & 1:
                fragments += raw[pos + 6 : pos + 4 + length]
                if control & 2:
                    found.append(bytes(fragments))
                    fragments.clear()
            pos += 4 + length
    return found


def data_sets(stream: bytes, syntaxes: dict[int, str]) -> list[bytes]:
    """Every data set of a stream, its fragments joined, as a ``dataset`` seed: first the
    byte that chooses its command and transfer syntax (``fuzz.targets.DATASET_CONTEXTS``)."""
    found: list[bytes] = []
    command, fragments, command_field = bytearray(), bytearray(), 0
    for raw in pdus(stream):
        pos = 6
        while raw[0] == 0x04 and pos + 6 <= len(raw):
            length, context, control = struct.unpack_from(">LBB", raw, pos)
            value = raw[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if control & 1:
                command += value
                if control & 2:
                    command_field = decode_command(bytes(command)).command_field
                    command.clear()
                continue
            fragments += value
            if control & 2:
                choice = _dataset_context(command_field, syntaxes.get(context, ""))
                if choice is not None:
                    found.append(bytes((choice,)) + bytes(fragments[:MAX_SEED_BYTES]))
                fragments.clear()
    return found


def _dataset_context(command_field: int, transfer_syntax: str) -> int | None:
    contexts = DATASET_CONTEXTS
    for index, (field_, syntax) in enumerate(contexts):
        if (field_, syntax) == (command_field, transfer_syntax):
            return index
    return next((n for n, (_, syntax) in enumerate(contexts) if syntax == transfer_syntax), None)


def accepted_syntaxes(upstream: bytes) -> dict[int, str]:
    """Context ID -> transfer syntax, from the A-ASSOCIATE-AC of a transcript."""
    for raw in pdus(upstream):
        if raw[0] == 0x02:
            return {c.context_id: c.transfer_syntax for c in decode_ac(raw).contexts}
    return {}


def seeds(name: str, transcript: Transcript) -> Iterator[tuple[str, str, bytes]]:
    """(target, what, bytes) for every seed in one transcript."""
    requester, upstream = transcript.stream(REQUESTER), transcript.stream(UPSTREAM)
    syntaxes = accepted_syntaxes(upstream)
    for direction, stream in ((REQUESTER, requester), (UPSTREAM, upstream)):
        whole = pdus(stream)
        if stream:
            yield "framer", direction, stream[:MAX_SEED_BYTES]
        for raw in whole:
            kind = {0x01: "acse_rq", 0x02: "acse_ac"}.get(raw[0], "acse_rj")
            if raw[0] != 0x04:
                yield kind, f"{direction}-pdu{raw[0]}", raw
        for command in command_sets(stream):
            yield "dimse", direction, command
        for data_set in data_sets(stream, syntaxes):
            yield "dataset", direction, data_set
        data_phase = b"".join(raw for raw in whole if raw[0] >= 0x04)
        if data_phase:
            yield "stream", direction, data_phase[:MAX_SEED_BYTES]
    steps = [
        (FROM_REQUESTER if side == REQUESTER else FROM_UPSTREAM, data)
        for side, data in transcript.reads
    ]
    session = script(steps)
    if len(session) <= 4 * MAX_SEED_BYTES:
        yield "session", "transcript", session


def write_seeds(out: Path, name: str, found: Iterator[tuple[str, str, bytes]]) -> int:
    written = 0
    for target_name, what, data in found:
        directory = out / target_name
        directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(data).hexdigest()[:10]
        path = directory / f"{name}-{what}-{digest}.bin"
        if not any(directory.glob(f"*-{digest}.bin")):
            path.write_bytes(data)
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "corpus")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for name, (upstream, client) in SCENARIOS.items():
            with upstream() as port, tap(port) as (tap_port, transcripts):
                client(tap_port, work)
            for transcript in transcripts:
                count = write_seeds(args.out, name, seeds(name, transcript))
                sys.stdout.write(f"{name}: {len(transcript.reads)} reads, {count} new seeds\n")
        for name, header in haproxy_headers(work):
            count = write_seeds(args.out, "haproxy", iter([("proxy", name, header)]))
            sys.stdout.write(f"haproxy {name}: {len(header)} bytes, {count} new seeds\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
