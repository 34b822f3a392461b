"""Benchmark results: raw runs, per-configuration medians, paired ratios, goals, and tables.

A ratio is computed *per round* (the configurations of one round ran back to back, in rotating
order) and the median of those ratios is reported, so slow drifts of the machine cancel.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

GB = 1e9  # CPU seconds per GB: per 10^9 bytes of DICOM file data sent
MB = 1e6


class Cpu(NamedTuple):
    """CPU seconds each process used during one run (``None``: that way has no such process)."""

    proxy: float | None
    client: float | None
    scp: float | None


@dataclass
class Run:
    """One timed run of one configuration ("way") of one workload."""

    workload: str
    way: str
    round: int
    seconds: float
    instances: int = 0
    payload_bytes: int = 0
    associations: int = 0
    proxy_cpu: float | None = None  # CPU seconds of dicomfw/stunnel during the run
    client_cpu: float | None = None  # of the client process(es): storescu or the lean client
    scp_cpu: float | None = None  # of storescp and the children it forked per association
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """The summary of one (workload, way): medians over rounds."""

    workload: str
    way: str
    rounds: int
    seconds: float
    instances_per_s: float | None
    mb_per_s: float | None
    assoc_per_s: float | None
    cpu_s_per_gb: float | None
    cpu_ms_per_assoc: float | None
    vs_stunnel: float | None  # median over rounds of seconds / stunnel's seconds
    vs_direct: float | None
    cpu: Cpu  # medians over rounds, seconds per run
    extra: dict[str, Any] = field(default_factory=dict)


def median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None


def _paired_ratio(runs: Sequence[Run], way: str, baseline: str, workload: str) -> float | None:
    by_round = {(r.way, r.round): r.seconds for r in runs if r.workload == workload}
    ratios = [
        seconds / by_round[(baseline, rnd)]
        for (name, rnd), seconds in by_round.items()
        if name == way and (baseline, rnd) in by_round and way != baseline
    ]
    return median(ratios)


def _rate(count: int, seconds: float | None) -> float | None:
    return count / seconds if count and seconds else None


def summarize(runs: Sequence[Run]) -> list[Row]:
    rows = []
    keys = dict.fromkeys((r.workload, r.way) for r in runs)
    for workload, way in keys:
        mine = [r for r in runs if r.workload == workload and r.way == way]
        seconds = median(r.seconds for r in mine)
        assert seconds is not None
        first = mine[0]
        cpu = [(r, r.proxy_cpu) for r in mine if r.proxy_cpu is not None]
        rows.append(
            Row(
                workload=workload,
                way=way,
                rounds=len(mine),
                seconds=seconds,
                instances_per_s=_rate(first.instances, seconds),
                mb_per_s=first.payload_bytes / MB / seconds if first.payload_bytes else None,
                assoc_per_s=_rate(first.associations, seconds),
                cpu_s_per_gb=median(c / (r.payload_bytes / GB) for r, c in cpu if r.payload_bytes),
                cpu_ms_per_assoc=median(
                    1000 * c / r.associations for r, c in cpu if r.associations
                ),
                vs_stunnel=_paired_ratio(runs, way, "stunnel", workload),
                vs_direct=_paired_ratio(runs, way, "direct", workload),
                cpu=Cpu(
                    median(r.proxy_cpu for r in mine if r.proxy_cpu is not None),
                    median(r.client_cpu for r in mine if r.client_cpu is not None),
                    median(r.scp_cpu for r in mine if r.scp_cpu is not None),
                ),
                extra=_merge_extra(mine),
            )
        )
    return rows


def _merge_extra(runs: Sequence[Run]) -> dict[str, Any]:
    """Median of numeric extras over rounds (latency percentiles, resumed sessions, RSS)."""
    merged: dict[str, Any] = {}
    for key in runs[0].extra:
        values = [r.extra[key] for r in runs if key in r.extra]
        numeric = all(isinstance(v, int | float) for v in values)
        merged[key] = median(values) if numeric else values[-1]
    return merged


def added_latency(runs: Sequence[Run], way: str, baseline: str) -> float | None:
    """Median over rounds of p50(way) - p50(baseline), in microseconds."""
    p50 = {(r.way, r.round): r.extra["p50_us"] for r in runs if r.workload == "echo"}
    return median(
        value - p50[(baseline, rnd)]
        for (name, rnd), value in p50.items()
        if name == way and (baseline, rnd) in p50
    )


# ---- goals -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    what: str
    target: str
    measured: float | None
    met: bool | None
    unit: str = ""

    def cells(self) -> list[str]:
        value = "n/a" if self.measured is None else f"{self.measured:.3g}{self.unit}"
        verdict = "n/a" if self.met is None else ("met" if self.met else "**not met**")
        return [self.what, self.target, value, verdict]


def _row(rows: Sequence[Row], workload: str, way: str) -> Row | None:
    return next((r for r in rows if r.workload == workload and r.way == way), None)


def _goal(what: str, target: str, value: float | None, ok: bool | None, unit: str = "") -> Goal:
    return Goal(what, target, value, None if value is None else ok, unit)


def _at_most(value: float | None, bound: float) -> bool:
    return value is not None and value <= bound


def _ratio_goals(rows: Sequence[Row]) -> list[Goal]:
    goals = []
    for workload in ("a", "b"):
        row = _row(rows, workload, "dicomfw")
        s, d, cpu = (row.vs_stunnel, row.vs_direct, row.cpu_s_per_gb) if row else (None,) * 3
        goals += [
            _goal(f"({workload}) time vs stunnel", "≤ 0.85x", s, _at_most(s, 0.85), "x"),
            _goal(f"({workload}) time vs DCMTK direct TLS", "≤ 1.15x", d, _at_most(d, 1.15), "x"),
            _goal(f"({workload}) firewall CPU", "≤ 0.7 s/GB", cpu, _at_most(cpu, 0.7), " s/GB"),
        ]
    return goals


def evaluate_goals(rows: Sequence[Row], runs: Sequence[Run]) -> list[Goal]:
    goals = _ratio_goals(rows)
    fw, st = _row(rows, "c-lean", "dicomfw"), _row(rows, "c-lean", "stunnel")
    ratio = None
    if fw and st and fw.assoc_per_s and st.assoc_per_s:
        ratio = fw.assoc_per_s / st.assoc_per_s
    what = "(c) associations/s vs stunnel (lean client, C-STORE)"
    goals.append(_goal(what, "≥ 1.0x", ratio, ratio is not None and ratio >= 1.0, "x"))
    added_fw = added_latency(runs, "dicomfw", "direct")
    added_st = added_latency(runs, "stunnel", "direct")
    target = "≤ stunnel's" + (f" ({added_st:.0f} µs)" if added_st is not None else "")
    ok = added_st is not None and _at_most(added_fw, added_st)
    goals.append(_goal("added C-ECHO p50 over direct", target, added_fw, ok, " µs"))
    hold = _row(rows, "hold", "dicomfw")
    kb = hold.extra.get("kb_per_assoc") if hold else None
    goals.append(_goal("RSS per idle association", "≤ 40 KB", kb, _at_most(kb, 40), " KB"))
    return goals


# ---- tables ------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


WORKLOAD_TITLES = {
    "a": "(a) many ~0.5 MB instances, one association (storescu)",
    "b": "(b) ≥ 50 MB instances, one association (storescu)",
    "c": "(c) one instance per association (a storescu process each)",
    "c-lean": "(c) one ~0.5 MB C-STORE per association (lean client)",
    "c-lean-echo": "(c') association set-up only: one C-ECHO per association (lean client)",
}


def throughput_table(rows: Sequence[Row], workloads: Sequence[str]) -> str:
    header = [
        "workload",
        "way",
        "median s",
        "inst/s",
        "MB/s",
        "assoc/s",
        "proxy CPU s/GB",
        "proxy CPU ms/assoc",
        "x stunnel",
        "x direct",
        "notes",
    ]
    body = []
    for row in rows:
        if row.workload not in workloads:
            continue
        body.append(
            [
                row.workload,
                row.way,
                _fmt(row.seconds, 3),
                _fmt(row.instances_per_s),
                _fmt(row.mb_per_s),
                _fmt(row.assoc_per_s),
                _fmt(row.cpu_s_per_gb, 2),
                _fmt(row.cpu_ms_per_assoc, 2),
                _fmt(row.vs_stunnel, 2),
                _fmt(row.vs_direct, 2),
                _notes(row),
            ]
        )
    return _table(header, body)


def cpu_table(rows: Sequence[Row], workloads: Sequence[str]) -> str:
    """Who used the two cores: the client, the proxy and the SCP, per run (medians)."""
    header = ["workload", "way", "median s", "client CPU s", "proxy CPU s", "SCP CPU s",
              "all three s", "cores busy", "proxy + SCP s"]  # fmt: skip
    body = []
    for row in rows:
        if row.workload not in workloads or row.cpu.client is None:
            continue
        parts = [value or 0.0 for value in row.cpu]
        total = sum(parts)
        proxy_and_scp = (row.cpu.proxy or 0.0) + (row.cpu.scp or 0.0)
        body.append(
            [row.workload, row.way, _fmt(row.seconds, 3)]
            + [_fmt(value, 2) for value in (row.cpu.client, row.cpu.proxy, row.cpu.scp, total)]
            + [_fmt(total / row.seconds, 2), _fmt(proxy_and_scp, 2)]
        )
    return _table(header, body)


def _notes(row: Row) -> str:
    notes = []
    if "tls_resumed" in row.extra and row.extra.get("tls_handshakes"):
        notes.append(
            f"TLS resumed {row.extra['tls_resumed']:.0f}/{row.extra['tls_handshakes']:.0f}"
        )
    if "peak_rss_kb" in row.extra:
        notes.append(f"peak RSS {row.extra['peak_rss_kb'] / 1024:.0f} MB")
    return ", ".join(notes)


def latency_table(rows: Sequence[Row], runs: Sequence[Run]) -> str:
    header = ["way", "p50 µs", "p99 µs", "mean µs", "added p50 over direct µs", "rounds"]
    body = []
    for row in rows:
        if row.workload != "echo":
            continue
        added = added_latency(runs, row.way, "direct") if row.way != "direct" else None
        body.append(
            [
                row.way,
                _fmt(row.extra.get("p50_us")),
                _fmt(row.extra.get("p99_us")),
                _fmt(row.extra.get("mean_us")),
                _fmt(added),
                str(row.rounds),
            ]
        )
    return _table(header, body)


def memory_table(rows: Sequence[Row]) -> str:
    header = [
        "way",
        "held",
        "RSS before KB",
        "RSS with all held KB",
        "KB per association",
        "set-up s",
        "RSS 3 s after release KB",
    ]
    body = []
    for row in rows:
        if row.workload != "hold":
            continue
        e = row.extra
        body.append(
            [
                row.way,
                _fmt(e.get("held"), 0),
                _fmt(e.get("rss_before_kb"), 0),
                _fmt(e.get("rss_held_kb"), 0),
                _fmt(e.get("kb_per_assoc")),
                _fmt(row.seconds, 2),
                _fmt(e.get("rss_released_kb"), 0),
            ]
        )
    return _table(header, body)


def goals_table(goals: Sequence[Goal]) -> str:
    return _table(["goal", "target", "measured", "verdict"], [g.cells() for g in goals])


def machine_table(machine: dict[str, str]) -> str:
    return _table(["", ""], [[key, value] for key, value in machine.items()])


def as_json(runs: Sequence[Run], rows: Sequence[Row], goals: Sequence[Goal]) -> dict[str, Any]:
    return {
        "runs": [asdict(r) for r in runs],
        "summary": [asdict(r) for r in rows],
        "goals": [asdict(g) for g in goals],
    }
