"""Soak: hours of mixed traffic through a dicomfw process, its memory, descriptors and latency
sampled all along.

    python bench/soak.py --seconds 3600 --out soak-1h          # the documented one-hour run
    python bench/soak.py --seconds 150 --out /tmp/s --no-plot   # what the test suite runs

It starts ``dicomfw run`` (plain listener; mutual TLS to a DCMTK ``storescp +tls --ignore`` for
storage and verification; plain to a pynetdicom query SCP for C-FIND), then ``--workers``
threads run a seeded mix until the time is up, each action a real client process or socket:

=================  ==============================================================  ========
action             what                                                            counted
=================  ==============================================================  ========
store-association  storescu, 5 CT images on one association                        good
store-per-image    storescu once per image, 3 images                               good
echo               echoscu to PACS and to QR                                       good
find               findscu, study level, to QR                                     good
refused            a C-STORE where only C-FIND is allowed (no context accepted),   refused
                   an unknown calling AE (A-ASSOCIATE-RJ)
hostile            garbage bytes; a truncated A-ASSOCIATE-RQ; a PDU header over    hostile
                   the cap; a connection that says nothing until ARTIM closes it
=================  ==============================================================  ========

and SIGHUP reloads the rules every ``--reload-every`` seconds (the first one during the
warm-up). Every ``--interval`` seconds it samples the daemon: RSS and open descriptors
(``/proc``), open associations and event-loop lag (its ``/metrics``:
``dicomfw_active_associations``, ``dicomfw_event_loop_lag_seconds``, the p99 and the worst of
the interval from the histogram's buckets). At the end of the warm-up and
at the end of the run the traffic pauses until no association is open, and RSS and descriptors
are read at rest: those two readings are what "flat" is judged on.

Writes ``soak.csv`` (one row per sample), ``summary.json`` and, unless ``--no-plot``,
``soak.png`` (matplotlib: ``pip install -e '.[bench]'``) into ``--out``. Exits 1 when a goal
is missed: RSS at rest grew 10 % or more after the warm-up, descriptors at rest grew, a good
action failed, a refusal or hostile connection was not refused, a reload failed, or the
event-loop lag's p99 over the run was 10 ms or more.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fixtures import CALLED_AE, CALLING_AE, LOCALHOST, make_ct_files, make_pki
from procs import DCMTK_ENV, Service, free_port, rss_kb

DCMTK = Path("/usr/bin")
PYTHON = sys.executable
CLIENT_TIMEOUT = 60.0
RSS_GROWTH_LIMIT = 0.10
LAG_P99_LIMIT = 0.010
#: The upper bounds of dicomfw_event_loop_lag_seconds' buckets (observe/metrics.py).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

RULES = """\
listeners:
  - {{name: modalities, bind: "{host}:{port}"}}
upstreams:
  pacs: {{host: {host}, port: {pacs}, tls: {{ca: {ca}, cert: {cert}, key: {key}}}}}
  qr: {{host: {host}, port: {qr}, tls: false}}
peers:
  - {{ae_title: {calling}, networks: [127.0.0.0/8]}}
routes:
  - listener: modalities
    called_ae: {called}
    upstream: pacs
    allow: [{{services: [C-ECHO, C-STORE], sop_classes: [CTImageStorage]}}]
  - listener: modalities
    called_ae: QR
    upstream: qr
    allow:
      - {{services: [C-ECHO, C-FIND], sop_classes: [StudyRootQueryRetrieveInformationModelFind]}}
