"""Errors in the OpenAI API's shape, and the HTTP status of each orchestrator failure."""

from __future__ import annotations

import grpc

from coolfusion.client import CoolfusionError

# HTTP status -> the OpenAI error type that status carries.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# gRPC status of a failed orchestrator call -> (HTTP status, error code).
_FROM_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_value"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "orchestrator_refused_gateway"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "resource_exhausted"),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
# The orchestrator names its own fields in INVALID_ARGUMENT messages; the OpenAI field each one is.
# First match wins; "{prompt}" is `messages` or `prompt`, whichever the endpoint takes.
_PARAMS = (
    ("calibration", "calibration"),
    ("segment_max_tokens", "segment_max_tokens"),
    ("max_new_tokens", "max_tokens"),
    ("stop string", "stop"),
    ("stop_strings", "stop"),
    ("worker_weights", "worker_weights"),
    ("prompt_templates", "prompt_templates"),
    ("strategy names unknown workers", "worker_weights"),
    ("unknown workers", "workers"),
    ("named twice", "workers"),
    ("chat roles", "messages"),
    ("tool_choice", "tool_choice"),
    ("prompt.chat.tools", "tools"),
    ("prompt.chat.messages", "messages"),
    ("tool calls", "tool_choice"),
    ("constraint", "response_format"),
    ("sampling.temperature", "temperature"),
    ("sampling.top_p", "top_p"),
    ("n is ", "n"),
    ("prompt", "{prompt}"),
)


class ApiError(Exception):
    """A request the gateway answers with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI's API answers."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    """A malformed or out-of-range field (400)."""
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, why: str) -> ApiError:
    """A parameter that fusion cannot honour (400), refused instead of being ignored."""
    return ApiError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


def from_orchestrator(error: CoolfusionError, prompt_param: str) -> ApiError:
    """The HTTP error for a failed orchestrator call; the orchestrator's explanation is kept."""
    status, code = _FROM_GRPC.get(error.code, (500, "internal_error"))
    message = error.details or error.code.name
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        message = f"the orchestrator refused the gateway's credentials (--orchestrator-token-file): {message}"
    param = _param_of(message, prompt_param) if status == 400 else None
    return ApiError(status, message, param=param, code=code)


def _param_of(message: str, prompt_param: str) -> str | None:
    for words, param in _PARAMS:
        if words in message:
            return param.replace("{prompt}", prompt_param)
    return None
