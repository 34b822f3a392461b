"""The JSON Schema an editor checks rules files with: generated from the loader's own tables,
shipped in the package as generated, valid as a draft 2020-12 schema, accepting every rules file
the project has and rejecting the mistakes the loader reports that a schema can express."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dicomfw.admin import schema
from dicomfw.config.load import load_config
from dicomfw.demo import RULES as DEMO_RULES
from dicomfw.errors import ConfigErrors
from tests.admin_harness import dicomfw
from tests.harness import Pki, rules
from tests.obs_harness import mixed_rules
from tests.test_config_load import FULL, MINIMAL, edit
from tests.test_relay_monitor import monitor_rules
from tests.test_relay_proxy import proxied_rules

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "dicomfw" / "config" / schema.SCHEMA_FILE


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SHIPPED.read_text()))


def schema_errors(text: str) -> list[str]:
    return [error.message for error in validator().iter_errors(yaml.safe_load(text))]


def test_the_shipped_schema_is_what_the_loader_tables_generate_now() -> None:
    """A key added to the loader and not to the schema fails here. The generator runs in a
    process of its own, like the daemon's: importing pynetdicom (as the tests do) adds
    keywords to pydicom's registry that the daemon's loader does not know."""
    generated = subprocess.run(
        [sys.executable, "-m", "dicomfw.admin.schema"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert SHIPPED.read_text() == generated.stdout, (
        "the shipped schema is stale: python -m dicomfw.admin.schema > " + str(SHIPPED)
    )


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    document = json.loads(SHIPPED.read_text())
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(document)


def test_dicomfw_schema_prints_the_shipped_schema() -> None:
    result = dicomfw("schema")
    assert result.returncode == 0, result.stderr
    assert result.stdout == SHIPPED.read_text()


def test_the_example_rules_file_names_the_schema_on_its_first_line() -> None:
    first = (REPO / "rules" / "example.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../dicomfw/config/rules.schema.json"
    assert (REPO / "rules" / first.split("=", 1)[1]).resolve() == SHIPPED


def project_rules_files(pki: Pki, tmp_path: Path) -> dict[str, str]:
    """Every rules file the project ships or its tests run the firewall with."""
    files = {f"rules/{path.name}": path.read_text() for path in (REPO / "rules").glob("*.yaml")}
    files |= {
        "test_config_load MINIMAL": MINIMAL,
        "test_config_load FULL": FULL,
        "harness.rules": rules(pki, 104),
        "harness.rules, TLS both sides, rewrite": rules(
            pki, 104, listener_tls=True, rewrite="{called_ae: UP, calling_ae: FW}"
        ),
        "obs_harness.mixed_rules": mixed_rules(pki, 104, f"audit: {{file: {tmp_path}/a}}"),
        "test_relay_monitor.monitor_rules": monitor_rules(104, tmp_path / "audit", "monitor"),
        "test_relay_proxy.proxied_rules": proxied_rules(pki, 104),
        "dicomfw demo": DEMO_RULES.format(port=1, tls_port=2, pacs_port=3),
    }
    return files


def test_the_schema_accepts_every_rules_file_of_the_project(pki: Pki, tmp_path: Path) -> None:
    files = project_rules_files(pki, tmp_path)
    assert len(files) >= 9
    for name, text in files.items():
        assert schema_errors(text) == [], name


# (what is wrong, edit of MINIMAL, whether the schema can tell). The loader rejects every one.
MISTAKES: list[tuple[str, tuple[str, str], bool]] = [
    ("unknown key", ("    bind: 0.0.0.0:11112", "    bnid: 0.0.0.0:11112"), True),
    ("unknown top-level key", ("routes:", "modus: enforce\nroutes:"), True),
    ("missing section", ("routes:\n", "unused:\n"), True),
    ("bad CIDR", ("[10.1.2.0/24]", "[10.1.2.300/24]"), True),
    ("network with a prefix over 32", ("[10.1.2.0/24]", "[10.1.2.0/33]"), True),
    ("unknown SOP class keyword", ("[CTImageStorage]", "[CTImageStorag]"), True),
    ("transfer syntax as SOP class", ("[CTImageStorage]", "[ExplicitVRLittleEndian]"), True),
    ("unknown service", ("[C-ECHO, C-STORE]", "[C-ECHO, c-store]"), True),
    ("string for a list", ("networks: [10.1.2.0/24]", "networks: 10.1.2.0/24"), True),
    ("quoted integer", ("port: 104", 'port: "104"'), True),
    ("quoted boolean", ("port: 104}", 'port: 104, tls: "false"}'), True),
    ("tls: true", ("port: 104}", "port: 104, tls: true}"), True),
    ("unquoted number as AE title", ("  - ae_title: CT01", "  - ae_title: 1234"), True),
    ("port out of range", ("port: 104", "port: 0"), True),
    ("IPv6 bind without brackets", ("0.0.0.0:11112", "'::1:11112'"), True),
    ("bind without port", ("0.0.0.0:11112", "0.0.0.0"), True),
    ("AE title of 17 characters", ("ae_title: CT01", "ae_title: CT01_MODALITY_RM3"), True),
    ("AE title with a backslash", ("called_ae: PACS", "called_ae: 'PA\\CS'"), True),
    ("AE title of spaces", ("called_ae: PACS", "called_ae: '    '"), True),
    ("empty routes", (MINIMAL[MINIMAL.index("routes:") :], "routes: []\n"), True),
    (
        "short fingerprint",
        ("[10.1.2.0/24]", "[10.1.2.0/24]\n    certificate: {fingerprint_sha256: 'AB:CD'}"),
        True,
    ),
    ("empty certificate binding", ("[10.1.2.0/24]", "[10.1.2.0/24]\n    certificate: {}"), True),
    (
        "move_destinations without C-MOVE",
        ("        sop_classes: [CTImageStorage]", "        move_destinations: [WS1]"),
        True,
    ),
    (
        "unquoted TLS version",
        (
            "bind: 0.0.0.0:11112",
            "bind: 0.0.0.0:11112\n    tls: {cert: a, key: b, ca: c, min_version: 1.2}",
        ),
        True,
    ),
    ("limits out of range", ("routes:", "limits: {max_pdu_bytes: 1024}\nroutes:"), True),
    ("zero seconds", ("routes:", "limits: {idle_seconds: 0}\nroutes:"), True),
    ("unknown mode", ("routes:", "mode: audit\nroutes:"), True),
    ("workers: 0", ("routes:", "workers: 0\nroutes:"), True),
    (
        "proxy_protocol without proxy_from",
        ("bind: 0.0.0.0:11112", "bind: 0.0.0.0:11112\n    proxy_protocol: true"),
        True,
    ),
    (
        "client certificate without its key",
        ("port: 104}", "port: 104, tls: {ca: ca.pem, cert: c.pem}}"),
        True,
    ),
    ("audit with neither file nor atna", ("routes:", "audit: {queue_size: 10}\nroutes:"), True),
    (
        "a request rate for an unknown service",
        ("routes:", "limits: {requests_per_minute_per_peer: {C-FINDS: 10}}\nroutes:"),
        True,
    ),
    # What only the loader can tell: references, uniqueness, host bits, files.
    ("undefined listener", ("  - listener: modalities", "  - listener: modalitis"), False),
    ("undefined upstream", ("    upstream: pacs", "    upstream: pacs2"), False),
    ("undefined peer", ("    upstream: pacs", "    upstream: pacs\n    calling_ae: [MR01]"), False),
    ("host bits set", ("[10.1.2.0/24]", "[10.1.2.3/24]"), False),
    (
        "duplicate peer",
        ("routes:", "  - {ae_title: CT01, networks: [10.9.0.0/16]}\nroutes:"),
        False,
    ),
    ("missing certificate file", ("port: 104}", "port: 104, tls: {ca: nowhere.pem}}"), False),
]


@pytest.mark.parametrize(
    ("edit_", "schema_tells"),
    [pytest.param(change, tells, id=what) for what, change, tells in MISTAKES],
)
def test_the_schema_rejects_what_the_loader_rejects_where_a_schema_can_say_it(
    tmp_path: Path, edit_: tuple[str, str], schema_tells: bool
) -> None:
    text = edit(*edit_, MINIMAL)
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(ConfigErrors):
        load_config(path)
    assert bool(schema_errors(text)) is schema_tells, schema_errors(text)


def test_the_keyword_lists_are_what_the_loader_resolves() -> None:
    """Completion offers only keywords the loader takes, and the kind it takes them as."""
    document: dict[str, Any] = json.loads(SHIPPED.read_text())
    sop_classes = document["$defs"]["sop_class"]["anyOf"][0]["enum"]
    syntaxes = document["$defs"]["transfer_syntax"]["anyOf"][0]["enum"]
    assert {"CTImageStorage", "StudyRootQueryRetrieveInformationModelMove"} <= set(sop_classes)
    assert "JPEG2000Lossless" in syntaxes and "JPEG2000Lossless" not in sop_classes
    assert not set(sop_classes) & set(syntaxes)
