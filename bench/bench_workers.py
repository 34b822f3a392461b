"""One worker process or two? 20 associations at once through `dicomfw run`, `workers: 1` vs 2.

Measures whether more than one worker pays off for TLS, to choose the default for
``workers``. Workloads, each with 20 clients started at once against one daemon:

  store      20 storescu processes, each 50 CT instances of 0.5 MB on one association
             (plain in, mutual TLS out to DCMTK's storescp +tls): aggregate MB/s
  assoc      20 lean clients, each 50 associations of one C-ECHO (plain in, mutual TLS out,
             so one upstream TLS handshake, resumed, per association): associations/s
  tls-assoc  the same with mutual TLS on the listener too (a TLS handshake on both sides)

stunnel doing the same plain-to-TLS upgrade runs next to them as a reference. Rounds are paired
and rotated; the medians are printed with the CPU seconds of all the proxy's processes, of the
20 clients together, and of storescp with the children it forks (one per association).

    python bench/bench_workers.py              # 3 rounds, ~3 minutes on 2 cores
    python bench/bench_workers.py --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fixtures
from fixtures import CALLED_AE, CALLING_AE, LOCALHOST, Pki
from procs import (
    DCMTK_ENV,
    BenchError,
    Service,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    reaped_children_cpu_seconds,
)
from report import Cpu

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
STORESCU, STORESCP, STUNNEL = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/stunnel4"
CLIENTS = 20
INSTANCES = 50  # per storescu association
ASSOCIATIONS = 50  # per lean client
WORKLOADS = ("store", "assoc", "tls-assoc")
TLS_LISTENER = """\
listeners:
  - name: modalities
    bind: {host}:{listen_port}
    tls: {{cert: {server_cert}, key: {server_key}, ca: {ca}}}
