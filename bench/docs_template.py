"""The text of docs/benchmarks.md around the generated tables (written by bench_relay.py).

The prose lives in bench/docs_header.md (a ``str.format`` template); this fills it in.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

HEADER = Path(__file__).with_name("docs_header.md")


def document(tables: str, machine: dict[str, str], settings: Any, date: str, commit: str) -> str:
    rows = "\n".join(f"| {key} | {value} |" for key, value in machine.items())
    values = asdict(settings)
    header = HEADER.read_text().format(
        date=date,
        commit=commit,
        machine=rows,
        settings=", ".join(f"{k}={v}" for k, v in values.items()),
        small_count=values["small_count"],
        large_count=values["large_count"],
        per_assoc=values["per_assoc_count"],
        echo_count=values["echo_count"],
        hold_count=values["hold_count"],
    )
    return header + "## Results\n\n" + tables.replace("## ", "### ")
