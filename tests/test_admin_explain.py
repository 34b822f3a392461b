"""`dicomfw explain` agrees with the daemon: every kind of refusal (and what passes) is driven
through a real firewall with real pynetdicom associations from distinct loopback addresses, and
the audit record of each is explained by the command line an admin runs. The verdict and the
reason are the daemon's, and the FILE:LINE named is the rule the daemon used or lacked."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from dicomfw.admin.explain import identity_from_pem
from dicomfw.config.load import load_config
from dicomfw.config.model import Config
from dicomfw.core.session import AssociationEnded, AssociationRejected
from dicomfw.relay.server import Refused
from tests.admin_harness import dicomfw
from tests.harness import (
    CT,
    FIND,
    MOVE,
    MR,
    VERIFICATION,
    Pki,
    client_context,
    ct_image,
    running_scp,
    scu,
)
from tests.obs_harness import observed_firewall, wait_until

CT01, WS1, REMOTE, MR01, US01, NOBODY = (f"127.0.0.{n}" for n in (2, 3, 4, 5, 6, 9))


ECHO = "{services: [C-ECHO]}"


def explain_rules(pki: Pki, pacs_port: int, audit: Path) -> str:
    tls = f"{{cert: {pki.fw_server.cert}, key: {pki.fw_server.key}, ca: {pki.ca}}}"
    return f"""\
listeners:
  - {{name: front, bind: "127.0.0.1:0"}}
  - {{name: watch, bind: "127.0.0.1:0", mode: monitor}}
  - {{name: tight, bind: "127.0.0.1:0", limits: {{associations_per_minute_per_ip: 1}}}}
  - {{name: secure, bind: "127.0.0.1:0", tls: {tls}}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs_port}}}
peers:
  - {{ae_title: CT01, networks: [{CT01}/32]}}
  - {{ae_title: WS1, networks: [{WS1}/32]}}
  - {{ae_title: REMOTE, networks: [{REMOTE}/32], certificate: {{san_uri: "urn:dicom:ae:REMOTE"}}}}
  - {{ae_title: MR01, networks: [{MR01}/32]}}
  - {{ae_title: US01, networks: [{US01}/32]}}
  - {{ae_title: FARAWAY, networks: [10.99.0.0/16]}}
routes:
  - name: store
    listener: front
    called_ae: PACS
    upstream: pacs
    calling_ae: [CT01, REMOTE, FARAWAY]
    allow:
      - services: [C-ECHO, C-STORE]
        sop_classes: [CTImageStorage]
        transfer_syntaxes: [ExplicitVRLittleEndian]
  - name: query
    listener: front
    called_ae: PACS
    upstream: pacs
    calling_ae: [WS1]
    allow:
      - {{services: [C-MOVE], sop_classes: [{FIND}, {MOVE}], move_destinations: [WS1]}}
  - name: watched
    listener: watch
    called_ae: PACS
    upstream: pacs
    allow: [{{services: [C-ECHO, C-STORE], sop_classes: [CTImageStorage]}}]
  - {{name: limited, listener: tight, called_ae: PACS, upstream: pacs, allow: [{ECHO}]}}
  - {{name: secured, listener: secure, called_ae: PACS, upstream: pacs, allow: [{ECHO}]}}
