"""Content validation end to end: crafted objects refused with their status, real-world data
passed byte-identical, a malicious upstream's crafted answers kept from the requester, clamd
consulted for documents, and monitor mode letting all of it through while saying so."""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
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
    RawPeer,
    RawRequester,
    ScriptedUpstream,
    document,
    element,
    image,
    pdf,
    stream,
    text,
)
from tests.corehelpers import associate_rq, c_find_rq, c_get_rq, c_store_rq, c_store_rsp
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


def content_rules(
    pacs_port: int,
    clamd: str,
    audit: Path,
    mode: str = "enforce",
    max_instance_bytes: int = 200_000,
) -> str:
    return f"""\
mode: {mode}
validation:
  universal_match: {{PATIENT: [PatientID]}}
  max_depth: 8
  max_instance_bytes: {max_instance_bytes}
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


@dataclass(frozen=True)
class Case:
    """A crafted data set, the context it goes on (1, 3, 5: a C-STORE of CT, CT in JPEG, an
    Encapsulated PDF; 7, 9: a C-FIND of Patient Root, of Modality Worklist), the check that
    refuses it and the status its request is answered with."""

    data: bytes
    context: int
    check: str
    status: int

    @property
    def is_store(self) -> bool:
        return self.context in (1, 3, 5)

    @property
    def sop_class(self) -> str:
        return {1: CT, 3: CT, 5: ENCAPSULATED_PDF, 7: PATIENT_FIND, 9: WORKLIST}[self.context]

    def send(self, requester: RawPeer) -> None:
        command = (
            c_store_rq(1, self.sop_class, GOOD) if self.is_store else c_find_rq(1, self.sop_class)
        )
        requester.send(self.context, command, self.data)


ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(56)
PRIVATE_ELF = {
    0x00090010: text(0x00090010, "LO", "ACME 1.0"),
    0x00091010: element(0x00091010, "OB", ELF),
}
CASES: dict[str, Case] = {
    "UID with ../": Case(image(GOOD, study="1.2.3/../../etc"), 1, "uid_syntax", 0xC000),
    "UID with shell characters": Case(image(GOOD, study="1.2;rm -rf /"), 1, "uid_syntax", 0xC000),
    "UID of 65 characters": Case(image(GOOD, study="1." * 32 + "1"), 1, "uid_syntax", 0xC000),
    "command and data set SOP instances differ": Case(
        image("1.2.826.0.1.3680043.10.9.2"), 1, "sop_instance_mismatch", 0xA900
    ),
    "pixel data one byte short": Case(
        image(GOOD, rows=3, columns=3, bits=8, pixels=bytes(8)), 1, "pixel_data_length", 0xC000
    ),
    "pixel data one frame long": Case(
        image(GOOD, frames=1, pixels=bytes(2 * 16 * 16 * 2)), 1, "pixel_data_length", 0xC000
    ),
    "a bad fragment item": Case(
        image(GOOD)[: image(GOOD).index(b"\xe0\x7f\x10\x00")] + bad_fragments(),
        3,
        "encapsulated_fragments",
        0xC000,
    ),
    "a sequence length overrun": Case(
        image(
            GOOD,
            extra={
                0x00081115: struct.pack("<HH2sxxL", 0x0008, 0x1115, b"SQ", 16)
                + b"\xfe\xff\x00\xe0\x64\x00\x00\x00"
                + bytes(8)
            },
        ),
        1,
        "length_overrun",
        0xC000,
    ),
    "nesting over the bound": Case(
        image(GOOD, extra={0x00081115: nested(12)}), 1, "nesting_depth", 0xC000
    ),
    "an oversized instance": Case(image(GOOD, rows=256, columns=512), 1, "instance_size", 0xA700),
    "a universal match on PatientID": Case(
        query("PATIENT", PatientID="*"), 7, "universal_match", 0x0124
    ),
    "an invalid query level": Case(query("FOO", PatientID="12"), 7, "query_level", 0xA900),
    "a worklist query with illegal characters": Case(
        text(0x00100010, "PN", "Doe\x07^John"), 9, "worklist_characters", 0xA900
    ),
    "a PDF with /JavaScript": Case(
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
        "pdf_active_content",
        0x0124,
    ),
    "a PDF with an embedded file": Case(
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
        "pdf_active_content",
        0x0124,
    ),
    "an ELF in a private OB element": Case(
        image(GOOD, extra=PRIVATE_ELF), 1, "executable_content", 0x0124
    ),
    "the EICAR file in an Encapsulated PDF, through clamd": Case(
        document(GOOD, BENIGN_PDF.replace(b"%%EOF", b"% " + EICAR + b"\n%%EOF")),
        5,
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
    tmp_path: Path, clamd: str, mode: str = "enforce", upstream_port: int | None = None
) -> Iterator[tuple[object, object, list[bytes], Path]]:
    """The firewall validating content in front of a pynetdicom PACS (what it stored is the
    third value), or in front of the upstream at ``upstream_port``."""
    audit = tmp_path / f"audit-{mode}.jsonl"
    sop_classes = (CT, ENCAPSULATED_PDF, PATIENT_FIND, WORKLIST, VERIFICATION)
    with contextlib.ExitStack() as stack:
        stored: list[bytes] = []
        if upstream_port is None:
            pacs = stack.enter_context(
                running_scp(sop_classes=sop_classes, transfer_syntaxes=SCP_SYNTAXES)
            )
            upstream_port, stored = pacs.port, pacs.stored
        rules = content_rules(upstream_port, clamd, audit, mode)
        with observed_firewall(tmp_path, rules) as (firewall, observability):
            yield firewall, observability, stored, audit


@pytest.mark.parametrize("case", CASES)
def test_a_crafted_object_is_refused_with_its_status_and_the_next_valid_one_is_stored(
    tmp_path: Path, pki: Pki, clamd: str, case: str
) -> None:
    check, status = CASES[case].check, CASES[case].status
    with content_firewall(tmp_path, clamd) as (firewall, _, stored, _audit):
        rq = associate_rq("CT01", "PACS", CONTEXTS)
        with RawRequester(firewall.port("front"), rq) as requester:  # type: ignore[attr-defined]
            CASES[case].send(requester)
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
        for case, crafted in CASES.items():
            rq = associate_rq("CT01", "PACS", CONTEXTS)
            with RawRequester(firewall.port("front"), rq) as requester:  # type: ignore[attr-defined]
                crafted.send(requester)
                answer = requester.answer()
                assert answer.comment != f"dicomfw: {crafted.check}", case  # the PACS answered
        samples = scrape(observability.server.port)  # type: ignore[attr-defined]
    reported = [e for _, e in firewall.events if isinstance(e, WouldRefuse)]  # type: ignore[attr-defined]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    audited = {r["reason"] for r in records if r["event"] == "would_refuse"}
    for case, check in ((name, crafted.check) for name, crafted in CASES.items()):
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
    assert not any(
        isinstance(e, AssociationEnded) and e.how == "aborted" for _, e in firewall.events
    )  # type: ignore[attr-defined]


# ---- a malicious upstream ---------------------------------------------------------------------

PATIENT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STORE_CASES = {name: case for name, case in CASES.items() if case.is_store}


def study_answer(study: str, extra: bytes = b"") -> bytes:
    """A C-FIND answer at STUDY level (Patient Root) naming ``study``; ``extra``: elements
    after the Study Instance UID."""
    return (
        text(0x00080052, "CS", "STUDY")
        + text(0x00100020, "LO", "12")
        + text(0x0020000D, "UI", study)
        + extra
    )


#: name: (a pending C-FIND answer of the upstream, the check that refuses it)
FIND_ANSWERS = {
    "UID with ../": (study_answer("1.2.3/../../etc"), "uid_syntax"),
    "UID with shell characters": (study_answer("1.2;rm -rf /"), "uid_syntax"),
    "UID of 65 characters": (study_answer("1." * 32 + "1"), "uid_syntax"),
    "a key below the answer's level": (
        study_answer(GOOD, text(0x00200013, "IS", "1")),  # Instance Number at STUDY level
        "query_keys",
    ),
    "an ELF in a private OB element": (
        text(0x00080052, "CS", "STUDY")
        + b"".join(PRIVATE_ELF.values())  # group 0009, in its place
        + text(0x00100020, "LO", "12")
        + text(0x0020000D, "UI", GOOD),
        "executable_content",
    ),
}


def test_crafted_sub_operations_of_a_malicious_upstream_never_reach_the_requester(
    tmp_path: Path, pki: Pki, clamd: str
) -> None:
    """Each C-GET is answered with a crafted C-STORE sub-operation, then a valid one: the
    firewall answers the crafted one itself with its failure status, and the requester
    receives only the valid one, byte for byte."""
    valid = (1, CT, GOOD, image(GOOD))
    gets = [
        [(case.context, case.sop_class, GOOD, case.data), valid] for case in STORE_CASES.values()
    ]
    contexts = [*CONTEXTS, (11, PATIENT_GET, [EXPLICIT_LE])]
    with (
        ScriptedUpstream(gets, finds=[]) as upstream,
        content_firewall(tmp_path, clamd, upstream_port=upstream.port) as (firewall, _, _, _),
    ):
        rq = associate_rq("CT01", "PACS", contexts, roles=(CT, ENCAPSULATED_PDF))
        with RawRequester(firewall.port("front"), rq) as requester:  # type: ignore[attr-defined]
            for number, name in enumerate(STORE_CASES, 1):
                identifier = text(0x00080052, "CS", "PATIENT") + text(0x00100020, "LO", "12")
                requester.send(11, c_get_rq(number, PATIENT_GET), identifier)
                received = []
                while int((message := requester.answer()).command.CommandField) == 0x0001:
                    received.append(message.data_set)
                    command = message.command
                    answer = c_store_rsp(
                        int(command.MessageID),
                        0x0000,
                        str(command.AffectedSOPClassUID),
                        str(command.AffectedSOPInstanceUID),
                    )
                    requester.send(message.context_id, answer, None)
                assert (int(message.command.CommandField), message.status) == (0x8010, 0), name
                assert received == [valid[3]], name
    expected = [status for case in STORE_CASES.values() for status in (case.status, 0x0000)]
    assert upstream.store_statuses == expected
    refused = [e for _, e in firewall.events if isinstance(e, ContentRefused)]  # type: ignore[attr-defined]
    assert [(e.side, e.check, e.action) for e in refused] == [
        ("upstream", case.check, "refused") for case in STORE_CASES.values()
    ]


def test_crafted_c_find_answers_of_a_malicious_upstream_never_reach_the_requester(
    tmp_path: Path, pki: Pki, clamd: str
) -> None:
    """A crafted pending answer is replaced by a failure toward the requester and its query is
    cancelled at the upstream; the next query's valid answer passes byte for byte."""
    valid = study_answer(GOOD)
    finds = [answers for crafted, _ in FIND_ANSWERS.values() for answers in ([crafted], [valid])]
    with (
        ScriptedUpstream(gets=[], finds=finds) as upstream,
        content_firewall(tmp_path, clamd, upstream_port=upstream.port) as (firewall, _, _, _),
    ):
        rq = associate_rq("CT01", "PACS", CONTEXTS)
        with RawRequester(firewall.port("front"), rq) as requester:  # type: ignore[attr-defined]
            for number, (name, (_, check)) in enumerate(FIND_ANSWERS.items()):
                query_identifier = study_answer("")
                requester.send(7, c_find_rq(2 * number + 1, PATIENT_FIND), query_identifier)
                answer = requester.answer()
                assert (answer.comment, answer.data_set) == (f"dicomfw: {check}", b""), name
                assert answer.status not in (0x0000, 0xFF00, 0xFF01), name
                requester.send(7, c_find_rq(2 * number + 2, PATIENT_FIND), query_identifier)
                answer = requester.answer()
                assert (answer.status, answer.data_set) == (0xFF00, valid), name
                assert requester.answer().status == 0x0000, name
    assert upstream.cancelled == [2 * n + 1 for n in range(len(FIND_ANSWERS))]
    refused = [e for _, e in firewall.events if isinstance(e, ContentRefused)]  # type: ignore[attr-defined]
    assert [(e.side, e.check, e.action) for e in refused] == [
        ("upstream", check, "replaced") for _, check in FIND_ANSWERS.values()
    ]


