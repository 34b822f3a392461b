"""Run the fuzz targets for a given time and write what they did: ``python -m fuzz.run``.

    nice -n 19 python -m fuzz.run --seconds 3600            # every target, its share of the time
    python -m fuzz.run --seconds 120 --target session        # one target
    python -m fuzz.run --replay crash-1234 --target dimse    # one input, no fuzzing engine

Each target runs in its own process under atheris (libFuzzer over instrumented Python; the
package must be installed as pure Python, ``DICOMFW_PURE_PYTHON=1 pip install -e .``, or the
compiled modules would hide the code from the coverage instrumentation). Per target the run
passes libFuzzer ``-timeout`` (seconds one input may take: past it the input is a hang and
saved as a finding), ``-rss_limit_mb`` (memory the process may reach: past it, a finding) and
``-max_len``, and gives it three corpus directories: ``fuzz/work/<target>`` (gitignored; new
inputs go there, so a later run picks up where this one stopped), the committed seeds in
``fuzz/corpus/<target>`` and the committed regression inputs in ``fuzz/regressions/<target>``.
A crash, hang or out-of-memory input is written to ``fuzz/work/artifacts/<target>/``; minimise
it (``--minimize``), add it to ``fuzz/regressions/<target>/`` and as a test.

It reads libFuzzer's closing lines (``#N DONE cov: C ft: F ...`` and ``stat::`` lines) and
writes ``summary.json`` and ``summary.md`` with the executions, coverage, speed and findings of
each target, plus every target's full log, into ``--out`` (default
``fuzz/results/<UTC time>/``). Assertions stay on: run it without ``-O``. The exit status is
1 when any target found something.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: libFuzzer's status line: "#1234  DONE   cov: 567 ft: 890 corp: 12/3456b ... exec/s: 78"
_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", re.MULTILINE)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
#: Shares of the time: the session, the stream and the data-set walker run the most code at
#: the lowest speed.
WEIGHTS = {"session": 3.0, "stream": 2.0, "dataset": 2.0}


@dataclass
class TargetResult:
    target: str
    seconds: float
    executions: int = 0
    exec_per_second: int = 0
    coverage_start: int = 0  # libFuzzer "cov" once the seeds are loaded (INITED)
    coverage: int = 0  # at the end (DONE)
    features: int = 0
    corpus_inputs: int = 0
    peak_rss_mb: int = 0
    exit_status: int = 0
    findings: list[str] = field(default_factory=list)


def child(name: str, libfuzzer_args: list[str]) -> None:
    """The fuzzing process of one target: instrument the package, then hand over to atheris."""
    import atheris

    with atheris.instrument_imports(include=["dicomfw"]):
        from fuzz.targets import TARGETS
    atheris.Setup([sys.argv[0], *libfuzzer_args], TARGETS[name])
    atheris.Fuzz()


def run_target(
    name: str, seconds: float, out: Path, timeout: int, max_len: int, rss_limit_mb: int
) -> TargetResult:
    work = HERE / "work" / name
    artifacts = HERE / "work" / "artifacts" / name
    for directory in (work, artifacts):
        directory.mkdir(parents=True, exist_ok=True)
    corpora = [work, HERE / "corpus" / name, HERE / "regressions" / name]
    command = [
        sys.executable,
        "-m",
        "fuzz.run",
        "--child",
        name,
        "--",
        f"-max_total_time={max(1, round(seconds))}",
        f"-timeout={timeout}",
        f"-rss_limit_mb={rss_limit_mb}",
        f"-max_len={max_len}",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        *(str(corpus) for corpus in corpora if corpus.is_dir()),
    ]
    log = out / f"{name}.log"
    with log.open("wb") as sink:
        # Bounded: libFuzzer stops itself at -max_total_time; a minute of slack for loading
        # the corpus and for the last input (bounded by -timeout) to finish.
        completed = subprocess.run(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, timeout=seconds + 60 + timeout
        )
    return parse(name, seconds, log.read_text(errors="replace"), completed.returncode)


def parse(name: str, seconds: float, text: str, exit_status: int) -> TargetResult:
    """What one target's libFuzzer output says it did."""
    result = TargetResult(name, seconds, exit_status=exit_status)
    statuses = _STATUS.findall(text)
    for number, kind, cov, features, inputs, _ in statuses:
        if kind == "INITED":
            result.coverage_start = int(cov)
        result.executions = int(number)
        result.coverage, result.features, result.corpus_inputs = (
            int(cov),
            int(features),
            int(inputs),
        )
    stats = {key: int(value) for key, value in _STAT.findall(text)}
    result.executions = stats.get("number_of_executed_units", result.executions)
    result.exec_per_second = stats.get("average_exec_per_sec", 0)
    result.peak_rss_mb = stats.get("peak_rss_mb", 0)
    result.findings = _ARTIFACT.findall(text)
    return result


def summarise(results: list[TargetResult], seconds: float) -> str:
    lines = [
        f"Fuzzing run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{seconds:.0f} s on {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}),"
        f" Python {platform.python_version()}",
        "",
        "| target | seconds | executions | exec/s | cov (start → end) | ft | corpus | "
        "peak RSS MB | findings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.target} | {r.seconds:.0f} | {r.executions:,} | {r.exec_per_second:,} | "
            f"{r.coverage_start} → {r.coverage} | {r.features} | {r.corpus_inputs} | "
            f"{r.peak_rss_mb} | {len(r.findings)} |"
        )
    total = sum(r.executions for r in results)
    found = sum(len(r.findings) for r in results)
    lines += ["", f"Total: {total:,} executions, {found} findings."]
    for r in results:
        lines += [f"- {r.target}: {finding}" for finding in r.findings]
    return "\n".join(lines) + "\n"


def replay(name: str, path: Path) -> int:
    """Run one input through one target without the fuzzing engine (its traceback, if any)."""
    from fuzz.targets import TARGETS

    TARGETS[name](path.read_bytes())
    sys.stdout.write(f"{path}: no finding in {name}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    from fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(description="Run the fuzz targets (see docs/fuzzing.md).")
    parser.add_argument("--seconds", type=float, default=600.0, help="total over all targets")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--max-len", type=int, default=32_768, help="longest input generated")
    parser.add_argument("--rss-limit-mb", type=int, default=1024, help="memory bound per target")
    parser.add_argument("--out", type=Path, help="default fuzz/results/<UTC time>")
    parser.add_argument("--replay", type=Path, help="run this one input through --target")
    args = parser.parse_args(argv)
    names = args.target or list(TARGETS)
    if args.replay is not None:
        return replay(names[0], args.replay)
    if sys.flags.optimize:
        parser.error("run without -O: the targets' and the package's assertions must stay on")
    out = args.out or HERE / "results" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    weight = sum(WEIGHTS.get(name, 1.0) for name in names)
    results = []
    for name in names:
        share = args.seconds * WEIGHTS.get(name, 1.0) / weight
        sys.stdout.write(f"fuzzing {name} for {share:.0f} s\n")
        sys.stdout.flush()
        result = run_target(name, share, out, args.timeout, args.max_len, args.rss_limit_mb)
        sys.stdout.write(
            f"  {result.executions:,} executions, cov {result.coverage}, "
            f"{len(result.findings)} findings\n"
        )
        results.append(result)
    (out / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    summary = summarise(results, args.seconds)
    (out / "summary.md").write_text(summary)
    sys.stdout.write(summary)
    return 1 if any(r.findings or r.exit_status for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