limits: {{artim_seconds: 5, idle_seconds: 30, connect_timeout_seconds: 3}}
audit: {{file: {audit}}}
"""


@dataclass(frozen=True)
class Traffic:
    ports: dict[str, int]
    pki: Pki

    def associate(
        self,
        calling: str,
        source: str,
        contexts: tuple[str, ...] = (CT, VERIFICATION),
        listener: str = "front",
        called: str = "PACS",
        ae: AE | None = None,
        certificate: bool = True,
    ) -> Association:
        pair = self.pki.remote if certificate else None
        tls = (client_context(self.pki, pair), "localhost")
        return (ae or scu(calling, contexts)).associate(
            "127.0.0.1",
            self.ports[listener],
            ae_title=called,
            bind_address=(source, 0),
            tls_args=tls if listener == "secure" else None,
        )


def finish(association: Association, act: Callable[[Association], Any] | None = None) -> None:
    if association.is_established:
        if act is not None:
            act(association)
        association.release()


def query(association: Association) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    list(association.send_c_find(identifier, FIND))


def move_to_evil(association: Association) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3"
    list(association.send_c_move(identifier, "EVIL", MOVE))


def store(association: Association, sop_class: str = CT) -> None:
    association.send_c_store(ct_image(seed=1, sop_class=sop_class))


def drive(traffic: Traffic) -> int:
    """Every case once; returns the number of connections, each of which ends in an event."""
    t = traffic
    finish(t.associate("CT01", CT01), lambda a: (a.send_c_echo(), store(a)))
    finish(t.associate("REMOTE", REMOTE, (VERIFICATION,), listener="secure"), _echo)
    finish(t.associate("REMOTE", REMOTE, (VERIFICATION,), listener="secure", certificate=False))
    finish(t.associate("CT01", NOBODY))
    finish(t.associate("STRANGER", CT01))
    finish(t.associate("FARAWAY", CT01))
    finish(t.associate("REMOTE", REMOTE))
    finish(t.associate("CT01", CT01, called="NOPACS"))
    finish(t.associate("MR01", MR01))
    finish(t.associate("CT01", CT01, (MR,)))
    finish(t.associate("CT01", CT01, (CT, MR, VERIFICATION)), store)
    implicit_only = AE(ae_title="CT01")
    implicit_only.add_requested_context(CT, [ImplicitVRLittleEndian])
    implicit_only.add_requested_context(VERIFICATION)
    finish(t.associate("CT01", CT01, ae=implicit_only), _echo)
    finish(t.associate("WS1", WS1, (FIND,)), query)
    finish(t.associate("WS1", WS1, (MOVE,)), move_to_evil)
    finish(t.associate("CT01", CT01, (MR, VERIFICATION), listener="watch"))
    for _ in range(2):
        finish(t.associate("US01", US01, (VERIFICATION,), listener="tight"), _echo)
    return 17


def _echo(association: Association) -> None:
    association.send_c_echo()


@dataclass(frozen=True)
class Daemon:
    """What one run of the firewall left: its rules and its audit trail."""

    directory: Path
    config: Config
    records: list[dict[str, Any]]
    relay_identity: Any


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("explain")
    audit = directory / "audit.jsonl"
    ends = (AssociationEnded, AssociationRejected, Refused)
    with (
        running_scp(sop_classes=(CT, MR, VERIFICATION, FIND, MOVE)) as pacs,
        observed_firewall(directory, explain_rules(pki, pacs.port, audit)) as (fw, _),
    ):
        connections = drive(Traffic(fw.ports, pki))
        wait_until(
            lambda: sum(isinstance(e, ends) for _, e in fw.events) >= connections, "the ends"
        )
        identity = next(info.identity for info, _ in fw.events if info.listener == "secure")
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    yield Daemon(directory, load_config(directory / "rules.yaml"), records, identity)


def explain(
    directory: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return dicomfw("explain", "--config", "rules.yaml", *args, cwd=directory, stdin=stdin)


Where = Callable[[Config], str]


def local(where: str) -> str:
    """``FILE:LINE`` as explain prints it when run beside the rules file."""
    return f"rules.yaml:{where.rsplit(':', 1)[1]}"


def route(name: str) -> Where:
    return lambda config: local(next(r.where for r in config.policy.routes if r.name == name))


def rule(route_name: str) -> Where:
    return lambda config: local(
        next(r.allow[0].where for r in config.policy.routes if r.name == route_name)
    )


def peer(ae_title: str) -> Where:
    return lambda config: local(
        next(p.where for p in config.policy.peers if p.ae_title == ae_title)
    )


def section(line: int) -> Where:
    return lambda config: f"rules.yaml:{line}"


#: (the record's event, its reason or refused context's reason, verdict, where the fix points)
CASES: dict[str, tuple[str, str, str, Where]] = {
    "allowed": ("association", "", "ALLOWED", rule("store")),
    "allowed over TLS": ("association", "secure", "ALLOWED", route("secured")),
    "source_address_denied": ("connection_refused", "", "REFUSED", section(8)),
    "calling_ae_unknown": ("association_rejected", "", "REFUSED", section(8)),
    "source_network_denied": ("association_rejected", "", "REFUSED", peer("FARAWAY")),
    "certificate_mismatch": ("association_rejected", "", "REFUSED", peer("REMOTE")),
    "called_ae_unknown": ("association_rejected", "", "REFUSED", section(15)),
    "route_denies_calling_ae": ("association_rejected", "", "REFUSED", route("store")),
    "no_context_allowed": ("association_rejected", "", "REFUSED", route("store")),
    "sop_class_not_allowed": ("association", "", "REFUSED", rule("store")),
    "transfer_syntax_not_allowed": ("association", "", "REFUSED", rule("store")),
    "service_not_allowed": ("request_refused", "", "REFUSED", route("query")),
    "move_destination_denied": ("request_refused", "", "REFUSED", rule("query")),
    "would_refuse sop_class_not_allowed": ("would_refuse", "", "MONITOR", rule("watched")),
    "ip_association_rate_exceeded": ("association_rejected", "", "REFUSED", route("limited")),
    "tls_handshake_failed": ("connection_refused", "", "REFUSED", section(5)),
}


def record_of(records: list[dict[str, Any]], case: str) -> dict[str, Any]:
    event, marker, _, _ = CASES[case]
    why = case.split()[-1]

    def matches(record: dict[str, Any]) -> bool:
        if record["event"] != event:
            return False
        if event == "association":
            refused = [c["reason"] for c in record["refused_contexts"]]
            if marker:
                return bool(record["listener"] == marker)
            return refused == ([] if why == "allowed" else [why]) and record["listener"] == "front"
        return bool(record["reason"] == why)

    found = [record for record in records if matches(record)]
    assert len(found) >= 1, (case, records)
    return found[0]


@pytest.mark.parametrize("case", CASES)
def test_explain_gives_the_daemons_decision_and_names_the_rule_it_used(
    daemon: Daemon, case: str
) -> None:
    record = record_of(daemon.records, case)
    result = explain(daemon.directory, "--event", json.dumps(record))
    _, _, verdict, where = CASES[case]
    output = result.stdout
    why = case.split()[-1]
    assert result.stderr == ""
    if verdict == "ALLOWED":
        assert (result.returncode, output.splitlines()[-1]) == (0, "ALLOWED"), output
    elif verdict == "MONITOR":
        assert result.returncode == 1, output
        assert f"ALLOWED IN MONITOR MODE ONLY: enforce mode would refuse it ({why})" in output
    else:
        assert result.returncode == 1, output
        assert f"\nREFUSED ({why})\n" in output
    assert f"{where(daemon.config)}" in output, output
    if record.get("route"):  # the route the daemon took, at its line
        assert f"route {record['route']} ({route(record['route'])(daemon.config)})" in output


def test_every_fix_names_a_line_and_a_fixed_file_lets_the_records_through(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The rule refusals are gone once the fixes explain proposes are made by hand."""
    record = record_of(daemon.records, "move_destination_denied")
    fixed = tmp_path / "rules.yaml"
    fixed.write_text(
        (daemon.directory / "rules.yaml")
        .read_text()
        .replace("move_destinations: [WS1]", "move_destinations: [WS1, EVIL]")
    )
    result = explain(tmp_path, "--event", json.dumps(record))
    assert result.returncode == 0, result.stdout
    assert "these rules do not refuse it for that reason" in result.stdout


