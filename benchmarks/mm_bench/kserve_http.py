"""A dependency-free KServe v2 HTTP client (binary BYTES inputs, JSON outputs): the GPU machine has
no tritonclient wheel, and the tests need nothing more than one inference call."""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from typing import Sequence


class InferError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _bytes_tensor(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def infer(
    http_address: str,
    model: str,
    bytes_inputs: dict[str, Sequence[bytes]],
    int32_inputs: dict[str, Sequence[int]] | None = None,
    outputs: Sequence[str] = (),
    timeout_s: float = 300,
) -> dict[str, list]:
    """POST /v2/models/<model>/infer; returns {output name: flat list of values} (BYTES decoded as UTF-8)."""
    header = {"inputs": [], "outputs": [{"name": o, "parameters": {"binary_data": False}} for o in outputs]}
    blobs = []
    for name, items in bytes_inputs.items():
        blob = _bytes_tensor(items)
        header["inputs"].append(
            {"name": name, "shape": [len(items)], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}
        )
        blobs.append(blob)
    for name, values in (int32_inputs or {}).items():
        header["inputs"].append({"name": name, "shape": [len(values)], "datatype": "INT32", "data": list(values)})
    head = json.dumps(header).encode()
    req = urllib.request.Request(
        f"http://{http_address}/v2/models/{model}/infer",
        data=head + b"".join(blobs),
        method="POST",
        headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read()
            hlen = resp.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            text = json.loads(text).get("error", text)
        except ValueError:
            pass
        raise InferError(exc.code, text) from None
    doc = json.loads(body[: int(hlen)] if hlen else body)
    return {o["name"]: o.get("data", []) for o in doc.get("outputs", [])}
