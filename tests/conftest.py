"""Shared fixtures: one PKI per test session (certificate generation is the slow part).

Also refuses to run against stale compiled modules: ``pip install -e .`` compiles the hot path
with mypyc (setup.py) into ``.so`` files beside the sources, and Python imports those first,
so after editing a compiled module the tests would otherwise exercise the old code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Pki, make_pki

PACKAGE = Path(__file__).resolve().parent.parent / "dicomfw"


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = [
        str(compiled.relative_to(PACKAGE.parent))
        for compiled in PACKAGE.rglob("*.so")
        if (source := compiled.with_name(compiled.name.split(".")[0] + ".py")).exists()
        and source.stat().st_mtime > compiled.stat().st_mtime
    ]
    if stale:
        pytest.exit(
            f"compiled modules older than their sources: {', '.join(stale)}; rebuild them "
            "with `pip install -e .`, or delete them (find dicomfw -name '*.so' -delete) to "
            "test the pure-Python sources",
            returncode=4,
        )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
