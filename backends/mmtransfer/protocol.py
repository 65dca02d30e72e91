"""Wire messages of the receiver-driven pull protocol, and their encoding.

A frame is ``b"MMTX" | version (u8) | type (u8) | JSON body``; chunk bytes of the
host transport follow as separate ZeroMQ frames, never inside the JSON. No pickle.
Every field is type-checked and bounded on decode, unknown or missing fields are
rejected, so a forged or corrupt frame raises ``ProtocolError`` and nothing else.

With a shared secret (``TransferConfig.shared_secret``) every frame is authenticated:
the type byte gets the ``AUTH_FLAG`` bit and ``HMAC-SHA256(secret, frame)`` (32 bytes)
is appended. The MAC is checked before anything else of the frame is parsed; a frame
without a valid MAC raises ``AuthenticationError``. It authenticates the peer and the
control frame; it does not encrypt, and host-transport payload frames are not covered.

Sequence (receiver R drives, sender S answers; one request in flight per pull)::

    R: PULL(tid, seq=0, sent_tokens=0, capacity=W)   ->  S
    S: CHUNK(tid, seq=0, offset=0, n=min(N, W), total=N, aux)  [+ bytes]  -> R
    R: PULL(tid, seq=1, sent_tokens=W, capacity=W)   ->  S        (continuation 1)
    S: CHUNK(tid, seq=1, offset=W, n=min(N-W, W), total=N)     [+ bytes]  -> R
       ... as many continuations as needed, until offset + n == N ...
    R: DONE(tid)  -> S ;  S frees its blocks ;  S: ACK(tid) -> R
    (on failure R sends ABORT(tid, reason); S frees and answers nothing)
    (any bad request: S answers ERROR(tid, code, message))

GPU transports add a bootstrap pair, once per (sender endpoint, receiver) channel::

    R: BOOTSTRAP(channel, wanted transport, R's device)  ->  S
    S: BOOTSTRAP_ACK(channel, chosen transport, S's device, ncclUniqueId | CUDA IPC handle)  -> R
    (both sides then form the channel: a 2-rank NCCL communicator, warmed up; or the mapped pool)
    R: CLOSE(channel, reason)  -> S   (the receiver gives a broken channel up; no answer)

and optional fields on PULL (channel, count, runs, op_seq) and CHUNK (pieces), left out of the
frame when they hold their defaults, so host-transport frames are the same bytes as before.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from dataclasses import asdict, dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar, Union

from .errors import AuthenticationError, ProtocolError

MAGIC = b"MMTX"
PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024
MAX_TOKENS_ON_WIRE = 1 << 24
MAX_HIDDEN = 1 << 16
MAX_PIECES = 2048  # contiguous pieces of one chunk (the union of both sides' block boundaries)
MAX_CHUNKS_PER_PULL = 1 << 16
BOOTSTRAP_VERSION = 1
TRANSPORT_NAMES = ("auto", "host", "nccl", "cuda_ipc")
_HEADER = struct.Struct("!4sBB")
AUTH_FLAG = 0x80  # set in the type byte of an authenticated frame
MAC_BYTES = 32  # HMAC-SHA256
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
    BOOTSTRAP = 7
    BOOTSTRAP_ACK = 8
    CLOSE = 9


class ErrorCode:
    NOT_FOUND = "not_found"
    EXPIRED = "expired"
    BAD_REQUEST = "bad_request"
    TIMEOUT = "timeout"
    BUSY = "busy"
    INTERNAL = "internal"
    VERSION = "version"
    UNAVAILABLE = "unavailable"  # the asked-for transport cannot connect these endpoints
    UNAUTHENTICATED = "unauthenticated"  # the frame had no valid MAC (shared secret)
    ALL = frozenset({NOT_FOUND, EXPIRED, BAD_REQUEST, TIMEOUT, BUSY, INTERNAL, VERSION, UNAVAILABLE,
                     UNAUTHENTICATED})


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
_ROW = _int(0, (1 << 40))


def _channel(name: str, v: Any) -> str:
    return "" if v == "" else _tid(name, v)


def _transport(name: str, v: Any) -> str:
    if v not in TRANSPORT_NAMES:
        raise ProtocolError(f"field {name}: unknown transport {v!r}; expected one of {list(TRANSPORT_NAMES)}")
    return v


def _runs(name: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_PIECES:
        raise ProtocolError(f"field {name}: expected a list of <= {MAX_PIECES} run lengths")
    return tuple(_int(1, MAX_TOKENS_ON_WIRE)(name, x) for x in v)


def _pieces(name: str, v: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, list) or len(v) > MAX_PIECES:
        raise ProtocolError(f"field {name}: expected a list of <= {MAX_PIECES} [row, length] pairs")
    out = []
    for item in v:
        if not isinstance(item, list) or len(item) != 2:
            raise ProtocolError(f"field {name}: expected [row, length] pairs")
        out.append((_ROW(name, item[0]), _int(1, MAX_TOKENS_ON_WIRE)(name, item[1])))
    return tuple(out)


def _hex(max_chars: int, exact: int | None = None):
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str) or len(v) > max_chars or len(v) % 2 or not re.fullmatch(r"[0-9a-f]*", v):
            raise ProtocolError(f"field {name}: expected lowercase hex of <= {max_chars} digits")
        if exact is not None and v and len(v) != exact:
            raise ProtocolError(f"field {name}: expected {exact} hex digits, got {len(v)}")
        return v

    return check


_IPC_SCHEMA: dict[str, Any] = {
    "handle": _hex(1024), "size_bytes": _int(1, 1 << 48), "offset_bytes": _int(0, 1 << 48),
    "ref_counter_handle": _hex(1024), "ref_counter_offset": _int(0, 1 << 48), "event_handle": _hex(1024),
    "event_sync_required": lambda name, v: _bool(name, v), "storage_offset": _int(0, 1 << 48),
    "rows": _int(1, 1 << 40), "hidden": _int(1, MAX_HIDDEN), "dtype": _str(16, _NAME),
    "pid": _int(0, 1 << 31), "local_key": _str(128),
}


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(f"field {name}: expected true or false")
    return v


def _ipc(name: str, v: Any) -> dict[str, Any] | None:
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) != set(_IPC_SCHEMA):
        raise ProtocolError(f"field {name}: expected exactly the fields {sorted(_IPC_SCHEMA)}")
    return {key: check(f"{name}.{key}", v[key]) for key, check in _IPC_SCHEMA.items()}


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
        "channel": _channel, "count": _int(0, MAX_CHUNKS_PER_PULL), "runs": _runs, "op_seq": _int(0, 1 << 62),
    }
    OPTIONAL: ClassVar[dict] = {"channel": "", "count": 1, "runs": (), "op_seq": 0}
    transfer_id: str
    seq: int
    sent_tokens: int
    capacity_tokens: int
    transport: str = "host"
    request_id: str = ""
    # GPU transports: the channel (from BOOTSTRAP), how many consecutive window-sized chunks
    # this PULL asks for (each answered by its own CHUNK; 0 = all of them, window by window,
    # which is what the receiver asks: no round trip per continuation), the receiver window's contiguous run
    # lengths (the sender splits at the union of both sides' boundaries), and the channel's
    # operation counter (NCCL: sends and receives must pair up in the same order).
    channel: str = ""
    count: int = 1
    runs: tuple[int, ...] = ()
    op_seq: int = 0


@dataclass(frozen=True)
class Chunk:
    """Sender's answer to a PULL: tokens ``[offset, offset + num_tokens)`` of ``total_tokens``.
    ``aux`` is present on the chunk at offset 0 only."""

    TYPE: ClassVar[MsgType] = MsgType.CHUNK
    SCHEMA: ClassVar[dict] = {
        "transfer_id": _tid, "seq": _SEQ, "offset": _TOKENS,
        "num_tokens": _int(1, MAX_TOKENS_ON_WIRE), "total_tokens": _int(1, MAX_TOKENS_ON_WIRE),
        "aux": lambda name, v: None if v is None else Aux.from_obj(v),
        "pieces": _pieces,
    }
    OPTIONAL: ClassVar[dict] = {"pieces": ()}
    transfer_id: str
    seq: int
    offset: int
    num_tokens: int
    total_tokens: int
    aux: Aux | None = None
    # GPU transports: the chunk as contiguous pieces, in token order: (sender pool row, length).
    # Every piece is contiguous in the sender's pool and in the receiver's window.
    pieces: tuple[tuple[int, int], ...] = ()


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


@dataclass(frozen=True)
class Bootstrap:
    """Receiver asks to open a channel for GPU transports (once per sender endpoint)."""

    TYPE: ClassVar[MsgType] = MsgType.BOOTSTRAP
    SCHEMA: ClassVar[dict] = {
        "version": _int(BOOTSTRAP_VERSION, BOOTSTRAP_VERSION), "channel": _tid, "transport": _transport,
        "device_kind": lambda name, v: _choice(name, v, ("cpu", "cuda")), "device_uuid": _str(64),
        "host": _str(128), "pid": _int(0, 1 << 31),
    }
    channel: str
    transport: str
    device_kind: str
    device_uuid: str
    host: str
    pid: int
    version: int = BOOTSTRAP_VERSION


@dataclass(frozen=True)
class BootstrapAck:
    """Sender's answer: the transport chosen for the channel and what forming it needs."""

    TYPE: ClassVar[MsgType] = MsgType.BOOTSTRAP_ACK
    SCHEMA: ClassVar[dict] = {
        "version": _int(BOOTSTRAP_VERSION, BOOTSTRAP_VERSION), "channel": _tid, "transport": _transport,
        "device_kind": lambda name, v: _choice(name, v, ("cpu", "cuda")), "device_uuid": _str(64),
        "host": _str(128), "nccl_id": _hex(256, exact=256), "ipc": _ipc,
    }
    channel: str
    transport: str
    device_kind: str
    device_uuid: str
    host: str
    nccl_id: str = ""
    ipc: dict | None = None
    version: int = BOOTSTRAP_VERSION


