"""MMClient: image(s) + prompt -> text, against the Triton ensemble ``mm_pipeline``.

Request/response contract of the ensemble:
    IMAGE       BYTES  [n]   encoded images (PNG/JPEG/... file bytes), n >= 1
    PROMPT      BYTES  [1]   UTF-8 text
    MAX_TOKENS  INT32  [1]   optional: sent only when given
    TEXT        BYTES  [1]   UTF-8 answer
    TOKEN_IDS   INT64  [-1]  generated token ids
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .errors import (
    BadRequest,
    ClientError,
    ClientTimeout,
    FileNotFound,
    InvalidInput,
    ServerError,
    ServerUnavailable,
)

DEFAULT_MODEL = "mm_pipeline"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
PROTOCOLS = ("http", "grpc")

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike]


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int] = field(default_factory=list)
    latency_s: float = 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": list(self.token_ids), "latency_s": self.latency_s}


def normalize_url(url: str, protocol: str) -> tuple[str, bool]:
    """'http://h:p' | 'h:p' | 'h' -> ('h:p', ssl). tritonclient wants host:port without a scheme."""
    ssl = False
    u = url.strip()
    for scheme in ("http://", "https://", "grpc://", "grpcs://"):
        if u.lower().startswith(scheme):
            ssl = scheme in ("https://", "grpcs://")
            u = u[len(scheme):]
            break
    u = u.rstrip("/")
    if not u or "/" in u:
        raise InvalidInput(f"bad server URL {url!r} (expected host:port, e.g. localhost:{DEFAULT_PORTS[protocol]})")
    host, sep, port = u.rpartition(":")
    if not sep or "]" in port:  # no port given (or a bare [ipv6])
        u = f"{u}:{DEFAULT_PORTS[protocol]}"
    elif not port.isdigit():
        raise InvalidInput(f"bad port in server URL {url!r}")
    return u, ssl


def read_image(image: ImageInput) -> bytes:
    """Encoded image bytes from bytes or a file path."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise InvalidInput("an image is empty (0 bytes)")
        return data
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFound(str(image)) from None
        except IsADirectoryError:
            raise FileNotFound(str(image), "is a directory") from None
        except PermissionError:
            raise FileNotFound(str(image), "permission denied") from None
        except OSError as e:
            raise FileNotFound(str(image), e.strerror or str(e)) from None
        if not data:
            raise InvalidInput(f"image file {str(image)!r} is empty")
        return data
    raise InvalidInput(f"an image must be bytes or a file path, not {type(image).__name__}")


