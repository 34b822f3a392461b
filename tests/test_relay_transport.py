"""What passes arrives intact: every transport combination, pynetdicom and DCMTK peers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomfw.core.session import AssociationAccepted, AssociationEnded, RequestTally
from dicomfw.relay.server import TLS_WRITE_BYTES, _write_in_pieces
from tests.harness import (
    CT,
    GET,
    MPPS,
    VERIFICATION,
    WAIT,
    Pki,
    client_context,
    ct_image,
    dcmtk,
    encoded,
    free_port,
    rules,
    running_firewall,
    running_process,
    running_scp,
    scu,
    server_context,
    slow_tcp_proxy,
)


def test_twenty_instances_arrive_byte_identical_through_a_plain_to_tls_upgrade(
    tmp_path: Path, pki: Pki
) -> None:
    images = [ct_image(seed=n, pixel_bytes=10_000 + 37_000 * n) for n in range(20)]
    with (
        running_scp(ssl_context=server_context(pki, pki.pacs)) as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=True)) as firewall,
    ):
        association = scu("CT01").associate("127.0.0.1", firewall.port("front"), ae_title="PACS")
        assert association.is_established
        statuses = [association.send_c_store(image).Status for image in images]
        association.release()
        transfer_syntax = next(
            c.transfer_syntax[0] for c in association.accepted_contexts if c.abstract_syntax == CT
        )
        firewall.wait_for(lambda e: isinstance(e, AssociationEnded))
    assert statuses == [0x0000] * 20
    assert pacs.stored == [encoded(image, transfer_syntax) for image in images]
    tallies = [e for _, e in firewall.events if isinstance(e, RequestTally)]
    assert {key for tally in tallies for key in tally.counts} == {("C-STORE", CT)}
    assert sum(t.counts[("C-STORE", CT)].success for t in tallies) == 20
    assert sum(t.counts[("C-STORE", CT)].completed for t in tallies) == 20
    assert len([seconds for t in tallies for _, seconds in t.round_trips]) == 20
    ended = [e for _, e in firewall.events if isinstance(e, AssociationEnded)]
    assert [(e.how, e.why) for e in ended] == [("released", "released")]


@pytest.mark.parametrize(
    ("listener_tls", "upstream_tls"),
    [(False, True), (True, False), (True, True), (False, False)],
    ids=["plain-to-tls", "tls-to-plain", "tls-to-tls", "plain-to-plain"],
)
def test_every_transport_combination_relays_echo_and_store(
    tmp_path: Path, pki: Pki, listener_tls: bool, upstream_tls: bool
) -> None:
    upstream_context = server_context(pki, pki.pacs) if upstream_tls else None
    # The last one is larger than a TLS write (TLS_WRITE_BYTES) many times over.
    images = [ct_image(seed=n, pixel_bytes=300_000 if n < 2 else 3_000_000) for n in range(3)]
    with (
        running_scp(ssl_context=upstream_context) as pacs,
        running_firewall(
            tmp_path,
            rules(pki, pacs.port, listener_tls=listener_tls, upstream_tls=upstream_tls),
        ) as firewall,
    ):
        tls_args = (client_context(pki, pki.modality), "localhost") if listener_tls else None
        association = scu("CT01").associate(
            "127.0.0.1", firewall.port("front"), ae_title="PACS", tls_args=tls_args
        )
        assert association.is_established
        assert association.send_c_echo().Status == 0x0000
        assert [association.send_c_store(i).Status for i in images] == [0, 0, 0]
        association.release()
    assert pacs.requests == ["C-ECHO", "C-STORE", "C-STORE", "C-STORE"]
    assert pacs.stored == [encoded(image) for image in images]


def test_c_get_sub_operations_come_back_on_the_same_association(tmp_path: Path, pki: Pki) -> None:
    allow = (
        "[{services: [C-GET],"
        " sop_classes: [StudyRootQueryRetrieveInformationModelGet, CTImageStorage]}]"
    )
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False, allow=allow)) as fw,
    ):
        ae = scu("CT01", (GET,))
        from pynetdicom import build_role

        ae.add_requested_context(CT, ExplicitVRLittleEndian)
        received: list[str] = []

        def on_store(event: object) -> int:
            received.append(event.dataset.SOPInstanceUID)  # type: ignore[attr-defined]
            return 0x0000

        from pynetdicom import evt

        association = ae.associate(
            "127.0.0.1",
            fw.port("front"),
            ae_title="PACS",
            ext_neg=[build_role(CT, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        assert association.is_established
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.826.0.1.3680043.10.1"
        responses = list(association.send_c_get(query, GET))
        association.release()
    assert responses[-1][0].Status == 0x0000
    assert received == [ct_image(seed=0).SOPInstanceUID, ct_image(seed=1).SOPInstanceUID]
    assert pacs.requests == ["C-GET"]


def test_n_services_pass_when_allowed_and_are_answered_by_the_firewall_when_not(
    tmp_path: Path, pki: Pki
) -> None:
    """MPPS: N-CREATE is allowed on the route and reaches the PACS; N-SET is not, and the
    firewall answers it at once with an N-SET-RSP 0x0124 on the same association."""
    allow = "[{services: [N-CREATE], sop_classes: [ModalityPerformedProcedureStep]}]"
    step = generate_uid()
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, rules(pki, pacs.port, upstream_tls=False, allow=allow)
        ) as firewall,
    ):
        association = scu("CT01", (MPPS,)).associate(
            "127.0.0.1", firewall.port("front"), ae_title="PACS"
        )
        assert association.is_established
        started = pydicom.Dataset()
        started.PerformedProcedureStepStatus = "IN PROGRESS"
        created, attributes = association.send_n_create(started, MPPS, step)
        completed = pydicom.Dataset()
        completed.PerformedProcedureStepStatus = "COMPLETED"
        refused, _ = association.send_n_set(completed, MPPS, step)
        association.release()
    assert created.Status == 0x0000
    assert attributes is not None and attributes.PerformedProcedureStepStatus == "IN PROGRESS"
    assert refused.Status == 0x0124
    assert pacs.requests == ["N-CREATE"]


def test_dcmtk_echoscu_and_storescu_reach_a_dcmtk_tls_storescp(tmp_path: Path, pki: Pki) -> None:
    stored = tmp_path / "stored"
    stored.mkdir()
    image = ct_image(seed=7, pixel_bytes=400_000)
    image_file = tmp_path / "image.dcm"
    image.save_as(image_file, enforce_file_format=True)
    port = free_port()
    storescp = (
        "/usr/bin/storescp",
        "+tls",
        pki.pacs.key,
        pki.pacs.cert,
        "+cf",
        pki.ca,
        "-aet",
        "PACS",
        "-od",
        stored,
        port,
    )
    with (
        running_process(*storescp, ready_port=port),
        running_firewall(tmp_path, rules(pki, port, upstream_tls=True)) as firewall,
    ):
        front = str(firewall.port("front"))
        echo = dcmtk("echoscu", "-aet", "CT01", "-aec", "PACS", "127.0.0.1", front)
        assert echo.returncode == 0, echo.stderr
        store = dcmtk("storescu", "-aet", "CT01", "-aec", "PACS", "127.0.0.1", front, image_file)
        assert store.returncode == 0, store.stderr
    (received,) = stored.iterdir()
    arrived = pydicom.dcmread(received)
    assert arrived.SOPInstanceUID == image.SOPInstanceUID
    assert arrived.PixelData == image.PixelData


def test_a_tls_listener_accepts_dcmtk_storescu_with_a_client_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    image_file = tmp_path / "image.dcm"
    ct_image(seed=3, pixel_bytes=200_000).save_as(image_file, enforce_file_format=True)
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, rules(pki, pacs.port, listener_tls=True, upstream_tls=False)
        ) as firewall,
    ):
        store = dcmtk(
            "storescu",
            "+tls",
            pki.modality.key,
            pki.modality.cert,
            "+cf",
            pki.ca,
            "-aet",
            "CT01",
            "-aec",
            "PACS",
            "127.0.0.1",
            str(firewall.port("front")),
            image_file,
        )
        assert store.returncode == 0, store.stderr
        accepted = firewall.wait_for(lambda e: isinstance(e, AssociationAccepted))
    assert isinstance(accepted, AssociationAccepted) and accepted.calling_ae == "CT01"
    identities = [i.identity for i, e in firewall.events if isinstance(e, AssociationAccepted)]
    assert identities[0] is not None and identities[0].san_uri == ("urn:dicom:ae:CT01",)
    assert len(pacs.stored) == 1


def test_called_ae_is_rewritten_toward_the_upstream(tmp_path: Path, pki: Pki) -> None:
    with (
        running_scp(ae_title="REALPACS") as pacs,
        running_firewall(
            tmp_path,
            rules(pki, pacs.port, upstream_tls=False, rewrite="{called_ae: REALPACS}"),
        ) as firewall,
    ):
        association = scu("CT01", (VERIFICATION,)).associate(
            "127.0.0.1", firewall.port("front"), ae_title="PACS"
        )
        assert association.is_established
        assert association.send_c_echo().Status == 0x0000
        association.release()
    assert pacs.requests == ["C-ECHO"]


def test_a_slow_upstream_pauses_the_sender_instead_of_filling_memory(
    tmp_path: Path, pki: Pki
) -> None:
    image = ct_image(seed=11, pixel_bytes=24_000_000)
    peak = 0
    with (
        running_scp() as pacs,
        slow_tcp_proxy(pacs.port, bytes_per_second=12_000_000) as slow_port,
        running_firewall(tmp_path, rules(pki, slow_port, upstream_tls=False)) as firewall,
    ):
        association = scu("CT01").associate("127.0.0.1", firewall.port("front"), ae_title="PACS")
        assert association.is_established
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                sizes = firewall.call(
                    lambda: [a.buffered_bytes() for a in firewall.relay.associations]  # type: ignore[union-attr]
                )
                peak = max([peak, *sizes])
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        status = association.send_c_store(image).Status
        done.set()
        sampler.join(WAIT)
        association.release()
    assert status == 0x0000
    assert pacs.stored == [encoded(image)]
    # asyncio's default high-water mark is 64 KiB; one read (256 KiB) may land on top of it.
    assert 0 < peak <= 1_048_576, peak


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self.writes.append(bytes(data))


def test_a_large_buffer_goes_to_a_tls_transport_in_pieces_of_tls_write_bytes() -> None:
    data = bytes(range(256)) * 1200  # 307,200 bytes
    transport = _RecordingTransport()
    _write_in_pieces(transport, data, TLS_WRITE_BYTES)  # type: ignore[arg-type]
    assert [len(piece) for piece in transport.writes] == [
        TLS_WRITE_BYTES,
        TLS_WRITE_BYTES,
        len(data) - 2 * TLS_WRITE_BYTES,
    ]
    assert b"".join(transport.writes) == data