@dataclass(frozen=True)
class Close:
    """Receiver gives a channel up (after a failure on it, or at shutdown); no answer."""

    TYPE: ClassVar[MsgType] = MsgType.CLOSE
    SCHEMA: ClassVar[dict] = {"channel": _tid, "reason": _str(256)}
    channel: str
    reason: str


def _choice(name: str, v: Any, allowed: tuple[str, ...]) -> str:
    if v not in allowed:
        raise ProtocolError(f"field {name}: expected one of {list(allowed)}, got {v!r}")
    return v


Message = Union[Pull, Chunk, Done, Ack, Abort, Error, Bootstrap, BootstrapAck, Close]
_BY_TYPE: dict[int, type] = {cls.TYPE: cls for cls in (Pull, Chunk, Done, Ack, Abort, Error, Bootstrap,
                                                       BootstrapAck, Close)}


def mac_key(secret: str | bytes | None) -> bytes | None:
    """The HMAC key for a shared secret (None when there is none)."""
    if not secret:
        return None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def encode(msg: Message, key: bytes | None = None) -> bytes:
    """One control frame; with ``key`` (see ``mac_key``) authenticated by an appended HMAC-SHA256."""
    optional = getattr(msg, "OPTIONAL", {})
    body = {}
    for f in fields(msg):
        value = getattr(msg, f.name)
        if f.name in optional and value == optional[f.name]:
            continue  # defaults stay off the wire
        body[f.name] = [list(x) if isinstance(x, tuple) else x for x in value] if isinstance(value, tuple) else value
    if isinstance(msg, Chunk) and msg.aux is not None:
        body["aux"] = asdict(msg.aux)
    type_byte = int(msg.TYPE) | (AUTH_FLAG if key else 0)
    data = _HEADER.pack(MAGIC, PROTOCOL_VERSION, type_byte) + json.dumps(body, separators=(",", ":")).encode()
    if key:
        data += _mac(key, data)
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"encoded {msg.TYPE.name} frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    return data


