"""The daemon process: load, bind, serve; SIGHUP reloads, SIGTERM/SIGINT drain and stop.

A reload validates everything first (rules file *and* every certificate, key and CA it names)
and then swaps one reference: new associations get the new rules and TLS contexts, open ones
finish on what they started with, and a failed reload changes nothing.

The same loop runs the whole service (``workers: 1``) or one worker process of the supervisor
(``dicomfw.service.supervisor``), which hands it the validated rules and the listening sockets
it bound for every worker, and takes the reports that would otherwise go to systemd.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from dicomfw.config.load import load_config
from dicomfw.errors import ConfigError, ConfigErrors
from dicomfw.logsetup import log_event
from dicomfw.observe.eventlog import log_observer
from dicomfw.observe.metrics import LoopLagProbe, Sampler
from dicomfw.observe.observability import Observability
from dicomfw.relay.server import Relay, Runtime, build_runtime
from dicomfw.relay.tls import check_collector_files
from dicomfw.relay.tlsfiles import CRL_WARN_DAYS
from dicomfw.service.heap import HeapTrimmer, map_large_blocks
from dicomfw.service.sdnotify import Notifier

log = logging.getLogger("dicomfw.daemon")


def load_runtime(config_path: Path) -> Runtime:
    """Rules file plus all TLS material, or ConfigErrors naming each file and problem."""
    try:
        config = load_config(config_path)
        runtime = build_runtime(config)
        if config.audit is not None and config.audit.atna is not None:
            check_collector_files(config.audit.atna)
    except ConfigError as error:
        raise ConfigErrors([error]) from error
    return runtime


def served_certificates(runtime: Runtime) -> dict[str, str]:
    """Log fields naming the certificate each TLS listener and upstream presents, as loaded:
    ``listener.NAME.subject``, ``.sha256`` and ``.not_after`` (``upstream.NAME.…`` likewise,
    for an upstream given a client certificate). After a rotation, ``ready`` and ``reloaded``
    say which certificate is now served, so nobody has to guess whether the reload took it."""
    fields: dict[str, str] = {}
    served = [
        *(("listener", name, context.served) for name, context in runtime.server_contexts.items()),
        *(("upstream", name, context.served) for name, context in runtime.client_contexts.items()),
    ]
    for kind, name, certificate in served:
        if certificate is not None:
            fields[f"{kind}.{name}.subject"] = certificate.subject
            fields[f"{kind}.{name}.sha256"] = certificate.sha256
            fields[f"{kind}.{name}.not_after"] = f"{certificate.not_after:%Y-%m-%dT%H:%M:%SZ}"
    return fields


def expiring_crls(
    runtime: Runtime, now: datetime | None = None
) -> list[tuple[str, Path, datetime]]:
    """(listener, CRL file, nextUpdate) of each listener whose CRL reaches its nextUpdate
    within ``CRL_WARN_DAYS``: past it, that listener refuses every client certificate."""
    soon = (now or datetime.now(UTC)) + timedelta(days=CRL_WARN_DAYS)
    found = []
    for listener in runtime.config.listeners:
        crl = listener.tls.crl if listener.tls is not None else None
        due = runtime.server_contexts[listener.name].crl_next_update if crl else None
        if crl is not None and due is not None and due <= soon:
            found.append((listener.name, crl, due))
    return found


def warn_expiring_crls(runtime: Runtime) -> None:
    """At start and after each reload: a CRL due for renewal is news the log must carry."""
    for listener, crl, due in expiring_crls(runtime):
        log_event(
            log,
            logging.WARNING,
            "crl_expires_soon",
            listener=listener,
            crl=str(crl),
            next_update=f"{due:%Y-%m-%dT%H:%M:%SZ}",
            error="renew it (dicomfw certs crl) and reload before then: past its next update"
            " the listener refuses every client certificate",
        )


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


def revalidate(current: Runtime, config_path: Path) -> Runtime | None:
    """What a reload would swap in, or None if any of it is invalid or needs a restart (each
    problem is logged as ``event=reload_failed``)."""
    try:
        runtime = load_runtime(config_path)
    except ConfigErrors as errors:
        for error in errors.errors:
            log_event(log, logging.ERROR, "reload_failed", error=str(error))
        return None
    changed = _listeners_changed(current, runtime)
    if changed:
        log_event(
            log,
            logging.ERROR,
            "reload_failed",
            listeners=",".join(changed),
            error="listener bind address or TLS on/off changed: restart the service",
        )
        return None
    return runtime


def _reload(relay: Relay, config_path: Path) -> bool:
    runtime = revalidate(relay.runtime, config_path)
    if runtime is None:
        return False
    relay.swap(runtime)
    log_event(
        log,
        logging.INFO,
        "reloaded",
        config=str(config_path),
        routes=len(runtime.config.policy.routes),
        peers=len(runtime.config.policy.peers),
        **served_certificates(runtime),
    )
    warn_expiring_crls(runtime)
    return True


def _status(relay: Relay, doing: str = "serving") -> str:
    """The line ``systemctl status`` shows: live counts from the relay's limiter."""
    usage = relay.limiter.usage()
    return f"{doing}: {usage.active} associations, {usage.pending} connecting"


