"""The errors every room raises or catches; the core owns them so no room imports another for one."""

from __future__ import annotations


class Cancelled(Exception):
    """Raised by an executor when its progress callback asked it to stop."""


class ControllerOutputError(ValueError):
    """The controller produced output that could not be parsed or validated (after its retries)."""


class ControllerCallError(RuntimeError):
    """A controller call raised on every attempt."""


class UnknownBackendError(ValueError):
    """The name is not a registered backend; the message lists the known ones."""


class MissingDependencyError(ImportError):
    """A backend's packages are not installed; the message names the pip extra that brings them."""


class NoBackendsError(RuntimeError):
    """A context names a backend, but the graph was built without a source of backends to resolve it."""
