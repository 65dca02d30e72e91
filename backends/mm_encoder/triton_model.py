"""Triton model ``mm_encoder``: IMAGE (BYTES [-1]) -> EMBED_REF (BYTES [-1])."""
from __future__ import annotations

from typing import Any

import numpy as np

from mm_triton.metrics import TritonMetrics
from mm_triton.model_base import ModelBase
from mm_triton.tensors import bytes_list

from .service import DEFAULT_MAX_IMAGE_PIXELS, EncoderService


class EncoderModel(ModelBase):
    def setup(self) -> None:
        self.service = EncoderService(
            self.checkpoint, self.transfer_config, self.device, name=self.instance_name,
            max_image_pixels=self.int_param("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        )
        self.metrics = TritonMetrics(self.pb_utils, self.model_name, self.instance_name, self.service.pool)
        self.service.sender.observer = self.metrics

    def handle(self, request: Any, request_id: str) -> list[Any]:
        refs = self.service.encode(bytes_list(self.pb_utils, request, "IMAGE"), request_id)
        payload = np.array([ref.to_json().encode() for ref in refs], dtype=np.object_)
        return [self.pb_utils.Tensor("EMBED_REF", payload)]

    def finalize(self) -> None:
        self.service.close()
