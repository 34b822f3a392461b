"""Certificate identity binding: every field a peer is bound to must match the certificate."""

from __future__ import annotations

import ipaddress

import pytest

from dicomfw.core.policy import (
    Accept,
    AllowRule,
    CertificateIdentity,
    Peer,
    Policy,
    PresentedIdentity,
    Reject,
    Route,
)

PRESENTED = PresentedIdentity(
    subject_cn="ws1.example",
    san_dns=("ws1.example", "ws1"),
    san_uri=("urn:dicom:ae:WS1",),
    fingerprint_sha256="ab" * 32,
)


@pytest.mark.parametrize(
    ("binding", "accepted"),
    [
        (CertificateIdentity(subject_cn="ws1.example"), True),
        (CertificateIdentity(subject_cn="ws2.example"), False),
        (CertificateIdentity(san_dns="ws1"), True),
        (CertificateIdentity(san_dns="ws9"), False),
        (CertificateIdentity(san_uri="urn:dicom:ae:WS1"), True),
        (CertificateIdentity(san_uri="urn:dicom:ae:CT01"), False),
        (CertificateIdentity(fingerprint_sha256="ab" * 32), True),
        (CertificateIdentity(fingerprint_sha256="cd" * 32), False),
        (CertificateIdentity(subject_cn="ws1.example", fingerprint_sha256="cd" * 32), False),
    ],
)
def test_a_bound_peer_is_accepted_only_with_a_matching_certificate(
    binding: CertificateIdentity, accepted: bool
) -> None:
    policy = Policy(
        peers=(Peer("WS1", (ipaddress.ip_network("10.0.0.0/8"),), binding),),
        routes=(Route("r", "remote", "PACS", "pacs", (AllowRule(frozenset({"C-ECHO"})),)),),
    )
    address = ipaddress.ip_address("10.1.2.3")
    verdict = policy.decide_association("remote", address, "WS1", "PACS", PRESENTED)
    without_tls = policy.decide_association("remote", address, "WS1", "PACS", None)
    assert isinstance(verdict, Accept) is accepted
    if not accepted:
        assert isinstance(verdict, Reject) and verdict.why == "certificate_mismatch"
        assert (verdict.result, verdict.source, verdict.reason) == (1, 1, 3)
    assert isinstance(without_tls, Reject)  # a bound peer never comes in over plain TCP
