"""Metrics and audit as the rules file configures them, started, reconfigured and stopped together.

The daemon needs three calls (start, reload result, close) and tests wire exactly what the
daemon wires. Sections ``metrics``, ``audit`` and ``workers`` take effect at start: a reload
applies new rules and certificates (and refreshes the certificate gauges) but keeps the
endpoints, sinks and processes it has, saying so in the log when the file asks for different
ones.

In a worker process under the supervisor (``supervised``) the supervisor serves ``/metrics`` for
every worker, counts reloads once and says once what needs a restart; the worker's own metrics
reach it through prometheus-client's multiprocess files.
"""

from __future__ import annotations

import logging
from operator import attrgetter
from typing import Final

from dicomfw.config.model import Config
from dicomfw.logsetup import log_event
from dicomfw.observe.atna import atna_sink
from dicomfw.observe.audit import AuditTrail, QueuedSink, json_lines_sink
from dicomfw.observe.health import Health
from dicomfw.observe.metrics import Metrics, MetricsServer
from dicomfw.relay.server import Observer

log = logging.getLogger("dicomfw.observability")
_FLUSH_SECONDS = 5.0


class Observability:
    """What ``config.metrics`` and ``config.audit`` ask for. Raises OSError (e.g. the metrics
    port is taken, the audit file cannot be opened) before anything is left half-started."""

    def __init__(self, config: Config, supervised: bool = False) -> None:
        self.config_path = config.source
        self._started = config
        self._supervised = supervised
        self.metrics = Metrics() if config.metrics is not None else None
        self.audit: AuditTrail | None = None
        self.server: MetricsServer | None = None
        if self.metrics is not None:
            self.metrics.configure(config)
        sinks: list[QueuedSink] = []
        settings = config.audit
        try:
            if settings is not None and (settings.file is not None or settings.stdout):
                sinks.append(json_lines_sink(settings.file, settings.queue_size))
            if settings is not None and settings.atna is not None:
                sinks.append(atna_sink(settings.atna, settings.queue_size))
            if self.metrics is not None:
                for sink in sinks:  # before the first record: application_start
                    sink.on_lost = self.metrics.audit_losses(sink.name, sink.causes)
            if config.metrics is not None and self.metrics is not None and not supervised:
                self.server = MetricsServer(config.metrics, self.metrics.registry)
        except BaseException:
            for sink in sinks:
                sink.close(1.0)
            raise
        # What /ready and /live answer when this process serves metrics (not in a worker).
        self.health = Health() if self.server is None else self.server.health
        if sinks:
            self.audit = AuditTrail(sinks)
            self.audit.configure(config)
            self.audit.application("start", config.source)

    @property
    def observers(self) -> list[Observer]:
        """The relay observers to add next to the log."""
        found: list[Observer] = []
        if self.metrics is not None:
            found.append(self.metrics)
        if self.audit is not None:
            found.append(self.audit)
        return found

    def reloaded(self, config: Config) -> None:
        if self.metrics is not None:
            if self._supervised:
                self.metrics.configure(config)
            else:
                self.metrics.reload_succeeded(config)
        if self.audit is not None:
            self.audit.configure(config)
        if not self._supervised:
            warn_restart_needed(self._started, config)

    def reload_failed(self) -> None:
        if self.metrics is not None and not self._supervised:
            self.metrics.reload_failed()

    def close(self) -> None:
        """After the relay stopped: record the stop, flush the sinks, stop serving metrics."""
        if self.audit is not None:
            self.audit.application("stop", self.config_path)
            self.audit.close(_FLUSH_SECONDS)
        if self.server is not None:
            self.server.close()


#: Settings of the rules file a reload cannot apply: they take effect at the next start.
START_ONLY: Final = ("metrics", "audit", "workers", "instance", "limits.store")


def warn_restart_needed(started: Config, reloaded: Config) -> None:
    """Log, once per reload, which start-only sections now differ from those in force."""
    changed = [
        name for name in START_ONLY if attrgetter(name)(started) != attrgetter(name)(reloaded)
    ]
    if changed:
        log_event(
            log,
            logging.WARNING,
            "restart_needed",
            sections=",".join(changed),
            error=f"{' and '.join(changed)} settings changed: they apply at the next start",
        )
