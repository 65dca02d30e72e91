"""Errors raised by the transfer library.

Every ``TransferError`` carries a ``cause`` (``enums.FailureCause``), safe to use as a metrics
label, so failures are counted by cause without parsing messages.
"""

from __future__ import annotations

from .enums import ErrorCode, FailureCause


class TransferError(RuntimeError):
    """Base class: a transfer could not complete. ``cause`` labels it for metrics."""

    cause: FailureCause = FailureCause.INTERNAL


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


class RequestTooLarge(TransferError, ValueError):
    """The request can never be satisfied (more tokens or blocks than the pool or limit allows)."""

    cause = FailureCause.TOO_LARGE


class PoolExhausted(TransferError):
    """No blocks became free within the allocation timeout (backpressure gave up)."""

    cause = FailureCause.POOL_EXHAUSTED


class TransferTimeout(TransferError):
    """A peer did not answer within the configured timeout."""

    cause = FailureCause.TIMEOUT


class TransferNotFound(TransferError):
    """The sender does not know the transfer id (never registered, already done, or expired)."""

    cause = FailureCause.NOT_FOUND


class TransferExpired(TransferNotFound):
    """The sender reclaimed the embedding: it was not pulled within its ``ttl_s``."""

    cause = FailureCause.EXPIRED


class TransferInUse(TransferError):
    """Another receiver is pulling the transfer: a transfer serves one receiver at a time."""

    cause = FailureCause.IN_USE


class SocketsExhausted(TransferError):
    """Every connection this receiver may hold (``max_sockets``) is in use by other pulls."""

    cause = FailureCause.SOCKETS


class ProtocolError(TransferError, ValueError):
    """A message could not be decoded or violates the protocol."""

    cause = FailureCause.PROTOCOL


class VersionMismatch(ProtocolError):
    """A frame or EMBED_REF of another protocol version (an endpoint of another release)."""


class AuthenticationError(ProtocolError):
    """A control frame without a valid MAC where a shared secret is configured (or one with a MAC
    where none is): the peer does not hold the same ``shared_secret``."""

    cause = FailureCause.AUTH


class RemoteError(TransferError):
    """The peer answered with an ERROR frame; ``code`` is its wire error code."""

    cause = FailureCause.REMOTE

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        self.code = ErrorCode(code)
        super().__init__(f"{self.code.value}: {message}")


class TransferAborted(TransferError):
    """The transfer was aborted (by the peer, a cancel or shutdown)."""

    cause = FailureCause.ABORTED


class TransferCancelled(TransferAborted):
    """The request that needed the transfer was cancelled (client cancel or disconnect)."""

    cause = FailureCause.CANCELLED


class TransportUnavailable(TransferError):
    """The configured transport cannot connect these two endpoints (the message says why)."""

    cause = FailureCause.TRANSPORT


class ChannelError(TransferError):
    """A GPU channel failed; it is given up and the next pull opens a new one."""

    cause = FailureCause.CHANNEL
