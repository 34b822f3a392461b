"""DIMSE command sets: decoding what pynetdicom/pydicom encode, encoding refusals pydicom reads."""

from __future__ import annotations

import random
import struct

import pytest
from pydicom.dataset import Dataset

from dicomfw.core.dimse import DimseCommand, decode_command, encode_response
from dicomfw.core.pdu import ABORT_INVALID_PARAMETER
from dicomfw.errors import RemoteProtocolError
from tests.corehelpers import (
    CT,
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    STUDY_FIND,
    STUDY_MOVE,
    VERIFICATION,
    c_echo_rq,
    c_echo_rsp,
    c_find_rq,
    c_find_rsp,
    c_move_rq,
    c_move_rsp,
    c_store_rq,
    c_store_rsp,
    decoded_command,
    implicit_le,
    n_action_rq,
)

INSTANCE = "1.2.826.0.1.3680043.8.498.1"

# (command set, expected decode): requests and responses as pynetdicom encodes them.
PYNETDICOM_COMMANDS: dict[str, tuple[bytes, DimseCommand]] = {
    "C-ECHO-RQ": (c_echo_rq(1), DimseCommand(0x0030, 1, VERIFICATION, "", None, False, None)),
    "C-ECHO-RSP": (c_echo_rsp(1), DimseCommand(0x8030, 1, VERIFICATION, "", None, False, 0)),
    "C-STORE-RQ": (c_store_rq(7, CT, INSTANCE), DimseCommand(1, 7, CT, INSTANCE, None, True, None)),
    "C-STORE-RSP warning": (
        c_store_rsp(7, 0xB000, CT, INSTANCE),
        DimseCommand(0x8001, 7, CT, INSTANCE, None, False, 0xB000),
    ),
    "C-FIND-RQ": (c_find_rq(65535), DimseCommand(0x0020, 65535, STUDY_FIND, "", None, True, None)),
    "C-FIND-RSP pending": (
        c_find_rsp(9, 0xFF00),
        DimseCommand(0x8020, 9, STUDY_FIND, "", None, True, 0xFF00),
    ),
    "C-FIND-RSP final": (
        c_find_rsp(9, 0x0000),
        DimseCommand(0x8020, 9, STUDY_FIND, "", None, False, 0),
    ),
    "C-MOVE-RQ": (
        c_move_rq(3, "WS1"),
        DimseCommand(0x0021, 3, STUDY_MOVE, "", "WS1", True, None),
    ),
    "C-MOVE-RSP": (
        c_move_rsp(3, 0xA801),
        DimseCommand(0x8021, 3, STUDY_MOVE, "", None, False, 0xA801),
    ),
    "N-ACTION-RQ": (
        n_action_rq(4),
        DimseCommand(0x0130, 4, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, None, True, None),
    ),
}


@pytest.mark.parametrize("name", PYNETDICOM_COMMANDS)
def test_command_encoded_by_pynetdicom_decodes_to_its_fields(name: str) -> None:
    encoded, expected = PYNETDICOM_COMMANDS[name]
    assert decode_command(encoded) == expected
    assert decode_command(bytearray(encoded)) == expected


def pydicom_command(**elements: object) -> bytes:
    """A command set from pydicom keywords, with a correct CommandGroupLength first."""
    command = Dataset()
    for keyword, value in elements.items():
        setattr(command, keyword, value)
    command.CommandGroupLength = len(implicit_le(command))
    return implicit_le(command)


def test_move_destination_padding_and_odd_uid_padding_are_not_significant() -> None:
    encoded = pydicom_command(
        AffectedSOPClassUID=STUDY_MOVE,  # odd length: pydicom pads it with a NUL
        CommandField=0x0021,
        MessageID=12,
        Priority=0,
        CommandDataSetType=0x0000,
        MoveDestination="WS1 ",
    )
    command = decode_command(encoded)
    assert (command.sop_class, command.move_destination) == (STUDY_MOVE, "WS1")
    assert command.has_data_set


def test_c_cancel_has_no_message_id_of_its_own() -> None:
    encoded = pydicom_command(
        CommandField=0x0FFF, MessageIDBeingRespondedTo=5, CommandDataSetType=0x0101
    )
    command = decode_command(encoded)
    assert (command.command_field, command.message_id, command.is_response) == (0x0FFF, None, False)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _command(*elements: bytes) -> bytes:
    """``elements`` behind a Command Group Length that counts them."""
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _ui(uid: bytes) -> bytes:
    return uid + b"\x00" if len(uid) % 2 else uid


