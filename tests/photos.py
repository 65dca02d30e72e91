"""Ordinary photos for tests and benchmarks: the sizes, formats and quirks users send (issue 10).

Pictures are smooth (gradients, shapes, mild grain) so JPEG sizes are those of real photos (hundreds of KiB
to a few MiB), not of per-pixel noise; each is deterministic for its seed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112  # 6 = the camera was turned 90 degrees clockwise (rotate on display)


def photo_pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 [height, width, 3]: a sky-to-ground gradient, a few discs and grain."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    ones = np.ones((height, width), dtype=np.float32)
    base = np.stack([(90 + 120 * y + 20 * x) * ones, (140 + 60 * y * (1 - x)) * ones, (250 - 150 * y) * ones], axis=-1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        disc = ((x - cx) ** 2 * (width / height) ** 2 + (y - cy) ** 2) < r * r
        base[disc] = rng.uniform(0, 255, size=3)
    grain = rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
    return np.clip(base + grain, 0, 255).astype(np.uint8)


def photo(width: int, height: int, fmt: str = "JPEG", seed: int = 0, orientation: int | None = None) -> bytes:
    """Encoded bytes of a ``width x height`` photo (as stored: an EXIF ``orientation`` rotates it on
    display, like a phone picture taken upright)."""
    image = Image.fromarray(photo_pixels(width, height, seed))
    buf = io.BytesIO()
    kwargs: dict = {"quality": 88} if fmt.upper() == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def photo_16bit_png(width: int, height: int, seed: int = 0) -> bytes:
    """A 16-bit greyscale PNG (scanners, medical and astronomy tools write these)."""
    grey = photo_pixels(width, height, seed).mean(axis=-1).astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    return buf.getvalue()


#: The mix the photo tests send: name -> (encoded bytes factory, displayed width x height).
def ordinary_photos() -> dict[str, tuple[bytes, tuple[int, int]]]:
    return {
        "jpeg_640x480": (photo(640, 480, seed=1), (640, 480)),
        "jpeg_1024x768": (photo(1024, 768, seed=2), (1024, 768)),
        "phone_4032x3024_exif_rotated": (photo(4032, 3024, seed=3, orientation=6), (3024, 4032)),
        "png_1344x1344": (photo(1344, 1344, fmt="PNG", seed=4), (1344, 1344)),
        "panorama_3000x200": (photo(3000, 200, seed=5), (3000, 200)),
        "strip_200x3000": (photo(200, 3000, fmt="PNG", seed=6), (200, 3000)),
        "png_16bit_800x600": (photo_16bit_png(800, 600, seed=7), (800, 600)),
    }
