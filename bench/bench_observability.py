"""What metrics and audit cost the relay, measured three ways on the same workloads.

(0) Per event, in a tight loop: the observers' cost per request and per association.
(1) In one process, one relay on its own event-loop thread: the thread's CPU with the log
    observer only and with metrics + audit (JSON file and ATNA over UDP) added, alternating
    round by round, plus the CPU of the audit writer threads.
(2) End to end: two ``dicomfw run`` daemons, without and with metrics + audit, in paired
    rounds whose order alternates: min and median wall time and daemon CPU.

(1) and (2) move by several percent between identical runs on a machine others use (the
same configuration twice differs by up to 9 %): read them together with (0).
Both relay plain DICOM to a DCMTK ``storescp +tls`` (mutual TLS upstream, as in bench_relay.py).

    python bench/bench_observability.py              # 5 rounds (about 3 minutes)
    python bench/bench_observability.py --rounds 2 --associations 50 --instances 100 --large 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import fixtures
from fixtures import CALLED_AE, CALLING_AE, LOCALHOST
from procs import (
    DCMTK_ENV,
    Service,
    free_port,
    paired_rounds,
    run_timed,
    service_starter,
    thread_cpu_seconds,
)

from dicomfw.config.load import load_config
from dicomfw.core.session import (
    TALLY_ROUND_TRIPS,
    AssociationAccepted,
    AssociationEnded,
    RequestTally,
)
from dicomfw.observe.eventlog import log_observer
from dicomfw.observe.observability import Observability
from dicomfw.relay.server import AssociationInfo, Observer, Relay, build_runtime

log = logging.getLogger("bench")
BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
STORESCU = "/usr/bin/storescu"
Workload = Callable[[int], float]  # runs against a port, returns wall seconds


def observability_sections(directory: Path, atna_port: int) -> str:
    return (
        f'metrics: {{bind: "{LOCALHOST}:{free_port()}"}}\n'
        f"audit:\n  file: {directory / 'audit.jsonl'}\n"
        f"  atna: {{host: {LOCALHOST}, port: {atna_port}, transport: udp}}\n"
    )


def _thread_cpu(native_id: int | None) -> float:
    assert native_id is not None
    return thread_cpu_seconds(os.getpid(), native_id)


@contextlib.contextmanager
def in_process_relay(rules: Path) -> Iterator[tuple[Relay, list[Observer]]]:
    """A relay on its own uvloop thread ("relay"), plus the observers ``rules`` asks for."""
    import uvloop

    runtime = build_runtime(load_config(rules))
    observability = Observability(runtime.config)
    loop = uvloop.new_event_loop()
    relay = Relay(runtime, [log_observer])
    loop.run_until_complete(relay.start())
    thread = threading.Thread(target=loop.run_forever, name="relay", daemon=True)
    thread.start()
    try:
        yield relay, observability.observers
    finally:
        asyncio.run_coroutine_threadsafe(relay.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        observability.close()


def attribution(rules: Path, workloads: dict[str, Workload], rounds: int) -> list[str]:
    """One process, one relay: its thread's CPU with the log observer only ("off") and with
    metrics + audit added ("on"), alternating, plus the audit writer threads' CPU."""
    rows = [
        "| workload | relay thread off | relay thread on | audit writers on | overhead |",
        "|---|---:|---:|---:|---:|",
    ]
    with in_process_relay(rules) as (relay, observers):
        port = relay.bound_ports()["modalities"]
        base = list(relay.observers)
        relay_thread = next(t for t in threading.enumerate() if t.name == "relay")
        writers = [t for t in threading.enumerate() if t.name.startswith("audit-")]
        for name, run in workloads.items():
            relay.observers = base + observers
            run(port)  # warm up
            samples: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
            for round_number in range(rounds):
                for which in ("off", "on") if round_number % 2 == 0 else ("on", "off"):
                    relay.observers = base + (observers if which == "on" else [])
                    relay_before = _thread_cpu(relay_thread.native_id)
                    writers_before = sum(_thread_cpu(t.native_id) for t in writers)
                    run(port)
                    time.sleep(0.15)  # the writers' last batch
                    samples[which].append(
                        (
                            _thread_cpu(relay_thread.native_id) - relay_before,
                            sum(_thread_cpu(t.native_id) for t in writers) - writers_before,
                        )
                    )
            off, on = (statistics.median(r for r, _ in samples[w]) for w in ("off", "on"))
            writers_off, writers_on = (
                statistics.median(c for _, c in samples[w]) for w in ("off", "on")
            )
            overhead = (on + writers_on) / (off + writers_off) - 1
            rows.append(
                f"| {name} | {off:.3f} s | {on:.3f} s | {writers_on * 1e3:.1f} ms "
                f"| {100 * overhead:+.1f} % |"
            )
    return rows


