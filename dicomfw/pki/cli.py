"""``dicomfw certs …``: argparse wiring for the certificate life cycle in :mod:`dicomfw.pki.certs`.

Exit status: 0 done / all good, 1 ``check`` found certificates, keys, CAs or CRLs to act on
(``dicomfw.pki.checks``), 2 an error, printed to stderr as ``dicomfw certs: <file>: <problem>``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from dicomfw.config.load import load_config
from dicomfw.config.model import Config, TlsEndpoint
from dicomfw.errors import ConfigErrors
from dicomfw.pki import certs
from dicomfw.pki.certs import CertError, CertInfo, CrlInfo
from dicomfw.pki.checks import check_config, check_paths, date, span
from dicomfw.relay.tlsfiles import CRL_WARN_DAYS, TlsFileError

Handler = Callable[[argparse.Namespace], int]


def _reports_errors(handler: Handler) -> Handler:
    """Turn a CertError into the one-line stderr message and exit status 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (CertError, TlsFileError) as exc:
            sys.stderr.write(f"dicomfw certs: {exc}\n")
            return 2

    return run


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


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
        f" valid until {date(info.not_after)})\n"
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
    crl = certs.revoke(args.ca, args.cert, args.crl, days=args.days)
    sys.stdout.write(
        f"revoked serial {info.serial} ({info.subject}) in {args.crl}{_crl_validity(crl, args)}"
    )
    return 0


@_reports_errors
def cmd_crl(args: argparse.Namespace) -> int:
    """``certs crl``: issue the site CA's CRL again with a new nextUpdate (cron, timers)."""
    crl = certs.renew_crl(args.ca, args.crl, days=args.days)
    listed = f"{len(crl.revoked)} revoked serial(s)"
    sys.stdout.write(
        f"wrote {args.crl}, CRL number {crl.number} with {listed}{_crl_validity(crl, args)}"
    )
    return 0


def _crl_validity(crl: CrlInfo, args: argparse.Namespace) -> str:
    """Until when the CRL just written is valid, and what has to happen before then."""
    assert crl.next_update is not None  # dicomfw always writes one
    return (
        f", valid until {date(crl.next_update)} ({args.days} days): renew it before then"
        f" (dicomfw certs crl --ca {args.ca} --crl {args.crl}, e.g. from"
        " systemd/dicomfw-crl.timer), and reload dicomfw to apply\n"
    )


def _endpoint(args: argparse.Namespace) -> TlsEndpoint:
    """The listener or upstream ``--listener``/``--upstream`` names in the ``--config`` rules."""
    config = _rules(args.config)
    kind, name = ("listener", args.listener) if args.listener else ("upstream", args.upstream)
    found = [e for e in config.tls_endpoints() if (e.kind, e.name) == (kind, name)]
    if not found or found[0].cert is None or found[0].key is None:
        defined = [e.name for e in config.tls_endpoints() if e.kind == kind and e.cert]
        raise CertError(
            f"no {kind} {name!r} with a TLS certificate and key"
            f" (defined: {', '.join(defined) or 'none'})",
            args.config,
        )
    return found[0]


@_reports_errors
def cmd_install(args: argparse.Namespace) -> int:
    """``certs install`` / ``certs rotate``: check a new pair and swap it in atomically."""
    dest_cert, dest_key, ca = args.dest_cert, args.dest_key, args.ca
    password_file, presents = args.key_password_file, args.kind
    if args.config is not None:
        if args.listener is None and args.upstream is None:
            raise CertError("with --config, name --listener NAME or --upstream NAME")
        endpoint = _endpoint(args)
        dest_cert, dest_key, presents = endpoint.cert, endpoint.key, endpoint.presents
        ca = ca or endpoint.ca
        password_file = password_file or endpoint.key_password_file
    elif dest_cert is None or dest_key is None:
        raise CertError(
            "give --dest-cert and --dest-key, or --config RULES with --listener/--upstream"
        )
    pair = certs.install(
        args.cert,
        args.key,
        dest_cert,
        dest_key,
        ca=ca,
        key_password_file=password_file,
        presents=presents,
    )
    checked = [f"a {presents} certificate"] if presents else []
    checked += [f"chains to {ca}"] if ca is not None else []
    backups = [p for p in (pair.previous_cert, pair.previous_key) if p is not None]
    kept = f"; kept the previous files as {', '.join(map(str, backups))}" if backups else ""
    sys.stdout.write(
        f"installed {pair.cert} and {pair.key} ({', '.join(['key matches', *checked])}){kept};"
        " reload dicomfw to use them\n"
    )
    return 0


def _sans(info: CertInfo) -> str:
    names = (
        [f"DNS:{n}" for n in info.dns_names]
        + [f"IP:{ip}" for ip in info.ip_addresses]
        + [f"URI:{uri}" for uri in info.uris]
    )
    return ", ".join(names) or "none"


def _validity(info: CertInfo, now: datetime) -> str:
    period = f"{date(info.not_before)} to {date(info.not_after)}"
    if info.not_after <= now:
        return f"{period} (EXPIRED {span(now - info.not_after)} ago)"
    if info.not_before > now:
        return f"{period} (NOT YET VALID)"
    return f"{period} ({span(info.not_after - now)} left)"


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
        blocks.append(_rows(title, rows))
    return "\n".join(blocks)


def _rows(title: str, rows: Sequence[tuple[str, str]]) -> str:
    return title + "\n" + "".join(f"  {k:<11} {v}\n" for k, v in rows)


