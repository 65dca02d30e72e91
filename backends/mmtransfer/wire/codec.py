"""Frames: ``b"MMTX" | version (u8) | type (u8) | JSON body [| HMAC-SHA256]``.

Chunk bytes of the host link follow as separate ZeroMQ frames, never inside the JSON. No pickle.
Every field is type-checked and bounded on decode, unknown or missing fields are rejected, so a
forged or corrupt frame raises ``ProtocolError`` and nothing else; a frame of another protocol
version raises ``VersionMismatch`` (answered with ``ERROR(version)``).

With a shared secret (``TransferConfig.shared_secret``) every frame is authenticated: the type
byte gets the ``AUTH_FLAG`` bit and ``HMAC-SHA256(secret, frame)`` (32 bytes) is appended. The
MAC is checked before anything else of the frame is parsed; a frame without a valid MAC raises
``AuthenticationError``. It authenticates the peer and the control frame; it does not encrypt,
and host-link payload frames are not covered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import asdict, fields

from ..errors import AuthenticationError, ProtocolError, VersionMismatch
from .messages import BY_TYPE, Chunk, Message

MAGIC = b"MMTX"
# 2: typed error codes (unknown_channel), pieces on every GPU-link CHUNK
# 3: the EMBED_REF of a ready embedding carries its pool rows and aux (no round trip before the copy), PULL
#    ``early`` (receives posted before the CHUNK), CLAIM (the rows a same-GPU receiver copies with no PULL).
#    Frames of other versions are answered ERROR(version).
#    The shm transport kept 3: its one addition (the BOOTSTRAP_ACK ``shm`` field, left out unless the transport
#    is shm) only reaches a receiver that asked for shm or auto with a CPU pool, which a protocol-3 receiver never
#    did (a CPU receiver did not bootstrap), and a protocol-3 sender answers such a BOOTSTRAP with host.
PROTOCOL_VERSION = 3
MAX_FRAME_BYTES = 64 * 1024
HEADER = struct.Struct("!4sBB")
AUTH_FLAG = 0x80  # set in the type byte of an authenticated frame
MAC_BYTES = 32  # HMAC-SHA256


def mac_key(secret: str | bytes | None) -> bytes | None:
    """The HMAC key for a shared secret (None when there is none)."""
    if not secret:
        return None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _body(msg: Message) -> dict:
    optional = getattr(msg, "OPTIONAL", {})
    body = {}
    for fd in fields(msg):
        value = getattr(msg, fd.name)
        if fd.name in optional and value == optional[fd.name]:
            continue  # defaults stay off the wire
        body[fd.name] = [list(x) if isinstance(x, tuple) else x for x in value] if isinstance(value, tuple) else value
    if isinstance(msg, Chunk) and msg.aux is not None:
        body["aux"] = asdict(msg.aux)
    return body


def encode(msg: Message, key: bytes | None = None) -> bytes:
    """One control frame; with ``key`` (see ``mac_key``) authenticated by an appended HMAC-SHA256."""
    type_byte = int(msg.TYPE) | (AUTH_FLAG if key else 0)
    data = HEADER.pack(MAGIC, PROTOCOL_VERSION, type_byte) + json.dumps(_body(msg), separators=(",", ":")).encode()
    if key:
        data += _mac(key, data)
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"encoded {msg.TYPE.name} frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    return data


def _authenticated_body(data: bytes, authed: bool, key: bytes | None) -> bytes:
    body = data[HEADER.size :]
    if key:
        if not authed:
            raise AuthenticationError(
                "frame: not authenticated, and this endpoint requires the shared secret "
                "(shared_secret / MM_SHARED_SECRET)"
            )
        if len(body) < MAC_BYTES or not hmac.compare_digest(data[-MAC_BYTES:], _mac(key, data[:-MAC_BYTES])):
            raise AuthenticationError(
                "frame: MAC does not verify (a different shared secret, or a forged or altered frame)"
            )
        return body[:-MAC_BYTES]
    if authed:
        raise AuthenticationError(
            "frame: authenticated with a shared secret, but this endpoint has none: set the "
            "same shared_secret (MM_SHARED_SECRET) on both sides"
        )
    return body


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
    if len(data) < HEADER.size:
        raise ProtocolError("frame: truncated header")
    magic, version, type_ = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("frame: bad magic")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"frame: protocol version {version}, this endpoint speaks {PROTOCOL_VERSION} "
            "(encoder and language model of different releases?)"
        )
    body_bytes = _authenticated_body(data, bool(type_ & AUTH_FLAG), key)
    cls = BY_TYPE.get(type_ & ~AUTH_FLAG)
    if cls is None:
        raise ProtocolError(f"frame: unknown message type {type_ & ~AUTH_FLAG}")
    try:
        body = json.loads(body_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError(f"{cls.__name__}: body is not valid JSON") from None
    optional = getattr(cls, "OPTIONAL", {})
    if not isinstance(body, dict) or not set(cls.SCHEMA) - set(optional) <= set(body) <= set(cls.SCHEMA):
        raise ProtocolError(
            f"{cls.__name__}: expected exactly the fields {sorted(cls.SCHEMA)}"
            + (f" (optional: {sorted(optional)})" if optional else "")
        )
    return cls(**{name: check(name, body[name]) for name, check in cls.SCHEMA.items() if name in body})