metrics: {{bind: "{host}:{metrics}"}}
limits: {{artim_seconds: 3, idle_seconds: 60, connect_timeout_seconds: 10}}
"""


# ---- the query SCP (a separate process: ``soak.py --find-scp PORT``) ------------------------


def find_scp(port: int) -> int:
    """C-ECHO and C-FIND (two study matches) until terminated."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt

    def on_find(event: object) -> object:
        for number in range(2):
            match = Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.StudyInstanceUID = f"1.2.826.0.1.3680043.10.9.{number + 1}"
            yield 0xFF00, match

    ae = AE(ae_title="QR")
    ae.maximum_associations = 32
    ae.add_supported_context(STUDY_ROOT_FIND)
    ae.add_supported_context("1.2.840.10008.1.1")
    ae.start_server((LOCALHOST, port), block=True, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    return 0


# ---- traffic --------------------------------------------------------------------------------


@dataclass
class Counts:
    good_ok: int = 0
    good_errors: int = 0
    refused_as_expected: int = 0
    refused_unexpectedly_passed: int = 0
    hostile: int = 0
    hostile_not_closed: int = 0
    reloads: int = 0
    errors: list[str] = field(default_factory=list)


class Traffic:
    def __init__(self, port: int, files: list[Path], counts: Counts, seed: int) -> None:
        self.port = port
        self.files = files
        self.counts = counts
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.actions: list[tuple[str, Callable[[random.Random], None], int]] = [
            ("store-association", self.store_association, 2),
            ("store-per-image", self.store_per_image, 2),
            ("echo", self.echo, 3),
            ("find", self.find, 2),
            ("refused", self.refused, 1),
            ("hostile", self.hostile, 1),
        ]

    def _dcmtk(self, tool: str, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(DCMTK / tool), *map(str, args)],
            capture_output=True,
            timeout=CLIENT_TIMEOUT,
            env=DCMTK_ENV,
            check=False,
        )

    def _good(self, name: str, done: subprocess.CompletedProcess[bytes]) -> None:
        with self.lock:
            if done.returncode == 0:
                self.counts.good_ok += 1
            else:
                self.counts.good_errors += 1
                self.counts.errors.append(f"{name}: {done.stderr.decode(errors='replace')[-300:]}")

    def _peer(self, called: str = CALLED_AE) -> list[str]:
        return ["-aet", CALLING_AE, "-aec", called, LOCALHOST, str(self.port)]

    def store_association(self, rng: random.Random) -> None:
        self._good("store", self._dcmtk("storescu", *self._peer(), *rng.sample(self.files, 5)))

    def store_per_image(self, rng: random.Random) -> None:
        for path in rng.sample(self.files, 3):
            self._good("store1", self._dcmtk("storescu", *self._peer(), path))

    def echo(self, rng: random.Random) -> None:
        self._good("echo", self._dcmtk("echoscu", *self._peer(rng.choice((CALLED_AE, "QR")))))

    def find(self, rng: random.Random) -> None:
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
        self._good("find", self._dcmtk("findscu", "-S", *keys, *self._peer("QR")))

    def refused(self, rng: random.Random) -> None:
        if rng.random() < 0.5:
            done = self._dcmtk("storescu", *self._peer("QR"), self.files[0])
        else:
            done = self._dcmtk(
                "echoscu", "-aet", "STRANGER", "-aec", CALLED_AE, LOCALHOST, str(self.port)
            )
        with self.lock:
            if done.returncode != 0:
                self.counts.refused_as_expected += 1
            else:
                self.counts.refused_unexpectedly_passed += 1

    def hostile(self, rng: random.Random) -> None:
        kind = rng.choice(("garbage", "truncated", "over-cap", "silent"))
        payload = {
            "garbage": bytes(rng.randrange(256) for _ in range(200)),
            "truncated": struct.pack(">BxL", 1, 300) + b"\x00\x01" + b"PACS".ljust(16),
            "over-cap": struct.pack(">BxL", 4, 0x7FFFFFFF),
            "silent": b"",
        }[kind]
        closed = False
        try:
            with socket.create_connection((LOCALHOST, self.port), 10) as sock:
                sock.settimeout(10)
                if payload:
                    sock.sendall(payload)
                while sock.recv(4096):  # until the firewall closes (ARTIM for the silent one)
                    pass
                closed = True
        except (ConnectionResetError, TimeoutError, OSError):
            closed = True  # a reset is a close too; a timeout is not
        with self.lock:
            self.counts.hostile += 1
            self.counts.hostile_not_closed += not closed

    def worker(
        self, stop: threading.Event, pause: threading.Event, idle: threading.Semaphore, seed: int
    ) -> None:
        rng = random.Random(seed)
        weights = [weight for _, _, weight in self.actions]
        while not stop.is_set():
            if pause.is_set():
                idle.release()
                while pause.is_set() and not stop.is_set():
                    time.sleep(0.05)
                continue
            _, action, _ = rng.choices(self.actions, weights)[0]
            try:
                action(rng)
            except (OSError, subprocess.SubprocessError) as error:
                with self.lock:
                    self.counts.good_errors += 1
                    self.counts.errors.append(f"{action.__name__}: {error}")
            time.sleep(rng.uniform(0.02, 0.2))


# ---- sampling ---------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """The daemon's /metrics as {name{labels}: value} (text format, no client library)."""
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


