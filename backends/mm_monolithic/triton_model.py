"""Triton model ``mm_monolithic``: IMAGE, PROMPT and the generation inputs -> TEXT, TOKEN_IDS, FINISH_REASON,
PROMPT_TOKENS, COMPLETION_TOKENS (no transfer; the same engine as mm_language)."""

from __future__ import annotations

from typing import Any

from mm_engine.api import GenerationRequest
from mm_triton.bounds import RequestBounds, check_request
from mm_triton.engine_model import EngineModel
from mm_triton.generation_inputs import GENERATION_INPUT_NAMES, read_generation_inputs
from mm_triton.image_budget import ResizedImagesCounter
from mm_triton.phases import Phase, PhaseClock
from mm_triton.tensors import bytes_list

from .service import DEFAULT_MAX_IMAGE_PIXELS, MonolithicService

INPUTS = ("IMAGE", *GENERATION_INPUT_NAMES)


class MonolithicModelTriton(EngineModel):
    load_phase = None  # the VisionLoader reports image_decode, preprocess and vision itself
    phases_run = (
        Phase.QUEUE,
        Phase.IMAGE_DECODE,
        Phase.PREPROCESS,
        Phase.VISION,
        Phase.SLOT_WAIT,
        Phase.PREFILL,
        Phase.DECODE,
        Phase.RESPONSE,
    )

    def setup(self) -> None:
        self.setup_engine_model()
        self.service = MonolithicService(
            self.checkpoint,
            self.params,
            self.device,
            name=self.instance_name,
            max_image_pixels=self.int_param("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            engine_observer=self.engine_metrics,
            geometry=self.image_geometry,
            on_downscaled=ResizedImagesCounter(self.pb_utils, self.model_name, self.instance_name),
        )
        self.engine = self.service.engine
        self.bounds = RequestBounds.from_params(self.int_param)

    def build_request(self, request: Any, request_id: str, arrived: float) -> GenerationRequest:
        # the pipeline's bounds and messages, from raw sizes and image headers, before any decoding
        check_request(self.pb_utils, request, self.bounds, INPUTS)
        images = bytes_list(self.pb_utils, request, "IMAGE")
        clock = PhaseClock()
        decoded, counts = self.service.check_images(images, clock)  # image errors first, as the pipeline's
        inputs = read_generation_inputs(self.pb_utils, request, self.limits, arrived)
        return self.service.build_request(
            request_id,
            decoded,
            counts,
            inputs.prompt,
            inputs.sampling,
            inputs.deadline,
            clock,
            lambda c: self.phase_metrics.observe(request_id, c.seconds),
        )
