"""OpenAI-style errors and the mapping of Triton errors onto HTTP status codes.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with its status:

    400 invalid_request_error   bad JSON, bad field, bad image, unsupported option; Triton INVALID_ARG
    404 invalid_request_error   unknown model (code model_not_found) or path
    413 invalid_request_error   body (or a fetched image) larger than the limits (code request_too_large)
    499 -                       never sent: the client went away (logged, counted)
    503 server_error            Triton UNAVAILABLE (pool exhausted, queue full, peer down): retry later
    504 server_error            Triton DEADLINE_EXCEEDED or our own timeout
    500 server_error            anything else
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass
class APIError(Exception):
    """An error answer; ``param`` names the offending request field when there is one."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, "invalid_request_error", param, "request_too_large")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model {model!r} does not exist", "invalid_request_error", "model", "model_not_found")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "server_error", None, "service_unavailable")


# gRPC status names (tritonclient's InferenceServerException.status(), e.g. "StatusCode.UNAVAILABLE").
_GRPC_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", "invalid_input"),
    "NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "UNAVAILABLE": (503, "server_error", "service_unavailable"),
    "RESOURCE_EXHAUSTED": (503, "server_error", "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "server_error", "timeout"),
    "CANCELLED": (503, "server_error", "cancelled"),
}
# Streamed errors carry only a message; the Python models prefix it with their cause (mm_triton.errors).
_MESSAGE_CAUSES = (
    (re.compile(r"invalid input|invalid argument|INVALID_ARG", re.I), "INVALID_ARGUMENT"),
    (re.compile(r"\bunavailable\b|pool_exhausted|queue_full|queue_timeout|shutdown|not ready", re.I), "UNAVAILABLE"),
    (re.compile(r"deadline|timed out|timeout", re.I), "DEADLINE_EXCEEDED"),
    (re.compile(r"\bcancelled\b", re.I), "CANCELLED"),
)


def from_triton(status: str | None, message: str) -> APIError:
    """The APIError for a Triton error: by gRPC status when known, else by the message's cause prefix."""
    name = (status or "").rsplit(".", 1)[-1].upper()
    if name not in _GRPC_STATUS:
        name = next((n for rx, n in _MESSAGE_CAUSES if rx.search(message or "")), "")
    http, kind, code = _GRPC_STATUS.get(name, (500, "server_error", "internal_error"))
    return APIError(http, _clean(message) or "inference failed", kind, None, code)


def _clean(message: str) -> str:
    """Triton's framing noise off a model's message (it stays in the server log)."""
    message = re.sub(r"^\s*in ensemble '[^']*', ", "", message or "")
    return re.sub(r"\[request id: [^\]]*\]\s*", "", message).strip()
