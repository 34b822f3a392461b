"""The admin's command line as the admin runs it: ``dicomfw …`` in a directory, bounded."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DICOMFW = shutil.which("dicomfw")


def dicomfw(
    *args: str | Path, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dicomfw`` console script (in ``cwd``, so files are named as given)."""
    assert DICOMFW is not None, "the dicomfw console script is not installed"
    return subprocess.run(
        [DICOMFW, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        input=stdin,
        check=False,
    )
