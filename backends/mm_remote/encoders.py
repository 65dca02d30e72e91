"""Calling the ``mm_encoder`` model of one or more remote encoder servers over gRPC.

Only EMBED_REFs (small JSON handles) come back; each embedding stays in the encoder instance's pool
until the language instance pulls it over the control channel (``mmtransfer``).

Several encoder servers are used round-robin. A server that cannot take the request (UNAVAILABLE:
unreachable, no ``mm_encoder`` there or not ready, or its pool exhausted) is skipped and the next one
is tried; it is tried last for ``cooldown_s`` afterwards. A request the encoder refuses (bad image) is
not retried: its error comes back as it is, naming the server. A call that times out is not retried
either (the encoder may still finish it; what it publishes is reclaimed after its ``ttl_s``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_ENCODER_MODEL = "mm_encoder"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_COOLDOWN_S = 5.0
MAX_ENCODER_URLS = 64
MAX_REF_BYTES = 1024
_URL = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9][A-Za-z0-9.\-]{0,252}):(\d{1,5})")
_MiB = 1 << 20
# tritonclient's defaults replaced as a whole when channel_args is given: keep its message limits and
# keep gRPC's reconnect backoff short, so a restarted encoder server is used again within seconds
# (the gRPC default backs off up to 120 s).
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 2**31 - 1),
    ("grpc.keepalive_timeout_ms", 20000),
]

# gRPC status -> Triton error code name (pb_utils.TritonError.<name>)
_CODES = {
    "INVALID_ARGUMENT": "INVALID_ARG",
    "UNAVAILABLE": "UNAVAILABLE",
    "NOT_FOUND": "UNAVAILABLE",
    "DEADLINE_EXCEEDED": "UNAVAILABLE",
    "RESOURCE_EXHAUSTED": "UNAVAILABLE",
    "CANCELLED": "CANCELLED",
    "UNIMPLEMENTED": "UNSUPPORTED",
}


def parse_encoder_urls(value: str | Iterable[str]) -> list[str]:
    """``"h1:8011,h2:8011"`` (or a list of such strings) -> ``["h1:8011", "h2:8011"]``.

    A leading ``grpc://`` is accepted and dropped. ValueError for a missing, malformed or repeated URL."""
    items = [value] if isinstance(value, str) else list(value)
    urls: list[str] = []
    for item in items:
        for raw in str(item).replace(" ", ",").split(","):
            url = raw.strip()
            if not url:
                continue
            if url.startswith("grpc://"):
                url = url[len("grpc://") :]
            m = _URL.fullmatch(url)
            if not m or not 1 <= int(m.group(1)) <= 65535:
                raise ValueError(f"encoder URL {raw.strip()!r}: expected HOST:PORT (the encoder server's gRPC port)")
            if url in urls:
                raise ValueError(f"encoder URL {url} is listed twice")
            urls.append(url)
    if not urls:
        raise ValueError("no encoder server: set encoder_urls (MM_ENCODER_URLS, scripts/serve --encoder-url HOST:PORT)")
    if len(urls) > MAX_ENCODER_URLS:
        raise ValueError(f"at most {MAX_ENCODER_URLS} encoder URLs, got {len(urls)}")
    return urls


class EncoderCallError(Exception):
    """The encoder step failed; ``code`` names the Triton error code to answer with."""

    def __init__(self, code: str, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retry = retry  # the server could not take the request: another server may


def _grpc_client(url: str) -> Any:
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)


