"""Certificate files as time and mistakes leave them: CRLs past their next update, keys under a
passphrase. ``dicomfw certs`` never writes these on purpose, so the tests make them directly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def stale_crl(ca_dir: Path, path: Path, days_ago: float = 3) -> Path:
    """An empty CRL of the CA in ``ca_dir`` whose nextUpdate passed ``days_ago`` days ago: what
    ``certs revoke`` leaves when nobody renews it."""
    return crl_until(ca_dir, path, datetime.now(UTC) - timedelta(days=days_ago))


def crl_until(ca_dir: Path, path: Path, next_update: datetime) -> Path:
    """An empty CRL of the CA in ``ca_dir``, issued 30 days before ``next_update``."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(min(next_update, datetime.now(UTC)) - timedelta(days=30))
        .next_update(next_update)
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def encrypted_key(key: Path, out: Path, password: bytes) -> Path:
    """``key`` under ``password`` (PKCS #8, the best encryption cryptography offers)."""
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    out.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
    )
    return out
