"""The dashboard and the alert rules work against what the daemon actually exports: a real
Prometheus (Debian's package) scrapes a firewall on loopback and evaluates every expression."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.harness import WAIT, Pki, free_port, running_process, running_scp
from tests.obs_harness import (
    ALERTS,
    PROMTOOL,
    REPO,
    drive_mix,
    mixed_rules,
    observed_firewall,
    wait_until,
)

DASHBOARD = REPO / "grafana" / "dicomfw-dashboard.json"
ALERT_TESTS = REPO / "prometheus" / "dicomfw-alerts.test.yml"
PROMETHEUS = "/usr/bin/prometheus"

#: Grafana's variables, as the test resolves them: every instance and listener, short windows.
VARIABLES = {"__rate_interval": "1m", "__range": "5m", "instance": ".*", "listener": ".*"}
#: Panels that must show non-zero traffic after the known mix has run twice.
TRAFFIC = {
    "Associations by outcome",
    "Associations by peer",
    "DIMSE requests by service and status",
    "Throughput",
    "Requests by SOP class",
    "Refusals by reason",
    "TLS handshake failures by cause",
    "Upstream connect failures",
    "C-STORE and C-ECHO round trip",
    "Association duration",
    "Soonest certificate expiry",
    "Certificate days left",
    "Rules version",
}


def resolve(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: VARIABLES[m.group(1)], expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
    ]


class Api:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])


@contextlib.contextmanager
def running_prometheus(directory: Path, target_port: int) -> Iterator[Api]:
    config = directory / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {
                        "job_name": "dicomfw",
                        "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    with running_process(
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        ready_port=port,
    ):
        api = Api(port)
        wait_until(lambda: _ready(api), "Prometheus to be ready")
        yield api


def _ready(api: Api) -> bool:
    try:
        with urllib.request.urlopen(f"{api.base}/-/ready", timeout=WAIT) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_promtool_accepts_the_alert_rules_and_their_unit_tests_pass() -> None:
    for command in (
        [PROMTOOL, "check", "rules", str(ALERTS)],
        [PROMTOOL, "test", "rules", str(ALERT_TESTS)],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def _anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_has_a_runbook_section_and_unit_tests_where_it_fires_and_where_not() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    runbook = (REPO / "docs" / "runbook.md").read_text()
    sections = {
        _anchor(line[3:]): line[3:] for line in runbook.splitlines() if line.startswith("## ")
    }
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for name, rule in zip(names, rules, strict=True):
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/runbook.md" and sections.get(anchor) == name, (name, url)
        fires = [c for c in cases if c["alertname"] == name and c.get("exp_alerts")]
        quiet = [c for c in cases if c["alertname"] == name and not c.get("exp_alerts")]
        assert fires and quiet, f"{name}: a promtool case where it fires and one where it does not"
    assert set(sections.values()) == set(names)  # no section for an alert that is gone


def test_dashboard_is_importable_with_the_datasource_as_a_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"] and dashboard["id"] is None
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])


PANEL_TYPES = {"row", "stat", "timeseries", "table", "bargauge"}


def _panels() -> list[dict[str, Any]]:
    return list(json.loads(DASHBOARD.read_text())["panels"])


def test_every_panel_has_a_unit_and_queries_through_the_datasource_variable() -> None:
    for panel in _panels():
        assert panel["type"] in PANEL_TYPES, panel["title"]
        if panel["type"] == "row":
            continue
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert isinstance(unit, str) and unit, f"{panel['title']}: no unit"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and refs, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert "$instance" in target["expr"], panel["title"]  # the variable narrows it


def test_every_stat_and_coloured_cell_has_thresholds_and_the_layout_fits() -> None:
    panels = _panels()
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        coloured = any(
            prop == {"id": "custom.displayMode", "value": "color-background"}
            for override in panel.get("fieldConfig", {}).get("overrides", [])
            for prop in override["properties"]
        )
        if panel["type"] in ("stat", "bargauge") or coloured:
            thresholds = defaults["thresholds"]
            assert thresholds["mode"] == "absolute", panel["title"]
            steps = thresholds["steps"]
            assert len(steps) >= 2 or panel["title"] == "Active associations", panel["title"]
            assert steps[0]["value"] is None, panel["title"]
            values = [step["value"] for step in steps[1:]]
            assert values == sorted(values), panel["title"]
    by_title = {panel["title"]: panel for panel in panels}
    lost = by_title["Audit events lost"]
    assert lost["fieldConfig"]["defaults"]["thresholds"]["steps"] == [
        {"color": "green", "value": None},
        {"color": "red", "value": 1},
    ]
    assert lost["targets"][0]["expr"].startswith("ceil(")  # any loss at all shows as >= 1
    for title in ("Certificate days left", "CRL days to next update"):
        steps = by_title[title]["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["color"] for s in steps] == ["red", "orange", "green"], title
    refusals = by_title["Refusals by reason"]
    assert refusals["fieldConfig"]["defaults"]["unit"] == "opm"  # per minute, not 0.07/s
    assert refusals["targets"][0]["expr"].endswith("* 60")
    version = by_title["Rules version"]
    organize = next(t for t in version["transformations"] if t["id"] == "organize")
    assert organize["options"]["excludeByName"] == {"Time": True, "Value": True}


def test_a_real_prometheus_evaluates_every_dashboard_and_alert_expression(
    tmp_path: Path, pki: Pki
) -> None:
    extra = 'metrics: {bind: "127.0.0.1:0"}\naudit: {file: audit.jsonl}\n'
    with (
        running_scp() as pacs,
        observed_firewall(tmp_path, mixed_rules(pki, pacs.port, extra)) as (firewall, obs),
    ):
        assert obs.server is not None
        metrics_port = obs.server.port
        with running_prometheus(tmp_path, metrics_port) as api:
            wait_until(lambda: bool(api.query("dicomfw_rules_info == 1")), "a first scrape")
            drive_mix(firewall, pki)  # creates the series
            time.sleep(2.5)  # two more scrapes, so that the next mix shows in rate()
            drive_mix(firewall, pki)
            wait_until(
                lambda: bool(api.query("sum(increase(dicomfw_associations_total[1m])) > 9")),
                "the second mix to be scraped",
            )
            results = {
                (title, expr): api.query(resolve(expr)) for title, expr in dashboard_queries()
            }
            alert_rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
            for rule in alert_rules:
                api.query(rule["expr"])  # evaluates (an alert that does not fire is empty)
            wait_until(
                lambda: all(r["health"] == "ok" for r in _rules(api)), "every rule evaluated"
            )
            evaluated = {r["name"] for r in _rules(api)}
            instances = api.get(
                "/api/v1/label/instance/values", **{"match[]": "dicomfw_rules_info"}
            )
            listeners = api.get(
                "/api/v1/label/listener/values", **{"match[]": "dicomfw_associations_total"}
            )

    assert {title for title, _ in results} >= TRAFFIC
    for (title, expr), result in results.items():
        if title in TRAFFIC:
            values = [float(sample["value"][1]) for sample in result]
            assert any(v > 0 for v in values), f"{title}: {expr} returned {result}"
    assert evaluated == {rule["alert"] for rule in alert_rules}
    assert instances == [f"127.0.0.1:{metrics_port}"]  # the dashboard's $instance choices
    assert sorted(listeners) == ["front", "secure"]  # and its $listener choices


def _rules(api: Api) -> list[dict[str, Any]]:
    return [rule for group in api.get("/api/v1/rules")["groups"] for rule in group["rules"]]
