"""Triton model ``mm_language``: EMBED_REF, PROMPT or MESSAGES, MAX_TOKENS? -> TEXT, TOKEN_IDS."""
from __future__ import annotations

from typing import Any

import numpy as np

from mm_triton.metrics import TritonMetrics
from mm_triton.model_base import ModelBase
from mm_triton.conversation import read_conversation
from mm_triton.tensors import bytes_list, optional_int

from .service import DEFAULT_MAX_PROMPT_BYTES, DEFAULT_MAX_TOKENS, LanguageService


class LanguageModelTriton(ModelBase):
    def setup(self) -> None:
        self.service = LanguageService(
            self.checkpoint, self.transfer_config, self.device, name=self.instance_name,
            max_tokens_limit=self.int_param("max_tokens_limit", 1024),
            default_max_tokens=self.int_param("default_max_tokens", DEFAULT_MAX_TOKENS),
            max_prompt_bytes=self.int_param("max_prompt_bytes", DEFAULT_MAX_PROMPT_BYTES),
        )
        self.metrics = TritonMetrics(self.pb_utils, self.model_name, self.instance_name, self.service.pool)
        self.service.receiver.observer = self.metrics

    def handle(self, request: Any, request_id: str) -> list[Any]:
        pb = self.pb_utils
        refs = bytes_list(pb, request, "EMBED_REF")
        try:
            prompt = read_conversation(pb, request, len(refs))
            max_tokens = optional_int(pb, request, "MAX_TOKENS")
        except ValueError:
            self.service.abort_all(refs, "request rejected")
            raise
        out = self.service.generate(refs, prompt, max_tokens, request_id, self.cancellation_check(request))
        return [
            pb.Tensor("TEXT", np.array([out.text.encode()], dtype=np.object_)),
            pb.Tensor("TOKEN_IDS", np.array(out.token_ids, dtype=np.int64)),
        ]

    def finalize(self) -> None:
        self.service.close()