class RemoteEncoders:
    """Round-robin over encoder servers; one gRPC client (channel) per server, reused by every call.

    ``start`` offsets the round-robin so that the pipeline's instances do not all begin at the same
    server. ``observer(url, outcome)`` is called after every attempt with outcome ``"ok"``,
    ``"unavailable"`` (skipped to the next server) or ``"error"``.
    """

    def __init__(
        self,
        urls: Sequence[str],
        model: str = DEFAULT_ENCODER_MODEL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        start: int = 0,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        client_factory: Callable[[str], Any] = _grpc_client,
        observer: Callable[[str, str], None] | None = None,
        token: str = "",
    ) -> None:
        self.urls = parse_encoder_urls(urls)
        self._token = token  # MM_INTERNAL_TOKEN for the encoder servers (from the shared secret), or none
        if not 0 < timeout_s <= 86400:
            raise ValueError(f"encoder_timeout_s must be in (0, 86400], got {timeout_s!r}")
        self.model = model
        self.timeout_s = float(timeout_s)
        self.cooldown_s = float(cooldown_s)
        self.observer = observer
        self._clients = {url: client_factory(url) for url in self.urls}
        self._next = start % len(self.urls)
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """The servers to try for the next request: round-robin, recently unavailable ones last."""
        with self._lock:
            i = self._next
            self._next = (self._next + 1) % len(self.urls)
            now = time.monotonic()
            rotated = self.urls[i:] + self.urls[:i]
            up = [u for u in rotated if self._down_until.get(u, 0.0) <= now]
            return up + [u for u in rotated if u not in up]

    def encode(self, images: np.ndarray, request_id: str = "") -> tuple[np.ndarray, str]:
        """IMAGE (BYTES ``[n]``) -> (EMBED_REF BYTES ``[n]``, the URL of the server that encoded them)."""
        images = np.asarray(images, dtype=np.object_).reshape(-1)
        skipped: list[str] = []
        for url in self.order():
            try:
                refs = self._call(url, images, request_id)
            except EncoderCallError as exc:
                if exc.retry:
                    with self._lock:
                        self._down_until[url] = time.monotonic() + self.cooldown_s
                    self._observe(url, "unavailable")
                    skipped.append(str(exc))
                    log.warning("request %s: %s; trying the next encoder server", request_id or "-", exc)
                    continue
                self._observe(url, "error")
                raise
            with self._lock:
                self._down_until.pop(url, None)
            self._observe(url, "ok")
            return refs, url
        if len(skipped) == 1:
            raise EncoderCallError("UNAVAILABLE", skipped[0])
        raise EncoderCallError("UNAVAILABLE", f"no encoder server could take the request: {'; '.join(skipped)}")

    def _call(self, url: str, images: np.ndarray, request_id: str) -> np.ndarray:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        tensor = grpcclient.InferInput("IMAGE", [int(images.shape[0])], "BYTES")
        tensor.set_data_from_numpy(images)
        inputs = [tensor]
        if self._token:
            token = grpcclient.InferInput("MM_INTERNAL_TOKEN", [1], "BYTES")
            token.set_data_from_numpy(np.array([self._token.encode()], dtype=np.object_))
            inputs.append(token)
        try:
            result = self._clients[url].infer(
                self.model,
                inputs,
                outputs=[grpcclient.InferRequestedOutput("EMBED_REF")],
                request_id=request_id,
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            raise _classify(url, self.model, self.timeout_s, exc) from None
        refs = result.as_numpy("EMBED_REF")
        if refs is None or refs.dtype != np.object_ or refs.reshape(-1).shape[0] != images.shape[0]:
            raise EncoderCallError(
                "INTERNAL",
                f"encoder server {url}: {self.model} returned "
                f"{None if refs is None else refs.shape} EMBED_REF for {images.shape[0]} image(s)",
            )
        refs = refs.reshape(-1)
        if any(not isinstance(r, (bytes, bytearray)) or len(r) > MAX_REF_BYTES for r in refs):
            raise EncoderCallError("INTERNAL", f"encoder server {url}: malformed EMBED_REF")
        return refs

    def check(self, timeout_s: float = 2.0) -> dict[str, str | None]:
        """``{url: None if its mm_encoder is ready, else why not}`` (for start-up warnings)."""
        from tritonclient.utils import InferenceServerException

        out: dict[str, str | None] = {}
        for url, client in self._clients.items():
            try:
                ready = client.is_model_ready(self.model, client_timeout=timeout_s)
                out[url] = None if ready else f"{self.model} is not ready there"
            except InferenceServerException as exc:
                out[url] = _first_line(exc.message() or str(exc))
            except Exception as exc:  # noqa: BLE001 - a start-up check never fails the model
                out[url] = f"{type(exc).__name__}: {exc}"
        return out

    def _observe(self, url: str, outcome: str) -> None:
        if self.observer is not None:
            try:
                self.observer(url, outcome)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                log.exception("encoder observer failed")

    def close(self) -> None:
        for client in self._clients.values():
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _classify(url: str, model: str, timeout_s: float, exc: Any) -> EncoderCallError:
    status = str(exc.status() or "").replace("StatusCode.", "")
    message = _first_line(exc.message() or str(exc))
    if status == "DEADLINE_EXCEEDED":
        return EncoderCallError(
            "UNAVAILABLE", f"encoder server {url} did not answer within {timeout_s:g} s (encoder_timeout_s)"
        )
    code = _CODES.get(status, "INTERNAL")
    unknown_model = status == "NOT_FOUND" or "unknown model" in message.lower()
    if status == "UNAVAILABLE" or unknown_model:
        if unknown_model:
            detail = f"no model {model} there ({message})"
        elif (
            "failed to connect" in message.lower()
            or "connection refused" in message.lower()
            or "dns" in message.lower()
            or "unreachable" in message.lower()
        ):
            detail = f"unreachable ({message})"
        else:
            detail = message
        return EncoderCallError("UNAVAILABLE", f"encoder server {url} unavailable: {detail}", retry=True)
    return EncoderCallError(code, f"{message} (encoder server {url})")
