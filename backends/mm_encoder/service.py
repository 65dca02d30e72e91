"""The encoder service: decode, validate, encode and publish images; no Triton inside."""
from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from mm_models.data_url import unwrap_data_url
from mm_models.geometry import ImageGeometry
from mm_models.images import decode_image
from mm_models.qwen2vl import VisionEncoder
from mmtransfer import (
    BlockPool, ConfigError, EmbedRef, RequestTooLarge, SenderEndpoint, TransferCancelled, TransferConfig,
    TransferObserver,
)

from .cache import EmbeddingCache, image_key

log = logging.getLogger(__name__)
MAX_IMAGES_PER_REQUEST = 16
# Header-checked before decoding: bigger files are refused as decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
MAX_ENCODE_THREADS = 16


def default_encode_threads(device: str) -> int:
    """Threads encoding the images of one request: 4 on a GPU (preprocessing and publishing overlap
    the vision tower), 1 on the CPU (torch's intra-op threads already use every core)."""
    return 4 if str(device).startswith("cuda") else 1


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
        encode_threads: int = 0,
        cache_blocks: int = 0,
        geometry: ImageGeometry | None = None,
        on_downscaled: Callable[[int], None] | None = None,
    ) -> None:
        """``geometry``: the serving budget (:func:`mm_triton.image_budget.resolve_image_geometry`); None
        applies ``config.max_embed_tokens`` to the checkpoint's processor bounds. ``on_downscaled(n)``: told
        how many images of a request were shrunk to fit the budget (a metric)."""
        if config.max_embed_blocks > config.pool_blocks:
            raise ConfigError(
                f"{name}: pool_blocks={config.pool_blocks} x block_tokens={config.block_tokens} cannot hold one "
                f"embedding of max_embed_tokens={config.max_embed_tokens} (the largest image after resizing to "
                "the budget); raise pool_blocks, or lower max_pixels / max_embed_tokens"
            )
        if not 0 <= encode_threads <= MAX_ENCODE_THREADS:
            raise ConfigError(f"{name}: encode_threads must be in [0, {MAX_ENCODE_THREADS}] (0 = automatic), "
                              f"got {encode_threads}")
        self.config = config
        self.max_image_pixels = max_image_pixels
        self.encode_threads = encode_threads or default_encode_threads(device)
        self._device = torch.device(device)
        self._executor = (ThreadPoolExecutor(self.encode_threads, thread_name_prefix=f"{name}-encode")
                          if self.encode_threads > 1 else None)
        # without an explicit budget, images are resized to what the pool config accepts
        self.geometry = geometry or ImageGeometry.from_model_dir(checkpoint).with_budget(config.max_embed_tokens)
        self._on_downscaled = on_downscaled
        self.vision = VisionEncoder.from_pretrained(checkpoint, device=device, geometry=self.geometry)
        self.pool = BlockPool(
            config.pool_blocks, config.block_tokens, self.vision.hidden_size, self.vision.dtype, device,
            block_allocator=config.use_block_allocator, slot_blocks=config.max_embed_blocks, name=f"{name}-pool",
        )
        self.sender = SenderEndpoint(self.pool, config, observer=observer, name=name)
        self.cache = EmbeddingCache(self.pool, min(cache_blocks, config.pool_blocks))
        log.info("%s: checkpoint %s on %s, pool %d x %d tokens (%s), control %s, %d encode thread(s)", name,
                 checkpoint, device, config.pool_blocks, config.block_tokens,
                 "blocks" if config.use_block_allocator else "fixed slots", self.sender.address,
                 self.encode_threads)

    def encode(self, images: Sequence[bytes], request_id: str = "",
               cancelled: Callable[[], bool] | None = None) -> list[EmbedRef]:
        """Encode every image of one request; returns one EMBED_REF per image, in prompt order.

        All images are decoded and their token counts checked before any vision work,
        so a bad image costs nothing. With ``encode_threads`` > 1 the images of a request
        are encoded by a thread pool: one image's preprocessing and publishing (copy into
        the pool) overlap another's vision tower (the tower itself runs one image at a
        time). If anything fails, every embedding of the request that was published is
        dropped again (nothing stays allocated), after all its images have finished.
        A request whose images together need more blocks than the whole pool is refused at
        once (RequestTooLarge) instead of waiting ``alloc_timeout_s`` for space that cannot
        come. ``cancelled`` (optional) is asked before the vision work and after publishing:
        a cancelled request publishes nothing (TransferCancelled).
        """
        if not images:  # a text-only request: nothing to encode, no EMBED_REF
            return []
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"IMAGE: at most {MAX_IMAGES_PER_REQUEST} images per request, got {len(images)}")
        decoded = self._decode_all(images)
        if cancelled is not None and cancelled():
            raise TransferCancelled(f"request {request_id or '-'} was cancelled before encoding")
        if self._executor is None or len(decoded) == 1:
            refs: list[EmbedRef] = []
            try:
                for image, key in decoded:
                    refs.append(self._encode_one(image, key, request_id))
            except BaseException:
                self._discard(refs)
                raise
        else:
            futures = [self._executor.submit(self._encode_one, image, key, request_id) for image, key in decoded]
            refs, error = [], None
            for future in futures:  # wait for every image, even after a failure: none may publish later
                try:
                    refs.append(future.result())
                except BaseException as exc:  # noqa: BLE001 - re-raised below, the first in prompt order
                    error = error or exc
            if error is not None:
                self._discard(refs)
                raise error
        if cancelled is not None and cancelled():
            self._discard(refs)
            raise TransferCancelled(f"request {request_id or '-'} was cancelled; its {len(refs)} embedding(s) dropped")
        log.debug("request %s: %d image(s) -> %s tokens", request_id, len(refs), [r.num_tokens for r in refs])
        return refs

    def _decode_all(self, images: Sequence[bytes]) -> list[tuple[Image.Image, str]]:
        """Header checks of every image, then decoding and token counts, then the pool-fit check: a bad
        image or an impossible request fails before any vision work. Returns (image, cache key) pairs."""
        images = [unwrap_data_url(data, i) for i, data in enumerate(images)]  # KServe JSON clients
        for i, data in enumerate(images):  # cheap header checks of every image before decoding any
            self._check_header(i, data)
        decoded, sizes = [], []
        for i, data in enumerate(images):
            try:
                image = decode_image(data, self.max_image_pixels)
            except ValueError as exc:
                raise ValueError(f"IMAGE[{i}]: {exc}") from None
            tokens = self._count_tokens(i, image)
            if tokens > self.config.max_embed_tokens:
                raise RequestTooLarge(
                    f"IMAGE[{i}]: {image.width}x{image.height} gives {tokens} embedding tokens, more than the "
                    f"configured maximum max_embed_tokens={self.config.max_embed_tokens}"
                )
            decoded.append((image, image_key(data) if self.cache.enabled else ""))
            sizes.append((tokens, decoded[-1][1] or str(i)))
        self._check_fits(sizes)
        downscaled = sum(self.geometry.downscales(image.width, image.height) for image, _ in decoded)
        if downscaled and self._on_downscaled is not None:
            self._on_downscaled(downscaled)
        return decoded

    def _count_tokens(self, index: int, image: Image.Image) -> int:
        """Tokens the processor makes of a decoded image; ValueError naming the image when it refuses it."""
        try:
            return self.vision.count_tokens(image)
        except ValueError as exc:
            raise ValueError(f"IMAGE[{index}]: {image.width}x{image.height} cannot be preprocessed: {exc}") from None

    def _check_header(self, index: int, data: bytes) -> None:
        """Refuse an image whose header alone shows it gives too many tokens, before its pixels are
        decoded (a 8000x8000 PNG of a few hundred KiB would otherwise cost seconds and hundreds of MiB).
        Anything the header parser does not like is left to ``decode_image``, which names the problem."""
        try:
            with Image.open(io.BytesIO(bytes(data))) as header:  # parses the header only
                width, height = header.size
                if width * height > self.max_image_pixels:
                    return  # decode_image refuses it with its own message, still before decoding
                tokens = self.vision.count_tokens(header)
        except Exception:  # noqa: BLE001 - decode_image reports corrupt or unknown data clearly
            return
        if tokens > self.config.max_embed_tokens:
            raise RequestTooLarge(
                f"IMAGE[{index}]: {width}x{height} gives {tokens} embedding tokens, more than the "
                f"configured maximum max_embed_tokens={self.config.max_embed_tokens}")

    def _check_fits(self, sizes: list[tuple[int, str]]) -> None:
        """RequestTooLarge when the request's images (the same image counted once) can never be held by
        the pool at the same time."""
        unique = dict((key, tokens) for tokens, key in sizes)
        if self.config.use_block_allocator:
            need = sum(self.pool.blocks_for(t) for t in unique.values())
            if need > self.pool.total_blocks:
                raise RequestTooLarge(
                    f"IMAGE: the request's {len(unique)} image(s) need {need} blocks of {self.pool.block_tokens} "
                    f"tokens at once, more than the encoder's whole pool (pool_blocks={self.pool.total_blocks}): "
                    "send fewer or smaller images, or raise pool_blocks")
        else:
            slots = getattr(self.pool.allocator, "num_slots", len(unique))
            if len(unique) > slots:
                raise RequestTooLarge(f"IMAGE: the request's {len(unique)} images need more fixed slots than the "
                                      f"encoder's pool has ({slots})")

    def _encode_one(self, image, key: str, request_id: str) -> EmbedRef:
        # pool threads start on cuda:0: make this instance's GPU current for anything allocated implicitly
        with torch.cuda.device(self._device) if self._device.type == "cuda" else nullcontext():
            if not key:
                encoded = self.vision.encode(image)
                return self.sender.register(encoded.embeds, {"grid_thw": list(encoded.grid_thw)}, request_id)
            entry = self.cache.acquire(key)
            if entry is None:
                encoded = self.vision.encode(image)
                extras = {"grid_thw": list(encoded.grid_thw)}
                blocks, aux = self.sender.write_blocks(encoded.embeds, extras)
                entry = self.cache.insert(key, blocks, aux.total_tokens, extras)
            else:
                log.debug("request %s: embedding cache hit %s (%d tokens)", request_id, key[:12], entry.num_tokens)
            try:
                return self.sender.publish(entry.blocks, entry.num_tokens, entry.extras,
                                           lambda _blocks, e=entry: self.cache.release(e), request_id)
            except BaseException:
                self.cache.release(entry)
                raise

    def _discard(self, refs: Sequence[EmbedRef]) -> None:
        for ref in refs:
            self.sender.discard(ref.transfer_id, "request failed")

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.sender.close()
        self.cache.clear()
