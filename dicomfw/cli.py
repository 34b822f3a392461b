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
from dicomfw.errors import ConfigErrors
from dicomfw.pki import cli as pki_cli


def _config_errors(errors: ConfigErrors) -> int:
    for error in errors.errors:
        sys.stderr.write(f"{error}\n")
    sys.stderr.write(f"dicomfw: {len(errors.errors)} error(s); nothing was started\n")
    return 1


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
    from dicomfw.service.daemon import expiring_crls, load_runtime

    try:
        runtime = load_runtime(args.config)
    except ConfigErrors as errors:
        return _config_errors(errors)
    sys.stdout.write(describe(runtime.config))
    for listener, crl, due in expiring_crls(runtime):  # what the daemon warns of, too
        sys.stderr.write(
            f"warning: {crl}: listeners.{listener}.tls.crl: next update due on"
            f" {due:%Y-%m-%d %H:%M} UTC: renew it (dicomfw certs crl) and reload before then,"
            " or the listener refuses every client certificate\n"
        )
    sys.stdout.write(f"\n{args.config}: OK\n")
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

    check = commands.add_parser("check", help="validate a rules file and show what it means")
    check.add_argument("--config", "-c", type=Path, required=True)
    check.set_defaults(func=cmd_check)

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
