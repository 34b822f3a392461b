"""IHE ATNA: a real rsyslog (Debian's package) receives the DICOM audit messages over TLS
(RFC 5425) and UDP (RFC 5426); the XML parses and carries the expected EventID codes."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from dicomfw.observe.atna import Messages
from tests.harness import WAIT, Pki, associate_rq, exchange, free_port, running_process, running_scp
from tests.obs_harness import drive_mix, mixed_rules, observed_firewall, wait_until

RSYSLOGD = "/usr/sbin/rsyslogd"
SEPARATOR = "|"


@dataclass(frozen=True)
class Received:
    facility: str
    severity: str
    app_name: str
    msgid: str
    xml: ElementTree.Element

    @property
    def event_id(self) -> str:
        return _code(self.xml, "EventIdentification/EventID")

    @property
    def event_type(self) -> str | None:
        found = self.xml.find("EventIdentification/EventTypeCode")
        return None if found is None else found.attrib["csd-code"]

    @property
    def outcome(self) -> str:
        identification = self.xml.find("EventIdentification")
        assert identification is not None
        return identification.attrib["EventOutcomeIndicator"]


def _code(xml: ElementTree.Element, path: str) -> str:
    found = xml.find(path)
    assert found is not None, path
    assert found.attrib["codeSystemName"] == "DCM"
    return found.attrib["csd-code"]


@dataclass(frozen=True)
class Rsyslog:
    tls_port: int
    udp_port: int
    output: Path

    def received(self) -> list[Received]:
        if not self.output.exists():
            return []
        messages = []
        for line in self.output.read_text(encoding="utf-8").splitlines():
            facility, severity, app_name, msgid, msg = line.split(SEPARATOR, 4)
            xml = ElementTree.fromstring(msg.removeprefix("\ufeff").encode())
            messages.append(Received(facility, severity, app_name, msgid, xml))
        return messages

    def wait_for(self, count: int) -> list[Received]:
        wait_until(lambda: len(self.received()) >= count, f"{count} messages in rsyslog")
        time.sleep(0.2)  # nothing more arrives
        return self.received()


def _udp_bound(port: int) -> bool:
    lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    return any(line.split()[1].endswith(f":{port:04X}") for line in lines)


@contextlib.contextmanager
def running_rsyslog(directory: Path, pki: Pki) -> Iterator[Rsyslog]:
    """rsyslogd in the foreground: TLS input (GnuTLS, client certificate required) and UDP
    input on loopback, every message written as facility|severity|app|msgid|msg."""
    work = directory / "rsyslog"
    work.mkdir()
    server = Rsyslog(free_port(), free_port(), work / "received.log")
    config = work / "rsyslog.conf"
    config.write_text(
        f"""\
global(workDirectory="{work}" maxMessageSize="64k"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{pki.ca}"
       DefaultNetstreamDriverCertFile="{pki.fw_server.cert}"
       DefaultNetstreamDriverKeyFile="{pki.fw_server.key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" port="{server.tls_port}" address="127.0.0.1")
module(load="imudp")
input(type="imudp" port="{server.udp_port}" address="127.0.0.1")
template(name="fields" type="string"
         string="%syslogfacility%|%syslogseverity%|%app-name%|%msgid%|%msg%\\n")
