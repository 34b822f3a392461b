"""Build step: compile the per-message hot path with mypyc when a C compiler is at hand.

The sans-IO core and the relay's protocol classes run for every PDU and DIMSE message. They are
plain, strictly typed Python; mypyc turns them into C extensions that take ~40 % less CPU per
C-ECHO round trip (README.md, "Dependencies and why"). The sources stay the reference: with
``DICOMFW_PURE_PYTHON=1``, or without a C compiler and Python's headers, the package installs
as pure Python and behaves the same (the test suite passes either way).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

#: Modules on the per-message path. Edges (CLI, config, metrics, audit) stay interpreted.
COMPILED = [
    "dicomfw/errors.py",
    "dicomfw/core/pdu.py",
    "dicomfw/core/acse.py",
    "dicomfw/core/dimse.py",
    "dicomfw/core/uids.py",
    "dicomfw/core/findings.py",
    "dicomfw/core/dictionary.py",
    "dicomfw/core/values.py",
    "dicomfw/core/executable.py",
    "dicomfw/core/pixels.py",
    "dicomfw/core/querykeys.py",
    "dicomfw/core/dataset.py",
    "dicomfw/core/content.py",
    "dicomfw/core/policy.py",
    "dicomfw/core/ratelimit.py",
    "dicomfw/core/stream.py",
    "dicomfw/core/session.py",
    "dicomfw/relay/server.py",
]


def _can_compile() -> bool:
    if os.environ.get("DICOMFW_PURE_PYTHON") == "1":
        return False
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which(compiler) is not None and headers.exists()


def _extensions() -> list[object]:
    if not _can_compile():
        sys.stderr.write("dicomfw: installing as pure Python (no mypyc compilation)\n")
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3", group_name="dicomfw"))


setup(ext_modules=_extensions())