def end_to_end(
    daemons: dict[str, Service], workloads: dict[str, Workload], rounds: int
) -> list[str]:
    rows = [
        "| workload | wall off (min / median) | wall on | CPU off (min / median) | CPU on "
        "| on vs off (median wall / CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, run in workloads.items():
        results = paired_rounds(daemons, run, rounds)
        cells, ratios = [], []
        for index in (0, 1):  # wall, CPU
            medians = {}
            for which in ("off", "on"):
                values = [r[index] for r in results[which]]
                medians[which] = statistics.median(values)
                cells.append(f"{min(values):.3f} / {medians[which]:.3f} s")
            ratios.append(f"{100 * (medians['on'] / medians['off'] - 1):+.1f} %")
        rows.append(f"| {name} | " + " | ".join(cells) + " | " + " / ".join(ratios) + " |")
    return rows


def per_event(rules: Path, count: int = 20_000) -> list[str]:
    """What the observers cost on the event loop per request and per association, in a tight
    loop of synthetic events (deterministic, unlike the timings above)."""
    config = load_config(rules)
    observability = Observability(config)
    observers = observability.observers
    uid = "1.2.840.10008.5.1.4.1.1.2"
    address = ipaddress.ip_address(LOCALHOST)
    accepted = AssociationAccepted("modalities/PACS", CALLING_AE, CALLED_AE, 2, ())
    info = AssociationInfo("modalities", address, 4242, calling_ae=CALLING_AE)
    info.route = "modalities/PACS"
    for observer in observers:
        observer(info, accepted)
    tally = RequestTally()
    counts = tally.of("C-STORE", uid)
    counts.forwarded = counts.success = TALLY_ROUND_TRIPS
    tally.round_trips = [("C-STORE", 0.004)] * TALLY_ROUND_TRIPS
    started = time.thread_time()
    for _ in range(count // 100):
        for observer in observers:
            observer(info, tally)
    per_request = (time.thread_time() - started) / (count // 100) / TALLY_ROUND_TRIPS
    started = time.thread_time()
    for _ in range(count // 10):
        one = AssociationInfo("modalities", address, 4242, calling_ae=CALLING_AE)
        one.route = "modalities/PACS"
        for event in (accepted, AssociationEnded("released", "released")):
            for observer in observers:
                observer(one, event)
    per_association = (time.thread_time() - started) / (count // 10)
    observability.close()
    return [
        f"metrics + audit on the event loop: {per_request * 1e6:.2f} µs per request (a "
        f"RequestTally of {TALLY_ROUND_TRIPS}), {per_association * 1e6:.1f} µs per association "
        "(accepted + ended, record built and queued)"
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--associations", type=int, default=200)
    parser.add_argument("--instances", type=int, default=1000, help="0.5 MB C-STOREs in (a)")
    parser.add_argument("--large", type=int, default=10, help="52 MB C-STOREs in (b)")
    parser.add_argument("--echoes", type=int, default=2000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    with (
        tempfile.TemporaryDirectory(prefix="dicomfw-obs-bench-") as temp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(temp)
        pki = fixtures.make_pki(work / "pki")
        files = fixtures.make_ct_files(work / "small", args.instances, 512, 512)
        fixtures.make_ct_files(work / "large", args.large, 5120, 5120)
        collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # an ATNA collector that
        collector.bind((LOCALHOST, 0))  # never reads: the kernel drops what does not fit
        stack.callback(collector.close)

        service = service_starter(stack, work)

        scp_port = fixtures.start_tls_storescp(service, work, pki).port
        rules: dict[str, Path] = {}
        for which in ("off", "on"):
            rules[which] = fixtures.write_rules(work / f"{which}.yaml", 0, scp_port, pki)
        with rules["on"].open("a") as handle:
            handle.write(observability_sections(work, collector.getsockname()[1]))

        def lean(port: int, *options: str) -> float:
            """Seconds the lean client took (for echo mode: mean round trip x count)."""
            command = [PYTHON, str(BENCH / "lean_client.py"), *options, "--port", str(port)]
            done = subprocess.run(command, capture_output=True, timeout=600, check=True)
            result = json.loads(done.stdout.decode().splitlines()[-1])
            if "seconds" in result:
                return float(result["seconds"])
            return float(result["mean_us"]) * int(result["count"]) / 1e6

        def storescu(port: int, directory: str = "small") -> float:
            command = [STORESCU, "-aet", CALLING_AE, "-aec", CALLED_AE, LOCALHOST, str(port)]
            return run_timed([*command, "+sd", str(work / directory)], 600, DCMTK_ENV)

        count, first = str(args.associations), str(files[0])
        workloads: dict[str, Workload] = {
            f"(c) {count} associations x 1 C-ECHO": lambda p: lean(
                p, "assoc", "--count", count, "--op", "echo"
            ),
            f"(c) {count} associations x 1 C-STORE 0.5 MB": lambda p: lean(
                p, "assoc", "--count", count, "--op", "store", "--file", first
            ),
            f"(a) {args.instances} x 0.5 MB C-STORE, one association": storescu,
            f"(b) {args.large} x 52 MB C-STORE, one association": lambda p: storescu(p, "large"),
            f"{args.echoes} C-ECHOs on one association": lambda p: lean(
                p, "echo", "--count", str(args.echoes)
            ),
        }
        out = ["(0) per event:", "", *per_event(rules["on"]), ""]
        out += [
            "(1) in one process, relay thread CPU without and with metrics + audit (medians):",
            "",
        ]
        out += attribution(rules["on"], workloads, args.rounds)
        daemons = {}
        for which, path in rules.items():
            port = free_port()
            path.write_text(path.read_text().replace(f"{LOCALHOST}:0", f"{LOCALHOST}:{port}"))
            command = [PYTHON, "-m", "dicomfw.cli", "run", "--config", str(path)]
            daemons[which] = service(f"dicomfw-{which}", command, port)
        out += ["", "(2) end to end, daemons without (off) and with (on) metrics + audit:", ""]
        out += end_to_end(daemons, workloads, args.rounds)
        sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
