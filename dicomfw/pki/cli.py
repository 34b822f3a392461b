"""``dicomfw certs …``: argparse wiring for the certificate life cycle in :mod:`dicomfw.pki.certs`.

Exit status: 0 done / all good, 1 ``check`` found certificates to act on, 2 an error, printed
to stderr as ``dicomfw certs: <file>: <problem>``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dicomfw.config.load import load_config
from dicomfw.errors import ConfigErrors
from dicomfw.pki import certs
from dicomfw.pki.certs import CertError, CertInfo

Handler = Callable[[argparse.Namespace], int]


def _reports_errors(handler: Handler) -> Handler:
    """Turn a CertError into the one-line stderr message and exit status 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except CertError as exc:
            sys.stderr.write(f"dicomfw certs: {exc}\n")
            return 2

    return run


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _date(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


@_reports_errors
def cmd_init_ca(args: argparse.Namespace) -> int:
    """``certs init-ca``: create the site CA."""
    paths = certs.init_ca(
        args.dir, name=args.name, days=args.days, key_type=args.key_type, force=args.force
    )
    sys.stdout.write(
        f"wrote {paths.cert} (give this to peers as their CA)\n"
        f"wrote {paths.key} (mode 0600; keep it offline if you can)\n"
    )
    return 0


@_reports_errors
def cmd_issue(args: argparse.Namespace) -> int:
    """``certs issue``: a server or client certificate signed by the site CA."""
    paths = certs.issue(
        args.ca,
        args.name,
        args.kind,
        args.out,
        dns=args.dns,
        ips=args.ip,
        ae_title=args.ae,
        days=args.days,
        key_type=args.key_type,
        force=args.force,
    )
    info = certs.inspect(paths.cert)[0]
    sys.stdout.write(
        f"wrote {paths.cert} ({args.kind} certificate {info.subject}, serial {info.serial},"
        f" valid until {_date(info.not_after)})\n"
        f"wrote {paths.key} (mode 0600)\n"
    )
    return 0


@_reports_errors
def cmd_csr(args: argparse.Namespace) -> int:
    """``certs csr``: a key and a signing request for a site's own PKI."""
    paths = certs.make_csr(
        args.name,
        args.out,
        dns=args.dns,
        ips=args.ip,
        ae_title=args.ae,
        key_type=args.key_type,
        force=args.force,
    )
    sys.stdout.write(
        f"wrote {paths.csr} (send this to your CA)\nwrote {paths.key} (mode 0600; keep it here)\n"
    )
    return 0


@_reports_errors
def cmd_revoke(args: argparse.Namespace) -> int:
    """``certs revoke``: add a certificate to the site CA's CRL."""
    info = certs.inspect(args.cert)[0]
    certs.revoke(args.ca, args.cert, args.crl, days=args.days)
    sys.stdout.write(
        f"revoked serial {info.serial} ({info.subject}) in {args.crl}, a CRL valid for"
        f" {args.days} days: run revoke again before then, and reload dicomfw to apply\n"
    )
    return 0


@_reports_errors
def cmd_install(args: argparse.Namespace) -> int:
    """``certs install`` / ``certs rotate``: check a new pair and swap it in atomically."""
    password = None
    if args.key_password_file is not None:
        try:
            password = args.key_password_file.read_bytes().strip()
        except OSError as exc:
            raise CertError(exc.strerror or str(exc), args.key_password_file) from exc
    pair = certs.install(
        args.cert, args.key, args.dest_cert, args.dest_key, ca=args.ca, key_password=password
    )
    backups = [p for p in (pair.previous_cert, pair.previous_key) if p is not None]
    kept = f"; kept the previous files as {', '.join(map(str, backups))}" if backups else ""
    sys.stdout.write(f"installed {pair.cert} and {pair.key}{kept}; reload dicomfw to use them\n")
    return 0


def _sans(info: CertInfo) -> str:
    names = (
        [f"DNS:{n}" for n in info.dns_names]
        + [f"IP:{ip}" for ip in info.ip_addresses]
        + [f"URI:{uri}" for uri in info.uris]
    )
    return ", ".join(names) or "none"


def _days_ago(info: CertInfo, now: datetime) -> int:
    """Whole days since an expired certificate ran out (``days_left`` rounds the other way)."""
    return (now - info.not_after) // timedelta(days=1)


def _validity(info: CertInfo, now: datetime) -> str:
    span = f"{_date(info.not_before)} to {_date(info.not_after)}"
    if info.days_left < 0:
        return f"{span} (EXPIRED {_days_ago(info, now)} days ago)"
    if info.not_before > now:
        return f"{span} (NOT YET VALID)"
    return f"{span} ({info.days_left} days left)"


def _chain(info: CertInfo) -> str:
    if info.chain_ok is None:
        return "not checked (give --ca)"
    return "ok" if info.chain_ok else f"FAILED: {info.chain_error}"


def _show(path: Path, infos: Sequence[CertInfo], now: datetime) -> str:
    blocks = []
    for index, info in enumerate(infos, 1):
        title = f"{path} [{index}/{len(infos)}]" if len(infos) > 1 else str(path)
        if info.is_ca:
            usage = "CA"
        else:
            usage = ", ".join(info.extended_key_usage) or "any (no extendedKeyUsage)"
        rows = [
            ("subject", info.subject),
            ("SAN", _sans(info)),
            ("AE binding", ", ".join(info.ae_binding) or "none"),
            ("usage", usage),
            ("issuer", info.issuer),
            ("serial", info.serial),
            ("SHA-256", info.fingerprint_sha256),
            ("key", f"{info.key_type.upper()} {info.key_size}"),
            ("valid", _validity(info, now)),
            ("chain", _chain(info)),
        ]
        blocks.append(title + "\n" + "".join(f"  {k:<11} {v}\n" for k, v in rows))
    return "\n".join(blocks)


@_reports_errors
def cmd_show(args: argparse.Namespace) -> int:
    """``certs show``: what each certificate holds, for an admin to read."""
    now = datetime.now(UTC)
    blocks = [_show(path, certs.inspect(path, ca=args.ca, now=now), now) for path in args.paths]
    sys.stdout.write("\n".join(blocks))
    return 0


def _problems(info: CertInfo, warn_days: int, now: datetime) -> list[str]:
    if info.days_left < 0:
        return [f"EXPIRED on {_date(info.not_after)} ({_days_ago(info, now)} days ago)"]
    if info.not_before > now:
        return [f"not valid before {_date(info.not_before)}"]
    # Past this point the certificate itself is valid now: a chain failure is news.
    problems = []
    if info.expires_within(warn_days, now):
        problems.append(f"expires on {_date(info.not_after)} ({info.days_left} days left)")
    if info.chain_ok is False:
        problems.append(f"chain check failed: {info.chain_error}")
    return problems


def check_paths(paths: Sequence[Path], warn_days: int, ca: Path | None) -> tuple[int, str]:
    """Check every certificate in ``paths``; return the exit status and the text to print.

    Status 1 lists each certificate that has expired, expires within ``warn_days``, is not yet
    valid, or (given ``ca``) does not chain to the CA; status 0 is a one-line OK. A file that
    cannot be read raises CertError.
    """
    now = datetime.now(UTC)
    lines = []
    count = 0
    for path in paths:
        for info in certs.inspect(path, ca=ca, now=now):
            count += 1
            lines += [f"{path}: {info.subject}: {p}\n" for p in _problems(info, warn_days, now)]
    if lines:
        return 1, "".join(lines)
    chained = f", chain to {ca} ok" if ca is not None else ""
    return 0, (
        f"OK: {count} certificate(s) in {len(paths)} file(s) valid for more than"
        f" {warn_days} days{chained}\n"
    )


@_reports_errors
def cmd_check(args: argparse.Namespace) -> int:
    """``certs check``: exit 1 when a certificate needs attention (for cron and monitoring)."""
    paths = list(args.paths)
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigErrors as errors:
            raise CertError(f"cannot read the rules: {errors}", args.config) from errors
        paths += [path for _, path in config.certificate_files() if path not in paths]
    if not paths:
        raise CertError("name certificate files or --config RULES")
    status, text = check_paths(paths, args.warn_days, args.ca)
    sys.stdout.write(text)
    return status


def _add_san_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="SAN DNS name (repeatable)"
    )
    parser.add_argument(
        "--ip", action="append", default=[], metavar="ADDR", help="SAN IP address (repeatable)"
    )
    parser.add_argument(
        "--ae", metavar="AE", help="bind to this DICOM AE title (URI SAN urn:dicom:ae:AE)"
    )


