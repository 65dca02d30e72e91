"""The wire: messages (``messages.py``), their validators (``fields.py``), frames with the
optional MAC (``codec.py``) and chunk arithmetic (``pieces.py``). ``from mmtransfer import wire``
gives all of it under one name."""

from ..enums import ErrorCode, TransferState
from .codec import AUTH_FLAG, HEADER, MAC_BYTES, MAGIC, MAX_FRAME_BYTES, PROTOCOL_VERSION, decode, encode, mac_key
from .fields import MAX_CHUNKS_PER_PULL, MAX_HIDDEN, MAX_PIECES, MAX_TOKENS_ON_WIRE
from .messages import (
    BOOTSTRAP_VERSION,
    Abort,
    Ack,
    Aux,
    Bootstrap,
    BootstrapAck,
    Chunk,
    Claim,
    Close,
    Done,
    Error,
    Message,
    MsgType,
    Pull,
    printable,
)
from .pieces import check_pieces, chunk_pieces, chunk_plan, chunk_tokens, merge_runs, slice_runs, split_pieces

__all__ = [
    "AUTH_FLAG",
    "BOOTSTRAP_VERSION",
    "HEADER",
    "MAC_BYTES",
    "MAGIC",
    "MAX_CHUNKS_PER_PULL",
    "MAX_FRAME_BYTES",
    "MAX_HIDDEN",
    "MAX_PIECES",
    "MAX_TOKENS_ON_WIRE",
    "PROTOCOL_VERSION",
    "Abort",
    "Ack",
    "Aux",
    "Bootstrap",
    "BootstrapAck",
    "Chunk",
    "Claim",
    "Close",
    "Done",
    "Error",
    "ErrorCode",
    "Message",
    "MsgType",
    "Pull",
    "TransferState",
    "check_pieces",
    "chunk_pieces",
    "chunk_plan",
    "chunk_tokens",
    "decode",
    "encode",
    "mac_key",
    "merge_runs",
    "printable",
    "slice_runs",
    "split_pieces",
]
