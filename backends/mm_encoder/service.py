"""The encoder service: decode, validate, encode and publish images; no Triton inside."""

from __future__ import annotations

import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from mm_models.data_url import unwrap_data_url
from mm_models.geometry import ImageGeometry
from mm_models.images import decode_image
from mm_models.qwen2vl import VisionEncoder
from mm_triton.phases import Phase, PhaseClock
from mmtransfer import (
    BlockPool,
    ConfigError,
    EmbedRef,
    RequestTooLarge,
    SenderEndpoint,
    TransferCancelled,
    TransferConfig,
    TransferObserver,
)

from .batch_runner import BatchRunner
from .batcher import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_DELAY_MS, EncodeBatcher, EncodeJob, PreparedImage
from .cache import EmbeddingCache, image_key

log = logging.getLogger(__name__)
MAX_IMAGES_PER_REQUEST = 16
# Header-checked before decoding: bigger files are refused as decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
MAX_ENCODE_THREADS = 16


def default_encode_threads(device: str) -> int:
    """Threads preprocessing the images of one request: 4 on a GPU (the CPU is otherwise idle), 1 on the
    CPU (torch's intra-op threads already use every core)."""
    return 4 if str(device).startswith("cuda") else 1


def _check_config(name: str, config: TransferConfig, encode_threads: int) -> None:
    """ConfigError at load time for a pool that cannot hold one largest embedding, or bad thread counts."""
    if config.max_embed_blocks > config.pool_blocks:
        raise ConfigError(
            f"{name}: pool_blocks={config.pool_blocks} x block_tokens={config.block_tokens} cannot hold one "
            f"embedding of max_embed_tokens={config.max_embed_tokens} (the largest image after resizing to "
            "the budget); raise pool_blocks, or lower max_pixels / max_embed_tokens"
        )
    if not 0 <= encode_threads <= MAX_ENCODE_THREADS:
        raise ConfigError(
            f"{name}: encode_threads must be in [0, {MAX_ENCODE_THREADS}] (0 = automatic), got {encode_threads}"
        )


