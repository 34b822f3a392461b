"""Content validation end to end: crafted objects refused with their status, real-world data
passed byte-identical, a malicious upstream's crafted answers kept from the requester, clamd
consulted for documents, and monitor mode letting all of it through while saying so."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from dicomfw.core.session import AssociationEnded, ContentRefused, WouldRefuse
from tests.contenthelpers import (
    BENIGN_PDF,
    CATALOG,
    CT,
    EICAR,
    ENCAPSULATED_PDF,
    EXPLICIT_LE,
    JPEG_BASELINE,
    PAGE,
    PAGES,
    PATIENT_FIND,
    WORKLIST,
    RawRequester,
    document,
    element,
    image,
    pdf,
    stream,
    text,
)
from tests.corehelpers import associate_rq, c_find_rq, c_store_rq
from tests.harness import VERIFICATION, WAIT, Pki, free_port, running_scp, written
from tests.obs_harness import observed_firewall, scrape, value

GOOD = "1.2.826.0.1.3680043.10.9.1"
SCP_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit)
CONTEXTS = [  # what the raw requester proposes (the contexts the cases use)
    (1, CT, [EXPLICIT_LE]),
    (3, CT, [JPEG_BASELINE]),
    (5, ENCAPSULATED_PDF, [EXPLICIT_LE]),
    (7, PATIENT_FIND, [EXPLICIT_LE]),
    (9, WORKLIST, [EXPLICIT_LE]),
]


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real clamd with a database of two signatures this test writes (no download here):
    the EICAR test string, and one of its own."""
    home = tmp_path_factory.mktemp("clamd")
    (home / "db").mkdir()
    marker = b"DICOMFW-TEST-MALWARE-MARKER"
    (home / "db" / "test.ndb").write_text(
        f"Dicomfw.Test.Eicar:0:*:{EICAR.hex()}\nDicomfw.Test.Marker:0:*:{marker.hex()}\n"
    )
    socket_path = home / "clamd.sock"
    (home / "clamd.conf").write_text(
        f"Foreground yes\nDatabaseDirectory {home / 'db'}\nLocalSocket {socket_path}\n"
        f"PidFile {home / 'clamd.pid'}\nStreamMaxLength 64M\n"
    )
    with (home / "clamd.stderr").open("w+b") as errors:
        process = subprocess.Popen(
            ["/usr/sbin/clamd", f"--config-file={home / 'clamd.conf'}"],
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert process.poll() is None, f"clamd did not start: {written(errors)}"
            assert time.monotonic() < deadline, f"clamd did not open its socket: {written(errors)}"
            time.sleep(0.1)
    yield f"unix:{socket_path}"
    process.send_signal(signal.SIGTERM)
    process.wait(WAIT)


def content_rules(pacs_port: int, clamd: str, audit: Path, mode: str = "enforce") -> str:
    return f"""\
mode: {mode}
validation:
  universal_match: {{PATIENT: [PatientID]}}
  max_depth: 8
  max_instance_bytes: 200000
  scan: documents
  scanner: {{address: "{clamd}", timeout_seconds: 10}}
listeners:
  - {{name: front, bind: "127.0.0.1:0"}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs_port}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8]}}
routes:
  - listener: front
    called_ae: PACS
    upstream: pacs
    allow: [{{services: [C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE]}}]
limits: {{artim_seconds: 5, idle_seconds: 30, connect_timeout_seconds: 3}}
metrics: {{bind: "127.0.0.1:0"}}
audit: {{file: {audit}}}
"""


def nested(depth: int) -> bytes:
    """``depth`` sequences inside each other, undefined lengths all the way."""
    inner = b""
    for _ in range(depth):
        item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        inner = (
            struct.pack("<HH2sxxL", 0x0008, 0x1115, b"SQ", 0xFFFFFFFF)
            + item
            + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        )
    return inner


def bad_fragments() -> bytes:
    """Encapsulated Pixel Data whose second item has the wrong tag."""
    items = (
        b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # Basic Offset Table, empty
        + b"\x08\x00\x10\x00\x04\x00\x00\x00\xff\xd8\xff\xd9"  # not an item
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    return struct.pack("<HH2sxxL", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF) + items


def query(level: str, **keys: str) -> bytes:
    elements = {0x00080052: text(0x00080052, "CS", level)}
    tags = {"PatientID": (0x00100020, "LO"), "PatientName": (0x00100010, "PN")}
    for keyword, key_value in keys.items():
        tag, vr = tags[keyword]
        elements[tag] = text(tag, vr, key_value)
    return b"".join(elements[tag] for tag in sorted(elements))


def store_case(data: bytes, context: int = 1) -> Callable[[RawRequester], None]:
    def send(requester: RawRequester) -> None:
        sop_class = ENCAPSULATED_PDF if context == 5 else CT
        requester.send(context, c_store_rq(1, sop_class, GOOD), data)

    return send


def find_case(identifier: bytes, context: int) -> Callable[[RawRequester], None]:
    def send(requester: RawRequester) -> None:
        sop_class = PATIENT_FIND if context == 7 else WORKLIST
        requester.send(context, c_find_rq(1, sop_class), identifier)

    return send


ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(56)
PRIVATE_ELF = {
    0x00090010: text(0x00090010, "LO", "ACME 1.0"),
    0x00091010: element(0x00091010, "OB", ELF),
}
# name: (what the requester sends, the check that refuses it, the status it is answered with)
CASES: dict[str, tuple[Callable[[RawRequester], None], str, int]] = {
    "UID with ../": (store_case(image(GOOD, study="1.2.3/../../etc")), "uid_syntax", 0xC000),
    "UID with shell characters": (
        store_case(image(GOOD, study="1.2;rm -rf /")),
        "uid_syntax",
        0xC000,
    ),
    "UID of 65 characters": (store_case(image(GOOD, study="1." * 32 + "1")), "uid_syntax", 0xC000),
    "command and data set SOP instances differ": (
        store_case(image("1.2.826.0.1.3680043.10.9.2")),
        "sop_instance_mismatch",
        0xA900,
    ),
    "pixel data one byte short": (
        store_case(image(GOOD, rows=3, columns=3, bits=8, pixels=bytes(8))),
        "pixel_data_length",
        0xC000,
    ),
    "pixel data one frame long": (
        store_case(image(GOOD, frames=1, pixels=bytes(2 * 16 * 16 * 2))),
        "pixel_data_length",
        0xC000,
    ),
    "a bad fragment item": (
        store_case(image(GOOD)[: image(GOOD).index(b"\xe0\x7f\x10\x00")] + bad_fragments(), 3),
        "encapsulated_fragments",
        0xC000,
    ),
    "a sequence length overrun": (
        store_case(
            image(
                GOOD,
                extra={
                    0x00081115: struct.pack("<HH2sxxL", 0x0008, 0x1115, b"SQ", 16)
                    + b"\xfe\xff\x00\xe0\x64\x00\x00\x00"
                    + bytes(8)
                },
            )
        ),
        "length_overrun",
        0xC000,
    ),
    "nesting over the bound": (
        store_case(image(GOOD, extra={0x00081115: nested(12)})),
        "nesting_depth",
        0xC000,
    ),
    "an oversized instance": (
        store_case(image(GOOD, rows=256, columns=512)),
        "instance_size",
        0xA700,
    ),
    "a universal match on PatientID": (
        find_case(query("PATIENT", PatientID="*"), 7),
        "universal_match",
        0x0124,
    ),
    "an invalid query level": (find_case(query("FOO", PatientID="12"), 7), "query_level", 0xA900),
    "a worklist query with illegal characters": (
        find_case(text(0x00100010, "PN", "Doe\x07^John"), 9),  # no level in a worklist query
        "worklist_characters",
        0xA900,
    ),
    "a PDF with /JavaScript": (
        store_case(
            document(
                GOOD,
                pdf(
                    b"<< /Type /Catalog /Pages 2 0 R /OpenAction 5 0 R >>",
                    PAGES,
                    PAGE,
                    stream(b"BT ET"),
                    b"<< /S /JavaScript /JS (app.alert(1)) >>",
                ),
            ),
            5,
        ),
        "pdf_active_content",
        0x0124,
    ),
    "a PDF with an embedded file": (
        store_case(
            document(
                GOOD,
                pdf(
                    CATALOG,
                    PAGES,
                    PAGE,
                    stream(b"BT ET"),
                    stream(b"MZ payload", b"/Type /EmbeddedFile"),
                ),
            ),
            5,
        ),
        "pdf_active_content",
        0x0124,
    ),
    "an ELF in a private OB element": (
        store_case(image(GOOD, extra=PRIVATE_ELF)),
        "executable_content",
        0x0124,
    ),
    "the EICAR file in an Encapsulated PDF, through clamd": (
        store_case(document(GOOD, BENIGN_PDF.replace(b"%%EOF", b"% " + EICAR + b"\n%%EOF")), 5),
        "malware",
        0x0124,
    ),
}


def valid_store(requester: RawRequester, pacs_stored: list[bytes], message_id: int = 2) -> None:
    """A valid instance on the same association after a refusal: stored, byte for byte."""
    data = image(GOOD)
    requester.send(1, c_store_rq(message_id, CT, GOOD), data)
    answer = requester.answer()
    assert answer.status == 0x0000, answer.command
    assert pacs_stored[-1] == data


@contextlib.contextmanager
def content_firewall(
    tmp_path: Path, clamd: str, mode: str = "enforce"
) -> Iterator[tuple[object, object, list[bytes], Path]]:
    audit = tmp_path / f"audit-{mode}.jsonl"
    sop_classes = (CT, ENCAPSULATED_PDF, PATIENT_FIND, WORKLIST, VERIFICATION)
    with running_scp(sop_classes=sop_classes, transfer_syntaxes=SCP_SYNTAXES) as pacs:
        rules = content_rules(pacs.port, clamd, audit, mode)
        with observed_firewall(tmp_path, rules) as (firewall, observability):
            yield firewall, observability, pacs.stored, audit


@pytest.mark.parametrize("case", CASES)
def test_a_crafted_object_is_refused_with_its_status_and_the_next_valid_one_is_stored(
    tmp_path: Path, pki: Pki, clamd: str, case: str
) -> None:
    send, check, status = CASES[case]
    with content_firewall(tmp_path, clamd) as (firewall, _, stored, _audit):
        rq = associate_rq("CT01", "PACS", CONTEXTS)
        with RawRequester(firewall.port("front"), rq) as requester:  # type: ignore[attr-defined]
            send(requester)
            answer = requester.answer()
            before = len(stored)
            valid_store(requester, stored)
            assert len(stored) == before + 1
    assert (answer.status, answer.comment) == (status, f"dicomfw: {check}"), answer.command
    refused = [e for _, e in firewall.events if isinstance(e, ContentRefused)]  # type: ignore[attr-defined]
    assert [(e.check, e.action) for e in refused] == [(check, "refused")]
    assert all(GOOD not in s.decode("latin-1") or s == image(GOOD) for s in stored)


def test_monitor_mode_lets_every_crafted_object_through_and_reports_each(
    tmp_path: Path, pki: Pki, clamd: str
) -> None:
    with content_firewall(tmp_path, clamd, "monitor") as (firewall, observability, stored, audit):
        for case, (send, check, _) in CASES.items():
            rq = associate_rq("CT01", "PACS", CONTEXTS)
            with RawRequester(firewall.port("front"), rq) as requester:  # type: ignore[attr-defined]
                send(requester)
                answer = requester.answer()
                assert answer.comment != f"dicomfw: {check}", case  # the PACS answered
        samples = scrape(observability.server.port)  # type: ignore[attr-defined]
    reported = [e for _, e in firewall.events if isinstance(e, WouldRefuse)]  # type: ignore[attr-defined]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    audited = {r["reason"] for r in records if r["event"] == "would_refuse"}
    for case, (_, check, _) in CASES.items():
        assert any(e.why == check and e.stage == "content" for e in reported), case
        assert check in audited, case
        assert value(samples, "dicomfw_would_refuse_total", stage="content", reason=check) >= 1
    assert not any(isinstance(e, ContentRefused) for _, e in firewall.events)  # type: ignore[attr-defined]
    assert len(stored) >= 12  # the stores reached the PACS


def test_clamd_out_of_reach_under_fail_open_passes_the_document_and_counts_it(
    tmp_path: Path, pki: Pki
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with content_firewall(tmp_path, dead) as (firewall, observability, stored, _audit):
        rq = associate_rq("CT01", "PACS", CONTEXTS)
        with RawRequester(firewall.port("front"), rq) as requester:  # type: ignore[attr-defined]
            data = document(GOOD, BENIGN_PDF)
            requester.send(5, c_store_rq(1, ENCAPSULATED_PDF, GOOD), data)
            assert requester.answer().status == 0x0000
        samples = scrape(observability.server.port)  # type: ignore[attr-defined]
    assert stored == [data]
    assert value(samples, "dicomfw_scans_total", result="error") == 1


def test_a_benign_pdf_is_scanned_and_stored_byte_identical(
    tmp_path: Path, pki: Pki, clamd: str
) -> None:
    with content_firewall(tmp_path, clamd) as (firewall, observability, stored, _audit):
        rq = associate_rq("CT01", "PACS", CONTEXTS)
        with RawRequester(firewall.port("front"), rq) as requester:  # type: ignore[attr-defined]
            data = document(GOOD, BENIGN_PDF)
            requester.send(5, c_store_rq(1, ENCAPSULATED_PDF, GOOD), data, piece=200)
            assert requester.answer().status == 0x0000
        samples = scrape(observability.server.port)  # type: ignore[attr-defined]
    assert stored == [data]
    assert value(samples, "dicomfw_scans_total", result="clean") == 1
    assert os.environ.get("DICOMFW_NEVER") is None  # (no environment switch bypasses the scan)
    assert not any(
        isinstance(e, AssociationEnded) and e.how == "aborted" for _, e in firewall.events
    )  # type: ignore[attr-defined]
