"""Scaling out: what limits shared in Redis cost per association, and what two instances behind
HAProxy deliver next to one.

(1) One-image associations (A-ASSOCIATE, one 0.5 MB C-STORE, release; the lean client, one at a
    time) through `dicomfw run` with every limit configured (none reached), kept in Redis vs
    kept locally: paired rounds in rotating order; the median associations/s, the median of
    each run's p50 time per association, and the paired differences. Goals: at most 0.5 ms
    more at p50, at most 10 % fewer associations/s. Two sets of limits: "site" has the
    association rates and caps per address and per peer and per-peer rates for C-FIND and
    C-MOVE (a C-STORE does not wait for the store); "site + C-STORE rate" adds a per-peer
    C-STORE rate, so each image also waits for the store's answer.
(2) The same associations from several clients at once (to `storescp --fork`), aggregate
    associations/s: one instance direct, one instance behind HAProxy, two instances behind
    HAProxy (the repository's deploy/haproxy/haproxy.cfg with loopback addresses), every
    instance with the "site" limits in Redis; and one instance direct with them kept locally,
    where Redis's round trips overlap other associations' work instead of adding to each
    association's time. Paired rounds, medians.

Plain in, plain out (DCMTK's storescp --ignore), so the firewall's own work is not hidden
behind TLS handshakes. Needs /usr/bin/storescp (dcmtk), redis-server and /usr/sbin/haproxy.

    python bench/bench_scale.py                 # 7 rounds of (1), 5 of (2): ~3 minutes
    python bench/bench_scale.py --rounds 3 --parallel-rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fixtures import make_ct_files
from procs import Service, cpu_seconds, free_port, live_threads_cpu_seconds, service_starter

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PYTHON = sys.executable
STORESCP = "/usr/bin/storescp"
HAPROXY = "/usr/sbin/haproxy"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"

RULES = """\
instance: {name}
listeners:
  - {{name: modalities, bind: "127.0.0.1:{port}"{proxy}}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {upstream}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8]}}
routes:
  - listener: modalities
    called_ae: PACS
    upstream: pacs
    allow: [{{services: [C-ECHO, C-STORE]}}]
limits:
  artim_seconds: 30
  associations_per_minute_per_ip: 1000000
  associations_per_minute_per_peer: 1000000
  max_concurrent_per_ip: 1000
  max_concurrent_per_peer: 1000
  max_concurrent_total: 10000
  requests_per_minute_per_peer: {{C-FIND: 1000000, C-MOVE: 1000000{store_rate}}}
{store}"""
STORE = "  store: redis\n  redis: {{url: 'redis://127.0.0.1:{port}/0'}}\n"
STORE_RATE = ", C-STORE: 1000000"
PROXIED = ", proxy_protocol: true, proxy_from: [127.0.0.1/32]"
LIMIT_SETS = {"site": "", "site + C-STORE rate": STORE_RATE}


@dataclass
class Way:
    """One daemon of (1) and what its runs measured."""

    daemon: Service
    runs: list[dict[str, float]] = field(default_factory=list)
    cpu: float = 0.0  # the daemon's, over all runs
    store_cpu: float = 0.0  # redis-server's during its runs


def lean_client(port: int, count: int, image: Path) -> dict[str, float]:
    """One client's run: ``count`` one-image associations, one after the other."""
    done = subprocess.run(
        [PYTHON, str(BENCH / "lean_client.py"), "assoc", "--port", str(port), "--count",
         str(count), "--op", "store", "--file", str(image)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(done.stdout)
    return result


def parallel_clients(port: int, clients: int, count: int, image: Path) -> float:
    """Aggregate associations/s of ``clients`` clients running at once, ``count`` each: they
    start together once all have started up, and the slowest one's time counts."""
    argv = [PYTHON, str(BENCH / "lean_client.py"), "assoc", "--port", str(port), "--count",
            str(count), "--op", "store", "--file", str(image), "--start-at",
            str(time.time() + 2.0)]  # fmt: skip
    running = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    seconds = []
    for process in running:
        out, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"a client failed: exit {process.returncode}")
        seconds.append(json.loads(out)["seconds"])
    return clients * count / max(seconds)


def haproxy_config(path: Path, port: int, servers: Sequence[int]) -> Path:
    """The shipped example with loopback addresses and no health check (nothing drains here)
    nor a log line per connection."""
    text = (REPO / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    text = text.replace("bind :104", f"bind 127.0.0.1:{port}").replace("    log global\n", "")
    text = re.sub(r"(?m)^    (option httpchk|http-check|default-server|server) .*\n", "", text)
    lines = [f"    server fw{n} 127.0.0.1:{p} send-proxy-v2\n" for n, p in enumerate(servers)]
    path.write_text(text + "".join(lines))
    return path


def paired(rounds: int, ways: Sequence[str], run: Callable[[str], None]) -> None:
    """Run every way once per round, the order rotated round by round."""
    for number in range(rounds):
        shift = number % len(ways)
        for way in [*ways[shift:], *ways[:shift]]:
            run(way)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="paired rounds of (1)")
    parser.add_argument("--count", type=int, default=200, help="associations per run of (1)")
    parser.add_argument("--parallel-rounds", type=int, default=5, help="paired rounds of (2)")
    parser.add_argument("--clients", type=int, default=4, help="clients at once in (2)")
    parser.add_argument("--parallel-count", type=int, default=100, help="per client in (2)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-")))

        service = service_starter(stack, work)

        def dicomfw(
            name: str, shared: bool, rate: str = "", proxied: bool = False, pacs: int = 0
        ) -> Service:
            port = free_port()
            rules = work / f"{name}.yaml"
            store = STORE.format(port=redis.port) if shared else ""
            proxy = PROXIED if proxied else ""
            rules.write_text(
                RULES.format(
                    name=name, port=port, proxy=proxy, upstream=pacs or scp.port,
                    store_rate=rate, store=store,
                )
            )  # fmt: skip
            argv = [PYTHON, "-m", "dicomfw.cli", "run", "--config", str(rules), "--log-level",
                    "warning"]  # fmt: skip
            return service(name, argv, port)

        [image] = make_ct_files(work / "ct", 1, 512, 512)
        redis_port, scp_port = free_port(), free_port()
        redis_argv = [REDIS, "--port", str(redis_port), "--save", "", "--appendonly", "no",
                      "--dir", str(work)]  # fmt: skip
        redis = service("redis", redis_argv, redis_port)
        scp = service("storescp", [STORESCP, "--ignore", "-ta", "30", str(scp_port)], scp_port)

        # (1) Redis store vs local limits, one association at a time
        ways = {
            (limits, where): Way(dicomfw(f"{where}{n}", where == "redis", rate))
            for n, (limits, rate) in enumerate(LIMIT_SETS.items())
            for where in ("local", "redis")
        }
        for way in ways.values():
            lean_client(way.daemon.port, 50, image)  # warm-up: imports, caches, TCP, scripts

        def one_run(key: str) -> None:
            way = next(w for k, w in ways.items() if " / ".join(k) == key)
            cpu, store_cpu = live_threads_cpu_seconds(way.daemon.pid), cpu_seconds(redis.pid)
            way.runs.append(lean_client(way.daemon.port, args.count, image))
            way.cpu += live_threads_cpu_seconds(way.daemon.pid) - cpu
            way.store_cpu += cpu_seconds(redis.pid) - store_cpu

        paired(args.rounds, [" / ".join(key) for key in ways], one_run)
        sys.stdout.write(_store_table(ways, args.rounds, args.count))

        # (2) aggregate: one instance direct, one and two behind HAProxy, in front of a
        # storescp that takes associations at once (a process each)
        fork_port = free_port()
        fork = service("storescp-fork", [STORESCP, "--fork", "--ignore", str(fork_port)], fork_port)
        behind = [dicomfw(f"behind{n}", True, proxied=True, pacs=fork.port) for n in (1, 2)]
        targets = {
            "1 instance, direct, limits kept locally": dicomfw("local", False, pacs=fork.port).port,
            "1 instance, direct": dicomfw("direct", True, pacs=fork.port).port,
        }
        for count in (1, 2):
            port = free_port()
            servers = [b.port for b in behind[:count]]
            config = haproxy_config(work / f"haproxy{count}.cfg", port, servers)
            haproxy = service(f"haproxy{count}", [HAPROXY, "-f", str(config), "-db"], port)
            targets[f"{count} instance{'s' if count > 1 else ''} behind HAProxy"] = haproxy.port
        for port in targets.values():
            parallel_clients(port, args.clients, 10, image)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in targets}
        paired(
            args.parallel_rounds,
            list(targets),
            lambda way: rates[way].append(
                parallel_clients(targets[way], args.clients, args.parallel_count, image)
            ),
        )
        sys.stdout.write(_aggregate_table(rates, args))
    return 0


