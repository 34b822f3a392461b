"""Findings of the property tests and the fuzzing campaign that the current core still has.

Each test here fails on the code as it is and passes once the finding is fixed; they are kept
apart (marked ``xfail(strict=True)``, so the suite stays green and a fix that makes one pass
is noticed at once) until the fix lands in the core. Then the fix's author removes the marker
and moves the test next to its siblings (tests/test_core_hardening.py), and the fuzz target's
work-around named in the test goes (fuzz/targets.py). docs/fuzzing.md lists every finding.

Pending finding A: ``acse.decode_rq`` reads the AE title fields as Latin-1 and accepts bytes
0x80-0xFF, which PS3.5 Table 6.2-1 does not allow in an AE title (the default character
repertoire, no control characters, no backslash), while ``acse.encode_rq`` writes titles as
ASCII: re-encoding a request whose called or calling AE has such a byte raises
``UnicodeEncodeError`` instead of the decoder refusing it as a protocol error. The session
does not reach the encoder with such a title today (policy rejects a calling or called AE
that is no configured peer or route, and the loader accepts ASCII titles only), so it is a
broken codec promise (decode∘encode on what decode accepts), not a crash of the relay. The fix
belongs in ``acse.ae_title``: refuse any byte over 0x7E, like ``dimse._ae_title`` does for a
Move Destination.
"""

from __future__ import annotations

import pytest

from dicomfw.core import acse
from dicomfw.errors import RemoteProtocolError
from tests.corehelpers import (
    VERIFICATION,
    application_context_item,
    context_rq_item,
    raw_associate_rq,
    user_information_item,
)

#: A-ASSOCIATE-RQ whose called AE field is b"P\xe9CS" (found by fuzz target acse_rq).
NON_ASCII_CALLED_AE = raw_associate_rq(
    [
        application_context_item(),
        context_rq_item(1, VERIFICATION, ["1.2.840.10008.1.2"]),
        user_information_item(),
    ],
    called=b"P\xe9CS",
)


@pytest.mark.xfail(strict=True, reason="pending finding A: non-ASCII AE titles are decoded")
def test_finding_a_an_ae_title_with_a_byte_over_0x7e_is_the_requesters_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError):
        acse.decode_rq(NON_ASCII_CALLED_AE)
