"""dicomfw: a TLS-terminating DICOM network firewall.

See shared design notes in docs/ and README.md. The package is layered:
``core`` (sans-IO protocol and policy) <- ``config`` <- ``relay`` (asyncio) <- ``cli``.
"""

__version__ = "0.1.0"
