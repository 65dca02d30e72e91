"""Wire messages of the receiver-driven pull protocol, and their encoding.

A frame is ``b"MMTX" | version (u8) | type (u8) | JSON body``; chunk bytes of the
host transport follow as separate ZeroMQ frames, never inside the JSON. No pickle.
Every field is type-checked and bounded on decode, unknown or missing fields are
rejected, so a forged or corrupt frame raises ``ProtocolError`` and nothing else.

Sequence (receiver R drives, sender S answers; one request in flight per pull)::

    R: PULL(tid, seq=0, sent_tokens=0, capacity=W)   ->  S
    S: CHUNK(tid, seq=0, offset=0, n=min(N, W), total=N, aux)  [+ bytes]  -> R
    R: PULL(tid, seq=1, sent_tokens=W, capacity=W)   ->  S        (continuation 1)
    S: CHUNK(tid, seq=1, offset=W, n=min(N-W, W), total=N)     [+ bytes]  -> R
       ... as many continuations as needed, until offset + n == N ...
    R: DONE(tid)  -> S ;  S frees its blocks ;  S: ACK(tid) -> R
    (on failure R sends ABORT(tid, reason); S frees and answers nothing)
    (any bad request: S answers ERROR(tid, code, message))
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar, Union

from .errors import ProtocolError

MAGIC = b"MMTX"
PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024
MAX_TOKENS_ON_WIRE = 1 << 24
MAX_HIDDEN = 1 << 16
_HEADER = struct.Struct("!4sBB")
_TID = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


class TransferState(IntEnum):
    """Ordered states of one transfer; a later state never goes back to an earlier one
    except to FAILED, and ``state >= TRANSFERRING`` reads as "bytes are moving or moved"."""

    FAILED = 0
    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4


class MsgType(IntEnum):
    PULL = 1
    CHUNK = 2
    DONE = 3
    ACK = 4
    ABORT = 5
    ERROR = 6


class ErrorCode:
    NOT_FOUND = "not_found"
    EXPIRED = "expired"
    BAD_REQUEST = "bad_request"
    TIMEOUT = "timeout"
    BUSY = "busy"
    INTERNAL = "internal"
    VERSION = "version"
    ALL = frozenset({NOT_FOUND, EXPIRED, BAD_REQUEST, TIMEOUT, BUSY, INTERNAL, VERSION})


def chunk_tokens(total_tokens: int, sent_tokens: int, capacity_tokens: int) -> int:
    """Tokens in the chunk answering PULL(sent_tokens, capacity): ``min(remaining, capacity)``."""
    if not 0 <= sent_tokens < total_tokens or capacity_tokens < 1:
        raise ValueError(f"no chunk at {sent_tokens}/{total_tokens} with capacity {capacity_tokens}")
    return min(total_tokens - sent_tokens, capacity_tokens)


def chunk_plan(total_tokens: int, capacity_tokens: int) -> list[tuple[int, int]]:
    """Every (offset, num_tokens) the pull sequence moves for an embedding; the first
    is the initial chunk, the rest are continuations (``len - 1`` of them)."""
    plan, sent = [], 0
    while sent < total_tokens:
        n = chunk_tokens(total_tokens, sent, capacity_tokens)
        plan.append((sent, n))
        sent += n
    return plan


# ---- field validators: each returns the value or raises ProtocolError -------------------
def _int(low: int, high: int):
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ProtocolError(f"field {name}: expected integer in [{low}, {high}], got {v!r}")
        return v

    return check


def _str(max_len: int, pattern: re.Pattern[str] = _PRINTABLE):
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str) or len(v) > max_len or not pattern.fullmatch(v):
            raise ProtocolError(f"field {name}: expected printable string of <= {max_len} chars")
        return v

    return check


def _tid(name: str, v: Any) -> str:
    if not isinstance(v, str) or not _TID.fullmatch(v):
        raise ProtocolError(f"field {name}: expected a 128-bit id as 32 lowercase hex digits")
    return v


def _code(name: str, v: Any) -> str:
    if v not in ErrorCode.ALL:
        raise ProtocolError(f"field {name}: unknown error code {v!r}")
    return v


_SEQ = _int(0, (1 << 31) - 1)
_TOKENS = _int(0, MAX_TOKENS_ON_WIRE)


@dataclass(frozen=True)
class Aux:
    """What the receiver learns with the first chunk: length, layout and model extras
    (for Qwen2-VL the image grid ``{"grid_thw": [t, h, w]}``)."""

    total_tokens: int
    hidden: int
    dtype: str
    extras: dict[str, list[int]] = field(default_factory=dict)

    MAX_EXTRAS: ClassVar[int] = 16
    MAX_EXTRA_LEN: ClassVar[int] = 64

    @classmethod
    def from_obj(cls, obj: Any) -> "Aux":
        if not isinstance(obj, dict) or set(obj) != {"total_tokens", "hidden", "dtype", "extras"}:
            raise ProtocolError("aux: expected fields total_tokens, hidden, dtype, extras")
        extras = obj["extras"]
        if not isinstance(extras, dict) or len(extras) > cls.MAX_EXTRAS:
            raise ProtocolError(f"aux.extras: expected a mapping of <= {cls.MAX_EXTRAS} entries")
        clean: dict[str, list[int]] = {}
        for key, values in extras.items():
            _str(64, _NAME)("aux.extras key", key)
            if not isinstance(values, list) or len(values) > cls.MAX_EXTRA_LEN:
                raise ProtocolError(f"aux.extras[{key}]: expected a list of <= {cls.MAX_EXTRA_LEN} ints")
            clean[key] = [_int(-(1 << 62), 1 << 62)(f"aux.extras[{key}]", x) for x in values]
        return cls(
            total_tokens=_int(1, MAX_TOKENS_ON_WIRE)("aux.total_tokens", obj["total_tokens"]),
            hidden=_int(1, MAX_HIDDEN)("aux.hidden", obj["hidden"]),
            dtype=_str(16, _NAME)("aux.dtype", obj["dtype"]),
            extras=clean,
        )

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Aux":
        try:
            return cls.from_obj(json.loads(data))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"aux: not valid JSON ({exc})") from None


@dataclass(frozen=True)
class Pull:
    """Receiver asks for the tokens from ``sent_tokens`` on, at most ``capacity_tokens``."""

    TYPE: ClassVar[MsgType] = MsgType.PULL
    SCHEMA: ClassVar[dict] = {
        "transfer_id": _tid, "seq": _SEQ, "sent_tokens": _TOKENS,
        "capacity_tokens": _int(1, MAX_TOKENS_ON_WIRE), "transport": _str(16, _NAME),
        "request_id": _str(128),
    }
    transfer_id: str
    seq: int
    sent_tokens: int
    capacity_tokens: int
    transport: str = "host"
    request_id: str = ""


@dataclass(frozen=True)
class Chunk:
    """Sender's answer to a PULL: tokens ``[offset, offset + num_tokens)`` of ``total_tokens``.
    ``aux`` is present on the chunk at offset 0 only."""

    TYPE: ClassVar[MsgType] = MsgType.CHUNK
    SCHEMA: ClassVar[dict] = {
        "transfer_id": _tid, "seq": _SEQ, "offset": _TOKENS,
        "num_tokens": _int(1, MAX_TOKENS_ON_WIRE), "total_tokens": _int(1, MAX_TOKENS_ON_WIRE),
        "aux": lambda name, v: None if v is None else Aux.from_obj(v),
    }
    transfer_id: str
    seq: int
    offset: int
    num_tokens: int
    total_tokens: int
    aux: Aux | None = None


@dataclass(frozen=True)
class Done:
    TYPE: ClassVar[MsgType] = MsgType.DONE
    SCHEMA: ClassVar[dict] = {"transfer_id": _tid, "seq": _SEQ}
    transfer_id: str
    seq: int


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[MsgType] = MsgType.ACK
    SCHEMA: ClassVar[dict] = {"transfer_id": _tid, "seq": _SEQ}
    transfer_id: str
    seq: int


@dataclass(frozen=True)
class Abort:
    TYPE: ClassVar[MsgType] = MsgType.ABORT
    SCHEMA: ClassVar[dict] = {"transfer_id": _tid, "reason": _str(256)}
    transfer_id: str
    reason: str


@dataclass(frozen=True)
class Error:
    TYPE: ClassVar[MsgType] = MsgType.ERROR
    SCHEMA: ClassVar[dict] = {
        "transfer_id": lambda name, v: "" if v == "" else _tid(name, v),
        "seq": _SEQ, "code": _code, "message": _str(512),
    }
    transfer_id: str
    seq: int
    code: str
    message: str


Message = Union[Pull, Chunk, Done, Ack, Abort, Error]
_BY_TYPE: dict[int, type] = {cls.TYPE: cls for cls in (Pull, Chunk, Done, Ack, Abort, Error)}


def encode(msg: Message) -> bytes:
    body = {f.name: getattr(msg, f.name) for f in fields(msg)}
    if isinstance(msg, Chunk) and msg.aux is not None:
        body["aux"] = asdict(msg.aux)
    data = _HEADER.pack(MAGIC, PROTOCOL_VERSION, int(msg.TYPE)) + json.dumps(
        body, separators=(",", ":")
    ).encode()
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"encoded {msg.TYPE.name} frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    return data


def decode(data: bytes) -> Message:
    """Parse one control frame; raises ProtocolError (only) on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame: expected bytes")
    data = bytes(data)
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame: {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    if len(data) < _HEADER.size:
        raise ProtocolError("frame: truncated header")
    magic, version, type_ = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("frame: bad magic")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"frame: protocol version {version}, this endpoint speaks {PROTOCOL_VERSION}")
    cls = _BY_TYPE.get(type_)
    if cls is None:
        raise ProtocolError(f"frame: unknown message type {type_}")
    try:
        body = json.loads(data[_HEADER.size :])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError(f"{cls.__name__}: body is not valid JSON") from None
    if not isinstance(body, dict) or set(body) != set(cls.SCHEMA):
        raise ProtocolError(f"{cls.__name__}: expected exactly the fields {sorted(cls.SCHEMA)}")
    return cls(**{name: check(name, body[name]) for name, check in cls.SCHEMA.items()})