def _make_pool(config: TransferConfig, vision: VisionEncoder, device: str, name: str) -> BlockPool:
    """The encoder's block pool, shaped by the transfer config and the tower's output."""
    return BlockPool(
        config.pool_blocks,
        config.block_tokens,
        vision.hidden_size,
        vision.dtype,
        device,
        block_allocator=config.use_block_allocator,
        slot_blocks=config.max_embed_blocks,
        name=f"{name}-pool",
    )


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
        max_encode_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_encode_delay_ms: float = DEFAULT_MAX_DELAY_MS,
    ) -> None:
        """``geometry``: the serving budget (:func:`mm_triton.image_budget.resolve_image_geometry`); None
        applies ``config.max_embed_tokens`` to the checkpoint's processor bounds. ``on_downscaled(n)``: told
        how many images of a request were shrunk to fit the budget (a metric). ``max_encode_batch_tokens``
        and ``max_encode_delay_ms`` bound one tower call over several requests' images (batcher.py)."""
        _check_config(name, config, encode_threads)
        self.config = config
        self.max_image_pixels = max_image_pixels
        self.encode_threads = encode_threads or default_encode_threads(device)
        self._device = torch.device(device)
        threads = self.encode_threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"{name}-encode") if threads > 1 else None
        # without an explicit budget, images are resized to what the pool config accepts
        self.geometry = geometry or ImageGeometry.from_model_dir(checkpoint).with_budget(config.max_embed_tokens)
        self._on_downscaled = on_downscaled
        self.vision = VisionEncoder.from_pretrained(checkpoint, device=device, geometry=self.geometry)
        self.pool = _make_pool(config, self.vision, device, name)
        self.sender = SenderEndpoint(self.pool, config, observer=observer, name=name)
        self.cache = EmbeddingCache(self.pool, min(cache_blocks, config.pool_blocks))
        self.runner = BatchRunner(self.vision, self.sender, self.cache, self._device)
        self._batcher = EncodeBatcher(
            self.runner.run,
            max_encode_batch_tokens,
            max_encode_delay_ms / 1e3,
            name,
            lambda: TransferCancelled(f"{name} is closing"),
        )
        log.info(
            "%s: checkpoint %s on %s, pool %d x %d tokens (%s), control %s, %d encode thread(s)",
            name,
            checkpoint,
            device,
            config.pool_blocks,
            config.block_tokens,
            "blocks" if config.use_block_allocator else "fixed slots",
            self.sender.address,
            self.encode_threads,
        )

    def encode(
        self, images: Sequence[bytes], request_id: str = "", cancelled: Callable[[], bool] | None = None
    ) -> list[EmbedRef]:
        """Encode every image of one request and wait; returns one EMBED_REF per image, in prompt order.
        The same path as :meth:`submit` (the images go through the tower with other requests' images)."""
        done = threading.Event()
        result: dict[str, Any] = {}

        def answer(refs: list[EmbedRef] | None, error: BaseException | None, _clock: PhaseClock) -> None:
            result.update(refs=refs, error=error)
            done.set()

        self.submit(images, answer, request_id, cancelled)
        done.wait()
        if result["error"] is not None:
            raise result["error"]
        return result["refs"]

    def submit(
        self,
        images: Sequence[bytes],
        done: Callable[[list[EmbedRef] | None, BaseException | None, PhaseClock], None],
        request_id: str = "",
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """Check, decode and preprocess one request's images on the calling thread, then queue them for the
        batcher thread, which runs the tower over them together with other requests' images, publishes them
        and calls ``done(refs, None, clock)`` (or ``done(None, error, clock)``) exactly once, from its thread
        or (a text-only request) this one. Bad input raises here, before anything is queued or held.

        All images are decoded and their token counts checked before any vision work, so a bad image costs
        nothing. A request whose images together need more blocks than the whole pool is refused at once
        (RequestTooLarge) instead of waiting ``alloc_timeout_s`` for space that cannot come. ``cancelled``
        (optional) is asked before the vision work and after publishing: a cancelled request publishes
        nothing (TransferCancelled). If anything fails, every embedding of the request that was published is
        dropped again (nothing stays allocated)."""
        clock = PhaseClock()
        if not images:  # a text-only request: nothing to encode, no EMBED_REF
            done([], None, clock)
            return
        with clock.measure(Phase.IMAGE_DECODE):
            prepared = self._decode_and_check(images)
        with clock.measure(Phase.PREPROCESS):
            self._preprocess(prepared)
        job = EncodeJob(
            request_id, prepared, cancelled or (lambda: False), lambda refs, error: done(refs, error, clock), clock
        )
        self._batcher.submit(job)

    def _decode_and_check(self, images: Sequence[bytes]) -> list[PreparedImage]:
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"IMAGE: at most {MAX_IMAGES_PER_REQUEST} images per request, got {len(images)}")
        images = [unwrap_data_url(data, i) for i, data in enumerate(images)]  # KServe JSON clients
        # cheap header checks of every image before decoding any, then whether the pool can ever hold them
        header_tokens = [self._check_header(i, data) for i, data in enumerate(images)]
        if all(t is not None for t in header_tokens):
            self._check_fits(
                [
                    (t, image_key(data) if self.cache.enabled else str(i))
                    for i, (t, data) in enumerate(zip(header_tokens, images))
                ]
            )
        prepared: list[PreparedImage] = []
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
            prepared.append(PreparedImage(image, image_key(data) if self.cache.enabled else "", tokens))
        self._check_fits([(im.tokens, im.key or str(i)) for i, im in enumerate(prepared)])
        downscaled = sum(self.geometry.downscales(im.image.width, im.image.height) for im in prepared)
        if downscaled and self._on_downscaled is not None:
            self._on_downscaled(downscaled)
        return prepared

    def _preprocess(self, prepared: list[PreparedImage]) -> None:
        """Pixels for every image the cache probably lacks (a hit needs none; a miss found later by the
        batcher is preprocessed there), in parallel with ``encode_threads`` > 1."""
        todo = [im for im in prepared if not (im.key and self.cache.contains(im.key))]
        if self._executor is not None and len(todo) > 1:
            results = list(self._executor.map(lambda im: self.vision.preprocess(im.image), todo))
        else:
            results = [self.vision.preprocess(im.image) for im in todo]
        for im, inputs in zip(todo, results):
            im.inputs, im.image = inputs, None

    def _count_tokens(self, index: int, image: Image.Image) -> int:
        """Tokens the processor makes of a decoded image; ValueError naming the image when it refuses it."""
        try:
            return self.vision.count_tokens(image)
        except ValueError as exc:
            raise ValueError(f"IMAGE[{index}]: {image.width}x{image.height} cannot be preprocessed: {exc}") from None

    def _check_header(self, index: int, data: bytes) -> int | None:
        """The tokens an image will give, from its header alone (the EXIF rotation does not change the count
        of a token grid), so that an image or a request that can never be served is refused before pixels are
        decoded (16 8000x8000 PNGs of a few hundred KiB each would otherwise cost seconds and GiBs). None when
        the header parser does not like it: ``decode_image`` then names the problem."""
        try:
            with Image.open(io.BytesIO(bytes(data))) as header:  # parses the header only
                width, height = header.size
                if width * height > self.max_image_pixels:
                    return None  # decode_image refuses it with its own message, still before decoding
                tokens = max(self.vision.count_tokens(header), self.geometry.tokens_for(height, width))
        except Exception:  # noqa: BLE001 - decode_image reports corrupt or unknown data clearly
            return None
        if tokens > self.config.max_embed_tokens:
            raise RequestTooLarge(
                f"IMAGE[{index}]: {width}x{height} gives {tokens} embedding tokens, more than the "
                f"configured maximum max_embed_tokens={self.config.max_embed_tokens}"
            )
        return tokens

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
                    "send fewer or smaller images, or raise pool_blocks"
                )
        else:
            slots = getattr(self.pool.allocator, "num_slots", len(unique))
            if len(unique) > slots:
                raise RequestTooLarge(
                    f"IMAGE: the request's {len(unique)} images need more fixed slots than the "
                    f"encoder's pool has ({slots})"
                )

    def close(self) -> None:
        self._batcher.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.sender.close()
        self.cache.clear()
