"""EMBED_REF: the small handle that travels through Triton instead of the embedding.

Since protocol version 3 the ref of an embedding that is fully written (``register``, ``publish``) also
carries its pool rows (``rows``: (pool row, length) runs in token order) and its ``aux`` record, so a
receiver can start moving bytes at once: a same-GPU receiver copies from the mapped pool with no PULL,
an NCCL receiver posts its first window's receives before the first CHUNK arrives. They are left out
(the receiver then pulls as before) when the embedding is not ready yet (``reserve``) or when they would
not fit the ref's 1 KiB. The fields are untrusted input: bounded here, bounds-checked against the mapped
pool by the receiver and authorized by the sender (its CLAIM/ACK and PULL paths check them against the
transfer's own blocks).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ProtocolError, VersionMismatch
from .wire import MAX_TOKENS_ON_WIRE, PROTOCOL_VERSION, Aux
from .wire import fields as f

_ADDRESS = re.compile(r"tcp://[A-Za-z0-9.\-\[\]:]{1,255}:\d{1,5}")
_TID = re.compile(r"[0-9a-f]{32}")
MAX_REF_BYTES = 1024
MAX_REF_ROWS = 64  # runs a ref may name; more (a fragmented pool) and the ref leaves them out
_REQUIRED = {"transfer_id", "address", "num_tokens", "version"}
_OPTIONAL = {"rows", "aux"}


def new_transfer_id() -> str:
    """A random, unguessable 128-bit transfer id (32 hex digits)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class EmbedRef:
    """Where to pull one embedding from.

    ``num_tokens`` is a hint (0 = unknown, e.g. encoding still running) unless ``rows`` is set: then it is
    the exact length, ``aux`` is the record the first CHUNK would carry and ``rows`` the sender pool runs
    holding the tokens in order (their lengths sum to ``num_tokens``).
    """

    transfer_id: str
    address: str
    num_tokens: int = 0
    version: int = PROTOCOL_VERSION
    rows: tuple[tuple[int, int], ...] = ()
    aux: Aux | None = None

    @property
    def ready(self) -> bool:
        """The ref names the embedding's rows: bytes can move before any answer from the sender."""
        return bool(self.rows)

    def to_json(self) -> str:
        obj: dict[str, Any] = {
            "transfer_id": self.transfer_id,
            "address": self.address,
            "num_tokens": self.num_tokens,
            "version": self.version,
        }
        if self.rows:
            obj["rows"] = [list(r) for r in self.rows]
            obj["aux"] = asdict(self.aux) if self.aux is not None else None
        return json.dumps(obj, separators=(",", ":"))

    def without_rows(self) -> EmbedRef:
        return EmbedRef(self.transfer_id, self.address, self.num_tokens, self.version)

    def fitted(self) -> EmbedRef:
        """This ref, or without its rows when they make it longer than MAX_REF_BYTES (or name too many runs)."""
        if self.rows and (len(self.rows) > MAX_REF_ROWS or len(self.to_json()) > MAX_REF_BYTES):
            return self.without_rows()
        return self

    @classmethod
    def from_json(cls, data: str | bytes) -> EmbedRef:
        """Parse and validate; raises ProtocolError with a message fit for an API user."""
        if isinstance(data, (bytes, bytearray)):
            if len(data) > MAX_REF_BYTES:
                raise ProtocolError("EMBED_REF: longer than 1 KiB")
            try:
                data = bytes(data).decode()
            except UnicodeDecodeError:
                raise ProtocolError("EMBED_REF: not UTF-8") from None
        if len(data) > MAX_REF_BYTES:
            raise ProtocolError("EMBED_REF: longer than 1 KiB")
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            raise ProtocolError("EMBED_REF: not valid JSON") from None
        if not isinstance(obj, dict) or not _REQUIRED <= set(obj) <= _REQUIRED | _OPTIONAL:
            raise ProtocolError(
                "EMBED_REF: expected fields transfer_id, address, num_tokens, version (and optionally rows, aux)"
            )
        if obj["version"] != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"EMBED_REF: version {obj['version']!r}, expected {PROTOCOL_VERSION} (encoder and "
                "language model of different releases?)"
            )
        if not isinstance(obj["transfer_id"], str) or not _TID.fullmatch(obj["transfer_id"]):
            raise ProtocolError("EMBED_REF: transfer_id must be 32 lowercase hex digits")
        if not isinstance(obj["address"], str) or not _ADDRESS.fullmatch(obj["address"]):
            raise ProtocolError("EMBED_REF: address must look like tcp://host:port")
        hint = obj["num_tokens"]
        if isinstance(hint, bool) or not isinstance(hint, int) or not 0 <= hint <= MAX_TOKENS_ON_WIRE:
            raise ProtocolError("EMBED_REF: num_tokens must be an integer >= 0")
        rows, aux = _rows_and_aux(obj, hint)
        return cls(obj["transfer_id"], obj["address"], hint, obj["version"], rows, aux)


def _rows_and_aux(obj: dict, num_tokens: int) -> tuple[tuple[tuple[int, int], ...], Aux | None]:
    """The optional rows and aux, checked together: both or neither, lengths summing to the exact length."""
    if "rows" not in obj and "aux" not in obj:
        return (), None
    if "rows" not in obj or "aux" not in obj:
        raise ProtocolError("EMBED_REF: rows and aux come together")
    raw = obj["rows"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_REF_ROWS:
        raise ProtocolError(f"EMBED_REF: rows must list 1 to {MAX_REF_ROWS} [row, length] runs")
    rows = f.pieces("EMBED_REF.rows", raw)
    try:
        aux = Aux.from_obj(obj["aux"])
    except ProtocolError as exc:
        raise ProtocolError(f"EMBED_REF: {exc}") from None
    if sum(n for _, n in rows) != num_tokens or aux.total_tokens != num_tokens:
        raise ProtocolError("EMBED_REF: rows, aux.total_tokens and num_tokens disagree")
    return rows, aux
