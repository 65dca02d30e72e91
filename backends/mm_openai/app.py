"""The FastAPI application: POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.

FastAPI + uvicorn because they are what vLLM and SGLang serve their OpenAI APIs with (users know how to
run them behind a proxy), the ASGI model gives streaming responses with client-disconnect detection, and
one event loop carries thousands of idle streams while the heavy work happens in Triton. The body is
read and validated here (not by FastAPI's own validation), so every error is an OpenAI error object.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServerConfig
from .errors import APIError, from_triton, model_not_found, too_large
from .images import FetchPolicy, ImageFetcher
from .metrics import APIMetrics
from .responses import SSE_DONE, CompletionIds, Usage, chunk, completion, sse, usage_chunk
from .schema import ChatRequest, parse_body
from .triton import Delta, TritonBackend, TritonModels, build_inputs

log = logging.getLogger("mm_openai")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CHAT_PATH = "/v1/chat/completions"


def request_id_of(request: Request) -> str:
    """The client's x-request-id when it is a sane token, else a new one (it goes to Triton and logs)."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"request body of {declared} bytes is larger than the limit of {limit} bytes")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large(f"request body larger than the limit of {limit} bytes")
        chunks.append(part)
    return b"".join(chunks)


def error_response(err: APIError, request_id: str | None = None) -> JSONResponse:
    headers = {"x-request-id": request_id} if request_id else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def usage_of(delta: Delta, completion_tokens: int) -> Usage:
    return Usage(
        delta.prompt_tokens or 0, delta.completion_tokens if delta.completion_tokens is not None else completion_tokens
    )


class ChatHandler:
    """One chat-completion request, from body to answer; metrics and logs carry its request id."""

    def __init__(
        self, config: ServerConfig, backend: TritonBackend, fetcher: ImageFetcher, metrics: APIMetrics
    ) -> None:
        self.config, self.backend, self.fetcher, self.metrics = config, backend, fetcher, metrics

    async def __call__(self, request: Request) -> Response:
        rid = request_id_of(request)
        t0 = time.monotonic()
        self.metrics.in_flight.inc()
        streaming = False
        try:
            chat = parse_body(
                await read_body(request, self.config.max_body_bytes),
                self.config.max_tokens_limit,
                self.config.max_images,
            )
            if chat.model != self.config.served_model_name:
                raise model_not_found(chat.model)
            images = await asyncio.gather(*(self._image(src.url, src.param) for src in chat.images))
            inputs = build_inputs(images, chat.messages.to_json(), chat.sampling)
            ids = CompletionIds(f"chatcmpl-{rid}", self.config.served_model_name)
            log.info(
                "request %s: %d message(s), %d image(s), stream=%s, %s",
                rid,
                len(chat.messages.messages),
                len(images),
                chat.stream,
                chat.sampling,
            )
            if chat.stream:
                response = await self._stream(rid, ids, chat, inputs, t0)
                streaming = True
                return response
            delta = await self.backend.complete(rid, inputs, chat.sampling.max_tokens)
            usage = usage_of(delta, len(delta.token_ids))
            self._done(rid, 200, t0, False, usage)
            return JSONResponse(
                completion(ids, delta.text, delta.finish_reason or "stop", usage), headers={"x-request-id": rid}
            )
        except APIError as err:
            self._done(rid, err.status, t0, False, None, err.message)
            return error_response(err, rid)
        except Exception as exc:  # noqa: BLE001 - every request gets an OpenAI error object
            log.exception("request %s: internal error", rid)
            self._done(rid, 500, t0, False, None, str(exc))
            return error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error"), rid)
        finally:
            if not streaming:
                self.metrics.in_flight.dec()

    async def _image(self, url: str, param: str) -> bytes:
        if url[:5].lower() == "data:":
            return await self.fetcher.load(url, param)
        try:
            data = await self.fetcher.load(url, param)
        except APIError as err:
            self.metrics.image_fetches.labels("refused" if err.code == "image_url_not_allowed" else "failed").inc()
            raise
        self.metrics.image_fetches.labels("ok").inc()
        return data

    async def _stream(self, rid: str, ids: CompletionIds, chat: ChatRequest, inputs: list, t0: float) -> Response:
        pieces = self.backend.stream(rid, inputs, chat.sampling.max_tokens)
        try:
            first = await pieces.__anext__()  # an error before the first token keeps its HTTP status
        except StopAsyncIteration:
            raise from_triton(None, "the stream ended without a response") from None
        except BaseException:
            await pieces.aclose()
            raise
        self.metrics.ttft.observe(time.monotonic() - t0)
        body = self._sse(rid, ids, chat.include_usage, first, pieces, t0)
        return StreamingResponse(
            body, media_type="text/event-stream", headers={"x-request-id": rid, "cache-control": "no-cache"}
        )

    async def _sse(
        self, rid: str, ids: CompletionIds, include_usage: bool, first: Delta, pieces: AsyncIterator[Delta], t0: float
    ) -> AsyncIterator[bytes]:
        status, usage, n_tokens, delta = 499, None, 0, first
        try:
            yield sse(chunk(ids, {"role": "assistant", "content": ""}, None, include_usage))
            while True:
                n_tokens += len(delta.token_ids)
                if delta.text:
                    yield sse(chunk(ids, {"content": delta.text}, None, include_usage))
                if delta.finish_reason:
                    break
                try:
                    delta = await pieces.__anext__()
                except StopAsyncIteration:
                    raise from_triton(None, "the stream ended without a final response") from None
            usage = usage_of(delta, n_tokens)
            yield sse(chunk(ids, {}, delta.finish_reason, include_usage))
            if include_usage:
                yield sse(usage_chunk(ids, usage))
            yield SSE_DONE
            status = 200
        except APIError as err:  # after the 200 went out: the error travels as an event, as vLLM does
            status = err.status
            log.warning("request %s: stream failed: %s", rid, err.message)
            yield sse(err.body())
            yield SSE_DONE
        finally:
            await pieces.aclose()  # also when the client went away: cancels the gRPC stream
            self.metrics.in_flight.dec()
            self._done(rid, status, t0, True, usage)

    def _done(self, rid: str, status: int, t0: float, stream: bool, usage: Usage | None, error: str = "") -> None:
        elapsed = time.monotonic() - t0
        self.metrics.requests.labels(CHAT_PATH, str(status)).inc()
        self.metrics.duration.labels(CHAT_PATH, str(stream).lower()).observe(elapsed)
        if usage is not None:
            self.metrics.prompt_tokens.inc(usage.prompt_tokens)
            self.metrics.completion_tokens.inc(usage.completion_tokens)
        if error:
            log.info("request %s: %d in %.0f ms: %s", rid, status, elapsed * 1000, error)
        else:
            log.info(
                "request %s: %d in %.0f ms%s",
                rid,
                status,
                elapsed * 1000,
                f", {usage.prompt_tokens}+{usage.completion_tokens} tokens" if usage else "",
            )


