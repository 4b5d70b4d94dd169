"""Errors of the manager domain; the gRPC layer maps each class to one status code."""

from __future__ import annotations


class ManagerError(Exception):
    """Base of every error the manager raises on purpose."""


class InvalidArgument(ManagerError):
    """Malformed request (INVALID_ARGUMENT); `field` names the offending field, e.g. `layers[3].values[1]`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(ManagerError):
    """Unknown or expired session (NOT_FOUND)."""


class Aborted(ManagerError):
    """Out-of-order report (ABORTED): the client must resynchronise, retrying cannot help."""


class FailedPrecondition(ManagerError):
    """A request that contradicts the session's history, e.g. a retried sequence number carrying
    another request than the one decided (FAILED_PRECONDITION): retrying it cannot help."""


class ResourceExhausted(ManagerError):
    """A limit is reached, e.g. too many open sessions (RESOURCE_EXHAUSTED); retry later."""


class StoreUnavailable(ManagerError):
    """The state store (Redis) cannot be reached or failed (UNAVAILABLE); retrying may help."""
