"""The numpy/Pillow Idefics3 image processor against transformers' Idefics3ImageProcessor, the oracle.

Configs: the real SmolVLM-256M one (2048 longest edge, 512 tiles) on a handful of telling sizes, and the shrunk one
the project's tiny test models use (256 / 64) on many seeded random sizes. The oracle is called with
input_data_format="channels_last": without it transformers takes any RGB image 1, 3 or 4 pixels tall for a
channels-first array (see test_oracle_needs_channels_last), a Hugging Face bug we do not copy.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import Idefics3ImageProcessor

from edgevlm.runtime.errors import PackageError
from edgevlm.runtime.images import to_rgb
from edgevlm.runtime.preprocess.idefics3 import Idefics3ImageConfig, Idefics3Images, fit, preprocess, tile_grid

CARD = Path(__file__).parent / "fixtures" / "smolvlm-256m-instruct" / "preprocessor_config.json"
REAL = json.loads(CARD.read_text())
TINY = {**REAL, "size": {"longest_edge": 256}, "max_image_size": {"longest_edge": 64}}
CONFIGS = {"real": REAL, "tiny": TINY}
TOLERANCE = 1e-5


def _image(width: int, height: int, seed: int) -> Image.Image:
    """Noise over a gradient: sharp edges make LANCZOS over- and undershoot, so clipping and rounding show."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    pixels = 0.5 * ramp + 0.5 * rng.integers(0, 256, (height, width, 3))
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@functools.cache
def _processor(name: str) -> Idefics3ImageProcessor:
    return Idefics3ImageProcessor(**CONFIGS[name])


def _config(name: str) -> Idefics3ImageConfig:
    return Idefics3ImageConfig.from_dict(CONFIGS[name])


def check(processor: Idefics3ImageProcessor, config: Idefics3ImageConfig, images, split) -> Idefics3Images:
    """Ours vs the oracle on one request's images; returns ours."""
    ours = preprocess(images, config, do_image_splitting=split)
    ref = processor(
        images=[list(images)],
        do_image_splitting=split,
        return_tensors="np",
        return_row_col_info=True,
        input_data_format="channels_last",
    )
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.flags.c_contiguous
    assert ours.pixel_attention_mask.dtype == np.bool_
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert ours.pixel_attention_mask.shape == ref["pixel_attention_mask"].shape
    assert np.abs(ours.pixel_values - ref["pixel_values"]).max() <= TOLERANCE
    np.testing.assert_array_equal(ours.pixel_attention_mask, ref["pixel_attention_mask"].astype(bool))
    assert ours.rows == ref["rows"][0] and ours.cols == ref["cols"][0]
    assert sum(ours.tiles_per_image) == ours.pixel_values.shape[1]
    for image, rows, cols in zip(images, ours.rows, ours.cols):
        assert tile_grid(image.width, image.height, config, do_image_splitting=split) == (rows, cols)
    # The server's path: each image reduced by `fit` as soon as it is decoded, then processed on its own.
    one_by_one = [preprocess([fit(image, config)], config, do_image_splitting=split, fitted=True) for image in images]
    if len({p.pixel_values.shape[-2:] for p in one_by_one}) == 1:  # tiles of one size: nothing to pad apart
        np.testing.assert_array_equal(np.concatenate([p.pixel_values for p in one_by_one], axis=1), ours.pixel_values)
    return ours


def _random_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    """Log-uniform sides from 1 to ~1500 px, so aspect ratios from extreme to square."""
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in np.exp(rng.uniform(0, np.log(1500), 2)).round().clip(1)) for _ in range(n)]


TINY_SIZES = [
    (1, 1), (3, 1), (1, 3), (5, 3), (7, 4), (4, 4),  # 1/3/4-pixel heights: the channels-first trap
    (4000, 100), (100, 4000), (64, 64), (256, 256), (65, 64), (128, 63), (257, 256), (256, 2),
] + _random_sizes(24, seed=2024)


@pytest.mark.parametrize("split", [True, False], ids=["split", "no-split"])
@pytest.mark.parametrize("size", TINY_SIZES, ids=[f"{w}x{h}" for w, h in TINY_SIZES])
def test_tiny_config_single_images(size, split):
    width, height = size
    out = check(_processor("tiny"), _config("tiny"), [_image(width, height, seed=width * 7919 + height)], split)
    if not split:
        assert out.pixel_values.shape == (1, 1, 3, 64, 64) and out.rows == [0] and out.cols == [0]


@pytest.mark.parametrize("split", [True, False], ids=["split", "no-split"])
def test_tiny_config_several_images_in_one_request(split):
    for group, seed in [(TINY_SIZES[:5], 1), (TINY_SIZES[6:10], 2), (TINY_SIZES[-6:], 3)]:
        images = [_image(w, h, seed=seed * 100 + i) for i, (w, h) in enumerate(group)]
        out = check(_processor("tiny"), _config("tiny"), images, split)
        assert len(out.rows) == len(images)