def test_the_certificate_identity_explain_reads_is_the_one_the_relay_saw(
    daemon: Daemon, pki: Pki
) -> None:
    assert identity_from_pem(pki.remote.cert) == daemon.relay_identity
    described = (
        "--listener",
        "secure",
        "--from",
        REMOTE,
        "--calling",
        "REMOTE",
        "--called",
        "PACS",
        "--context",
        "Verification",
        "--request",
        "C-ECHO:Verification",
    )
    assert explain(daemon.directory, *described, "--cert", str(pki.remote.cert)).returncode == 0
    on_front = explain(
        daemon.directory, *described[:1], "front", *described[2:], "--cert", str(pki.remote.cert)
    )
    assert on_front.returncode == 0, on_front.stdout  # the binding matches on any listener
    stranger = explain(daemon.directory, *described, "--cert", str(pki.stranger.cert))
    assert stranger.returncode == 1
    assert "wants san_uri urn:dicom:ae:REMOTE" in stranger.stdout


def test_records_on_stdin_are_explained_one_by_one(daemon: Daemon) -> None:
    lines = [
        json.dumps(record_of(daemon.records, case)) for case in ("allowed", "calling_ae_unknown")
    ]
    result = explain(daemon.directory, "--event", "-", stdin="\n".join(lines) + "\n")
    assert result.returncode == 1
    assert result.stdout.count("ALLOWED\n") == 1 and "REFUSED (calling_ae_unknown)" in result.stdout


DESCRIBED = ("--listener", "front", "--from", CT01, "--calling", "CT01", "--called", "PACS")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--listener", "nowhere", *DESCRIBED[2:]), "no listener 'nowhere'"),
        ((*DESCRIBED[:2], "--from", "127.0.0.300", *DESCRIBED[4:]), "not an IP address"),
        ((*DESCRIBED, "--context", "CTImageStorag"), "unknown SOP Class keyword 'CTImageStorag'"),
        ((*DESCRIBED, "--request", "C-STORE:CTImageStorage:WS1"), "only C-MOVE has a destination"),
        (DESCRIBED[:4], "give --event, or --listener"),
        (("--event", '{"event": "application_start"}'), "not an audit record of a connection"),
        (("--event", "{not json"), "not JSON"),
    ],
)
def test_bad_input_is_exit_status_2_with_a_message(
    daemon: Daemon, args: tuple[str, ...], message: str
) -> None:
    result = explain(daemon.directory, *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert message in result.stderr


def test_a_described_association_shows_the_chain_and_the_smallest_changes(
    daemon: Daemon,
) -> None:
    result = explain(
        daemon.directory,
        *DESCRIBED,
        "--context",
        "CTImageStorage:ExplicitVRLittleEndian",
        "--request",
        "C-STORE:CTImageStorage",
        "--request",
        "C-STORE:MRImageStorage",
    )
    config = daemon.config
    store_rule = rule("store")(config)
    assert result.returncode == 1
    assert f"calling AE       CT01: peer CT01 ({peer('CT01')(config)})" in result.stdout
    assert (
        f"CTImageStorage (ExplicitVRLittleEndian): allowed by the allow rule at {store_rule}"
        in result.stdout
    )
    assert (
        f"add MRImageStorage to the sop_classes of the allow rule at {store_rule}" in result.stdout
    )
