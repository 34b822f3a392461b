"""Worker processes: ``workers: N`` daemons share the listening ports under one supervisor.

With ``workers: 1`` (the default) there is no supervisor: the daemon is the whole service, one
process, exactly as without this module. With N > 1 the process started as ``dicomfw run``
becomes the supervisor:

* It validates the rules file and every certificate, binds each listener once and forks N
  workers, each running the ordinary daemon loop (``daemon.serve``) on the inherited sockets.
  One shared socket per listener rather than SO_REUSEPORT: the accept queue belongs to the
  socket, which the supervisor keeps open, so a worker that dies loses only the connections it
  had accepted, never ones still queued (with SO_REUSEPORT the kernel resets those, unless
  ``net.ipv4.tcp_migrate_req`` is on); a replacement needs no bind (no privilege for port 104,
  no window in which the port is missing); port 0 means one port for all; and no other process
  of the same user can join the port's group. Whichever worker is idle takes the next
  connection.
* It forks (no ``multiprocessing``, no exec): a worker starts in milliseconds from the rules
  and TLS contexts the supervisor validated, and a replacement gets the rules in force even if
  the file has since been broken. The supervisor never runs an event loop, so none is forked;
  its one other thread serves /metrics and holds no lock a worker takes.
* It is the only process that talks to systemd (``NotifyAccess=main``). Each worker reports to
  it over its own socketpair what a single daemon would tell systemd, in the same ``KEY=value``
  lines: READY, the outcome of a reload, STOPPING, and a heartbeat with its live counts from a
  timer on its event loop. READY=1 goes out once every worker is ready; WATCHDOG=1 only while
  every worker's heartbeat is recent. A worker silent for ``_STALL_SECONDS`` (a stuck loop) is
  killed and replaced, so one stuck worker costs its own associations, not every worker's.
* A worker that dies is started again (after ``_MIN_LIFETIME_SECONDS`` since its last start,
  so a crash loop forks at most once a second), logged as ``event=worker_died`` and counted
  in ``dicomfw_worker_restarts_total``. If one dies before all have become ready, the service
  does not start.
* SIGHUP: the supervisor validates first, so a bad rules file is reported once and reaches no
  worker; then every worker reloads and reports back, and RELOADING=1 / READY=1 bracket it all.
  SIGTERM/SIGINT: every worker drains (closing its copies of the listening sockets, as the
  supervisor closes its own, so the ports close); the supervisor exits 0 once all have exited,
  or kills what is left ``_STOP_MARGIN_SECONDS`` after the drain deadline and exits 1.
* Metrics: every process writes prometheus-client's multiprocess files in a fresh directory
  (``PROMETHEUS_MULTIPROC_DIR``, removed at exit); the supervisor serves their sum on
  ``/metrics``, counts reloads and restarts, and drops a dead worker's live gauges.

``dicomfw.service.daemon`` (and through it prometheus-client) is imported inside functions, after
``PROMETHEUS_MULTIPROC_DIR`` is set: prometheus-client decides between in-memory values and
per-process files when it is first imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

from dicomfw import logsetup
from dicomfw.config.load import load_config
from dicomfw.logsetup import log_event
from dicomfw.relay.server import Relay, Runtime, bind_listeners
from dicomfw.service.sdnotify import Notifier

if TYPE_CHECKING:
    from dicomfw.observe.metrics import Metrics, MetricsServer

log = logging.getLogger("dicomfw.supervisor")

#: How often a worker reports that its loop runs, with its counts.
_HEARTBEAT_SECONDS: Final = 1.0
#: A worker that has not reported for this long (or not become ready this long after its fork)
#: is stuck: it is killed and replaced.
_STALL_SECONDS: Final = 10.0
#: A worker is started again no sooner than this after its previous start.
_MIN_LIFETIME_SECONDS: Final = 1.0
#: After the drain deadline: the A-ABORTs' flush (1 s) and the audit's (up to 5 s), and slack.
_STOP_MARGIN_SECONDS: Final = 10.0
#: Workers that have not reported a reload's outcome by then count as failed.
_RELOAD_SECONDS: Final = 30.0
#: The supervisor's loop wakes at least this often (restarts due, heartbeats, deadlines).
_TICK_SECONDS: Final = 0.25
_SIGNALS: Final = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


def run(config_path: Path, drain_seconds: float | None = None) -> int:
    """``dicomfw run``: one daemon process, or a supervisor and ``workers`` daemon processes.

    Raises ConfigErrors (an invalid rules file) and OSError (e.g. a port in use) before any
    worker exists.
    """
    config = load_config(config_path)
    logsetup.tag_process(instance=config.instance)
    if config.workers == 1:
        from dicomfw.service import daemon

        return daemon.run(config_path, drain_seconds)
    metrics_dir = None
    if config.metrics is not None:
        metrics_dir = Path(tempfile.mkdtemp(prefix="dicomfw-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    try:
        return _supervise(config_path, drain_seconds)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(config_path: Path, drain_seconds: float | None) -> int:
    from dicomfw.observe.metrics import Metrics, MetricsServer
    from dicomfw.service.daemon import load_runtime

    runtime = load_runtime(config_path)
    config = runtime.config
    sockets = bind_listeners(config.listeners)
    metrics: Metrics | None = None
    server: MetricsServer | None = None
    try:
        if config.metrics is not None:
            metrics = Metrics()
            metrics.configure(config)
            server = MetricsServer(config.metrics, metrics.registry)
        supervisor = Supervisor(config_path, drain_seconds, runtime, sockets, metrics, server)
        return supervisor.run()
    finally:
        if server is not None:
            server.close()
        for sock in sockets:
            sock.close()


@dataclass
class _Worker:
    """One worker process as the supervisor sees it."""

    slot: int  # 1..N, kept by its replacements (``worker=`` in the log)
    pid: int
    link: socket.socket  # the supervisor's end of the worker's socketpair
    generation: int  # which validated rules it runs (``Supervisor._generation``)
    started: float
    last_heard: float
    ready: bool = False
    stopping: bool = False
    killed: bool = False
    active: int = 0
    pending: int = 0
    accepting: bool = True  # it could admit new associations (``daemon.accepting``)


@dataclass
class _Reload:
    """A reload the supervisor validated and the workers are carrying out."""

    deadline: float
    waiting: set[int] = field(default_factory=set)  # pids that have not answered yet
    failed: bool = False


class Supervisor:
    """The parent process: forks, watches, restarts, reloads and stops the workers."""

    def __init__(
        self,
        config_path: Path,
        drain_seconds: float | None,
        runtime: Runtime,
        sockets: Sequence[socket.socket],
        metrics: Metrics | None,
        server: MetricsServer | None,
    ) -> None:
        self._config_path = config_path
        self._drain_seconds = drain_seconds
        self._runtime = runtime
        self._started_config = runtime.config
        self._generation = 0
        self._sockets = sockets
        self._metrics = metrics
        self._server = server
        self._count = runtime.config.workers
        self._workers: dict[int, _Worker] = {}  # by slot
        self._restart_at: dict[int, float] = {}  # slot -> when to start its replacement
        self._notifier = Notifier()
        self._selector = selectors.DefaultSelector()
        self._wakeup, self._wakeup_writer = socket.socketpair()
        self._announced = False  # READY=1 sent
        self._reload: _Reload | None = None
        self._reload_again = False  # a SIGHUP came while a reload was running
        self._stop_deadline: float | None = None
        self._notice_until: float | None = None  # draining: /ready says 503, ports still open
        self._stopping_announced = False
        self._last_ping = 0.0
        self._status = 0
        if server is not None:
            from dicomfw.service.daemon import NOT_ACCEPTING

            server.health.require(NOT_ACCEPTING, self._accepting)

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until they have all stopped; the exit status."""
        self._install_signals()
        try:
            for slot in range(1, self._count + 1):
                self._start(slot)
            while self._workers or (self._restart_at and self._stop_deadline is None):
                for key, _ in self._selector.select(self._tick_seconds()):
                    if key.fileobj is self._wakeup:
                        self._signalled()
                    else:
                        self._hear(key.data)
                self._reap()
                self._tick(time.monotonic())
        finally:
            self._uninstall_signals()
            self._selector.close()
            self._wakeup.close()
            self._wakeup_writer.close()
            self._notifier.close()
        log_event(log, logging.INFO, "stopped", status=self._status)
        return self._status

    def _tick_seconds(self) -> float:
        watchdog = self._notifier.watchdog_seconds
        return _TICK_SECONDS if watchdog is None else min(_TICK_SECONDS, watchdog / 4)

    def _tick(self, now: float) -> None:
        if self._server is not None:
            self._server.health.beat()
        if self._notice_until is not None and now >= self._notice_until:
            self._stop()
        for slot, due in list(self._restart_at.items()):
            if due <= now:
                del self._restart_at[slot]
                self._restart(slot)
        for worker in self._workers.values():
            if self._stalled(worker, now) and not worker.killed:
                log_event(
                    log,
                    logging.ERROR,
                    "worker_unresponsive",
                    worker=worker.slot,
                    pid=worker.pid,
                    silent_seconds=round(now - worker.last_heard, 1),
                )
                self._kill(worker)
        if self._reload is not None and now >= self._reload.deadline:
            self._finish_reload()
        if self._stop_deadline is not None and now >= self._stop_deadline:
            for worker in self._workers.values():
                if not worker.killed:
                    log_event(
                        log, logging.ERROR, "drain_overrun", worker=worker.slot, pid=worker.pid
                    )
                    self._kill(worker)
                    self._status = 1
        self._heartbeat(now)

    def _heartbeat(self, now: float) -> None:
        """STATUS= with the workers' counts; WATCHDOG=1 while every worker is responsive."""
        if not self._announced:
            return
        self._notifier.status(self._describe("draining" if self._stopping_announced else "serving"))
        watchdog = self._notifier.watchdog_seconds
        if watchdog is None or now - self._last_ping < watchdog / 2:
            return
        if not any(self._stalled(worker, now) for worker in self._workers.values()):
            self._notifier.watchdog()
            self._last_ping = now

    def _stalled(self, worker: _Worker, now: float) -> bool:
        """Silent too long while serving. A draining worker is left to the drain deadline: its
        last act, flushing the audit, may take a while without heartbeats."""
        return self._stop_deadline is None and now - worker.last_heard > _STALL_SECONDS

    def _describe(self, doing: str) -> str:
        workers = self._workers.values()
        alive = len(workers)
        count = f"{alive} workers" if alive == self._count else f"{alive} of {self._count} workers"
        active, pending = sum(w.active for w in workers), sum(w.pending for w in workers)
        return f"{doing}: {count}, {active} associations, {pending} connecting"

    # ---- signals -------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        """The signal numbers arrive on a socket the loop selects on (``set_wakeup_fd``); the
        Python-level handlers only have to exist for that to happen."""
        self._wakeup.setblocking(False)
        self._wakeup_writer.setblocking(False)
        self._selector.register(self._wakeup, selectors.EVENT_READ)
        signal.set_wakeup_fd(self._wakeup_writer.fileno(), warn_on_full_buffer=False)
        for signum in _SIGNALS:
            signal.signal(signum, _ignore)

    def _uninstall_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)

    def _signalled(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for signum in self._wakeup.recv(256):
                if signum == signal.SIGHUP:
                    self._begin_reload()
                elif signum in (signal.SIGTERM, signal.SIGINT):
                    self._begin_stop()
                # SIGCHLD: reaping follows in the loop

    # ---- starting and losing workers -----------------------------------------------------------

    def _start(self, slot: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Blocked across the fork, so the child never runs the supervisor's handlers; it
        # unblocks them once it has its own dispositions.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                ours.close()
                self._become_worker(slot, theirs)
        except OSError:
            ours.close()
            theirs.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        ours.setblocking(False)
        now = time.monotonic()
        worker = _Worker(slot, pid, ours, self._generation, now, now)
        self._workers[slot] = worker
        self._selector.register(ours, selectors.EVENT_READ, worker)
        log_event(log, logging.INFO, "worker_started", worker=slot, pid=pid)

    def _restart(self, slot: int) -> None:
        try:
            self._start(slot)
        except OSError as error:  # e.g. EAGAIN: too many processes; try again later
            log_event(log, logging.ERROR, "worker_start_failed", worker=slot, error=str(error))
            self._restart_at[slot] = time.monotonic() + _MIN_LIFETIME_SECONDS
            return
        if self._metrics is not None:
            self._metrics.worker_restarts.inc()

    def _become_worker(self, slot: int, link: socket.socket) -> NoReturn:
        """The child's side of the fork: run the daemon loop, then leave without returning into
        the supervisor's code (its cleanup, the command line's PID file, atexit)."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            # Until the worker's loop handles SIGHUP; a reload it misses is sent again when it
            # reports ready (its generation is behind).
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            self._close_supervisor_resources()
            logsetup.tag_process(worker=slot, pid=os.getpid())
            from dicomfw.service import daemon

            announcer = _ParentLink(link, daemon.accepting)
            setup = daemon.WorkerSetup(self._runtime, self._sockets, announcer)
            status = daemon.run(self._config_path, self._drain_seconds, setup)
        except OSError as error:  # e.g. the audit file cannot be opened: as `dicomfw run` says
            log_event(log, logging.ERROR, "worker_failed", error=f"cannot start: {error}")
        except BaseException:  # whatever it is, this process ends here
            log.exception("event=worker_failed")
        finally:
            logging.shutdown()
            os._exit(status)

    def _close_supervisor_resources(self) -> None:
        """A forked worker's copies of what only the supervisor uses: other workers' links,
        the signal socket, systemd's socket, the /metrics listening socket."""
        for worker in self._workers.values():
            worker.link.close()
        self._selector.close()
        self._wakeup.close()
        self._wakeup_writer.close()
        self._notifier.close()
        if self._server is not None:
            self._server.close_after_fork()

    def _kill(self, worker: _Worker) -> None:
        worker.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

    def _reap(self) -> None:
        for worker in list(self._workers.values()):
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: it is gone all the same
                pid, status = worker.pid, 0
            if pid != 0:
                self._gone(worker, status)

    def _gone(self, worker: _Worker, status: int) -> None:
        del self._workers[worker.slot]
        with contextlib.suppress(KeyError):  # not if its end already read as closed
            self._selector.unregister(worker.link)
        worker.link.close()
        if self._metrics is not None:
            self._metrics.worker_exited(worker.pid)
        how = _exit_description(status)
        if self._stop_deadline is not None:
            self._stopped_one()
            log_event(
                log, logging.INFO, "worker_stopped", worker=worker.slot, pid=worker.pid, how=how
            )
            return
        if self._reload is not None:
            self._reload.waiting.discard(worker.pid)
            self._finish_reload_if_done()
        if not self._announced:
            log_event(
                log,
                logging.ERROR,
                "worker_failed_to_start",
                worker=worker.slot,
                pid=worker.pid,
                how=how,
            )
            self._status = 1
            self._stop()
            return
        now = time.monotonic()
        delay = max(0.0, worker.started + _MIN_LIFETIME_SECONDS - now)
        self._restart_at[worker.slot] = now + delay
        log_event(
            log,
            logging.ERROR,
            "worker_died",
            worker=worker.slot,
            pid=worker.pid,
            how=how,
            restart_in=f"{delay:.1f}s",
        )

    # ---- what workers report -------------------------------------------------------------------

    def _hear(self, worker: _Worker) -> None:
        while True:
            try:
                data = worker.link.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the worker closed its end: it is exiting; reaping follows
                self._selector.unregister(worker.link)
                return
            worker.last_heard = time.monotonic()
            fields: dict[str, str] = {}
            for line in data.decode().splitlines():
                key, _, value = line.partition("=")
                fields[key] = value
            worker.active = int(fields.get("ACTIVE", worker.active))
            worker.pending = int(fields.get("PENDING", worker.pending))
            worker.accepting = fields.get("ACCEPTING", "1") == "1"
            if "READY" in fields:
                self._worker_ready(worker)
            if "RELOADED" in fields:
                self._worker_reloaded(worker, fields["RELOADED"] == "1")
            if "STOPPING" in fields:
                worker.stopping = True
                self._stopped_one()

    def _worker_ready(self, worker: _Worker) -> None:
        worker.ready = True
        if worker.generation != self._generation:  # forked before a reload it has not had
            os.kill(worker.pid, signal.SIGHUP)
        if self._announced or self._stop_deadline is not None:
            return
        if len(self._workers) == self._count and all(w.ready for w in self._workers.values()):
            from dicomfw.service.daemon import served_certificates  # see the module docstring

            self._announced = True
            listeners = zip(self._runtime.config.listeners, self._sockets, strict=True)
            log_event(
                log,
                logging.INFO,
                "ready",
                config=str(self._config_path),
                listeners=",".join(f"{x.name}:{s.getsockname()[1]}" for x, s in listeners),
                workers=self._count,
                **served_certificates(self._runtime),
            )
            self._notifier.ready(self._describe("serving"))
            if self._server is not None:
                self._server.health.started()

    def _accepting(self) -> bool:
        """(``/ready``, on the metrics thread) Every worker can admit new associations."""
        return all(worker.accepting for worker in list(self._workers.values()))

    # ---- reload --------------------------------------------------------------------------------

    def _begin_reload(self) -> None:
        if self._stop_deadline is not None:
            return
        if self._reload is not None:
            self._reload_again = True
            return
        from dicomfw.observe.observability import warn_restart_needed
        from dicomfw.service.daemon import revalidate

        if self._announced:
            self._notifier.reloading()
        runtime = revalidate(self._runtime, self._config_path)
        if runtime is None:  # logged once, here; no worker hears of it
            if self._metrics is not None:
                self._metrics.reload_failed()
            self._reloaded("serving the old rules (reload failed)")
            return
        warn_restart_needed(self._started_config, runtime.config)
        self._runtime = runtime  # what replacements start with from now on
        self._generation += 1
        self._reload = _Reload(time.monotonic() + _RELOAD_SECONDS)
        for worker in self._workers.values():
            self._reload.waiting.add(worker.pid)
            if worker.ready:  # the others get SIGHUP when they report ready
                os.kill(worker.pid, signal.SIGHUP)
        self._finish_reload_if_done()

    def _worker_reloaded(self, worker: _Worker, ok: bool) -> None:
        if self._reload is None or worker.pid not in self._reload.waiting:
            return  # e.g. someone sent this worker SIGHUP directly
        self._reload.waiting.discard(worker.pid)
        if ok:
            worker.generation = self._generation
        else:
            self._reload.failed = True
        self._finish_reload_if_done()

    def _finish_reload_if_done(self) -> None:
        if self._reload is not None and not self._reload.waiting:
            self._finish_reload()

    def _finish_reload(self) -> None:
        """Count the reload once: a success if every worker applied the new rules. A worker
        that did not (its log says why) serves on with the old ones."""
        reload, self._reload = self._reload, None
        assert reload is not None
        failed = reload.failed or bool(reload.waiting)
        if reload.waiting:
            log_event(
                log,
                logging.ERROR,
                "reload_failed",
                pids=",".join(map(str, sorted(reload.waiting))),
                error=f"no answer from these workers within {_RELOAD_SECONDS:g} s",
            )
        if self._metrics is not None:
            if failed:
                self._metrics.reload_failed()
            else:
                self._metrics.reload_succeeded(self._runtime.config)
        self._reloaded("serving (a worker failed to reload: see its log)" if failed else "serving")
        if self._reload_again:
            self._reload_again = False
            self._begin_reload()

    def _reloaded(self, doing: str) -> None:
        """READY=1 after RELOADING=1; before the first READY=1, systemd hears of neither."""
        if self._announced:
            self._notifier.ready(self._describe(doing))

    # ---- stop ----------------------------------------------------------------------------------

    def _begin_stop(self) -> None:
        """SIGTERM: /ready says 503 at once; the ports stay open ``drain_notice_seconds`` more
        (``daemon.give_notice``), then the workers drain."""
        if self._server is not None:
            self._server.health.draining()
        notice = self._runtime.config.limits.drain_notice_seconds
        if not notice or not self._announced or self._notice_until is not None:
            self._stop()
            return
        self._notice_until = time.monotonic() + notice
        log_event(log, logging.INFO, "draining", notice_seconds=notice)

    def _stop(self) -> None:
        self._notice_until = None
        if self._stop_deadline is not None:
            return
        drain = self._drain_seconds
        if drain is None:
            drain = self._runtime.config.limits.drain_seconds
        self._stop_deadline = time.monotonic() + drain + _STOP_MARGIN_SECONDS
        self._reload = None
        self._restart_at.clear()
        for sock in self._sockets:  # the ports close once every worker has closed its copy too
            sock.close()
        log_event(log, logging.INFO, "stopping", workers=len(self._workers), drain_seconds=drain)
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        self._stopped_one()

    def _stopped_one(self) -> None:
        """STOPPING=1 once every worker has stopped accepting (or exited): the ports are closed."""
        if self._stop_deadline is None or self._stopping_announced:
            return
        if all(w.stopping for w in self._workers.values()):
            self._stopping_announced = True
            self._notifier.stopping(self._describe("draining"))


