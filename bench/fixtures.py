"""Benchmark fixtures: a throw-away PKI, CT test files, a dicomfw rules file, a stunnel config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from procs import Service, free_port

from dicomfw.pki import certs

LOCALHOST = "127.0.0.1"
CALLING_AE = "CT01"
CALLED_AE = "PACS"


@dataclass(frozen=True)
class Pki:
    ca: Path
    scp_cert: Path  # storescp +tls and the tiny SCP
    scp_key: Path
    client_cert: Path  # storescu +tls and the lean client (direct)
    client_key: Path
    fw_cert: Path  # dicomfw's upstream client certificate
    fw_key: Path
    stunnel_cert: Path  # stunnel's client certificate
    stunnel_key: Path


def make_pki(directory: Path) -> Pki:
    """A CA plus one server and three client certificates (EC P-256, as ``dicomfw certs``)."""
    ca_dir, out = directory / "ca", directory / "certs"
    ca = certs.init_ca(ca_dir, name="dicomfw bench CA", days=7)
    scp = certs.issue(ca_dir, "scp", "server", out, dns=["localhost"], ips=[LOCALHOST], days=7)
    pairs = {
        name: certs.issue(ca_dir, name, "client", out, days=7)
        for name in ("client", "fw", "stunnel")
    }
    return Pki(
        ca=ca.cert,
        scp_cert=scp.cert,
        scp_key=scp.key,
        client_cert=pairs["client"].cert,
        client_key=pairs["client"].key,
        fw_cert=pairs["fw"].cert,
        fw_key=pairs["fw"].key,
        stunnel_cert=pairs["stunnel"].cert,
        stunnel_key=pairs["stunnel"].key,
    )


def _pixel_bytes(size: int) -> bytes:
    pattern = bytes(range(256)) * 16
    return (pattern * (size // len(pattern) + 1))[:size]


def make_ct_files(directory: Path, count: int, rows: int, columns: int) -> list[Path]:
    """``count`` CT Image Storage files (explicit VR LE, 16-bit, rows x columns), distinct UIDs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    pixels = _pixel_bytes(rows * columns * 2)
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.Modality = "BENCH^CT", "BENCH", "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.InstanceNumber = index + 1
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = pixels
        path = directory / f"ct{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


RULES = """\
# dicomfw benchmark rules: plain listener, mutual TLS upstream, full policy.
listeners:
  - name: modalities
    bind: {host}:{listen_port}
upstreams:
  pacs:
    host: {host}
    port: {upstream_port}
    tls: {{ca: {ca}, cert: {cert}, key: {key}}}
peers:
  - ae_title: {calling}
    networks: [127.0.0.0/8, 10.0.0.0/8]
  - ae_title: OTHER
    networks: [192.0.2.0/24]
routes:
  - listener: modalities
    called_ae: {called}
    upstream: pacs
    calling_ae: [{calling}]
    allow:
      - services: [C-ECHO, C-STORE]
        sop_classes: [CTImageStorage]
limits:
  max_pdu_bytes: 1048576
  artim_seconds: 30
  idle_seconds: 300
  connect_timeout_seconds: 10
  tls_handshake_seconds: 15
"""


def write_rules(path: Path, listen_port: int, upstream_port: int, pki: Pki) -> Path:
    path.write_text(
        RULES.format(
            host=LOCALHOST,
            listen_port=listen_port,
            upstream_port=upstream_port,
            ca=pki.ca,
            cert=pki.fw_cert,
            key=pki.fw_key,
            calling=CALLING_AE,
            called=CALLED_AE,
        )
    )
    return path


STUNNEL = """\
; stunnel in client mode: plain in on loopback, mutual TLS out, server verified.
foreground = yes
pid =
syslog = no
debug = 5
output = {log}
[dicom]
client = yes
accept = {host}:{accept_port}
connect = {host}:{connect_port}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
checkIP = {host}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""


def write_stunnel_conf(path: Path, accept_port: int, connect_port: int, pki: Pki) -> Path:
    path.write_text(
        STUNNEL.format(
            log=path.with_suffix(".log"),
            host=LOCALHOST,
            accept_port=accept_port,
            connect_port=connect_port,
            cert=pki.stunnel_cert,
            key=pki.stunnel_key,
            ca=pki.ca,
        )
    )
    return path


def start_tls_storescp(
    start: Callable[[str, list[str], int], Service], work: Path, pki: Pki
) -> Service:
    """DCMTK's storescp with mutual TLS, a process per association, writing nothing it
    receives (``--ignore``): the upstream the on/off benchmarks send through dicomfw to."""
    port = free_port()
    (work / "out").mkdir()
    argv = ["/usr/bin/storescp", "--fork", "--ignore", "-od", str(work / "out"), "+tls",
            str(pki.scp_key), str(pki.scp_cert), "+cf", str(pki.ca), str(port)]  # fmt: skip
    return start("storescp", argv, port)
