"""Monitor mode end to end: what enforce mode refuses goes through, logged, audited and counted
with the same reason; a reload to enforce refuses the next one while one already open goes on."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom.association import Association

from dicomfw.core.session import AssociationEnded, AssociationRejected, RequestRefused
from dicomfw.service.daemon import reload
from tests.harness import (
    CT,
    FIND,
    MOVE,
    MR,
    VERIFICATION,
    Pki,
    associate_rq,
    ct_image,
    exchange,
    running_scp,
    scu,
)
from tests.obs_harness import observed_firewall, scrape, value, wait_until

PEERS = """\
peers:
  - {ae_title: CT01, networks: [127.0.0.0/8]}
  - {ae_title: FARAWAY, networks: [10.99.0.0/16]}
"""


ENDS = (AssociationEnded, AssociationRejected)


def monitor_rules(pacs_port: int, audit: Path, mode: str) -> str:
    """One plain listener; a route that stores CT, and moves (not queries) only to WS1."""
    return f"""\
mode: {mode}
listeners:
  - {{name: front, bind: "127.0.0.1:0"}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs_port}}}
{PEERS}routes:
  - listener: front
    called_ae: PACS
    upstream: pacs
    allow:
      - {{services: [C-ECHO, C-STORE], sop_classes: [CTImageStorage]}}
      - {{services: [C-MOVE], sop_classes: [{FIND}, {MOVE}], move_destinations: [WS1]}}
limits: {{artim_seconds: 5, idle_seconds: 30, connect_timeout_seconds: 3}}
metrics: {{bind: "127.0.0.1:0"}}
audit: {{file: {audit}}}
"""


def associate(calling: str, contexts: tuple[str, ...]) -> Callable[[int], Association]:
    return lambda port: scu(calling, contexts).associate("127.0.0.1", port, ae_title="PACS")


def echo_as(calling: str) -> Callable[[int], None]:
    def attempt(port: int) -> None:
        association = associate(calling, (VERIFICATION,))(port)
        if association.is_established:
            association.send_c_echo()
            association.release()

    return attempt


def store_mr(port: int) -> None:
    association = associate("CT01", (MR, VERIFICATION))(port)
    if association.is_established:
        if any(c.abstract_syntax == MR for c in association.accepted_contexts):
            association.send_c_store(ct_image(seed=2, sop_class=MR))
        association.release()


def query(port: int) -> None:
    """A C-FIND: the route allows C-MOVE on the Study Root classes, not C-FIND."""
    association = associate("CT01", (FIND,))(port)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    list(association.send_c_find(identifier, FIND))
    association.release()


def move_to_evil(port: int) -> None:
    association = associate("CT01", (MOVE,))(port)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3"
    list(association.send_c_move(identifier, "EVIL", MOVE))
    association.release()


#: why -> (what the requester does, what the PACS receives when it is let through)
CASES: dict[str, tuple[Callable[[int], None], str]] = {
    "calling_ae_unknown": (echo_as("STRANGER"), "C-ECHO"),
    "source_network_denied": (echo_as("FARAWAY"), "C-ECHO"),
    "sop_class_not_allowed": (store_mr, "C-STORE"),
    "service_not_allowed": (query, "C-FIND"),
    "move_destination_denied": (move_to_evil, "C-MOVE"),
}


@pytest.mark.parametrize("why", CASES)
def test_what_enforce_mode_refuses_passes_in_monitor_mode_and_is_reported_with_its_reason(
    tmp_path: Path, pki: Pki, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomfw.events")
    attempt, service = CASES[why]
    for mode, passes in (("enforce", False), ("monitor", True)):
        audit = tmp_path / f"{mode}.jsonl"
        with (
            running_scp(sop_classes=(CT, MR, VERIFICATION, FIND, MOVE)) as pacs,
            observed_firewall(tmp_path, monitor_rules(pacs.port, audit, mode)) as (fw, obs),
        ):
            assert obs.server is not None
            attempt(fw.port("front"))
            wait_until(lambda: any(isinstance(e, ENDS) for _, e in fw.events), "its end")
            assert (service in pacs.requests) is passes, (mode, pacs.requests)
            samples = scrape(obs.server.port)
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        would = [r for r in records if r["event"] == "would_refuse"]
        if passes:
            # the first thing enforce mode would have refused (a request on a context it
            # would have refused is reported too)
            assert [r["reason"] for r in would][:1] == [why]
            assert value(samples, "dicomfw_would_refuse_total", reason=why) == 1
            assert value(samples, "dicomfw_refusals_total", reason=why) == 0
            assert "event=would_refuse" in caplog.text and f"why={why}" in caplog.text
        else:
            assert would == []
            assert value(samples, "dicomfw_refusals_total", reason=why) == 1


def test_a_reload_to_enforce_refuses_the_next_association_while_an_open_one_completes(
    tmp_path: Path, pki: Pki
) -> None:
    audit = tmp_path / "audit.jsonl"
    rules = tmp_path / "rules.yaml"
    with (
        running_scp(sop_classes=(CT, MR, VERIFICATION)) as pacs,
        observed_firewall(tmp_path, monitor_rules(pacs.port, audit, "monitor")) as (fw, _),
    ):
        port = fw.port("front")
        opened = associate("CT01", (CT, MR))(port)
        assert opened.is_established  # MR accepted: monitor mode
        rules.write_text(monitor_rules(pacs.port, audit, "enforce"))
        assert fw.call(lambda: reload(fw.relay, rules))  # type: ignore[arg-type]
        answer = exchange(port, associate_rq("STRANGER", "PACS"))
        # the open association keeps the rules it started with: its MR store goes through
        assert opened.send_c_store(ct_image(seed=7, sop_class=MR)).Status == 0x0000
        opened.release()
        assert not any(isinstance(e, RequestRefused) for _, e in fw.events)
    assert answer == bytes((0x03, 0, 0, 0, 0, 4, 0, 1, 1, 3))  # calling-AE-not-recognized
    assert len(pacs.stored) == 1
