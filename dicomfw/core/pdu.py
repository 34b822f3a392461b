"""Upper Layer PDU framing and the small PDUs the firewall writes itself (PS3.8 §9.3).

Every PDU starts with a 6-byte header: type (1), reserved (1), length (4, big endian) of what
follows. The framer trusts nothing: a declared length above the configured cap is refused from
the header alone, before a byte of the body is buffered (pynetdicom trusts the 32-bit length).
"""

from __future__ import annotations

import struct
from typing import Final

from dicomfw.errors import RemoteProtocolError

A_ASSOCIATE_RQ: Final = 0x01
A_ASSOCIATE_AC: Final = 0x02
A_ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
A_RELEASE_RQ: Final = 0x05
A_RELEASE_RP: Final = 0x06
A_ABORT: Final = 0x07

PDU_NAMES: Final = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}

HEADER: Final = struct.Struct(">BxL")
HEADER_SIZE: Final = 6

# A-ABORT source and reason/diag values, PS3.8 Table 9-26.
ABORT_SOURCE_USER: Final = 0
ABORT_SOURCE_PROVIDER: Final = 2
ABORT_REASON_NOT_SPECIFIED: Final = 0
ABORT_UNRECOGNIZED_PDU: Final = 1
ABORT_UNEXPECTED_PDU: Final = 2
ABORT_UNRECOGNIZED_PARAMETER: Final = 4
ABORT_UNEXPECTED_PARAMETER: Final = 5
ABORT_INVALID_PARAMETER: Final = 6

_FIXED_BODY: Final = struct.Struct(">xxBB")


def check_header(pdu_type: int, length: int, max_length: int) -> None:
    """Validate a PDU header before its body is read (PS3.8 §9.3.1, Table 9-26 reasons)."""
    if pdu_type not in PDU_NAMES:
        raise RemoteProtocolError(f"unrecognized PDU type 0x{pdu_type:02x}", ABORT_UNRECOGNIZED_PDU)
    if length > max_length:
        raise RemoteProtocolError(
            f"{PDU_NAMES[pdu_type]} declares {length} bytes, over the {max_length}-byte limit",
            ABORT_INVALID_PARAMETER,
        )
    if pdu_type in (A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT) and length != 4:
        raise RemoteProtocolError(
            f"{PDU_NAMES[pdu_type]} must be 4 bytes long, not {length}", ABORT_INVALID_PARAMETER
        )


class PduBuffer:
    """Collects whole PDUs from a byte stream during association set-up and release.

    The data phase uses ``stream.DataStream`` instead, which forwards without buffering.
    """

    def __init__(self, max_length: int) -> None:
        self._max_length = max_length
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Append ``data``; return every complete ``(type, whole PDU bytes)`` now available."""
        self._buffer += data
        pdus: list[tuple[int, bytes]] = []
        while len(self._buffer) >= HEADER_SIZE:
            pdu_type, length = HEADER.unpack_from(self._buffer)
            check_header(pdu_type, length, self._max_length)
            end = HEADER_SIZE + length
            if len(self._buffer) < end:
                break
            pdus.append((pdu_type, bytes(self._buffer[:end])))
            del self._buffer[:end]
        return pdus

    def take_rest(self) -> bytes:
        """Hand over bytes that followed the last complete PDU (e.g. to the data phase)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def fixed_fields(pdu: bytes) -> tuple[int, int]:
    """The two meaningful bytes of A-ASSOCIATE-RJ (result, source, reason) or A-ABORT."""
    return _FIXED_BODY.unpack_from(pdu, HEADER_SIZE)


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ, PS3.8 §9.3.4: reserved, result, source, reason/diag."""
    return bytes((A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, result, source, reason))


def rj_fields(pdu: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ."""
    return pdu[7], pdu[8], pdu[9]


def abort(source: int = ABORT_SOURCE_PROVIDER, reason: int = ABORT_REASON_NOT_SPECIFIED) -> bytes:
    """A-ABORT, PS3.8 §9.3.8. The firewall aborts as the service provider (source 2)."""
    if source != ABORT_SOURCE_PROVIDER:
        reason = 0  # PS3.8: reason is not significant unless the provider aborts
    return bytes((A_ABORT, 0, 0, 0, 0, 4, 0, 0, source, reason))


def release_rp() -> bytes:
    return bytes((A_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def p_data_tf(pdvs: list[bytes | memoryview]) -> bytes:
    """Frame already-encoded PDV items (each with its 4-byte length) as one P-DATA-TF."""
    body = b"".join(pdvs)
    return HEADER.pack(P_DATA_TF, len(body)) + body


def pdv(context_id: int, message_control: int, data: bytes) -> bytes:
    """A PDV item (PS3.8 §9.3.5.1 and Annex E.2): length, context ID, control header, data."""
    return struct.pack(">LBB", len(data) + 2, context_id, message_control) + data
