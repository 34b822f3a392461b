"""`dicomfw learn` from a monitor-mode period: three modalities and a workstation, each from its
own loopback address, go through a firewall that starts with no peers at all. The rules learned
from its audit trail pass `dicomfw check` without a warning, and in enforce mode they let the
same traffic through and refuse a new SOP class, a new source address and another C-MOVE
destination."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from pydicom.dataset import Dataset
from pynetdicom.association import Association

from dicomfw.core.session import AssociationEnded, AssociationRejected, RequestRefused
from dicomfw.core.uids import resolve
from dicomfw.relay.server import Refused
from tests.admin_harness import dicomfw
from tests.harness import CT, FIND, MOVE, MR, VERIFICATION, ct_image, running_scp, scu
from tests.obs_harness import observed_firewall, wait_until

US = resolve("UltrasoundImageStorage", "SOP Class")
ADDRESSES = {"CT01": "127.0.0.2", "MR01": "127.0.0.3", "US01": "127.0.0.4", "WS1": "127.0.0.5"}
ENDS = (AssociationEnded, AssociationRejected, Refused)


def base_rules(pacs_port: int) -> str:
    """What an admin starts with: where to listen and where the PACS is; nobody is a peer yet,
    and monitor mode lets everything through to be audited."""
    return f"""\
# the site's rules before learning
mode: monitor

# -- listeners -------------------------------------------------------------------------------
listeners:
  - {{name: front, bind: "127.0.0.1:0"}}   # the modality VLAN
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs_port}}}
peers: []
routes:
  - name: to-pacs
    listener: front
    called_ae: PACS
    upstream: pacs
    allow: [{{services: [C-ECHO]}}]
limits: {{artim_seconds: 5, idle_seconds: 30, connect_timeout_seconds: 3}}
audit: {{file: audit.jsonl}}
"""


def associate(port: int, calling: str, contexts: tuple[str, ...], source: str = "") -> Association:
    return scu(calling, contexts).associate(
        "127.0.0.1", port, ae_title="PACS", bind_address=(source or ADDRESSES[calling], 0)
    )


def identifier(level: str = "STUDY") -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = level
    query.StudyInstanceUID = "1.2.3"
    return query


def move(association: Association, destination: str) -> int:
    statuses = [s.Status for s, _ in association.send_c_move(identifier(), destination, MOVE)]
    return int(statuses[-1])


@dataclass
class Outcome:
    """What the devices saw: every association's DIMSE statuses, in order."""

    statuses: dict[str, list[int]]


def the_days_traffic(port: int) -> Outcome:
    """Three modalities store their images (with a C-ECHO first), the workstation queries and
    retrieves a study to itself."""
    statuses: dict[str, list[int]] = {}
    for calling, sop_class in (("CT01", CT), ("MR01", MR), ("US01", US)):
        association = associate(port, calling, (sop_class, VERIFICATION))
        assert association.is_established, calling
        statuses[calling] = [association.send_c_echo().Status] + [
            association.send_c_store(ct_image(seed=n, sop_class=sop_class)).Status for n in range(2)
        ]
        association.release()
    workstation = associate(port, "WS1", (FIND, MOVE))
    assert workstation.is_established
    found = [s.Status for s, _ in workstation.send_c_find(identifier(), FIND)]
    statuses["WS1"] = [found[-1], move(workstation, "WS1")]
    workstation.release()
    return Outcome(statuses)


