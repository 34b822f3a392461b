"""Real peers for end-to-end tests: a PKI, a firewall on its own event loop, DICOM SCPs and SCUs.

Everything listens on 127.0.0.1 with port 0 (the kernel picks), every wait is bounded, and
every server is stopped by the context manager that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode

from dicomfw.core.session import Event
from dicomfw.core.uids import resolve
from dicomfw.observe.eventlog import log_observer
from dicomfw.pki import certs
from dicomfw.relay.server import AssociationInfo, Refused, Relay
from dicomfw.service.daemon import load_runtime

CT = resolve("CTImageStorage", "SOP Class")
MR = resolve("MRImageStorage", "SOP Class")
VERIFICATION = "1.2.840.10008.1.1"
FIND = resolve("StudyRootQueryRetrieveInformationModelFind", "SOP Class")
MOVE = resolve("StudyRootQueryRetrieveInformationModelMove", "SOP Class")
GET = resolve("StudyRootQueryRetrieveInformationModelGet", "SOP Class")
MPPS = resolve("ModalityPerformedProcedureStep", "SOP Class")

DCMTK = Path("/usr/bin")  # never the pyenv shims of the same names (pynetdicom's apps)
WAIT = 10.0  # seconds: the bound on every wait in these tests


@dataclass(frozen=True)
class Pki:
    """A site CA and certificates for every role, plus a stranger CA for refusals."""

    ca: Path
    ca_dir: Path
    fw_server: certs.CertPaths
    fw_client: certs.CertPaths
    pacs: certs.CertPaths
    modality: certs.CertPaths  # client cert bound to AE CT01
    remote: certs.CertPaths  # client cert bound to AE REMOTE
    stranger: certs.CertPaths  # client cert from another CA


def make_pki(directory: Path) -> Pki:
    ca_dir, other_dir, out = directory / "ca", directory / "other-ca", directory / "certs"
    certs.init_ca(ca_dir)
    certs.init_ca(other_dir, name="somebody else's CA")
    local = ["localhost"], ["127.0.0.1"]
    return Pki(
        ca=ca_dir / "ca.pem",
        ca_dir=ca_dir,
        fw_server=certs.issue(ca_dir, "fw-server", "server", out, *local),
        fw_client=certs.issue(ca_dir, "fw-client", "client", out),
        pacs=certs.issue(ca_dir, "pacs", "server", out, *local),
        modality=certs.issue(ca_dir, "ct01", "client", out, ae_title="CT01"),
        remote=certs.issue(ca_dir, "remote", "client", out, ae_title="REMOTE"),
        stranger=certs.issue(other_dir, "stranger", "client", out, ae_title="CT01"),
    )


def server_context(pki: Pki, pair: certs.CertPaths) -> ssl.SSLContext:
    """A TLS server context that requires a client certificate from the site CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert, pair.key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    pki: Pki, pair: certs.CertPaths | None, ca: Path | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca or pki.ca)
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)
    return context


# ---- the firewall ---------------------------------------------------------------------------


