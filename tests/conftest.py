"""Shared fixtures: one PKI per test session (certificate generation is the slow part)."""

from __future__ import annotations

import pytest

from tests.harness import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
