"""Every audit record a sink does not deliver is counted as lost, by sink and cause, and the
alert on it fires: an audit file on a full file system (``/dev/full``, where every write fails
with ENOSPC), an ATNA collector nobody listens for, a file that fills up half-way through a
batch. The log says the same (``event=audit_write_failed ... cause=... lost=N``)."""

from __future__ import annotations

import errno
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from dicomfw.observe.audit import WRITE_ERROR, JsonLines, QueuedSink, WriteFailed
from tests.harness import WAIT, Pki, echo_works, free_port, running_scp
from tests.obs_harness import (
    alert_fires,
    drive_mix,
    mixed_rules,
    observed_firewall,
    scrape,
    value,
    wait_until,
)
from tests.opshelpers import installed_dicomfw

LOST = "dicomfw_audit_events_lost_total"


def _rules(pacs_port: int, port: int, metrics_port: int) -> str:
    return f"""\
listeners:
  - {{name: front, bind: "127.0.0.1:{port}"}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {pacs_port}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8]}}
routes:
  - {{listener: front, called_ae: PACS, upstream: pacs, allow: [{{services: [C-ECHO]}}]}}
metrics: {{bind: "127.0.0.1:{metrics_port}"}}
audit: {{file: /dev/full}}
"""


def test_an_audit_file_on_a_full_file_system_counts_every_record_lost_and_the_alert_fires(
    tmp_path: Path,
) -> None:
    associations = 3
    port, metrics_port = free_port(), free_port()
    rules, log = tmp_path / "rules.yaml", tmp_path / "daemon.log"
    with running_scp() as pacs:
        rules.write_text(_rules(pacs.port, port, metrics_port))
        with log.open("wb") as output:
            daemon = subprocess.Popen(
                [installed_dicomfw(), "run", "--config", str(rules)], stderr=output
            )
        try:
            wait_until(lambda: "event=ready" in log.read_text(), "the daemon to be ready")
            # application_start was the first record: written at once, and lost
            wait_until(
                lambda: value(scrape(metrics_port), LOST, cause="write_error") == 1,
                "the lost application_start record",
            )
            before = scrape(metrics_port)
            for _ in range(associations):
                assert echo_works(port)
            wait_until(
                lambda: value(scrape(metrics_port), LOST, cause="write_error") == 1 + associations,
                "every association's record counted as lost",
            )
            after = scrape(metrics_port)
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(WAIT) == 0
    # one series per cause the file sink can lose a record to, from the start
    assert {dict(labels)["cause"]: v for (name, labels), v in after.items() if name == LOST} == {
        "queue_full": 0,
        "write_error": 1 + associations,
    }
    failures = [line for line in log.read_text().splitlines() if "event=audit_write_failed" in line]
    lost = [int(re.search(r" lost=(\d+)", line).group(1)) for line in failures]  # type: ignore[union-attr]
    # ... and application_stop at the end: the log names every one of them
    assert sum(lost) == 1 + associations + 1
    assert all("sink=file cause=write_error" in line for line in failures)
    assert "No space left on device" in failures[0]

    # The scraped counter, as Prometheus would have stored it, trips the alert rule.
    first = value(before, LOST, sink="file", cause="write_error")
    second = value(after, LOST, sink="file", cause="write_error")
    assert second > first
    series = '{instance="fw1",job="dicomfw",sink="file",cause="write_error"}'
    alert_fires(
        tmp_path,
        "DicomfwAuditEventsLost",
        {f"{LOST}{series}": f"{first:g}x5 {second:g}x10"},
        {"instance": "fw1", "sink": "file", "cause": "write_error"},
        at="10m",
    )


def test_an_unreachable_atna_collector_loses_exactly_the_records_it_would_have_been_sent(
    tmp_path: Path, pki: Pki
) -> None:
    """Nobody listens on the collector's port: every record the ATNA sink takes is lost as
    collector_unreachable, and only those (no message for a request_failed, an association that
    neither stored nor queried, or a rejection for an unreachable upstream). The file sink next
    to it loses nothing."""
    dead = free_port()
    extra = (
        'metrics: {bind: "127.0.0.1:0"}\n'
        f"audit: {{file: audit.jsonl, atna: {{host: 127.0.0.1, port: {dead}, transport: tls,"
        f" ca: {pki.ca}}}}}\n"
    )
    with (
        running_scp() as pacs,
        observed_firewall(tmp_path, mixed_rules(pki, pacs.port, extra)) as (firewall, obs),
    ):
        assert obs.server is not None
        port = obs.server.port
        drive_mix(firewall, pki)
        # application_start, the association that stored, the refused C-FIND and the
        # association it was on, two rejections (calling, called AE), the refused handshake
        expected = 7
        deadline = time.monotonic() + 3 * WAIT  # a failed batch takes its retries, 2.5 s
        while value(scrape(port), LOST, sink="atna") < expected:
            assert time.monotonic() < deadline, scrape(port)
            time.sleep(0.2)
        samples = scrape(port)
    assert {
        (dict(labels)["sink"], dict(labels)["cause"]): v
        for (name, labels), v in samples.items()
        if name == LOST
    } == {
        ("file", "queue_full"): 0,
        ("file", "write_error"): 0,
        ("atna", "queue_full"): 0,
        ("atna", "write_error"): 0,
        ("atna", "collector_unreachable"): expected,
    }
    written = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(written) == 1 + 9 + 1  # start, the mix's 9 records, stop


def test_a_file_that_fills_up_mid_batch_counts_only_the_records_not_wholly_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that stops part-way (ENOSPC after some bytes): the records wholly written stay,
    the rest are lost, and the cut line is ended so the next record starts a line of its own."""
    path = tmp_path / "audit.jsonl"
    writer = JsonLines(path)
    records = [{"event": "association", "n": n, "pad": "x" * 40} for n in range(4)]
    line = len(json.dumps(records[0], separators=(",", ":"))) + 1
    real_write = __import__("os").write
    budget = [2 * line + 10]  # two whole records and part of the third, then the disk is full

    def write(fd: int, data: Any) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        done = real_write(fd, bytes(data[: budget[0]]))
        budget[0] -= done
        return done

    monkeypatch.setattr("dicomfw.observe.audit.os.write", write)
    with pytest.raises(WriteFailed) as failed:
        writer.write(records)
    assert (failed.value.cause, failed.value.lost) == (WRITE_ERROR, 2)
    budget[0] = 10_000  # space again
    writer.write([{"event": "association", "n": 4}])
    writer.close()
    lines = path.read_text().splitlines()
    assert [json.loads(x)["n"] for x in lines[:2]] == [0, 1]
    assert lines[3] == '{"event":"association","n":4}'  # after the torn third line
    assert len(lines) == 4


def test_a_sink_counts_what_a_failing_writer_loses_by_cause(tmp_path: Path) -> None:
    """QueuedSink reports each lost record once, with the cause the writer gave."""

    class Failing:
        causes = (WRITE_ERROR,)

        def wants(self, record: dict[str, Any]) -> bool:
            return record["event"] != "ignored"

        def write(self, batch: list[dict[str, Any]]) -> None:
            raise OSError(errno.EIO, "input/output error")

        def close(self) -> None:
            pass

    counted: list[tuple[str, int]] = []
    sink = QueuedSink("file", Failing(), 100, lambda cause, n: counted.append((cause, n)))
    for n in range(5):
        sink.submit({"event": "association", "n": n})
    sink.submit({"event": "ignored"})  # never taken: not lost
    sink.close(WAIT)
    assert sum(n for cause, n in counted if cause == WRITE_ERROR) == 5
    assert sink.lost == {"queue_full": 0, "write_error": 5}
