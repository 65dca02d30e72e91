"""ERROR frames as the receiver raises them: by wire code, never by message text."""

from __future__ import annotations

from . import wire
from .enums import ErrorCode
from .errors import (
    AuthenticationError,
    RemoteError,
    TransferError,
    TransferExpired,
    TransferInUse,
    TransferNotFound,
    TransferTimeout,
)


def remote_error(msg: wire.Error) -> TransferError:
    if msg.code is ErrorCode.UNAUTHENTICATED:
        return AuthenticationError(f"the sender refused this endpoint's frames: {msg.message}")
    if msg.code is ErrorCode.EXPIRED:
        return TransferExpired(f"transfer {msg.transfer_id}: {msg.message}")
    if msg.code is ErrorCode.NOT_FOUND:
        return TransferNotFound(f"transfer {msg.transfer_id}: {msg.message}")
    if msg.code is ErrorCode.IN_USE:
        return TransferInUse(f"transfer {msg.transfer_id}: {msg.message}")
    if msg.code is ErrorCode.TIMEOUT:
        return TransferTimeout(f"transfer {msg.transfer_id}: sender says {msg.message}")
    return RemoteError(msg.code, msg.message)
