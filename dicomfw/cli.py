"""``dicomfw``: the command line. Nothing imports this module; it only wires edges together."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dicomfw import __version__, logsetup
from dicomfw.config.describe import describe
from dicomfw.config.load import load_config
from dicomfw.errors import ConfigErrors
from dicomfw.pki import cli as pki_cli


def _config_errors(
    errors: ConfigErrors, status: int = 1, outcome: str = "nothing was started"
) -> int:
    for error in errors.errors:
        sys.stderr.write(f"{error}\n")
    sys.stderr.write(f"dicomfw: {len(errors.errors)} error(s); {outcome}\n")
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from dicomfw.service import supervisor

    logsetup.setup(args.log_level, with_time=not args.journald)
    if args.pid_file is not None:
        args.pid_file.write_text(f"{os.getpid()}\n")
    try:
        return supervisor.run(args.config, args.drain_seconds)
    except ConfigErrors as errors:
        return _config_errors(errors)
    except OSError as error:  # e.g. a port already in use or needing privileges
        sys.stderr.write(f"dicomfw: cannot start: {error}\n")
        return 1
    finally:
        if args.pid_file is not None:
            args.pid_file.unlink(missing_ok=True)


def cmd_check(args: argparse.Namespace) -> int:
    """Exit status 1 on an error, or on a warning with ``--strict``."""
    from dicomfw.admin import lint
    from dicomfw.admin.locate import Locator
    from dicomfw.service.daemon import expiring_crls, load_runtime

    if (args.config is None) == (args.diff is None):
        sys.stderr.write("dicomfw check: give --config FILE, or --diff OLD NEW\n")
        return 2
    if args.diff is not None:
        return _check_diff(*args.diff)
    runtime = None
    try:
        if args.syntax_only:
            config = load_config(args.config, check_files=False)
        else:
            runtime = load_runtime(args.config)
            config = runtime.config
    except ConfigErrors as errors:
        return _config_errors(errors)
    sys.stdout.write(describe(config))
    warnings = [
        str(w) for w in lint.findings(config, Locator(args.config), files=not args.syntax_only)
    ]
    if runtime is not None:
        for listener, crl, due in expiring_crls(runtime):  # what the daemon warns of, too
            warnings.append(
                f"warning: {crl}: listeners.{listener}.tls.crl: next update due on"
                f" {due:%Y-%m-%d %H:%M} UTC: renew it (dicomfw certs crl) and reload before"
                " then, or the listener refuses every client certificate"
            )
    for warning in warnings:
        sys.stderr.write(f"{warning}\n")
    counted = f" ({len(warnings)} warning(s))" if warnings else ""
    sys.stdout.write(f"\n{args.config}: OK{counted}\n")
    return 1 if warnings and args.strict else 0


def _check_diff(old: Path, new: Path) -> int:
    from dicomfw.admin import changes
    from dicomfw.admin.locate import Locator

    try:
        rules = [(load_config(path, check_files=False), Locator(path)) for path in (old, new)]
    except ConfigErrors as errors:
        return _config_errors(errors, outcome="nothing was compared")
    allowed, refused = changes.diff(*rules)
    sys.stdout.write(changes.render(str(old), str(new), allowed, refused))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Exit status 0: allowed; 1: refused (or let through by monitor mode only); 2: bad input."""
    from dicomfw.admin import explain
    from dicomfw.admin.locate import Locator
    from dicomfw.admin.records import BadRecord, attempt_of, parse_line

    try:
        config = load_config(args.config, check_files=False)
    except ConfigErrors as errors:
        return _config_errors(errors, 2, "nothing was explained")
    locator = Locator(args.config)
    described = (args.listener, args.source, args.calling, args.called)
    if (args.event is None) == (None in described):
        sys.stderr.write(
            "dicomfw explain: give --event, or --listener, --from, --calling and --called\n"
        )
        return 2
    status = 0
    try:
        if args.event is None:
            identity = None if args.cert is None else explain.identity_from_pem(args.cert)
            attempt = explain.attempt_from_arguments(
                *described, identity, args.context, args.request
            )
            attempts = [attempt]
        else:
            lines = sys.stdin.read().splitlines() if args.event == "-" else [args.event]
            attempts = [attempt_of(parse_line(line)) for line in lines if line.strip()]
        answers = [explain.explain(config, locator, attempt) for attempt in attempts]
    except (BadRecord, explain.BadInput) as error:
        sys.stderr.write(f"dicomfw explain: {error}\n")
        return 2
    for number, answer in enumerate(answers):
        sys.stdout.write(("\n" if number else "") + explain.render(answer))
        status = max(status, 0 if answer.allowed else 1)
    return status


