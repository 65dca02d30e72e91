"""A generated demo image, so a demo needs no files."""

from __future__ import annotations

import io


DEMO_SIZE = (192, 144)


def demo_image(width: int = DEMO_SIZE[0], height: int = DEMO_SIZE[1], fmt: str = "PNG") -> bytes:
    """Deterministic picture (sky, sun, a house, grass), encoded as PNG (or JPEG).

    The default size gives the tiny default model more image tokens than the default receive window
    (so a demo exercises continuations) and a real Qwen2-VL a few dozen."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):  # sky gradient
        t = y / max(1, height - 1)
        draw.line([(0, y), (width, y)], fill=(int(90 + 100 * t), int(150 + 80 * t), 255))
    ground = int(height * 0.7)
    draw.rectangle([0, ground, width, height], fill=(60, 160, 70))
    r = max(4, min(width, height) // 10)
    draw.ellipse([width - 3 * r, r, width - r, 3 * r], fill=(255, 215, 0))
    hx, hw, hh = width // 4, width // 4, height // 4
    draw.rectangle([hx, ground - hh, hx + hw, ground], fill=(180, 60, 50))
    draw.polygon([(hx - hw // 8, ground - hh), (hx + hw // 2, ground - hh - hh // 2), (hx + hw + hw // 8, ground - hh)],
                 fill=(120, 40, 30))
    draw.rectangle([hx + hw // 2 - hw // 10, ground - hh // 2, hx + hw // 2 + hw // 10, ground], fill=(90, 50, 20))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()