# ---- real-world data --------------------------------------------------------------------------

#: pydicom's test files: (file, what it stands for)
REAL_WORLD = {
    "CT_small.dcm": "CT, explicit VR little endian",
    "MR_small_implicit.dcm": "MR, implicit VR little endian",
    "MR_small_bigendian.dcm": "MR, explicit VR big endian",
    "SC_rgb_jpeg_dcmtk.dcm": "secondary capture, JPEG baseline (encapsulated)",
    "JPEG2000.dcm": "secondary capture, JPEG 2000",
    "MR_small_RLE.dcm": "MR, RLE lossless",
    "image_dfl.dcm": "secondary capture, deflated explicit VR little endian",
    "rtdose.dcm": "RT dose, 15 frames, native implicit VR",
    "examples_ybr_color.dcm": "ultrasound multi-frame, 30 JPEG frames over several PDUs",
    "SC_rgb_rle_2frame.dcm": "secondary capture, 2 RLE frames",
}


def file_data_set(name: str) -> tuple[str, str, str, bytes]:
    """(SOP class, SOP instance, transfer syntax, the data set's bytes as in the file) of one
    of pydicom's test files: what a modality would send of it."""
    path = get_testdata_file(name)
    assert path is not None, name
    raw = Path(path).read_bytes()
    assert raw[128:136] == b"DICM\x02\x00\x00\x00", f"{name}: no preamble and group length"
    group_length = int.from_bytes(raw[140:144], "little")
    meta = dcmread(path, stop_before_pixels=True)
    return (
        str(meta.SOPClassUID),
        str(meta.SOPInstanceUID),
        str(meta.file_meta.TransferSyntaxUID),
        raw[144 + group_length :],
    )


