"""Header-level bounds of a client request, checked before any decoding, encoding or allocation.

Every model a client can reach (``mm_pipeline``, ``mm_pipeline_stream``, the language server's ``mm_pipeline``
and the ``mm_monolithic`` baseline) calls :func:`check_request` first, so the limits and the messages are the
same everywhere. Only facts readable without decoding are used: sizes of the raw inputs, the image count,
each image's width x height from its header. What needs the decoded image or the tokenizer (tokens per image,
the pool fit, the context) is checked by the encoder and the language model, still before any vision work.

    limit                 default    parameter / MM_<NAME>
    images per request    16         (fixed, as mm_encoder and mm_language)
    bytes per image       32 MiB     max_image_bytes
    bytes of the request  64 MiB     max_request_bytes (every input together)
    pixels per image      64 M       max_image_pixels (from the header)
    prompt / messages     128 KiB    max_prompt_bytes (raw bytes, before UTF-8 decoding)
    MAX_TOKENS            [1, 1024]  max_tokens_limit
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from mm_models.data_url import unwrap_data_url

MAX_IMAGES_PER_REQUEST = 16
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DEFAULT_MAX_PROMPT_BYTES = 128 * 1024
DEFAULT_MAX_TOKENS_LIMIT = 1024
TEXT_INPUTS = ("PROMPT", "MESSAGES")


@dataclass(frozen=True)
class RequestBounds:
    max_images: int = MAX_IMAGES_PER_REQUEST
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_params(cls, int_param: Callable[[str, int], int]) -> RequestBounds:
        """From a model's parameters through ``ModelBase.int_param`` (``MM_<NAME>`` env first)."""
        return cls(
            max_image_bytes=int_param("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES),
            max_request_bytes=int_param("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
            max_image_pixels=int_param("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            max_prompt_bytes=int_param("max_prompt_bytes", DEFAULT_MAX_PROMPT_BYTES),
            max_tokens_limit=int_param("max_tokens_limit", DEFAULT_MAX_TOKENS_LIMIT),
        )


def _raw(pb: Any, request: Any, name: str) -> np.ndarray | None:
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _nbytes(array: np.ndarray) -> int:
    if array.dtype == np.object_:
        return sum(len(x) if isinstance(x, (bytes, bytearray)) else len(str(x)) for x in array.reshape(-1))
    return int(array.nbytes)


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header, or None when the header does not parse (the decoder
    then names the problem). Pillow reads only the header here; no pixel is decoded."""
    try:
        with Image.open(io.BytesIO(bytes(data))) as header:
            return header.size
    except Image.DecompressionBombError as exc:  # Pillow's own limit, from the header too
        raise ValueError(f"image is too large to decode safely: {exc}") from None
    except Exception:  # noqa: BLE001 - corrupt or unknown data is reported by decode_image
        return None


def check_images(images: list[bytes], bounds: RequestBounds) -> None:
    if len(images) > bounds.max_images:
        raise ValueError(f"IMAGE: at most {bounds.max_images} images per request, got {len(images)}")
    for i, data in enumerate(images):
        if len(data) > bounds.max_image_bytes:
            raise ValueError(f"IMAGE[{i}]: {len(data)} bytes, more than max_image_bytes={bounds.max_image_bytes}")
    for i, data in enumerate(images):
        try:
            size = header_size(unwrap_data_url(data, i))
        except ValueError as exc:
            raise ValueError(f"IMAGE[{i}]: {exc}") from None
        if size is not None and size[0] * size[1] > bounds.max_image_pixels:
            raise ValueError(
                f"IMAGE[{i}]: image is {size[0]}x{size[1]} = {size[0] * size[1]} pixels, more than "
                f"the allowed {bounds.max_image_pixels}"
            )


def check_request(
    pb: Any, request: Any, bounds: RequestBounds, input_names: tuple[str, ...], require_image: bool = True
) -> None:
    """ValueError (INVALID_ARG) naming the first input that breaks a bound; ``input_names`` are the inputs the
    model declares (their bytes are summed)."""
    arrays = {name: _raw(pb, request, name) for name in input_names}
    total = sum(_nbytes(a) for a in arrays.values() if a is not None)
    if total > bounds.max_request_bytes:
        raise ValueError(f"request: {total} bytes of inputs, more than max_request_bytes={bounds.max_request_bytes}")
    image = arrays.get("IMAGE")
    if image is None and require_image:
        raise ValueError("input IMAGE is required (one or more encoded images)")
    if image is not None:
        if image.dtype != np.object_:
            raise ValueError(f"input IMAGE must be BYTES, got {image.dtype}")
        check_images(
            [bytes(x) if isinstance(x, (bytes, bytearray)) else str(x).encode() for x in image.reshape(-1)], bounds
        )
    texts = [name for name in TEXT_INPUTS if arrays.get(name) is not None]
    if not texts:
        raise ValueError("input PROMPT is required (or MESSAGES, a chat)")
    for name in texts:
        if _nbytes(arrays[name]) > bounds.max_prompt_bytes:
            raise ValueError(f"{name}: longer than max_prompt_bytes={bounds.max_prompt_bytes} bytes")
    max_tokens = arrays.get("MAX_TOKENS")
    if max_tokens is not None and max_tokens.size == 1 and np.issubdtype(max_tokens.dtype, np.integer):
        value = int(max_tokens.reshape(-1)[0])
        if not 1 <= value <= bounds.max_tokens_limit:
            raise ValueError(f"MAX_TOKENS: must be in [1, {bounds.max_tokens_limit}], got {value}")