ECHO_CLASS = _element(0x0002, _ui(VERIFICATION.encode()))
C_MOVE_RQ_FIELD = _element(0x0100, b"\x21\x00")
C_MOVE_RSP_FIELD = _element(0x0100, b"\x21\x80")
NO_DATA_SET = _element(0x0800, b"\x01\x01")

#: Finding 1 of the fuzzing campaign: a repeated element that DCMTK reads as its first copy and
#: a last-one-wins reader as its second could carry a request past the rules.
SMUGGLED_COMMANDS: dict[str, bytes] = {
    "CommandField C-MOVE-RQ then C-MOVE-RSP": _command(
        ECHO_CLASS, C_MOVE_RQ_FIELD, C_MOVE_RSP_FIELD, _element(0x0110, b"\x07\x00"), NO_DATA_SET
    ),
    "Move Destination EVIL then WS1": _command(
        _element(0x0002, _ui(STUDY_MOVE.encode())),
        C_MOVE_RQ_FIELD,
        _element(0x0110, b"\x07\x00"),
        _element(0x0600, b"EVIL_AE "),
        _element(0x0600, b"WS1 "),
        _element(0x0800, b"\x00\x00"),
    ),
    "Affected SOP Class CT then Verification": _command(
        _element(0x0002, _ui(CT.encode())),
        _element(0x0002, _ui(VERIFICATION.encode())),
        _element(0x0100, b"\x30\x00"),
        _element(0x0110, b"\x07\x00"),
        NO_DATA_SET,
    ),
    "elements out of order": _command(
        _element(0x0100, b"\x30\x00"), ECHO_CLASS, _element(0x0110, b"\x07\x00"), NO_DATA_SET
    ),
}


@pytest.mark.parametrize("case", SMUGGLED_COMMANDS)
def test_finding_1_a_repeated_or_out_of_order_command_element_is_refused(case: str) -> None:
    with pytest.raises(RemoteProtocolError, match="repeated or out of order") as raised:
        decode_command(SMUGGLED_COMMANDS[case])
    assert raised.value.abort_reason == ABORT_INVALID_PARAMETER


def test_the_same_elements_once_each_in_order_decode() -> None:
    command = decode_command(
        _command(
            ECHO_CLASS, _element(0x0100, b"\x30\x00"), _element(0x0110, b"\x07\x00"), NO_DATA_SET
        )
    )
    assert (command.command_field, command.message_id, command.sop_class) == (0x30, 7, VERIFICATION)


#: Command sets that a second reader could take differently, or whose values are no UID / AE.
INVALID_COMMANDS: dict[str, tuple[bytes, str]] = {
    "odd value length": (
        _command(_element(0x0002, b"1.2.3"), _element(0x0100, b"\x30\x00")),
        r"invalid DIMSE command element \(0000,0002\)",
    ),
    "group length counting less": (
        _element(0x0000, struct.pack("<L", 10)) + ECHO_CLASS + _element(0x0100, b"\x30\x00"),
        "Group Length",
    ),
    "group length of 2 bytes": (
        _element(0x0000, b"\x0a\x00") + _element(0x0100, b"\x30\x00"),
        "Group Length",
    ),
    "Affected and Requested SOP Class": (
        _command(ECHO_CLASS, _element(0x0003, _ui(CT.encode())), _element(0x0100, b"\x30\x00")),
        "wrong element",
    ),
    "N-SET-RQ naming its class in Affected": (
        _command(ECHO_CLASS, _element(0x0100, b"\x20\x01"), _element(0x0110, b"\x01\x00")),
        "wrong element",
    ),
    "UID with a non-ASCII byte": (
        _command(_element(0x0002, b"\xff\x00"), _element(0x0100, b"\x00\x00")),
        "not a UID",
    ),
    "instance UID with ../": (
        _command(ECHO_CLASS, _element(0x0100, b"\x01\x00"), _element(0x1000, b"../../etc/x\x00")),
        "not a UID",
    ),
    "instance UID with shell characters": (
        _command(ECHO_CLASS, _element(0x0100, b"\x01\x00"), _element(0x1000, b"1.2;rm -rf /")),
        "not a UID",
    ),
    "instance UID of 65 characters": (
        _command(
            ECHO_CLASS, _element(0x0100, b"\x01\x00"), _element(0x1000, b"1." * 32 + b"1\x00")
        ),
        "not a UID",
    ),
    "UID with an empty component": (
        _command(_element(0x0002, b"1..2"), _element(0x0100, b"\x30\x00")),
        "not a UID",
    ),
    "Move Destination with a control character": (
        _command(C_MOVE_RQ_FIELD, _element(0x0600, b"WS1\x07")),
        "not an AE title",
    ),
    "Move Destination of 17 characters": (
        _command(C_MOVE_RQ_FIELD, _element(0x0600, b"ABCDEFGHIJKLMNOPQ ")),
        "not an AE title",
    ),
}


