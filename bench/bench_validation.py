"""What content validation costs the relay: two daemons, without and with ``validation:``.

The same workloads as the relay benchmark go through a ``dicomfw run`` daemon with no content
validation ("off") and one that validates every data set with the default (safety) checks
("on"), in paired rounds whose order alternates, both relaying plain DICOM to a DCMTK
``storescp +tls`` (mutual TLS upstream, as in bench_relay.py). Reported: min and median wall
time and daemon CPU, their ratio, and the CPU validation adds per GB relayed.

    python bench/bench_validation.py                 # 5 rounds
    python bench/bench_validation.py --rounds 9 --workloads a
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import fixtures
from bench_observability import BENCH, PYTHON, STORESCU, Workload
from fixtures import CALLED_AE, CALLING_AE, LOCALHOST
from procs import DCMTK_ENV, Service, free_port, paired_rounds, run_timed, service_starter

#: What ``on`` adds to the rules: every route validates data sets with the default checks.
VALIDATION = "validation: {max_instance_bytes: 2147483648}\n"


def paired(
    daemons: dict[str, Service], name: str, run: Workload, rounds: int, gigabytes: float
) -> str:
    """One table row: wall and daemon CPU off vs on, medians of paired rounds."""
    results = paired_rounds(daemons, run, rounds)
    median = {
        which: (
            statistics.median(r[0] for r in rows),
            statistics.median(r[1] for r in rows),
        )
        for which, rows in results.items()
    }
    minimum = {which: min(r[0] for r in rows) for which, rows in results.items()}
    wall = median["on"][0] / median["off"][0] - 1
    cpu_per_gb = (median["on"][1] - median["off"][1]) / gigabytes
    return (
        f"| {name} | {minimum['off']:.3f} / {median['off'][0]:.3f} s "
        f"| {minimum['on']:.3f} / {median['on'][0]:.3f} s "
        f"| {median['off'][1]:.3f} s | {median['on'][1]:.3f} s "
        f"| {100 * wall:+.1f} % | {cpu_per_gb:+.3f} s |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--associations", type=int, default=200)
    parser.add_argument("--instances", type=int, default=1000, help="0.5 MB C-STOREs in (a)")
    parser.add_argument("--large", type=int, default=10, help="52 MB C-STOREs in (b)")
    parser.add_argument("--workloads", default="abc", help="which of a, b, c to run")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="dicomfw-validation-bench-") as temp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(temp)
        pki = fixtures.make_pki(work / "pki")
        small = fixtures.make_ct_files(work / "small", args.instances, 512, 512)
        large = fixtures.make_ct_files(work / "large", args.large, 5120, 5120)

        service = service_starter(stack, work)

        scp_port = fixtures.start_tls_storescp(service, work, pki).port
        daemons = {}
        for which in ("off", "on"):
            port = free_port()
            path = fixtures.write_rules(work / f"{which}.yaml", port, scp_port, pki)
            if which == "on":
                path.write_text(path.read_text() + VALIDATION)
            command = [PYTHON, "-m", "dicomfw.cli", "run", "--config", str(path)]
            daemons[which] = service(f"dicomfw-{which}", command, port)

        def storescu(directory: str) -> Workload:
            base = [STORESCU, "-aet", CALLING_AE, "-aec", CALLED_AE, LOCALHOST]
            return lambda port: run_timed(
                [*base, str(port), "+sd", str(work / directory)], 900, DCMTK_ENV
            )

        def one_image_associations(port: int) -> float:
            command = [PYTHON, str(BENCH / "lean_client.py"), "assoc", "--count",
                       str(args.associations), "--op", "store", "--file", str(small[0]),
                       "--port", str(port)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, timeout=600, check=True)
            return float(json.loads(done.stdout.decode().splitlines()[-1])["seconds"])

        def size(files: list[Path], count: int = 0) -> float:
            return (
                sum(f.stat().st_size for f in files) / 1e9
                if not count
                else (files[0].stat().st_size * count / 1e9)
            )

        workloads: dict[str, tuple[str, Workload, float]] = {
            "a": (f"(a) {args.instances} x 0.5 MB C-STORE, one association",
                  storescu("small"), size(small)),
            "b": (f"(b) {args.large} x 52 MB C-STORE, one association",
                  storescu("large"), size(large)),
            "c": (f"(c) {args.associations} associations x 1 C-STORE 0.5 MB",
                  one_image_associations, size(small, args.associations)),
        }  # fmt: skip
        rows = [
            "| workload | wall off (min / median) | wall on (min / median) | CPU off | CPU on "
            "| wall on vs off | CPU added per GB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        run: Callable[[int], float]
        for key in args.workloads:
            name, run, gigabytes = workloads[key]
            rows.append(paired(daemons, name, run, args.rounds, gigabytes))
        sys.stdout.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
