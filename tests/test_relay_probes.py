"""A load balancer's TCP health check (connect, close, not a byte) is a probe on every listener:
one info line, its own outcome, no warning, no refusal; a TLS handshake that really fails is
still refused. Run against ``dicomfw run``, whose log lines are what an admin reads."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.harness import WAIT, Pki, client_context, free_port, running_scp, scu
from tests.obs_harness import scrape, series, value, wait_until
from tests.opshelpers import installed_dicomfw


def _rules(pki: Pki, pacs_port: int, ports: dict[str, int], audit: Path) -> str:
    return f"""\
listeners:
  - {{name: front, bind: "127.0.0.1:{ports["front"]}"}}
  - name: secure
    bind: "127.0.0.1:{ports["secure"]}"
    tls: {{cert: {pki.fw_server.cert}, key: {pki.fw_server.key}, ca: {pki.ca}}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs_port}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8]}}
routes:
  - {{listener: front, called_ae: PACS, upstream: pacs, allow: [{{services: [C-ECHO]}}]}}
  - {{listener: secure, called_ae: PACS, upstream: pacs, allow: [{{services: [C-ECHO]}}]}}
metrics: {{bind: "127.0.0.1:{ports["metrics"]}"}}
audit: {{file: {audit}}}
limits: {{artim_seconds: 5, tls_handshake_seconds: 5}}
"""


def _connect_and_close(port: int, reset: bool) -> None:
    """What HAProxy's ``check`` (without ``check-ssl``) or a monitor's TCP probe does: connect,
    send nothing, close; ``reset``: close with an RST, as HAProxy closes its checks."""
    sock = socket.create_connection(("127.0.0.1", port), WAIT)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextlib.contextmanager
def _daemon(tmp_path: Path, pki: Pki, pacs_port: int) -> Iterator[tuple[dict[str, int], Path]]:
    """``dicomfw run`` on the rules above, its log in ``daemon.log``, ready; stopped with
    SIGTERM, which it must answer with exit 0."""
    ports = {"front": free_port(), "secure": free_port(), "metrics": free_port()}
    log, rules = tmp_path / "daemon.log", tmp_path / "rules.yaml"
    rules.write_text(_rules(pki, pacs_port, ports, tmp_path / "audit.jsonl"))
    with log.open("wb") as output:
        daemon = subprocess.Popen(
            [installed_dicomfw(), "run", "--config", str(rules)], stderr=output
        )
    try:
        wait_until(lambda: bool(_lines(log, "ready")), "the daemon to be ready")
        yield ports, log
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(WAIT) == 0


def _lines(log: Path, event: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if f" event={event} " in line + " "]


def test_a_connect_and_close_is_one_info_line_on_a_plain_and_on_a_tls_listener(
    tmp_path: Path, pki: Pki
) -> None:
    audit = tmp_path / "audit.jsonl"
    with running_scp() as pacs, _daemon(tmp_path, pki, pacs.port) as (ports, log):
        for listener in ("front", "secure"):
            _connect_and_close(ports[listener], reset=False)
            _connect_and_close(ports[listener], reset=True)
        wait_until(lambda: len(_lines(log, "probe")) == 4, "four probes logged")
        samples = scrape(ports["metrics"])
    probes = _lines(log, "probe")
    listeners = sorted(re.search(r"listener=(\w+)", line).group(1) for line in probes)  # type: ignore[union-attr]
    assert listeners == ["front", "front", "secure", "secure"]
    assert all(line.split()[1] == "level=info" for line in probes), probes
    assert [line for line in log.read_text().splitlines() if "level=warning" in line] == []
    assert series(samples, "dicomfw_associations_total") == {
        frozenset(
            {("listener", name), ("route", "none"), ("peer", "unknown"), ("outcome", "probe")}
        ): 2
        for name in ("front", "secure")
    }
    assert value(samples, "dicomfw_refusals_total") == 0
    assert value(samples, "dicomfw_tls_handshake_failures_total") == 0
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert events == ["application_start", "application_stop"]  # a probe is not audited


def test_a_tls_handshake_that_really_fails_is_still_refused_not_a_probe(
    tmp_path: Path, pki: Pki
) -> None:
    """Plain DICOM bytes to the TLS listener, half a ClientHello then a close, and a client
    without a certificate: each is a refused connection with its cause, as before."""
    audit = tmp_path / "audit.jsonl"
    with running_scp() as pacs, _daemon(tmp_path, pki, pacs.port) as (ports, log):
        with socket.create_connection(("127.0.0.1", ports["secure"]), WAIT) as sock:
            sock.sendall(b"\x01\x00\x00\x00\x00\x44" + bytes(68))  # an A-ASSOCIATE-RQ's start
            sock.settimeout(WAIT)
            with _suppressed():
                sock.recv(100)
        hello = _client_hello(pki)
        with socket.create_connection(("127.0.0.1", ports["secure"]), WAIT) as sock:
            sock.sendall(hello[: len(hello) // 2])
        with (
            socket.create_connection(("127.0.0.1", ports["secure"]), WAIT) as raw,
            _suppressed(),
            client_context(pki, None).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.recv(1)
        wait_until(
            lambda: value(scrape(ports["metrics"]), "dicomfw_tls_handshake_failures_total") == 3,
            "three refused handshakes",
        )
        samples = scrape(ports["metrics"])
    assert series(samples, "dicomfw_tls_handshake_failures_total") == {
        frozenset({("listener", "secure"), ("cause", cause)}): 1
        for cause in ("not_tls", "connection_lost", "no_certificate")
    }
    assert _lines(log, "probe") == []
    refused = _lines(log, "connection_refused")
    assert len(refused) == 3 and all("level=warning" in line for line in refused), refused
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted(r["cause"] for r in records if r["event"] == "connection_refused") == [
        "connection_lost",
        "no_certificate",
        "not_tls",
    ]


def test_an_association_ended_line_counts_requests_sent_and_answered_and_bytes_each_way(
    tmp_path: Path, pki: Pki
) -> None:
    """A PACS that drops the connection on C-ECHO: the request was sent and never answered,
    and the requester got an A-ABORT; an answered echo and a release count both."""
    lines = {}
    for drop in (False, True):
        with (
            running_scp(drop_on_echo=drop) as pacs,
            _daemon(tmp_path, pki, pacs.port) as (ports, log),
        ):
            association = scu("CT01").associate("127.0.0.1", ports["front"], ae_title="PACS")
            assert association.is_established
            answered = association.send_c_echo()
            association.release()
            wait_until(lambda: bool(_lines(log, "association_ended")), "the association ended")
        [lines[drop]] = _lines(log, "association_ended")
        assert bool(answered) is not drop
    fields = {
        drop: dict(f.split("=", 1) for f in line.split() if "=" in f)
        for drop, line in lines.items()
    }
    assert fields[False]["how"] == "released" and fields[True]["how"] == "aborted", lines
    assert fields[True]["why"] == "upstream_connection_lost", lines
    assert [fields[drop]["requests_sent"] for drop in (False, True)] == ["1", "1"], lines
    assert [fields[drop]["requests_answered"] for drop in (False, True)] == ["1", "0"], lines
    for field in fields.values():
        # an A-ASSOCIATE-RQ and an echo one way, an A-ASSOCIATE-AC (and an answer) the other
        assert int(field["bytes_from_requester"]) > 68 + 74, field
        assert int(field["bytes_from_upstream"]) > 68, field
    assert int(fields[False]["bytes_from_upstream"]) > int(fields[True]["bytes_from_upstream"])


def _client_hello(pki: Pki) -> bytes:
    """The first flight of a real TLS client, from a memory BIO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = client_context(pki, pki.modality).wrap_bio(
        incoming, outgoing, server_hostname="localhost"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


def _suppressed() -> contextlib.AbstractContextManager[None]:
    return contextlib.suppress(OSError, ssl.SSLError)
