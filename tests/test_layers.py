"""The import-linter contracts in pyproject.toml do catch a broken layering.

``lint-imports`` passing proves nothing if a contract cannot fail (a misspelt package, a layer
nobody is in). So each case copies the package and pyproject.toml to a temporary directory,
adds one import that the layering forbids, and runs ``lint-imports`` on the copy: it must exit
1 and name exactly the contracts that import breaks. The unmodified copy must pass, so a
failure is the added import's doing and not the copy's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Contract names as pyproject.toml spells them, by id.
LAYERS = "Layers: __main__ -> cli -> demo"
SERVICE = "Inside service: supervisor -> daemon -> heap | sdnotify"
OBSERVE = "Inside observe: observability -> atna -> eventlog | metrics | audit"
PKI = "Inside pki: cli -> checks -> certs"
ADMIN = "Inside admin: learn -> explain | lint | changes | schema -> records | locate"
SANS_IO = "The core is sans-IO"
ALL = (LAYERS, SERVICE, OBSERVE, PKI, ADMIN, SANS_IO)


def lint_imports_command() -> str:
    beside_python = Path(sys.executable).parent / "lint-imports"
    found = str(beside_python) if beside_python.exists() else shutil.which("lint-imports")
    assert found is not None, "lint-imports (import-linter, in the test extras) is not installed"
    return found


def copy_project(into: Path) -> Path:
    """The package's sources and the contracts, without compiled modules or caches."""
    shutil.copytree(
        REPO / "dicomfw",
        into / "dicomfw",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"),
    )
    shutil.copy(REPO / "pyproject.toml", into / "pyproject.toml")
    return into


def lint_imports(project: Path) -> tuple[int, dict[str, str]]:
    """Exit status and each contract's verdict (KEPT/BROKEN), run on ``project``'s copy of the
    package: it comes first on the path, before the installed (editable) one. (The added imports
    make no cycle: one that did would also break the contracts its chain crosses.)"""
    result = subprocess.run(
        [lint_imports_command(), "--no-cache", "--no-logo"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project), "COLUMNS": "1000"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    verdicts = {}
    for line in output.splitlines():
        for name in ALL:
            if line.startswith(name) and line.rstrip().endswith((" KEPT", " BROKEN")):
                verdicts[name] = line.rstrip().rsplit(" ", 1)[1]
    assert set(verdicts) == set(ALL), output
    return result.returncode, verdicts


def test_the_unmodified_copy_keeps_every_contract(tmp_path: Path) -> None:
    status, verdicts = lint_imports(copy_project(tmp_path))
    assert status == 0
    assert verdicts == dict.fromkeys(ALL, "KEPT")


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # The core reaching up to an observer: a layer violation, and I/O in the sans-IO core.
        ("core/session.py", "import dicomfw.observe", {LAYERS, SANS_IO}),
        # The core using a clock or the event loop, though nothing above it is imported.
        ("core/stream.py", "import time", {SANS_IO}),
        ("core/policy.py", "from asyncio import Event", {SANS_IO}),
        # The relay calling back into the process that runs it.
        ("relay/server.py", "from dicomfw.service import sdnotify", {LAYERS}),
        # pki and service are siblings: neither may import the other.
        ("pki/certs.py", "from dicomfw.service.sdnotify import Notifier", {LAYERS}),
        # The order inside a package: an observer importing the module that starts them all,
        # the daemon importing its supervisor, the certificate library its command line.
        ("observe/audit.py", "from dicomfw.observe import observability", {OBSERVE}),
        ("service/daemon.py", "import dicomfw.service.supervisor", {SERVICE}),
        ("pki/certs.py", "from dicomfw.pki import cli", {PKI}),
        ("pki/certs.py", "from dicomfw.pki import checks", {PKI}),
        # The admin tools read the rules; the rules never read the tools. demo and admin are
        # siblings. Inside admin, reading a record knows nothing of what learns from it.
        ("config/describe.py", "import dicomfw.admin.lint", {LAYERS}),
        ("admin/explain.py", "import dicomfw.demo", {LAYERS}),
        ("admin/records.py", "from dicomfw.admin import learn", {ADMIN}),
        ("admin/lint.py", "from dicomfw.admin import explain", {ADMIN}),
        # The ground floor imports nothing of dicomfw's.
        ("errors.py", "import dicomfw.core.pdu", {LAYERS}),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, broken: set[str]
) -> None:
    project = copy_project(tmp_path)
    source = project / "dicomfw" / module
    source.write_text(source.read_text() + f"\n{line}  # noqa\n")
    status, verdicts = lint_imports(project)
    assert status == 1
    assert {name for name, verdict in verdicts.items() if verdict == "BROKEN"} == broken
