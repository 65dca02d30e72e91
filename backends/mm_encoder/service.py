"""The encoder service: decode, validate, encode and publish images; no Triton inside."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from mm_models.images import decode_image
from mm_models.qwen2vl import VisionEncoder
from mmtransfer import (
    BlockPool, ConfigError, EmbedRef, RequestTooLarge, SenderEndpoint, TransferConfig, TransferObserver,
)

log = logging.getLogger(__name__)
MAX_IMAGES_PER_REQUEST = 16
# Header-checked before decoding: bigger files are refused as decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


class EncoderService:
    """Owns the vision tower, this instance's block pool and its sender endpoint."""

    def __init__(
        self,
        checkpoint: str | Path,
        config: TransferConfig,
        device: str = "cpu",
        observer: TransferObserver | None = None,
        name: str = "mm_encoder",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if config.max_embed_blocks > config.pool_blocks:
            raise ConfigError(
                f"{name}: pool_blocks={config.pool_blocks} x block_tokens={config.block_tokens} cannot hold one "
                f"embedding of max_embed_tokens={config.max_embed_tokens}; raise pool_blocks"
            )
        self.config = config
        self.max_image_pixels = max_image_pixels
        self.vision = VisionEncoder.from_pretrained(checkpoint, device=device)
        self.pool = BlockPool(
            config.pool_blocks, config.block_tokens, self.vision.hidden_size, self.vision.dtype, device,
            block_allocator=config.use_block_allocator, slot_blocks=config.max_embed_blocks, name=f"{name}-pool",
        )
        self.sender = SenderEndpoint(self.pool, config, observer=observer, name=name)
        log.info("%s: checkpoint %s on %s, pool %d x %d tokens (%s), control %s", name, checkpoint, device,
                 config.pool_blocks, config.block_tokens,
                 "blocks" if config.use_block_allocator else "fixed slots", self.sender.address)

    def encode(self, images: Sequence[bytes], request_id: str = "") -> list[EmbedRef]:
        """Encode every image of one request, in order; returns one EMBED_REF per image.

        All images are decoded and their token counts checked before any vision work,
        so a bad image costs nothing; if anything fails, already-published embeddings
        are dropped again (nothing stays allocated).
        """
        if not images:
            raise ValueError("IMAGE: at least one image is required")
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"IMAGE: at most {MAX_IMAGES_PER_REQUEST} images per request, got {len(images)}")
        decoded = []
        for i, data in enumerate(images):
            try:
                image = decode_image(data, self.max_image_pixels)
                tokens = self.vision.count_tokens(image)
            except ValueError as exc:
                raise ValueError(f"IMAGE[{i}]: {exc}") from None
            if tokens > self.config.max_embed_tokens:
                raise RequestTooLarge(
                    f"IMAGE[{i}]: {image.width}x{image.height} gives {tokens} embedding tokens, more than the "
                    f"configured maximum max_embed_tokens={self.config.max_embed_tokens}"
                )
            decoded.append(image)
        refs: list[EmbedRef] = []
        try:
            for image in decoded:
                encoded = self.vision.encode(image)
                refs.append(self.sender.register(encoded.embeds, {"grid_thw": list(encoded.grid_thw)}, request_id))
        except BaseException:
            for ref in refs:
                self.sender.discard(ref.transfer_id, "request failed")
            raise
        log.debug("request %s: %d image(s) -> %s tokens", request_id, len(refs), [r.num_tokens for r in refs])
        return refs

    def close(self) -> None:
        self.sender.close()
