"""A generated demo image, so a demo needs no files."""

from __future__ import annotations

import io

DEMO_SIZE = (1024, 768)  # an ordinary photo size


#: Ordinary photo sizes (width x height): webcams and old phones, laptop screens, DSLR and phone cameras
#: in both orientations, a panorama. Benchmarks and the soak cycle through them.
PHOTO_SIZES = (
    (640, 480),
    (800, 600),
    (1024, 768),
    (1280, 720),
    (1600, 1200),
    (1920, 1080),
    (2048, 1536),
    (3024, 4032),
    (4032, 3024),
    (3000, 800),
)


def demo_image(width: int = DEMO_SIZE[0], height: int = DEMO_SIZE[1], fmt: str = "JPEG", seed: int = 0) -> bytes:
    """Deterministic picture (sky, sun, a house, grass) of an ordinary photo's size, encoded as JPEG (or PNG).

    The server resizes it to its per-image budget: the tiny default model makes 4096 tokens of it (more
    than the default receive window, so a demo exercises continuations), a real Qwen2-VL about 1000.
    A non-zero ``seed`` moves the sun and adds film grain, so pictures of one size differ (caches miss)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):  # sky gradient
        t = y / max(1, height - 1)
        draw.line([(0, y), (width, y)], fill=(int(90 + 100 * t), int(150 + 80 * t), 255))
    ground = int(height * 0.7)
    draw.rectangle([0, ground, width, height], fill=(60, 160, 70))
    r = max(4, min(width, height) // 10)
    sun_x = width - 3 * r - (seed * 7919) % max(1, width - 4 * r)
    draw.ellipse([sun_x, r, sun_x + 2 * r, 3 * r], fill=(255, 215, 0))
    hx, hw, hh = width // 4, width // 4, height // 4
    draw.rectangle([hx, ground - hh, hx + hw, ground], fill=(180, 60, 50))
    draw.polygon(
        [(hx - hw // 8, ground - hh), (hx + hw // 2, ground - hh - hh // 2), (hx + hw + hw // 8, ground - hh)],
        fill=(120, 40, 30),
    )
    draw.rectangle([hx + hw // 2 - hw // 10, ground - hh // 2, hx + hw // 2 + hw // 10, ground], fill=(90, 50, 20))
    if seed:
        img = _grain(img, seed)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt.upper() in ("JPEG", "JPG") else {}))
    return buf.getvalue()


def _grain(img, seed: int):
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(seed).normal(0.0, 6.0, size=(img.height, img.width, 1))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
