"""`dicomfw check` as an admin runs it: on a checkout without certificates (--syntax-only)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DICOMFW = shutil.which("dicomfw")


def dicomfw(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert DICOMFW is not None, "the dicomfw console script is not installed"
    return subprocess.run(
        [DICOMFW, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_example_rules_pass_a_syntax_only_check_on_a_fresh_checkout(tmp_path: Path) -> None:
    """The example names certificates a checkout does not have: a full check fails on them,
    --syntax-only checks everything else and passes."""
    rules = tmp_path / "rules" / "example.yaml"
    rules.parent.mkdir()
    shutil.copy(REPO / "rules" / "example.yaml", rules)

    full = dicomfw("check", "--config", rules)
    assert full.returncode == 1
    assert "fw-server.pem: " not in full.stdout and "file not found" in full.stderr

    syntax = dicomfw("check", "--config", rules, "--syntax-only")
    assert syntax.returncode == 0, syntax.stderr
    assert syntax.stderr == ""
    assert syntax.stdout.endswith(f"{rules}: OK\n")


def test_syntax_only_still_reports_every_other_mistake(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    example = (REPO / "rules" / "example.yaml").read_text()
    rules.write_text(example.replace("networks: [10.1.2.0/24]", "networks: [10.1.2.300/24]"))
    result = dicomfw("check", "--config", rules, "--syntax-only")
    assert result.returncode == 1
    assert "is not an IP network" in result.stderr
    assert "file not found" not in result.stderr