"""


@dataclass(frozen=True)
class Way:
    name: str
    service: Service
    tls_in: bool


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (a supervisor and its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return cpu_seconds(pid) + sum(cpu_seconds(int(child)) for child in children)


def _run_all(argvs: list[list[str]], timeout: float = 600) -> float:
    """Start every client at once; the wall time until the last has finished successfully."""
    start = time.perf_counter()
    clients = [
        subprocess.Popen(argv, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for argv in argvs
    ]
    failures = []
    for client in clients:
        _, err = client.communicate(timeout=timeout)
        if client.returncode != 0:
            failures.append(err.decode(errors="replace")[-400:])
    seconds = time.perf_counter() - start
    if failures:
        raise BenchError(f"{len(failures)} client(s) failed: {failures[0]}")
    return seconds


class Bench:
    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.workdir = workdir
        self.stack = stack
        self.pki: Pki = fixtures.make_pki(workdir / "pki")
        self.small = workdir / "small"
        self.store_file = fixtures.make_ct_files(self.small, INSTANCES, 512, 512)[0]

    def service(self, name: str, argv: list[str], port: int) -> Service:
        svc = Service(name, argv, port, self.workdir / f"{name}.log", DCMTK_ENV)
        self.stack.callback(svc.stop)
        return svc.start()

    def storescp(self) -> Service:
        port, out = free_port(), self.workdir / "storescp-out"
        out.mkdir(exist_ok=True)
        argv = [STORESCP, "--fork", "--ignore", "-od", str(out), "-ta", "30", "-ts", "120",
                "+tls", str(self.pki.scp_key), str(self.pki.scp_cert), "+cf", str(self.pki.ca),
                str(port)]  # fmt: skip
        return self.service("storescp", argv, port)

    def dicomfw(self, workers: int, upstream: int, tls_in: bool) -> Service:
        port = free_port()
        name = f"dicomfw-{workers}{'-tls' if tls_in else ''}"
        rules = fixtures.write_rules(self.workdir / f"{name}.yaml", port, upstream, self.pki)
        text = rules.read_text() + f"workers: {workers}\n"
        if tls_in:
            head = TLS_LISTENER.format(
                host=LOCALHOST,
                listen_port=port,
                server_cert=self.pki.scp_cert,
                server_key=self.pki.scp_key,
                ca=self.pki.ca,
            )
            text = head + text[text.index("upstreams:") :]
        rules.write_text(text)
        argv = [PYTHON, "-m", "dicomfw.cli", "run", "--config", str(rules)]
        return self.service(name, argv, port)

    def stunnel(self, upstream: int) -> Service:
        port = free_port()
        conf = fixtures.write_stunnel_conf(self.workdir / "stunnel.conf", port, upstream, self.pki)
        return self.service("stunnel", [STUNNEL, str(conf)], port)

    def store_argvs(self, way: Way) -> list[list[str]]:
        argv = [STORESCU, "-aet", CALLING_AE, "-aec", CALLED_AE, "-to", "10", "-ta", "30",
                "-td", "120", LOCALHOST, str(way.service.port), "+sd", str(self.small)]  # fmt: skip
        return [argv] * CLIENTS

    def lean_argvs(self, way: Way) -> list[list[str]]:
        argv = [PYTHON, str(BENCH / "lean_client.py"), "assoc", "--port", str(way.service.port),
                "--count", str(ASSOCIATIONS), "--op", "echo"]  # fmt: skip
        if way.tls_in:
            argv += ["--tls-ca", str(self.pki.ca), "--tls-cert", str(self.pki.client_cert)]
            argv += ["--tls-key", str(self.pki.client_key)]
        return [argv] * CLIENTS


def _check(way: Way, associations: int, requests: int) -> None:
    """dicomfw's log (all workers write to it) must show every association released and every
    request answered; the end of an association is logged a moment after the client exits."""
    if not way.name.startswith("workers"):
        return
    text, deadline = "", time.monotonic() + 5.0
    while True:
        text += way.service.new_log()
        ended = re.findall(r"event=association_ended .*how=released.*requests_answered=(\d+)", text)
        if len(ended) >= associations or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    answered = sum(map(int, ended))
    if len(ended) != associations or answered != requests:
        raise BenchError(
            f"{way.service.name}: expected {associations} released associations and {requests}"
            f" requests, the log shows {len(ended)} and {answered}"
        )


def _rotated(ways: list[Way], rnd: int) -> list[Way]:
    shift = rnd % len(ways)
    return ways[shift:] + ways[:shift]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), metavar="NAME"
    )
    args = parser.parse_args(argv)
    megabytes = 0.0
    results: dict[tuple[str, str], list[tuple[float, Cpu]]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            bench = Bench(Path(tmp), stack)
            megabytes = CLIENTS * INSTANCES * bench.store_file.stat().st_size / 1e6
            scp = bench.storescp()
            upstream = scp.port
            plain = [Way(f"workers {n}", bench.dicomfw(n, upstream, False), False) for n in (1, 2)]
            plain.append(Way("stunnel", bench.stunnel(upstream), False))
            tls = [Way(f"workers {n}", bench.dicomfw(n, upstream, True), True) for n in (1, 2)]
            workloads = [  # (name, ways, clients' argv, associations and requests per client)
                ("store", plain, bench.store_argvs, 1, INSTANCES),
                ("assoc", plain, bench.lean_argvs, ASSOCIATIONS, ASSOCIATIONS),
                ("tls-assoc", tls, bench.lean_argvs, ASSOCIATIONS, ASSOCIATIONS),
            ]
            for workload, ways, argvs, associations, requests in workloads:
                if workload not in args.workloads:
                    continue
                for way in ways:  # warm-up, untimed
                    _run_all([argvs(way)[0]])
                    _check(way, associations, requests)
                for rnd in range(args.rounds):
                    for way in _rotated(ways, rnd):
                        proxy_before = _tree_cpu(way.service.pid)
                        scp_before = children_cpu_seconds(scp.pid)
                        clients_before = reaped_children_cpu_seconds()
                        seconds = _run_all(argvs(way))
                        cpu = Cpu(
                            proxy=_tree_cpu(way.service.pid) - proxy_before,
                            client=reaped_children_cpu_seconds() - clients_before,
                            scp=children_cpu_seconds(scp.pid) - scp_before,
                        )
                        _check(way, CLIENTS * associations, CLIENTS * requests)
                        results.setdefault((workload, way.name), []).append((seconds, cpu))
    except BenchError as error:
        sys.stderr.write(f"bench_workers: {error}\n")
        return 1
    sys.stdout.write(
        "| workload | proxy | median s | rate | x stunnel | proxy CPU s | clients CPU s"
        " | SCP CPU s |\n"
    )
    sys.stdout.write("|---|---|---|---|---|---|---|---|\n")
    for (workload, name), runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        proxy, clients, scp_cpu = (
            statistics.median(cpu[part] or 0.0 for _, cpu in runs) for part in range(3)
        )
        # Rate relative to stunnel's in the same round (rounds are paired), median over rounds.
        stunnel = results.get((workload, "stunnel"))
        ratio = "-"
        if stunnel and name != "stunnel":
            paired = zip(runs, stunnel, strict=True)
            ratio = f"{statistics.median(t / s for (s, _), (t, _) in paired):.2f}"
        if workload == "store":
            rate = f"{megabytes / seconds:.0f} MB/s"
        else:
            rate = f"{CLIENTS * ASSOCIATIONS / seconds:.0f} assoc/s"
        sys.stdout.write(
            f"| {workload} | {name} | {seconds:.2f} | {rate} | {ratio} | {proxy:.2f}"
            f" | {clients:.2f} | {scp_cpu:.2f} |\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