def lag_buckets(samples: dict[str, float]) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of dicomfw_event_loop_lag_seconds."""
    found = []
    for name, count in samples.items():
        if name.startswith("dicomfw_event_loop_lag_seconds_bucket{"):
            bound = name.split('le="', 1)[1].split('"', 1)[0]
            found.append((float("inf") if bound == "+Inf" else float(bound), count))
    return sorted(found)


def quantile(
    before: list[tuple[float, float]], after: list[tuple[float, float]], q: float
) -> float:
    """The bucket upper bound under which ``q`` of the samples between two scrapes fell."""
    previous = dict(before)
    deltas = [(bound, count - previous.get(bound, 0.0)) for bound, count in after]
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return 0.0
    for bound, cumulative in deltas:
        if cumulative >= q * total:
            return bound
    return float("inf")


@dataclass
class Sample:
    elapsed_s: float
    rss_kb: int
    fds: int
    open_associations: int
    lag_p99_ms: float
    lag_max_ms: float
    good_ok: int
    good_errors: int
    refused: int
    hostile: int
    reloads: int


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_associations(samples: dict[str, float]) -> int:
    return int(sum(v for k, v in samples.items() if k.startswith("dicomfw_active_associations")))


def at_rest(
    daemon: Service,
    metrics_port: int,
    pause: threading.Event,
    idle: threading.Semaphore,
    workers: int,
) -> tuple[int, int]:
    """Pause the traffic, wait until no connection is open, read (RSS KB, descriptors)."""
    pause.set()
    for _ in range(workers):
        idle.acquire(timeout=CLIENT_TIMEOUT + 15)
    deadline = time.monotonic() + 30
    baseline = None
    while time.monotonic() < deadline:
        count = descriptors(daemon.pid)
        if open_associations(scrape(metrics_port)) == 0 and count == baseline:
            break
        baseline = count
        time.sleep(1.0)
    reading = rss_kb(daemon.pid), descriptors(daemon.pid)
    pause.clear()
    return reading


# ---- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    pki = make_pki(work / "pki")
    files = make_ct_files(work / "images", 12, 128, 128)
    pacs_port, qr_port, port, metrics_port = (free_port() for _ in range(4))
    rules = work / "rules.yaml"
    rules.write_text(
        RULES.format(
            host=LOCALHOST,
            port=port,
            pacs=pacs_port,
            qr=qr_port,
            ca=pki.ca,
            cert=pki.fw_cert,
            key=pki.fw_key,
            calling=CALLING_AE,
            called=CALLED_AE,
            metrics=metrics_port,
        )
    )
    storescp = [
        str(DCMTK / "storescp"),
        "--fork",
        "--ignore",
        "-aet",
        CALLED_AE,
        "+tls",
        str(pki.scp_key),
        str(pki.scp_cert),
        "+cf",
        str(pki.ca),
        str(pacs_port),
    ]
    services = [
        Service("storescp", storescp, pacs_port, work / "storescp.log", env=DCMTK_ENV),
        Service("qr", [PYTHON, __file__, "--find-scp", str(qr_port)], qr_port, work / "qr.log"),
        Service(
            "dicomfw",
            [PYTHON, "-m", "dicomfw.cli", "run", "--config", str(rules)],
            port,
            work / "dicomfw.log",
        ),
    ]
    counts = Counts()
    samples: list[Sample] = []
    stop, pause = threading.Event(), threading.Event()
    idle = threading.Semaphore(0)
    try:
        for service in services:
            service.start()
        daemon = services[-1]
        traffic = Traffic(port, files, counts, args.seed)
        threads = [
            threading.Thread(
                target=traffic.worker, args=(stop, pause, idle, args.seed + n), daemon=True
            )
            for n in range(args.workers)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        previous = lag_buckets(scrape(metrics_port))
        run_start = previous
        # The first reload comes during the warm-up: it opens what a reload opens once and
        # keeps (a descriptor on /dev/null, seen on the first SIGHUP only).
        next_reload = started + min(args.reload_every, args.warmup / 2)
        warm: tuple[int, int] | None = None
        while (now := time.monotonic()) - started < args.seconds:
            time.sleep(min(args.interval, max(0.1, started + args.seconds - now)))
            if time.monotonic() >= next_reload:
                os.kill(daemon.pid, signal.SIGHUP)
                counts.reloads += 1
                next_reload += args.reload_every
            if warm is None and time.monotonic() - started >= args.warmup:
                warm = at_rest(daemon, metrics_port, pause, idle, args.workers)
                run_start = lag_buckets(scrape(metrics_port))
            scraped = scrape(metrics_port)
            buckets = lag_buckets(scraped)
            samples.append(
                Sample(
                    round(time.monotonic() - started, 1),
                    rss_kb(daemon.pid),
                    descriptors(daemon.pid),
                    open_associations(scraped),
                    1000 * quantile(previous, buckets, 0.99),
                    1000 * quantile(previous, buckets, 1.0),
                    counts.good_ok,
                    counts.good_errors,
                    counts.refused_as_expected,
                    counts.hostile,
                    counts.reloads,
                )
            )
            previous = buckets
            if args.verbose:
                print(samples[-1], flush=True)
        end = at_rest(daemon, metrics_port, pause, idle, args.workers)
        stop.set()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT + 15)
        final = scrape(metrics_port)
        reloads_ok = int(
            sum(
                v
                for k, v in final.items()
                if k.startswith('dicomfw_rule_reloads_total{result="success"')
            )
        )
        lag = lag_buckets(final)
    finally:
        for service in reversed(services):
            service.stop()
    warm = warm or end
    summary: dict[str, object] = {
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "workers": args.workers,
        "seed": args.seed,
        "samples": len(samples),
        "rss_at_rest_after_warmup_kb": warm[0],
        "rss_at_rest_at_end_kb": end[0],
        "rss_growth": round((end[0] - warm[0]) / warm[0], 4),
        "fds_at_rest_after_warmup": warm[1],
        "fds_at_rest_at_end": end[1],
        "lag_p99_ms": 1000 * quantile(run_start, lag, 0.99),
        "lag_max_ms": 1000 * quantile(run_start, lag, 1.0),
        "lag_samples": lag[-1][1] - (run_start[-1][1] if run_start else 0) if lag else 0,
        "reloads_sent": counts.reloads,
        "reloads_succeeded": reloads_ok,
        **{k: v for k, v in asdict(counts).items() if k not in ("reloads", "errors")},
        "first_errors": counts.errors[:10],
    }
    goals = {
        "rss_flat": summary["rss_growth"] < RSS_GROWTH_LIMIT,  # type: ignore[operator]
        "fds_flat": end[1] <= warm[1],
        "good_traffic_without_errors": counts.good_errors == 0 and counts.good_ok > 0,
        "refusals_refused": counts.refused_unexpectedly_passed == 0,
        "hostile_closed": counts.hostile_not_closed == 0,
        "reloads_succeeded": reloads_ok == counts.reloads,
        "lag_p99_under_10_ms": summary["lag_p99_ms"] < 1000 * LAG_P99_LIMIT,  # type: ignore[operator]
    }
    summary["goals"] = goals
    summary["passed"] = all(goals.values())
    write_outputs(args.out, samples, summary, args.warmup, plot=not args.no_plot)
    return summary


def write_outputs(
    out: Path, samples: list[Sample], summary: dict[str, object], warmup: float, plot: bool
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "soak.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(Sample.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(sample) for sample in samples)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if plot and samples:
        plot_samples(out / "soak.png", samples, summary, warmup)


def plot_samples(
    path: Path, samples: list[Sample], summary: dict[str, object], warmup: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.elapsed_s / 60 for s in samples]
    panels = [
        ("RSS (MB)", [s.rss_kb / 1024 for s in samples], None),
        ("open descriptors", [s.fds for s in samples], None),
        ("open associations", [s.open_associations for s in samples], None),
        ("event-loop lag p99 per sample (ms)", [s.lag_p99_ms for s in samples], 10.0),
    ]
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 9), sharex=True)
    for axis, (title, values, limit) in zip(axes, panels, strict=True):
        axis.plot(minutes, values, linewidth=1)
        axis.set_ylabel(title, fontsize=8)
        axis.axvspan(0, warmup / 60, color="0.9", label="warm-up")
        if limit is not None:
            axis.axhline(limit, color="red", linewidth=0.8, linestyle="--", label="10 ms")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[-1].set_xlabel("minutes")
    figure.suptitle(
        f"dicomfw soak: {summary['seconds']} s, {summary['good_ok']} good actions, "
        f"{summary['good_errors']} errors; RSS at rest {100 * summary['rss_growth']:+.1f} % "  # type: ignore[operator]
        f"after warm-up; lag p99 {summary['lag_p99_ms']:.1f} ms",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def replot(out: Path) -> None:
    """The plot of a run whose CSV and summary are in ``out``."""
    summary = json.loads((out / "summary.json").read_text())
    with (out / "soak.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    floats = {name for name, field in Sample.__dataclass_fields__.items() if field.type == "float"}
    samples = []
    for row in rows:
        values: dict[str, Any] = {k: float(v) if k in floats else int(v) for k, v in row.items()}
        samples.append(Sample(**values))
    plot_samples(out / "soak.png", samples, summary, summary["warmup_seconds"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dicomfw soak (see docs/soak.md)")
    parser.add_argument("--seconds", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=Path("soak"))
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, help="default: a tenth of the run, 20-300 s")
    parser.add_argument("--workers", type=int, default=3, help="concurrent clients")
    parser.add_argument("--reload-every", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="OUT",
        help="draw OUT/soak.png again from OUT's CSV and summary",
    )
    parser.add_argument("--workdir", type=Path, help="keep PKI, rules and logs here")
    parser.add_argument("--verbose", action="store_true", help="print each sample")
    parser.add_argument("--find-scp", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.find_scp is not None:
        return find_scp(args.find_scp)
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        # found out now, not after the hour the plot comes at the end of
        parser.error("matplotlib draws the plot: pip install -e '.[bench]', or pass --no-plot")
    if args.replot is not None:
        replot(args.replot)
        return 0
    if args.warmup is None:
        args.warmup = min(300.0, max(20.0, args.seconds / 10))
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        summary = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="dicomfw-soak-") as scratch:
            summary = run(args, Path(scratch))
    print(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
