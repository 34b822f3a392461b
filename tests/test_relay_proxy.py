"""Behind a real HAProxy (Debian's, `send-proxy-v2`, on loopback): the firewall's allowlist,
limits and logs see the client address HAProxy reports, and a connection without the header,
or from anyone but the balancer, is closed unread."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomfw.config.load import load_config
from dicomfw.core.session import AssociationAccepted, AssociationRejected
from dicomfw.errors import ConfigErrors
from dicomfw.relay.server import Refused
from tests.harness import (
    VERIFICATION,
    WAIT,
    Firewall,
    Pki,
    associate_rq,
    client_context,
    free_port,
    rules,
    running_firewall,
    running_process,
    running_scp,
    scu,
)
from tests.opshelpers import LOCAL_LIMIT_RJ, first_pdu_from

HAPROXY = Path("/usr/sbin/haproxy")
pytestmark = pytest.mark.skipif(
    not HAPROXY.exists(), reason="HAProxy is not installed (Debian package haproxy)"
)

# CT01 may connect only from 127.0.0.2 and 127.0.0.4; only 127.0.0.1 may send PROXY headers.
PEERS = "  - {ae_title: CT01, networks: [127.0.0.2/32, 127.0.0.4/32]}\n"
PROXIED = 'bind: "127.0.0.1:0", proxy_protocol: true, proxy_from: [127.0.0.1/32]'


def proxied_rules(pki: Pki, upstream_port: int, limits: str = "", tls: bool = False) -> str:
    text = rules(
        pki,
        upstream_port,
        listener_tls=tls,
        upstream_tls=False,
        peers=PEERS,
        limits=f"{{artim_seconds: 5, idle_seconds: 30{limits}}}",
    )
    listener, proxied = (
        '{name: front, bind: "127.0.0.1:0", tls: ',
        f"{{name: front, {PROXIED}, tls: ",
    )
    assert listener in text
    return text.replace(listener, proxied)


@contextlib.contextmanager
def running_haproxy(directory: Path, firewall_port: int) -> Iterator[int]:
    """HAProxy in TCP mode on loopback, passing each connection on with a PROXY v2 header."""
    port = free_port()
    config = directory / "haproxy.cfg"
    config.write_text(
        f"""\
global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend dicom
    bind 127.0.0.1:{port}
    default_backend firewall
backend firewall
    server fw 127.0.0.1:{firewall_port} send-proxy-v2
