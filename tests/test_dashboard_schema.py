"""The dashboard is one Grafana can load: it type-checks against ``Dashboard`` from
``@grafana/schema``, the TypeScript model Grafana generates from its own dashboard schema, with
the compiler's excess-property checks (a misspelt key is an error, not silently ignored).
No Grafana server can be installed from the package registries this suite may use, so the
model is the strictest check available; the real Prometheus test evaluates every query."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from tests.obs_harness import REPO

DASHBOARD = REPO / "grafana" / "dicomfw-dashboard.json"
GRAFANA = REPO / "tests" / "grafana"
MODULES = GRAFANA / "node_modules"
TSC = MODULES / "typescript" / "bin" / "tsc"
TSCONFIG = {
    "compilerOptions": {
        "strict": True,
        "noEmit": True,
        "moduleResolution": "node",
        "module": "esnext",
        "target": "es2020",
        "skipLibCheck": True,
    },
    "include": ["*.ts"],
}
#: ``check.ts(12,5): error TS2322: Type '"x"' is not assignable to type 'Y'.``
ENUM_LITERAL = re.compile(r"""Type '"([^"]*)"' is not assignable to type '(\w+)'""")


def _string_enums() -> dict[str, set[str]]:
    """Each string enum of the model with its values. A JSON string is never assignable to a
    TypeScript string enum, so an error for a value the enum does hold is not an error."""
    enums: dict[str, set[str]] = {}
    for declaration in (MODULES / "@grafana" / "schema" / "dist").rglob("*.d.ts"):
        for match in re.finditer(r"enum (\w+) \{([^}]*)\}", declaration.read_text()):
            enums.setdefault(match[1], set()).update(re.findall(r'= "([^"]*)"', match[2]))
    return enums


def _schema_errors(dashboards: dict[str, dict[str, Any]], workdir: Path) -> list[str]:
    """The compiler's errors for each named dashboard, as ``NAME.ts(LINE,COL): error …``."""
    assert TSC.exists(), "the model is not installed: npm ci --prefix tests/grafana (.ci/run does)"
    (workdir / "node_modules").symlink_to(MODULES)
    (workdir / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    for name, dashboard in dashboards.items():
        (workdir / f"{name}.ts").write_text(
            "import type { Dashboard } from '@grafana/schema';\n"
            f"export const dashboard: Dashboard = {json.dumps(dashboard, indent=1)};\n"
        )
    result = subprocess.run(
        ["node", str(TSC), "-p", ".", "--pretty", "false"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    enums = _string_enums()
    errors = []
    for line in result.stdout.splitlines():
        literal = ENUM_LITERAL.search(line)
        if literal and literal[1] in enums.get(literal[2], set()):
            continue
        errors.append(line)
    assert errors or result.returncode == 0, result.stdout + result.stderr
    return errors


#: One mistake each that Grafana's model rejects: where it goes, and the wrong value.
MISTAKES: dict[str, tuple[tuple[str | int, ...], object]] = {
    "width_not_a_number": (("panels", 1, "gridPos", "w"), "wide"),
    "misspelt_key": (
        ("panels", 1, "fieldConfig", "defaults", "thresholds", "steps", 0, "colour"),
        "red",
    ),
    "refresh_not_a_duration": (("refresh",), 30),
    "tooltip_not_an_enum_member": (("graphTooltip",), "shared"),
}


def _with_mistake(dashboard: dict[str, Any], path: tuple[str | int, ...], value: object) -> Any:
    broken = json.loads(json.dumps(dashboard))
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return broken


def test_the_dashboard_type_checks_against_grafanas_dashboard_model(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"][1]["type"] == "stat"  # where the planted mistakes go
    broken = {name: _with_mistake(dashboard, *mistake) for name, mistake in MISTAKES.items()}
    errors = _schema_errors({"dashboard": dashboard, **broken}, tmp_path)
    by_file = {
        name: [e for e in errors if e.startswith(f"{name}.ts(")]
        for name in ["dashboard", *MISTAKES]
    }
    assert by_file.pop("dashboard") == [], errors
    # The check can fail: each planted mistake is found, and nothing else.
    assert all(len(found) == 1 for found in by_file.values()), by_file
    assert len(errors) == len(MISTAKES), errors
