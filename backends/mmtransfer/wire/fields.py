"""Field validators of the wire messages: each takes (field name, decoded JSON value) and returns
the value or raises ``ProtocolError`` naming the field. Bounds live here, next to their checks."""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Callable

from ..errors import ProtocolError

Check = Callable[[str, Any], Any]
MAX_TOKENS_ON_WIRE = 1 << 24
MAX_HIDDEN = 1 << 16
MAX_PIECES = 2048  # contiguous pieces of one chunk (the union of both sides' block boundaries)
MAX_CHUNKS_PER_PULL = 1 << 16
_TID = re.compile(r"[0-9a-f]{32}")
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_HEX = re.compile(r"[0-9a-f]*")


def integer(low: int, high: int) -> Check:
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ProtocolError(f"field {name}: expected integer in [{low}, {high}], got {v!r}")
        return v

    return check


def text(max_len: int, pattern: re.Pattern[str] = _PRINTABLE) -> Check:
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str) or len(v) > max_len or not pattern.fullmatch(v):
            raise ProtocolError(f"field {name}: expected printable string of <= {max_len} chars")
        return v

    return check


def transfer_id(name: str, v: Any) -> str:
    if not isinstance(v, str) or not _TID.fullmatch(v):
        raise ProtocolError(f"field {name}: expected a 128-bit id as 32 lowercase hex digits")
    return v


def optional_id(name: str, v: Any) -> str:
    return "" if v == "" else transfer_id(name, v)


def member(enum: type[Enum], label: str, exclude: tuple[Enum, ...] = ()) -> Check:
    """A name of ``enum`` (a str enum), decoded to the member."""
    allowed = [m.value for m in enum if m not in exclude]

    def check(name: str, v: Any) -> Enum:
        if v not in allowed:
            raise ProtocolError(f"field {name}: unknown {label} {v!r}; expected one of {allowed}")
        return enum(v)

    return check


def choice(allowed: tuple[str, ...]) -> Check:
    def check(name: str, v: Any) -> str:
        if v not in allowed:
            raise ProtocolError(f"field {name}: expected one of {list(allowed)}, got {v!r}")
        return v

    return check


def boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(f"field {name}: expected true or false")
    return v


def hex_string(max_chars: int, exact: int = 0) -> Check:
    """Lowercase hex of at most ``max_chars`` digits; with ``exact``, empty or exactly that many."""

    def check(name: str, v: Any) -> str:
        if not isinstance(v, str) or len(v) > max_chars or len(v) % 2 or not _HEX.fullmatch(v):
            raise ProtocolError(f"field {name}: expected lowercase hex of <= {max_chars} digits")
        if exact and v and len(v) != exact:
            raise ProtocolError(f"field {name}: expected {exact} hex digits, got {len(v)}")
        return v

    return check


SEQ = integer(0, (1 << 31) - 1)
TOKENS = integer(0, MAX_TOKENS_ON_WIRE)
POSITIVE_TOKENS = integer(1, MAX_TOKENS_ON_WIRE)
_ROW = integer(0, 1 << 40)


def runs(name: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_PIECES:
        raise ProtocolError(f"field {name}: expected a list of <= {MAX_PIECES} run lengths")
    return tuple(POSITIVE_TOKENS(name, x) for x in v)


def pieces(name: str, v: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, list) or len(v) > MAX_PIECES:
        raise ProtocolError(f"field {name}: expected a list of <= {MAX_PIECES} [row, length] pairs")
    out = []
    for item in v:
        if not isinstance(item, list) or len(item) != 2:
            raise ProtocolError(f"field {name}: expected [row, length] pairs")
        out.append((_ROW(name, item[0]), POSITIVE_TOKENS(name, item[1])))
    return tuple(out)


IPC_SCHEMA: dict[str, Check] = {
    "handle": hex_string(1024),
    "size_bytes": integer(1, 1 << 48),
    "offset_bytes": integer(0, 1 << 48),
    "ref_counter_handle": hex_string(1024),
    "ref_counter_offset": integer(0, 1 << 48),
    "event_handle": hex_string(1024),
    "event_sync_required": boolean,
    "storage_offset": integer(0, 1 << 48),
    "rows": integer(1, 1 << 40),
    "hidden": integer(1, MAX_HIDDEN),
    "dtype": text(16, NAME),
    "pid": integer(0, 1 << 31),
    "local_key": text(128),
}


def record(schema: dict[str, Check]) -> Check:
    """An optional object field with exactly ``schema``'s keys, each checked by its own validator (None: absent)."""

    def check(name: str, v: Any) -> dict[str, Any] | None:
        if v is None:
            return None
        if not isinstance(v, dict) or set(v) != set(schema):
            raise ProtocolError(f"field {name}: expected exactly the fields {sorted(schema)}")
        return {key: check_key(f"{name}.{key}", v[key]) for key, check_key in schema.items()}

    return check


ipc = record(IPC_SCHEMA)


SHM_SCHEMA: dict[str, Check] = {
    "pid": integer(1, 1 << 31),
    "fd": integer(0, 1 << 31),
    "inode": integer(0, 1 << 63),
    "size_bytes": integer(1, 1 << 48),
    "rows": integer(1, 1 << 40),
    "hidden": integer(1, MAX_HIDDEN),
    "dtype": text(16, NAME),
}

shm = record(SHM_SCHEMA)
