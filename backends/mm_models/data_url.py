"""IMAGE elements may be base64 ``data:`` URLs: a KServe v2 JSON request cannot carry raw bytes.

No image format starts with ``data:``, so the two forms cannot be confused; anything else is left as is.
"""

from __future__ import annotations

import base64
import binascii


def unwrap_data_url(data: bytes, index: int) -> bytes:
    """``data`` itself, or the decoded payload of ``data:<type>;base64,<payload>``; ValueError naming
    ``IMAGE[index]`` for a malformed data: URL."""
    if bytes(data[:5]).lower() != b"data:":
        return data
    head, sep, payload = bytes(data).partition(b",")
    if not sep or not head.lower().endswith(b";base64"):
        raise ValueError(f"IMAGE[{index}]: a data: URL must be data:<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"IMAGE[{index}]: the data: URL is not valid base64") from None
