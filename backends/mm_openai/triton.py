"""TritonBackend: one shared ``tritonclient.grpc.aio`` client; a request in, a completion or deltas out.

The contract (see README "KServe v2"): inputs IMAGE BYTES[n] (n may be 0: text-only), MESSAGES BYTES[1]
(mm_models.chat wire shape), and, only when the client set them, MAX_TOKENS, TEMPERATURE, TOP_P, TOP_K,
SEED, STOP; outputs TEXT, TOKEN_IDS, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS (stream: deltas, the
last response carries FINISH_REASON). An option left out takes the model's default (greedy decoding and
its ``default_max_tokens``), so a server without sampling inputs still answers greedy requests.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from .errors import APIError, from_triton
from .schema import Sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """One answer of Triton: the whole completion (unary) or the next piece of it (stream)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # set on the last piece only
    prompt_tokens: int | None
    completion_tokens: int | None


def build_inputs(images: Sequence[bytes], messages_json: str, sampling: Sampling) -> list[grpcclient.InferInput]:
    """The request tensors; sampling options the client left out are not sent at all."""
    tensors: list[tuple[str, np.ndarray, str]] = [
        ("IMAGE", np.array(list(images), dtype=np.object_).reshape(len(images)), "BYTES"),
        ("MESSAGES", np.array([messages_json.encode("utf-8")], dtype=np.object_), "BYTES"),
    ]
    scalars = (
        ("MAX_TOKENS", sampling.max_tokens, np.int32, "INT32"),
        ("TOP_K", sampling.top_k, np.int32, "INT32"),
        ("SEED", sampling.seed, np.int64, "INT64"),
    )
    for name, value, dtype, triton_type in scalars:
        if value is not None:
            tensors.append((name, np.array([value], dtype=dtype), triton_type))
    # temperature 0 and top_p 1 are the defaults (greedy, off): not sent, so a greedy request also works
    # against a model that declares no sampling inputs.
    if sampling.temperature not in (None, 0.0):
        tensors.append(("TEMPERATURE", np.array([sampling.temperature], dtype=np.float32), "FP32"))
    if sampling.top_p not in (None, 1.0):
        tensors.append(("TOP_P", np.array([sampling.top_p], dtype=np.float32), "FP32"))
    if sampling.stop:
        tensors.append(("STOP", np.array([s.encode("utf-8") for s in sampling.stop], dtype=np.object_), "BYTES"))
    out = []
    for name, array, triton_type in tensors:
        t = grpcclient.InferInput(name, list(array.shape), triton_type)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def parse_result(result: grpcclient.InferResult) -> Delta:
    def first(name: str):
        arr = result.as_numpy(name)
        return None if arr is None or arr.size == 0 else arr.reshape(-1)[0]

    text = first("TEXT")
    ids = result.as_numpy("TOKEN_IDS")
    reason = first("FINISH_REASON")
    prompt, completion = first("PROMPT_TOKENS"), first("COMPLETION_TOKENS")
    return Delta(
        text=text.decode("utf-8", "replace") if isinstance(text, bytes) else (text or ""),
        token_ids=[] if ids is None else [int(x) for x in ids.reshape(-1)],
        finish_reason=(reason.decode() if isinstance(reason, bytes) else reason) or None,
        prompt_tokens=None if prompt is None else int(prompt),
        completion_tokens=None if completion is None else int(completion),
    )


def _api_error(exc: InferenceServerException) -> APIError:
    return from_triton(exc.status(), exc.message() or str(exc))


class StreamRoute(enum.Enum):
    """How a stream request reaches the engine (chosen per request from what is ready, cached 5 s)."""

    DIRECT = "direct"  # mm_encoder (unary), then mm_language_stream called directly: a client that goes
    #                    away cancels the sequence (Triton 2.51 does not pass cancellation through ensembles)
    ENSEMBLE = "ensemble"  # mm_pipeline_stream: one call; an abandoned sequence runs to its end
    UNARY = "unary"  # no streaming model: the whole answer from mm_pipeline as one chunk


@dataclass(frozen=True)
class TritonModels:
    pipeline: str = "mm_pipeline"
    pipeline_stream: str = "mm_pipeline_stream"
    encoder: str = "mm_encoder"
    language_stream: str = "mm_language_stream"
    stream_via: str = "direct"  # "direct" or "ensemble" (the preferred route; falls back when not ready)
    internal_token_file: str = ""  # the direct route needs the internal models' token (mm_triton.access)


