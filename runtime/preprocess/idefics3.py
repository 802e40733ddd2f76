"""numpy/Pillow port of transformers' ``Idefics3ImageProcessor`` (SmolVLM, Idefics3) for one request.

The steps and their arithmetic follow transformers 4.57 ``models/idefics3/image_processing_idefics3.py``:

1. resize so the longest edge is ``size["longest_edge"]`` (small images are scaled *up*), the other edge
   ``int(...)``-truncated from the float aspect ratio and bumped to an even number, then capped at 4096;
2. with image splitting: resize both edges up to multiples of the tile side ``max_image_size["longest_edge"]``
   (aspect ratio only roughly kept), cut row-major tiles of that side, and append a global image: the
   multiple-sized image resized to one square tile. An image that is already exactly one tile is not split
   (rows = cols = 0). Without splitting: resize straight to one square tile (rows = cols = 0);
3. rescale (uint8 -> float64 * factor -> float32), normalize ``(x - mean) / std`` in float32, pad every tile to
   the largest tile with zeros, with a pixel mask of the valid region.

Every resize is Pillow's ``Image.resize`` on the 8-bit RGB image with the configured filter (1 = LANCZOS), which is
what the processor does through ``to_pil_image``, so pixel values match it exactly. Each resize starts from the
previous one's output, as there. Inputs are RGB; a Pillow image in another mode is converted first with
`edgevlm.runtime.images.to_rgb`. Unlike the processor fed numpy arrays, images 1, 3 or 4 pixels tall are never
mistaken for channels-first arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import PackageError
from ..images import to_rgb

__all__ = ["Idefics3ImageConfig", "Idefics3Images", "fit", "preprocess", "tile_grid"]

MAX_IMAGE_SIZE = 4096  # the processor's absolute cap on the first resize


@dataclass(frozen=True)
class Idefics3ImageConfig:
    """The fields of an Idefics3 ``preprocessor_config.json``, with the processor's defaults."""

    longest_edge: int = 4 * 364  # size["longest_edge"]
    tile_size: int = 364  # max_image_size["longest_edge"]
    do_image_splitting: bool = True
    do_resize: bool = True
    resample: int = 1  # a PIL filter number; 1 = LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True  # inputs are made RGB before anything else; kept for completeness
    do_pad: bool = True  # tiles are always padded: the model takes one dense tensor

    @classmethod
    def from_dict(cls, d: Mapping) -> Idefics3ImageConfig:
        def edge(key: str, default: int) -> int:
            value = d.get(key)
            if value is None:
                return default
            if not isinstance(value, Mapping) or not isinstance(value.get("longest_edge"), int):
                raise PackageError(f"preprocessor config: {key} must be {{'longest_edge': <int>}}, got {value!r}")
            if value["longest_edge"] < 1:
                raise PackageError(f"preprocessor config: {key}.longest_edge must be positive")
            return value["longest_edge"]

        def triple(key: str, default: tuple[float, ...]) -> tuple[float, ...]:
            value = d.get(key)
            if value is None:
                return default
            values = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3
            if len(values) != 3:
                raise PackageError(f"preprocessor config: {key} must have 3 values, got {value!r}")
            return values

        base = cls()

        def get(key: str, kind: type):
            value = d.get(key)
            return getattr(base, key) if value is None else kind(value)

        resample = get("resample", int)
        if resample not in {r.value for r in Image.Resampling}:
            raise PackageError(f"preprocessor config: unknown resample filter {resample!r}")
        return cls(
            longest_edge=edge("size", base.longest_edge),
            tile_size=edge("max_image_size", base.tile_size),
            do_image_splitting=get("do_image_splitting", bool),
            do_resize=get("do_resize", bool),
            resample=resample,
            do_rescale=get("do_rescale", bool),
            rescale_factor=get("rescale_factor", float),
            do_normalize=get("do_normalize", bool),
            image_mean=triple("image_mean", base.image_mean),
            image_std=triple("image_std", base.image_std),
            do_convert_rgb=get("do_convert_rgb", bool),
            do_pad=get("do_pad", bool),
        )


@dataclass
class Idefics3Images:
    """The model inputs for one request's images, plus the tile grid the prompt builder lays out."""

    pixel_values: np.ndarray  # float32 [1, total_tiles, 3, H, W]
    pixel_attention_mask: np.ndarray  # bool [1, total_tiles, H, W]
    rows: list[int] = field(default_factory=list)  # per image; 0 when not split
    cols: list[int] = field(default_factory=list)

    @property
    def tiles_per_image(self) -> list[int]:
        """Tiles each image contributes: rows*cols plus the global image, or 1 when not split."""
        return [r * c + 1 if r else 1 for r, c in zip(self.rows, self.cols)]


# --- sizes, verbatim from the processor (float aspect ratios, int() truncation) ---


