"""SlotKVCache: the engine's preallocated KV cache, one slot (row) of ``max_len`` tokens per sequence.

Layout: per layer one K and one V tensor ``[slots, kv_heads, max_len, head_dim]``, allocated once at
load, so the engine can never run out of memory mid-request (admission only lets in a sequence whose
prompt + max_tokens fits a slot).

Why slots and not paged blocks: the engine runs Hugging Face's own Qwen2-VL modules with torch sdpa, no
custom kernels. sdpa needs each sequence's keys contiguous; a paged cache would need a gather of every
sequence's blocks per layer per step (a copy of the whole live KV each step) or a paged-attention
kernel. With slots a decode step reads the view ``[:B, :, :Lmax]`` of the dense rows (see
:mod:`mm_engine.slots`) with a per-row boolean mask, and writes one token per row with one index_put.
The price is memory reserved for the worst case: every slot holds ``max_len`` tokens whatever its
sequence uses. For Qwen2-VL-2B (28 layers, 2 KV heads, head_dim 128) a token costs
28 * 2 (K, V) * 2 * 128 * 2 bytes (bf16) = 28 KiB, so 32 slots x 4096 tokens = 3.5 GiB; paged blocks
would let the same memory hold more sequences of typical (shorter) length, which matters below ~16 GiB
of free memory, not on an H200.

The object doubles as the ``cache`` argument of the HF text model: its attention layers call
:meth:`update` with the new keys/values of the step, and get back the keys/values to attend over.
:meth:`plan_prefill` / :meth:`plan_decode` say, before each forward, where those rows go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVGeometry:
    """Shape of the cache; ``bytes_per_token`` across all layers, K and V."""

    num_layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.num_layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_text_config(cls, cfg: Any) -> KVGeometry:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(num_layers=int(cfg.num_hidden_layers), kv_heads=int(cfg.num_key_value_heads), head_dim=int(head_dim))


class SlotKVCache:
    """Preallocated slot cache; also the per-forward ``cache`` object handed to the HF modules."""

    def __init__(
        self, geometry: KVGeometry, slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        shape = (slots, geometry.kv_heads, max_len, geometry.head_dim)
        self.geometry = geometry
        self.slots = slots
        self.max_len = max_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(geometry.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(geometry.num_layers)]
        self._plan: tuple[Any, ...] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ------------------------------------------------------------------ plans (one per forward)
    def plan_prefill(self, row: int, start: int, length: int) -> None:
        """Next forward: one sequence in ``row`` adds ``length`` tokens at positions ``[start, start+length)``
        and attends over ``[0, start+length)``."""
        if start < 0 or length < 1 or start + length > self.max_len or not 0 <= row < self.slots:
            raise ValueError(f"prefill plan out of range: row {row}, start {start}, length {length}")
        self._plan = ("prefill", row, start, length)

    def plan_decode(self, batch: int, positions: torch.Tensor, kv_len: int) -> None:
        """Next forward: rows ``[0, batch)`` each add one token at ``positions[row]`` (a long tensor on
        the cache's device) and attend over ``[0, kv_len)`` (masked per row by the caller)."""
        if not 1 <= batch <= self.slots or not 1 <= kv_len <= self.max_len:
            raise ValueError(f"decode plan out of range: batch {batch}, kv_len {kv_len}")
        rows = torch.arange(batch, device=positions.device)
        self._plan = ("decode", batch, rows, positions, kv_len)

    def clear_plan(self) -> None:
        self._plan = None

    # ------------------------------------------------------------------ HF Cache protocol (the used part)
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values ``[b, kv_heads, q, head_dim]``; return the ones to attend over."""
        if self._plan is None:
            raise RuntimeError("SlotKVCache.update without a plan")
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._plan[0] == "prefill":
            _, row, start, length = self._plan
            k[row, :, start : start + length] = key_states[0]
            v[row, :, start : start + length] = value_states[0]
            end = start + length
            return k[row : row + 1, :, :end], v[row : row + 1, :, :end]
        _, batch, rows, positions, kv_len = self._plan
        # advanced indices split by a slice: the indexed shape is [batch, kv_heads, head_dim]
        k[rows, :, positions] = key_states[:, :, 0]
        v[rows, :, positions] = value_states[:, :, 0]
        return k[:batch, :, :kv_len], v[:batch, :, :kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Older transformers read it to build ``cache_position``, which only feeds mask building
        (bypassed: the runner passes its own masks) and ``update``'s kwargs (ignored here)."""
        return 0

    # ------------------------------------------------------------------ row moves (see slots.Move)
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` tokens of row ``src`` onto row ``dst``."""
        if length <= 0 or src == dst:
            return
        for t in self.keys + self.values:
            t[dst, :, :length] = t[src, :, :length]

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first ``length`` tokens of rows ``a`` and ``b``."""
        if length <= 0 or a == b:
            return
        for t in self.keys + self.values:
            tmp = t[a, :, :length].clone()
            t[a, :, :length] = t[b, :, :length]
            t[b, :, :length] = tmp
