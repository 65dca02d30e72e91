"""Per-row sampling inside one batch.

Greedy rows take ``argmax`` of the float32 logits (the first maximum, exactly what HF's greedy search
takes). Sampled rows apply temperature, then top-k, then top-p (nucleus, keeping at least one token),
and draw with the sequence's own ``torch.Generator`` on the CPU: the draw depends only on the row's
logits and the sequence's seed, never on the batch mates or the device's RNG.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from .api import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The sequence's generator (None for greedy); an unseeded request gets a random seed."""
    if params.greedy:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return gen


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """Next token of each row of ``logits`` [B, vocab] (float32)."""
    if logits.ndim != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(f"logits {tuple(logits.shape)} vs {len(params)} params / {len(generators)} generators")
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            if gen is None:
                raise ValueError(f"row {row}: a sampled sequence needs a generator")
            tokens[row] = sample_row(logits[row], p, gen)
    return tokens


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from ``logits`` [vocab] with temperature / top-k / top-p."""
    scores = logits.detach().to("cpu", torch.float32) / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
