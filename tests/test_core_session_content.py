"""Content validation inside the session: what is held, refused, replaced or aborted, and when.

The data sets are pydicom's encoding of small images and identifiers; the session holds a
message until its data set's first part has passed, answers a refused request itself, replaces
a refused response toward the other side (cancelling the request when it was pending), and
aborts both sides when a violation is found after the message began to go out.
"""

from __future__ import annotations

from dataclasses import replace
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom import dimse_messages, dimse_primitives
from pynetdicom.dsutils import encode

from dicomfw.core.content import ContentRules
from dicomfw.core.policy import MONITOR, ContentPolicy, Policy
from dicomfw.core.session import (
    AssociationEnded,
    Command,
    ContentRefused,
    Send,
    Session,
    Side,
    State,
    WouldRefuse,
)
from tests.corehelpers import (
    CT,
    c_find_rq,
    c_find_rsp,
    c_store_rq,
    c_store_rsp,
    command_pdv,
    data_pdv,
    decoded_command,
    p_data,
    pdvs_of,
)
from tests.test_core_session import CAP, FIND, PACS_CONTEXTS, POLICY, STORE, established

REQUESTER, UPSTREAM = Side.REQUESTER, Side.UPSTREAM
INSTANCE = "1.2.826.0.1.3680043.10.7.1"


def policy_with(content: ContentPolicy, mode: str = "enforce") -> Policy:
    routes = tuple(replace(r, content=content, mode=mode) for r in POLICY.routes)
    return replace(POLICY, routes=routes)


def content_session(content: ContentPolicy | None = None, mode: str = "enforce") -> Session:
    from ipaddress import ip_address

    policy = policy_with(content or ContentPolicy(ContentRules()), mode)
    session = Session(policy, "modalities", ip_address("10.1.2.3"), None, CAP)
    return established(contexts=PACS_CONTEXTS[:4], session=session)  # no refused context


