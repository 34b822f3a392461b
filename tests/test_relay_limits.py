"""Rate limits and caps through a real firewall, each seen from the client with its standard
code, while a client within its limits keeps working; and nothing stays counted afterwards.

Every address in 127.0.0.0/8 is local, so a test is several hosts by binding its client
sockets to 127.0.0.2, 127.0.0.3, ...
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pydicom

from dicomfw.core.ratelimit import Limiter
from dicomfw.core.session import AssociationRejected, RequestRefused
from dicomfw.relay.server import Refused
from tests.corehelpers import (
    IMPLICIT_LE,
    c_find_rq,
    command_pdv,
    data_pdv,
    decoded_command,
    implicit_le,
    p_data,
    pdvs_of,
    release_rq,
)
from tests.corehelpers import associate_rq as raw_rq
from tests.harness import (
    FIND,
    VERIFICATION,
    WAIT,
    Firewall,
    Pki,
    associate_rq,
    rules,
    running_firewall,
    running_scp,
    scu,
)
from tests.opshelpers import A_ASSOCIATE_AC, LOCAL_LIMIT_RJ, connect_from, first_pdu_from


def limited(pki: Pki, port: int, limits: str) -> str:
    return rules(
        pki,
        port,
        upstream_tls=False,
        allow="[{services: [C-ECHO, C-FIND]}]",
        limits=f"{{artim_seconds: 5, idle_seconds: 30, {limits}}}",
    )


def associate(
    port: int, source: str = "127.0.0.1", contexts: tuple[str, ...] = (VERIFICATION,)
) -> Any:
    association = scu("CT01", contexts).associate(
        "127.0.0.1", port, ae_title="PACS", bind_address=(source, 0)
    )
    assert association.is_established, f"association from {source} was not accepted"
    return association


def echo_from(source: str, port: int) -> bool:
    association = associate(port, source)
    status = association.send_c_echo()
    association.release()
    return bool(status) and status.Status == 0x0000


def usage(firewall: Firewall) -> tuple[int, int, int]:
    assert firewall.relay is not None
    relay = firewall.relay
    counts = firewall.call(relay.limiter.usage)
    return counts.pending, counts.active, counts.keys


def assert_nothing_counted(firewall: Firewall) -> None:
    """Once every client has gone, the limiter holds no pending/active counts (rate buckets
    may stay until they refill)."""
    deadline = time.monotonic() + WAIT
    while usage(firewall)[:2] != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert usage(firewall)[:2] == (0, 0)


def study_query() -> pydicom.Dataset:
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.826.0.1.3680043.10.1"
    return query


class RawFinds:
    """A C-FIND client on a raw socket with Nagle off, one PDU per request: fast enough that
    a burst of queries is not slowed by the client itself (pynetdicom's SCU takes ~50 ms each)."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = connect_from(source, port)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(raw_rq("CT01", "PACS", [(1, FIND, [IMPLICIT_LE])]))
        assert self._pdu()[0] == A_ASSOCIATE_AC
        self.identifier = implicit_le(study_query())

    def _pdu(self) -> bytes:
        header = self.sock.recv(6, socket.MSG_WAITALL)
        assert len(header) == 6, "the firewall closed the connection"
        return header + self.sock.recv(int.from_bytes(header[2:], "big"), socket.MSG_WAITALL)

    def find(self, message_id: int) -> int:
        """Send one C-FIND-RQ; return the status of its final response."""
        query = p_data(
            command_pdv(1, c_find_rq(message_id)), data_pdv(1, self.identifier, last=True)
        )
        self.sock.sendall(query)
        while True:
            for _, control, fragment in pdvs_of(self._pdu()):
                if control & 0x01:  # a command: the PACS's whole response in one PDV
                    status = int(decoded_command(fragment).Status)
                    if status not in (0xFF00, 0xFF01):
                        return status

    def release(self) -> None:
        self.sock.sendall(release_rq())
        assert self._pdu()[0] == 0x06
        self.sock.close()


def find_statuses(association: Any) -> list[int]:
    return [status.Status for status, _ in association.send_c_find(study_query(), FIND)]


def test_an_address_over_its_association_rate_gets_rj_transient_local_limit(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, limited(pki, pacs.port, "associations_per_minute_per_ip: 3")
        ) as firewall,
    ):
        port = firewall.port("front")
        answers = [
            first_pdu_from("127.0.0.5", port, associate_rq("CT01", "PACS")) for _ in range(4)
        ]
        # Another host keeps working while 127.0.0.5 is held to its rate.
        assert echo_from("127.0.0.6", port)
        assert_nothing_counted(firewall)
    assert [answer[0] for answer in answers[:3]] == [A_ASSOCIATE_AC] * 3
    assert answers[3] == LOCAL_LIMIT_RJ
    rejected = [e for _, e in firewall.events if isinstance(e, AssociationRejected)]
    assert [(e.why, e.result, e.source, e.reason) for e in rejected] == [
        ("ip_association_rate_exceeded", 2, 3, 2)
    ]


def test_concurrent_associations_per_address_and_in_total_are_capped(
    tmp_path: Path, pki: Pki
) -> None:
    limits = "max_concurrent_per_ip: 2, max_concurrent_total: 3"
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, limited(pki, pacs.port, limits)) as firewall,
    ):
        port = firewall.port("front")
        held = [associate(port, "127.0.0.1"), associate(port, "127.0.0.1")]
        per_ip = first_pdu_from("127.0.0.1", port, associate_rq("CT01", "PACS"))
        held.append(associate(port, "127.0.0.2"))  # another address: within its cap
        assert held[2].send_c_echo().Status == 0x0000
        total = first_pdu_from("127.0.0.3", port, associate_rq("CT01", "PACS"))
        assert usage(firewall)[1] == 3
        held.pop(0).release()  # a slot is free again
        assert echo_from("127.0.0.3", port)
        for association in held:
            assert association.send_c_echo().Status == 0x0000  # the held ones were untouched
            association.release()
        assert_nothing_counted(firewall)
    assert per_ip == LOCAL_LIMIT_RJ
    assert total == LOCAL_LIMIT_RJ
    whys = [e.why for _, e in firewall.events if isinstance(e, AssociationRejected)]
    assert whys == ["ip_concurrency_exceeded", "total_concurrency_exceeded"]