def decode(data: bytes, key: bytes | None = None) -> Message:
    """Parse one control frame; raises ProtocolError (only) on anything malformed.

    With ``key`` the frame must carry a valid MAC, checked before the body is parsed; without
    one, an authenticated frame is refused too (the peers disagree about the shared secret).
    Either mismatch raises ``AuthenticationError`` (a ProtocolError)."""
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
    authed = bool(type_ & AUTH_FLAG)
    type_ &= ~AUTH_FLAG
    body_bytes = data[_HEADER.size:]
    if key:
        if not authed:
            raise AuthenticationError("frame: not authenticated, and this endpoint requires the shared secret "
                                      "(shared_secret / MM_SHARED_SECRET)")
        if len(body_bytes) < MAC_BYTES or not hmac.compare_digest(data[-MAC_BYTES:], _mac(key, data[:-MAC_BYTES])):
            raise AuthenticationError("frame: MAC does not verify (a different shared secret, or a forged or "
                                      "altered frame)")
        body_bytes = body_bytes[:-MAC_BYTES]
    elif authed:
        raise AuthenticationError("frame: authenticated with a shared secret, but this endpoint has none: set the "
                                  "same shared_secret (MM_SHARED_SECRET) on both sides")
    cls = _BY_TYPE.get(type_)
    if cls is None:
        raise ProtocolError(f"frame: unknown message type {type_}")
    try:
        body = json.loads(body_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError(f"{cls.__name__}: body is not valid JSON") from None
    optional = getattr(cls, "OPTIONAL", {})
    if not isinstance(body, dict) or not set(cls.SCHEMA) - set(optional) <= set(body) <= set(cls.SCHEMA):
        raise ProtocolError(f"{cls.__name__}: expected exactly the fields {sorted(cls.SCHEMA)}"
                            + (f" (optional: {sorted(optional)})" if optional else ""))
    return cls(**{name: check(name, body[name]) for name, check in cls.SCHEMA.items() if name in body})


# ---- splitting a chunk into pieces contiguous on both sides ---------------------------------------
def split_pieces(src: list[tuple[int, int]], dst_runs: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """Cut the sender's contiguous runs ``src`` ((pool row, length), in token order) at the
    receiver's run boundaries ``dst_runs`` (lengths, in token order): the union of both sides'
    boundaries. Returns (sender pool row, length) pieces; each is contiguous on both sides.
    Empty ``dst_runs`` means the receiver side is one contiguous run."""
    total = sum(n for _, n in src)
    if dst_runs and sum(dst_runs) < total:
        raise ProtocolError(f"receiver runs cover {sum(dst_runs)} tokens, the chunk has {total}")
    cuts, acc = [], 0
    for n in dst_runs:
        acc += n
        cuts.append(acc)
    out: list[tuple[int, int]] = []
    token, ci = 0, 0
    for row, length in src:
        start, end = token, token + length
        while token < end:
            while ci < len(cuts) and cuts[ci] <= token:
                ci += 1
            nxt = min(cuts[ci], end) if ci < len(cuts) else end
            out.append((row + token - start, nxt - token))
            token = nxt
    if len(out) > MAX_PIECES:
        raise ProtocolError(f"chunk splits into {len(out)} pieces, more than {MAX_PIECES}: use larger blocks")
    return out


def check_pieces(pieces: tuple[tuple[int, int], ...], num_tokens: int, dst_runs: tuple[int, ...] | list[int]) -> None:
    """Receiver side: the pieces cover exactly ``num_tokens`` and none crosses a receiver run."""
    if sum(n for _, n in pieces) != num_tokens:
        raise ProtocolError(f"chunk pieces cover {sum(n for _, n in pieces)} tokens, expected {num_tokens}")
    cuts, acc = [], 0
    for n in dst_runs:
        acc += n
        cuts.append(acc)
    token, ci = 0, 0
    for _, n in pieces:
        while ci < len(cuts) and cuts[ci] <= token:
            ci += 1
        if ci < len(cuts) and token + n > cuts[ci]:
            raise ProtocolError(f"chunk piece [{token}, {token + n}) crosses a receiver block boundary at {cuts[ci]}")
        token += n
