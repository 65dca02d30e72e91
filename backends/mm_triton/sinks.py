"""Engine results -> Triton responses, sent from the engine's threads through the request's response sender.

- :class:`UnarySink` (non-decoupled model, ``mm_language`` / ``mm_monolithic``): ONE response when the
  sequence ends, flagged FINAL: TEXT, TOKEN_IDS, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS,
  IMAGE_TOKENS. Triton 2.51 lets a non-decoupled Python model return None from ``execute`` and answer later
  this way (ENVIRONMENT.md), which keeps HTTP, unary gRPC, perf_analyzer and ensembles working with many
  requests in flight.
- :class:`StreamSink` (decoupled model, ``mm_language_stream``): one response per ``on_tokens`` (TEXT and
  TOKEN_IDS deltas), then a last data response carrying whatever text the detokenizer still held back, the
  finish reason and the token counts (IMAGE_TOKENS too), flagged FINAL. FINAL never travels on an empty
  response: Triton drops it unless the client enabled empty final responses.

Both turn a failed send (the client went away) into a cancellation that the engine sees at its next step.
Sinks never raise (the engine's contract). Token timings and counts are the engine's own (its observer,
:mod:`mm_triton.engine_metrics`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from mm_engine.api import EngineError, GenerationOutput, ResponseSink

from .errors import _is_image_load, error_code_name, triton_error
from .phases import Phase, PhaseMetrics

ERRORS_INBAND_INPUT = "MM_ERRORS_INBAND"  # set by mm_pipeline_stream on its BLS calls
ERROR_OUTPUT = "MM_ERROR"

log = logging.getLogger(__name__)


class _SinkBase(ResponseSink):
    def __init__(
        self,
        pb_utils: Any,
        request: Any,
        request_id: str,
        client_cancelled: Callable[[], bool],
        phases: PhaseMetrics | None = None,
    ) -> None:
        self._pb = pb_utils
        self._phases = phases  # the final answer's build + send time is the request's ``response`` phase
        self._sender = request.get_response_sender()
        self.request_id = request_id
        self._client_cancelled = client_cancelled
        self._gone = False  # a send failed: nobody listens any more
        self._done = False
        self._lock = threading.Lock()

    def cancelled(self) -> bool:
        """The probe the engine (and its loader threads) poll: the client cancelled, or it is gone. Never asked
        once the FINAL answer is out (under the send lock): Triton has freed the request's response factory by
        then, and ``is_cancelled()`` on it crashes tritonserver 2.51 (SIGSEGV)."""
        with self._lock:
            if self._done or self._gone:
                return True
            return self._client_cancelled()

    def _send(self, response: Any, final: bool) -> None:
        with self._lock:
            if self._done:
                return
            self._done = final
            try:
                flags = self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
                self._sender.send(response, flags=flags)
            except Exception as exc:  # noqa: BLE001 - the client went away; the engine drops the sequence
                self._gone = True
                log.info("request %s: response not delivered (%s); the sequence is dropped", self.request_id, exc)

    def _tensor(self, name: str, array: np.ndarray) -> Any:
        return self._pb.Tensor(name, array)

    def _text(self, text: str) -> Any:
        return self._tensor("TEXT", np.array([text.encode("utf-8")], dtype=np.object_))

    def _ids(self, ids: list[int]) -> Any:
        return self._tensor("TOKEN_IDS", np.array(ids, dtype=np.int64))

    def _summary(self, output: GenerationOutput) -> list[Any]:
        return [
            self._tensor("FINISH_REASON", np.array([output.finish_reason.value.encode()], dtype=np.object_)),
            self._tensor("PROMPT_TOKENS", np.array([output.prompt_tokens], dtype=np.int32)),
            self._tensor("COMPLETION_TOKENS", np.array([output.completion_tokens], dtype=np.int32)),
            self._tensor("IMAGE_TOKENS", np.array(output.image_tokens, dtype=np.int32)),
        ]

    def on_error(self, error: EngineError) -> None:
        try:
            log.info("request %s failed: %s (%s)", self.request_id, error, error.cause.value)
            self._send_error(error)
        except Exception:  # noqa: BLE001 - never raise into the engine
            log.exception("request %s: could not answer an error", self.request_id)

    def answer_error(self, exc: BaseException) -> None:
        """Refused before it reached the engine (bad input, queue full): answer at once."""
        self._send_error(exc)

    def _send_error(self, exc: BaseException) -> None:
        self._send(self._pb.InferenceResponse(error=triton_error(self._pb, exc)), final=True)

    def _record_response(self, started: float) -> None:
        if self._phases is not None:
            self._phases.observe(self.request_id, {Phase.RESPONSE: time.perf_counter() - started})


class UnarySink(_SinkBase):
    """One FINAL response with the whole result."""

    def on_finish(self, output: GenerationOutput) -> None:
        try:
            started = time.perf_counter()
            tensors = [self._text(output.text), self._ids(list(output.token_ids)), *self._summary(output)]
            self._send(self._pb.InferenceResponse(output_tensors=tensors), final=True)
            self._record_response(started)
        except Exception:  # noqa: BLE001 - never raise into the engine
            log.exception("request %s: could not answer", self.request_id)


class StreamSink(_SinkBase):
    """One response per new tokens; the finish reason and counts ride on the FINAL (last data) response."""

    def _send_error(self, exc: BaseException) -> None:
        """A BLS caller iterating this stream (the ``mm_pipeline_stream`` model) never sees an error response in
        Triton 2.51 (it is dropped; the caller would wait forever), so a request carrying ``MM_ERRORS_INBAND``
        gets its error as a FINAL data response with one ``MM_ERROR`` output: "<CODE NAME>\t<message>"."""
        if not self._errors_inband:
            super()._send_error(exc)
            return
        name, prefix = error_code_name(exc)
        text = f"{name}\t{prefix}: {exc.__cause__ if _is_image_load(exc) else exc}"
        self._send(
            self._pb.InferenceResponse(
                output_tensors=[
                    self._tensor(ERROR_OUTPUT, np.array([text.encode("utf-8", "replace")], dtype=np.object_))
                ]
            ),
            final=True,
        )

    def __init__(self, pb_utils: Any, request: Any, *args: Any, **kw: Any) -> None:
        super().__init__(pb_utils, request, *args, **kw)
        self._errors_inband = pb_utils.get_input_tensor_by_name(request, ERRORS_INBAND_INPUT) is not None
        self._streamed_ids: list[int] = []
        self._streamed_text: list[str] = []

    def on_tokens(self, token_ids: list[int], text_delta: str) -> None:
        try:
            self._streamed_ids.extend(token_ids)
            self._streamed_text.append(text_delta)
            response = self._pb.InferenceResponse(output_tensors=[self._text(text_delta), self._ids(list(token_ids))])
            self._send(response, final=False)
        except Exception:  # noqa: BLE001 - never raise into the engine
            log.exception("request %s: could not stream tokens", self.request_id)

    def on_finish(self, output: GenerationOutput) -> None:
        try:
            started = time.perf_counter()
            streamed = "".join(self._streamed_text)
            text_rest = output.text[len(streamed) :] if output.text.startswith(streamed) else ""
            n = len(self._streamed_ids)
            ids_rest = list(output.token_ids[n:]) if list(output.token_ids[:n]) == self._streamed_ids else []
            tensors = [self._text(text_rest), self._ids(ids_rest), *self._summary(output)]
            self._send(self._pb.InferenceResponse(output_tensors=tensors), final=True)
            self._record_response(started)
        except Exception:  # noqa: BLE001 - never raise into the engine
            log.exception("request %s: could not finish the stream", self.request_id)
