"""``dicomfw demo``, the README's first command: created from nothing, it works end to end.

DCMTK's echoscu and storescu talk to it as a modality would, in plain and over mutual TLS with
the client certificate the demo issued; what is stored lands in the sample PACS's folder; an
unknown AE title is rejected; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.harness import WAIT, dcmtk, free_port, running_process


def three_free_ports() -> int:
    """The first of three consecutive free loopback ports (the demo takes PORT..PORT+2)."""
    for _ in range(20):
        first = free_port()
        if first > 65533:
            continue
        try:
            for port in (first + 1, first + 2):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise AssertionError("no three consecutive free ports in 20 tries")


def test_the_demo_relays_plain_and_mutual_tls_associations_to_its_sample_pacs(
    tmp_path: Path,
) -> None:
    port, demo = three_free_ports(), tmp_path / "demo"
    image = get_testdata_file("CT_small.dcm")
    assert image is not None
    command = (sys.executable, "-m", "dicomfw", "demo", "--dir", demo, "--port", str(port))
    with running_process(*command, ready_port=port + 1) as process:
        assert dcmtk("echoscu", "-aet", "CT01", "-aec", "PACS", "127.0.0.1", port).returncode == 0
        stored = dcmtk("storescu", "-aet", "CT01", "-aec", "PACS", "127.0.0.1", port, image)
        assert stored.returncode == 0, stored.stderr
        client = ("+tls", demo / "certs/remote-ws.key", demo / "certs/remote-ws.pem")
        tls = ("+cf", demo / "ca/ca.pem", "-aet", "REMOTE_WS", "-aec", "PACS")
        echoed = dcmtk("echoscu", *client, *tls, "127.0.0.1", port + 1)
        assert echoed.returncode == 0, echoed.stderr
        unknown = dcmtk("echoscu", "-aet", "NOBODY", "-aec", "PACS", "127.0.0.1", port)
        assert unknown.returncode != 0
        assert "Calling AE Title Not Recognized" in unknown.stderr, unknown.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
    instance = dcmread(image, stop_before_pixels=True).SOPInstanceUID
    assert [p.name for p in (demo / "received").iterdir()] == [f"{instance}.dcm"]
