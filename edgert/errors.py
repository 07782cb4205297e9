"""The error hierarchy: every error a user can meet says what went wrong, where, and how to fix it."""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every edgert error."""


class ConfigError(EdgeError):
    """A configuration, argument or profile is invalid."""


class ModelError(EdgeError):
    """A checkpoint is missing, corrupt, of an unsupported architecture, or of the wrong shape."""


class ArtifactError(EdgeError):
    """A stage bundle is missing a file, fails its hash check, or does not fit this machine."""


class DataError(EdgeError):
    """A batch or dataset has the wrong fields, dtypes or shapes."""


class ProtocolError(EdgeError):
    """A message on the wire is malformed."""


class ScheduleError(EdgeError):
    """A pipeline schedule is inconsistent."""


class TransportError(EdgeError):
    """A link between boards failed."""


class BoardError(EdgeError):
    """A board refused or failed a request."""