@pytest.mark.parametrize("case", INVALID_COMMANDS)
def test_a_command_set_readers_could_disagree_on_is_refused(case: str) -> None:
    encoded, message = INVALID_COMMANDS[case]
    with pytest.raises(RemoteProtocolError, match=message) as raised:
        decode_command(encoded)
    assert raised.value.abort_reason == ABORT_INVALID_PARAMETER


def test_a_uid_component_with_a_leading_zero_and_space_padding_pass() -> None:
    """Real archives carry both (pydicom's rtdose.dcm has a component "0123")."""
    command = decode_command(
        _command(_element(0x0002, b"1.2.01234 "), _element(0x0100, b"\x30\x00"))
    )
    assert command.sop_class == "1.2.01234"


def test_a_us_element_of_the_wrong_size_is_an_error_only_where_it_is_read() -> None:
    bad_status = _element(0x0900, b"\x00\x00\x00\x00")
    request = _element(0x0100, b"\x30\x00") + _element(0x0110, b"\x01\x00") + bad_status
    assert decode_command(request).status is None  # a request's Status is never read
    response = _element(0x0100, b"\x30\x80") + _element(0x0120, b"\x01\x00") + bad_status
    with pytest.raises(RemoteProtocolError, match=r"\(0000,0900\) must be 2 bytes"):
        decode_command(response)


MALFORMED_COMMANDS: dict[str, tuple[bytes, str]] = {
    "truncated element header": (_element(0x0100, b"\x30\x00") + b"\x00\x00\x00", "truncated"),
    "element outside group 0000": (
        _element(0x0100, b"\x30\x00") + struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\x00",
        "(0008,0016)",
    ),
    "value overrunning the command set": (
        _element(0x0100, b"\x30\x00") + struct.pack("<HHL", 0x0000, 0x0902, 40) + b"short",
        "(0000,0902)",
    ),
    "CommandField of 4 bytes": (_element(0x0100, b"\x30\x00\x00\x00"), "must be 2 bytes"),
    "no CommandField": (_element(0x0110, b"\x01\x00"), "without CommandField"),
}


@pytest.mark.parametrize("case", MALFORMED_COMMANDS)
def test_malformed_command_set_is_a_remote_protocol_error(case: str) -> None:
    encoded, message = MALFORMED_COMMANDS[case]
    with pytest.raises(RemoteProtocolError, match=message) as raised:
        decode_command(encoded)
    assert raised.value.abort_reason == ABORT_INVALID_PARAMETER


def _mutated(rng: random.Random, encoded: bytes) -> bytes:
    """``encoded`` with a few random edits: a byte changed, a cut, an element added or appended."""
    data = bytearray(encoded)
    for _ in range(rng.randint(1, 4)):
        edit = rng.randrange(4)
        if edit == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif edit == 1:
            del data[rng.randrange(len(data) + 1) :]
        elif edit == 2:
            value = rng.randbytes(rng.choice((0, 1, 2, 3, 4, 17)))
            at = rng.randrange(len(data) + 1)
            data[at:at] = _element(rng.choice((0x0002, 0x0100, 0x0110, 0x0120, 0x0900)), value)
        else:
            data += rng.randbytes(rng.randrange(1, 12))
    if rng.randrange(2) and len(data) >= 12 and data[:8] == _element(0x0000, b"\0" * 4)[:8]:
        data[8:12] = struct.pack("<L", len(data) - 12)  # a Group Length that still counts
    return bytes(data)


