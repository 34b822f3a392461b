"""The cost of protection: 200 associations of one C-ECHO each, with every rate limit and cap
configured (none of them reached) vs no limits, through `dicomfw run` (plain in, plain out, so
the firewall's own work is not hidden behind TLS handshakes).

Paired rounds in alternating order; each round runs the lean client (bench/lean_client.py)
against both daemons and reads the daemons' CPU time from /proc. Prints the median wall time,
the total CPU time, and the ratios. On a busy machine those swing by more than the limits cost,
so it also times the limiter's own per-association path (connect, source, admit, one request,
release) in-process, the exact figure to set against the daemon's CPU per association.

    python bench/bench_limits.py              # 7 rounds (~1 minute)
    python bench/bench_limits.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from procs import Service, free_port, live_threads_cpu_seconds, service_starter

from dicomfw.core.ratelimit import Limiter, LimitRules, RateLimits

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
STORESCP = "/usr/bin/storescp"

RULES = """\
listeners:
  - name: modalities
    bind: 127.0.0.1:{port}{listener_limits}
upstreams:
  pacs: {{host: 127.0.0.1, port: {upstream}}}
peers:
  - ae_title: CT01
    networks: [127.0.0.0/8]{peer_limits}
routes:
  - listener: modalities
    called_ae: PACS
    upstream: pacs
    allow: [{{services: [C-ECHO]}}]
limits:
  artim_seconds: 30
{limits}"""
# Every key set, none reached by 200 sequential associations.
ALL_LIMITS = """\
  associations_per_minute_per_ip: 100000
  associations_per_minute_per_peer: 100000
  max_concurrent_per_ip: 100
  max_concurrent_per_peer: 100
  max_concurrent_total: 1000
  max_pending_per_ip: 100
  requests_per_minute_per_association: {C-ECHO: 100000}
  requests_per_minute_per_peer: {C-ECHO: 100000}
  request_limit_action: delay
"""


def write_rules(path: Path, port: int, upstream: int, limited: bool) -> Path:
    path.write_text(
        RULES.format(
            port=port,
            upstream=upstream,
            listener_limits="\n    limits: {max_concurrent_per_ip: 50}" if limited else "",
            peer_limits="\n    limits: {max_concurrent_per_peer: 50}" if limited else "",
            limits=ALL_LIMITS if limited else "",
        )
    )
    return path


def run_client(port: int, count: int) -> float:
    """Seconds for ``count`` sequential associations of one C-ECHO each."""
    result = subprocess.run(
        [PYTHON, str(BENCH / "lean_client.py"), "assoc", "--port", str(port), "--count",
         str(count), "--op", "echo"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return float(json.loads(result.stdout)["seconds"])


def measure(daemon: Service, count: int) -> tuple[float, float]:
    """(client wall seconds, daemon CPU seconds) for one run."""
    cpu = live_threads_cpu_seconds(daemon.pid)
    wall = run_client(daemon.port, count)
    return wall, live_threads_cpu_seconds(daemon.pid) - cpu


def limiter_microseconds(rules: LimitRules, count: int = 100_000) -> float:
    """The limiter's work for one association of one request, as the relay and session do it."""
    limiter, address = Limiter(), ipaddress.ip_address("127.0.0.1")
    started = time.perf_counter()
    for number in range(count):
        now = number * 0.001
        gate = limiter.connect(rules, "modalities", address)
        assert gate is not None
        gate.source(now)
        gate.admit("CT01", now)
        gate.request("C-ECHO", now)
        gate.release()
    return (time.perf_counter() - started) / count * 1e6


ALL_RULES = LimitRules(
    RateLimits(
        associations_per_minute_per_ip=100_000,
        associations_per_minute_per_peer=100_000,
        max_concurrent_per_ip=100,
        max_concurrent_per_peer=100,
        max_concurrent_total=1000,
        max_pending_per_ip=100,
        requests_per_minute_per_association={"C-ECHO": 100_000},
        requests_per_minute_per_peer={"C-ECHO": 100_000},
        request_limit_action="delay",
    ),
    listeners={"modalities": RateLimits(max_concurrent_per_ip=50)},
    peers={"CT01": RateLimits(max_concurrent_per_peer=50)},
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-limits-")))

        service = service_starter(stack, work)

        scp_port = free_port()
        service("storescp", [STORESCP, "--ignore", "-ta", "30", str(scp_port)], scp_port)
        daemons = {}
        for name, limited in (("off", False), ("all", True)):
            port = free_port()
            rules = write_rules(work / f"{name}.yaml", port, scp_port, limited)
            argv = [PYTHON, "-m", "dicomfw.cli", "run", "--config", str(rules), "--log-level",
                    "warning"]  # fmt: skip
            daemons[name] = service(f"dicomfw-{name}", argv, port)
        for daemon in daemons.values():
            measure(daemon, 50)  # warm-up: imports, caches, TCP
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in daemons}
        for round_number in range(args.rounds):
            order = ["off", "all"] if round_number % 2 == 0 else ["all", "off"]
            for name in order:
                results[name].append(measure(daemons[name], args.count))
    rows = {
        name: (
            statistics.median(wall for wall, _ in runs),
            sum(cpu for _, cpu in runs),  # /proc counts 10 ms ticks: sum, not median
        )
        for name, runs in results.items()
    }
    off, on = rows["off"], rows["all"]
    sys.stdout.write(
        f"{args.count} associations x 1 C-ECHO, median of {args.rounds} paired rounds\n"
        "| limits | wall seconds | associations/s | dicomfw CPU seconds, all rounds |\n"
        "|---|---|---|---|\n"
        f"| off | {off[0]:.3f} | {args.count / off[0]:.0f} | {off[1]:.2f} |\n"
        f"| all configured | {on[0]:.3f} | {args.count / on[0]:.0f} | {on[1]:.2f} |\n"
        f"ratio all/off: wall {on[0] / off[0]:.3f}, CPU {on[1] / off[1]:.3f}\n"
    )
    per_association_cpu = on[1] / (args.rounds * args.count) * 1e6
    without, with_all = limiter_microseconds(LimitRules()), limiter_microseconds(ALL_RULES)
    sys.stdout.write(
        f"limiter path per association: {without:.1f} us without limits, {with_all:.1f} us with "
        f"all; the difference is {(with_all - without) / per_association_cpu:.1%} of the "
        f"daemon's {per_association_cpu:.0f} us CPU per association\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