def _fit_longest_edge(height: int, width: int, max_len: int) -> tuple[int, int]:
    """`_resize_output_size_rescale_to_max_len`: longest edge := max_len, other edge even."""
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        if height % 2 != 0:
            height += 1
    else:
        height = max_len
        width = int(height * aspect_ratio)
        if width % 2 != 0:
            width += 1
    return max(height, 1), max(width, 1)


def _cap(height: int, width: int, max_len: int) -> tuple[int, int]:
    """`_resize_output_size_scale_below_upper_bound`."""
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def _to_tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    """`resize_for_vision_encoder`: both edges up to multiples of the tile side."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect_ratio)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect_ratio)
        width = math.ceil(width / tile) * tile
    return height, width


def _first_size(height: int, width: int, config: Idefics3ImageConfig) -> tuple[int, int]:
    if not config.do_resize:
        return height, width
    return _cap(*_fit_longest_edge(height, width, config.longest_edge), MAX_IMAGE_SIZE)


def tile_grid(
    width: int, height: int, config: Idefics3ImageConfig, *, do_image_splitting: bool | None = None
) -> tuple[int, int]:
    """(rows, cols) of tiles an image of this size becomes, without touching pixels; (0, 0) when not split."""
    split = config.do_image_splitting if do_image_splitting is None else do_image_splitting
    if not split:
        return 0, 0
    h, w = _to_tile_multiple(*_first_size(height, width, config), config.tile_size)
    if h > config.tile_size or w > config.tile_size:
        return math.ceil(h / config.tile_size), math.ceil(w / config.tile_size)
    return 0, 0


# --- pixels ---


def _resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), resample=resample)


def _as_rgb_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a PIL image or a uint8 HxWx3 array, got {array.dtype} {array.shape}")
    return Image.fromarray(array, "RGB")


def fit(image, config: Idefics3ImageConfig) -> Image.Image:
    """Step 1 alone: the RGB image resized to the processor's first size (longest edge ``size["longest_edge"]``).

    The server reduces each image with it as soon as it is decoded, so a request holds one full-size image at a
    time; `preprocess(..., fitted=True)` then continues from step 2 exactly as it would have.
    """
    image = _as_rgb_image(image)
    return _resize(image, *_first_size(image.height, image.width, config), config.resample)


def _tiles(image: Image.Image, config: Idefics3ImageConfig, split: bool) -> tuple[list[np.ndarray], int, int]:
    """One already `fit` image's uint8 HxWx3 tiles (global image last) and its (rows, cols)."""
    tile, resample = config.tile_size, config.resample
    if not split:
        return [np.asarray(_resize(image, tile, tile, resample))], 0, 0
    image = _resize(image, *_to_tile_multiple(image.height, image.width, tile), resample)
    height, width = image.height, image.width
    if height <= tile and width <= tile:
        return [np.asarray(image)], 0, 0
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    step_h, step_w = math.ceil(height / rows), math.ceil(width / cols)
    array = np.asarray(image)
    frames = [
        array[r * step_h : min((r + 1) * step_h, height), c * step_w : min((c + 1) * step_w, width)]
        for r in range(rows)
        for c in range(cols)
    ]
    frames.append(np.asarray(_resize(image, tile, tile, resample)))
    return frames, rows, cols


def preprocess(
    images: Sequence, config: Idefics3ImageConfig, *, do_image_splitting: bool | None = None, fitted: bool = False
) -> Idefics3Images:
    """Process one request's images (RGB PIL images or uint8 HxWx3 arrays) into SmolVLM/Idefics3 inputs.

    `do_image_splitting` overrides the config (False for OpenAI ``detail: "low"``: one tile per image). `fitted`:
    the images already went through `fit` (step 1).
    """
    if not images:
        raise ValueError("preprocess needs at least one image")
    split = config.do_image_splitting if do_image_splitting is None else do_image_splitting
    frames: list[np.ndarray] = []
    rows: list[int] = []
    cols: list[int] = []
    for image in images:
        tiles, r, c = _tiles(image if fitted else fit(image, config), config, split)
        frames.extend(tiles)
        rows.append(r)
        cols.append(c)

    height = max(f.shape[0] for f in frames)
    width = max(f.shape[1] for f in frames)
    pixels = np.zeros((len(frames), height, width, 3), dtype=np.float32)
    mask = np.zeros((len(frames), height, width), dtype=bool)
    for i, frame in enumerate(frames):
        values = frame.astype(np.float64) * config.rescale_factor if config.do_rescale else frame
        values = values.astype(np.float32)
        if config.do_normalize:
            mean = np.asarray(config.image_mean, dtype=np.float32)
            std = np.asarray(config.image_std, dtype=np.float32)
            values = (values - mean) / std
        h, w = frame.shape[:2]
        pixels[i, :h, :w] = values
        mask[i, :h, :w] = True
    pixel_values = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))[None]
    return Idefics3Images(pixel_values=pixel_values, pixel_attention_mask=mask[None], rows=rows, cols=cols)
