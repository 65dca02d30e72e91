"""Safe decoding of user-supplied image bytes into RGB PIL images."""

from __future__ import annotations

import io
import logging
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: Errors Pillow raises on corrupt or truncated data while reading headers or decoding.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    struct.error,
)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, WebP, GIF, BMP, ... whatever Pillow reads) to RGB.

    Contract:
      * ``data`` must be non-empty ``bytes``/``bytearray``/``memoryview``;
      * the pixel count is read from the header and checked against ``max_pixels`` BEFORE any pixel data
        is decoded, so decompression bombs are refused cheaply; Pillow's own process-wide limit
        (``Image.MAX_IMAGE_PIXELS``) is left untouched and also applies;
      * the whole image is decoded eagerly, so truncated or corrupt data is refused here, not later;
      * the EXIF orientation is applied (as ``transformers.image_utils.load_image`` does) and the result
        is converted to RGB (alpha dropped; 16-bit grey scaled to 8 bits, where Pillow's own conversion
        would clip it to white); only the first frame of animated images is used.

    Raises ValueError with a message meant for the API user on any of these failures.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"image data must be bytes, got {type(data).__name__}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if len(data) == 0:
        raise ValueError("image data is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(bytes(data)))  # parses the header only
    except Image.DecompressionBombError as e:
        raise ValueError(f"image is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise ValueError(f"image data ({len(data)} bytes) is not in a recognised image format") from e
    except _DECODE_ERRORS as e:
        raise ValueError(f"image header is corrupt: {e}") from e
    with img:
        width, height = img.size
        fmt = img.format or "unknown"
        if width < 1 or height < 1:
            raise ValueError(f"image has an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ValueError(f"image is {width}x{height} = {width * height} pixels, more than the allowed {max_pixels}")
        try:
            img.load()
            rgb = _to_rgb(ImageOps.exif_transpose(img))
        except Image.DecompressionBombError as e:
            raise ValueError(f"image is too large to decode safely: {e}") from e
        except _DECODE_ERRORS as e:
            raise ValueError(f"image data is truncated or corrupt ({fmt} {width}x{height}): {e}") from e
    logger.debug("decoded %s image %dx%d", fmt, rgb.width, rgb.height)
    return rgb


_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any Pillow mode. 16-bit greyscale (PNG, TIFF) is scaled to 8 bits: Pillow's ``convert``
    clips values above 255, which would turn almost every 16-bit picture white."""
    if img.mode in _WIDE_GREY_MODES:
        wide = np.asarray(img.convert("I"), dtype=np.int64)
        grey = (np.clip(wide, 0, 65535) // 257).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 2-D: mode L
    return img.convert("RGB")
