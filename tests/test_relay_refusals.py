"""Refusals, each seen from the requester's side, and each leaving the firewall serving others."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pydicom
import pytest

from dicomfw.core.session import AssociationEnded, AssociationRejected, RequestRefused
from dicomfw.pki import certs
from dicomfw.relay.server import Refused
from tests.harness import (
    CT,
    FIND,
    MOVE,
    MR,
    VERIFICATION,
    Pki,
    associate_rq,
    client_context,
    ct_image,
    dcmtk,
    echo_works,
    exchange,
    free_port,
    rules,
    running_firewall,
    running_scp,
    scu,
    server_context,
    tls_association,
)

A_ASSOCIATE_RJ = 0x03


@pytest.mark.parametrize(
    ("calling", "called", "reason", "why"),
    [
        ("STRANGER", "PACS", 3, "calling_ae_unknown"),
        ("FARAWAY", "PACS", 3, "source_network_denied"),
        ("CT01", "NOT_A_PACS", 7, "called_ae_unknown"),
    ],
    ids=["unknown-calling-ae", "known-ae-wrong-network", "unknown-called-ae"],
)
def test_association_is_rejected_with_the_ps38_reason_and_others_keep_working(
    tmp_path: Path, pki: Pki, calling: str, called: str, reason: int, why: str
) -> None:
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False)) as firewall,
    ):
        answer = exchange(firewall.port("front"), associate_rq(calling, called))
        assert echo_works(firewall.port("front"))
    # A-ASSOCIATE-RJ: result 1 (permanent), source 1 (service user), then the reason.
    assert answer == bytes((A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 1, 1, reason))
    rejected = [e for _, e in firewall.events if isinstance(e, AssociationRejected)]
    assert [(e.calling_ae, e.why) for e in rejected] == [(calling, why)]
    assert pacs.requests == ["C-ECHO"]  # only the good association reached the PACS


def test_dcmtk_echoscu_reports_the_rejection_reason(tmp_path: Path, pki: Pki) -> None:
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False)) as firewall,
    ):
        result = dcmtk(
            "echoscu", "-aet", "NOBODY", "-aec", "PACS", "127.0.0.1", str(firewall.port("front"))
        )
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout


@pytest.mark.parametrize("client", ["no-certificate", "other-ca", "server-certificate"])
def test_tls_listener_refuses_clients_without_a_valid_certificate(
    tmp_path: Path, pki: Pki, client: str
) -> None:
    pair = {"no-certificate": None, "other-ca": pki.stranger, "server-certificate": pki.pacs}
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, rules(pki, pacs.port, listener_tls=True, upstream_tls=False)
        ) as firewall,
    ):
        port = firewall.port("front")
        context = client_context(pki, pair[client])
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            # TLS 1.3 clients learn of the refusal on their first read, not in connect.
            exchange(port, associate_rq("CT01", "PACS"), tls=context)
            raise ConnectionError("no answer")  # reached only if nothing raised above
        refused = firewall.wait_for(lambda e: isinstance(e, Refused))
        good = tls_association(pki, port, scu("CT01", (VERIFICATION,)))
        assert good.is_established and good.send_c_echo().Status == 0
        good.release()
    assert isinstance(refused, Refused) and refused.why == "tls_handshake_failed"
    assert pacs.requests == ["C-ECHO"]


def test_certificate_bound_peer_is_rejected_with_another_peers_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, rules(pki, pacs.port, listener_tls=True, upstream_tls=False)
        ) as firewall,
    ):
        # REMOTE is bound to urn:dicom:ae:REMOTE; the CT01 certificate must not speak for it.
        answer = exchange(
            firewall.port("front"),
            associate_rq("REMOTE", "PACS"),
            tls=client_context(pki, pki.modality),
        )
        ok = exchange(
            firewall.port("front"),
            associate_rq("REMOTE", "PACS"),
            tls=client_context(pki, pki.remote),
        )
    assert answer == bytes((A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 1, 1, 3))
    assert ok[0] == 0x02  # A-ASSOCIATE-AC with its own certificate


def test_a_disallowed_sop_class_is_refused_in_the_ac_while_an_allowed_one_stores(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False)) as firewall,
    ):
        association = scu("CT01", (CT, MR)).associate(
            "127.0.0.1", firewall.port("front"), ae_title="PACS"
        )
        assert association.is_established
        refused = {c.abstract_syntax: c.result for c in association.rejected_contexts}
        accepted = {c.abstract_syntax for c in association.accepted_contexts}
        status = association.send_c_store(ct_image(seed=1)).Status
        association.release()
    assert refused == {MR: 3}  # abstract-syntax-not-supported (provider rejection)
    assert accepted == {CT}
    assert status == 0x0000 and len(pacs.stored) == 1


def test_a_route_with_no_allowed_context_is_rejected_without_contacting_the_upstream(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False)) as firewall,
    ):
        answer = exchange(firewall.port("front"), associate_rq("CT01", "PACS", (MR,)))
    assert answer == bytes((A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 1, 1, 1))
    assert pacs.requests == []


def _study_query() -> pydicom.Dataset:
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.826.0.1.3680043.10.1"
    return query


def test_c_find_and_c_move_on_a_store_only_route_get_a_refusal_status_at_once(
    tmp_path: Path, pki: Pki
) -> None:
    store_only = "[{services: [C-STORE]}]"  # any SOP class, but only the C-STORE service
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, rules(pki, pacs.port, upstream_tls=False, allow=store_only)
        ) as firewall,
    ):
        association = scu("CT01", (CT, FIND, MOVE)).associate(
            "127.0.0.1", firewall.port("front"), ae_title="PACS"
        )
        assert association.is_established
        find = list(association.send_c_find(_study_query(), FIND))
        move = list(association.send_c_move(_study_query(), "CT01", MOVE))
        store = association.send_c_store(ct_image(seed=2)).Status
        association.release()
    assert [status.Status for status, _ in find] == [0x0124]
    assert [status.Status for status, _ in move] == [0x0124]
    assert store == 0x0000  # the association stayed usable
    assert pacs.requests == ["C-STORE"]  # nothing refused ever reached the PACS
    refused = [e for _, e in firewall.events if isinstance(e, RequestRefused)]
    assert [(e.service, e.status, e.why) for e in refused] == [
        ("C-FIND", 0x0124, "service_not_allowed"),
        ("C-MOVE", 0x0124, "service_not_allowed"),
    ]


def test_c_move_to_an_unlisted_destination_is_refused_with_a801(tmp_path: Path, pki: Pki) -> None:
    allow = (
        "[{services: [C-MOVE], sop_classes: [StudyRootQueryRetrieveInformationModelMove],"
        " move_destinations: [WS1]}]"
    )
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False, allow=allow)) as fw,
    ):
        port = str(fw.port("front"))
        common = (
            "-aet",
            "CT01",
            "-aec",
            "PACS",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID=1.2.3",
            "127.0.0.1",
            port,
        )
        refused = dcmtk("movescu", "-v", "-aem", "EVIL", *common)
        allowed = dcmtk("movescu", "-v", "-aem", "WS1", *common)
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in refused.stderr
    events = [e for _, e in fw.events if isinstance(e, RequestRefused)]
    assert [(e.service, e.status, e.why) for e in events] == [
        ("C-MOVE", 0xA801, "move_destination_denied")
    ]
    assert pacs.requests == ["C-MOVE"]  # only the WS1 request was forwarded
    # The PACS itself answers WS1 with its own A801 (it knows no WS1): that the request got
    # there at all is what the firewall decided.
    assert "Refused: MoveDestinationUnknown" in allowed.stderr


def test_an_unreachable_upstream_gives_a_transient_rejection(tmp_path: Path, pki: Pki) -> None:
    with running_firewall(tmp_path, rules(pki, free_port(), upstream_tls=False)) as firewall:
        answer = exchange(firewall.port("front"), associate_rq("CT01", "PACS"))
    # result 2 rejected-transient, source 3 service-provider (presentation), 1 congestion
    assert answer == bytes((A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 2, 3, 1))


def test_an_upstream_that_accepts_but_never_answers_times_out_into_a_transient_rejection(
    tmp_path: Path, pki: Pki
) -> None:
    """TCP connects (the kernel accepts into the backlog) but no TLS ServerHello ever comes:
    the upstream connect timeout, which covers the handshake, ends the wait."""
    mute = socket.create_server(("127.0.0.1", 0))  # listens, never accepts, never speaks
    limits = "{artim_seconds: 5, idle_seconds: 30, connect_timeout_seconds: 1}"
    try:
        with running_firewall(
            tmp_path, rules(pki, mute.getsockname()[1], limits=limits)
        ) as firewall:
            started = time.monotonic()
            answer = exchange(firewall.port("front"), associate_rq("CT01", "PACS"))
            waited = time.monotonic() - started
            rejected = firewall.wait_for(lambda e: isinstance(e, AssociationRejected))
    finally:
        mute.close()
    assert answer == bytes((A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 2, 3, 1))
    assert 0.9 <= waited < 3
    assert isinstance(rejected, AssociationRejected)
    assert (rejected.why, rejected.detail) == ("upstream_unreachable", "pacs: timed out")


@pytest.mark.parametrize(
    ("impostor", "why"),
    [
        ("another-ca", "unable to get local issuer certificate"),
        ("another-name", "IP address mismatch"),  # the upstream host is 127.0.0.1
    ],
)
def test_an_upstream_whose_certificate_does_not_verify_never_sees_the_association(
    tmp_path: Path, pki: Pki, impostor: str, why: str
) -> None:
    """Server verification toward the upstream: a certificate from another CA, or from the
    site CA for another name, ends the connection in the TLS handshake."""
    out = tmp_path / "impostor"
    if impostor == "another-ca":
        other_ca = pki.ca_dir.parent / "other-ca"
        pair = certs.issue(other_ca, "impostor", "server", out, ["localhost"], ["127.0.0.1"])
    else:
        pair = certs.issue(pki.ca_dir, "elsewhere", "server", out, ["pacs.elsewhere.example"])
    with (
        running_scp(ssl_context=server_context(pki, pair)) as scp,
        running_firewall(tmp_path, rules(pki, scp.port)) as firewall,
    ):
        answer = exchange(firewall.port("front"), associate_rq("CT01", "PACS"))
        rejected = firewall.wait_for(lambda e: isinstance(e, AssociationRejected))
        assert echo_works(firewall.port("front"), called="PACS") is False  # still refused
    assert answer == bytes((A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 2, 3, 1))
    assert isinstance(rejected, AssociationRejected)
    assert rejected.why == "upstream_certificate_invalid"
    assert "CERTIFICATE_VERIFY_FAILED" in rejected.detail and why in rejected.detail
    assert scp.requests == []


def test_the_requester_is_aborted_when_the_upstream_drops_mid_association(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        running_scp(drop_on_echo=True) as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False)) as firewall,
    ):
        association = scu("CT01").associate("127.0.0.1", firewall.port("front"), ae_title="PACS")
        assert association.is_established
        status = association.send_c_echo()  # the PACS drops the connection instead
        ended = firewall.wait_for(lambda e: isinstance(e, AssociationEnded))
        assert echo_works(firewall.port("front"), calling="CT01") is False  # PACS drops it too
    assert not status  # no response: never a success the PACS did not send
    assert association.is_aborted
    assert isinstance(ended, AssociationEnded) and ended.how == "aborted"
    assert ended.why == "upstream_connection_lost"
