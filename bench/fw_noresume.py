"""Run ``dicomfw`` with upstream TLS session resumption switched off (benchmark only).

It shows what resumption buys on one-image associations: the same daemon and rules, but every
upstream connection pays a full mutual-TLS handshake. dicomfw's code is not changed; this
wrapper only stops the upstream context from remembering sessions.

    python bench/fw_noresume.py run --config rules.yaml
"""

from __future__ import annotations

import sys
from typing import Any

from dicomfw import cli
from dicomfw.relay.tls import ResumingClientContext


def _forget(self: ResumingClientContext, ssl_object: Any) -> None:
    """Never keep a session, so ``wrap_bio`` never offers one."""


if __name__ == "__main__":
    ResumingClientContext.remember = _forget  # type: ignore[method-assign,unused-ignore]
    sys.exit(cli.main())
