"""Data passed from the encoder side to the language side."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EncodedImage:
    """One image's embedding as the language model consumes it.

    ``embeds``: [N, hidden] tensor, N = t * h * w / merge_size**2 embedding tokens (rows in the order the
    vision tower emits them, merge-block-major), hidden = the LM's hidden size.
    ``grid_thw``: the image's patch grid (t, h, w) BEFORE the spatial merge, as Qwen2-VL's
    ``image_grid_thw``; the language side needs it for the M-RoPE positions of the image tokens.
    """

    embeds: torch.Tensor
    grid_thw: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        """Number of embedding tokens (rows of ``embeds``)."""
        return int(self.embeds.shape[0])


def tokens_from_grid(grid_thw: object, merge_size: int) -> int:
    """Token count implied by a patch grid; ValueError unless it is 3 positive ints with h and w
    divisible by ``merge_size``."""
    if (
        not isinstance(grid_thw, (tuple, list))
        or len(grid_thw) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in grid_thw)
    ):
        raise ValueError(f"grid_thw must be three positive ints (t, h, w), got {grid_thw!r}")
    t, h, w = grid_thw
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid_thw {tuple(grid_thw)}: h and w must be multiples of the merge size {merge_size}")
    return t * h * w // (merge_size * merge_size)