def _store_table(ways: dict[tuple[str, str], Way], rounds: int, count: int) -> str:
    lines = [
        f"\n(1) {count} one-image associations (0.5 MB C-STORE), one at a time; median of "
        f"{rounds} paired rounds",
        "| limits | kept | associations/s | p50 per association | dicomfw CPU per association "
        "| redis-server CPU per association |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for limits in LIMIT_SETS:
        local, redis = ways[limits, "local"], ways[limits, "redis"]
        for where, way in (("locally", local), ("in Redis", redis)):
            rate = statistics.median(run["per_second"] for run in way.runs)
            p50 = statistics.median(run["p50_ms"] for run in way.runs)
            cpu, store = (way.cpu / (rounds * count) * 1e3, way.store_cpu / (rounds * count) * 1e3)
            lines.append(
                f"| {limits} | {where} | {rate:.0f} | {p50:.2f} ms | {cpu:.2f} ms "
                f"| {store:.2f} ms |"
            )
        added = statistics.median(
            r["p50_ms"] - loc["p50_ms"] for r, loc in zip(redis.runs, local.runs, strict=True)
        )
        ratio = statistics.median(
            r["per_second"] / loc["per_second"]
            for r, loc in zip(redis.runs, local.runs, strict=True)
        )
        verdicts.append(
            f"{limits}: Redis vs local, paired medians: p50 {added:+.3f} ms per association "
            f"(goal at most +0.5 ms: {'met' if added <= 0.5 else 'NOT met'}), associations/s "
            f"x{ratio:.3f} (goal at least x0.90: {'met' if ratio >= 0.9 else 'NOT met'})"
        )
    return "\n".join([*lines, *verdicts]) + "\n"


def _aggregate_table(rates: dict[str, list[float]], args: argparse.Namespace) -> str:
    median = {way: statistics.median(values) for way, values in rates.items()}
    base = median["1 instance, direct"]
    rows = "".join(f"| {way} | {v:.0f} | x{v / base:.2f} |\n" for way, v in median.items())
    return (
        f"\n(2) {args.clients} clients at once, {args.parallel_count} one-image associations "
        f"each, limits in Redis but in the first row; median of {args.parallel_rounds} paired "
        "rounds\n"
        "| where | associations/s, all clients | vs 1 instance direct |\n|---|---|---|\n" + rows
    )


if __name__ == "__main__":
    sys.exit(main())
