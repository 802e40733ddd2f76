"""numpy/Pillow port of transformers' ``Qwen2VLImageProcessor`` (Qwen2-VL, Qwen2.5-VL) for still images.

The steps and their arithmetic follow transformers 4.57 ``models/qwen2_vl/image_processing_qwen2_vl.py`` (the slow
processor, which needs no torchvision):

1. ``smart_resize``: both edges rounded to multiples of ``patch_size * merge_size`` (28), the area brought within
   [min_pixels, max_pixels] keeping the aspect ratio as far as the rounding allows; an aspect ratio over 200 is
   refused. Pillow's ``Image.resize`` on the 8-bit RGB image with the configured filter (3 = BICUBIC), as the
   processor does through ``to_pil_image``;
2. rescale (uint8 -> float64 * factor -> float32) and normalize ``(x - mean) / std`` in float32, channels first;
3. the image is repeated to ``temporal_patch_size`` frames and cut into patches of temporal × 14 × 14, ordered in
   2 × 2 groups of neighbours (the merger's order): ``[grid_h * grid_w, 3 * 2 * 14 * 14]`` rows, with
   ``grid_thw = (1, grid_h, grid_w)`` in patches. The language model sees ``grid_h * grid_w / merge_size²`` image
   tokens for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import ImageError, PackageError
from ..images import to_rgb

__all__ = ["Qwen2VLImageConfig", "fit", "image_grid", "patchify", "preprocess", "smart_resize"]

MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class Qwen2VLImageConfig:
    """The fields of a Qwen2-VL ``preprocessor_config.json``, with the processor's defaults."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, d: Mapping) -> Qwen2VLImageConfig:
        """From preprocessor_config.json: min_pixels / max_pixels, or size.shortest_edge / longest_edge (the
        processor's names for the same pixel counts), and the patch and normalisation fields."""
        size = d.get("size") or {}
        values = {
            "min_pixels": d.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
            "max_pixels": d.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
        }
        for name in ("patch_size", "temporal_patch_size", "merge_size", "resample"):
            if d.get(name) is not None:
                values[name] = d[name]
        for name in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(name) is not None:
                values[name] = bool(d[name])
        if d.get("rescale_factor") is not None:
            values["rescale_factor"] = float(d["rescale_factor"])
        for name in ("image_mean", "image_std"):
            if d.get(name) is not None:
                if len(d[name]) != 3:
                    raise PackageError(f"qwen2-vl image processor: {name} must have 3 values, not {d[name]!r}")
                values[name] = tuple(float(x) for x in d[name])
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if not isinstance(values[name], int) or isinstance(values[name], bool) or values[name] <= 0:
                raise PackageError(f"qwen2-vl image processor: {name} must be a positive integer, "
                                   f"not {values[name]!r}")
        return cls(**values)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) multiples of `factor` with an area within [min_pixels, max_pixels], the aspect ratio kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"{width}×{height}: the aspect ratio is over {MAX_ASPECT_RATIO} (this model's limit)",
                         param="messages")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _size(width: int, height: int, config: Qwen2VLImageConfig, max_pixels: int | None) -> tuple[int, int]:
    if not config.do_resize:
        return height, width
    return smart_resize(height, width, config.factor, config.min_pixels, max_pixels or config.max_pixels)


def image_grid(width: int, height: int, config: Qwen2VLImageConfig, *, max_pixels: int | None = None
               ) -> tuple[int, int, int]:
    """grid_thw (1, patches down, patches across) of an image of this size, without touching pixels;
    `max_pixels` lowers the processor's budget (detail "low")."""
    h, w = _size(width, height, config, max_pixels)
    return 1, h // config.patch_size, w // config.patch_size


def fit(image, config: Qwen2VLImageConfig, *, max_pixels: int | None = None) -> Image.Image:
    """Step 1 alone: the RGB image resized to its smart size (Pillow, 8-bit, the configured filter)."""
    image = to_rgb(image) if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image), "RGB")
    h, w = _size(image.width, image.height, config, max_pixels)
    return image if image.size == (w, h) else image.resize((w, h), resample=config.resample)


def patchify(image: Image.Image, config: Qwen2VLImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Steps 2 and 3 on an image already `fit`: → ([grid_h * grid_w, 3 * T * P * P] float32, grid_thw)."""
    values = np.asarray(image)
    if config.do_rescale:
        values = (values.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        values = values.astype(np.float32)
    if config.do_normalize:
        values = (values - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    frame = values.transpose(2, 0, 1)  # channels first
    t, p, m = config.temporal_patch_size, config.patch_size, config.merge_size
    channels, height, width = frame.shape
    grid_h, grid_w = height // p, width // p
    frames = np.broadcast_to(frame, (t, channels, height, width))  # one still image, repeated in time
    patches = frames.reshape(1, t, channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * t * p * p)), (1, grid_h, grid_w)


def preprocess(images: Sequence, config: Qwen2VLImageConfig, *, max_pixels: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """A request's images → (pixel_values [sum of patches, 1176] float32, image_grid_thw [images, 3] int64), as
    ``Qwen2VLImageProcessor(images=...)`` gives them."""
    out = [patchify(fit(image, config, max_pixels=max_pixels), config) for image in images]
    return (np.concatenate([values for values, _ in out]),
            np.asarray([grid for _, grid in out], dtype=np.int64).reshape(-1, 3))