def _lifespan(config: ServerConfig, metrics: APIMetrics):
    """The app's life: the Triton backend and the image fetcher open while it serves, closed after."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        models = TritonModels(
            config.triton_model,
            config.triton_stream_model,
            config.triton_encoder_model,
            config.triton_language_stream_model,
            config.stream_via,
            config.internal_token_file,
        )
        backend = TritonBackend(config.triton_url, models, config.request_timeout_s, config.triton_concurrency)
        fetcher = ImageFetcher(
            FetchPolicy(
                config.image_url_hosts, config.image_url_loopback, config.max_image_bytes, config.image_fetch_timeout_s
            )
        )
        app.state.chat = ChatHandler(config, backend, fetcher, metrics)
        app.state.backend = backend
        log.info(
            "OpenAI API for model %r on Triton %s (%s; streams via %s)",
            config.served_model_name,
            config.triton_url,
            config.triton_model,
            config.stream_via,
        )
        try:
            yield
        finally:
            await fetcher.aclose()
            await backend.close()

    return lifespan


def create_app(config: ServerConfig) -> FastAPI:
    metrics = APIMetrics()
    app = FastAPI(
        title="mm-disagg OpenAI-compatible API",
        lifespan=_lifespan(config, metrics),
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.metrics = metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        metrics.requests.labels("other", str(exc.status_code)).inc()
        return error_response(APIError(exc.status_code, str(exc.detail), kind))

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request) -> Response:
        return await request.app.state.chat(request)

    _add_model_routes(app, config, metrics)
    return app


def _add_model_routes(app: FastAPI, config: ServerConfig, metrics: APIMetrics) -> None:
    """/v1/models, /health and /metrics."""
    started = int(time.time())

    def model_card() -> dict[str, Any]:
        return {"id": config.served_model_name, "object": "model", "created": started, "owned_by": "mm-disagg"}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        metrics.requests.labels("/v1/models", "200").inc()
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != config.served_model_name:
            metrics.requests.labels("/v1/models", "404").inc()
            return error_response(model_not_found(model_id))
        metrics.requests.labels("/v1/models", "200").inc()
        return JSONResponse(model_card())

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        state = await request.app.state.backend.health()
        ok = state["server"] and state[config.triton_model]
        return JSONResponse({"status": "ok" if ok else "unavailable", "triton": state}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
