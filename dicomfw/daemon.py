"""The daemon process: load, bind, serve; SIGHUP reloads, SIGTERM/SIGINT drain and stop.

A reload validates everything first (rules file *and* every certificate, key and CA it names)
and then swaps one reference: new associations get the new rules and TLS contexts, open ones
finish on what they started with, and a failed reload changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from dicomfw.config.load import load_config
from dicomfw.errors import ConfigError, ConfigErrors
from dicomfw.eventlog import log_observer
from dicomfw.logsetup import log_event
from dicomfw.observability import Observability
from dicomfw.relay.server import Relay, Runtime, build_runtime
from dicomfw.sdnotify import Notifier

log = logging.getLogger("dicomfw.daemon")


def load_runtime(config_path: Path) -> Runtime:
    """Rules file plus all TLS material, or ConfigErrors naming each file and problem."""
    try:
        return build_runtime(load_config(config_path))
    except ConfigError as error:
        raise ConfigErrors([error]) from error


def _listeners_changed(old: Runtime, new: Runtime) -> list[str]:
    before = {(x.name, x.host, x.port, x.tls is None) for x in old.config.listeners}
    after = {(x.name, x.host, x.port, x.tls is None) for x in new.config.listeners}
    return sorted({name for name, *_ in before ^ after})


def reload(relay: Relay, config_path: Path, observability: Observability | None = None) -> bool:
    """Re-read rules and certificates; swap them in only if all of it is valid."""
    ok = _reload(relay, config_path)
    if observability is not None:
        if ok:
            observability.reloaded(relay.runtime.config)
        else:
            observability.reload_failed()
    return ok


def _reload(relay: Relay, config_path: Path) -> bool:
    try:
        runtime = load_runtime(config_path)
    except ConfigErrors as errors:
        for error in errors.errors:
            log_event(log, logging.ERROR, "reload_failed", error=str(error))
        return False
    changed = _listeners_changed(relay.runtime, runtime)
    if changed:
        log_event(
            log,
            logging.ERROR,
            "reload_failed",
            listeners=",".join(changed),
            error="listener bind address or TLS on/off changed: restart the service",
        )
        return False
    relay.swap(runtime)
    log_event(
        log,
        logging.INFO,
        "reloaded",
        config=str(config_path),
        routes=len(runtime.config.policy.routes),
        peers=len(runtime.config.policy.peers),
    )
    return True


def _status(relay: Relay, doing: str = "serving") -> str:
    """The line ``systemctl status`` shows: live counts from the relay's limiter."""
    usage = relay.limiter.usage()
    return f"{doing}: {usage.active} associations, {usage.pending} connecting"


def _reload_and_notify(
    relay: Relay, config_path: Path, observability: Observability, notifier: Notifier
) -> None:
    """SIGHUP under systemd: RELOADING=1, then READY=1 whether the reload worked or not (a
    failed reload keeps serving the previous rules, and says so in STATUS=)."""
    notifier.reloading()
    ok = reload(relay, config_path, observability)
    notifier.ready(_status(relay, "serving" if ok else "serving the old rules (reload failed)"))


async def serve(
    config_path: Path,
    drain_seconds: float | None = None,
    on_ready: Callable[[Relay], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit status.

    ``drain_seconds`` overrides the rules file's ``limits.drain_seconds`` (as current at
    SIGTERM, after any reloads).
    """
    runtime = load_runtime(config_path)
    observability = Observability(runtime.config)  # metrics endpoint, audit sinks
    relay = Relay(runtime, [log_observer, *observability.observers])
    try:
        await relay.start()
    except BaseException:
        observability.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    notifier = Notifier()
    loop.add_signal_handler(
        signal.SIGHUP, _reload_and_notify, relay, config_path, observability, notifier
    )
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    ports = relay.bound_ports()
    log_event(
        log,
        logging.INFO,
        "ready",
        config=str(config_path),
        listeners=",".join(f"{name}:{port}" for name, port in ports.items()),
    )
    if on_ready is not None:
        on_ready(relay)
    notifier.ready(_status(relay))  # every listener is bound and accepting
    stop_heartbeat = notifier.start_heartbeat(lambda: _status(relay))
    await stop.wait()
    if drain_seconds is None:
        drain_seconds = relay.runtime.config.limits.drain_seconds
    await relay.close_listeners()
    notifier.stopping(_status(relay, "draining"))
    log_event(
        log,
        logging.INFO,
        "stopping",
        open_associations=len(relay.associations),
        drain_seconds=drain_seconds,
    )
    await relay.stop(drain_seconds)  # the watchdog keeps ticking through the drain
    stop_heartbeat()
    notifier.close()
    observability.close()  # after the drain: the audit records every association's end
    log_event(log, logging.INFO, "stopped")
    return 0


def run(config_path: Path, drain_seconds: float | None = None) -> int:
    """Run the daemon on uvloop when it is installed (less CPU and memory per association)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config_path, drain_seconds))
    return int(uvloop.run(serve(config_path, drain_seconds)))