class _ParentLink:
    """A worker's ``daemon.Announcer``: what a single daemon would tell systemd, a worker tells
    the supervisor, as ``KEY=value`` lines, one datagram per message, never blocking its loop.

    If the supervisor goes away (its end of the link closes), the worker drains and exits as on
    SIGTERM rather than serve on unsupervised.
    """

    def __init__(self, sock: socket.socket, accepting: Callable[[Relay], bool]) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._accepting = accepting
        self._loop: asyncio.AbstractEventLoop | None = None
        self._orphaned = False

    def _send(self, relay: Relay, *fields: str) -> None:
        usage = relay.limiter.usage()
        counts = (f"ACTIVE={usage.active}", f"PENDING={usage.pending}")
        message = "\n".join((*fields, *counts, f"ACCEPTING={int(self._accepting(relay))}"))
        try:
            self._sock.send(message.encode())
        except BlockingIOError:
            pass  # the supervisor is behind; the next heartbeat says it again
        except OSError:
            self._supervisor_gone()

    def ready(self, relay: Relay) -> None:
        self._send(relay, "READY=1")

    def reloading(self) -> None:
        """Nothing to say: the supervisor announced the reload before it sent SIGHUP."""

    def reloaded(self, relay: Relay, ok: bool) -> None:
        self._send(relay, f"RELOADED={int(ok)}")

    def stopping(self, relay: Relay) -> None:
        self._send(relay, "STOPPING=1")

    def start_heartbeat(self, relay: Relay) -> Callable[[], None]:
        loop = self._loop = asyncio.get_running_loop()
        if not self._orphaned:
            loop.add_reader(self._sock, self._readable)
        handle: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal handle
            self._send(relay, "WATCHDOG=1")
            handle = loop.call_later(_HEARTBEAT_SECONDS, tick)

        tick()

        def stop() -> None:
            if handle is not None:
                handle.cancel()
            if not self._orphaned:
                loop.remove_reader(self._sock)

        return stop

    def _readable(self) -> None:
        """The supervisor never writes: readable means its end closed."""
        try:
            data = self._sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._supervisor_gone()

    def _supervisor_gone(self) -> None:
        if self._orphaned:
            return
        self._orphaned = True
        if self._loop is not None:
            self._loop.remove_reader(self._sock)
        log_event(log, logging.ERROR, "supervisor_gone", error="draining and exiting")
        os.kill(os.getpid(), signal.SIGTERM)

    def close(self) -> None:
        self._sock.close()


def _ignore(signum: int, frame: object) -> None:
    """A Python-level handler, so that the signal is written to the wakeup socket."""


def _exit_description(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