def test_any_command_set_decodes_or_is_refused_as_invalid_never_anything_else() -> None:
    """Command sets come from the network: whatever the bytes, the answer is a command or a
    RemoteProtocolError that becomes an A-ABORT (invalid parameter), never another exception."""
    rng = random.Random(20261125)
    seeds = [encoded for encoded, _ in PYNETDICOM_COMMANDS.values()]
    decoded = 0
    for _ in range(3000):
        try:
            decode_command(_mutated(rng, rng.choice(seeds)))
            decoded += 1
        except RemoteProtocolError as error:
            assert error.abort_reason == ABORT_INVALID_PARAMETER
    assert 10 < decoded < 3000  # both outcomes were exercised


# ---- refusal responses ---------------------------------------------------------------------------


def _elements(encoded: bytes) -> list[tuple[int, bytes]]:
    found = []
    pos = 0
    while pos < len(encoded):
        group, element, length = struct.unpack_from("<HHL", encoded, pos)
        assert group == 0x0000
        found.append((element, encoded[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    assert pos == len(encoded)
    return found


def assert_well_formed(encoded: bytes) -> None:
    """Even-length values, ascending tags, and a CommandGroupLength that counts the rest."""
    elements = _elements(encoded)
    assert all(len(value) % 2 == 0 for _, value in elements)
    tags = [tag for tag, _ in elements]
    assert tags == sorted(tags) and tags[0] == 0x0000
    assert struct.unpack("<L", elements[0][1])[0] == len(encoded) - 12


def test_c_store_refusal_answers_the_request_as_pydicom_reads_it() -> None:
    request = decode_command(c_store_rq(7, CT, INSTANCE))
    encoded = encode_response(request, 0x0124, "C-STORE of CT is not allowed on route 'pacs'")

    assert_well_formed(encoded)
    response = decoded_command(encoded)
    assert response.CommandField == 0x8001
    assert response.MessageIDBeingRespondedTo == 7
    assert response.Status == 0x0124
    assert response.AffectedSOPClassUID == CT
    assert response.AffectedSOPInstanceUID == INSTANCE
    assert response.CommandDataSetType == 0x0101
    assert response.ErrorComment == "C-STORE of CT is not allowed on route 'pacs'"
    assert response.CommandGroupLength == len(encoded) - 12
    assert "MessageID" not in response


def test_c_find_refusal_has_no_sop_instance_and_decodes_back_as_a_final_response() -> None:
    request = decode_command(c_find_rq(42))
    encoded = encode_response(request, 0x0124)

    assert_well_formed(encoded)
    response = decoded_command(encoded)
    assert (response.CommandField, response.Status) == (0x8020, 0x0124)
    assert "AffectedSOPInstanceUID" not in response
    assert "ErrorComment" not in response
    assert decode_command(encoded) == DimseCommand(0x8020, 42, STUDY_FIND, "", None, False, 0x0124)


def test_c_move_refusal_with_move_destination_unknown() -> None:
    encoded = encode_response(decode_command(c_move_rq(3, "EVIL")), 0xA801, "unknown WS")
    assert_well_formed(encoded)
    response = decoded_command(encoded)
    assert (response.CommandField, response.MessageIDBeingRespondedTo) == (0x8021, 3)
    assert (response.Status, response.AffectedSOPClassUID) == (0xA801, STUDY_MOVE)


def test_n_action_refusal_names_the_requested_sop_as_affected() -> None:
    encoded = encode_response(decode_command(n_action_rq(4)), 0x0124)
    assert_well_formed(encoded)
    response = decoded_command(encoded)
    assert response.CommandField == 0x8130
    assert response.AffectedSOPClassUID == STORAGE_COMMITMENT
    assert response.AffectedSOPInstanceUID == STORAGE_COMMITMENT_INSTANCE


def test_long_error_comment_is_cut_to_64_characters_of_even_length() -> None:
    request = decode_command(c_echo_rq(1))
    encoded = encode_response(request, 0x0124, "x" * 63 + "yyyy")
    assert_well_formed(encoded)
    assert decoded_command(encoded).ErrorComment == "x" * 63 + "y"
