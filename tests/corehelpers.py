"""Builders for the sans-IO core tests: PDUs, PDVs and DIMSE command sets as raw bytes.

The bytes come from sources independent of the code under test: pynetdicom's own PDU and DIMSE
codecs for well-formed association PDUs and command sets, and ``struct`` for PDV/PDU framing,
so a test can also build what pynetdicom refuses to encode (malformed items, odd splits).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import dimse_messages, dimse_primitives
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.3811.3.0"

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# Message control header bits, PS3.8 Annex E.2.
COMMAND = 0x01
LAST = 0x02

ContextSpec = tuple[int, str, Sequence[str]]  # (context ID, abstract syntax, transfer syntaxes)


# ---- association PDUs, encoded by pynetdicom -----------------------------------------------------


def associate_rq(
    calling_ae: str,
    called_ae: str,
    contexts: Sequence[ContextSpec],
    *,
    max_length: int = 16_384,
    roles: Sequence[str] = (),
    user_identity: tuple[bytes, bytes] | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom encodes it (PS3.8 §9.3.2).

    ``roles`` adds an SCP/SCU Role Selection sub-item per SOP class; ``user_identity`` a
    username+passcode User Identity sub-item (PS3.7 Annex D.3.3.4, D.3.3.7).
    """
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    for context_id, abstract, transfer in contexts:
        context = PresentationContext()
        context.context_id = context_id
        context.abstract_syntax = abstract
        context.transfer_syntax = list(transfer)
        primitive.presentation_context_definition_list.append(context)
    primitive.user_information = _user_information(max_length, roles, user_identity)
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def associate_ac(
    calling_ae: str,
    called_ae: str,
    results: Sequence[tuple[int, int, str]],
    *,
    max_length: int = 16_384,
) -> bytes:
    """An A-ASSOCIATE-AC as pynetdicom encodes it; ``results`` are (context ID, result, TS)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    primitive.result = 0
    for context_id, result, transfer in results:
        context = PresentationContext()
        context.context_id = context_id
        context.result = result
        context.transfer_syntax = [transfer]
        primitive.presentation_context_definition_results_list.append(context)
    primitive.user_information = _user_information(max_length, (), None)
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _user_information(
    max_length: int, roles: Sequence[str], user_identity: tuple[bytes, bytes] | None
) -> list[Any]:
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_length
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "CORE_TESTS"
    items: list[Any] = [maximum, implementation, version]
    for sop_class in roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = sop_class
        role.scu_role = True
        role.scp_role = True
        items.append(role)
    if user_identity is not None:
        identity = UserIdentityNegotiation()
        identity.user_identity_type = 2
        identity.primary_field = user_identity[0]
        identity.secondary_field = user_identity[1]
        identity.positive_response_requested = True
        items.append(identity)
    return items


def decoded_rq(raw: bytes) -> A_ASSOCIATE_RQ:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(raw)
    return pdu


def decoded_ac(raw: bytes) -> A_ASSOCIATE_AC:
    pdu = A_ASSOCIATE_AC()
    pdu.decode(raw)
    return pdu


# ---- association PDUs from raw items (for the malformed ones) -----------------------------------


def item(item_type: int, value: bytes) -> bytes:
    """A PS3.8 §9.3.2 variable item: type, reserved, 16-bit length, value."""
    return struct.pack(">BxH", item_type, len(value)) + value


def context_rq_item(context_id: int, abstract: str, transfer: Sequence[str]) -> bytes:
    """A Presentation Context item of an A-ASSOCIATE-RQ (PS3.8 §9.3.2.2)."""
    value = bytes((context_id, 0, 0, 0)) + item(0x30, abstract.encode())
    return item(0x20, value + b"".join(item(0x40, ts.encode()) for ts in transfer))


def application_context_item() -> bytes:
    return item(0x10, APPLICATION_CONTEXT.encode())


def user_information_item(max_length: int = 16_384) -> bytes:
    return item(0x50, item(0x51, struct.pack(">L", max_length)))


def raw_associate_rq(
    items: Iterable[bytes], *, called: bytes = b"PACS", calling: bytes = b"CT01"
) -> bytes:
    """An A-ASSOCIATE-RQ around ``items`` with a header length that matches its body."""
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16, b" ")
        + calling.ljust(16, b" ")
        + bytes(32)
        + b"".join(items)
    )
    return struct.pack(">BxL", 0x01, len(body)) + body


# ---- P-DATA-TF -------------------------------------------------------------------------------


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """A PDV item (PS3.8 §9.3.5.1): length, context ID, message control header, fragment."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def command_pdv(context_id: int, data: bytes, *, last: bool = True) -> bytes:
    return pdv(context_id, COMMAND | (LAST if last else 0), data)


def data_pdv(context_id: int, data: bytes, *, last: bool = False) -> bytes:
    return pdv(context_id, LAST if last else 0, data)


def p_data(*pdvs: bytes) -> bytes:
    """A P-DATA-TF PDU (PS3.8 §9.3.5) holding ``pdvs`` in order."""
    body = b"".join(pdvs)
    return struct.pack(">BxL", 0x04, len(body)) + body


