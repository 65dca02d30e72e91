"""The correctness oracle: one full Qwen2-VL model, processor-built pixels, stock ``generate``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..chat import ChatMessages, render_chat
from ..geometry import ImageGeometry
from ..prompt import IMAGE_PAD
from . import _loading
from .language import check_max_new_tokens

logger = logging.getLogger(__name__)


class MonolithicModel:
    """Vision tower and language model in one ``Qwen2VLForConditionalGeneration`` (the colocated
    baseline). Builds inputs the way ``Qwen2VLProcessor`` does: image processor -> pixel_values and
    image_grid_thw, each ``<|image_pad|>`` of the rendered prompt expanded as a string to
    ``grid.prod() // merge**2`` pads, tokenised, ``mm_token_type_ids`` = 1 on image tokens.
    ``generate`` is serialised by a lock.
    """

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, device: torch.device) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._processor = image_processor
        self._device = device
        self._image_token_id = int(model.config.image_token_id)
        self._merge_size = int(model.config.vision_config.spatial_merge_size)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        geometry: ImageGeometry | None = None,
    ) -> MonolithicModel:
        """Load the whole checkpoint from a local directory (never the hub); ``geometry`` (a serving
        budget) sets the processor's pixel bounds, as the served models apply it."""
        model = _loading.load_model(path, "full", device=device, dtype=dtype)
        processor = _loading.load_image_processor(path, geometry)
        return cls(model, _loading.load_tokenizer(path), processor, torch.device(device))

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def hf_model(self) -> Any:
        """The underlying HF model (what :class:`mm_engine.LLMEngine` runs)."""
        return self._model

    def build_inputs(self, images: Sequence[Image.Image], prompt: str | ChatMessages) -> dict[str, torch.Tensor]:
        """Model inputs for one request (what ``Qwen2VLProcessor.__call__`` would return); ``prompt`` is a
        plain prompt or a chat (:mod:`mm_models.chat`), rendered with the checkpoint's chat template."""
        text = render_chat(self._tokenizer, prompt, len(images))
        inputs: dict[str, torch.Tensor] = {}
        if images:
            for i, im in enumerate(images):
                if not isinstance(im, Image.Image):
                    raise ValueError(f"image {i}: expected a PIL.Image.Image, got {type(im).__name__}")
            pix = self._processor(images=list(images), return_tensors="pt")
            grid = pix["image_grid_thw"]
            counts = (grid.prod(-1) // (self._merge_size**2)).tolist()
            parts = text.split(IMAGE_PAD)
            text = parts[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, parts[1:], strict=True))
            inputs["pixel_values"] = pix["pixel_values"].to(self._device)
            inputs["image_grid_thw"] = grid.to(self._device)
        ids = torch.tensor([self._tokenizer(text)["input_ids"]], dtype=torch.long, device=self._device)
        inputs["input_ids"] = ids
        inputs["attention_mask"] = torch.ones_like(ids)
        if images:
            inputs["mm_token_type_ids"] = (ids == self._image_token_id).to(torch.int32)
        return inputs

    def generate(self, images: Sequence[Image.Image], prompt: str | ChatMessages, max_new_tokens: int) -> list[int]:
        """Greedy ``generate(do_sample=False)``; returns only the new token ids."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list of PIL images, got {type(images).__name__}")
        inputs = self.build_inputs(images, prompt)
        n_prompt = inputs["input_ids"].shape[1]
        with self._lock, torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return out[0, n_prompt:].tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


def monolithic_generate(
    model_dir: str | Path,
    images: Sequence[Image.Image],
    prompt: str,
    max_new_tokens: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> list[int]:
    """One-shot oracle: load the full model from ``model_dir`` and greedily generate; new ids only.
    For repeated use hold a :class:`MonolithicModel` instead."""
    return MonolithicModel.from_pretrained(model_dir, device=device, dtype=dtype).generate(
        images, prompt, max_new_tokens
    )