def test_a_c_find_over_its_rate_is_refused_with_a700_and_not_forwarded(
    tmp_path: Path, pki: Pki
) -> None:
    limits = "requests_per_minute_per_association: {C-FIND: 2}, request_limit_action: refuse"
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, limited(pki, pacs.port, limits)) as firewall,
    ):
        port = firewall.port("front")
        association = associate(port, contexts=(VERIFICATION, FIND))
        statuses = [find_statuses(association) for _ in range(3)]
        echo = association.send_c_echo().Status  # other services are not limited
        association.release()
        fresh = associate(port, contexts=(VERIFICATION, FIND))  # the rate is per association
        again = find_statuses(fresh)
        fresh.release()
        assert_nothing_counted(firewall)
    assert statuses[:2] == [[0xFF00, 0xFF00, 0x0000]] * 2
    assert statuses[2] == [0xA700]
    assert echo == 0x0000 and again[-1] == 0x0000
    assert pacs.requests.count("C-FIND") == 3  # the refused one never reached the PACS
    refused = [e for _, e in firewall.events if isinstance(e, RequestRefused)]
    assert [(e.service, e.status, e.why) for e in refused] == [
        ("C-FIND", 0xA700, "request_rate_exceeded")
    ]


def test_a_c_find_over_its_rate_is_delayed_to_the_rate_without_slowing_anyone_else(
    tmp_path: Path, pki: Pki
) -> None:
    # 120 a minute: a burst of 120, then one every 0.5 s.
    limits = "requests_per_minute_per_association: {C-FIND: 120}, request_limit_action: delay"
    with (
        running_scp(find_results=0) as pacs,
        running_firewall(tmp_path, limited(pki, pacs.port, limits)) as firewall,
    ):
        port = firewall.port("front")
        scraper = RawFinds(port, "127.0.0.1")
        started = time.monotonic()
        for message_id in range(1, 121):
            assert scraper.find(message_id) == 0x0000
        burst = time.monotonic() - started
        others: list[float] = []

        def echo_meanwhile() -> None:
            time.sleep(0.2)  # while the scraper's next query is held
            begun = time.monotonic()
            assert echo_from("127.0.0.7", port)
            others.append(time.monotonic() - begun)

        bystander = threading.Thread(target=echo_meanwhile)
        bystander.start()
        done = []
        for message_id in range(121, 125):
            assert scraper.find(message_id) == 0x0000
            done.append(time.monotonic())
        bystander.join(WAIT)
        scraper.release()
        assert_nothing_counted(firewall)
    assert burst < 1.0, burst  # the burst passed undelayed
    gaps = [later - earlier for earlier, later in itertools.pairwise(done)]
    assert all(0.4 <= gap <= 0.75 for gap in gaps), gaps
    assert others and others[0] < 0.4  # the bystander's whole association did not wait
    assert pacs.requests.count("C-FIND") == 124


def test_connections_beyond_the_pending_cap_are_closed_before_a_byte_is_read(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, limited(pki, pacs.port, "max_pending_per_ip: 2")) as firewall,
        contextlib.ExitStack() as idle,
    ):
        port = firewall.port("front")
        silent = [idle.enter_context(connect_from("127.0.0.4", port)) for _ in range(2)]
        deadline = time.monotonic() + WAIT
        while usage(firewall)[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with connect_from("127.0.0.4", port) as third:
            third.sendall(associate_rq("CT01", "PACS"))
            closed_with = _read_all(third)
        assert echo_from("127.0.0.8", port)  # another host is not affected
        # One of the silent ones associates: it is pending no more, so a new one may connect.
        silent[0].sendall(associate_rq("CT01", "PACS"))
        assert silent[0].recv(1) == bytes((A_ASSOCIATE_AC,))
        assert first_pdu_from("127.0.0.4", port, associate_rq("CT01", "PACS"))[0] == A_ASSOCIATE_AC
        for sock in silent:
            sock.close()
        assert_nothing_counted(firewall)
    assert closed_with == b""
    refused = [e for _, e in firewall.events if isinstance(e, Refused)]
    assert [(e.why, e.detail) for e in refused] == [("pending_limit_exceeded", "127.0.0.4")]


def _read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return bytes(data)


def test_with_a_shared_limiter_and_no_store_the_instance_decides_from_its_own_counts(
    tmp_path: Path, pki: Pki
) -> None:
    """The session asks (CheckLimits) and waits; with no store to ask, or one that cannot
    answer under ``fail: open``, the relay answers from this instance's counters."""
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, limited(pki, pacs.port, "max_concurrent_per_ip: 1")) as fw,
    ):
        assert fw.relay is not None
        relay = fw.relay
        fw.call(lambda: setattr(relay, "limiter", Limiter(shared=True)))
        port = fw.port("front")
        held = associate(port, "127.0.0.1")
        assert held.send_c_echo().Status == 0x0000
        second = first_pdu_from("127.0.0.1", port, associate_rq("CT01", "PACS"))
        held.release()
        assert echo_from("127.0.0.1", port)
        assert_nothing_counted(fw)
    assert second == LOCAL_LIMIT_RJ
