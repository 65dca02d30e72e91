"""Boundary checks: a request at submit, and the images a loader produced. EngineError INVALID,
naming the input."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mm_models.qwen2vl import EncodedImage, tokens_from_grid

from .api import EngineError, ErrorCause, GenerationRequest, ImageLoader, SamplingParams


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against."""

    vocab_size: int
    image_token_id: int
    hidden_size: int
    merge_size: int
    max_seq_len: int  # per KV slot (prompt + new tokens)


def _invalid(request_id: object, message: str) -> EngineError:
    return EngineError(ErrorCause.INVALID, f"request {request_id!r}: {message}")


def pad_runs(prompt_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Lengths of the consecutive runs of ``image_token_id`` in the prompt, in order."""
    runs: list[int] = []
    previous = None
    for tok in prompt_ids:
        if tok == image_token_id:
            if previous == image_token_id:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = tok
    return runs


def check_request(request: object, limits: ModelLimits) -> GenerationRequest:
    """Validate a submitted request; EngineError(INVALID) naming the problem."""
    if not isinstance(request, GenerationRequest):
        raise _invalid(None, f"expected a GenerationRequest, got {type(request).__name__}")
    rid = request.request_id
    if not isinstance(rid, str) or not rid:
        raise _invalid(rid, "request_id must be a non-empty string")
    if not isinstance(request.sampling, SamplingParams):
        raise _invalid(rid, "sampling must be a SamplingParams")
    ids = request.prompt_ids
    if not isinstance(ids, list) or not ids:
        raise _invalid(rid, "prompt_ids must be a non-empty list of token ids")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < limits.vocab_size for t in ids):
        raise _invalid(rid, f"prompt_ids must be ints in [0, {limits.vocab_size})")
    counts = list(request.image_token_counts)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise _invalid(rid, "image_token_counts must be ints >= 1")
    runs = pad_runs(ids, limits.image_token_id)
    if runs != counts:
        raise _invalid(rid, f"image_token_counts {counts} do not match the prompt's image pad runs {runs}")
    if counts and not isinstance(request.images, ImageLoader):
        raise _invalid(rid, f"{len(counts)} images in the prompt but no ImageLoader")
    need = len(ids) + request.sampling.max_tokens
    if need > limits.max_seq_len:
        raise _invalid(
            rid,
            f"{len(ids)} prompt tokens + max_tokens {request.sampling.max_tokens} = {need} "
            f"exceeds the engine's max_seq_len {limits.max_seq_len}",
        )
    if request.deadline is not None and (
        isinstance(request.deadline, bool)
        or not isinstance(request.deadline, (int, float))
        or not math.isfinite(request.deadline)
    ):
        raise _invalid(rid, f"deadline must be a finite time.monotonic() value, got {request.deadline!r}")
    if not callable(request.cancelled):
        raise _invalid(rid, "cancelled must be a callable")
    return request


def check_images(request: GenerationRequest, images: object, limits: ModelLimits) -> list[EncodedImage]:
    """Validate what the loader returned against the request's image_token_counts."""
    rid = request.request_id
    counts = list(request.image_token_counts)
    if not isinstance(images, list) or len(images) != len(counts):
        n = len(images) if isinstance(images, list) else type(images).__name__
        raise _invalid(rid, f"the image loader returned {n} images, the prompt has {len(counts)}")
    for i, (im, count) in enumerate(zip(images, counts, strict=True)):
        if not isinstance(im, EncodedImage):
            raise _invalid(rid, f"image {i}: expected an EncodedImage, got {type(im).__name__}")
        emb = im.embeds
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.is_floating_point():
            raise _invalid(rid, f"image {i}: embeds must be a 2-D floating tensor [tokens, hidden]")
        try:
            expected = tokens_from_grid(im.grid_thw, limits.merge_size)
        except ValueError as e:
            raise _invalid(rid, f"image {i}: {e}") from None
        if emb.shape[0] != expected or expected != count:
            raise _invalid(
                rid,
                f"image {i}: {emb.shape[0]} rows, grid {tuple(im.grid_thw)} implies {expected}, "
                f"the prompt has {count} pads",
            )
        if emb.shape[1] != limits.hidden_size:
            raise _invalid(rid, f"image {i}: width {emb.shape[1]} != the model's hidden size {limits.hidden_size}")
    return images