def cmd_learn(args: argparse.Namespace) -> int:
    """Exit status 0: written (or compared); 1: the rules are invalid; 2: bad input."""
    from dicomfw.admin import learn
    from dicomfw.admin.locate import Locator
    from dicomfw.admin.records import moment

    problem = ""
    if args.out is None and args.diff is None:
        problem = "give --out FILE (with --base RULES), --diff CURRENT, or both"
    elif args.out is not None and args.base is None:
        problem = "--out needs --base: the rules to take listeners and upstreams from"
    elif not (0 <= args.widen_ipv4 <= 32 and 0 <= args.widen_ipv6 <= 128):
        problem = "--widen-ipv4 is 0 to 32 bits, --widen-ipv6 0 to 128"
    try:
        since = moment(args.since) if args.since else None
        learned = learn.learn(args.audit, since) if not problem else None
    except ValueError as error:
        problem = f"--since: {error}"
    except OSError as error:
        problem = f"cannot read the audit trail: {error}"
    if problem or learned is None:
        sys.stderr.write(f"dicomfw learn: {problem}\n")
        return 2
    for line in learn.report(learned):
        sys.stderr.write(f"{line}\n")
    if args.out is not None and not learned.records:
        sys.stderr.write("dicomfw learn: no association to learn from; nothing was written\n")
        return 1
    try:
        if args.out is not None:
            base = load_config(args.base, check_files=False)
            options = learn.Options(args.widen_ipv4, args.widen_ipv6, args.mode)
            args.out.write_text(learn.rules_file(learned, args.base, base, options))
            for caution in learn.cautions(learned, base, args.base, args.out, options):
                sys.stderr.write(f"note: {caution}\n")
            written = load_config(args.out, check_files=False)
            sys.stderr.write(
                f"{args.out}: {len(written.policy.peers)} peers, {len(written.policy.routes)} "
                f"routes, from {len(learned.records)} associations; next: dicomfw check "
                f"--config {args.out}\n"
            )
        if args.diff is not None:
            current = load_config(args.diff, check_files=False)
            sys.stdout.write(learn.compare(learned, current, Locator(args.diff)))
    except ConfigErrors as errors:
        return _config_errors(errors, outcome="nothing was learned")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from dicomfw.admin import schema

    sys.stdout.write(schema.shipped())
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Send SIGHUP to a running daemon (systemd's ExecReload does the same with $MAINPID)."""
    try:
        pid = int(args.pid_file.read_text().strip()) if args.pid is None else args.pid
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"dicomfw: cannot signal the daemon: {error}\n")
        return 1
    sys.stdout.write(f"sent SIGHUP to {pid}; the daemon logs event=reloaded or reload_failed\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dicomfw import demo

    logsetup.setup(args.log_level)
    return demo.run(args.dir, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomfw", description="TLS-terminating DICOM network firewall"
    )
    parser.add_argument("--version", action="version", version=f"dicomfw {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", type=Path, required=True, help="rules file (YAML)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--journald", action="store_true", help="omit timestamps (journald adds them)")
    run.add_argument(
        "--drain-seconds",
        type=float,
        help="on SIGTERM, how long open associations may finish (default: the rules file's "
        "limits.drain_seconds, 30)",
    )
    run.add_argument("--pid-file", type=Path, help="write the process ID here (for `reload`)")
    run.set_defaults(func=cmd_run)

    check = commands.add_parser(
        "check",
        help="validate a rules file, show what it means and warn about likely mistakes; or "
        "compare two (--diff)",
    )
    check.add_argument("--config", "-c", type=Path)
    check.add_argument(
        "--syntax-only",
        action="store_true",
        help="check the rules without opening the certificate, key and CRL files they name",
    )
    check.add_argument("--strict", action="store_true", help="exit status 1 on warnings too")
    check.add_argument(
        "--diff",
        nargs=2,
        type=Path,
        metavar=("OLD", "NEW"),
        help="instead: what NEW newly allows and newly refuses compared with OLD",
    )
    check.set_defaults(func=cmd_check)

    explain = commands.add_parser(
        "explain",
        help="what the rules decide about one association or audit event, why, and what to "
        "change (exit 0 allowed, 1 refused, 2 bad input)",
    )
    explain.add_argument("--config", "-c", type=Path, required=True, help="rules file (YAML)")
    explain.add_argument(
        "--event",
        metavar="JSON",
        help='an audit record (a line of the audit file), or "-": records on stdin, one a line',
    )
    explain.add_argument("--listener", metavar="NAME")
    explain.add_argument("--from", dest="source", metavar="ADDRESS", help="source IP address")
    explain.add_argument("--calling", metavar="AE", help="calling AE title")
    explain.add_argument("--called", metavar="AE", help="called AE title")
    explain.add_argument(
        "--cert", type=Path, metavar="FILE", help="the client certificate it presents (PEM)"
    )
    explain.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="SOPCLASS[:TS[,TS]]",
        help="a proposed presentation context (default transfer syntaxes: Implicit and "
        "Explicit VR Little Endian); repeat for more",
    )
    explain.add_argument(
        "--request",
        action="append",
        default=[],
        metavar="SERVICE:SOPCLASS[:DEST]",
        help="a request, e.g. C-STORE:CTImageStorage or C-MOVE:StudyRootQueryRetrieve"
        "InformationModelMove:WS1; repeat for more",
    )
    explain.set_defaults(func=cmd_explain)

    learn = commands.add_parser(
        "learn",
        help="write the least-privilege rules that would have allowed what the audit trail "
        "shows (e.g. of a monitor-mode period), or compare it with the current rules",
    )
    learn.add_argument(
        "--audit",
        type=Path,
        nargs="+",
        required=True,
        metavar="FILE",
        help="audit files (JSON lines)",
    )
    learn.add_argument(
        "--since", metavar="TIME", help="only records from then on (ISO 8601; UTC if no offset)"
    )
    learn.add_argument(
        "--base",
        type=Path,
        metavar="RULES",
        help="the current rules: listeners, upstreams and the other sections are copied from them",
    )
    learn.add_argument("--out", type=Path, metavar="FILE", help="where to write the learned rules")
    learn.add_argument(
        "--widen-ipv4",
        type=int,
        default=32,
        metavar="BITS",
        help="widen learned IPv4 addresses to networks of this many bits (32: each address)",
    )
    learn.add_argument(
        "--widen-ipv6", type=int, default=64, metavar="BITS", help="the same for IPv6 (default 64)"
    )
    learn.add_argument(
        "--mode",
        choices=["enforce", "monitor"],
        default="enforce",
        help="mode: of the learned file (enforce)",
    )
    learn.add_argument(
        "--diff",
        type=Path,
        metavar="CURRENT",
        help="list what CURRENT allows that was never used, and what was used that it refuses",
    )
    learn.set_defaults(func=cmd_learn)

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of the rules file (for editors: yaml-language-server)",
    )
    schema.set_defaults(func=cmd_schema)

    reload = commands.add_parser("reload", help="make a running daemon re-read rules and certs")
    target = reload.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int)
    target.add_argument("--pid-file", type=Path)
    reload.set_defaults(func=cmd_reload)

    demo = commands.add_parser(
        "demo", help="create a dev CA, certificates, rules and a sample TLS PACS, and run"
    )
    demo.add_argument("--dir", type=Path, default=Path("demo"), help="where to put it (./demo)")
    demo.add_argument("--port", type=int, default=11112, help="first of three ports (11112)")
    demo.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    demo.set_defaults(func=cmd_demo)

    pki_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
