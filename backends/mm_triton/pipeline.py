"""Triton models ``mm_pipeline`` (one answer) and ``mm_pipeline_stream`` (decoupled: one answer per token).

The public entry points of a single server. Each request is checked against the header-level bounds
(:mod:`mm_triton.bounds`) and the generation-input rules of ``mm_language`` before any work, then runs two BLS
steps, each carrying the per-server internal token (:mod:`mm_triton.access`) that the internal models require:

1. IMAGE -> ``mm_encoder`` -> EMBED_REF (the embeddings stay in the encoder's pool);
2. EMBED_REF + the generation inputs -> ``mm_language`` (``mm_language_stream`` for the stream) -> the outputs,
   forwarded as they come.

Why BLS and not an ensemble: an ensemble can add no input of its own (it forwards the client's inputs and
request parameters only), so it cannot prove to an internal model that a request came through it.

``execute`` only hands each request to a worker thread and returns None (a non-decoupled Python model may
answer later through the response sender, as ``mm_language`` does), so requests overlap; at most
``max_inflight`` (parameter / ``MM_MAX_INFLIGHT``, default 256) are in flight per instance, more are refused at
once with UNAVAILABLE (queue_full). A cancellation seen before a step stops the request there.
"""
from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mmtransfer import TransferCancelled

from .access import ABANDON_INPUT, server_token, token_tensor
from .bls import forwarded_error
from .bounds import RequestBounds, check_request
from .errors import triton_error
from .generation_inputs import InputLimits, read_generation_inputs
from .model_base import ModelBase

log = logging.getLogger(__name__)

LANGUAGE_INPUTS = ("PROMPT", "MESSAGES", "MAX_TOKENS", "TEMPERATURE", "TOP_P", "TOP_K", "SEED", "STOP", "TIMEOUT_MS")
PIPELINE_INPUTS = ("IMAGE",) + LANGUAGE_INPUTS
OUTPUTS = ("TEXT", "TOKEN_IDS", "FINISH_REASON", "PROMPT_TOKENS", "COMPLETION_TOKENS")
DEFAULT_MAX_INFLIGHT = 256


class PipelineModel(ModelBase):
    def setup(self) -> None:
        policy = self.model_config.get("model_transaction_policy") or {}
        self.decoupled = bool(policy.get("decoupled", False))
        self.encoder_model = self.params.get("encoder_model") or "mm_encoder"
        default_language = "mm_language_stream" if self.decoupled else "mm_language"
        self.language_model = self.params.get("language_model") or default_language
        self.bounds = RequestBounds.from_params(self.int_param)
        self.limits = InputLimits(max_tokens_limit=self.bounds.max_tokens_limit,
                                  max_prompt_bytes=self.bounds.max_prompt_bytes)
        self._token = server_token(self.transfer_config.shared_secret)
        max_inflight = self.int_param("max_inflight", DEFAULT_MAX_INFLIGHT)
        if max_inflight < 1:
            raise ValueError(f"parameter max_inflight must be >= 1, got {max_inflight}")
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._max_inflight = max_inflight
        self._executor = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix=self.instance_name)
        log.info("%s: %s -> %s, at most %d requests in flight", self.instance_name, self.encoder_model,
                 self.language_model, max_inflight)

    # ---- Triton entry points -----------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            request_id = request.request_id() or uuid.uuid4().hex[:12]
            sender = request.get_response_sender()
            if not self._slots.acquire(blocking=False):
                self._final(sender, self.pb_utils.InferenceResponse(error=self._unavailable(
                    f"unavailable (queue_full): {self.model_name} has {self._max_inflight} requests in flight "
                    "(max_inflight)")))
                continue
            try:
                self._executor.submit(self._serve, request, sender, request_id)
            except RuntimeError:  # shutting down
                self._slots.release()
                self._final(sender, self.pb_utils.InferenceResponse(
                    error=self._unavailable("unavailable (shutdown): the model is being unloaded")))
        return None

    def finalize(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- one request -------------------------------------------------------------------------------
    def _serve(self, request: Any, sender: Any, request_id: str) -> None:
        try:
            self._run(request, sender, request_id)
        except Exception as exc:  # every request gets an answer; the instance keeps serving
            log.warning("%s: request %s failed: %s", self.instance_name, request_id, exc)
            self._final(sender, self.pb_utils.InferenceResponse(error=triton_error(self.pb_utils, exc)))
        finally:
            self._slots.release()

    def _run(self, request: Any, sender: Any, request_id: str) -> None:
        pb = self.pb_utils
        check_request(pb, request, self.bounds, PIPELINE_INPUTS)
        read_generation_inputs(pb, request, self.limits)  # the language model's rules, before any encoding
        cancelled = self.cancellation_check(request)
        token = token_tensor(pb, self._token)
        if cancelled():
            raise TransferCancelled(f"request {request_id} was cancelled before encoding")
        encoded = pb.InferenceRequest(model_name=self.encoder_model, inputs=[pb.get_input_tensor_by_name(
            request, "IMAGE"), token], requested_output_names=["EMBED_REF"], request_id=request_id).exec()
        if encoded.has_error():
            self._final(sender, pb.InferenceResponse(error=forwarded_error(pb, encoded.error())))
            return
        inputs = [pb.get_output_tensor_by_name(encoded, "EMBED_REF"), token]
        inputs += [t for t in (pb.get_input_tensor_by_name(request, n) for n in LANGUAGE_INPUTS) if t is not None]
        wanted = [n for n in request.requested_output_names() if n in OUTPUTS] or list(OUTPUTS)
        if cancelled():  # mm_language ABORTs the embeddings at once (not after the encoder's ttl_s)
            inputs.append(pb.Tensor(ABANDON_INPUT, np.array([True])))
        language = pb.InferenceRequest(model_name=self.language_model, inputs=inputs, requested_output_names=wanted,
                                       request_id=request_id)
        if not self.decoupled:
            answer = language.exec()
            error = forwarded_error(pb, answer.error()) if answer.has_error() else None
            self._final(sender, pb.InferenceResponse(output_tensors=[] if error else answer.output_tensors(),
                                                     error=error))
            return
        self._relay_stream(language, sender)

    def _relay_stream(self, language: Any, sender: Any) -> None:
        """Forward mm_language_stream's responses; the one carrying FINISH_REASON (the stream's last data
        response) goes out FINAL, since Triton drops a FINAL on an empty response by default."""
        pb = self.pb_utils
        for answer in language.exec(decoupled=True):
            if answer.has_error():
                self._final(sender, pb.InferenceResponse(error=forwarded_error(pb, answer.error())))
                return
            tensors = answer.output_tensors()
            if not tensors:
                continue
            if pb.get_output_tensor_by_name(answer, "FINISH_REASON") is not None:
                self._final(sender, pb.InferenceResponse(output_tensors=tensors))
                return
            sender.send(pb.InferenceResponse(output_tensors=tensors))
        sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    # ---- helpers -----------------------------------------------------------------------------------
    def _final(self, sender: Any, response: Any) -> None:
        try:
            sender.send(response, flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # noqa: BLE001 - the client went away
            log.info("%s: response not delivered: %s", self.instance_name, exc)

    def _unavailable(self, message: str) -> Any:
        err = self.pb_utils.TritonError
        code = getattr(err, "UNAVAILABLE", None)
        return err(message, code) if code is not None else err(message)
