"""Idefics3 / SmolVLM: images split into square tiles plus a global view, `image_seq_len` features per tile.

Preprocessing (`preprocess/idefics3.py`) and the token layout (`prompt.Idefics3PromptLayout`) match transformers'
Idefics3ImageProcessor and Idefics3Processor; positions are plain 1-D (no offsets after images).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ..preprocess.idefics3 import Idefics3ImageConfig, fit, preprocess, tile_grid
from ..prompt import Idefics3PromptLayout
from . import ImagePlan


class Idefics3Family:
    name = "idefics3"

    def __init__(self, package):
        tokens = package.tokens
        self.layout = Idefics3PromptLayout.from_config({
            "image_seq_len": package.vision["image_seq_len"],
            "image_token": tokens["image_token"],
            "fake_image_token": tokens["fake_image_token"],
            "global_image_token": tokens["global_image_token"],
        })
        self.config = Idefics3ImageConfig.from_dict(package.image_processor)

    @property
    def placeholder(self) -> str:
        return self.layout.placeholder

    def plan(self, width: int, height: int, detail: str) -> ImagePlan:
        # detail "low" asks for one tile per image; "auto" and "high" use the model's splitting.
        split = False if detail == "low" else None
        rows, cols = tile_grid(width, height, self.config, do_image_splitting=split)
        return ImagePlan(layout=(rows, cols), tokens=self.layout.num_image_tokens(rows, cols),
                         runs=rows * cols + 1 if rows else 1, split=split)

    def fit(self, image, plan: ImagePlan):
        return fit(image, self.config)

    def expand(self, text: str, plans: Sequence[ImagePlan]) -> str:
        return self.layout.expand(text, [plan.layout for plan in plans])

    def vision_inputs(self, image, plan: ImagePlan) -> Iterator[dict[str, np.ndarray]]:
        # One tile per vision run: at SmolVLM-256M size a 17-tile batch needs ~2.5 GB of activations and is slower.
        batch = preprocess([image], self.config, do_image_splitting=plan.split, fitted=True)
        for values, mask in zip(batch.pixel_values[0], batch.pixel_attention_mask[0]):
            yield {"pixel_values": values[None, None], "pixel_attention_mask": mask[None, None]}


def family(package) -> Idefics3Family:
    return Idefics3Family(package)
