"""EMBED_REF: the small handle that travels through Triton instead of the embedding."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass

from .errors import ProtocolError, VersionMismatch
from .wire import MAX_TOKENS_ON_WIRE, PROTOCOL_VERSION

_ADDRESS = re.compile(r"tcp://[A-Za-z0-9.\-\[\]:]{1,255}:\d{1,5}")
_TID = re.compile(r"[0-9a-f]{32}")
MAX_REF_BYTES = 1024


def new_transfer_id() -> str:
    """A random, unguessable 128-bit transfer id (32 hex digits)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class EmbedRef:
    """Where to pull one embedding from.

    ``num_tokens`` is a hint (0 = unknown, e.g. encoding still running): the pull
    protocol learns the real length from the first chunk's aux and never relies on it.
    """

    transfer_id: str
    address: str
    num_tokens: int = 0
    version: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

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
        if not isinstance(obj, dict) or set(obj) != {"transfer_id", "address", "num_tokens", "version"}:
            raise ProtocolError("EMBED_REF: expected fields transfer_id, address, num_tokens, version")
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
        return cls(**obj)
