"""Pre-encoded DICOM PDUs for the lean benchmark client and the tiny SCP.

Everything is built once with pynetdicom's PDU and DIMSE classes (independent of dicomfw's own
codec), so the client's hot loop only does ``sendall`` and ``recv_into``. Reading is the bare
minimum: PDU header, body, and a byte search for the Status element of a response.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Final

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

APPLICATION_CONTEXT: Final = "1.2.840.10008.3.1.1.1"
VERIFICATION: Final = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
ECHO_CONTEXT: Final = 1
STORE_CONTEXT: Final = 3
#: DCMTK's default maximum PDU: the client sends P-DATA-TF PDUs of this size, like storescu.
MAX_PDU: Final = 16384

A_ASSOCIATE_RQ_TYPE: Final = 0x01
A_ASSOCIATE_AC_TYPE: Final = 0x02
A_ASSOCIATE_RJ_TYPE: Final = 0x03
P_DATA_TF_TYPE: Final = 0x04
A_RELEASE_RQ_TYPE: Final = 0x05
A_RELEASE_RP_TYPE: Final = 0x06
A_ABORT_TYPE: Final = 0x07

_HEADER: Final = struct.Struct(">BxL")
#: (0000,0900) Status, implicit VR little endian: tag, length 2.
_STATUS_TAG: Final = b"\x00\x00\x00\x09\x02\x00\x00\x00"


class ProtocolFailure(Exception):
    """The peer did not answer as a working SCP would."""


@dataclass(frozen=True)
class ClientPdus:
    """The byte strings one benchmark association sends, all encoded up front."""

    associate_rq: bytes
    echo_rq: bytes
    store_rq: bytes  # command + data set PDUs of one C-STORE, concatenated
    release_rq: bytes


def associate_rq(calling_ae: str, called_ae: str) -> bytes:
    """An A-ASSOCIATE-RQ with Verification and CT Image Storage (explicit VR LE)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    echo = build_context(VERIFICATION, [IMPLICIT_LE])
    echo.context_id = ECHO_CONTEXT
    store = build_context(CT_IMAGE_STORAGE, [EXPLICIT_LE])
    store.context_id = STORE_CONTEXT
    primitive.presentation_context_definition_list = [echo, store]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = MAX_PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _encode_message(message: C_ECHO_RQ | C_STORE_RQ, context_id: int) -> bytes:
    out = []
    for p_data in message.encode_msg(context_id, MAX_PDU):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out.append(bytes(pdu.encode()))
    return b"".join(out)


def echo_rq(message_id: int = 1) -> bytes:
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return _encode_message(message, ECHO_CONTEXT)


def dataset_bytes(path: Path) -> tuple[bytes, str]:
    """The data set of a Part 10 file (after its meta group) and its SOP Instance UID."""
    from pydicom import dcmread

    raw = path.read_bytes()
    if raw[128:132] != b"DICM":
        raise ValueError(f"{path}: not a DICOM Part 10 file")
    # (0002,0000) UL group length, explicit VR: tag 4 + VR 2 + length 2, then the value.
    (group_length,) = struct.unpack_from("<L", raw, 132 + 8)
    start = 132 + 12 + group_length
    sop_instance = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return raw[start:], sop_instance


def store_rq(path: Path, message_id: int = 1) -> bytes:
    """One C-STORE-RQ of ``path`` (an explicit VR LE CT file), command and data set PDUs."""
    data, sop_instance = dataset_bytes(path)
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CT_IMAGE_STORAGE
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 0x0002
    primitive.DataSet = BytesIO(data)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return _encode_message(message, STORE_CONTEXT)


def client_pdus(calling_ae: str, called_ae: str, store_file: Path | None) -> ClientPdus:
    return ClientPdus(
        associate_rq=associate_rq(calling_ae, called_ae),
        echo_rq=echo_rq(),
        store_rq=store_rq(store_file) if store_file is not None else b"",
        release_rq=bytes(A_RELEASE_RQ().encode()),
    )


def release_rp() -> bytes:
    return bytes(A_RELEASE_RP().encode())


def abort() -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = 0
    pdu.reason_diagnostic = 0
    return bytes(pdu.encode())


def associate_ac_for(raw_rq: bytes) -> bytes:
    """The A-ASSOCIATE-AC an accept-everything SCP answers ``raw_rq`` with (first TS each)."""
    rq = A_ASSOCIATE_RQ()
    rq.decode(raw_rq)
    request = rq.to_primitive()
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = request.calling_ae_title
    primitive.called_ae_title = request.called_ae_title
    primitive.result = 0x00
    results: list[Any] = []
    for context in request.presentation_context_definition_list:
        context.result = 0x00
        first: list[Any] = list(context.transfer_syntax[:1])
        context.transfer_syntax = first
        results.append(context)
    primitive.presentation_context_definition_results_list = results
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = MAX_PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


# ---- reading ---------------------------------------------------------------------------------

Sock = socket.socket | ssl.SSLSocket


def _recv_exact(sock: Sock, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ProtocolFailure("connection closed by the peer")
        got += n
    return bytes(buffer)


def read_pdu(sock: Sock) -> tuple[int, bytes]:
    """One whole PDU: (type, header + body)."""
    header = _recv_exact(sock, 6)
    pdu_type, length = _HEADER.unpack(header)
    return pdu_type, header + _recv_exact(sock, length)


def expect(sock: Sock, wanted: int) -> bytes:
    pdu_type, raw = read_pdu(sock)
    if pdu_type != wanted:
        raise ProtocolFailure(f"expected PDU type {wanted}, got {pdu_type}")
    return raw


def read_response_status(sock: Sock) -> int:
    """Read P-DATA-TF PDUs up to the last fragment of a command; return its Status."""
    command = b""
    while True:
        raw = expect(sock, P_DATA_TF_TYPE)
        pos = 6
        while pos < len(raw):
            (pdv_length,) = struct.unpack_from(">L", raw, pos)
            control = raw[pos + 5]
            if control & 0x01:
                command += raw[pos + 6 : pos + 4 + pdv_length]
                if control & 0x02:
                    return _status(command)
            pos += 4 + pdv_length


def _status(command: bytes) -> int:
    at = command.find(_STATUS_TAG)
    if at < 0:
        raise ProtocolFailure("response without a Status element")
    return int.from_bytes(command[at + 8 : at + 10], "little")


def accepted_contexts(raw_ac: bytes) -> dict[int, int]:
    """Context ID -> result from an A-ASSOCIATE-AC (0 = acceptance)."""
    results: dict[int, int] = {}
    pos = 6 + 68
    while pos + 4 <= len(raw_ac):
        item_type = raw_ac[pos]
        (item_length,) = struct.unpack_from(">H", raw_ac, pos + 2)
        if item_type == 0x21:
            results[raw_ac[pos + 4]] = raw_ac[pos + 6]
        pos += 4 + item_length
    return results
