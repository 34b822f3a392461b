"""Two dicomfw instances behind a real HAProxy (the repository's example, round robin), their
limits shared in a real redis-server, all on loopback: the caps and rates hold for the site,
not per instance; a kill -9 frees its slots within the lease; Redis going away and coming back
is survived without a restart; a drain takes an instance out of the balancer before its
listener closes. The clients choose their source address (HAProxy passes it on in the PROXY
header), so each test has addresses of its own for the per-address rate (4 a minute)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.association import Association

from tests.harness import FIND, VERIFICATION, WAIT, Scp, associate_rq, running_scp, scu
from tests.opshelpers import A_ASSOCIATE_AC, LOCAL_LIMIT_RJ, first_pdu_from
from tests.redishelpers import RedisServer, needs_redis, running_redis
from tests.scalehelpers import (
    HAPROXY,
    LEASE_SECONDS,
    Instance,
    make_instance,
    running_haproxy,
    wait_until,
)
from tests.test_drain import refused as port_closed

pytestmark = [
    needs_redis,
    pytest.mark.skipif(not HAPROXY.exists(), reason="HAProxy is not installed (Debian haproxy)"),
]
STORE_UP = "dicomfw_limit_store_up"


@dataclass
class Site:
    redis: RedisServer
    instances: list[Instance]
    haproxy: int
    pacs: Scp

    def fresh(self) -> None:
        """What every test starts from: Redis up and empty, both instances up and ready."""
        if self.redis.process is None:
            self.redis.start()
        with self.redis.client() as client:
            client.flushall()
        for instance in self.instances:
            if not instance.running:
                instance.start()
        wait_until(
            lambda: all(
                i.status("/ready") == 200 and i.metric(STORE_UP) == 1 for i in self.instances
            ),
            "both instances ready with the store up",
        )
        time.sleep(0.3)  # HAProxy's checks (every 100 ms) see a restarted instance up

    def associate(self, source: str, calling: str = "CT01") -> Association:
        association = scu(calling, (VERIFICATION, FIND)).associate(
            "127.0.0.1", self.haproxy, ae_title="PACS", bind_address=(source, 0)
        )
        assert association.is_established, f"{calling} from {source} was not accepted"
        return association

    def first_answer(self, source: str, calling: str = "CT01") -> bytes:
        """The first PDU the site answers an A-ASSOCIATE-RQ with (then the client goes)."""
        return first_pdu_from(source, self.haproxy, associate_rq(calling, "PACS"))

    def refused(self, reason: str) -> list[float]:
        return [instance.refused(reason) for instance in self.instances]

    def wait_refused(self, reason: str, before: list[float], more: list[float]) -> None:
        """Each instance counts ``more`` refusals for ``reason``: a refusal is counted right
        after its answer was sent, so a scrape may come a moment too early."""
        wait_until(
            lambda: [a - b for a, b in zip(self.refused(reason), before, strict=True)] == more,
            f"{more} more {reason} refusals",
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("site")
    with running_redis(directory) as redis, running_scp(find_results=1) as pacs:
        instances = [make_instance(directory, f"fw{n}", pacs.port, redis.url) for n in (1, 2)]
        try:
            for instance in instances:
                instance.start()
            with running_haproxy(directory, instances) as port:
                yield Site(redis, instances, port, pacs)
        finally:
            for instance in instances:
                instance.stop()


def released(associations: list[Association]) -> None:
    for association in associations:
        if association.is_established:
            association.release()


def echo_ok(association: Association) -> bool:
    status = association.send_c_echo()
    return bool(status) and status.Status == 0x0000


def test_a_per_peer_concurrency_cap_of_4_holds_across_both_instances(site: Site) -> None:
    site.fresh()
    before = site.refused("peer_concurrency_exceeded")
    held = [site.associate(f"127.0.1.{n}") for n in range(1, 5)]
    try:
        assert [i.metric("dicomfw_active_associations") for i in site.instances] == [2, 2]
        # the 5th and the 6th land one on each instance (round robin): both refused
        assert site.first_answer("127.0.1.5") == LOCAL_LIMIT_RJ
        assert site.first_answer("127.0.1.6") == LOCAL_LIMIT_RJ
        site.wait_refused("peer_concurrency_exceeded", before, [1, 1])
    finally:
        released(held)
    wait_until(lambda: site.first_answer("127.0.1.7")[0] == A_ASSOCIATE_AC, "a slot freed")


def test_a_per_address_association_rate_holds_in_total(site: Site) -> None:
    site.fresh()
    before = site.refused("ip_association_rate_exceeded")
    answers = [site.first_answer("127.0.2.1", "RATED") for _ in range(6)]
    assert [answer[0] for answer in answers[:4]] == [A_ASSOCIATE_AC] * 4  # 2 on each
    assert answers[4:] == [LOCAL_LIMIT_RJ] * 2  # 4 a minute for the site, not for each
    site.wait_refused("ip_association_rate_exceeded", before, [1, 1])


def test_a_per_peer_c_find_rate_holds_in_total(site: Site) -> None:
    site.fresh()
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    one, two = site.associate("127.0.3.1", "FINDER"), site.associate("127.0.3.2", "FINDER")
    try:
        statuses = []
        for number in range(6):  # alternating: three on each instance
            responses: list[Any] = list(((one, two)[number % 2]).send_c_find(query, FIND))
            statuses.append(responses[-1][0].Status)
    finally:
        released([one, two])
    assert statuses == [0x0000] * 4 + [0xA700] * 2  # C-FIND: 4 a minute, refuse
    wait_until(
        lambda: (
            [
                i.metric("dicomfw_refusals_total", stage="request", reason="request_rate_exceeded")
                for i in site.instances
            ]
            == [1, 1]
        ),
        "one refusal counted on each instance",
    )


def test_kill_9_of_an_instance_frees_its_slots_within_the_lease(site: Site) -> None:
    site.fresh()
    victim, survivor = site.instances
    held = [site.associate(f"127.0.4.{n}") for n in range(1, 5)]  # two on each
    sources = iter(f"127.0.5.{n}" for n in range(1, 250))  # each may try 4 times a minute

    def one_more() -> bool:
        association = scu("CT01", (VERIFICATION,)).associate(
            "127.0.0.1", site.haproxy, ae_title="PACS", bind_address=(next(sources), 0)
        )
        held.append(association)
        return bool(association.is_established)

    try:
        victim.kill()
        killed = time.monotonic()
        wait_until(lambda: sum(a.is_established for a in held) == 2, "the victim's two gone")
        assert all(echo_ok(a) for a in held if a.is_established)  # the other keeps serving
        # the victim's two slots still count until their lease runs out...
        assert site.first_answer("127.0.4.5") == LOCAL_LIMIT_RJ
        # ...each its lease after it was last renewed (or taken, if it was never renewed, so
        # the two may expire a moment apart), and HAProxy sends new associations to the live
        # instance, up to the cap again
        wait_until(one_more, "the crashed instance's first slot expired", LEASE_SECONDS + 2)
        wait_until(one_more, "the crashed instance's second slot expired", LEASE_SECONDS + 2)
        assert time.monotonic() - killed <= LEASE_SECONDS + 0.5
        assert survivor.metric("dicomfw_active_associations") == 4
        assert site.first_answer("127.0.4.6") == LOCAL_LIMIT_RJ
    finally:
        released(held)


def test_redis_stopped_fail_open_serves_on_local_limits_and_shared_limits_resume(
    site: Site,
) -> None:
    site.fresh()
    logs = [len(i.log_text()) for i in site.instances]
    site.redis.stop()
    for number in range(4):  # two on each instance: served, on each instance's own limits
        association = site.associate(f"127.0.7.{number + 1}")
        assert echo_ok(association)
        association.release()
    for instance in site.instances:
        assert instance.metric(STORE_UP) == 0
        assert instance.metric("dicomfw_limit_store_fallbacks_total", fail="open") >= 2
        assert instance.status("/ready") == 200  # fail: open keeps it in the balancer
    site.redis.start()  # empty, on the same port: no restart of dicomfw
    wait_until(lambda: all(i.metric(STORE_UP) == 1 for i in site.instances), "the store is back")
    for instance, offset in zip(site.instances, logs, strict=True):
        log = instance.log_text()[offset:]
        assert log.count("event=limit_store_down") == 1  # once per change, not per decision
        assert log.count("event=limit_store_up") == 1
    held = [site.associate(f"127.0.8.{n}") for n in range(1, 5)]
    try:
        assert site.first_answer("127.0.8.5") == LOCAL_LIMIT_RJ  # shared again: 4 in total
    finally:
        released(held)


def test_drain_takes_an_instance_out_of_the_balancer_before_its_listener_closes(
    site: Site,
) -> None:
    site.fresh()
    leaving, _ = site.instances
    held = [site.associate(f"127.0.9.{n}", "RATED") for n in (1, 2)]  # one on each
    leaving.terminate()
    took = wait_until(lambda: leaving.status("/ready") == 503, "/ready says 503")
    assert took < 0.5
    with socket.create_connection(("127.0.0.1", leaving.port), WAIT):
        pass  # the listener still accepts: the balancer has a moment to notice
    # nobody is refused meanwhile: HAProxy sends new associations to the other instance
    for number in range(4):
        association = site.associate(f"127.0.10.{number + 1}", "RATED")
        assert echo_ok(association)
        association.release()
    wait_until(lambda: port_closed(leaving.port), "the drained listener closed")
    assert all(echo_ok(a) for a in held)  # the association in flight completes
    released(held)
    assert leaving.process is not None and leaving.process.wait(WAIT) == 0


def test_every_log_line_names_the_instance_and_so_does_a_metric(site: Site) -> None:
    site.fresh()
    for instance in site.instances:
        lines = [line for line in instance.log_text().splitlines() if line.startswith("ts=")]
        assert lines and all(f" instance={instance.name} " in line for line in lines)
        assert instance.metric("dicomfw_instance_info", name=instance.name) == 1
        assert instance.status("/live") == 200


def test_redis_down_fail_closed_refuses_with_the_transient_rejection_and_is_not_ready(
    tmp_path: Path,
) -> None:
    with running_redis(tmp_path) as redis, running_scp() as pacs:
        instance = make_instance(tmp_path, "closed", pacs.port, redis.url, "closed", False)
        instance.start()
        try:
            assert instance.status("/ready") == 200
            redis.stop()
            assert first_pdu_from("127.0.11.1", instance.port, _rq()) == LOCAL_LIMIT_RJ
            wait_until(lambda: instance.refused("limit_store_unavailable") == 1, "counted")
            assert instance.status("/ready") == 503
            assert instance.metric("dicomfw_limit_store_fallbacks_total", fail="closed") == 1
            redis.start()
            wait_until(lambda: instance.status("/ready") == 200, "ready once Redis is back")
            held = [_direct(instance, f"127.0.11.{n}") for n in range(2, 6)]
            try:
                assert first_pdu_from("127.0.11.6", instance.port, _rq()) == LOCAL_LIMIT_RJ
            finally:
                released(held)
        finally:
            instance.stop()


def test_with_workers_each_talks_to_the_store_and_the_supervisor_reports_readiness(
    tmp_path: Path,
) -> None:
    with running_redis(tmp_path) as redis, running_scp() as pacs:
        instance = make_instance(
            tmp_path, "workers", pacs.port, redis.url, "closed", False, extra="workers: 2\n"
        )
        instance.start()
        try:
            wait_until(lambda: instance.status("/ready") == 200, "ready")
            held = [_direct(instance, f"127.0.12.{n}") for n in range(1, 5)]
            try:  # whichever workers took them, the cap of 4 holds for both
                assert first_pdu_from("127.0.12.5", instance.port, _rq()) == LOCAL_LIMIT_RJ
            finally:
                released(held)
            redis.stop()
            assert first_pdu_from("127.0.12.6", instance.port, _rq()) == LOCAL_LIMIT_RJ
            wait_until(lambda: instance.status("/ready") == 503, "unready: a store is down")
            redis.start()
            wait_until(lambda: instance.status("/ready") == 200, "ready again")
            instance.terminate()
            wait_until(lambda: instance.status("/ready") == 503, "unready once draining")
            assert not port_closed(instance.port)  # the notice: the ports are still open
            wait_until(lambda: port_closed(instance.port), "the ports closed")
            assert instance.process is not None and instance.process.wait(WAIT) == 0
        finally:
            instance.stop()


def _rq() -> bytes:
    return associate_rq("CT01", "PACS")


def _direct(instance: Instance, source: str) -> Association:
    association = scu("CT01", (VERIFICATION,)).associate(
        "127.0.0.1", instance.port, ae_title="PACS", bind_address=(source, 0)
    )
    assert association.is_established
    return association
