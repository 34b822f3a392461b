"""Exception types shared by every layer.

Modelled on h11: a protocol error says *which side* broke the protocol, and carries the
A-ABORT reason the firewall should send (PS3.8 Table 9-26), so the relay never has to guess.
"""

from __future__ import annotations


class DicomfwError(Exception):
    """Base class for every error dicomfw raises on purpose."""


class ProtocolError(DicomfwError):
    """A DICOM Upper Layer protocol violation.

    ``abort_reason`` is the A-ABORT reason/diag value (PS3.8 Table 9-26) to send when the
    firewall aborts because of this error: 0 not specified, 1 unrecognized PDU, 2 unexpected
    PDU, 4 unrecognized PDU parameter, 5 unexpected PDU parameter, 6 invalid PDU parameter value.
    """

    def __init__(self, message: str, abort_reason: int = 0) -> None:
        super().__init__(message)
        self.abort_reason = abort_reason


class RemoteProtocolError(ProtocolError):
    """The peer sent something the standard (or our size bounds) does not allow."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol state does not allow (a bug on our side)."""


class ConfigError(DicomfwError):
    """A rules/config file problem, always located as ``file:line: key.path: message``."""

    def __init__(self, file: str, line: int | None, key: str, message: str) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.message = message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class ConfigErrors(DicomfwError):
    """Several configuration problems found in one pass, reported together."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))