def _next_update(info: CrlInfo, now: datetime) -> str:
    if info.next_update is None:
        return "none given"
    if info.next_update <= now:
        return (
            f"{date(info.next_update)} (EXPIRED {span(now - info.next_update)} ago:"
            " listeners that load it refuse every client)"
        )
    return f"{date(info.next_update)} ({span(info.next_update - now)} left)"


def _show_crls(path: Path, infos: Sequence[CrlInfo], now: datetime) -> str:
    blocks = []
    for index, info in enumerate(infos, 1):
        title = f"{path} [{index}/{len(infos)}]" if len(infos) > 1 else str(path)
        revoked = [f"{serial} (revoked {date(when)})" for serial, when in info.revoked]
        signed = {None: "not checked (give --ca)", True: "ok", False: "FAILED: not by this CA"}
        rows = [
            ("CRL of", info.issuer),
            ("number", str(info.number) if info.number is not None else "none"),
            ("this update", date(info.this_update)),
            ("next update", _next_update(info, now)),
            ("revoked", f"{len(info.revoked)} serial(s)"),
            *(("", line) for line in revoked),
            ("signature", signed[info.issuer_ok]),
        ]
        blocks.append(_rows(title, rows))
    return "\n".join(blocks)


@_reports_errors
def cmd_show(args: argparse.Namespace) -> int:
    """``certs show``: what each certificate or CRL holds, for an admin to read."""
    now = datetime.now(UTC)
    blocks = [
        _show_crls(path, certs.inspect_crls(path, ca=args.ca), now)
        if certs.is_crl_file(path)
        else _show(path, certs.inspect(path, ca=args.ca, now=now), now)
        for path in args.paths
    ]
    sys.stdout.write("\n".join(blocks))
    return 0


def _rules(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigErrors as errors:
        raise CertError(f"cannot read the rules: {errors}", path) from errors


@_reports_errors
def cmd_check(args: argparse.Namespace) -> int:
    """``certs check``: exit 1 when a certificate, key, CA or CRL needs attention (for cron and
    monitoring)."""
    if args.config is None and not args.paths:
        raise CertError("name certificate or CRL files, or --config RULES")
    status, text = 0, ""
    if args.paths:
        status, text = check_paths(args.paths, args.warn_days, args.ca, args.crl_warn_days)
    if args.config is not None:
        survey = check_config(_rules(args.config), args.warn_days, args.crl_warn_days, args.ca)
        if survey.problems:
            status = 1
            text += "".join(survey.problems) + f"checked {args.config}: {survey.summary()}\n"
        else:
            text += (
                f"OK: {args.config}: {survey.summary()}; no certificate expires within"
                f" {args.warn_days} days nor CRL within {args.crl_warn_days}, every key matches"
                " its certificate, every chain verifies against its endpoint's CA\n"
            )
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
        "crl", help="issue the site CA's CRL again with a new next update (run it daily)"
    )
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the init-ca directory")
    p.add_argument(
        "--crl", type=Path, required=True, metavar="PATH", help="CRL to renew (created if missing)"
    )
    p.add_argument("--days", type=int, default=30, help="validity from now (default 30)")
    p.set_defaults(func=cmd_crl)

    p = sub.add_parser(
        "install", aliases=["rotate"], help="check a new certificate and key, then swap them in"
    )
    p.add_argument("--cert", type=Path, required=True, help="new certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    p.add_argument(
        "--config",
        type=Path,
        metavar="RULES",
        help="take the destination, the CA and the role from this rules file's --listener or"
        " --upstream",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--listener", metavar="NAME", help="install the listener's certificate")
    target.add_argument("--upstream", metavar="NAME", help="install the upstream's client one")
    p.add_argument("--dest-cert", type=Path, help="certificate path dicomfw loads")
    p.add_argument("--dest-key", type=Path, help="key path dicomfw loads")
    p.add_argument(
        "--kind",
        choices=("server", "client"),
        help="with --dest-*: require a server (listener) or client (upstream) certificate",
    )
    p.add_argument(
        "--ca",
        type=Path,
        metavar="CA_PEM",
        help="require a chain to this CA (with --config: default the endpoint's ca)",
    )
    p.add_argument(
        "--key-password-file",
        type=Path,
        metavar="FILE",
        help="password of an encrypted key (the key is installed still encrypted)",
    )
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("show", help="describe certificates and CRLs for an admin")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.add_argument(
        "--ca", type=Path, metavar="CA_PEM", help="also check the chain (a CRL's signer) to this CA"
    )
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "check", help="exit 1 if a certificate, key, CA or CRL needs attention (cron, monitoring)"
    )
    p.add_argument("paths", type=Path, nargs="*", metavar="PATH", help="certificate or CRL files")
    p.add_argument(
        "--config",
        type=Path,
        metavar="RULES",
        help="check every certificate, key, CA and CRL this rules file uses, each in its role",
    )
    p.add_argument(
        "--warn-days",
        type=_non_negative,
        default=30,
        metavar="N",
        help="certificates that expire within N days need attention (default 30)",
    )
    p.add_argument(
        "--crl-warn-days",
        type=_non_negative,
        default=CRL_WARN_DAYS,
        metavar="N",
        help=f"CRLs whose next update is within N days need renewing (default {CRL_WARN_DAYS})",
    )
    p.add_argument(
        "--ca",
        type=Path,
        metavar="CA_PEM",
        help="also check chains to this CA (with --config: accepted next to each endpoint's ca)",
    )
    p.set_defaults(func=cmd_check)
