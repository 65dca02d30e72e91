"""Triton models ``mm_pipeline`` (one answer) and ``mm_pipeline_stream`` (decoupled: one answer per token).

The public entry points of a single server. Each request is checked against the header-level bounds
(:mod:`mm_triton.bounds`) and the generation-input rules of ``mm_language`` before any work, then runs two BLS
steps, each carrying the per-server internal token (:mod:`mm_triton.access`) that the internal models require:

1. IMAGE -> ``mm_encoder`` -> EMBED_REF (the embeddings stay in the encoder's pool);
2. EMBED_REF + the generation inputs -> ``mm_language`` (``mm_language_stream`` for the stream) -> the outputs,
   forwarded as they come.

Why BLS and not an ensemble: an ensemble can add no input of its own (it forwards the client's inputs and
request parameters only), so it cannot prove to an internal model that a request came through it.

``execute`` only hands each request to a thread of its own and returns None (a non-decoupled Python model may
answer later through the response sender, as ``mm_language`` does), so requests overlap; at most
``max_inflight`` (parameter / ``MM_MAX_INFLIGHT``, default 256) are in flight per instance, more are refused at
once with UNAVAILABLE (queue_full). A cancellation seen before the encoder step stops the request there; one
seen after it makes ``mm_language`` free the embeddings at once (``MM_ABANDON``); one during the language step is
passed on through the :mod:`mm_triton.cancel_board` when ``pass_cancellation`` is on (the generation ends at its
next decode step; off by default, see the README; off, the language step gets no key). A step whose
stub dies fails the request with UNAVAILABLE (stub_died) at once (:mod:`mm_triton.inflight`); Triton 2.51 would
never answer it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import numpy as np

from mmtransfer import TransferCancelled

from .access import ABANDON_INPUT, server_token, token_tensor
from .bls import LateRelease, drain_stream, forwarded_error
from .bounds import RequestBounds, check_request
from .cancel_board import CANCEL_KEY_INPUT, CancelBoard, new_cancel_key
from .errors import triton_error
from .generation_inputs import GENERATION_INPUT_NAMES, InputLimits, read_generation_inputs
from .inflight import Answer, StepMonitor
from .model_base import ModelBase
from .sinks import ERROR_OUTPUT, ERRORS_INBAND_INPUT

log = logging.getLogger(__name__)

LANGUAGE_INPUTS = GENERATION_INPUT_NAMES
PIPELINE_INPUTS = ("IMAGE",) + LANGUAGE_INPUTS
OUTPUTS = ("TEXT", "TOKEN_IDS", "FINISH_REASON", "PROMPT_TOKENS", "COMPLETION_TOKENS", "IMAGE_TOKENS")
DEFAULT_MAX_INFLIGHT = 256


class PipelineModel(ModelBase):
    needs_checkpoint = False

    def setup(self) -> None:
        policy = self.model_config.get("model_transaction_policy") or {}
        self.decoupled = bool(policy.get("decoupled", False))
        self.encoder_model = self.params.get("encoder_model") or "mm_encoder"
        default_language = "mm_language_stream" if self.decoupled else "mm_language"
        self.language_model = self.params.get("language_model") or default_language
        self.bounds = RequestBounds.from_params(self.int_param)
        self.limits = InputLimits(
            max_tokens_limit=self.bounds.max_tokens_limit, max_prompt_bytes=self.bounds.max_prompt_bytes
        )
        self._token = server_token()
        max_inflight = self.int_param("max_inflight", DEFAULT_MAX_INFLIGHT)
        if max_inflight < 1:
            raise ValueError(f"parameter max_inflight must be >= 1, got {max_inflight}")
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._max_inflight = max_inflight
        self._closing = False
        self._monitor = StepMonitor(self.pb_utils)
        self._finished_streams = LateRelease(name=f"{self.instance_name}-late-release")
        self._board = CancelBoard.of_this_server()
        # off by default: the monitor's is_cancelled() round trips cost throughput (docs/RELIABILITY.md section 6)
        self._pass_cancellation = self.int_param("pass_cancellation", 0) != 0
        log.info(
            "%s: %s -> %s, at most %d requests in flight",
            self.instance_name,
            self.encoder_model,
            self.language_model,
            max_inflight,
        )

    # ---- Triton entry points -----------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            request_id = request.request_id() or uuid.uuid4().hex[:12]
            if self._closing or not self._slots.acquire(blocking=False):
                answer = Answer(self.pb_utils, request.get_response_sender(), request_id)
                answer.send(
                    self.pb_utils.InferenceResponse(
                        error=self._unavailable(
                            f"unavailable (queue_full): {self.model_name} has {self._max_inflight} requests in flight "
                            "(max_inflight)"
                        )
                    ),
                    final=True,
                )
                continue
            # the slot is freed when the request is answered, by the worker or by the step monitor
            answer = Answer(self.pb_utils, request.get_response_sender(), request_id, on_final=self._slots.release)
            # a thread per request (bounded by the slots), not a pool: a step whose stub died never returns,
            # and its thread must not take a pool worker with it (the monitor answers such a request)
            threading.Thread(
                target=self._serve, args=(request, answer), name=f"{self.instance_name}-{request_id}", daemon=True
            ).start()
        return None

    def finalize(self) -> None:
        self._closing = True
        self._monitor.close()
        self._finished_streams.close()

    # ---- one request -------------------------------------------------------------------------------
    def _serve(self, request: Any, answer: Answer) -> None:
        try:
            self._run(request, answer)
        except Exception as exc:  # every request gets an answer; the instance keeps serving
            log.warning("%s: request %s failed: %s", self.instance_name, answer.request_id, exc)
            answer.send(self.pb_utils.InferenceResponse(error=triton_error(self.pb_utils, exc)), final=True)
        finally:
            if not answer.done:  # no path leaves a request unanswered; if one did, its slot must come back
                log.error("%s: request %s ended without an answer", self.instance_name, answer.request_id)
                answer.send(final=True)

    def _step(self, answer: Answer, step: Any, model: str, watch: dict | None = None) -> Any:
        key = self._monitor.enter(answer, model, **(watch or {}))
        try:
            return step.exec()
        finally:
            self._monitor.leave(key)

    def _run(self, request: Any, answer: Answer) -> None:
        pb = self.pb_utils
        request_id = answer.request_id
        check_request(pb, request, self.bounds, PIPELINE_INPUTS)
        read_generation_inputs(pb, request, self.limits)  # the language model's rules, before any encoding
        probe = self.cancellation_check(request)

        def cancelled() -> bool:  # never after the answer: Triton has freed what is_cancelled() asks then
            return answer.client_cancelled(probe)

        token = token_tensor(pb, self._token)
        if cancelled():
            raise TransferCancelled(f"request {request_id} was cancelled before encoding")
        encoded = self._step(
            answer,
            pb.InferenceRequest(
                model_name=self.encoder_model,
                inputs=[pb.get_input_tensor_by_name(request, "IMAGE"), token],
                requested_output_names=["EMBED_REF"],
                request_id=request_id,
            ),
            self.encoder_model,
        )
        if encoded.has_error():
            answer.send(pb.InferenceResponse(error=forwarded_error(pb, encoded.error())), final=True)
            return
        # Without pass_cancellation the language step gets no key: it then watches no board file per step.
        cancel_key = new_cancel_key() if self._pass_cancellation else None
        language = self._language_request(request, request_id, encoded, token, cancelled, cancel_key)
        watch = {}
        if cancel_key is not None:  # the monitor asks is_cancelled() under the answer's lock
            watch = {"cancelled": probe, "on_cancel": lambda: self._board.post(cancel_key)}
        try:
            if self.decoupled:
                self._relay_stream(language, answer, watch)
                return
            reply = self._step(answer, language, self.language_model, watch)
            error = forwarded_error(pb, reply.error()) if reply.has_error() else None
            answer.send(
                pb.InferenceResponse(output_tensors=[] if error else reply.output_tensors(), error=error), final=True
            )
        finally:
            if cancel_key is not None:
                self._board.clear(cancel_key)

    def _language_request(
        self, request: Any, request_id: str, encoded: Any, token: Any, cancelled: Any, cancel_key: str | None
    ) -> Any:
        """The BLS request of the language step: the refs, the client's generation inputs, the internal ones."""
        pb = self.pb_utils
        inputs = [pb.get_output_tensor_by_name(encoded, "EMBED_REF"), token]
        inputs += [t for t in (pb.get_input_tensor_by_name(request, n) for n in LANGUAGE_INPUTS) if t is not None]
        if cancel_key is not None:
            inputs.append(pb.Tensor(CANCEL_KEY_INPUT, np.array([cancel_key.encode()], dtype=np.object_)))
        wanted = [n for n in request.requested_output_names() if n in OUTPUTS] or list(OUTPUTS)
        if cancelled():  # mm_language ABORTs the embeddings at once (not after the encoder's ttl_s)
            inputs.append(pb.Tensor(ABANDON_INPUT, np.array([True])))
        if self.decoupled:  # its errors come back as data (mm_triton.sinks.StreamSink)
            inputs.append(pb.Tensor(ERRORS_INBAND_INPUT, np.array([True])))
            wanted = wanted + [ERROR_OUTPUT]
        return pb.InferenceRequest(
            model_name=self.language_model, inputs=inputs, requested_output_names=wanted, request_id=request_id
        )

    def _relay_stream(self, language: Any, answer: Answer, watch: dict) -> None:
        """Forward mm_language_stream's responses; the one carrying FINISH_REASON (the stream's last data
        response) goes out FINAL, since Triton drops a FINAL on an empty response by default."""
        pb = self.pb_utils
        key = self._monitor.enter(answer, self.language_model, **watch)
        stream = language.exec(decoupled=True)
        try:
            for reply in stream:
                if answer.done:
                    return  # the monitor failed it (stub died) or the client went away
                if reply.has_error():
                    answer.send(pb.InferenceResponse(error=forwarded_error(pb, reply.error())), final=True)
                    return
                tensors = reply.output_tensors()
                if not tensors:
                    continue
                error = pb.get_output_tensor_by_name(reply, ERROR_OUTPUT)
                if error is not None:
                    answer.send(pb.InferenceResponse(error=_inband_error(pb, error)), final=True)
                    return
                final = pb.get_output_tensor_by_name(reply, "FINISH_REASON") is not None
                answer.send(pb.InferenceResponse(output_tensors=tensors), final=final)
                if final:
                    return
            answer.send(final=True)
        finally:
            drain_stream(stream, answer.request_id)
            self._finished_streams.keep(stream)
            self._monitor.leave(key)

    # ---- helpers -----------------------------------------------------------------------------------
    def _unavailable(self, message: str) -> Any:
        err = self.pb_utils.TritonError
        code = getattr(err, "UNAVAILABLE", None)
        return err(message, code) if code is not None else err(message)


def _inband_error(pb: Any, tensor: Any) -> Any:
    """The TritonError of an MM_ERROR output ("<CODE NAME>\t<message>")."""
    raw = tensor.as_numpy().reshape(-1)[0]
    name, _, message = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).partition("\t")
    code = getattr(pb.TritonError, name, None)
    return pb.TritonError(message, code) if code is not None else pb.TritonError(message)