@dataclass
class Firewall:
    """A Relay on its own uvloop thread, configured from a real rules file."""

    rules: Path
    relay: Relay | None = None
    ports: dict[str, int] = field(default_factory=dict)
    events: list[tuple[AssociationInfo, Event | Refused]] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Firewall:
        import uvloop

        runtime = load_runtime(self.rules)
        started = threading.Event()
        failure: list[BaseException] = []

        def observe(info: AssociationInfo, event: Event | Refused) -> None:
            self.events.append((info, event))

        def run() -> None:
            loop = uvloop.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self.relay = Relay(runtime, [log_observer, observe])
            try:
                loop.run_until_complete(self.relay.start())
            except BaseException as error:  # reported to the test thread below
                failure.append(error)
                started.set()
                return
            self.ports = self.relay.bound_ports()
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.relay.stop(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="firewall", daemon=True)
        self._thread.start()
        assert started.wait(WAIT), "firewall did not start"
        if failure:
            raise failure[0]
        return self

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the firewall's loop and wait for it (e.g. a reload)."""
        assert self._loop is not None
        future: asyncio.Future[Any] = asyncio.run_coroutine_threadsafe(_call(function), self._loop)
        return future.result(WAIT)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(WAIT)

    def port(self, listener: str) -> int:
        return self.ports[listener]

    def wait_for(self, predicate: Callable[[Event | Refused], bool]) -> Event | Refused:
        """The first event matching ``predicate``, waiting at most WAIT seconds."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for _, event in list(self.events):
                if predicate(event):
                    return event
            time.sleep(0.01)
        raise AssertionError("expected firewall event did not happen")


async def _call(function: Callable[[], Any]) -> Any:
    return function()


@contextlib.contextmanager
def running_firewall(directory: Path, rules: str) -> Iterator[Firewall]:
    path = directory / "rules.yaml"
    path.write_text(rules)
    firewall = Firewall(path).start()
    try:
        yield firewall
    finally:
        firewall.stop()


# ---- pynetdicom peers -----------------------------------------------------------------------


@dataclass
class Scp:
    """A pynetdicom SCP that records what it received, byte for byte."""

    port: int
    stored: list[bytes]  # raw data sets as received
    requests: list[str]  # services invoked, in order
    server: Any

    def shutdown(self) -> None:
        self.server.shutdown()


@contextlib.contextmanager
def running_scp(
    ae_title: str = "PACS",
    ssl_context: ssl.SSLContext | None = None,
    sop_classes: tuple[str, ...] = (CT, MR, VERIFICATION, FIND, MOVE, GET, MPPS),
    find_results: int = 2,
    drop_on_echo: bool = False,
    store_status: int = 0x0000,
    transfer_syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
) -> Iterator[Scp]:
    """``drop_on_echo``: on a C-ECHO, close the TCP connection instead of answering (a PACS
    that crashes mid-association). ``store_status``: what every C-STORE is answered with.
    ``transfer_syntaxes``: what its contexts accept (an archive takes compressed ones too)."""
    stored: list[bytes] = []
    requests: list[str] = []

    def on_store(event: Any) -> int:
        requests.append("C-STORE")
        stored.append(event.request.DataSet.getvalue())
        return store_status

    def on_echo(event: Any) -> int:
        requests.append("C-ECHO")
        if drop_on_echo:
            event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
        return 0x0000

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        requests.append("C-FIND")
        for number in range(find_results):
            match = Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.StudyInstanceUID = f"1.2.3.{number + 1}"
            yield 0xFF00, match

    def on_get(event: Any) -> Iterator[Any]:
        requests.append("C-GET")
        yield 2
        for number in range(2):
            yield 0xFF00, ct_image(seed=number)

    def on_move(event: Any) -> Iterator[Any]:
        requests.append("C-MOVE")
        yield None, None  # unknown destination as far as this SCP is concerned
        return

    def on_n_create(event: Any) -> tuple[int, Dataset]:
        requests.append("N-CREATE")
        return 0x0000, event.attribute_list

    def on_n_set(event: Any) -> tuple[int, Dataset]:
        requests.append("N-SET")
        return 0x0000, event.modification_list

    ae = AE(ae_title=ae_title)
    ae.maximum_associations = 20
    ae.network_timeout = WAIT
    ae.acse_timeout = WAIT
    ae.dimse_timeout = WAIT
    for uid in sop_classes:
        ae.add_supported_context(uid, list(transfer_syntaxes))
    for uid in (CT, MR):
        ae.add_supported_context(
            uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian], scu_role=True, scp_role=True
        )
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        ssl_context=ssl_context,
        evt_handlers=[
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_C_ECHO, on_echo),
            (evt.EVT_C_FIND, on_find),
            (evt.EVT_C_GET, on_get),
            (evt.EVT_C_MOVE, on_move),
            (evt.EVT_N_CREATE, on_n_create),
            (evt.EVT_N_SET, on_n_set),
        ],
    )
    scp = Scp(server.socket.getsockname()[1], stored, requests, server)
    try:
        yield scp
    finally:
        scp.shutdown()


def ct_image(seed: int = 0, pixel_bytes: int = 20_000, sop_class: str = CT) -> Dataset:
    """A small but complete image; the pixel data varies with ``seed`` so copies differ."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(seed), str(pixel_bytes), sop_class])
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1.1"
    ds.PatientName = "Test^Firewall"
    ds.PatientID = "FW-0001"
    ds.Modality = "CT"
    ds.InstanceNumber = seed + 1
    ds.add_new(0x7FE00010, "OB", bytes((seed + i) % 251 for i in range(pixel_bytes)))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def encoded(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """How pynetdicom puts ``ds`` on the wire in ``transfer_syntax`` (for byte comparisons)."""
    raw = encode(ds, transfer_syntax == ImplicitVRLittleEndian, True)
    assert raw is not None
    return raw


def scu(ae_title: str = "CT01", contexts: tuple[str, ...] = (CT, VERIFICATION)) -> AE:
    ae = AE(ae_title=ae_title)
    ae.network_timeout = WAIT
    ae.acse_timeout = WAIT
    ae.dimse_timeout = WAIT
    for uid in contexts:
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


def tls_association(pki: Pki, port: int, ae: AE | None = None) -> Association:
    """The modality's association (CT01 by default) to PACS on a TLS listener, with its
    client certificate."""
    return (ae or scu()).associate(
        "127.0.0.1",
        port,
        ae_title="PACS",
        tls_args=(client_context(pki, pki.modality), "localhost"),
    )


def echo_works(port: int, calling: str = "CT01", called: str = "PACS") -> bool:
    """One complete association with a C-ECHO: the firewall is still serving."""
    association = scu(calling, (VERIFICATION,)).associate("127.0.0.1", port, ae_title=called)
    if not association.is_established:
        return False
    status = association.send_c_echo()
    association.release()
    return bool(status) and status.Status == 0x0000


# ---- DCMTK ----------------------------------------------------------------------------------


def dcmtk(tool: str, *args: str | Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool from Debian's package (never the pyenv shim) with Nagle off."""
    return subprocess.run(
        [str(DCMTK / tool), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TCP_NODELAY": "1"},
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def written(stream: IO[bytes], limit: int = 4000) -> str:
    """The end of what a helper process wrote to ``stream`` (a file it was given as its stderr),
    as text: the message of a test that failed because the helper did not start."""
    stream.flush()
    stream.seek(0)
    return _tail(stream.read(), limit)


def _tail(output: bytes | None, limit: int = 4000) -> str:
    text = (output or b"").decode(errors="replace").strip()
    return (text[-limit:] if len(text) > limit else text) or "(nothing on stderr)"


def stderr_text(process: subprocess.Popen[bytes]) -> str:
    """What a helper process started with ``stderr=PIPE`` wrote there, once it has stopped (it
    is killed first if it still runs, so the read ends)."""
    if process.poll() is None:
        process.kill()
    try:
        _, errors = process.communicate(timeout=2)
    except (subprocess.TimeoutExpired, ValueError):  # a grandchild holds it; read already
        return "(stderr could not be read)"
    return _tail(errors)


@contextlib.contextmanager
def running_process(*command: str | Path, ready_port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process and wait (bounded) until ``ready_port`` accepts connections.
    Its stderr is a pipe the caller may read once it has stopped it; when it does not start,
    the error shows what it wrote there."""
    process = subprocess.Popen(
        [str(part) for part in command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    try:
        deadline = time.monotonic() + WAIT
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", ready_port), 0.2).close()
                break
            exited = process.poll()
            if exited is not None or time.monotonic() > deadline:
                status = f"exit status {exited}" if exited is not None else "timed out"
                output = stderr_text(process)
                raise AssertionError(f"{command[0]} did not start ({status}): {output}")
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(WAIT)


# ---- rules files ----------------------------------------------------------------------------

PEERS = """\
  - {ae_title: CT01, networks: [127.0.0.0/8]}
  - {ae_title: REMOTE, networks: [127.0.0.0/8], certificate: {san_uri: "urn:dicom:ae:REMOTE"}}
  - {ae_title: FARAWAY, networks: [10.99.0.0/16, "2001:db8::/32"]}
"""
STORE_AND_ECHO = "[{services: [C-ECHO, C-STORE], sop_classes: [CTImageStorage]}]"


def rules(
    pki: Pki,
    upstream_port: int,
    *,
    listener_tls: bool = False,
    upstream_tls: bool = True,
    allow: str = STORE_AND_ECHO,
    peers: str = PEERS,
    limits: str = "{artim_seconds: 2, idle_seconds: 30, connect_timeout_seconds: 3}",
    rewrite: str = "",
) -> str:
    """A complete rules file: one listener, one upstream, one route to called AE PACS."""
    listener_tls_yaml = (
        f"{{cert: {pki.fw_server.cert}, key: {pki.fw_server.key}, ca: {pki.ca}}}"
        if listener_tls
        else "false"
    )
    upstream_tls_yaml = (
        f"{{ca: {pki.ca}, cert: {pki.fw_client.cert}, key: {pki.fw_client.key}}}"
        if upstream_tls
        else "false"
    )
    return f"""\
listeners:
  - {{name: front, bind: "127.0.0.1:0", tls: {listener_tls_yaml}}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {upstream_port}, tls: {upstream_tls_yaml}}}
peers:
{peers}
routes:
  - listener: front
    called_ae: PACS
    upstream: pacs
    allow: {allow}
{f"    rewrite: {rewrite}" if rewrite else ""}
limits: {limits}
"""


def daemon_rules(directory: Path, pki: Pki, upstream_port: int, port: int, **kw: Any) -> Path:
    """``rules(...)`` written to ``directory/rules.yaml`` with the listener on ``port``, for a
    ``dicomfw run`` process (which cannot report a port 0 back to the test)."""
    path = directory / "rules.yaml"
    path.write_text(
        rules(pki, upstream_port, **kw).replace('bind: "127.0.0.1:0"', f'bind: "127.0.0.1:{port}"')
    )
    return path


# ---- a raw DICOM client: exact bytes out, exact bytes back ------------------------------------


def associate_rq(
    calling: str, called: str, abstract_syntaxes: tuple[str, ...] = (VERIFICATION,)
) -> bytes:
    """An A-ASSOCIATE-RQ encoded by pynetdicom (an independent encoder from ours)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.10.999"
    primitive.user_information = [maximum, implementation]
    contexts = []
    for number, uid in enumerate(abstract_syntaxes):
        context = build_context(uid)
        context.context_id = 2 * number + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def exchange(port: int, data: bytes, *, tls: ssl.SSLContext | None = None) -> bytes:
    """Send ``data``, then read until the firewall closes (bounded): everything it answered."""
    with socket.create_connection(("127.0.0.1", port), WAIT) as raw:
        sock = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
        sock.settimeout(WAIT)
        sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    answer = bytearray()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        answer += chunk
    return bytes(answer)


def first_pdu(port: int, data: bytes) -> bytes:
    """Send ``data`` and return the first whole PDU of the answer (b"" if closed first)."""
    with socket.create_connection(("127.0.0.1", port), WAIT) as sock:
        sock.settimeout(WAIT)
        sock.sendall(data)
        header = sock.recv(6, socket.MSG_WAITALL)
        if len(header) < 6:
            return b""
        return header + sock.recv(int.from_bytes(header[2:], "big"), socket.MSG_WAITALL)


@contextlib.contextmanager
def slow_tcp_proxy(target_port: int, bytes_per_second: int) -> Iterator[int]:
    """A one-connection TCP proxy that reads from its client no faster than
    ``bytes_per_second``: an upstream that cannot keep up, to make backpressure visible."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    stop = threading.Event()

    def pump(source: socket.socket, sink: socket.socket, chunk: int, pause: float) -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                data = source.recv(chunk)
                if not data:
                    break
                sink.sendall(data)
                if pause:
                    time.sleep(pause)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", target_port), WAIT)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            threads = [
                threading.Thread(
                    target=pump,
                    args=(client, upstream, 16384, 16384 / bytes_per_second),
                    daemon=True,
                ),
                threading.Thread(target=pump, args=(upstream, client, 65536, 0), daemon=True),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            client.close()
            upstream.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        listener.close()
        server.join(WAIT)