def run(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return dicomfw(*args, cwd=directory)


@dataclass(frozen=True)
class Period:
    """A monitor-mode period and what it left: the base rules and the audit trail."""

    directory: Path
    pacs_port: int
    outcome: Outcome


@pytest.fixture(scope="module")
def pacs() -> Iterator[int]:
    with running_scp(sop_classes=(CT, MR, US, VERIFICATION, FIND, MOVE)) as scp:
        yield scp.port


def run_traffic(directory: Path, rules: str, traffic: object) -> tuple[object, list[object]]:
    """Run ``traffic(port)`` through a firewall with ``rules`` until every association ended."""
    with observed_firewall(directory, rules) as (fw, _):
        result = traffic(fw.port("front"))  # type: ignore[operator]
        wait_until(lambda: sum(isinstance(e, ENDS) for _, e in fw.events) >= 4, "the ends")
        events = [event for _, event in fw.events]
    return result, events


@pytest.fixture(scope="module")
def period(tmp_path_factory: pytest.TempPathFactory, pacs: int) -> Period:
    directory = tmp_path_factory.mktemp("monitored")
    outcome, events = run_traffic(directory, base_rules(pacs), the_days_traffic)
    assert not any(isinstance(e, (RequestRefused, AssociationRejected)) for e in events)
    return Period(directory, pacs, outcome)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def learned(period: Period) -> Path:
    result = run(period.directory, "learn", "--audit", "audit.jsonl", "--base", "rules.yaml",
        "--out", "learned.yaml",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "learned.yaml: 4 peers, 4 routes, from 4 associations" in result.stderr
    return period.directory / "learned.yaml"


def test_the_learned_rules_pass_check_without_a_warning(learned: Path) -> None:
    result = run(learned.parent, "check", "--config", "learned.yaml", "--strict")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_the_learned_rules_allow_what_was_seen_and_nothing_more(learned: Path) -> None:
    rules = yaml.safe_load(learned.read_text())
    assert rules["mode"] == "enforce"
    assert rules["listeners"] == [{"name": "front", "bind": "127.0.0.1:0"}]  # from the base
    assert {p["ae_title"]: p["networks"] for p in rules["peers"]} == {
        calling: [f"{address}/32"] for calling, address in ADDRESSES.items()
    }
    allowed = {
        route["calling_ae"][0]: [
            (rule["services"], rule["sop_classes"], rule.get("move_destinations"))
            for rule in route["allow"]
        ]
        for route in rules["routes"]
    }
    echo = (["C-ECHO"], ["Verification"], None)
    assert allowed == {
        "CT01": [echo, (["C-STORE"], ["CTImageStorage"], None)],
        "MR01": [echo, (["C-STORE"], ["MRImageStorage"], None)],
        "US01": [echo, (["C-STORE"], ["UltrasoundImageStorage"], None)],
        "WS1": [
            (["C-FIND"], ["StudyRootQueryRetrieveInformationModelFind"], None),
            (["C-MOVE"], ["StudyRootQueryRetrieveInformationModelMove"], ["WS1"]),
        ],
    }
    for route in rules["routes"]:
        assert {r["transfer_syntaxes"][0] for r in route["allow"]} == {"ExplicitVRLittleEndian"}
    text = learned.read_text()
    assert "# 1 association from 127.0.0.2 (1); " in text
    assert "- CTImageStorage  # C-STORE 2; " in text


def test_in_enforce_mode_the_same_traffic_passes_and_anything_new_is_refused(
    learned: Path, period: Period, tmp_path: Path
) -> None:
    rules = learned.read_text().replace("audit.jsonl", str(tmp_path / "audit.jsonl"))

    def day_then_new(port: int) -> tuple[Outcome, bool, bool, int]:
        again = the_days_traffic(port)
        new_sop_class = associate(port, "CT01", (MR, VERIFICATION))
        mr_refused = MR not in {c.abstract_syntax for c in new_sop_class.accepted_contexts}
        new_sop_class.release()
        elsewhere = associate(port, "CT01", (CT,), source="127.0.0.9")
        moved_to_evil = associate(port, "WS1", (MOVE,))
        evil = move(moved_to_evil, "EVIL")
        moved_to_evil.release()
        return again, mr_refused, elsewhere.is_established, evil

    (again, mr_refused, elsewhere, evil), events = run_traffic(tmp_path, rules, day_then_new)
    assert again.statuses == period.outcome.statuses  # type: ignore[attr-defined]
    assert mr_refused
    assert not elsewhere
    assert evil == 0xA801
    refusals = {e.why for e in events if isinstance(e, (Refused, RequestRefused))}
    assert refusals == {"source_address_denied", "move_destination_denied"}


def test_widening_and_since(period: Period, tmp_path: Path) -> None:
    widened = run(period.directory, "learn", "--audit", "audit.jsonl", "--base", "rules.yaml",
        "--out", str(tmp_path / "wide.yaml"), "--widen-ipv4", "24",
    )  # fmt: skip
    assert widened.returncode == 0, widened.stderr
    peers = yaml.safe_load((tmp_path / "wide.yaml").read_text())["peers"]
    assert {p["networks"][0] for p in peers} == {"127.0.0.0/24"}

    later = run(period.directory, "learn", "--audit", "audit.jsonl", "--base", "rules.yaml",
        "--out", str(tmp_path / "none.yaml"), "--since", "2999-01-01T00:00:00Z",
    )  # fmt: skip
    assert later.returncode == 1
    assert "no association to learn from" in later.stderr


def test_diff_lists_what_the_current_rules_allow_unused_and_refuse_used(
    learned: Path, period: Period, tmp_path: Path
) -> None:
    same = run(period.directory, "learn", "--audit", "audit.jsonl", "--diff", "learned.yaml")
    assert same.returncode == 0, same.stderr
    assert same.stdout.count("  nothing\n") == 2, same.stdout

    current = learned.read_text().replace(
        "- CTImageStorage  #", "- EnhancedCTImageStorage\n          - CTImageStorage  #"
    )
    current = current.replace("move_destinations:\n", "move_destinations:\n          - WS2\n")
    current = current.replace("- services: [C-FIND]", "- services: [C-GET]")
    (period.directory / "current.yaml").write_text(current)
    result = run(period.directory, "learn", "--audit", "audit.jsonl", "--diff", "current.yaml")
    assert result.returncode == 0, result.stderr
    unused, refused = result.stdout.split("used in the audit trail, and current.yaml refuses it")
    assert "C-STORE of EnhancedCTImageStorage: never used" in unused
    assert "C-MOVE of StudyRootQueryRetrieveInformationModelMove to WS2: never used" in unused
    assert "C-GET of StudyRootQueryRetrieveInformationModelFind: never used" in unused
    assert (
        "  add an allow rule {services: [C-FIND], sop_classes: "
        "[StudyRootQueryRetrieveInformationModelFind]} to route to-pacs-WS1 (current.yaml:"
    ) in refused
    assert (
        "      service_not_allowed: C-FIND of StudyRootQueryRetrieveInformationModelFind "
        "(1 association: WS1 -> PACS on front)"
    ) in refused


# -- what learning makes of records a loopback test cannot produce ----------------------------

GET = "1.2.840.10008.5.1.4.1.2.2.3"
JPEG2000 = "1.2.840.10008.1.2.4.90"
IMPLICIT = "1.2.840.10008.1.2"


def association_record(
    calling: str,
    address: str,
    operations: list[tuple[str, str, int, int]],
    contexts: list[tuple[str, str]],
    listener: str = "front",
    certificate: dict[str, object] | None = None,
    moved_to: tuple[str, ...] = (),
) -> dict[str, object]:
    """An ``association`` audit record as the daemon writes it (the fields learning reads)."""
    return {
        "event": "association", "time": "2026-03-02T10:00:01.000Z", "listener": listener,
        "source": {"address": address, "port": 40000, "via": None}, "certificate": certificate,
        "calling_ae": calling, "called_ae": "PACS", "route": f"{listener}/PACS",
        "start": "2026-03-02T10:00:00.000Z", "end": "2026-03-02T10:00:01.000Z",
        "operations": [
            {"service": service, "sop_class_uid": uid, "requests": requests, "refused": refused}
            for service, uid, requests, refused in operations
        ],
        "contexts": [{"sop_class_uid": uid, "transfer_syntax": ts} for uid, ts in contexts],
        "refused_contexts": [], "move_destinations": list(moved_to),
    }  # fmt: skip


def test_learning_groups_alike_callers_binds_certificates_and_says_what_it_left_out(
    tmp_path: Path,
) -> None:
    store = [("C-ECHO", VERIFICATION, 1, 0), ("C-STORE", CT, 3, 0)]
    images = [(CT, JPEG2000), (VERIFICATION, IMPLICIT)]
    echo = [("C-ECHO", VERIFICATION, 1, 0)]
    remote = {"subject_cn": "remote", "san_dns": [], "san_uri": ["urn:dicom:ae:REMOTE"]}
    records = [
        association_record("CT01", "10.1.2.7", store, images),
        association_record("CT01", "10.1.2.8", store, images),
        association_record("CT02", "10.1.2.9", store, images),  # the same needs as CT01
        association_record("WS1", "10.1.4.2", [("C-GET", GET, 1, 0)],
                           [(GET, IMPLICIT), (CT, JPEG2000)]),
        association_record("WS6", "2001:db8:10:3::17", echo, [(VERIFICATION, IMPLICIT)]),
        association_record("REMOTE", "::ffff:192.0.2.4", echo, [(VERIFICATION, IMPLICIT)],
                           listener="secure", certificate=remote),
        association_record("CT01", "10.1.2.7", [("C-FIND", FIND, 1, 1)], [(FIND, IMPLICIT)]),
        association_record("MR01", "10.1.3.3", [], [(MR, IMPLICIT)]),
        {"event": "association_rejected", "time": "2026-03-02T10:00:02.000Z", "listener": "front",
         "calling_ae": "CT01", "called_ae": "ARCHIVE", "reason": "called_ae_unknown"},
    ]  # fmt: skip
    audit = tmp_path / "audit.jsonl"
    audit.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"event": "assoc')
    (tmp_path / "rules.yaml").write_text(
        "listeners:\n"
        '  - {name: front, bind: "[::]:11112"}\n'
        '  - {name: secure, bind: "[::]:2762", tls: {cert: fw.pem, key: fw.key, ca: ca.pem}}\n'
        "upstreams:\n"
        "  pacs: {host: 10.9.0.5, port: 104}\n"
        "peers: []\n"
        "routes:\n"
        "  - {listener: front, called_ae: PACS, upstream: pacs, allow: [{services: [C-ECHO]}]}\n"
        "  - {listener: secure, called_ae: PACS, upstream: pacs, allow: [{services: [C-ECHO]}],\n"
        "     rewrite: {calling_ae: FW1}}\n"
    )
    result = run(tmp_path, "learn", "--audit", "audit.jsonl", "--base", "rules.yaml",
                     "--out", "learned.yaml")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[:4] == [
        "not learned (a called AE no route knows (nothing to send it to)): CT01 -> ARCHIVE on "
        "front",
        "not learned (an association without a request that passed): CT01 -> PACS on front",
        "not learned (an association without a request that passed): MR01 -> PACS on front",
        "not learned (unreadable line): audit.jsonl:10: not JSON: Unterminated string starting "
        "at: line 1 column 11 (char 10)",
    ]
    checked = run(tmp_path, "check", "--config", "learned.yaml", "--syntax-only", "--strict")
    assert (checked.returncode, checked.stderr) == (0, "")

    rules = yaml.safe_load((tmp_path / "learned.yaml").read_text())
    peers = {p["ae_title"]: (p["networks"], p.get("certificate")) for p in rules["peers"]}
    assert peers == {
        "CT01": (["10.1.2.7/32", "10.1.2.8/32"], None),
        "CT02": (["10.1.2.9/32"], None),
        "REMOTE": (["192.0.2.4/32"], {"san_uri": "urn:dicom:ae:REMOTE"}),
        "WS1": (["10.1.4.2/32"], None),
        "WS6": (["2001:db8:10:3::/64"], None),
    }
    routes = {tuple(r["calling_ae"]): r for r in rules["routes"]}
    assert set(routes) == {("CT01", "CT02"), ("WS1",), ("WS6",), ("REMOTE",)}
    assert routes[("REMOTE",)]["rewrite"] == {"calling_ae": "FW1"}
    assert routes[("CT01", "CT02")]["allow"][1] == {
        "services": ["C-STORE"],
        "sop_classes": ["CTImageStorage"],
        "transfer_syntaxes": ["JPEG2000Lossless"],
    }
    # the C-GET's sub-operations store CT on the association; each with what it was sent in
    assert routes[("WS1",)]["allow"] == [
        {
            "services": ["C-GET"],
            "sop_classes": ["CTImageStorage"],
            "transfer_syntaxes": ["JPEG2000Lossless"],
        },
        {
            "services": ["C-GET"],
            "sop_classes": ["StudyRootQueryRetrieveInformationModelGet"],
            "transfer_syntaxes": ["ImplicitVRLittleEndian"],
        },
    ]