def _add_key_type(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-type", choices=("ec", "rsa"), default="ec", help="EC P-256 (default) or RSA 3072"
    )


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace existing files")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``certs`` command and its sub-commands to the ``dicomfw`` parser."""
    certs_parser = subparsers.add_parser(
        "certs", help="site CA, certificates, CSRs, CRLs, rotation and expiry checks"
    )
    sub = certs_parser.add_subparsers(dest="certs_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("init-ca", help="create a site CA (ca.pem, ca.key)")
    p.add_argument("--dir", type=Path, required=True, help="directory for ca.pem and ca.key")
    p.add_argument("--name", default="dicomfw site CA", help="CA common name")
    p.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    _add_key_type(p)
    _add_force(p)
    p.set_defaults(func=cmd_init_ca)

    p = sub.add_parser("issue", help="issue a server or client certificate from the site CA")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the init-ca directory")
    p.add_argument("--name", required=True, help="subject CN and file name (<out>/<name>.pem)")
    p.add_argument("--kind", choices=("server", "client"), required=True)
    _add_san_options(p)
    p.add_argument("--days", type=int, default=825, help="validity (default 825)")
    _add_key_type(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    _add_force(p)
    p.set_defaults(func=cmd_issue)

    p = sub.add_parser("csr", help="create a key and a signing request for another CA")
    p.add_argument("--name", required=True, help="subject CN and file name (<out>/<name>.csr)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    _add_san_options(p)
    _add_key_type(p)
    _add_force(p)
    p.set_defaults(func=cmd_csr)

    p = sub.add_parser("revoke", help="add a certificate to the site CA's CRL")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the init-ca directory")
    p.add_argument("--cert", type=Path, required=True, metavar="PEM", help="certificate to revoke")
    p.add_argument("--crl", type=Path, required=True, metavar="PATH", help="CRL to create/extend")
    p.add_argument("--days", type=int, default=30, help="CRL validity (default 30)")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser(
        "install", aliases=["rotate"], help="check a new certificate and key, then swap them in"
    )
    p.add_argument("--cert", type=Path, required=True, help="new certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    p.add_argument("--dest-cert", type=Path, required=True, help="certificate path dicomfw loads")
    p.add_argument("--dest-key", type=Path, required=True, help="key path dicomfw loads")
    p.add_argument("--ca", type=Path, metavar="CA_PEM", help="require a chain to this CA")
    p.add_argument(
        "--key-password-file",
        type=Path,
        metavar="FILE",
        help="password of an encrypted key (the key is installed still encrypted)",
    )
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("show", help="describe certificates for an admin")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.add_argument("--ca", type=Path, metavar="CA_PEM", help="also check the chain to this CA")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("check", help="exit 1 if a certificate expires soon or fails its chain")
    p.add_argument("paths", type=Path, nargs="*", metavar="PATH")
    p.add_argument(
        "--config", type=Path, metavar="RULES", help="check every certificate this rules file uses"
    )
    p.add_argument(
        "--warn-days", type=_non_negative, default=30, metavar="N", help="window (default 30)"
    )
    p.add_argument("--ca", type=Path, metavar="CA_PEM", help="also check the chain to this CA")
    p.set_defaults(func=cmd_check)
