"""``python -m dicomfw``: the same command line as the ``dicomfw`` console script."""

from __future__ import annotations

import sys

from dicomfw.cli import main

if __name__ == "__main__":
    sys.exit(main())
