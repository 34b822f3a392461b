"""PDU framing and the A-ASSOCIATE codec, cross-checked against pynetdicom's encoder/decoder."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_RELEASE_RP
from pynetdicom.pdu_items import UserIdentitySubItemRQ

from dicomfw.core import acse, pdu
from dicomfw.errors import RemoteProtocolError
from tests.corehelpers import (
    CT,
    DEFLATED_LE,
    EXPLICIT_LE,
    IMPLEMENTATION_CLASS_UID,
    IMPLICIT_LE,
    JPEG_BASELINE,
    MR,
    STUDY_FIND,
    VERIFICATION,
    application_context_item,
    associate_ac,
    associate_rq,
    context_rq_item,
    decoded_ac,
    decoded_rq,
    item,
    p_data,
    raw_associate_rq,
    release_rq,
    user_information_item,
)

CAP = 65_536

THREE_CONTEXTS = [
    (1, VERIFICATION, [IMPLICIT_LE]),
    (3, CT, [EXPLICIT_LE, IMPLICIT_LE, JPEG_BASELINE]),
    (5, STUDY_FIND, [IMPLICIT_LE, DEFLATED_LE]),
]


def storescu_contexts(count: int) -> list[tuple[int, str, list[str]]]:
    """``count`` contexts like DCMTK storescu proposes: many SOP classes, several TS each."""
    return [
        (2 * i + 1, f"1.2.840.10008.5.1.4.1.1.{i + 1}", [EXPLICIT_LE, IMPLICIT_LE, JPEG_BASELINE])
        for i in range(count)
    ]


def full_rq(max_length: int = 16_384) -> bytes:
    return associate_rq(
        "CT01",
        "PACS",
        THREE_CONTEXTS,
        max_length=max_length,
        roles=[CT],
        user_identity=(b"alice", b"s3cret"),
    )


# ---- PDU headers and the set-up buffer ---------------------------------------------------------


def test_a_declared_length_over_the_cap_is_refused_from_the_header_alone() -> None:
    with pytest.raises(RemoteProtocolError, match="over the 65536-byte limit") as raised:
        pdu.check_header(pdu.P_DATA_TF, CAP + 1, CAP)
    assert raised.value.abort_reason == pdu.ABORT_INVALID_PARAMETER

    buffer = pdu.PduBuffer(CAP)
    with pytest.raises(RemoteProtocolError):
        buffer.feed(struct.pack(">BxL", pdu.A_ASSOCIATE_RQ, 0xFFFF_FFFF))  # no body at all


def test_a_length_exactly_at_the_cap_is_accepted() -> None:
    pdu.check_header(pdu.P_DATA_TF, CAP, CAP)


def test_unknown_pdu_type_0x08_is_an_unrecognized_pdu() -> None:
    with pytest.raises(RemoteProtocolError, match="0x08") as raised:
        pdu.check_header(0x08, 4, CAP)
    assert raised.value.abort_reason == pdu.ABORT_UNRECOGNIZED_PDU


@pytest.mark.parametrize(
    "pdu_type", [pdu.A_ASSOCIATE_RJ, pdu.A_RELEASE_RQ, pdu.A_RELEASE_RP, pdu.A_ABORT]
)
@pytest.mark.parametrize("length", [0, 3, 5, 1000])
def test_fixed_size_pdus_with_a_length_other_than_4_are_invalid(pdu_type: int, length: int) -> None:
    with pytest.raises(RemoteProtocolError, match="must be 4 bytes") as raised:
        pdu.check_header(pdu_type, length, CAP)
    assert raised.value.abort_reason == pdu.ABORT_INVALID_PARAMETER


def test_pdu_buffer_yields_an_association_request_fed_byte_by_byte_only_when_complete() -> None:
    raw = full_rq()
    buffer = pdu.PduBuffer(CAP)
    for i in range(len(raw) - 1):
        assert buffer.feed(raw[i : i + 1]) == []
    assert buffer.feed(raw[-1:]) == [(pdu.A_ASSOCIATE_RQ, raw)]
    assert buffer.take_rest() == b""


def test_pdu_buffer_returns_every_whole_pdu_and_hands_over_the_partial_rest() -> None:
    raw = full_rq()
    data = p_data(b"\x00\x00\x00\x02\x01\x03")
    buffer = pdu.PduBuffer(CAP)
    assert buffer.feed(raw + release_rq() + data[:5]) == [
        (pdu.A_ASSOCIATE_RQ, raw),
        (pdu.A_RELEASE_RQ, release_rq()),
    ]
    assert buffer.take_rest() == data[:5]
    assert buffer.take_rest() == b""


def test_associate_rj_bytes_follow_ps38_table_9_21() -> None:
    raw = pdu.associate_rj(1, 1, 3)
    assert raw == bytes.fromhex("03 00 00000004 00 01 01 03")
    decoded = A_ASSOCIATE_RJ()
    decoded.decode(raw)
    assert (decoded.result, decoded.source, decoded.reason_diagnostic) == (1, 1, 3)
    assert pdu.rj_fields(raw) == (1, 1, 3)


def test_provider_abort_carries_its_reason_as_per_ps38_table_9_26() -> None:
    raw = pdu.abort(reason=pdu.ABORT_UNEXPECTED_PDU)
    assert raw == bytes.fromhex("07 00 00000004 00 00 02 02")
    decoded = A_ABORT_RQ()
    decoded.decode(raw)
    assert (decoded.source, decoded.reason_diagnostic) == (2, 2)
    assert pdu.fixed_fields(raw) == (2, 2)


def test_user_abort_reason_is_always_zero() -> None:
    assert pdu.abort(pdu.ABORT_SOURCE_USER, 6) == bytes.fromhex("07 00 00000004 00 00 00 00")


def test_release_rp_bytes_decode_with_pynetdicom() -> None:
    raw = pdu.release_rp()
    assert raw == bytes.fromhex("06 00 00000004 00000000")
    A_RELEASE_RP().decode(raw)


# ---- A-ASSOCIATE-RQ decoding -------------------------------------------------------------------


def test_decode_rq_reads_titles_contexts_and_maximum_length() -> None:
    raw = full_rq()
    rq = acse.decode_rq(raw)
    assert (rq.calling_ae, rq.called_ae, rq.protocol_version) == ("CT01", "PACS", 1)
    assert [(c.context_id, c.abstract_syntax, list(c.transfer_syntaxes)) for c in rq.contexts] == [
        (cid, abstract, transfer) for cid, abstract, transfer in THREE_CONTEXTS
    ]
    assert rq.max_length == 16_384
    assert rq.application_context == application_context_item()
    # Every context keeps the exact bytes it arrived as.
    assert all(context.raw in raw for context in rq.contexts)
    assert raw.endswith(rq.user_information)


def test_decode_rq_of_128_contexts_keeps_them_all_in_order() -> None:
    contexts = storescu_contexts(128)
    rq = acse.decode_rq(associate_rq("STORESCU", "ANY-SCP", contexts, max_length=0))
    assert [c.context_id for c in rq.contexts] == list(range(1, 256, 2))
    assert [c.abstract_syntax for c in rq.contexts] == [c[1] for c in contexts]
    assert all(len(c.transfer_syntaxes) == 3 for c in rq.contexts)
    assert rq.max_length == 0


def test_decode_rq_tolerates_padded_uids_and_ae_titles() -> None:
    raw = raw_associate_rq(
        [
            application_context_item(),
            item(
                0x20,
                bytes((1, 0, 0, 0))
                + item(0x30, CT.encode() + b"\x00")
                + item(0x40, IMPLICIT_LE.encode() + b"\x00"),
            ),
            user_information_item(),
        ],
        called=b"  PACS",
        calling=b"CT01".ljust(16, b"\x00"),  # NUL padding, seen in the field
    )
    rq = acse.decode_rq(raw)
    assert (rq.called_ae, rq.calling_ae) == ("PACS", "CT01")
    assert rq.contexts[0].abstract_syntax == CT
    assert rq.contexts[0].transfer_syntaxes == (IMPLICIT_LE,)


def _truncated(raw: bytes, cut: int) -> bytes:
    body = raw[6:-cut]
    return struct.pack(">BxL", 1, len(body)) + body


MALFORMED_RQS: dict[str, tuple[Callable[[], bytes], str, int]] = {
    "last item cut short": (
        lambda: _truncated(full_rq(), 3),
        "overruns",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "truncated item header": (
        lambda: raw_associate_rq(
            [application_context_item(), context_rq_item(1, CT, [IMPLICIT_LE]), b"\x50\x00"]
        ),
        "truncated item header",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "even context ID": (
        lambda: raw_associate_rq(
            [application_context_item(), context_rq_item(2, CT, [IMPLICIT_LE])]
        ),
        "is even",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "duplicate context ID": (
        lambda: raw_associate_rq(
            [
                application_context_item(),
                context_rq_item(3, CT, [IMPLICIT_LE]),
                context_rq_item(3, MR, [IMPLICIT_LE]),
            ]
        ),
        "duplicate presentation context ID 3",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "context item overrunning the PDU": (
        lambda: raw_associate_rq(
            [application_context_item(), struct.pack(">BxH", 0x20, 255) + bytes((1, 0, 0, 0))]
        ),
        "overruns",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "sub-item overrunning its context": (
        lambda: raw_associate_rq(
            [
                application_context_item(),
                item(0x20, bytes((1, 0, 0, 0)) + struct.pack(">BxH", 0x30, 40) + CT.encode()),
            ]
        ),
        "overruns",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "context without transfer syntax": (
        lambda: raw_associate_rq(
            [application_context_item(), context_rq_item(1, CT, []), user_information_item()]
        ),
        "lacks abstract or transfer syntax",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "no presentation context": (
        lambda: raw_associate_rq([application_context_item(), user_information_item()]),
        "without presentation contexts",
        pdu.ABORT_UNEXPECTED_PARAMETER,
    ),
    "no application context": (
        lambda: raw_associate_rq([context_rq_item(1, CT, [IMPLICIT_LE]), user_information_item()]),
        "without Application Context",
        pdu.ABORT_UNEXPECTED_PARAMETER,
    ),
    "calling AE with a control character": (
        lambda: raw_associate_rq(
            [application_context_item(), context_rq_item(1, CT, [IMPLICIT_LE])],
            calling=b"CT\x0701",
        ),
        "control characters",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "called AE with a backslash": (
        lambda: raw_associate_rq(
            [application_context_item(), context_rq_item(1, CT, [IMPLICIT_LE])],
            called=b"PA\\CS",
        ),
        "backslash",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "blank called AE": (
        lambda: raw_associate_rq(
            [application_context_item(), context_rq_item(1, CT, [IMPLICIT_LE])], called=b""
        ),
        "empty AE title",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "UID with letters": (
        lambda: raw_associate_rq(
            [application_context_item(), context_rq_item(1, "1.2.abc", [IMPLICIT_LE])]
        ),
        "invalid UID",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "Maximum Length sub-item of 2 bytes": (
        lambda: raw_associate_rq(
            [
                application_context_item(),
                context_rq_item(1, CT, [IMPLICIT_LE]),
                item(0x50, item(0x51, b"\x40\x00")),
            ]
        ),
        "Maximum Length",
        pdu.ABORT_INVALID_PARAMETER,
    ),
    "shorter than the fixed fields": (
        lambda: full_rq()[:60],
        "too short",
        pdu.ABORT_INVALID_PARAMETER,
    ),
}


@pytest.mark.parametrize("case", MALFORMED_RQS)
def test_malformed_association_request_is_refused_with_a_reason(case: str) -> None:
    build, message, reason = MALFORMED_RQS[case]
    with pytest.raises(RemoteProtocolError, match=message) as raised:
        acse.decode_rq(build())
    assert raised.value.abort_reason == reason


# ---- A-ASSOCIATE-RQ re-encoding ------------------------------------------------------------------


def test_narrowed_request_decodes_with_pynetdicom_to_exactly_the_kept_contexts() -> None:
    rq = acse.decode_rq(full_rq())
    verification, ct, _find = rq.contexts
    kept = (verification, acse.narrow(ct, (IMPLICIT_LE, JPEG_BASELINE)))

    encoded = acse.encode_rq(rq, kept, CAP)

    decoded = decoded_rq(encoded)
    assert (decoded.calling_ae_title, decoded.called_ae_title) == ("CT01", "PACS")
    assert decoded.application_context_name == "1.2.840.10008.3.1.1.1"
    assert [
        (c.context_id, c.abstract_syntax, c.transfer_syntax)
        for c in decoded.to_primitive().presentation_context_definition_list
    ] == [(1, VERIFICATION, [IMPLICIT_LE]), (3, CT, [IMPLICIT_LE, JPEG_BASELINE])]
    # The untouched context travels as received; the narrowed one is re-encoded.
    assert verification.raw in encoded
    assert ct.raw not in encoded


def test_request_to_upstream_keeps_the_other_user_information_sub_items_byte_identical() -> None:
    rq = acse.decode_rq(full_rq(max_length=16_384))
    encoded = acse.encode_rq(rq, rq.contexts, CAP)
    assert encoded.endswith(rq.user_information)

    user_information = decoded_rq(encoded).user_information
    assert user_information is not None
    assert user_information.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert list(user_information.role_selection) == [CT]
    identity = user_information.user_identity
    assert isinstance(identity, UserIdentitySubItemRQ)
    assert (identity.primary_field, identity.secondary_field) == (b"alice", b"s3cret")


@pytest.mark.parametrize(
    ("announced", "forwarded"),
    [
        (0, CAP),  # 0 means unlimited (PS3.8 Annex D.1): the cap applies
        (CAP + 1, CAP),
        (0xFFFF_FFFF, CAP),
        (CAP, CAP),
        (CAP - 1, CAP - 1),
        (16_384, 16_384),
    ],
)
def test_maximum_length_is_clamped_to_the_cap_and_nothing_else_changes(
    announced: int, forwarded: int
) -> None:
    rq = acse.decode_rq(full_rq(max_length=announced))
    encoded = acse.encode_rq(rq, rq.contexts, CAP)

    user_information = decoded_rq(encoded).user_information
    assert user_information is not None
    assert user_information.maximum_length == forwarded
    assert acse.decode_rq(encoded).max_length == forwarded
    announced_bytes = struct.pack(">L", announced)
    forwarded_bytes = struct.pack(">L", forwarded)
    assert encoded[6:] == full_rq(max_length=announced)[6:].replace(
        b"\x51\x00\x00\x04" + announced_bytes, b"\x51\x00\x00\x04" + forwarded_bytes
    )


def test_request_to_upstream_carries_the_rewritten_called_ae() -> None:
    rq = acse.decode_rq(full_rq())
    upstream = acse.encode_rq(
        acse.AssociateRQ(
            rq.protocol_version,
            "REALPACS",
            rq.calling_ae,
            rq.application_context,
            rq.contexts,
            rq.user_information,
            rq.max_length,
        ),
        rq.contexts[:1],
        CAP,
    )
    decoded = decoded_rq(upstream)
    assert (decoded.called_ae_title, decoded.calling_ae_title) == ("REALPACS", "CT01")


def test_request_of_128_contexts_narrowed_to_64_round_trips_through_pynetdicom() -> None:
    rq = acse.decode_rq(associate_rq("STORESCU", "PACS", storescu_contexts(128)))
    kept = tuple(c for c in rq.contexts if c.context_id % 4 == 1)
    decoded = decoded_rq(acse.encode_rq(rq, kept, CAP)).to_primitive()
    assert [c.context_id for c in decoded.presentation_context_definition_list] == [
        c.context_id for c in kept
    ]
    assert len(kept) == 64


# ---- A-ASSOCIATE-AC for the requester ------------------------------------------------------------


def test_ac_for_requester_has_one_result_per_proposed_context_in_order() -> None:
    rq = acse.decode_rq(
        associate_rq(
            "CT01",
            "PACS",
            [
                (1, VERIFICATION, [IMPLICIT_LE]),
                (3, STUDY_FIND, [IMPLICIT_LE]),
                (5, CT, [JPEG_BASELINE, EXPLICIT_LE]),
                (7, MR, [DEFLATED_LE]),
            ],
        )
    )
    refused = {3: 3, 7: 4}  # abstract syntax / transfer syntaxes not supported
    upstream_ac = associate_ac(
        "CT01", "REALPACS", [(1, 0, IMPLICIT_LE), (5, 0, EXPLICIT_LE)], max_length=0
    )

    ac = acse.encode_ac_for_requester(upstream_ac, acse.decode_ac(upstream_ac), rq, refused, CAP)

    decoded = decoded_ac(ac)
    assert (decoded.calling_ae_title, decoded.called_ae_title) == ("CT01", "PACS")
    results = decoded.to_primitive().presentation_context_definition_results_list
    assert [(c.context_id, c.result) for c in results] == [(1, 0), (3, 3), (5, 0), (7, 4)]
    assert [c.transfer_syntax[0] for c in results if c.result == 0] == [IMPLICIT_LE, EXPLICIT_LE]
    assert decoded.user_information is not None
    assert decoded.user_information.maximum_length == CAP


def test_ac_for_requester_keeps_the_upstreams_own_refusals() -> None:
    rq = acse.decode_rq(full_rq())
    upstream_ac = associate_ac(
        "CT01", "PACS", [(1, 0, IMPLICIT_LE), (3, 4, EXPLICIT_LE), (5, 1, IMPLICIT_LE)]
    )
    ac = acse.encode_ac_for_requester(upstream_ac, acse.decode_ac(upstream_ac), rq, {}, CAP)
    results = decoded_ac(ac).to_primitive().presentation_context_definition_results_list
    assert [(c.context_id, c.result) for c in results] == [(1, 0), (3, 4), (5, 1)]
    user_information = decoded_ac(ac).user_information
    assert user_information is not None
    assert user_information.maximum_length == 16_384  # below the cap: unchanged


def test_a_context_the_upstream_left_unanswered_comes_back_as_no_reason() -> None:
    rq = acse.decode_rq(full_rq())
    upstream_ac = associate_ac("CT01", "PACS", [(1, 0, IMPLICIT_LE), (5, 0, IMPLICIT_LE)])
    ac = acse.encode_ac_for_requester(upstream_ac, acse.decode_ac(upstream_ac), rq, {}, CAP)
    results = decoded_ac(ac).to_primitive().presentation_context_definition_results_list
    assert [(c.context_id, c.result) for c in results] == [(1, 0), (3, 2), (5, 0)]


def test_decode_ac_reads_context_results() -> None:
    raw = associate_ac("CT01", "PACS", [(1, 0, IMPLICIT_LE), (3, 3, IMPLICIT_LE)])
    ac = acse.decode_ac(raw)
    assert ac.contexts == (
        acse.AcceptedContext(1, 0, IMPLICIT_LE),
        acse.AcceptedContext(3, 3, IMPLICIT_LE),
    )
    assert ac.max_length == 16_384