def test_real_world_data_passes_untouched_and_byte_identical(
    tmp_path: Path, pki: Pki, clamd: str
) -> None:
    files = [file_data_set(name) for name in REAL_WORLD]
    contexts = [
        (2 * n + 1, sop_class, [syntax]) for n, (sop_class, _, syntax, _) in enumerate(files)
    ]
    audit = tmp_path / "audit.jsonl"
    sop_classes = tuple(sorted({f[0] for f in files}))
    syntaxes = tuple(sorted({f[2] for f in files}))
    with running_scp(sop_classes=sop_classes, transfer_syntaxes=syntaxes) as pacs:
        rules = content_rules(pacs.port, clamd, audit, max_instance_bytes=1_000_000)
        with observed_firewall(tmp_path, rules) as (firewall, _):
            rq = associate_rq("CT01", "PACS", contexts)
            with RawRequester(firewall.port("front"), rq) as requester:  # type: ignore[attr-defined]
                assert requester.accepted == {c[0]: c[2][0] for c in contexts}
                for (context_id, _, _), (sop_class, instance, _, data), name in zip(
                    contexts, files, REAL_WORLD, strict=True
                ):
                    requester.send(context_id, c_store_rq(context_id, sop_class, instance), data)
                    answer = requester.answer()
                    assert answer.status == 0x0000, (name, answer.command)
        stored = pacs.stored
    assert stored == [data for *_, data in files]
    events = [e for _, e in firewall.events]  # type: ignore[attr-defined]
    assert not [e for e in events if isinstance(e, (ContentRefused, WouldRefuse))]
    assert not [e for e in events if isinstance(e, AssociationEnded) and e.how == "aborted"]
