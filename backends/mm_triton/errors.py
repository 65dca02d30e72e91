"""Map library exceptions to Triton errors with the right status code."""
from __future__ import annotations

from typing import Any

from mmtransfer import PoolExhausted, TransferError, TransferTimeout


def triton_error(pb_utils: Any, exc: BaseException) -> Any:
    """INVALID_ARG for bad input, UNAVAILABLE for backpressure and timeouts, INTERNAL otherwise."""
    err_cls = pb_utils.TritonError
    if isinstance(exc, (PoolExhausted, TransferTimeout)):
        code, prefix = getattr(err_cls, "UNAVAILABLE", None), "unavailable"
    elif isinstance(exc, (ValueError, FileNotFoundError)):
        code, prefix = getattr(err_cls, "INVALID_ARG", None), "invalid input"
    elif isinstance(exc, TransferError):
        code, prefix = getattr(err_cls, "INTERNAL", None), f"transfer failed ({exc.cause})"
    else:
        code, prefix = getattr(err_cls, "INTERNAL", None), f"internal error ({type(exc).__name__})"
    message = f"{prefix}: {exc}"
    return err_cls(message, code) if code is not None else err_cls(message)
