"""A short soak in the suite: two and a half minutes of ``bench/soak.py`` against a dicomfw
process, judged on what the daemon holds at rest.

The same script makes the one-hour run of docs/soak.md. Here: 30 s of warm-up (the first
reload included), then the mixed traffic (stores on one association and one per image, echoes,
finds, refused requests, hostile connections, a reload a minute); after it, with no
association open, the daemon's RSS is within 10 % of what it was at rest after the warm-up and
it holds no more descriptors, every good action succeeded, every refusal was refused and every
hostile connection closed. The event-loop lag bound is loose here (a CI machine is shared);
the 10 ms p99 goal is for the hour on a quiet machine.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SECONDS = 150


@pytest.mark.timeout(SECONDS + 240)
def test_two_and_a_half_minutes_of_mixed_traffic_leave_memory_and_descriptors_flat(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "soak.py"),
            "--seconds",
            str(SECONDS),
            "--warmup",
            "30",
            "--interval",
            "2",
            "--no-plot",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 200,
        check=False,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = list(csv.DictReader((tmp_path / "soak.csv").open()))
    assert len(rows) >= SECONDS // 2 - 10, done.stdout[-2000:] + done.stderr[-2000:]
    assert summary["rss_growth"] < 0.10, summary
    assert summary["fds_at_rest_at_end"] <= summary["fds_at_rest_after_warmup"], summary
    assert summary["good_errors"] == 0 and summary["good_ok"] > 100, summary["first_errors"]
    assert summary["refused_unexpectedly_passed"] == 0 and summary["refused_as_expected"] > 0
    assert summary["hostile_not_closed"] == 0 and summary["hostile"] > 0
    assert summary["reloads_sent"] >= 2 and summary["reloads_succeeded"] == summary["reloads_sent"]
    assert summary["lag_p99_ms"] < 100, summary
    assert max(int(row["open_associations"]) for row in rows) > 0  # it did carry traffic