class TritonBackend:
    """Owns the gRPC channel (create inside the event loop that uses it, e.g. the app's lifespan)."""

    def __init__(self, url: str, models: TritonModels, timeout_s: float, concurrency: int) -> None:
        self.url, self.models, self.timeout_s = url, models, timeout_s
        self.model = models.pipeline
        self._client = grpcclient.InferenceServerClient(url)
        self._slots = asyncio.Semaphore(concurrency)
        self._route: tuple[float, StreamRoute] = (float("-inf"), StreamRoute.UNARY)
        self._token_cache: tuple[int, bytes] = (-1, b"")

    async def close(self) -> None:
        await self._client.close()

    async def _ready(self, name: str) -> bool:
        try:
            return bool(await self._client.is_model_ready(name, client_timeout=3))
        except InferenceServerException:
            return False

    async def health(self) -> dict[str, bool]:
        """Readiness of Triton and of each model this server may call (False when unreachable)."""
        m = self.models
        out = {"server": False}
        try:
            out["server"] = bool(await self._client.is_server_ready(client_timeout=3))
        except InferenceServerException:
            pass
        for name in (m.pipeline, m.pipeline_stream, m.encoder, m.language_stream):
            out[name] = out["server"] and await self._ready(name)
        return out

    async def stream_route(self) -> StreamRoute:
        """The route for stream requests: the preferred one when its models are ready, else the next."""
        at, route = self._route
        if time.monotonic() - at <= 5.0:
            return route
        m = self.models
        if (
            m.stream_via == "direct"
            and self._token()
            and await self._ready(m.encoder)
            and await self._ready(m.language_stream)
        ):
            route = StreamRoute.DIRECT
        elif await self._ready(m.pipeline_stream):
            route = StreamRoute.ENSEMBLE
        else:
            route = StreamRoute.UNARY
        if route.value != m.stream_via:
            log.warning("stream requests go %s (preferred: %s; its models are not ready)", route.value, m.stream_via)
        self._route = (time.monotonic(), route)
        return route

    async def complete(
        self, request_id: str, inputs: list[grpcclient.InferInput], max_tokens: int | None = None
    ) -> Delta:
        """The whole answer. A model without a FINISH_REASON output (older repositories) gets one
        inferred: "length" when it produced ``max_tokens`` tokens, else "stop"."""
        async with self._slots:
            result = await self._infer(self.models.pipeline, inputs, request_id)
        delta = parse_result(result)
        if delta.finish_reason is None:
            full = max_tokens is not None and len(delta.token_ids) >= max_tokens
            delta = replace(delta, finish_reason="length" if full else "stop")
        return delta

    def _token(self) -> bytes:
        """The internal token from ``internal_token_file``, re-read when the file changes (a restarted server
        has a new one); empty without a file."""
        path = self.models.internal_token_file
        if not path:
            return b""
        try:
            mtime = os.stat(path).st_mtime_ns
            if mtime != self._token_cache[0]:
                self._token_cache = (mtime, open(path, "rb").read().strip())
        except OSError:
            return b""
        return self._token_cache[1]

    def _token_input(self) -> grpcclient.InferInput:
        token = grpcclient.InferInput("MM_INTERNAL_TOKEN", [1], "BYTES")
        token.set_data_from_numpy(np.array([self._token()], dtype=np.object_))
        return token

    async def _infer(self, model: str, inputs: list[grpcclient.InferInput], request_id: str) -> Any:
        try:
            return await self._client.infer(model, inputs, request_id=request_id, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise _api_error(exc) from None

    async def _direct_inputs(self, request_id: str, inputs: list[grpcclient.InferInput]) -> list:
        """The pipeline's inputs with IMAGE replaced by the EMBED_REFs mm_encoder returns for it."""
        image = next(t for t in inputs if t.name() == "IMAGE")
        refs = np.zeros((0,), dtype=np.object_)
        if image.shape()[0] > 0:
            refs = (await self._infer(self.models.encoder, [image, self._token_input()], request_id)).as_numpy(
                "EMBED_REF"
            )
        ref_input = grpcclient.InferInput("EMBED_REF", list(refs.shape), "BYTES")
        ref_input.set_data_from_numpy(refs)
        return [ref_input, self._token_input()] + [t for t in inputs if t.name() != "IMAGE"]

    async def stream(
        self, request_id: str, inputs: list[grpcclient.InferInput], max_tokens: int | None = None
    ) -> AsyncIterator[Delta]:
        """The pieces of one streamed answer; closing the iterator early cancels the gRPC call."""
        route = await self.stream_route()
        if route is StreamRoute.UNARY:
            yield await self.complete(request_id, inputs, max_tokens)
            return
        async with self._slots:
            model = self.models.pipeline_stream
            if route is StreamRoute.DIRECT:
                # the embeddings wait on the encoder until mm_language_stream pulls them; if the call below
                # never starts (Triton gone), the encoder's ttl_s reclaims them
                inputs, model = await self._direct_inputs(request_id, inputs), self.models.language_stream
            call = self._stream_call(model, request_id, inputs)
            try:
                async for delta in call:
                    yield delta
            finally:
                await call.aclose()  # at once, not when garbage-collected: it cancels the gRPC stream

    async def _stream_call(self, model: str, request_id: str, inputs: list) -> AsyncIterator[Delta]:
        done = asyncio.Event()

        async def requests():
            yield {"model_name": model, "inputs": inputs, "request_id": request_id}
            await done.wait()  # keep our side of the stream open until the last response came

        responses = self._client.stream_infer(requests(), stream_timeout=self.timeout_s)
        try:
            async for result, error in responses:
                if error is not None:
                    raise _api_error(error)
                delta = parse_result(result)
                yield delta
                if delta.finish_reason:
                    return
            raise from_triton(None, "the stream ended without a final response")
        except InferenceServerException as exc:
            raise _api_error(exc) from None
        except grpc.RpcError as exc:  # the stream itself failed (server gone, stream_timeout)
            raise from_triton(str(exc.code()), exc.details() or str(exc)) from None
        finally:
            done.set()
            responses.cancel()  # a no-op after the last response; cancels the sequence when we leave early
