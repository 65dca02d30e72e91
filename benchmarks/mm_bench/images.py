"""Synthetic test images for the tests and the benchmarks: deterministic images sized by pixels or by
embedding-token count (not product code: this folder is not installed).

Token arithmetic comes from the checkpoint's ``preprocessor_config.json`` through
:class:`mm_models.geometry.ImageGeometry` (no torch import). With the tiny checkpoint (4x4 pixels per
token, see :mod:`mm_models.tiny`)::

    asked tokens -> width x height (actual tokens), from image_size_for_tokens
          64 ->  32 x  32 (64)        1025 -> 128 x 132 (1056)
         256 ->  64 x  64 (256)       2049 -> 180 x 184 (2070)
        1024 -> 128 x 128 (1024)      4096 -> 256 x 256 (4096, the maximum; larger images are downscaled)
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from mm_models.geometry import ImageGeometry
from mm_models.tiny import MAX_PIXELS, MERGE_SIZE, MIN_PIXELS, PATCH_SIZE, TEMPORAL_PATCH_SIZE
from mm_params import tiny_model_dir

default_tiny_dir = tiny_model_dir  # ``$MM_TINY_MODEL``, else the tree's .cache/models/tiny-qwen2-vl

TINY_GEOMETRY = ImageGeometry(
    patch_size=PATCH_SIZE,
    merge_size=MERGE_SIZE,
    temporal_patch_size=TEMPORAL_PATCH_SIZE,
    min_pixels=MIN_PIXELS,
    max_pixels=MAX_PIXELS,
)


def geometry(model_dir: str | os.PathLike[str] | None = None) -> ImageGeometry:
    """Geometry of ``model_dir``'s image processor, or of the tiny checkpoint when None."""
    return TINY_GEOMETRY if model_dir is None else ImageGeometry.from_model_dir(model_dir)


def image_size_for_tokens(model_dir: str | os.PathLike[str] | None, tokens: int) -> tuple[int, int]:
    """(width, height) of a near-square image giving at least ``tokens`` (at most ~sqrt(tokens) more)
    embedding tokens; ValueError beyond the model's per-image maximum."""
    return geometry(model_dir).size_for_tokens(tokens)


def tokens_for_image_size(model_dir: str | os.PathLike[str] | None, width: int, height: int) -> int:
    """Embedding tokens an image of ``width x height`` gives (after the processor's resize)."""
    return geometry(model_dir).tokens_for(width, height)


def make_test_image(
    width: int | None = None,
    height: int | None = None,
    *,
    tokens: int | None = None,
    seed: int = 0,
    model_dir: str | os.PathLike[str] | None = None,
    fmt: str = "PNG",
    cell: int = 4,
) -> bytes:
    """Encoded bytes of a deterministic random image.

    Give either ``width`` and ``height`` (pixels) or ``tokens`` (size from :func:`image_size_for_tokens`
    for ``model_dir``, default the tiny checkpoint). Content: random colours in ``cell x cell`` blocks
    (compresses ~10x better than per-pixel noise, still different in every token) from ``seed``.
    ``fmt``: any Pillow format name (PNG lossless; JPEG changes pixels).
    """
    if tokens is not None:
        if width is not None or height is not None:
            raise ValueError("give either tokens or width/height, not both")
        width, height = image_size_for_tokens(model_dir, tokens)
    if width is None or height is None or width < 1 or height < 1:
        raise ValueError(f"width and height must be positive ints, got {width!r}x{height!r}")
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell!r}")
    return encode_image(random_image(width, height, seed=seed, cell=cell), fmt=fmt)


def random_image(width: int, height: int, seed: int = 0, cell: int = 4) -> Image.Image:
    """Deterministic random RGB PIL image (blocks of ``cell x cell`` pixels)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(-(-height // cell), -(-width // cell), 3), dtype=np.uint8)
    pixels = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:height, :width]
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Encode a PIL image to bytes in ``fmt``."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def token_table(
    model_dir: str | os.PathLike[str] | None = None, targets: tuple[int, ...] = (64, 256, 1024, 1025, 2049, 3001, 4096)
) -> list[tuple[int, int, int, int]]:
    """Rows (target_tokens, width, height, actual_tokens) for the given targets."""
    g = geometry(model_dir)
    rows = []
    for n in targets:
        w, h = g.size_for_tokens(n)
        rows.append((n, w, h, g.tokens_for(w, h)))
    return rows
