"""Encoder side: image -> embedding tokens with the Qwen2-VL vision tower."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..geometry import ImageGeometry
from . import _loading
from .types import EncodedImage

logger = logging.getLogger(__name__)


def _check_image(image: object) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has an empty size {image.width}x{image.height}")
    return image


class VisionEncoder:
    """The vision tower (+ patch merger) and image processor of a Qwen2-VL checkpoint.

    Only the vision weights are loaded: the language model and LM head are removed before the checkpoint
    tensors are read (see :mod:`mm_models.qwen2vl._loading`). ``encode`` is serialised by a lock, so one
    instance may be shared between threads.
    """

    def __init__(self, model: Any, image_processor: Any, device: torch.device) -> None:
        self._model = model
        self._processor = image_processor
        self._device = device
        self._merge_size = int(model.config.vision_config.spatial_merge_size)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        geometry: ImageGeometry | None = None,
    ) -> VisionEncoder:
        """Load from a local checkpoint directory (never the hub). ``dtype`` None keeps the
        checkpoint's dtype; ``geometry`` (a serving budget) sets the processor's pixel bounds.
        Raises ValueError for a missing or unsupported checkpoint."""
        model = _loading.load_model(path, "vision", device=device, dtype=dtype)
        processor = _loading.load_image_processor(path, geometry)
        if int(processor.merge_size) != int(model.config.vision_config.spatial_merge_size):
            raise ValueError("image processor merge_size does not match the vision config spatial_merge_size")
        if int(processor.patch_size) != int(model.config.vision_config.patch_size):
            raise ValueError("image processor patch_size does not match the vision config patch_size")
        return cls(model, processor, torch.device(device))

    @property
    def hidden_size(self) -> int:
        """Width of each embedding token (the language model's hidden size)."""
        return int(self._model.config.vision_config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the produced embeddings."""
        return self._model.model.visual.dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def merge_size(self) -> int:
        return self._merge_size

    @property
    def max_tokens(self) -> int:
        """Most tokens one image can give (larger images are downscaled by the processor to this)."""
        factor = int(self._processor.patch_size) * self._merge_size
        return int(self._processor.size["longest_edge"]) // (factor * factor)

    def count_tokens(self, image: Image.Image) -> int:
        """Embedding tokens ``encode(image)`` will produce, from the preprocessing geometry only (cheap;
        use it to validate against a maximum before running the tower). ValueError for images the
        processor refuses (e.g. aspect ratio above 200:1)."""
        img = _check_image(image)
        patches = self._processor.get_number_of_image_patches(img.height, img.width)
        return int(patches) // (self._merge_size * self._merge_size)

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [patches, C*T*P*P] and image_grid_thw [1, 3] for one image (CPU tensors)."""
        img = _check_image(image)
        batch = self._processor(images=[img], return_tensors="pt")
        return batch["pixel_values"], batch["image_grid_thw"]

    def encode(self, image: Image.Image) -> EncodedImage:
        """Run preprocessing and the vision tower on one image; return its embedding on this encoder's
        device, ``embeds.shape[0] == count_tokens(image)``."""
        pixel_values, grid = self.preprocess(image)
        encoded = self.encode_batch([(pixel_values, grid)])[0]
        logger.debug(
            "encoded image %dx%d -> grid %s, %d tokens", image.width, image.height, encoded.grid_thw, encoded.num_tokens
        )
        return encoded

    def encode_batch(self, inputs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[EncodedImage]:
        """One tower call for several preprocessed images (``preprocess`` outputs): their pixel_values
        and grid_thw rows are concatenated (the tower's attention is per image, by the grid), and the
        output is split back per image, in order."""
        if not inputs:
            return []
        pixels = torch.cat([pv for pv, _ in inputs], dim=0) if len(inputs) > 1 else inputs[0][0]
        grids = torch.cat([g for _, g in inputs], dim=0) if len(inputs) > 1 else inputs[0][1]
        with self._lock, torch.inference_mode():
            out = self._model.model.get_image_features(pixels.to(self._device), grids.to(self._device))
        embeds = list(out.pooler_output)  # split per image by the model (grid.prod() // merge**2 rows each)
        if len(embeds) != len(inputs):
            raise RuntimeError(f"vision tower returned {len(embeds)} embeddings for {len(inputs)} images")
        return [
            EncodedImage(embeds=e, grid_thw=tuple(int(v) for v in g.tolist()))  # type: ignore[arg-type]
            for e, g in zip(embeds, grids)
        ]
