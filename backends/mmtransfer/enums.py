"""Every closed set of names the transfer library uses, defined once.

Transports, landings and window policies are configuration values (``TransferConfig`` accepts
their names as strings and stores the members); ``ErrorCode`` travels on the wire in ERROR
frames; ``FailureCause`` labels a failed transfer for metrics (``mm_transfer_failures_total``) and
is the ``cause`` of every ``TransferError``. All are ``str`` enums, so a member compares equal to
its name (``Transport.HOST == "host"``) and prints as it is written on the wire.
"""

from __future__ import annotations

from enum import Enum, IntEnum


class _Named(str, Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Transport(_Named):
    """How chunk bytes move between two pools. ``AUTO`` is a preference only: a pair negotiates
    one of the others (``transports/negotiate.py``)."""

    AUTO = "auto"
    HOST = "host"  # inline ZeroMQ frames on the control connection: any two processes, no GPU needed
    NCCL = "nccl"  # point-to-point on a 2-rank communicator: two GPUs
    CUDA_IPC = "cuda_ipc"  # the receiver maps the sender's pool: the same GPU
    SHM = "shm"  # the receiver maps the sender's CPU pool (a memfd region): two CPU pools on the same host


class Landing(_Named):
    """Where a GPU link puts received bytes (the host link always lands directly: its payload frame is the buffer)."""

    DIRECT = "direct"  # straight into the assembled embedding; the window is the flow-control credit
    WINDOW = "window"  # into the window's blocks, then copied out


class WindowPolicyKind(_Named):
    FIXED = "fixed"
    ADAPTIVE = "adaptive"


class ErrorCode(_Named):
    """The ``code`` of an ERROR frame: what the receiver acts on (never the message text)."""

    NOT_FOUND = "not_found"
    EXPIRED = "expired"
    BAD_REQUEST = "bad_request"
    TIMEOUT = "timeout"
    BUSY = "busy"
    INTERNAL = "internal"
    VERSION = "version"  # the frame speaks another protocol version
    UNAVAILABLE = "unavailable"  # the asked-for transport or channel cannot serve (the channel is given up)
    UNKNOWN_CHANNEL = "unknown_channel"  # the PULL names a channel this sender does not have; nothing was sent
    UNAUTHENTICATED = "unauthenticated"  # the frame had no valid MAC (shared secret)
    IN_USE = "in_use"  # another receiver is pulling this transfer; nothing was sent


class FailureCause(_Named):
    """Why a transfer failed; exported as the ``cause`` label of ``mm_transfer_failures_total``."""

    POOL_EXHAUSTED = "pool_exhausted"
    TIMEOUT = "timeout"
    NOT_FOUND = "not_found"
    EXPIRED = "expired"
    PROTOCOL = "protocol"
    TOO_LARGE = "too_large"
    ABORTED = "aborted"
    CANCELLED = "cancelled"
    AUTH = "auth"
    CHANNEL = "channel"
    TRANSPORT = "transport"
    REMOTE = "remote"
    IN_USE = "in_use"  # another receiver was pulling the transfer
    SOCKETS = "sockets"  # the receiver's connections (file descriptors) were all in use
    TTL = "ttl"
    INTERNAL = "internal"

    @classmethod
    def of(cls, value: object) -> FailureCause:
        """The member for a cause or its name; anything unknown counts as ``INTERNAL``."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL


class TransferState(IntEnum):
    """Ordered states of one transfer; a later state never goes back to an earlier one
    except to FAILED, and ``state >= TRANSFERRING`` reads as "bytes are moving or moved"."""

    FAILED = 0
    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4
