"""The one crivm exception tree.

Lower layers (OSError, subprocess, QMP, netlink, HTTP) are translated into these exactly once,
at the boundary where they happen, with ``raise ... from exc``. The call scope in
``crivm.runtime.call_scope`` is the only place that turns them into status codes; it does so by
class, never by message text.
"""

from __future__ import annotations


class CrivmError(Exception):
    """Base of every error crivm raises on purpose. Maps to INTERNAL unless a subclass says."""

    code: str = "INTERNAL"


class InvalidArgument(CrivmError):
    """The request is malformed or names something impossible."""

    code = "INVALID_ARGUMENT"


class NotFound(CrivmError):
    """The named pod, container, image, handler or blob does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(CrivmError):
    """An object with that name or id already exists."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(CrivmError):
    """The object is in the wrong state for the call (e.g. starting a running container)."""

    code = "FAILED_PRECONDITION"


class Unavailable(CrivmError):
    """A dependency (registry, agent, hypervisor) cannot be reached right now."""

    code = "UNAVAILABLE"


class DeadlineExceeded(CrivmError):
    """An operation ran past its timeout (a stalled pull, a VM that never boots)."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(CrivmError):
    """A registry refused the credentials, or none were given where some are needed."""

    code = "UNAUTHENTICATED"


class PermissionDenied(CrivmError):
    """The caller or the host does not allow the operation."""

    code = "PERMISSION_DENIED"


class ResourceExhausted(CrivmError):
    """A size limit was hit (an oversized frame, exec output past its cap)."""

    code = "RESOURCE_EXHAUSTED"


class Unimplemented(CrivmError):
    """The call or option is not built yet. Never answer a fake success instead."""

    code = "UNIMPLEMENTED"


class ConfigError(CrivmError):
    """The configuration file is wrong. The message names the file, the key and the problem."""

    code = "INVALID_ARGUMENT"

    def __init__(self, path: str, key: str, problem: str) -> None:
        super().__init__(f"{path}: {key}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


class StoreError(CrivmError):
    """The state store could not complete a transaction; it was rolled back."""

    code = "INTERNAL"
