"""Errors raised by the transfer library.

Every error carries a short ``cause`` that is safe to use as a metrics label
("pool_exhausted", "timeout", ...), so failures can be counted by cause without
parsing messages.
"""
from __future__ import annotations


class TransferError(RuntimeError):
    """Base class: a transfer could not complete. ``cause`` labels it for metrics."""

    cause = "internal"


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


class RequestTooLarge(TransferError, ValueError):
    """The request can never be satisfied (more tokens or blocks than the pool or limit allows)."""

    cause = "too_large"


class PoolExhausted(TransferError):
    """No blocks became free within the allocation timeout (backpressure gave up)."""

    cause = "pool_exhausted"


class TransferTimeout(TransferError):
    """A peer did not answer within the configured timeout."""

    cause = "timeout"


class TransferNotFound(TransferError):
    """The sender does not know the transfer id (never registered, already done, or expired)."""

    cause = "not_found"


class TransferExpired(TransferNotFound):
    """The sender reclaimed the embedding: it was not pulled within its ``ttl_s``."""

    cause = "expired"


class ProtocolError(TransferError, ValueError):
    """A message could not be decoded or violates the protocol."""

    cause = "protocol"


class AuthenticationError(ProtocolError):
    """A control frame without a valid MAC where a shared secret is configured (or one with a MAC
    where none is): the peer does not hold the same ``shared_secret``."""

    cause = "auth"


class RemoteError(TransferError):
    """The peer answered with an error; ``code`` is the wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.cause = {"not_found": "not_found", "expired": "expired", "timeout": "timeout",
                      "unauthenticated": "auth"}.get(code, "remote")


class TransferAborted(TransferError):
    """The transfer was aborted (by the peer, a cancel or shutdown)."""

    cause = "aborted"


class TransferCancelled(TransferAborted):
    """The request that needed the transfer was cancelled (client cancel or disconnect)."""

    cause = "cancelled"