def pdvs_of(p_data_tf: bytes) -> list[tuple[int, int, bytes]]:
    """(context ID, control header, fragment) of each PDV of a P-DATA-TF."""
    assert p_data_tf[0] == 0x04
    assert struct.unpack_from(">L", p_data_tf, 2)[0] == len(p_data_tf) - 6
    found = []
    pos = 6
    while pos < len(p_data_tf):
        length, context_id, control = struct.unpack_from(">LBB", p_data_tf, pos)
        found.append((context_id, control, p_data_tf[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    assert pos == len(p_data_tf)
    return found


def release_rq() -> bytes:
    return bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def release_rp() -> bytes:
    return bytes((0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    return bytes((0x07, 0, 0, 0, 0, 4, 0, 0, source, reason))


def rj_pdu(result: int, source: int, reason: int) -> bytes:
    return bytes((0x03, 0, 0, 0, 0, 4, 0, result, source, reason))


# ---- DIMSE command sets, encoded by pynetdicom ---------------------------------------------------


def implicit_le(dataset: Dataset) -> bytes:
    """``dataset`` encoded Implicit VR Little Endian, as every command set is (PS3.7 §6.3.1)."""
    encoded = encode(dataset, True, True)
    assert encoded is not None
    return bytes(encoded)


def _command_set(message: Any, primitive: Any) -> bytes:
    message.primitive_to_message(primitive)
    return implicit_le(message.command_set)


def c_echo_rq(message_id: int) -> bytes:
    primitive = dimse_primitives.C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = VERIFICATION
    return _command_set(dimse_messages.C_ECHO_RQ(), primitive)


def c_echo_rsp(message_id: int, status: int = 0x0000) -> bytes:
    primitive = dimse_primitives.C_ECHO()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = VERIFICATION
    primitive.Status = status
    return _command_set(dimse_messages.C_ECHO_RSP(), primitive)


def c_store_rq(message_id: int, sop_class: str = CT, sop_instance: str = "1.2.3.4.5.6") -> bytes:
    primitive = dimse_primitives.C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 0
    primitive.DataSet = BytesIO(b"\x00")  # only marks that a data set follows
    return _command_set(dimse_messages.C_STORE_RQ(), primitive)


def c_store_rsp(
    message_id: int, status: int = 0x0000, sop_class: str = CT, sop_instance: str = "1.2.3.4.5.6"
) -> bytes:
    primitive = dimse_primitives.C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    return _command_set(dimse_messages.C_STORE_RSP(), primitive)


def c_find_rq(message_id: int, sop_class: str = STUDY_FIND) -> bytes:
    primitive = dimse_primitives.C_FIND()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.Priority = 0
    primitive.Identifier = BytesIO(b"\x00")
    return _command_set(dimse_messages.C_FIND_RQ(), primitive)


def c_find_rsp(message_id: int, status: int, sop_class: str = STUDY_FIND) -> bytes:
    """A C-FIND-RSP; a pending one (0xFF00/0xFF01) announces an identifier data set."""
    primitive = dimse_primitives.C_FIND()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.Status = status
    if status in (0xFF00, 0xFF01):
        primitive.Identifier = BytesIO(b"\x00")
    return _command_set(dimse_messages.C_FIND_RSP(), primitive)


def c_move_rq(message_id: int, destination: str, sop_class: str = STUDY_MOVE) -> bytes:
    primitive = dimse_primitives.C_MOVE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.Priority = 0
    primitive.MoveDestination = destination
    primitive.Identifier = BytesIO(b"\x00")
    return _command_set(dimse_messages.C_MOVE_RQ(), primitive)


def c_move_rsp(message_id: int, status: int, sop_class: str = STUDY_MOVE) -> bytes:
    primitive = dimse_primitives.C_MOVE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.Status = status
    return _command_set(dimse_messages.C_MOVE_RSP(), primitive)


def c_get_rq(message_id: int, sop_class: str) -> bytes:
    primitive = dimse_primitives.C_GET()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.Priority = 0
    primitive.Identifier = BytesIO(b"\x00")
    return _command_set(dimse_messages.C_GET_RQ(), primitive)


def c_get_rsp(message_id: int, status: int, sop_class: str) -> bytes:
    primitive = dimse_primitives.C_GET()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.Status = status
    return _command_set(dimse_messages.C_GET_RSP(), primitive)


def n_action_rq(message_id: int) -> bytes:
    """A Storage Commitment request (PS3.4 J.3.2): N-ACTION with Requested SOP Class/Instance."""
    primitive = dimse_primitives.N_ACTION()
    primitive.MessageID = message_id
    primitive.RequestedSOPClassUID = STORAGE_COMMITMENT
    primitive.RequestedSOPInstanceUID = STORAGE_COMMITMENT_INSTANCE
    primitive.ActionTypeID = 1
    primitive.ActionInformation = BytesIO(b"\x00")
    return _command_set(dimse_messages.N_ACTION_RQ(), primitive)


def decoded_command(data: bytes) -> Dataset:
    """A command set decoded by pydicom as Implicit VR Little Endian (PS3.7 §6.3.1)."""
    return decode(BytesIO(data), True, True)


# ---- feeding -----------------------------------------------------------------------------------


def joined(buffers: Iterable[bytes | memoryview]) -> bytes:
    return b"".join(bytes(buffer) for buffer in buffers)


def split_at(data: bytes, offsets: Iterable[int]) -> list[bytes]:
    """``data`` cut at each offset (sorted, duplicates give empty pieces)."""
    pieces = []
    start = 0
    for offset in sorted(offsets):
        pieces.append(data[start:offset])
        start = offset
    pieces.append(data[start:])
    return pieces


class Clock:
    """A clock that moves only when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
