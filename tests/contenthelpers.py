"""Crafted DICOM data sets for the content-validation tests, and a raw requester to send them.

The data sets are built element by element (explicit VR little endian), so a test can make what
pydicom would refuse to write: a UID with ``../``, a length that overruns its sequence, pixel data
one byte short. The requester speaks raw PDUs over a socket and reads the firewall's answer as
pydicom decodes it, so nothing between the test and the firewall tidies the bytes up.
"""

from __future__ import annotations

import socket
import struct
import threading
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Self

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode

from tests.corehelpers import (
    associate_ac,
    c_find_rsp,
    c_get_rsp,
    c_store_rq,
    decoded_rq,
)
from tests.harness import WAIT

CT = "1.2.840.10008.5.1.4.1.1.2"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
WORKLIST = "1.2.840.10008.5.1.4.31"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}


# ---- data sets, element by element ----------------------------------------------------------


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit VR little endian element (PS3.5 §7.1.2), the value as given."""
    group, number = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sxxL", group, number, vr.encode(), len(value)) + value
    return struct.pack("<HH2sH", group, number, vr.encode(), len(value)) + value


def text(tag: int, vr: str, value: str) -> bytes:
    raw = value.encode("latin-1")
    pad = b"\x00" if vr == "UI" else b" "
    return element(tag, vr, raw + pad * (len(raw) % 2))


def us(tag: int, value: int) -> bytes:
    return element(tag, "US", struct.pack("<H", value))


def image(
    instance: str,
    *,
    sop_class: str = CT,
    study: str = "1.2.826.0.1.3680043.10.9",
    rows: int = 16,
    columns: int = 16,
    bits: int = 16,
    frames: int | None = None,
    pixels: bytes | None = None,
    extra: dict[int, bytes] | None = None,
) -> bytes:
    """A small image whose Pixel Data is exactly as long as its attributes say, unless
    ``pixels`` says otherwise; ``extra`` adds elements by tag (all are written in tag order)."""
    size = rows * columns * (bits // 8) * (frames or 1)
    data = pixels if pixels is not None else bytes(i % 251 for i in range(size))
    elements = {
        0x00080016: text(0x00080016, "UI", sop_class),
        0x00080018: text(0x00080018, "UI", instance),
        0x00080060: text(0x00080060, "CS", "CT"),
        0x0020000D: text(0x0020000D, "UI", study),
        0x00280002: us(0x00280002, 1),
        0x00280004: text(0x00280004, "CS", "MONOCHROME2"),
        0x00280010: us(0x00280010, rows),
        0x00280011: us(0x00280011, columns),
        0x00280100: us(0x00280100, bits),
        0x00280101: us(0x00280101, bits),
        0x00280102: us(0x00280102, bits - 1),
        0x00280103: us(0x00280103, 0),
        0x7FE00010: element(
            0x7FE00010, "OW" if bits > 8 else "OB", data + b"\x00" * (len(data) % 2)
        ),
    }
    if frames:
        elements[0x00280008] = text(0x00280008, "IS", str(frames))
    elements.update(extra or {})
    return b"".join(elements[tag] for tag in sorted(elements))


def pdf(*objects: bytes) -> bytes:
    body = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
    for number, one in enumerate(objects, 1):
        body += b"%d 0 obj\n" % number + one + b"\nendobj\n"
    return body + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"


def stream(content: bytes, dictionary: bytes = b"") -> bytes:
    data = zlib.compress(content)
    return b"<< %s /Filter /FlateDecode /Length %d >>\nstream\n" % (dictionary, len(data)) + (
        data + b"\nendstream"
    )


CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"
PAGES = b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>"
PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>"
BENIGN_PDF = pdf(CATALOG, PAGES, PAGE, stream(b"BT /F1 12 Tf 72 712 Td (Report) Tj ET"))


def document(instance: str, content: bytes, mime: str = "application/pdf") -> bytes:
    """An Encapsulated PDF instance (PS3.3 A.45.1) carrying ``content``."""
    value = content + b"\x00" * (len(content) % 2)
    return (
        text(0x00080016, "UI", ENCAPSULATED_PDF)
        + text(0x00080018, "UI", instance)
        + text(0x0020000D, "UI", "1.2.826.0.1.3680043.10.9")
        + element(0x00420011, "OB", value)
        + text(0x00420012, "LO", mime)
    )


# ---- a raw requester ------------------------------------------------------------------------


@dataclass
class Answer:
    """A response command set the firewall (or the PACS through it) sent."""

    command: Dataset
    data_set: bytes
    context_id: int = 0

    @property
    def status(self) -> int:
        return int(self.command.Status)

    @property
    def comment(self) -> str:
        return str(self.command.get("ErrorComment", ""))


def message_pdus(
    context_id: int, command: bytes, data_set: bytes | None, piece: int = 16_000
) -> bytes:
    """A DIMSE message as P-DATA-TF PDUs: its command, then its data set in ``piece`` bytes."""
    pdus = [_p_data(context_id, 0x03, command)]
    if data_set is not None:
        chunks = [data_set[i : i + piece] for i in range(0, len(data_set), piece)] or [b""]
        pdus += [
            _p_data(context_id, 0x02 if n == len(chunks) - 1 else 0x00, chunk)
            for n, chunk in enumerate(chunks)
        ]
    return b"".join(pdus)


class RawPeer:
    """One side of an established association over a plain socket: exact PDUs out, messages
    read back as pydicom decodes their command sets."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(WAIT)

    def read_pdu(self) -> tuple[int, bytes]:
        header = self.sock.recv(6, socket.MSG_WAITALL)
        if len(header) < 6:
            raise ConnectionError("the peer closed the connection")
        length = int.from_bytes(header[2:], "big")
        return header[0], self.sock.recv(length, socket.MSG_WAITALL) if length else b""

    def send(
        self, context_id: int, command: bytes, data_set: bytes | None, piece: int = 16_000
    ) -> None:
        self.sock.sendall(message_pdus(context_id, command, data_set, piece))

    def answer(self) -> Answer:
        """The next message toward us (a response, or a request of the other side), with its
        data set if it has one."""
        message = self.next_message()
        if message is None:
            raise ConnectionError("the peer asked to release the association")
        return message

    def next_message(self) -> Answer | None:
        """``answer()``, or None when the other side asks to release (it gets its A-RELEASE-RP)."""
        command, data = bytearray(), bytearray()
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type == 0x05:
                self.sock.sendall(bytes((0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
                return None
            if pdu_type != 0x04:
                raise ConnectionError(f"PDU type {pdu_type} instead of a P-DATA-TF: {body!r}")
            for context_id, control, fragment in _pdvs(body):
                if control & 0x01:
                    command += fragment
                    if control & 0x02:
                        parsed = decode(BytesIO(bytes(command)), True, True)
                        if parsed.CommandDataSetType == 0x0101:
                            return Answer(parsed, b"", context_id)
                else:
                    data += fragment
                    if control & 0x02:
                        return Answer(parsed, bytes(data), context_id)

    def close(self) -> None:
        try:
            self.sock.sendall(bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-RELEASE-RQ
            self.read_pdu()
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class RawRequester(RawPeer):
    """A raw peer that opens the association: ``rq`` out, the A-ASSOCIATE-AC expected back."""

    def __init__(self, port: int, rq: bytes) -> None:
        super().__init__(socket.create_connection(("127.0.0.1", port), WAIT))
        self.sock.sendall(rq)
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x02, f"expected an A-ASSOCIATE-AC, got PDU type {pdu_type}: {body!r}"
        self.accepted = _accepted_contexts(body)


class ScriptedUpstream:
    """A malicious PACS on loopback for one association. It accepts every proposed context;
    it answers the n-th C-GET-RQ with the n-th list of ``gets`` as sub-operations (context ID,
    SOP class, the SOP instance its command names, data set), one C-STORE-RQ at a time, and
    records the status of each response; the n-th C-FIND-RQ with the n-th list of ``finds``
    as pending identifiers; and each with a final success."""

    def __init__(
        self, gets: list[list[tuple[int, str, str, bytes]]], finds: list[list[bytes]]
    ) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(WAIT)
        self.port: int = self.server.getsockname()[1]
        self._gets, self._finds = list(gets), list(finds)
        self.store_statuses: list[int] = []  # of the sub-operations' responses, in order
        self.cancelled: list[int] = []  # message IDs of the C-CANCEL-RQs it got
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, name="scripted-upstream", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._thread.join(WAIT)
        self.server.close()
        assert not self._thread.is_alive(), "the scripted upstream did not finish"
        if self._failure:
            raise self._failure[0]

    def _serve(self) -> None:
        try:
            sock, _ = self.server.accept()
            peer = RawPeer(sock)
            pdu_type, body = peer.read_pdu()
            assert pdu_type == 0x01, f"expected an A-ASSOCIATE-RQ, got PDU type {pdu_type}"
            rq = decoded_rq(struct.pack(">BxL", 0x01, len(body)) + body)
            results = [(c.context_id, 0, c.transfer_syntax[0]) for c in rq.presentation_context]
            sock.sendall(associate_ac(rq.calling_ae_title, rq.called_ae_title, results))
            while (message := peer.next_message()) is not None:
                self._answer(peer, message)
            sock.close()
        except BaseException as error:  # handed to the test thread in __exit__
            self._failure.append(error)

    def _answer(self, peer: RawPeer, message: Answer) -> None:
        command, context_id = message.command, message.context_id
        field, sop_class = int(command.CommandField), str(command.get("AffectedSOPClassUID", ""))
        if field == 0x0FFF:  # C-CANCEL-RQ
            self.cancelled.append(int(command.MessageIDBeingRespondedTo))
        elif field == 0x0010:  # C-GET-RQ
            for number, (store_context, store_class, instance, data) in enumerate(
                self._gets.pop(0), 1
            ):
                peer.send(store_context, c_store_rq(100 + number, store_class, instance), data)
                response = peer.answer()
                assert int(response.command.CommandField) == 0x8001, response.command
                self.store_statuses.append(int(response.command.Status))
            peer.send(context_id, c_get_rsp(int(command.MessageID), 0x0000, sop_class), None)
        elif field == 0x0020:  # C-FIND-RQ
            message_id = int(command.MessageID)
            for identifier in self._finds.pop(0):
                peer.send(context_id, c_find_rsp(message_id, 0xFF00, sop_class), identifier)
            peer.send(context_id, c_find_rsp(message_id, 0x0000, sop_class), None)
        else:
            raise AssertionError(f"the scripted upstream got command field {field:#06x}")


def _p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BxL", 0x04, len(pdv)) + pdv


def _pdvs(body: bytes) -> list[tuple[int, int, bytes]]:
    found, pos = [], 0
    while pos < len(body):
        length, context_id, control = struct.unpack_from(">LBB", body, pos)
        found.append((context_id, control, body[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return found


def _accepted_contexts(ac_body: bytes) -> dict[int, str]:
    """Context ID -> accepted transfer syntax, from an A-ASSOCIATE-AC body (PS3.8 §9.3.3)."""
    accepted: dict[int, str] = {}
    pos = 68
    while pos + 4 <= len(ac_body):
        item, length = ac_body[pos], int.from_bytes(ac_body[pos + 2 : pos + 4], "big")
        value = ac_body[pos + 4 : pos + 4 + length]
        if item == 0x21 and value[2] == 0:
            ts_length = int.from_bytes(value[6:8], "big")
            accepted[value[0]] = value[8 : 8 + ts_length].decode().rstrip("\x00")
        pos += 4 + length
    return accepted