class MMClient:
    """Talks to the ``mm_pipeline`` ensemble over HTTP or gRPC (tritonclient).

    url:       host:port (a scheme like http:// is accepted and dropped); the port defaults to 8000 (http)
               or 8001 (grpc).
    protocol:  "http" or "grpc".
    timeout_s: per-request timeout (connecting and answering), seconds.
    model:     the ensemble's name.
    """

    def __init__(self, url: str = "localhost:8000", protocol: str = "http", timeout_s: float = 120.0,
                 model: str = DEFAULT_MODEL) -> None:
        protocol = protocol.lower()
        if protocol not in PROTOCOLS:
            raise InvalidInput(f"protocol must be 'http' or 'grpc', not {protocol!r}")
        if not timeout_s or timeout_s <= 0:
            raise InvalidInput("timeout_s must be > 0")
        self.protocol = protocol
        self.url, self._ssl = normalize_url(url, protocol)
        self.timeout_s = float(timeout_s)
        self.model = model
        self._client = None
        self._mod = None

    # ------------------------------------------------------------------------------------- plumbing
    def _connect(self):
        if self._client is None:
            try:
                if self.protocol == "http":
                    import tritonclient.http as mod

                    self._client = mod.InferenceServerClient(
                        self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s, ssl=self._ssl)
                else:
                    import tritonclient.grpc as mod

                    self._client = mod.InferenceServerClient(self.url, ssl=self._ssl)
            except ClientError:
                raise
            except Exception as e:  # e.g. bad host name on construction
                raise self._translate(e) from None
            self._mod = mod
        return self._client

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    def __enter__(self) -> "MMClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def display_url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://{self.url}" if self.protocol == "http" else self.url

    def _translate(self, e: BaseException) -> ClientError:
        """Any transport/server exception -> a ClientError subclass with a clear message."""
        if isinstance(e, ClientError):
            return e
        from tritonclient.utils import InferenceServerException

        if isinstance(e, InferenceServerException):
            status = str(e.status() or "")
            message = e.message() or str(e)
            if "UNAVAILABLE" in status:
                return ServerUnavailable(self.display_url, self.protocol, _short(message))
            if "DEADLINE_EXCEEDED" in status or (not status and "timed out" in message.lower()):
                return ClientTimeout(f"no answer from {self.display_url} within {self.timeout_s:g} s")
            bad = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE", "UNIMPLEMENTED",
                   "RESOURCE_EXHAUSTED")
            if status.startswith("4") or any(b in status for b in bad):
                if "unknown model" in message.lower() or "is not found" in message.lower():
                    message += f" (is the model repository with '{self.model}' being served?)"
                return BadRequest(message, status or None)
            return ServerError(message, status or None)
        if isinstance(e, TimeoutError) or type(e).__name__ in ("Timeout", "timeout"):
            return ClientTimeout(f"no answer from {self.display_url} within {self.timeout_s:g} s")
        if isinstance(e, OSError):  # refused, reset, unreachable, unknown host
            return ServerUnavailable(self.display_url, self.protocol, _short(e.strerror or str(e)))
        return ClientError(f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------------------------------ api
    def is_ready(self) -> bool:
        """True when the server is ready and serves the pipeline model."""
        try:
            c = self._connect()
            if self.protocol == "grpc":
                return bool(c.is_server_ready(client_timeout=self.timeout_s)
                            and c.is_model_ready(self.model, client_timeout=self.timeout_s))
            return bool(c.is_server_ready() and c.is_model_ready(self.model))
        except Exception:
            return False

    def generate(self, images: Sequence[ImageInput], prompt: str, max_tokens: int | None = None) -> GenerateResult:
        """Send images (encoded bytes or file paths) and a prompt; return the generated text and token ids."""
        if isinstance(images, (bytes, bytearray, memoryview, str, os.PathLike)):
            images = [images]
        if not images:
            raise InvalidInput("at least one image is required")
        if not isinstance(prompt, str):
            raise InvalidInput("prompt must be a string")
        if max_tokens is not None and (isinstance(max_tokens, bool) or int(max_tokens) != max_tokens
                                       or not 1 <= max_tokens <= 2**31 - 1):
            raise InvalidInput(f"max_tokens must be a positive integer, not {max_tokens!r}")
        blobs = [read_image(img) for img in images]

        c = self._connect()
        mod = self._mod
        image_arr = np.empty(len(blobs), dtype=np.object_)
        image_arr[:] = blobs
        arrays = [("IMAGE", image_arr, "BYTES"), ("PROMPT", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES")]
        if max_tokens is not None:
            arrays.append(("MAX_TOKENS", np.array([int(max_tokens)], dtype=np.int32), "INT32"))
        inputs = []
        for name, arr, dtype in arrays:
            inp = mod.InferInput(name, list(arr.shape), dtype)
            if self.protocol == "http":
                inp.set_data_from_numpy(arr, binary_data=True)
            else:
                inp.set_data_from_numpy(arr)
            inputs.append(inp)
        if self.protocol == "http":
            outputs = [mod.InferRequestedOutput(n, binary_data=True) for n in ("TEXT", "TOKEN_IDS")]
        else:
            outputs = [mod.InferRequestedOutput(n) for n in ("TEXT", "TOKEN_IDS")]

        t0 = time.perf_counter()
        try:
            if self.protocol == "grpc":
                response = c.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
            else:
                response = c.infer(self.model, inputs, outputs=outputs)
        except Exception as e:
            raise self._translate(e) from None
        latency = time.perf_counter() - t0

        text = response.as_numpy("TEXT")
        if text is None or text.size < 1:
            raise ServerError(f"the response of '{self.model}' has no TEXT output")
        t = text.reshape(-1)[0]
        text_str = t.decode("utf-8", errors="replace") if isinstance(t, (bytes, bytearray)) else str(t)
        ids = response.as_numpy("TOKEN_IDS")
        token_ids = [int(x) for x in ids.reshape(-1)] if ids is not None else []
        return GenerateResult(text=text_str, token_ids=token_ids, latency_s=latency)


def _short(msg: str, limit: int = 200) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
