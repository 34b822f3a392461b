"""dicomfw relay benchmark: storescu -> storescp (+tls) direct, via dicomfw, via stunnel.

One command sets everything up in a temporary directory (PKI, CT test files, DCMTK's storescp
with and without TLS, dicomfw, stunnel), runs every workload in paired, rotating rounds, prints
the tables and writes ``docs/benchmarks.md`` plus the raw runs as JSON under ``bench/results/``.

    python bench/bench_relay.py            # full run (< 10 minutes on 2 cores)
    python bench/bench_relay.py --quick    # smoke run (< 1 minute), docs untouched

See bench/README.md for what each configuration and number means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import fixtures
import report
from fixtures import CALLED_AE, CALLING_AE, LOCALHOST, Pki
from procs import (
    DCMTK_ENV,
    BenchError,
    ForeignLoad,
    Service,
    busy_fraction,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    machine_info,
    reaped_children_cpu_seconds,
    rss_kb,
)
from procs import run_timed as run_client
from report import Cpu, Run

log = logging.getLogger("bench")

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PYTHON = sys.executable
#: dicomfw returns freed heap pages ~1-2 s after associations stop coming and going.
RELEASED_SETTLE_SECONDS = 3.0
STORESCU, STORESCP, STUNNEL = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/stunnel4"


@dataclass(frozen=True)
class Settings:
    rounds: int  # paired rounds for (a), (b), lean (c) and C-ECHO latency
    small_count: int  # (a): instances of ~0.5 MB (512 x 512 x 16 bit)
    large_count: int  # (b): instances of >= 50 MiB
    large_side: int  # (b): rows = columns
    per_assoc_count: int  # (c): associations, one instance each
    storescu_c_rounds: int  # (c) with one storescu process per instance is slow: fewer rounds
    echo_count: int  # C-ECHOs on one association
    hold_count: int  # associations held open at once


#: Share of the CPUs other processes may use before the run counts as disturbed.
IDLE_ENOUGH = 0.05

#: Which ways each workload runs (each round rotates the order).
BULK_WAYS = ("plain", "direct", "bare", "dicomfw", "stunnel")
LEAN_WAYS = ("plain", "direct", "bare", "dicomfw", "dicomfw-noresume", "stunnel")
HOLD_WAYS = ("bare", "dicomfw", "stunnel")

FULL = Settings(5, 1000, 10, 5120, 200, 3, 2000, 1000)
QUICK = Settings(1, 100, 2, 5120, 20, 1, 300, 100)


@dataclass(frozen=True)
class Way:
    """One way of reaching the SCP: who speaks TLS, and which proxy (if any) is measured."""

    name: str
    port: int
    tls: bool = False  # the client itself speaks TLS (direct)
    proxy: Service | None = None
    scp: Service | None = None  # the storescp it ends at (its CPU is measured too)


@dataclass
class Data:
    small_dir: Path
    small: list[Path]
    large_dir: Path
    large: list[Path]

    @staticmethod
    def size(paths: Sequence[Path]) -> int:
        return sum(p.stat().st_size for p in paths)


@dataclass
class Bench:
    settings: Settings
    workdir: Path
    stack: contextlib.ExitStack
    runs: list[Run] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    pki: Pki | None = None
    data: Data | None = None
    ways: dict[str, Way] = field(default_factory=dict)

    # ---- set-up ----------------------------------------------------------------------------

    def prepare(self) -> None:
        started = time.perf_counter()
        self.pki = fixtures.make_pki(self.workdir / "pki")
        s = self.settings
        small = fixtures.make_ct_files(self.workdir / "small", s.small_count, 512, 512)
        large = fixtures.make_ct_files(
            self.workdir / "large", s.large_count, s.large_side, s.large_side
        )
        self.data = Data(self.workdir / "small", small, self.workdir / "large", large)
        log.info(
            "event=data_ready small=%dx%d large=%dx%d seconds=%.1f",
            len(small), small[0].stat().st_size, len(large), large[0].stat().st_size,
            time.perf_counter() - started,
        )  # fmt: skip

    def service(self, name: str, argv: list[str], port: int, **env: str) -> Service:
        environment = {**DCMTK_ENV, **env}
        svc = Service(name, argv, port, self.workdir / f"{name}.log", environment)
        self.stack.callback(svc.stop)
        return svc.start()

    def storescp(self, name: str, tls: bool) -> Service:
        assert self.pki is not None
        port = free_port()
        out = self.workdir / f"{name}-out"
        out.mkdir(exist_ok=True)
        argv = [STORESCP, "--fork", "--ignore", "-od", str(out), "-ta", "30", "-ts", "120"]
        if tls:
            argv += ["+tls", str(self.pki.scp_key), str(self.pki.scp_cert), "+cf", str(self.pki.ca)]
        return self.service(name, [*argv, str(port)], port)

    def dicomfw(self, name: str, upstream_port: int, script: list[str] | None = None) -> Service:
        assert self.pki is not None
        port = free_port()
        rules = fixtures.write_rules(self.workdir / f"{name}.yaml", port, upstream_port, self.pki)
        launcher = script or ["-m", "dicomfw.cli"]
        return self.service(name, [PYTHON, *launcher, "run", "--config", str(rules)], port)

    def bare(self, name: str, upstream_port: int) -> Service:
        """The bare uvloop byte pump (bench/bare_relay.py) with dicomfw's TLS client context."""
        assert self.pki is not None
        port = free_port()
        argv = [PYTHON, str(BENCH / "bare_relay.py"), "--listen", str(port), "--upstream-port",
                str(upstream_port), "--ca", str(self.pki.ca), "--cert", str(self.pki.fw_cert),
                "--key", str(self.pki.fw_key)]  # fmt: skip
        return self.service(name, argv, port)

    def stunnel(self, name: str, upstream_port: int) -> Service:
        assert self.pki is not None
        port = free_port()
        conf = fixtures.write_stunnel_conf(
            self.workdir / f"{name}.conf", port, upstream_port, self.pki
        )
        return self.service(name, [STUNNEL, str(conf)], port)

    def start_ways(self) -> None:
        tls_scp = self.storescp("storescp-tls", tls=True)
        plain_scp = self.storescp("storescp-plain", tls=False)
        fw = self.dicomfw("dicomfw", tls_scp.port)
        noresume = self.dicomfw("dicomfw-noresume", tls_scp.port, [str(BENCH / "fw_noresume.py")])
        tunnel = self.stunnel("stunnel", tls_scp.port)
        bare = self.bare("bare", tls_scp.port)
        self.ways = {
            "bare": Way("bare", bare.port, proxy=bare, scp=tls_scp),
            "plain": Way("plain", plain_scp.port, scp=plain_scp),
            "direct": Way("direct", tls_scp.port, tls=True, scp=tls_scp),
            "dicomfw": Way("dicomfw", fw.port, proxy=fw, scp=tls_scp),
            "dicomfw-noresume": Way("dicomfw-noresume", noresume.port, proxy=noresume, scp=tls_scp),
            "stunnel": Way("stunnel", tunnel.port, proxy=tunnel, scp=tls_scp),
        }

    # ---- running one client ----------------------------------------------------------------

    def storescu_argv(self, way: Way, inputs: list[str]) -> list[str]:
        assert self.pki is not None
        argv = [STORESCU, "-aet", CALLING_AE, "-aec", CALLED_AE, "-to", "10", "-ta", "30"]
        argv += ["-td", "120"]
        if way.tls:
            argv += ["+tls", str(self.pki.client_key), str(self.pki.client_cert)]
            argv += ["+cf", str(self.pki.ca)]
        return [*argv, LOCALHOST, str(way.port), *inputs]

    def lean_argv(self, way: Way, mode: str, *options: str) -> list[str]:
        assert self.pki is not None
        argv = [PYTHON, str(BENCH / "lean_client.py"), mode, "--port", str(way.port), *options]
        if way.tls:
            argv += ["--tls-ca", str(self.pki.ca), "--tls-cert", str(self.pki.client_cert)]
            argv += ["--tls-key", str(self.pki.client_key)]
        return argv

    def lean(self, way: Way, mode: str, *options: str, timeout: float = 300) -> dict[str, Any]:
        argv = self.lean_argv(way, mode, *options)
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as error:
            raise BenchError(f"lean client {mode} via {way.name} timed out") from error
        if done.returncode != 0:
            raise BenchError(f"lean client {mode} via {way.name}: {done.stderr.decode()[-800:]}")
        result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        return result

    def measure(self, way: Way, action: Callable[[], float]) -> tuple[float, Cpu]:
        """Run ``action`` (returns seconds); also return the CPU seconds each process used
        meanwhile: the client(s), the proxy and the SCP with its forked children."""
        proxy, scp = way.proxy, way.scp
        if proxy is not None:
            proxy.new_log()
        proxy_before = cpu_seconds(proxy.pid) if proxy else 0.0
        scp_before = children_cpu_seconds(scp.pid) if scp else 0.0
        client_before = reaped_children_cpu_seconds()
        seconds = action()
        return seconds, Cpu(
            proxy=cpu_seconds(proxy.pid) - proxy_before if proxy else None,
            client=reaped_children_cpu_seconds() - client_before,
            scp=children_cpu_seconds(scp.pid) - scp_before if scp else None,
        )

    def check_firewall(self, way: Way, associations: int, requests: int | None) -> dict[str, int]:
        """The dicomfw log must show every association released (and every request answered).

        dicomfw logs an association's end when the client's close reaches it, which can be a
        moment after the client exited: wait for the lines (bounded).
        """
        if way.proxy is None or not way.name.startswith("dicomfw"):
            return {}
        text, deadline = "", time.monotonic() + 5.0
        while True:
            text += way.proxy.new_log()
            ended = re.findall(
                r"event=association_ended .*how=(\w+).*requests_answered=(\d+)", text
            )
            released = sum(1 for how, _ in ended if how == "released")
            answered = sum(int(n) for _, n in ended)
            if released >= associations or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if released != associations or (requests is not None and answered != requests):
            raise BenchError(
                f"{way.name}: expected {associations} released associations and {requests}"
                f" requests, log shows {released} and {answered}: see {way.proxy.log_path}"
            )
        return {
            "tls_handshakes": len(re.findall(r"event=association_accepted", text)),
            "tls_resumed": len(re.findall(r"tls_resumed_upstream=True", text)),
        }

    # ---- workloads -------------------------------------------------------------------------

    def rotation(self, names: Sequence[str], rnd: int) -> list[Way]:
        """The ways of round ``rnd``, rotated so no way always runs first or last."""
        order = [self.ways[n] for n in names]
        shift = rnd % len(order)
        return order[shift:] + order[:shift]

    def bulk(self, workload: str, directory: Path, files: list[Path], rounds: int) -> None:
        """(a)/(b): one storescu process, every file on one association."""
        payload = Data.size(files)
        for rnd in range(rounds):
            for way in self.rotation(BULK_WAYS, rnd):
                argv = self.storescu_argv(way, ["+sd", str(directory)])
                seconds, cpu = self.measure(way, partial(run_client, argv, 600, DCMTK_ENV))
                self.check_firewall(way, 1, len(files))
                self.record(Run(workload, way.name, rnd, seconds, len(files), payload, 0, *cpu))

    def per_association_storescu(self, files: list[Path], rounds: int) -> None:
        """(c) with DCMTK: one storescu process (and association) per instance."""
        payload = Data.size(files)

        def loop(way: Way) -> float:
            start = time.perf_counter()
            for path in files:
                run_client(self.storescu_argv(way, [str(path)]), 60, DCMTK_ENV)
            return time.perf_counter() - start

        for rnd in range(rounds):
            for way in self.rotation(BULK_WAYS, rnd):
                seconds, cpu = self.measure(way, partial(loop, way))
                extra = self.check_firewall(way, len(files), len(files))
                n = len(files)
                self.record(Run("c", way.name, rnd, seconds, n, payload, n, *cpu, extra=extra))

    def per_association_lean(self, workload: str, op: str, rounds: int) -> None:
        """(c) with the lean client: COUNT associations, one C-STORE (or C-ECHO) each."""
        assert self.data is not None
        count = self.settings.per_assoc_count
        store = self.data.small[0]
        options = ["--count", str(count), "--op", op, "--file", str(store)]
        payload = store.stat().st_size * count if op == "store" else 0
        for rnd in range(rounds):
            for way in self.rotation(LEAN_WAYS, rnd):
                result: dict[str, Any] = {}

                def action(w: Way = way, out: dict[str, Any] = result) -> float:
                    out.update(self.lean(w, "assoc", *options))
                    return float(out["seconds"])

                seconds, cpu = self.measure(way, action)
                extra = self.check_firewall(way, count, count)
                if way.tls:
                    extra = {k: result[k] for k in ("tls_handshakes", "tls_resumed")}
                instances = count if op == "store" else 0
                run = Run(
                    workload, way.name, rnd, seconds, instances, payload, count, *cpu, extra=extra
                )
                self.record(run)

    def echo_latency(self, rounds: int) -> None:
        count = str(self.settings.echo_count)
        for rnd in range(rounds):
            for way in self.rotation(BULK_WAYS, rnd):
                result = self.lean(way, "echo", "--count", count)
                self.check_firewall(way, 1, self.settings.echo_count + 100)
                keys = ("p50_us", "p99_us", "mean_us", "min_us")
                extra = {k: result[k] for k in keys}
                self.record(Run("echo", way.name, rnd, result["p50_us"] / 1e6, extra=extra))

    def hold(self) -> None:
        """N associations open at once through a fresh proxy in front of the tiny SCP."""
        assert self.pki is not None
        port = free_port()
        pki = self.pki
        argv = [PYTHON, str(BENCH / "tiny_scp.py"), "--port", str(port), "--cert",
                str(pki.scp_cert), "--key", str(pki.scp_key), "--ca", str(pki.ca)]  # fmt: skip
        self.service("tiny-scp", argv, port)
        starters = {"bare": self.bare, "dicomfw": self.dicomfw, "stunnel": self.stunnel}
        for name in HOLD_WAYS:
            proxy = starters[name](f"{name}-hold", port)
            try:
                self.hold_through(Way(name, proxy.port, proxy=proxy))
            finally:
                proxy.stop()

    def hold_through(self, way: Way) -> None:
        assert way.proxy is not None
        count = self.settings.hold_count
        self.lean(way, "assoc", "--count", "20", "--op", "none")  # warm-up
        time.sleep(0.5)
        before = rss_kb(way.proxy.pid)
        argv = self.lean_argv(way, "hold", "--count", str(count), "--hold-seconds", "120")
        with subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as client:
            try:
                held = _read_json_line(client, timeout=180)
                time.sleep(1.0)
                during = rss_kb(way.proxy.pid)
                assert client.stdin is not None
                client.stdin.write(b"go\n")
                client.stdin.flush()
                _, err = client.communicate(timeout=180)
            finally:
                if client.poll() is None:
                    client.kill()
        if client.returncode != 0:
            raise BenchError(f"hold via {way.name}: {err.decode()[-800:]}")
        time.sleep(RELEASED_SETTLE_SECONDS)  # what stays resident once they are all gone
        extra = {
            "held": held["held"],
            "rss_before_kb": before,
            "rss_held_kb": during,
            "kb_per_assoc": (during - before) / held["held"],
            "rss_released_kb": rss_kb(way.proxy.pid),
        }
        self.record(Run("hold", way.name, 0, held["seconds"], associations=count, extra=extra))

    def record(self, run: Run) -> None:
        self.runs.append(run)
        cpu = "" if run.proxy_cpu is None else f" proxy_cpu={run.proxy_cpu:.2f}"
        log.info(
            "event=run workload=%s way=%s round=%d seconds=%.3f%s",
            run.workload, run.way, run.round, run.seconds, cpu,
        )  # fmt: skip

    # ---- the whole benchmark ---------------------------------------------------------------

    def run_all(self) -> None:
        assert self.data is not None
        s, data = self.settings, self.data
        self.start_ways()
        self.warm_up()
        self.bulk("a", data.small_dir, data.small, s.rounds)
        self.bulk("b", data.large_dir, data.large, s.rounds)
        self.per_association_storescu(data.small[: s.per_assoc_count], s.storescu_c_rounds)
        self.per_association_lean("c-lean", "store", s.rounds)
        self.per_association_lean("c-lean-echo", "echo", s.rounds)
        self.echo_latency(s.rounds)
        fw = self.ways["dicomfw"].proxy
        assert fw is not None
        self.notes["dicomfw_peak_rss_kb"] = _status_field(fw.pid, "VmHWM")
        self.hold()

    def warm_up(self) -> None:
        """One untimed association per way, so first-use costs stay out of the numbers."""
        assert self.data is not None
        for way in self.ways.values():
            run_client(self.storescu_argv(way, [str(self.data.small[0])]), 60, DCMTK_ENV)
            self.lean(way, "assoc", "--count", "5", "--op", "echo")
            if way.proxy is not None:
                way.proxy.new_log()


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def _read_json_line(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise BenchError(f"no answer from the client within {timeout}s")
    line = process.stdout.readline()
    if not line:
        error = process.stderr.read() if process.stderr is not None else b""
        raise BenchError("the client exited early: " + error.decode(errors="replace"))
    result: dict[str, Any] = json.loads(line)
    return result


# ---- output ------------------------------------------------------------------------------------


@dataclass
class Results:
    """Everything the tables and docs are made from; saved as JSON and loadable again."""

    runs: list[Run]
    settings: Settings
    machine: dict[str, str]
    notes: dict[str, Any]
    commit: str
    date: str

    @staticmethod
    def load(path: Path) -> Results:
        data = json.loads(path.read_text())
        return Results(
            runs=[Run(**run) for run in data["runs"]],
            settings=Settings(**data["settings"]),
            machine=data["machine"],
            notes=data.get("notes", {}),
            commit=data.get("commit", "unknown"),
            date=data.get("date", "unknown"),
        )

    def payload(self) -> dict[str, Any]:
        rows = report.summarize(self.runs)
        data = report.as_json(self.runs, rows, report.evaluate_goals(rows, self.runs))
        data.update(
            machine=self.machine,
            settings=asdict(self.settings),
            notes=self.notes,
            commit=self.commit,
            date=self.date,
        )
        return data


def render(results: Results) -> str:
    rows = report.summarize(results.runs)
    goals = report.evaluate_goals(rows, results.runs)
    s = results.settings
    parts = [
        "## Performance goals\n\n" + report.goals_table(goals),
        "## Throughput and association set-up\n\n"
        + report.throughput_table(rows, ["a", "b", "c", "c-lean", "c-lean-echo"]),
        "## CPU of each process\n\n" + report.cpu_table(rows, ["a", "b"]),
        f"## C-ECHO round trip ({s.echo_count} on one association, lean client)\n\n"
        + report.latency_table(rows, results.runs),
        f"## Memory: {s.hold_count} idle associations held open at once\n\n"
        + report.memory_table(rows),
    ]
    peak = results.notes.get("dicomfw_peak_rss_kb")
    if peak:
        parts.append(f"dicomfw peak RSS over (a)-(c) and the latency runs: {peak / 1024:.0f} MB\n")
    return "\n".join(parts)


def write_outputs(results: Results, args: argparse.Namespace, save: bool = True) -> None:
    tables = render(results)
    sys.stdout.write("\n" + report.machine_table(results.machine) + "\n" + tables)
    if save:
        args.results.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = args.results / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
        out.write_text(json.dumps(results.payload(), indent=1, default=str))
        sys.stdout.write(f"\nraw runs: {out}\n")
    if args.docs is not None:
        from docs_template import document

        text = document(tables, results.machine, results.settings, results.date, results.commit)
        args.docs.write_text(text)
        sys.stdout.write(f"wrote {args.docs}\n")


def _commit() -> str:
    """The checked-out commit, marked +dirty when dicomfw/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            timeout=10,
            check=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "dicomfw"],
            capture_output=True,
            timeout=10,
            check=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# ---- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 1 minute)")
    parser.add_argument("--rounds", type=int, help="override the number of paired rounds")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="markdown to write (default: docs/benchmarks.md on a full run, none with --quick)",
    )
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="RESULTS",
        help="run nothing: print the tables (and write --docs) from a saved bench/results file",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for other load on the machine to stop before starting",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else FULL
    if args.rounds:
        settings = Settings(**{**asdict(settings), "rounds": args.rounds})
    return settings


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStack: every service is stopped


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    temp = Path(tempfile.mkdtemp(prefix="dicomfw-bench-"))
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _wait_idle(limit: float) -> float:
    """Sample how busy other processes keep the machine; wait up to ``limit`` s for quiet."""
    deadline = time.monotonic() + limit
    busy = busy_fraction()
    while busy > IDLE_ENOUGH and time.monotonic() < deadline:
        log.info("event=waiting_for_idle busy=%.0f%%", 100 * busy)
        busy = busy_fraction(2.0)
    if busy > IDLE_ENOUGH:
        log.warning("event=machine_busy busy=%.0f%% timings will be disturbed", 100 * busy)
    return busy


def _describe_load(fraction: float) -> str:
    text = f"{100 * fraction:.0f}% of the CPUs"
    if fraction > IDLE_ENOUGH:
        log.warning("event=machine_busy_during_run other_load=%.0f%%", 100 * fraction)
        text += " (other processes ran meanwhile: wall-clock numbers are disturbed)"
    return text


def _check_tools() -> None:
    for tool in (STORESCU, STORESCP, STUNNEL):
        if not Path(tool).exists():
            raise BenchError(f"{tool} is missing (apt-get install dcmtk stunnel4)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.docs is None and not args.quick:
        args.docs = REPO / "docs" / "benchmarks.md"
    if args.no_docs:
        args.docs = None
    if args.from_json is not None:
        write_outputs(Results.load(args.from_json), args, save=False)
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    try:
        _check_tools()
        machine = machine_info()
        machine["other load before"] = f"{100 * _wait_idle(args.wait_idle):.0f}% of the CPUs"
        load = ForeignLoad()
        with _workdir(args.workdir) as workdir, contextlib.ExitStack() as stack:
            bench = Bench(_settings(args), workdir, stack)
            bench.prepare()
            bench.run_all()
    except BenchError as error:
        log.error("event=bench_failed error=%s", error)
        return 1
    machine["other load during"] = _describe_load(load.fraction())
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = Results(bench.runs, bench.settings, machine, bench.notes, _commit(), date)
    write_outputs(results, args)
    log.info("event=done seconds=%.0f", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