def image(
    instance: str = INSTANCE, study: str = "1.2.826.0.1.3680043.10.7", pixels: int = 64
) -> bytes:
    """A CT image data set, explicit VR little endian (the STORE context's syntax here)."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = instance
    ds.StudyInstanceUID = study
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 4, pixels // 8
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(pixels)) if pixels < 256 else bytes(pixels)
    return encoded(ds, implicit=False)


def encoded(ds: Dataset, implicit: bool) -> bytes:
    """``ds`` on the wire in little endian, implicit or explicit VR (pynetdicom's encoder)."""
    raw = encode(ds, implicit, True)
    assert raw is not None
    return bytes(raw)


def store_pdus(
    data_set: bytes, message_id: int = 1, instance: str = INSTANCE, piece: int = 0
) -> list[bytes]:
    """A C-STORE-RQ for ``instance``: its command, then ``data_set`` in PDUs of ``piece`` bytes
    (one PDU when 0)."""
    pieces = (
        [data_set[i : i + piece] for i in range(0, len(data_set), piece)] if piece else [data_set]
    )
    return [p_data(command_pdv(STORE, c_store_rq(message_id, CT, instance)))] + [
        p_data(data_pdv(STORE, chunk, last=n == len(pieces) - 1)) for n, chunk in enumerate(pieces)
    ]


def sent(commands: list[Command], side: Side) -> bytes:
    return b"".join(
        bytes(b) for c in commands if isinstance(c, Send) and c.side is side for b in c.data
    )


def feed(session: Session, side: Side, pdus: list[bytes]) -> list[Command]:
    commands: list[Command] = []
    for pdu_bytes in pdus:
        commands += session.receive(side, pdu_bytes)
    return commands


def response_status(pdus: bytes) -> tuple[int, int, str]:
    """(CommandField, Status, Error Comment) of the one command PDV in ``pdus``."""
    [(_, control, command_set)] = pdvs_of(pdus)
    assert control == 0x03
    command = decoded_command(command_set)
    return command.CommandField, command.Status, str(command.get("ErrorComment", ""))


def test_a_valid_instance_passes_byte_identical_once_its_first_part_has_been_checked() -> None:
    session = content_session()
    pdus = store_pdus(image())
    commands = feed(session, REQUESTER, pdus)
    assert sent(commands, UPSTREAM) == b"".join(pdus)
    assert not any(isinstance(c, ContentRefused | WouldRefuse) for c in commands)


def test_nothing_of_a_held_store_goes_up_before_its_header_has_passed() -> None:
    session = content_session()
    data_set = image(pixels=4096)
    pdus = store_pdus(data_set, piece=40)  # the header arrives in 40-byte PDUs
    early = feed(session, REQUESTER, pdus[:2])  # the command and the first 40 bytes
    assert sent(early, UPSTREAM) == b""
    rest = feed(session, REQUESTER, pdus[2:])
    assert sent(early + rest, UPSTREAM) == b"".join(pdus)


def test_a_refused_instance_is_answered_by_the_firewall_and_never_reaches_the_upstream() -> None:
    session = content_session()
    bad = store_pdus(image(instance="1.2.3.4"), instance=INSTANCE)  # command and data disagree
    commands = feed(session, REQUESTER, bad)
    assert sent(commands, UPSTREAM) == b""  # not even its command
    field, status, comment = response_status(sent(commands, REQUESTER))
    assert (field, status, comment) == (0x8001, 0xA900, "dicomfw: sop_instance_mismatch")
    [event] = [c for c in commands if isinstance(c, ContentRefused)]
    assert (event.side, event.check, event.action, event.status) == (
        "requester",
        "sop_instance_mismatch",
        "refused",
        0xA900,
    )
    good = store_pdus(image(), message_id=2)
    assert sent(feed(session, REQUESTER, good), UPSTREAM) == b"".join(good)  # usable still


def test_a_uid_that_is_not_one_is_refused_with_cannot_understand() -> None:
    session = content_session()
    commands = feed(session, REQUESTER, store_pdus(image(study="1.2.3/../../etc")))
    assert response_status(sent(commands, REQUESTER))[1:] == (0xC000, "dicomfw: uid_syntax")


def test_in_monitor_mode_a_refused_instance_passes_and_is_reported() -> None:
    session = content_session(mode=MONITOR)
    bad = store_pdus(image(instance="1.2.3.4"))
    commands = feed(session, REQUESTER, bad)
    assert sent(commands, UPSTREAM) == b"".join(bad)
    [event] = [c for c in commands if isinstance(c, WouldRefuse)]
    assert (event.stage, event.why, event.answer) == ("content", "sop_instance_mismatch", "0xA900")


def test_a_check_listed_for_monitoring_only_reports() -> None:
    session = content_session(
        ContentPolicy(ContentRules(), monitor=frozenset({"sop_instance_mismatch"}))
    )
    bad = store_pdus(image(instance="1.2.3.4"))
    commands = feed(session, REQUESTER, bad)
    assert sent(commands, UPSTREAM) == b"".join(bad)
    assert [c.why for c in commands if isinstance(c, WouldRefuse)] == ["sop_instance_mismatch"]


def test_a_violation_after_forwarding_began_aborts_both_sides_before_the_end_goes_out() -> None:
    session = content_session(ContentPolicy(ContentRules(), hold_bytes=1024))
    # an element after the Pixel Data that belongs before it: found only at the very end
    late = image(pixels=4096) + b"\x08\x00\x20\x00DA\x08\x0020261206"
    pdus = store_pdus(late, piece=512)
    commands = feed(session, REQUESTER, pdus)
    upstream = sent(commands, UPSTREAM)
    assert upstream.startswith(b"".join(pdus[:3]))  # the header passed: it went up
    assert b"".join(pdus) not in upstream  # the whole instance never did
    assert upstream.endswith(bytes.fromhex("07000000000400000200"))  # A-ABORT
    end = commands[-1]
    assert isinstance(end, AssociationEnded) and end.why == "content_violation"
    [event] = [c for c in commands if isinstance(c, ContentRefused)]
    assert (event.check, event.action) == ("element_order", "aborted")
    assert session.state is State.CLOSED


def identifier(level: str, study_uid: str) -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = study_uid
    return encoded(ds, implicit=True)


def query(message_id: int) -> bytes:
    """A C-FIND-RQ at STUDY level with its identifier (the FIND context is implicit VR LE)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    identifier_bytes = encoded(ds, implicit=True)
    return p_data(
        command_pdv(FIND, c_find_rq(message_id)), data_pdv(FIND, identifier_bytes, last=True)
    )


def test_a_bad_pending_response_is_replaced_and_its_query_cancelled_at_the_upstream() -> None:
    session = content_session()
    feed(session, REQUESTER, [query(1)])
    bad = p_data(
        command_pdv(FIND, c_find_rsp(1, 0xFF00)),
        data_pdv(FIND, identifier("STUDY", "1.2.3;sh"), last=True),
    )
    commands = session.receive(UPSTREAM, bad)
    to_requester, to_upstream = sent(commands, REQUESTER), sent(commands, UPSTREAM)
    assert response_status(to_requester)[:2] == (0x8020, 0xC000)  # a final failure instead
    [(_, _, cancel)] = pdvs_of(to_upstream)
    assert decoded_command(cancel).CommandField == 0x0FFF
    assert decoded_command(cancel).MessageIDBeingRespondedTo == 1
    [event] = [c for c in commands if isinstance(c, ContentRefused)]
    assert (event.side, event.action) == ("upstream", "replaced")
    # what the upstream still sends for that query is dropped, its final answer included
    late = p_data(
        command_pdv(FIND, c_find_rsp(1, 0xFF00)),
        data_pdv(FIND, identifier("STUDY", "1.2.4"), last=True),
    )
    assert sent(session.receive(UPSTREAM, late), REQUESTER) == b""
    assert (
        sent(session.receive(UPSTREAM, p_data(command_pdv(FIND, c_find_rsp(1, 0xFE00)))), REQUESTER)
        == b""
    )
    # and the association goes on
    feed(session, REQUESTER, [query(2)])
    good = p_data(
        command_pdv(FIND, c_find_rsp(2, 0xFF00)),
        data_pdv(FIND, identifier("STUDY", "1.2.5"), last=True),
    )
    assert sent(session.receive(UPSTREAM, good), REQUESTER) == good


def store_sub_operation(data_set: bytes) -> bytes:
    """A C-STORE-RQ the upstream sends on the association (a C-GET's sub-operation)."""
    primitive = dimse_primitives.C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = INSTANCE
    primitive.Priority = 0
    primitive.DataSet = BytesIO(b"\x00")
    message = dimse_messages.C_STORE_RQ()
    message.primitive_to_message(primitive)
    from tests.corehelpers import implicit_le

    return p_data(
        command_pdv(STORE, implicit_le(message.command_set)), data_pdv(STORE, data_set, last=True)
    )


def test_a_bad_sub_operation_from_the_upstream_gets_a_failure_and_never_reaches_the_requester() -> (
    None
):
    session = content_session()
    commands = session.receive(UPSTREAM, store_sub_operation(image(study="1.2.3/../x")))
    assert sent(commands, REQUESTER) == b""
    assert response_status(sent(commands, UPSTREAM))[:2] == (0x8001, 0xC000)
    good = store_sub_operation(image())
    assert sent(session.receive(UPSTREAM, good), REQUESTER) == good
    # the requester's answer to it passes as any response
    answer = p_data(command_pdv(STORE, c_store_rsp(7, 0x0000, CT, INSTANCE)))
    assert sent(session.receive(REQUESTER, answer), UPSTREAM) == answer


def test_without_content_rules_nothing_is_held() -> None:
    session = established()
    pdus = store_pdus(image(instance="1.2.3.4"))  # mismatched, but nobody looks
    assert sent(feed(session, REQUESTER, pdus[:1]), UPSTREAM) == pdus[0]  # the command at once


def test_an_instance_too_large_by_its_declared_pixel_data_is_refused_before_anything_goes() -> None:
    session = content_session(ContentPolicy(ContentRules(max_instance_bytes=3000)))
    commands = feed(session, REQUESTER, store_pdus(image(pixels=4096), piece=512))
    assert sent(commands, UPSTREAM) == b""
    assert response_status(sent(commands, REQUESTER))[1:] == (0xA700, "dicomfw: instance_size")
