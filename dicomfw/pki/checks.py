"""``dicomfw certs check``: what in certificate, key, CA and CRL files needs an admin's attention.

Two ways in. Named files (``check_paths``): every certificate's and CRL's validity, and given
``--ca`` each certificate's chain. A rules file (``check_config``): every TLS endpoint it
configures (listener, upstream, ATNA collector), each file in the role it plays there: the
certificate fits the role and chains to the CA that endpoint is configured with, the key belongs
to the certificate and opens with its password file, the CRL was issued by the endpoint's CA
and is current. The same problems stop ``dicomfw check`` and a reload (``relay/tlsfiles.py``);
this finds them ahead, together with what runs out within ``--warn-days``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TypeVar

from cryptography import x509

from dicomfw.config.model import Config, TlsEndpoint
from dicomfw.pki import certs
from dicomfw.pki.certs import CertInfo, CrlInfo
from dicomfw.relay.tlsfiles import (
    CRL_WARN_DAYS,
    TlsFileError,
    read_certificates,
    read_crls,
    read_pair,
)

T = TypeVar("T")

_DAY: Final = timedelta(days=1)
_HOUR: Final = timedelta(hours=1)


def date(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def span(delta: timedelta) -> str:
    """A time span as an admin reads it: whole days, rounded to the nearest (a 3-day
    certificate issued a moment ago has 3 days left, not 2), or hours under a day."""
    if delta >= _DAY:
        days = round(delta / _DAY)
        return f"{days} day{'s' if days != 1 else ''}"
    hours = round(delta / _HOUR)
    if hours < 1:
        return "less than an hour"
    return f"{hours} hour{'s' if hours != 1 else ''}"


def cert_problems(info: CertInfo, warn_days: int, now: datetime) -> list[str]:
    """What is wrong with one certificate: expired, not yet valid, expiring within
    ``warn_days``, or (when checked) a chain that does not verify."""
    if info.not_after <= now:
        return [f"EXPIRED on {date(info.not_after)} ({span(now - info.not_after)} ago)"]
    if info.not_before > now:
        return [f"not valid before {date(info.not_before)}"]
    # Past this point the certificate itself is valid now: a chain failure is news.
    problems = []
    if info.expires_within(warn_days, now):
        left = span(info.not_after - now)
        problems.append(f"expires on {date(info.not_after)} ({left} left)")
    if info.chain_ok is False:
        problems.append(f"chain check failed: {info.chain_error}")
    return problems


def crl_problems(info: CrlInfo, warn_days: int, now: datetime, ca: Path | None) -> list[str]:
    """What is wrong with one CRL: not issued by (a CA in) ``ca`` when that was checked, not
    valid yet, past its nextUpdate, or reaching it within ``warn_days``. A listener that loads
    a CRL in any of the first three states refuses every client certificate."""
    everyone = "a listener that loads it refuses every client certificate"
    if info.issuer_ok is False:
        return [f"not issued by a CA in {ca} (or its signature does not verify): {everyone}"]
    if info.this_update > now:
        return [f"not valid before {date(info.this_update)} (is a clock wrong?): {everyone}"]
    if info.next_update is None:
        return []
    if info.next_update <= now:
        return [
            f"EXPIRED on {date(info.next_update)} ({span(now - info.next_update)} ago): {everyone}"
        ]
    if info.next_update <= now + timedelta(days=warn_days):
        left = span(info.next_update - now)
        return [
            f"next update due on {date(info.next_update)} ({left} left): renew it"
            " (dicomfw certs crl) and reload before then"
        ]
    return []


def check_paths(
    paths: Sequence[Path], warn_days: int, ca: Path | None, crl_warn_days: int = CRL_WARN_DAYS
) -> tuple[int, str]:
    """Check every certificate and CRL in ``paths``; return the exit status and the text.

    Status 1 lists each certificate that has expired, expires within ``warn_days``, is not yet
    valid, or (given ``ca``) does not chain to the CA, and each CRL past its nextUpdate or
    reaching it within ``crl_warn_days``; status 0 is a one-line OK. A file that cannot be
    read raises CertError.
    """
    now = datetime.now(UTC)
    lines = []
    counts = {"certificate": 0, "CRL": 0}
    for path in paths:
        if certs.is_crl_file(path):
            for crl in certs.inspect_crls(path, ca=ca):
                counts["CRL"] += 1
                problems = crl_problems(crl, crl_warn_days, now, ca)
                lines += [f"{path}: CRL of {crl.issuer}: {p}\n" for p in problems]
            continue
        for info in certs.inspect(path, ca=ca, now=now):
            counts["certificate"] += 1
            lines += [f"{path}: {info.subject}: {p}\n" for p in cert_problems(info, warn_days, now)]
    if lines:
        return 1, "".join(lines)
    found = " and ".join(f"{n} {kind}(s)" for kind, n in counts.items() if n)
    chained = f", chain to {ca} ok" if ca is not None else ""
    return 0, (
        f"OK: {found} in {len(paths)} file(s) valid for more than {warn_days} days{chained}\n"
    )


@dataclass
class Survey:
    """What ``check_config`` found: one line per problem (``FILE: SETTING: problem``) and the
    files it read, by kind; with the windows it checked against and the moment it did."""

    warn_days: int
    crl_warn_days: int
    now: datetime
    problems: list[str] = field(default_factory=list)
    certificates: set[Path] = field(default_factory=set)
    keys: set[Path] = field(default_factory=set)
    cas: set[Path] = field(default_factory=set)
    crls: set[Path] = field(default_factory=set)

    def summary(self) -> str:
        counts = [
            (len(self.certificates), "certificate"),
            (len(self.keys), "key"),
            (len(self.cas), "CA file"),
            (len(self.crls), "CRL file"),
        ]
        return ", ".join(f"{n} {what}(s)" for n, what in counts)

    def endpoint(self, endpoint: TlsEndpoint, extra: list[x509.Certificate]) -> None:
        """Check one endpoint's files; ``extra`` CA certificates are accepted as anchors next
        to its own."""
        anchors = self._ca(endpoint)
        self._pair(endpoint, [*(anchors or []), *extra])
        if anchors is not None:
            self._crl(endpoint, anchors)

    def _add(self, path: Path, setting: str, problem: str) -> None:
        line = f"{path}: {setting}: {problem}\n"
        if line not in self.problems:  # a CA file several endpoints share is reported once
            self.problems.append(line)

    def _read(self, endpoint: TlsEndpoint, read: Callable[[], T]) -> T | None:
        """Run a ``tlsfiles`` reader; what it refuses is a problem with the file it names."""
        try:
            return read()
        except TlsFileError as error:
            self._add(error.path, f"{endpoint.setting}.{error.field}", error.message)
            return None

    def _expiry(self, path: Path, setting: str, certificate: x509.Certificate) -> None:
        info = certs.describe(certificate, self.now)
        for problem in cert_problems(info, self.warn_days, self.now):
            self._add(path, setting, f"{info.subject}: {problem}")

    def _ca(self, endpoint: TlsEndpoint) -> list[x509.Certificate] | None:
        """The endpoint's CA certificates (None if unreadable), each checked for expiry."""
        ca = endpoint.ca
        if ca is None:
            return None
        self.cas.add(ca)
        anchors = self._read(endpoint, lambda: read_certificates(ca, "ca"))
        for certificate in anchors or []:
            self._expiry(ca, f"{endpoint.setting}.ca", certificate)
        return anchors

    def _pair(self, endpoint: TlsEndpoint, anchors: list[x509.Certificate]) -> None:
        cert, key = endpoint.cert, endpoint.key
        if cert is None or key is None:
            return
        self.certificates.add(cert)
        self.keys.add(key)
        setting = f"{endpoint.setting}.cert"
        chain = self._read(endpoint, lambda: read_certificates(cert, "cert"))
        if chain is None:
            return
        for certificate in chain:
            self._expiry(cert, setting, certificate)
        role = certs.role_problem(chain[0], endpoint.presents)
        if role is not None:
            self._add(cert, setting, f"not a {endpoint.presents} certificate: {role}")
            return
        problem = certs.chain_problem(chain[0], chain[1:], anchors, self.now) if anchors else None
        if problem is not None:
            self._add(cert, setting, f"does not chain to {endpoint.ca}: {problem}")
        self._read(endpoint, lambda: read_pair(cert, key, endpoint.key_password_file))

    def _crl(self, endpoint: TlsEndpoint, anchors: list[x509.Certificate]) -> None:
        path = endpoint.crl
        if path is None:
            return
        self.crls.add(path)
        for crl in self._read(endpoint, lambda: read_crls(path)) or []:
            info = certs.describe_crl(crl, anchors)
            for problem in crl_problems(info, self.crl_warn_days, self.now, endpoint.ca):
                self._add(path, f"{endpoint.setting}.crl", f"CRL of {info.issuer}: {problem}")


def check_config(
    config: Config,
    warn_days: int,
    crl_warn_days: int = CRL_WARN_DAYS,
    extra_ca: Path | None = None,
    now: datetime | None = None,
) -> Survey:
    """Check every TLS file ``config`` names, each in the role its endpoint gives it.

    A certificate must chain to its endpoint's ``ca`` (or to ``extra_ca``, for a site whose
    listener certificate comes from another CA than the clients'), fit the endpoint's role
    (``certs.role_problem``) and not expire within ``warn_days``; its key must belong to it
    and open with the password file; every CA certificate must stay valid as long; a CRL must
    come from the endpoint's CA and not reach its nextUpdate within ``crl_warn_days``.
    """
    survey = Survey(warn_days, crl_warn_days, now or datetime.now(UTC))
    extra = read_certificates(extra_ca, "ca") if extra_ca is not None else []
    for endpoint in config.tls_endpoints():
        survey.endpoint(endpoint, extra)
    return survey
