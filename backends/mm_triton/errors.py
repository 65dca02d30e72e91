"""Map library exceptions to Triton errors with the right status code.

    INVALID_ARG   bad input: ValueError (images, prompt, MAX_TOKENS, EMBED_REF), RequestTooLarge
    UNAVAILABLE   retry later, the request itself was fine: pool exhausted (backpressure), a peer that did not
                  answer in time, an embedding reclaimed (TTL) or unknown to its encoder (restarted), a GPU
                  channel that broke, a sender that refused this endpoint's shared secret, an embedding
                  another receiver is pulling (``in_use``), every connection of the receiver in use (``sockets``)
    CANCELLED     the client cancelled the request (gRPC) while it was being served
    INTERNAL      anything else (a protocol violation, a bug)

The language engine's errors (``mm_engine.api.EngineError``) map by cause: invalid -> INVALID_ARG;
queue_full, queue_timeout, deadline, shutdown -> UNAVAILABLE "unavailable (<cause>)"; cancelled ->
CANCELLED; image_load -> the code of the loader's own exception (a transfer error or a bad image);
internal -> INTERNAL.
"""

from __future__ import annotations

from typing import Any

from mm_engine.api import EngineError, ErrorCause
from mmtransfer import (
    AuthenticationError,
    FailureCause,
    PoolExhausted,
    TransferCancelled,
    TransferError,
    TransferNotFound,
    TransferTimeout,
)

_RETRYABLE = (PoolExhausted, TransferTimeout, TransferNotFound, AuthenticationError)
_RETRYABLE_CAUSES = (FailureCause.CHANNEL, FailureCause.IN_USE, FailureCause.SOCKETS)


_ENGINE_UNAVAILABLE = ("queue_full", "queue_timeout", "deadline", "shutdown")


def _engine_code_name(exc: BaseException) -> tuple[str, str] | None:
    if not isinstance(exc, EngineError):
        return None
    cause = exc.cause.value
    if cause == "image_load" and exc.__cause__ is not None:
        return error_code_name(exc.__cause__)
    if cause == "invalid":
        return "INVALID_ARG", "invalid input"
    if cause in _ENGINE_UNAVAILABLE:
        return "UNAVAILABLE", f"unavailable ({cause})"
    if cause == "cancelled":
        return "CANCELLED", "cancelled"
    return "INTERNAL", f"internal error ({cause})"


def error_code_name(exc: BaseException) -> tuple[str, str]:
    """(pb_utils.TritonError code name, message prefix) for an exception."""
    engine = _engine_code_name(exc)
    if engine is not None:
        return engine
    if isinstance(exc, TransferCancelled):
        return "CANCELLED", "cancelled"
    if isinstance(exc, PoolExhausted):
        return "UNAVAILABLE", "unavailable (pool_exhausted)"
    if isinstance(exc, _RETRYABLE) or (isinstance(exc, TransferError) and exc.cause in _RETRYABLE_CAUSES):
        return "UNAVAILABLE", f"unavailable ({FailureCause.of(getattr(exc, 'cause', 'timeout')).value})"
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return "INVALID_ARG", "invalid input"
    if isinstance(exc, TransferError):
        return "INTERNAL", f"transfer failed ({FailureCause.of(exc.cause).value})"
    return "INTERNAL", f"internal error ({type(exc).__name__})"


def triton_error(pb_utils: Any, exc: BaseException) -> Any:
    """A ``pb_utils.TritonError`` for ``exc`` (see the table above)."""
    err_cls = pb_utils.TritonError
    name, prefix = error_code_name(exc)
    code = getattr(err_cls, name, None)
    if code is None and name == "CANCELLED":
        code, prefix = getattr(err_cls, "UNAVAILABLE", None), "cancelled"
    detail = exc.__cause__ if _is_image_load(exc) else exc
    message = f"{prefix}: {detail}"
    return err_cls(message, code) if code is not None else err_cls(message)


def _is_image_load(exc: BaseException) -> bool:
    return isinstance(exc, EngineError) and exc.cause is ErrorCause.IMAGE_LOAD and exc.__cause__ is not None
