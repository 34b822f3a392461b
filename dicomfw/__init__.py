"""dicomfw: a TLS-terminating DICOM network firewall.

See README.md and docs/architecture.md. The package is layered, each layer importing only
those below it (the import-linter contracts in pyproject.toml keep it so):
``errors``/``logsetup`` <- ``core`` (sans-IO protocol and policy) <- ``config`` <- ``relay``
(asyncio) <- ``observe`` (log, audit, ATNA, metrics) <- ``service`` (daemon, supervisor) and
``pki`` (certificates) <- ``demo`` <- ``cli``.
"""

__version__ = "0.1.0"
