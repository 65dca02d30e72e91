"""Triton models ``mm_language`` (one answer) and ``mm_language_stream`` (decoupled: one answer per token).

Inputs: EMBED_REF, PROMPT and the generation inputs of :mod:`mm_triton.generation_inputs`.
Outputs: TEXT, TOKEN_IDS, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS (the stream: deltas, the last three
on its FINAL response).
"""

from __future__ import annotations

import logging
from typing import Any

from mm_engine.api import GenerationRequest
from mm_triton.access import ABANDON_INPUT, InternalGate
from mm_triton.cancel_board import CancelBoard, read_cancel_key
from mm_triton.engine_model import EngineModel
from mm_triton.generation_inputs import read_generation_inputs
from mm_triton.metrics import TritonMetrics
from mm_triton.phases import Phase
from mm_triton.tensors import bytes_list
from mmtransfer import TransferCancelled

from .service import MAX_IMAGES_PER_REQUEST, LanguageService
from .trust import TrustedEndpoints

log = logging.getLogger(__name__)


class LanguageModelTriton(EngineModel):
    load_phase = Phase.TRANSFER  # the engine's image load is the pull of the EMBED_REFs
    phases_run = (Phase.QUEUE, Phase.TRANSFER, Phase.SLOT_WAIT, Phase.PREFILL, Phase.DECODE, Phase.RESPONSE)

    def setup(self) -> None:
        self.setup_engine_model()
        self.service = LanguageService(
            self.checkpoint,
            self.transfer_config,
            self.params,
            self.device,
            name=self.instance_name,
            engine_observer=self.engine_metrics,
        )
        self.metrics = TritonMetrics(self.pb_utils, self.model_name, self.instance_name, self.service.pool)
        self.service.receiver.observer = self.metrics
        self.engine = self.service.engine
        self.gate = InternalGate.for_model(self.model_name, self.params, self.transfer_config.shared_secret)
        self.trust = TrustedEndpoints.for_model(self.params)
        self.cancel_board = CancelBoard.of_this_server()

    def build_request(self, request: Any, request_id: str, arrived: float) -> GenerationRequest:
        self.gate.check(self.pb_utils, request)  # before any input is read: a stranger's refs are never used
        refs = bytes_list(self.pb_utils, request, "EMBED_REF")
        if len(refs) > MAX_IMAGES_PER_REQUEST:  # before parsing any
            raise ValueError(f"EMBED_REF: at most {MAX_IMAGES_PER_REQUEST} per request, got {len(refs)}")
        self.trust.check(refs)  # a stranger's endpoint is refused before any connection
        if self.pb_utils.get_input_tensor_by_name(request, ABANDON_INPUT) is not None:
            raise TransferCancelled(f"request {request_id} was cancelled between the pipeline's steps")
        inputs = read_generation_inputs(self.pb_utils, request, self.limits, arrived)
        return self.service.build_request(request_id, refs, inputs.prompt, inputs.sampling, inputs.deadline)

    def caller_cancelled(self, request: Any):
        """The pipeline's cancellation of this step, posted on this server's board (a BLS call cannot be
        cancelled in Triton 2.51). Read after the gate: only the pipeline's requests get here."""
        key = read_cancel_key(self.pb_utils, request)
        return None if key is None else self.cancel_board.probe(key, self.cancel_probe_s)

    def abandon(self, request: Any, reason: str) -> None:
        if not self.gate.allows(self.pb_utils, request):
            return  # a direct caller's refs are not ours to abort (and may name any address)
        try:
            refs = bytes_list(self.pb_utils, request, "EMBED_REF")
        except ValueError:
            return
        self.service.abort_all(self.trust.only_trusted(refs[:MAX_IMAGES_PER_REQUEST]), reason)

    def finalize(self) -> None:
        try:
            super().finalize()
        finally:
            self.service.receiver.close()
