"""Errors the worker reports to callers; the servicer maps each to its gRPC status code."""


class WorkerError(Exception):
    """Base of the errors a caller can act on."""


class InvalidRequest(WorkerError):
    """The request is malformed or over a limit (INVALID_ARGUMENT)."""


class SessionNotFound(WorkerError):
    """The session is unknown: never opened, closed or evicted (NOT_FOUND)."""


class SessionConflict(WorkerError):
    """A caller-chosen session id is already open with another context (ALREADY_EXISTS)."""


class StaleContext(WorkerError):
    """The caller's expected context length differs from the session's (FAILED_PRECONDITION)."""


class OverCapacity(WorkerError):
    """The request cannot fit in the memory or queue bounds (RESOURCE_EXHAUSTED)."""


class NotReady(WorkerError):
    """The model is still loading or the worker is draining (UNAVAILABLE)."""


class StartupError(Exception):
    """The worker cannot start with its settings (a model too large for its devices, too little
    memory left for sessions); the message names the numbers. Never sent to callers."""
