"""Deterministic pictures for checks and benchmarks: real pixels, no files, no torch."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def sample_image(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A deterministic picture with a few coloured shapes on a gradient: real pixels, no file needed."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(40, 220, width, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(gradient, (height, width, 3)).astype(np.uint8).copy()
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        size = max(2, int(min(width, height) * rng.uniform(0.15, 0.4)))
        x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse((x, y, x + size, y + size), fill=color)
        draw.rectangle((width - x - size, y, width - x, y + size // 2), fill=color[::-1])
    return image