#: What ``/ready`` says while the shared limit store cannot admit anyone.
NOT_ACCEPTING = "the shared limit store does not answer (fail: closed)"


def accepting(relay: Relay) -> bool:
    """Whether new associations can be admitted now: false only while the shared limit store
    is down and the rules say ``fail: closed``."""
    return relay.limit_store is None or relay.limit_store.accepting


async def give_notice(seconds: float) -> None:
    """Draining has begun and ``/ready`` says so; keep accepting ``seconds`` longer, so load
    balancers polling ``/ready`` stop sending before the listeners close."""
    if seconds:
        log_event(log, logging.INFO, "draining", notice_seconds=seconds)
        await asyncio.sleep(seconds)


class Announcer(Protocol):
    """Whom the daemon tells that it is ready, reloading, alive and stopping: systemd, or in a
    worker process the supervisor (which speaks to systemd for all workers)."""

    def ready(self, relay: Relay) -> None: ...

    def reloading(self) -> None: ...

    def reloaded(self, relay: Relay, ok: bool) -> None: ...

    def stopping(self, relay: Relay) -> None: ...

    def start_heartbeat(self, relay: Relay) -> Callable[[], None]:
        """Report liveness from timers on the running loop; returns a function that stops it."""
        ...

    def close(self) -> None: ...


class SystemdAnnouncer:
    """sd_notify(3) for a daemon that is the whole service (no-ops outside systemd)."""

    def __init__(self) -> None:
        self._notifier = Notifier()

    def ready(self, relay: Relay) -> None:
        self._notifier.ready(_status(relay))  # every listener is bound and accepting

    def reloading(self) -> None:
        self._notifier.reloading()

    def reloaded(self, relay: Relay, ok: bool) -> None:
        """READY=1 whether the reload worked or not: a failed reload keeps serving the previous
        rules, and says so in STATUS=."""
        self._notifier.ready(
            _status(relay, "serving" if ok else "serving the old rules (reload failed)")
        )

    def stopping(self, relay: Relay) -> None:
        self._notifier.stopping(_status(relay, "draining"))

    def start_heartbeat(self, relay: Relay) -> Callable[[], None]:
        return self._notifier.start_heartbeat(lambda: _status(relay))

    def close(self) -> None:
        self._notifier.close()


@dataclass(frozen=True)
class WorkerSetup:
    """What the supervisor gives one of its worker processes."""

    runtime: Runtime  # the rules and TLS material the supervisor validated
    sockets: Sequence[socket.socket]  # one listening socket per listener, shared by all workers
    announcer: Announcer  # reports to the supervisor instead of systemd


