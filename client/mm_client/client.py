"""MMClient: image(s) + prompt -> text, against the Triton ensemble ``mm_pipeline``.

Request/response contract of the ensemble:
    IMAGE       BYTES  [n]   encoded images (PNG/JPEG/... file bytes), n >= 1
    PROMPT      BYTES  [1]   UTF-8 text
    MAX_TOKENS  INT32  [1]   optional: sent only when given (so are TEMPERATURE FP32, TOP_P FP32, TOP_K INT32,
                             SEED INT64, STOP BYTES [k], TIMEOUT_MS INT32)
    TEXT        BYTES  [1]   UTF-8 answer
    TOKEN_IDS   INT64  [-1]  generated token ids
    FINISH_REASON BYTES [1]  "stop" (EOS or a stop string) or "length" (max tokens)
    PROMPT_TOKENS, COMPLETION_TOKENS  INT32 [1]
    IMAGE_TOKENS INT32 [n]   embedding tokens each image became (images are resized to the server's budget)

``stream()`` calls the decoupled ensemble ``mm_pipeline_stream`` over gRPC streaming: one response per token
(TEXT and TOKEN_IDS deltas); the last one also carries FINISH_REASON and the counts.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
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
    ServerBusy,
    ServerError,
    ServerUnavailable,
)

DEFAULT_MODEL = "mm_pipeline"
DEFAULT_STREAM_MODEL = "mm_pipeline_stream"
SUMMARY_OUTPUTS = ("FINISH_REASON", "PROMPT_TOKENS", "COMPLETION_TOKENS", "IMAGE_TOKENS")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
PROTOCOLS = ("http", "grpc")

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike]


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int] = field(default_factory=list)
    latency_s: float = 0.0
    finish_reason: str = ""  # "stop" | "length" ("" from a server without the output)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: list[int] = field(default_factory=list)  # per image, after the server's resizing
    ttft_s: float | None = None  # streaming only: time to the first token

    def to_dict(self) -> dict:
        out = {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "latency_s": self.latency_s,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "image_tokens": list(self.image_tokens),
        }
        if self.ttft_s is not None:
            out["ttft_s"] = self.ttft_s
        return out


@dataclass
class StreamChunk:
    """One streamed response: new text and token ids; ``final`` on the last, which carries the summary."""

    text: str
    token_ids: list[int]
    final: bool = False
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: list[int] = field(default_factory=list)


def _sampling_arrays(temperature, top_p, top_k, seed, stop, timeout_ms) -> list[tuple[str, np.ndarray, str]]:
    """The optional generation inputs that were given (checked by the server; only types are fixed here)."""
    out = []
    for name, value, dtype, np_type in (
        ("TEMPERATURE", temperature, "FP32", np.float32),
        ("TOP_P", top_p, "FP32", np.float32),
        ("TOP_K", top_k, "INT32", np.int32),
        ("SEED", seed, "INT64", np.int64),
        ("TIMEOUT_MS", timeout_ms, "INT32", np.int32),
    ):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"{name.lower()} must be a number, not {value!r}")
            if np_type is not np.float32 and int(value) != value:
                raise InvalidInput(f"{name.lower()} must be an integer, not {value!r}")
            out.append((name, np.array([value], dtype=np_type), dtype))
    if stop:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(x, str) for x in stops):
            raise InvalidInput("stop must be a string or a list of strings")
        out.append(("STOP", np.array([x.encode("utf-8") for x in stops], dtype=np.object_), "BYTES"))
    return out


def _first(response, name: str):
    array = response.as_numpy(name)
    return None if array is None or array.size < 1 else array.reshape(-1)[0]


def _summary(response) -> dict:
    reason = _first(response, "FINISH_REASON")
    prompt_tokens, completion_tokens = _first(response, "PROMPT_TOKENS"), _first(response, "COMPLETION_TOKENS")
    image_tokens = response.as_numpy("IMAGE_TOKENS")
    return {
        "finish_reason": reason.decode() if isinstance(reason, bytes) else str(reason or ""),
        "prompt_tokens": int(prompt_tokens or 0),
        "completion_tokens": int(completion_tokens or 0),
        "image_tokens": [int(n) for n in image_tokens.reshape(-1)] if image_tokens is not None else [],
    }


def _text_of(response) -> str:
    t = _first(response, "TEXT")
    if t is None:
        return ""
    return t.decode("utf-8", errors="replace") if isinstance(t, (bytes, bytearray)) else str(t)


def _ids_of(response) -> list[int]:
    ids = response.as_numpy("TOKEN_IDS")
    return [int(x) for x in ids.reshape(-1)] if ids is not None else []


def normalize_url(url: str, protocol: str) -> tuple[str, bool]:
    """'http://h:p' | 'h:p' | 'h' -> ('h:p', ssl). tritonclient wants host:port without a scheme."""
    ssl = False
    u = url.strip()
    for scheme in ("http://", "https://", "grpc://", "grpcs://"):
        if u.lower().startswith(scheme):
            ssl = scheme in ("https://", "grpcs://")
            u = u[len(scheme) :]
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

    def __init__(
        self, url: str = "localhost:8000", protocol: str = "http", timeout_s: float = 120.0, model: str = DEFAULT_MODEL
    ) -> None:
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
                        self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s, ssl=self._ssl
                    )
                else:
                    import tritonclient.grpc as mod

                    self._client = mod.InferenceServerClient(self.url, ssl=self._ssl)
            except ClientError:
                raise
            except Exception as e:  # e.g. bad host name on construction
                raise self._translate(e) from None
            self._mod = mod
        return self._client

    def _summary_outputs(self, client, model: str) -> tuple[str, ...]:
        """The summary outputs ``model`` declares: older or split-deployment pipelines (mm_remote) answer
        TEXT and TOKEN_IDS only, and Triton refuses a request that asks for an output a model lacks."""
        cache = self.__dict__.setdefault("_declared_outputs", {})
        if model not in cache:
            try:
                meta = client.get_model_metadata(model)
                declared = (
                    {o["name"] for o in meta["outputs"]} if isinstance(meta, dict) else {o.name for o in meta.outputs}
                )
            except Exception:  # noqa: BLE001 - metadata is an optimisation; infer reports real errors
                return SUMMARY_OUTPUTS
            cache[model] = tuple(n for n in SUMMARY_OUTPUTS if n in declared)
        return cache[model]

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    def __enter__(self) -> MMClient:
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
            if "unavailable (" in message:  # the server's own refusal (queue full, deadline, pool exhausted)
                return ServerBusy(_short(message))
            if "UNAVAILABLE" in status:
                return ServerUnavailable(self.display_url, self.protocol, _short(message))
            if "DEADLINE_EXCEEDED" in status or (not status and "timed out" in message.lower()):
                return ClientTimeout(f"no answer from {self.display_url} within {self.timeout_s:g} s")
            bad = (
                "INVALID_ARGUMENT",
                "NOT_FOUND",
                "FAILED_PRECONDITION",
                "OUT_OF_RANGE",
                "UNIMPLEMENTED",
                "RESOURCE_EXHAUSTED",
            )
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
                return bool(
                    c.is_server_ready(client_timeout=self.timeout_s)
                    and c.is_model_ready(self.model, client_timeout=self.timeout_s)
                )
            return bool(c.is_server_ready() and c.is_model_ready(self.model))
        except Exception:
            return False

    @staticmethod
    def _arrays(
        images: Sequence[ImageInput], prompt: str, max_tokens: int | None, sampling: dict
    ) -> list[tuple[str, np.ndarray, str]]:
        """Validated request arrays (nothing is sent); InvalidInput names the problem."""
        if isinstance(images, (bytes, bytearray, memoryview, str, os.PathLike)):
            images = [images]
        if not images:
            raise InvalidInput("at least one image is required")
        if not isinstance(prompt, str):
            raise InvalidInput("prompt must be a string")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or int(max_tokens) != max_tokens or not 1 <= max_tokens <= 2**31 - 1
        ):
            raise InvalidInput(f"max_tokens must be a positive integer, not {max_tokens!r}")
        unknown = set(sampling) - {"temperature", "top_p", "top_k", "seed", "stop", "timeout_ms"}
        if unknown:
            raise InvalidInput(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        blobs = [read_image(img) for img in images]
        image_arr = np.empty(len(blobs), dtype=np.object_)
        image_arr[:] = blobs
        arrays = [
            ("IMAGE", image_arr, "BYTES"),
            ("PROMPT", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES"),
        ]
        if max_tokens is not None:
            arrays.append(("MAX_TOKENS", np.array([int(max_tokens)], dtype=np.int32), "INT32"))
        arrays += _sampling_arrays(
            *(sampling.get(k) for k in ("temperature", "top_p", "top_k", "seed", "stop", "timeout_ms"))
        )
        return arrays

    @staticmethod
    def _inputs(mod, arrays: list[tuple[str, np.ndarray, str]], binary: bool) -> list:
        inputs = []
        for name, arr, dtype in arrays:
            inp = mod.InferInput(name, list(arr.shape), dtype)
            if binary:
                inp.set_data_from_numpy(arr, binary_data=True)
            else:
                inp.set_data_from_numpy(arr)
            inputs.append(inp)
        return inputs

    def generate(
        self, images: Sequence[ImageInput], prompt: str, max_tokens: int | None = None, **sampling
    ) -> GenerateResult:
        """Send images (encoded bytes or file paths) and a prompt; return the generated text and token ids.
        ``sampling``: temperature, top_p, top_k, seed, stop (str or list), timeout_ms (server-side deadline)."""
        arrays = self._arrays(images, prompt, max_tokens, sampling)
        c = self._connect()
        mod = self._mod
        http = self.protocol == "http"
        inputs = self._inputs(mod, arrays, binary=http)
        names = ("TEXT", "TOKEN_IDS") + self._summary_outputs(c, self.model)
        outputs = [
            mod.InferRequestedOutput(n, binary_data=True) if http else mod.InferRequestedOutput(n) for n in names
        ]
        t0 = time.perf_counter()
        try:
            if self.protocol == "grpc":
                response = c.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
            else:
                response = c.infer(self.model, inputs, outputs=outputs)
        except Exception as e:
            raise self._translate(e) from None
        latency = time.perf_counter() - t0
        if _first(response, "TEXT") is None:
            raise ServerError(f"the response of '{self.model}' has no TEXT output")
        return GenerateResult(
            text=_text_of(response), token_ids=_ids_of(response), latency_s=latency, **_summary(response)
        )

    def stream(
        self,
        images: Sequence[ImageInput],
        prompt: str,
        max_tokens: int | None = None,
        model: str = DEFAULT_STREAM_MODEL,
        **sampling,
    ) -> Iterator[StreamChunk]:
        """Token streaming over gRPC (``mm_pipeline_stream``): yields a :class:`StreamChunk` per response as it
        arrives, the last with ``final=True``. Leaving the loop early cancels the stream."""
        if self.protocol != "grpc":
            raise InvalidInput("streaming needs protocol='grpc' (the HTTP client has no streaming call)")
        arrays = self._arrays(images, prompt, max_tokens, sampling)
        import tritonclient.grpc as mod

        inputs = self._inputs(mod, arrays, binary=False)
        answers: queue.Queue = queue.Queue()
        client = mod.InferenceServerClient(self.url, ssl=self._ssl)
        outputs = [mod.InferRequestedOutput(n) for n in ("TEXT", "TOKEN_IDS") + self._summary_outputs(client, model)]
        finished = False
        try:
            client.start_stream(
                callback=lambda result, error: answers.put((result, error)), stream_timeout=self.timeout_s
            )
            client.async_stream_infer(model, inputs, outputs=outputs)
            deadline = time.monotonic() + self.timeout_s
            while not finished:
                try:
                    result, error = answers.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    raise ClientTimeout(f"no answer from {self.display_url} within {self.timeout_s:g} s") from None
                if error is not None:
                    raise self._translate(error)
                summary = _summary(result)
                finished = bool(summary["finish_reason"])
                yield StreamChunk(_text_of(result), _ids_of(result), finished, **summary)
        except ClientError:
            raise
        except Exception as e:
            raise self._translate(e) from None
        finally:
            try:
                client.stop_stream(cancel_requests=not finished)
            except Exception:
                pass
            client.close()

    def generate_stream(
        self,
        images: Sequence[ImageInput],
        prompt: str,
        max_tokens: int | None = None,
        on_chunk=None,
        model: str = DEFAULT_STREAM_MODEL,
        **sampling,
    ) -> GenerateResult:
        """:meth:`stream` collected into a GenerateResult (with ``ttft_s``); ``on_chunk(chunk)`` sees each."""
        t0 = time.perf_counter()
        text, ids, ttft, summary = [], [], None, {}
        for chunk in self.stream(images, prompt, max_tokens, model=model, **sampling):
            if ttft is None and chunk.token_ids:
                ttft = time.perf_counter() - t0
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            if on_chunk is not None:
                on_chunk(chunk)
            if chunk.final:
                summary = dict(
                    finish_reason=chunk.finish_reason,
                    prompt_tokens=chunk.prompt_tokens,
                    completion_tokens=chunk.completion_tokens,
                )
        return GenerateResult(
            text="".join(text), token_ids=ids, latency_s=time.perf_counter() - t0, ttft_s=ttft, **summary
        )


def _short(msg: str, limit: int = 200) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