@pytest.mark.parametrize(
    "size,split,grid",
    [
        ((1, 1), True, (4, 4)),  # upscaled to 2048 x 2048 first
        ((4000, 100), True, (1, 4)),
        ((100, 4000), True, (4, 1)),
        ((512, 512), True, (4, 4)),  # one tile's size, yet upscaled and split: the first resize always runs
        ((2048, 2048), True, (4, 4)),
        ((1100, 1000), True, (4, 4)),
        ((1, 1), False, (0, 0)),
        ((2048, 2048), False, (0, 0)),
        ((640, 480), False, (0, 0)),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_real_config(size, split, grid):
    width, height = size
    out = check(_processor("real"), _config("real"), [_image(width, height, seed=width + height)], split)
    assert (out.rows[0], out.cols[0]) == grid
    assert out.pixel_values.shape[-2:] == (512, 512)


def test_real_config_several_images_in_one_request():
    images = [_image(640, 480, 1), _image(30, 900, 2), _image(1, 1, 3)]
    out = check(_processor("real"), _config("real"), images, True)
    assert (out.rows, out.cols) == ([3, 4, 4], [4, 1, 4])
    assert out.pixel_values.shape == (1, 13 + 5 + 17, 3, 512, 512)


def test_processor_defaults():
    # from_dict({}) must be the processor's own defaults: 1456 longest edge, 364 tiles.
    processor, config = Idefics3ImageProcessor(), Idefics3ImageConfig.from_dict({})
    assert (config.longest_edge, config.tile_size) == (1456, 364)
    for split in (True, False):
        check(processor, config, [_image(700, 300, 5), _image(90, 1000, 6)], split)


@pytest.mark.parametrize(
    "overrides",
    [
        {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
        {"resample": 3},  # BICUBIC
        {"resample": 2, "rescale_factor": 0.5 / 255},
        {"do_normalize": False},
        {"do_rescale": False},
        {"size": {"longest_edge": 64}},  # the first resize lands on one tile: nothing to split
        {"do_resize": False},  # straight to tile multiples, small images stay unsplit
        {"do_image_splitting": False},
        {"size": {"longest_edge": 5000}, "do_image_splitting": False},  # the first resize is capped at 4096
    ],
    ids=lambda d: ",".join(d),
)
def test_config_variants(overrides):
    d = {**TINY, **overrides}
    processor, config = Idefics3ImageProcessor(**d), Idefics3ImageConfig.from_dict(d)
    # 65x33 and 33x65: the processor's int() truncation of 128 * 33 / 65 = 64.98 decides between 1 and 2 tiles
    sizes = [(50, 30), (130, 20), (300, 200), (64, 64), (65, 33), (33, 65)]
    out = check(processor, config, [_image(w, h, seed) for seed, (w, h) in enumerate(sizes)], None)
    if "size" in overrides or "do_image_splitting" in overrides:
        assert out.rows == [0] * len(sizes)
    if "do_resize" in overrides:
        assert (out.rows, out.cols) == ([0, 1, 4, 0, 1, 2], [0, 3, 5, 0, 2, 1])


def test_oracle_needs_channels_last():
    """Why check() passes input_data_format: transformers misreads a 1x1 RGB image as channels-first."""
    image = _image(1, 1, 0)
    guessed = _processor("tiny")(images=[[image]], return_tensors="np", return_row_col_info=True)
    ours = preprocess([image], _config("tiny"))
    assert (guessed["rows"][0], guessed["cols"][0]) != (ours.rows, ours.cols)
    assert (ours.rows, ours.cols) == ([4], [4])


def test_inputs_other_than_rgb_pil_images():
    config = _config("tiny")
    rgb = _image(90, 70, 9)
    reference = preprocess([rgb], config)
    from_array = preprocess([np.asarray(rgb)], config)
    np.testing.assert_array_equal(from_array.pixel_values, reference.pixel_values)
    rgba = Image.fromarray(np.dstack([np.asarray(rgb), np.full((70, 90), 128, np.uint8)]), "RGBA")
    composited = preprocess([to_rgb(rgba)], config).pixel_values
    np.testing.assert_array_equal(preprocess([rgba], config).pixel_values, composited)
    with pytest.raises(ValueError):
        preprocess([np.zeros((4, 4, 3), np.float32)], config)
    with pytest.raises(ValueError):
        preprocess([], config)


def test_from_dict_reads_the_fixture():
    config = _config("real")
    assert (config.longest_edge, config.tile_size, config.resample) == (2048, 512, 1)
    assert config.do_image_splitting and config.image_mean == (0.5, 0.5, 0.5) and config.image_std == (0.5, 0.5, 0.5)
    assert config.rescale_factor == pytest.approx(1 / 255)


@pytest.mark.parametrize(
    "bad",
    [{"size": {"height": 10, "width": 10}}, {"max_image_size": 512}, {"resample": 99}, {"image_mean": [0.5, 0.5]}],
    ids=["size-hw", "max-int", "resample", "mean"],
)
def test_from_dict_refuses_bad_configs(bad):
    with pytest.raises(PackageError):
        Idefics3ImageConfig.from_dict({**REAL, **bad})