*.* action(type="omfile" file="{server.output}" template="fields")
"""
    )
    with running_process(
        RSYSLOGD, "-n", "-f", config, "-i", work / "rsyslogd.pid", ready_port=server.tls_port
    ):
        deadline = time.monotonic() + WAIT
        while not _udp_bound(server.udp_port):
            assert time.monotonic() < deadline, "rsyslog did not bind its UDP port"
            time.sleep(0.05)
        yield server


def _atna(transport: str, port: int, pki: Pki) -> str:
    tls = (
        f", ca: {pki.ca}, cert: {pki.fw_client.cert}, key: {pki.fw_client.key}"
        if transport == "tls"
        else ""
    )
    return f"audit: {{atna: {{host: 127.0.0.1, port: {port}, transport: {transport}{tls}}}}}\n"


def test_rsyslog_receives_the_audit_messages_over_tls_with_the_expected_event_ids(
    tmp_path: Path, pki: Pki
) -> None:
    with running_rsyslog(tmp_path, pki) as rsyslog, running_scp() as pacs:
        rules = mixed_rules(pki, pacs.port, _atna("tls", rsyslog.tls_port, pki))
        with observed_firewall(tmp_path, rules) as (firewall, _):
            drive_mix(firewall, pki)
            time.sleep(0.3)  # the last association's end reaches the firewall
        messages = rsyslog.wait_for(9)

    # RFC 5424 header as IHE ITI-20 wants it: facility 10, severity 5 (<85>).
    assert {(m.facility, m.severity, m.app_name, m.msgid) for m in messages} == {
        ("10", "5", "dicomfw", "DICOM+RFC3881")
    }
    assert [(m.event_id, m.event_type) for m in messages] == [
        ("110100", "110120"),  # Application Activity: Application Start
        ("110102", None),  # Begin Transferring DICOM Instances (the association with stores)
        ("110104", None),  # DICOM Instances Transferred
        ("110113", "110132"),  # Security Alert: C-FIND refused (Use of Restricted Function)
        ("110112", None),  # Query (the association with the refused C-FIND)
        ("110113", "110126"),  # unknown calling AE (Node Authentication)
        ("110113", "110132"),  # unknown called AE (Use of Restricted Function)
        ("110113", "110126"),  # TLS handshake without a certificate (Node Authentication)
        ("110100", "110121"),  # Application Activity: Application Stop
    ]
    transferred = messages[2].xml
    assert messages[2].outcome == "0"
    assert messages[4].outcome == "4"  # every query of it was refused
    assert {m.outcome for m in messages[5:8]} == {"4"}  # refused: mitigated
    roles = {_code(p, "RoleIDCode"): p.attrib for p in transferred.findall("ActiveParticipant")}
    assert roles["110153"]["UserID"] == "CT01"  # source: the modality, as requester
    assert roles["110153"]["UserIsRequestor"] == "true"
    assert roles["110153"]["NetworkAccessPointID"] == "127.0.0.1"
    assert roles["110152"]["UserID"] == "PACS"  # destination
    [sop_class] = transferred.findall("ParticipantObjectIdentification/SOPClass")
    assert sop_class.attrib == {"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": "2"}
    source = transferred.find("AuditSourceIdentification")
    assert source is not None and source.attrib["AuditSourceID"]


def test_rsyslog_receives_the_audit_messages_over_udp(tmp_path: Path, pki: Pki) -> None:
    with running_rsyslog(tmp_path, pki) as rsyslog, running_scp() as pacs:
        rules = mixed_rules(pki, pacs.port, _atna("udp", rsyslog.udp_port, pki))
        with observed_firewall(tmp_path, rules) as (firewall, _):
            exchange(firewall.port("front"), associate_rq("STRANGER", "PACS"))
            time.sleep(0.2)
        messages = rsyslog.wait_for(3)
    assert [(m.event_id, m.event_type) for m in messages] == [
        ("110100", "110120"),
        ("110113", "110126"),
        ("110100", "110121"),
    ]
    alert = messages[1].xml
    participant = alert.find("ActiveParticipant[@UserID='STRANGER']")
    assert participant is not None and participant.attrib["UserIsRequestor"] == "true"


def test_messages_are_well_formed_even_when_a_peer_sends_control_characters() -> None:
    record = {
        "event": "association_rejected",
        "time": "2025-01-31T09:30:00.125Z",
        "listener": "front",
        "source": {"address": "192.0.2.7", "port": 4242},
        "certificate": None,
        "calling_ae": "EVIL\x01<&>",
        "called_ae": "PACS",
        "route": None,
        "reason": "calling_ae_unknown",
        "detail": "calling AE 'EVIL\\x01<&>' is not a peer",
        "by_upstream": False,
        "rejection": {"result": 1, "source": 1, "reason": 3},
    }
    [(when, xml)] = Messages("fw.example", 1234)(record)
    assert when == record["time"]
    parsed = ElementTree.fromstring(xml)
    assert parsed.find("ActiveParticipant[@UserID='EVIL?<&>']") is not None
    assert Counter(e.tag for e in parsed) == Counter(
        {
            "EventIdentification": 1,
            "ActiveParticipant": 2,
            "AuditSourceIdentification": 1,
            "ParticipantObjectIdentification": 1,
        }
    )
