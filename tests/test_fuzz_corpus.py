"""The fuzz targets on every committed input, in the normal suite (no fuzzing engine needed).

Each seed captured from a real peer (fuzz/corpus/) and each minimised input of a past finding
(fuzz/regressions/) goes through its target in fuzz/targets.py, which checks the decoder's
promises as the fuzzer does: a finding that comes back fails here, and a change that breaks a
target (or the capture format) is caught before the next campaign.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.targets import TARGETS

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
INPUTS = sorted(
    path
    for kind in ("corpus", "regressions")
    for path in (FUZZ / kind).glob("*/*")
    if path.is_file() and path.parent.name in TARGETS
)


def test_every_target_has_seeds_captured_from_real_peers() -> None:
    seeded = {path.parent.name for path in INPUTS if path.parent.parent.name == "corpus"}
    assert seeded == set(TARGETS)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_committed_input_of_a_target_passes_its_checks(target: str) -> None:
    inputs = [path for path in INPUTS if path.parent.name == target]
    for path in inputs:
        TARGETS[target](path.read_bytes())
