"""Triton model ``mm_monolithic``: IMAGE, PROMPT, MAX_TOKENS? -> TEXT, TOKEN_IDS (no transfer)."""
from __future__ import annotations

from typing import Any

import numpy as np

from mm_triton.model_base import ModelBase
from mm_triton.conversation import read_conversation
from mm_triton.tensors import bytes_list, optional_int

from .service import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_TOKENS, MonolithicService


class MonolithicModelTriton(ModelBase):
    def setup(self) -> None:
        self.service = MonolithicService(
            self.checkpoint, self.device, name=self.instance_name,
            max_embed_tokens=self.transfer_config.max_embed_tokens,
            max_tokens_limit=self.int_param("max_tokens_limit", 1024),
            default_max_tokens=self.int_param("default_max_tokens", DEFAULT_MAX_TOKENS),
            max_image_pixels=self.int_param("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        )

    def handle(self, request: Any, request_id: str) -> list[Any]:
        pb = self.pb_utils
        images = bytes_list(pb, request, "IMAGE")
        prompt = read_conversation(pb, request, len(images))
        max_tokens = optional_int(pb, request, "MAX_TOKENS")
        out = self.service.generate(images, prompt, max_tokens, request_id)
        return [
            pb.Tensor("TEXT", np.array([out.text.encode()], dtype=np.object_)),
            pb.Tensor("TOKEN_IDS", np.array(out.token_ids, dtype=np.int64)),
        ]

    def finalize(self) -> None:
        self.service.close()
