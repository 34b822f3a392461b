"""What the relay's events become: the log, the audit trail, IHE ATNA and Prometheus metrics.

``observability`` starts, reconfigures and stops the observers the rules file asks for; each of
``eventlog``, ``audit`` (with ``atna``) and ``metrics`` consumes the same relay events. See
docs/architecture.md.
"""