def _reload_and_announce(
    relay: Relay, config_path: Path, observability: Observability, announcer: Announcer
) -> None:
    """SIGHUP: RELOADING=1, then READY=1 with the outcome (under systemd)."""
    announcer.reloading()
    announcer.reloaded(relay, reload(relay, config_path, observability))


async def serve(
    config_path: Path,
    drain_seconds: float | None = None,
    on_ready: Callable[[Relay], None] | None = None,
    worker: WorkerSetup | None = None,
) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit status.

    ``drain_seconds`` overrides the rules file's ``limits.drain_seconds`` (as current at
    SIGTERM, after any reloads). ``worker``: run as one of the supervisor's workers.
    """
    runtime = load_runtime(config_path) if worker is None else worker.runtime
    observability = Observability(runtime.config, supervised=worker is not None)
    relay = Relay(runtime, [log_observer, *observability.observers])
    store = None
    try:
        if runtime.config.limits.store is not None:
            from dicomfw.relay.redis_store import share_limits  # the optional redis client

            store = await share_limits(relay, runtime.config, observability.metrics)
        await relay.start(None if worker is None else worker.sockets)
    except BaseException:
        if store is not None:
            await store.close()
        observability.close()
        raise
    health = observability.health
    health.require(NOT_ACCEPTING, lambda: accepting(relay))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    announcer = SystemdAnnouncer() if worker is None else worker.announcer
    loop.add_signal_handler(
        signal.SIGHUP, _reload_and_announce, relay, config_path, observability, announcer
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
        **served_certificates(runtime),
    )
    warn_expiring_crls(runtime)
    if on_ready is not None:
        on_ready(relay)
    announcer.ready(relay)
    stop_heartbeat = announcer.start_heartbeat(relay)
    stop_beating = health.beat_on(loop)
    health.started()
    trimmer = HeapTrimmer(lambda: (relay.connections, len(relay.associations)))
    trimmer.start()
    lag = sampler = None
    metrics = observability.metrics
    if metrics is not None:
        lag = LoopLagProbe(loop, metrics.loop_lag.observe)
        lag.start()
        sampler = Sampler(loop, lambda: metrics.sample_limits(relay.limiter.peaks()))
        sampler.start()
    await stop.wait()
    if drain_seconds is None:
        drain_seconds = relay.runtime.config.limits.drain_seconds
    health.draining()
    if worker is None:  # a worker's supervisor gave the notice before it sent SIGTERM
        await give_notice(relay.runtime.config.limits.drain_notice_seconds)
    await relay.close_listeners()
    announcer.stopping(relay)
    log_event(
        log,
        logging.INFO,
        "stopping",
        open_associations=len(relay.associations),
        drain_seconds=drain_seconds,
    )
    await relay.stop(drain_seconds)  # the watchdog keeps ticking through the drain
    if store is not None:
        await store.close()  # every association has ended: their slots go back
    stop_heartbeat()
    stop_beating()
    trimmer.stop()
    if lag is not None:
        lag.stop()
    if sampler is not None:
        sampler.stop()
    announcer.close()
    observability.close()  # after the drain: the audit records every association's end
    log_event(log, logging.INFO, "stopped")
    return 0


def run(
    config_path: Path, drain_seconds: float | None = None, worker: WorkerSetup | None = None
) -> int:
    """Run the daemon on uvloop when it is installed (less CPU and memory per association)."""
    map_large_blocks()
    # What the imports made (~50,000 objects: pydicom's dictionaries, pynetdicom, redis) lives
    # as long as the process: out of the cyclic collector's sight, a full collection takes
    # under 1 ms instead of ~10-27 ms, a pause every association in flight would wait out.
    gc.freeze()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config_path, drain_seconds, worker=worker))
    return int(uvloop.run(serve(config_path, drain_seconds, worker=worker)))
