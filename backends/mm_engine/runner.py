"""ModelRunner: the engine's forwards over the stock Hugging Face Qwen2-VL text modules.

Nothing of the model is re-implemented: the runner calls ``model.model.language_model`` (the decoder
stack) with ``inputs_embeds``, explicit M-RoPE ``position_ids`` ``[3, B, q]``, a ready-made attention
mask per layer type (a dict, which the HF model uses as is instead of building its own) and a
:class:`~mm_engine.kv_cache.SlotKVCache` as ``cache``; then ``lm_head`` on each row's last hidden state.

- **Prefill** (one sequence, one chunk ``[start, end)`` of its prompt): the prompt's embeddings (image
  rows scattered in at the ``<|image_pad|>`` positions, as ``Qwen2VLModel.forward`` does) and M-RoPE
  positions (from the model's own ``get_rope_index``) are built once per sequence by :meth:`prepare`.
  A first chunk is plain causal attention (mask None, as in HF's own prefill); a later chunk attends
  over the cached prefix with an explicit causal mask.
- **Decode** (all B decoding rows, one token each): row b writes its token at ``lens[b]`` with position
  ``lens[b] + rope_delta[b]`` (what HF's ``generate`` uses after the prompt) and attends over
  ``[0, lens[b]]``; the mask is None when all rows have the same length (always at B = 1, so batch 1
  runs exactly HF's attention call).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mm_models.qwen2vl import EncodedImage

from .kv_cache import KVGeometry, SlotKVCache


@dataclass
class PreparedPrompt:
    """A sequence's prompt, ready to prefill: ``embeds`` [L, hidden], ``positions`` [3, L] (M-RoPE),
    ``rope_delta``: position of token i >= L is ``i + rope_delta``."""

    embeds: torch.Tensor
    positions: torch.Tensor
    rope_delta: int

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])


class ModelRunner:
    """Forwards of one Qwen2-VL model (full or language-only) over a slot KV cache."""

    def __init__(self, hf_model: Any, slots: int, max_len: int) -> None:
        cfg = hf_model.config
        text_cfg = cfg.text_config
        layer_types = list(getattr(text_cfg, "layer_types", None) or ["full_attention"])
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"the engine supports full attention only; the checkpoint has layer types "
                f"{sorted(set(layer_types))} (use_sliding_window must be false)"
            )
        self._model = hf_model
        self._mm = hf_model.model
        self._lm = hf_model.model.language_model
        self._embed = hf_model.get_input_embeddings()
        self._head = hf_model.lm_head
        self._layer_types = sorted(set(layer_types))
        self.image_token_id = int(cfg.image_token_id)
        self.vocab_size = int(text_cfg.vocab_size)
        self.hidden_size = int(text_cfg.hidden_size)
        self.max_position_embeddings = int(text_cfg.max_position_embeddings)
        self.device = self._embed.weight.device
        self.dtype = self._embed.weight.dtype
        self.cache = SlotKVCache(KVGeometry.from_text_config(text_cfg), slots, max_len, self.dtype, self.device)
        # transformers renamed past_key_values -> cache (5.2x) and added mm_token_type_ids to get_rope_index;
        # the GPU image may carry an older 5.x, so use whichever this version has
        forward_params = inspect.signature(self._lm.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        self._rope_types = "mm_token_type_ids" in inspect.signature(self._mm.get_rope_index).parameters

    # ------------------------------------------------------------------ per-sequence preparation
    def prepare(self, prompt_ids: Sequence[int], images: Sequence[EncodedImage]) -> PreparedPrompt:
        """Embeddings and M-RoPE positions of a whole prompt (runs on the loop thread, no KV use).
        ValueError when the image rows do not match the prompt's image pads."""
        ids_cpu = torch.tensor([list(prompt_ids)], dtype=torch.long)
        image_mask_cpu = ids_cpu == self.image_token_id
        n_pads = int(image_mask_cpu.sum())
        n_rows = sum(im.num_tokens for im in images)
        if n_pads != n_rows:
            raise ValueError(f"prompt has {n_pads} image pad tokens but the images have {n_rows} rows")
        grid = torch.tensor([list(im.grid_thw) for im in images], dtype=torch.long) if images else None
        extra = {"mm_token_type_ids": image_mask_cpu.to(torch.int32)} if self._rope_types else {}
        positions, deltas = self._mm.get_rope_index(ids_cpu, image_grid_thw=grid, **extra)
        with torch.inference_mode():
            ids = ids_cpu.to(self.device)
            embeds = self._embed(ids)[0]
            if images:
                rows = torch.cat([im.embeds.to(device=self.device, dtype=embeds.dtype) for im in images], dim=0)
                embeds = embeds.masked_scatter(image_mask_cpu[0].to(self.device).unsqueeze(-1).expand_as(embeds), rows)
        return PreparedPrompt(
            embeds=embeds, positions=positions[:, 0].to(self.device), rope_delta=int(deltas.reshape(-1)[0])
        )

    # ------------------------------------------------------------------ forwards
    def prefill(self, row: int, prompt: PreparedPrompt, start: int, end: int) -> torch.Tensor | None:
        """Prefill prompt tokens ``[start, end)`` into ``row``; the last chunk returns the next-token
        logits [vocab] (float32), earlier chunks None."""
        length = end - start
        mask = None
        if start > 0:  # causal over the cached prefix + this chunk
            q = torch.arange(start, end, device=self.device)[:, None]
            kv = torch.arange(end, device=self.device)[None, :]
            mask = (kv <= q).view(1, 1, length, end)
        self.cache.plan_prefill(row, start, length)
        try:
            hidden = self._forward(
                prompt.embeds[start:end].unsqueeze(0), prompt.positions[:, start:end].unsqueeze(1), mask
            )
        finally:
            self.cache.clear_plan()
        if end < prompt.length:
            return None
        return self._logits(hidden)[0]

    def decode(self, tokens: Sequence[int], lens: Sequence[int], rope_deltas: Sequence[int]) -> torch.Tensor:
        """One token for each of rows ``[0, B)``: ``tokens[b]`` goes at cache position ``lens[b]``.
        Returns logits [B, vocab] (float32)."""
        batch = len(tokens)
        dev = self.device
        lens_t = torch.tensor(list(lens), dtype=torch.long, device=dev)
        kv_len = max(lens) + 1
        mask = None
        if min(lens) != max(lens):
            mask = (torch.arange(kv_len, device=dev)[None, :] <= lens_t[:, None]).view(batch, 1, 1, kv_len)
        pos = lens_t + torch.tensor(list(rope_deltas), dtype=torch.long, device=dev)
        positions = pos.view(1, batch, 1).expand(3, batch, 1)
        with torch.inference_mode():
            embeds = self._embed(torch.tensor(list(tokens), dtype=torch.long, device=dev).view(batch, 1))
        self.cache.plan_decode(batch, lens_t, kv_len)
        try:
            hidden = self._forward(embeds, positions, mask)
        finally:
            self.cache.clear_plan()
        return self._logits(hidden)

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            out = self._lm(
                inputs_embeds=embeds,
                position_ids=positions,
                attention_mask={t: mask for t in self._layer_types},
                use_cache=True,
                **{self._cache_kw: self.cache},
            )
        return out.last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # lm_head on [B, 1, hidden], the shape HF's generate uses (logits_to_keep=1): same kernels at batch 1
        with torch.inference_mode():
            return self._head(hidden[:, -1:, :])[:, -1, :].float()

    # ------------------------------------------------------------------ slot moves
    def move_row(self, src: int, dst: int, length: int) -> None:
        with torch.inference_mode():
            self.cache.move(src, dst, length)

    def swap_rows(self, a: int, b: int, length: int) -> None:
        with torch.inference_mode():
            self.cache.swap(a, b, length)