"""
    )
    with running_process(HAPROXY, "-f", config, "-db", ready_port=port):
        yield port


def through(haproxy: int, source: str, tls: ssl.SSLContext | None = None) -> Any:
    return scu("CT01", (VERIFICATION,)).associate(
        "127.0.0.1",
        haproxy,
        ae_title="PACS",
        bind_address=(source, 0),
        tls_args=(tls, "localhost") if tls is not None else None,
    )


def closed_unanswered(port: int, source: str) -> bool:
    """Send an A-ASSOCIATE-RQ straight to the firewall: is the connection closed unanswered?"""
    with socket.create_connection(("127.0.0.1", port), WAIT, source_address=(source, 0)) as sock:
        sock.settimeout(WAIT)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(associate_rq("CT01", "PACS"))
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


def refusals(firewall: Firewall) -> list[tuple[str, str]]:
    return [(e.why, e.detail) for _, e in firewall.events if isinstance(e, Refused)]


def test_the_allowlist_and_the_log_see_the_address_haproxy_reports(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomfw.events")
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, proxied_rules(pki, pacs.port)) as firewall,
        running_haproxy(tmp_path, firewall.port("front")) as haproxy,
    ):
        allowed = through(haproxy, "127.0.0.2")
        assert allowed.is_established, "CT01 from 127.0.0.2 through HAProxy was refused"
        assert allowed.send_c_echo().Status == 0x0000
        allowed.release()
        denied = through(haproxy, "127.0.0.3")  # CT01 is not allowed from 127.0.0.3
        assert not denied.is_established
        firewall.wait_for(lambda e: isinstance(e, Refused) and e.detail == "127.0.0.3")
        # Straight to the firewall: without a header (from the balancer's own address), or
        # from anyone else, the connection is closed before anything is answered.
        assert closed_unanswered(firewall.port("front"), "127.0.0.1")
        assert closed_unanswered(firewall.port("front"), "127.0.0.2")
        firewall.wait_for(lambda e: isinstance(e, Refused) and e.why == "proxy_source_denied")
    accepted = [
        (info.address, info.proxied_by)
        for info, e in firewall.events
        if isinstance(e, AssociationAccepted)
    ]
    assert [(str(a), str(b)) for a, b in accepted] == [("127.0.0.2", "127.0.0.1")]
    seen = refusals(firewall)
    assert ("source_address_denied", "127.0.0.3") in seen
    assert ("proxy_source_denied", "127.0.0.2") in seen
    assert any(why == "proxy_header_invalid" for why, _ in seen)
    assert pacs.requests == ["C-ECHO"]
    logged = [r.getMessage() for r in caplog.records if "association_accepted" in r.getMessage()]
    assert len(logged) == 1 and "peer=127.0.0.2:" in logged[0] and "via=127.0.0.1" in logged[0]


def test_a_balancer_connection_without_a_header_is_closed_after_five_seconds(
    tmp_path: Path, pki: Pki
) -> None:
    """A balancer sends the header with its first segment; one that sends nothing is cut off
    (and a real client through the balancer meanwhile is served)."""
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, proxied_rules(pki, pacs.port)) as firewall,
        running_haproxy(tmp_path, firewall.port("front")) as haproxy,
        socket.create_connection(("127.0.0.1", firewall.port("front")), WAIT) as silent,
    ):
        started = time.monotonic()
        association = through(haproxy, "127.0.0.2")
        assert association.is_established and association.send_c_echo().Status == 0x0000
        association.release()
        silent.settimeout(WAIT)
        assert silent.recv(1) == b""  # closed, nothing answered
        waited = time.monotonic() - started
    assert 4.5 <= waited < WAIT
    invalid = [refusal for refusal in refusals(firewall) if refusal[0] == "proxy_header_invalid"]
    assert invalid == [("proxy_header_invalid", "timed out")]


def test_limits_count_the_real_clients_not_the_balancer(tmp_path: Path, pki: Pki) -> None:
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, proxied_rules(pki, pacs.port, ", max_concurrent_per_ip: 1")
        ) as firewall,
        running_haproxy(tmp_path, firewall.port("front")) as haproxy,
    ):
        held = through(haproxy, "127.0.0.2")
        assert held.is_established
        second = first_pdu_from("127.0.0.2", haproxy, associate_rq("CT01", "PACS"))
        other = through(haproxy, "127.0.0.4")  # another client behind the same balancer
        assert other.is_established and other.send_c_echo().Status == 0x0000
        other.release()
        held.release()
    assert second == LOCAL_LIMIT_RJ
    rejected = [
        (str(info.address), e.why)
        for info, e in firewall.events
        if isinstance(e, AssociationRejected)
    ]
    assert rejected == [("127.0.0.2", "ip_concurrency_exceeded")]


def test_the_header_is_read_before_the_tls_handshake_and_nothing_past_it(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, proxied_rules(pki, pacs.port, tls=True)) as firewall,
        running_haproxy(tmp_path, firewall.port("front")) as haproxy,
    ):
        association = through(haproxy, "127.0.0.2", client_context(pki, pki.modality))
        assert association.is_established
        assert association.send_c_echo().Status == 0x0000
        association.release()
    [(info, _)] = [(i, e) for i, e in firewall.events if isinstance(e, AssociationAccepted)]
    assert str(info.address) == "127.0.0.2" and info.identity is not None


@pytest.mark.parametrize(
    ("listener", "message"),
    [
        ("proxy_protocol: true", "proxy_protocol: true and proxy_from"),
        ("proxy_from: [10.0.0.0/24]", "proxy_protocol: true and proxy_from"),
        ("proxy_protocol: true, proxy_from: [10.0.0.300/24]", "is not an IP network"),
        ('proxy_protocol: "yes", proxy_from: [10.0.0.0/24]', "expected true or false"),
    ],
)
def test_proxy_settings_are_validated(tmp_path: Path, listener: str, message: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "listeners:\n"
        f"  - {{name: front, bind: '0.0.0.0:104', {listener}}}\n"
        "upstreams: {pacs: {host: 127.0.0.1, port: 104}}\n"
        "peers: [{ae_title: CT01, networks: [10.1.2.0/24]}]\n"
        "routes: [{listener: front, called_ae: PACS, upstream: pacs, allow: [{services: "
        "[C-ECHO]}]}]\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    [error] = caught.value.errors
    assert error.line == 2 and message in str(error)
