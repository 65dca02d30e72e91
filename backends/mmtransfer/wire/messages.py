"""The wire messages of the receiver-driven pull protocol, one frozen dataclass each.

``SCHEMA`` maps every field to its validator (``fields.py``); ``OPTIONAL`` fields are left out
of the frame while they hold their defaults. Sequence (receiver R drives, sender S answers)::

    R: PULL(tid, seq=0, sent_tokens=0, capacity=W)   ->  S
    S: CHUNK(tid, seq=0, offset=0, n=min(N, W), total=N, aux)  [+ bytes]  -> R
    R: PULL(tid, seq=1, sent_tokens=W, capacity=W)   ->  S        (continuation 1)
    S: CHUNK(tid, seq=1, offset=W, n=min(N-W, W), total=N)     [+ bytes]  -> R
       ... as many continuations as needed, until offset + n == N ...
    R: DONE(tid)  -> S ;  S frees its blocks ;  S: ACK(tid) -> R
    (on failure R sends ABORT(tid, reason); S frees and answers nothing)
    (any bad request: S answers ERROR(tid, code, message))

Channel links (GPU links, shm) add a bootstrap pair, once per (sender endpoint, receiver) channel::

    R: BOOTSTRAP(channel, wanted transport, R's device)  ->  S
    S: BOOTSTRAP_ACK(channel, chosen transport, S's device, ncclUniqueId | CUDA IPC handle | shm region)  -> R
    R: CLOSE(channel, reason)  -> S   (the receiver gives a broken channel up; no answer)

A receiver that maps the sender's pool (same GPU, or shm on one host) holding an EMBED_REF with rows sends
no PULL (protocol 3)::

    R: CLAIM(tid, rows)  -> S ; R copies the rows from the mapped pool meanwhile
    S: ACK(tid)  -> R   (or ERROR: the rows are not tid's blocks)
    R: DONE(tid) -> S ; S frees its blocks (no answer)

and their PULLs name the channel, ask for every chunk at once (``count=0``), carry the window's
runs and the channel's operation count; their CHUNKs name the pieces the bytes move in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Union

from ..enums import ErrorCode, Transport
from ..errors import ProtocolError
from . import fields as f

BOOTSTRAP_VERSION = 1


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
    CLAIM = 10


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
    def from_obj(cls, obj: Any) -> Aux:
        if not isinstance(obj, dict) or set(obj) != {"total_tokens", "hidden", "dtype", "extras"}:
            raise ProtocolError("aux: expected fields total_tokens, hidden, dtype, extras")
        extras = obj["extras"]
        if not isinstance(extras, dict) or len(extras) > cls.MAX_EXTRAS:
            raise ProtocolError(f"aux.extras: expected a mapping of <= {cls.MAX_EXTRAS} entries")
        clean: dict[str, list[int]] = {}
        for key, values in extras.items():
            f.text(64, f.NAME)("aux.extras key", key)
            if not isinstance(values, list) or len(values) > cls.MAX_EXTRA_LEN:
                raise ProtocolError(f"aux.extras[{key}]: expected a list of <= {cls.MAX_EXTRA_LEN} ints")
            clean[key] = [f.integer(-(1 << 62), 1 << 62)(f"aux.extras[{key}]", x) for x in values]
        return cls(
            total_tokens=f.POSITIVE_TOKENS("aux.total_tokens", obj["total_tokens"]),
            hidden=f.integer(1, f.MAX_HIDDEN)("aux.hidden", obj["hidden"]),
            dtype=f.text(16, f.NAME)("aux.dtype", obj["dtype"]),
            extras=clean,
        )

    def checked(self) -> Aux:
        """This record, validated as a receiver will validate it (a sender calls it before publishing)."""
        return Aux.from_obj(json.loads(json.dumps(asdict(self))))


@dataclass(frozen=True)
class Pull:
    """Receiver asks for the tokens from ``sent_tokens`` on, at most ``capacity_tokens`` per chunk.

    ``count`` is how many consecutive chunks this PULL asks for, each answered by its own CHUNK
    (0 = all of them: a GPU link's pipelined pull); ``runs`` the receiver window's contiguous
    run lengths (the sender cuts pieces at the union of both sides' boundaries); ``op_seq`` the
    channel's operation count (NCCL pairs sends and receives by order); ``early`` the token lengths of the
    receives the receiver already posted for the first chunk, from the EMBED_REF's rows (the sender posts
    exactly these sends first: when it cannot serve the PULL it sends zeros of these lengths, so the
    channel's pairing holds)."""

    TYPE: ClassVar[MsgType] = MsgType.PULL
    SCHEMA: ClassVar[dict] = {
        "transfer_id": f.transfer_id,
        "seq": f.SEQ,
        "sent_tokens": f.TOKENS,
        "capacity_tokens": f.POSITIVE_TOKENS,
        "transport": f.member(Transport, "transport", exclude=(Transport.AUTO,)),
        "request_id": f.text(128),
        "channel": f.optional_id,
        "count": f.integer(0, f.MAX_CHUNKS_PER_PULL),
        "runs": f.runs,
        "op_seq": f.integer(0, 1 << 62),
        "early": f.runs,
    }
    OPTIONAL: ClassVar[dict] = {"channel": "", "count": 1, "runs": (), "op_seq": 0, "early": ()}
    transfer_id: str
    seq: int
    sent_tokens: int
    capacity_tokens: int
    transport: Transport = Transport.HOST
    request_id: str = ""
    channel: str = ""
    count: int = 1
    runs: tuple[int, ...] = ()
    op_seq: int = 0
    early: tuple[int, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """Sender's answer to a PULL: tokens ``[offset, offset + num_tokens)`` of ``total_tokens``.
    ``aux`` is present on the chunk at offset 0 only; ``pieces`` (GPU links) lists the chunk as
    (sender pool row, length) runs in token order, each contiguous on both sides."""

    TYPE: ClassVar[MsgType] = MsgType.CHUNK
    SCHEMA: ClassVar[dict] = {
        "transfer_id": f.transfer_id,
        "seq": f.SEQ,
        "offset": f.TOKENS,
        "num_tokens": f.POSITIVE_TOKENS,
        "total_tokens": f.POSITIVE_TOKENS,
        "aux": lambda name, v: None if v is None else Aux.from_obj(v),
        "pieces": f.pieces,
    }
    OPTIONAL: ClassVar[dict] = {"pieces": ()}
    transfer_id: str
    seq: int
    offset: int
    num_tokens: int
    total_tokens: int
    aux: Aux | None = None
    pieces: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Done:
    """The receiver has everything: the sender frees the blocks and answers ACK (not after a CLAIM: the
    receiver of a claimed transfer does not wait for one)."""

    TYPE: ClassVar[MsgType] = MsgType.DONE
    SCHEMA: ClassVar[dict] = {"transfer_id": f.transfer_id, "seq": f.SEQ}
    transfer_id: str
    seq: int


@dataclass(frozen=True)
class Claim:
    """A same-GPU receiver is copying ``rows`` ((pool row, length) runs, the EMBED_REF's) straight from the
    mapped pool, with no PULL. Sent before the copy starts, so its answer overlaps the copy: ACK if the rows
    are exactly this transfer's blocks (the receiver hands the embedding out only then), else ERROR; a
    claimed transfer is freed by its DONE, which gets no answer."""

    TYPE: ClassVar[MsgType] = MsgType.CLAIM
    SCHEMA: ClassVar[dict] = {"transfer_id": f.transfer_id, "seq": f.SEQ, "rows": f.pieces}
    transfer_id: str
    seq: int
    rows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[MsgType] = MsgType.ACK
    SCHEMA: ClassVar[dict] = {"transfer_id": f.transfer_id, "seq": f.SEQ}
    transfer_id: str
    seq: int


@dataclass(frozen=True)
class Abort:
    TYPE: ClassVar[MsgType] = MsgType.ABORT
    SCHEMA: ClassVar[dict] = {"transfer_id": f.transfer_id, "reason": f.text(256)}
    transfer_id: str
    reason: str


@dataclass(frozen=True)
class Error:
    TYPE: ClassVar[MsgType] = MsgType.ERROR
    SCHEMA: ClassVar[dict] = {
        "transfer_id": f.optional_id,
        "seq": f.SEQ,
        "code": f.member(ErrorCode, "error code"),
        "message": f.text(512),
    }
    transfer_id: str
    seq: int
    code: ErrorCode
    message: str


_DEVICE_KIND = f.choice(("cpu", "cuda"))


@dataclass(frozen=True)
class Bootstrap:
    """Receiver asks to open a channel for GPU links (once per sender endpoint)."""

    TYPE: ClassVar[MsgType] = MsgType.BOOTSTRAP
    SCHEMA: ClassVar[dict] = {
        "version": f.integer(BOOTSTRAP_VERSION, BOOTSTRAP_VERSION),
        "channel": f.transfer_id,
        "transport": f.member(Transport, "transport"),
        "device_kind": _DEVICE_KIND,
        "device_uuid": f.text(64),
        "host": f.text(128),
        "pid": f.integer(0, 1 << 31),
    }
    channel: str
    transport: Transport
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
        "version": f.integer(BOOTSTRAP_VERSION, BOOTSTRAP_VERSION),
        "channel": f.transfer_id,
        "transport": f.member(Transport, "transport", exclude=(Transport.AUTO,)),
        "device_kind": _DEVICE_KIND,
        "device_uuid": f.text(64),
        "host": f.text(128),
        "nccl_id": f.hex_string(256, exact=256),
        "ipc": f.ipc,
        "shm": f.shm,
    }
    # Left out unless the transport is shm: every other BOOTSTRAP_ACK is the frame protocol 3 always sent.
    OPTIONAL: ClassVar[dict] = {"shm": None}
    channel: str
    transport: Transport
    device_kind: str
    device_uuid: str
    host: str
    nccl_id: str = ""
    ipc: dict | None = None
    shm: dict | None = None
    version: int = BOOTSTRAP_VERSION


@dataclass(frozen=True)
class Close:
    """Receiver gives a channel up (after a failure on it, or at shutdown); no answer."""

    TYPE: ClassVar[MsgType] = MsgType.CLOSE
    SCHEMA: ClassVar[dict] = {"channel": f.transfer_id, "reason": f.text(256)}
    channel: str
    reason: str


Message = Union[Pull, Chunk, Done, Ack, Abort, Error, Bootstrap, BootstrapAck, Close, Claim]
BY_TYPE: dict[int, type] = {
    cls.TYPE: cls for cls in (Pull, Chunk, Done, Ack, Abort, Error, Bootstrap, BootstrapAck, Close, Claim)
}


def printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters of printable ASCII (what a text field accepts)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:limit]
