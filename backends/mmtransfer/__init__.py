"""mmtransfer: move variable-length embeddings between model instances.

Reading order:
  config.py     TransferConfig, every knob and its default
  allocator.py  BlockAllocator (free list) and FixedSlotAllocator (the baseline)
  pool.py       BlockPool: the preallocated buffer, bounded waits, scatter/gather
  protocol.py   wire messages (PULL, CHUNK, DONE, ACK, ABORT, ERROR), TransferState
  ref.py        EmbedRef, the small handle that travels through Triton
  transport.py  Transport interface, the HostTransport, and the choice of transport (negotiate)
  channels.py, transport_nccl.py, transport_cuda_ipc.py, nccl_lib.py, cuda.py
                GPU channels: NCCL point-to-point, same-GPU CUDA IPC, the libnccl binding
  sender.py     SenderEndpoint (encoder side): owns embeddings, serves pulls
  receiver.py   Receiver (language side): window, pull, continuations, assembly
See README.md beside this file for the message sequence.
"""
from .config import TransferConfig
from .errors import (
    AuthenticationError, ConfigError, PoolExhausted, ProtocolError, RemoteError, RequestTooLarge, TransferAborted,
    TransferCancelled, TransferError, TransferExpired, TransferNotFound, TransferTimeout,
)
from .observer import TransferObserver, TransferRecord
from .pool import BlockPool, dtype_from_name
from .protocol import Aux, TransferState
from .receiver import Received, Receiver
from .ref import EmbedRef
from .sender import SenderEndpoint
from .transport import HostTransport, Transport, negotiate

__all__ = [
    "AuthenticationError", "TransferCancelled", "TransferExpired",
    "Aux", "BlockPool", "ConfigError", "EmbedRef", "HostTransport", "PoolExhausted", "ProtocolError",
    "Received", "Receiver", "RemoteError", "RequestTooLarge", "SenderEndpoint", "TransferAborted",
    "TransferConfig", "TransferError", "TransferNotFound", "TransferObserver", "TransferRecord",
    "TransferState", "TransferTimeout", "Transport", "dtype_from_name", "negotiate",
]
