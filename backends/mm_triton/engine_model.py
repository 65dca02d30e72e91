"""Life cycle shared by the engine-backed Python models (``mm_language``, ``mm_language_stream``, ``mm_monolithic``).

``execute()`` only validates and enqueues: per request it reads the inputs, builds a
:class:`~mm_engine.api.GenerationRequest` (the subclass's ``build_request``), submits it to this instance's
engine with a sink and returns None. The engine's threads answer through the request's response sender: one
FINAL response (non-decoupled model) or one response per token (decoupled model, chosen by the config's
``model_transaction_policy { decoupled: true }``). A request refused before or at ``submit`` (bad input,
queue full, shutting down) is answered at once, with its embeddings freed by ``build_request``'s caller.

The engine's loop thread asks each running request whether its client cancelled (``request.is_cancelled()``,
a round trip to tritonserver) at most every ``cancel_probe_interval_ms`` (default 50; a failed send cancels at
once), and its metrics pay no round trip per step (:mod:`mm_triton.engine_metrics`).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

from mm_engine.api import Engine, EngineError, ErrorCause, GenerationRequest

from .cancel_board import either
from .engine_metrics import EngineMetrics
from .generation_inputs import DEFAULT_MAX_PROMPT_BYTES, InputLimits
from .metric_flush import DeferredHistograms
from .model_base import ModelBase
from .phases import Phase, PhaseMetrics
from .sinks import StreamSink, UnarySink

log = logging.getLogger(__name__)
#: Default of ``cancel_probe_interval_ms``: how stale a client's cancellation may be when the engine acts on it.
DEFAULT_CANCEL_PROBE_INTERVAL_MS = 50
MAX_CANCEL_PROBE_INTERVAL_MS = 10_000


def refusal_label(exc: BaseException) -> str:
    """The mm_engine_requests_total outcome of a request refused before or at submit."""
    if isinstance(exc, EngineError):
        return exc.cause.value
    return ErrorCause.INVALID.value if isinstance(exc, ValueError) else ErrorCause.INTERNAL.value


class EngineModel(ModelBase):
    """Subclasses set ``self.engine`` in ``setup`` (after ``super().setup_engine_model()``) and implement
    ``build_request`` and ``abandon``."""

    engine: Engine
    uses_torch = True
    phase_metrics: PhaseMetrics | None = None  # set by setup_engine_model
    cancel_probe_s = DEFAULT_CANCEL_PROBE_INTERVAL_MS / 1000  # setup_engine_model reads cancel_probe_interval_ms
    # what the engine's image load is, as a phase (None: the loader reports its own phases)
    load_phase: Phase | None = None
    phases_run: tuple[Phase, ...] = (Phase.QUEUE, Phase.SLOT_WAIT, Phase.PREFILL, Phase.DECODE, Phase.RESPONSE)

    def setup_engine_model(self) -> None:
        policy = self.model_config.get("model_transaction_policy") or {}
        self.decoupled = bool(policy.get("decoupled", False))
        self.limits = InputLimits(
            max_tokens_limit=self.int_param("max_tokens_limit", 1024),
            default_max_tokens=self.int_param("default_max_tokens", 32),
            max_prompt_bytes=self.int_param("max_prompt_bytes", DEFAULT_MAX_PROMPT_BYTES),
        )
        self.cancel_probe_s = cancel_probe_interval_s(self.resolver)
        self.metric_flusher = DeferredHistograms(name=f"{self.instance_name}-metrics")
        self.phase_metrics = PhaseMetrics(
            self.pb_utils, self.model_name, self.instance_name, self.phases_run, deferred=self.metric_flusher
        )
        self.engine_metrics = EngineMetrics(
            self.pb_utils,
            self.model_name,
            self.instance_name,
            self.phase_metrics,
            self.load_phase,
            deferred=self.metric_flusher,
        )

    def build_request(self, request: Any, request_id: str, arrived: float) -> GenerationRequest:
        """Read and validate one Triton request; raise ValueError (INVALID_ARG) naming the bad input."""
        raise NotImplementedError

    def caller_cancelled(self, request: Any) -> Callable[[], bool] | None:
        """A probe for a cancellation the caller passes by other means than Triton's (None: there is none)."""
        return None

    def abandon(self, request: Any, reason: str) -> None:
        """Free what a request holds outside the engine (e.g. abort its EMBED_REFs) when it never got in."""

    def execute(self, requests: list[Any]) -> None:
        sink_cls = StreamSink if self.decoupled else UnarySink
        for request in requests:
            arrived = time.monotonic()
            request_id = request.request_id() or uuid.uuid4().hex[:12]
            probe = self.cancellation_check(request, self.cancel_probe_s)
            sink = sink_cls(self.pb_utils, request, request_id, probe, phases=self.phase_metrics)
            try:
                generation = self.build_request(request, request_id, arrived)
                generation.cancelled = either(sink.cancelled, self.caller_cancelled(request))
                self.engine.submit(generation, sink)
            except Exception as exc:  # every request gets an answer; the instance keeps serving
                log.warning("%s: request %s refused: %s", self.instance_name, request_id, exc)
                self.engine_metrics.on_finished(refusal_label(exc))
                try:
                    self.abandon(request, f"request refused: {type(exc).__name__}")
                finally:
                    sink.answer_error(exc)
        return None

    def finalize(self) -> None:
        try:
            self.engine.close()
        finally:
            self.engine_metrics.close()  # what the flusher still holds is observed before the stub goes


def cancel_probe_interval_s(resolver: Any) -> float:
    """``cancel_probe_interval_ms`` in seconds, [1, 10000] ms (a ParamError naming it otherwise)."""
    ms = resolver.int(
        "cancel_probe_interval_ms", DEFAULT_CANCEL_PROBE_INTERVAL_MS, low=1, high=MAX_CANCEL_PROBE_INTERVAL_MS
    )
    return ms / 1000.0
