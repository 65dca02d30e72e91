"""Language side: prompt + received image embeddings -> greedy tokens."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..chat import ChatMessages, render_chat
from ..prompt import expand_image_pads
from . import _loading
from .types import EncodedImage, tokens_from_grid

logger = logging.getLogger(__name__)

#: Upper bound on max_new_tokens accepted by generate (the context length bounds it further).
MAX_NEW_TOKENS_LIMIT = 32768


def check_max_new_tokens(max_new_tokens: object) -> int:
    """Return ``max_new_tokens`` if it is an int in [1, MAX_NEW_TOKENS_LIMIT], else raise ValueError."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or not (1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT)
    ):
        raise ValueError(f"max_new_tokens must be an int in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens!r}")
    return max_new_tokens


class LanguageModel:
    """The language model, token embeddings and LM head of a Qwen2-VL checkpoint, plus its tokenizer.

    The vision tower's weights are never loaded (removed before the checkpoint tensors are read, see
    :mod:`mm_models.qwen2vl._loading`). Images arrive as :class:`EncodedImage` from a
    :class:`~mm_models.qwen2vl.VisionEncoder`, possibly of another process. ``generate`` is serialised
    by a lock (the HF model keeps per-call M-RoPE state), so one instance may be shared between threads.
    """

    def __init__(self, model: Any, tokenizer: Any, device: torch.device) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._device = device
        cfg = model.config
        self._image_token_id = int(cfg.image_token_id)
        self._merge_size = int(cfg.vision_config.spatial_merge_size)
        self._max_context = int(cfg.text_config.max_position_embeddings)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
    ) -> LanguageModel:
        """Load from a local checkpoint directory (never the hub). ``dtype`` None keeps the
        checkpoint's dtype. Raises ValueError for a missing or unsupported checkpoint."""
        model = _loading.load_model(path, "language", device=device, dtype=dtype)
        tokenizer = _loading.load_tokenizer(path)
        return cls(model, tokenizer, torch.device(device))

    @property
    def hidden_size(self) -> int:
        """Width of the image embeddings this model accepts."""
        return int(self._model.config.text_config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self._model.dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_context(self) -> int:
        """Most tokens (prompt incl. image tokens + new tokens) one request may use."""
        return self._max_context

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def hf_model(self) -> Any:
        """The underlying HF model (what :class:`mm_engine.LLMEngine` runs)."""
        return self._model

    def build_input_ids(self, prompt: str | ChatMessages, image_token_counts: list[int]) -> list[int]:
        """Token ids of the chat prompt (see :mod:`mm_models.prompt`) with, for each image in order,
        ``<|vision_start|>`` + ``<|image_pad|>`` * count + ``<|vision_end|>`` before the text.
        ValueError for a non-string prompt, a prompt holding vision tokens, or a count < 1."""
        if not isinstance(image_token_counts, (list, tuple)):
            raise ValueError(f"image_token_counts must be a list of ints, got {type(image_token_counts).__name__}")
        text = render_chat(self._tokenizer, prompt, len(image_token_counts))
        ids = self._tokenizer(text)["input_ids"]
        return expand_image_pads(ids, self._image_token_id, list(image_token_counts))

    def check_image(self, image: object, index: int = 0) -> EncodedImage:
        """Validate one received image embedding; ValueError naming the image on any mismatch."""
        if not isinstance(image, EncodedImage):
            raise ValueError(f"image {index}: expected an EncodedImage, got {type(image).__name__}")
        try:
            expected = tokens_from_grid(image.grid_thw, self._merge_size)
        except ValueError as e:
            raise ValueError(f"image {index}: {e}") from None
        emb = image.embeds
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
            raise ValueError(f"image {index}: embeds must be a 2-D tensor [tokens, hidden]")
        if not emb.is_floating_point():
            raise ValueError(f"image {index}: embeds must be floating point, got {emb.dtype}")
        if emb.shape[0] != expected:
            raise ValueError(
                f"image {index}: embeds has {emb.shape[0]} rows but grid_thw {tuple(image.grid_thw)} "
                f"implies {expected} tokens"
            )
        if emb.shape[1] != self.hidden_size:
            raise ValueError(
                f"image {index}: embedding width {emb.shape[1]} does not match the language "
                f"model's hidden size {self.hidden_size}"
            )
        return image

    def generate(self, prompt: str | ChatMessages, images: Sequence[EncodedImage], max_new_tokens: int) -> list[int]:
        """Greedy decoding; returns only the NEW token ids (ending with an EOS id if one was produced).

        The prompt's token embeddings get each image's rows scattered in at its ``<|image_pad|>``
        positions (in order), and ``image_grid_thw`` drives Qwen2-VL's M-RoPE positions, so the result
        equals the monolithic model's ``generate`` on the same image and prompt.
        Raises ValueError for invalid images (row count vs grid, width), prompt or lengths.
        """
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list of EncodedImage, got {type(images).__name__}")
        imgs = [self.check_image(im, i) for i, im in enumerate(images)]
        ids = self.build_input_ids(prompt, [im.num_tokens for im in imgs])
        if len(ids) + max_new_tokens > self._max_context:
            raise ValueError(
                f"request needs {len(ids)} prompt tokens + {max_new_tokens} new tokens, more than "
                f"the model's context of {self._max_context}"
            )
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
        }
        with self._lock, torch.inference_mode():
            if imgs:
                kwargs.update(self._image_inputs(input_ids, imgs))
            out = self._model.generate(**kwargs)
        new = out[0, len(ids) :].tolist()
        logger.debug("generated %d tokens for %d prompt tokens and %d images", len(new), len(ids), len(imgs))
        return new

    def _image_inputs(self, input_ids: torch.Tensor, imgs: list[EncodedImage]) -> dict[str, Any]:
        """inputs_embeds with image rows scattered in, plus image_grid_thw and mm_token_type_ids."""
        embed = self._model.get_input_embeddings()
        inputs_embeds = embed(input_ids)
        image_mask = input_ids == self._image_token_id
        rows = torch.cat([im.embeds.to(device=self._device, dtype=inputs_embeds.dtype) for im in imgs], dim=0)
        inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(inputs_embeds), rows)
        grid = torch.tensor([list(im.grid_thw) for im in imgs], dtype=torch.long, device=self._device)
        return {
            "inputs_embeds": inputs_embeds,
            "image_grid_thw": grid,
            "mm_token_type_ids": image_mask.to(torch.int32),
        }

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens (EOS etc.) removed."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)
