"""mmtransfer: move variable-length embeddings between model instances.

Reading order (README.md beside this file has the message sequence and each role's primitives):
  enums.py, errors.py    every closed set of names (transports, error codes, failure causes), the errors
  config.py              TransferConfig, every knob and its default
  allocator.py, pool.py  BlockAllocator / FixedSlotAllocator; BlockPool: the preallocated buffer
  ref.py, window.py      EmbedRef (the handle that travels through Triton); the receiver's window policy
  wire/                  messages, validators, codec + MAC, chunk arithmetic
  transports/            the link interface (base.py), its registry, host / nccl / cuda_ipc links
  sender*.py             SenderEndpoint and its transfer table, channel table, serve path, server loop
  receiver*.py           Receiver and its links, sockets and the one pull loop
"""

from .config import TransferConfig
from .enums import ErrorCode, FailureCause, Landing, TransferState, Transport, WindowPolicyKind
from .errors import (
    AuthenticationError,
    ChannelError,
    ConfigError,
    PoolExhausted,
    ProtocolError,
    RemoteError,
    RequestTooLarge,
    SocketsExhausted,
    TransferAborted,
    TransferCancelled,
    TransferError,
    TransferExpired,
    TransferInUse,
    TransferNotFound,
    TransferTimeout,
    TransportUnavailable,
    VersionMismatch,
)
from .observer import TransferObserver, TransferRecord
from .pool import BlockPool, dtype_from_name
from .receiver import Received, Receiver
from .ref import EmbedRef, new_transfer_id
from .sender import SenderEndpoint
from .transports import nccl_lib
from .transports.negotiate import negotiate
from .wire import Aux

__all__ = [
    "AuthenticationError",
    "Aux",
    "BlockPool",
    "ChannelError",
    "ConfigError",
    "EmbedRef",
    "ErrorCode",
    "FailureCause",
    "Landing",
    "PoolExhausted",
    "ProtocolError",
    "Received",
    "Receiver",
    "RemoteError",
    "RequestTooLarge",
    "SenderEndpoint",
    "SocketsExhausted",
    "TransferAborted",
    "TransferCancelled",
    "TransferConfig",
    "TransferError",
    "TransferExpired",
    "TransferInUse",
    "TransferNotFound",
    "TransferObserver",
    "TransferRecord",
    "TransferState",
    "TransferTimeout",
    "Transport",
    "TransportUnavailable",
    "VersionMismatch",
    "WindowPolicyKind",
    "dtype_from_name",
    "nccl_lib",
    "negotiate",
    "new_transfer_id",
]
