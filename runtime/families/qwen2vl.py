"""Qwen2-VL (and, through families/qwen2_5_vl.py, Qwen2.5-VL): the runtime family.

- `Qwen2VLLayout`: an image of grid (1, h, w) patches becomes ``<|vision_start|>`` + ``<|image_pad|>`` ×
  (h·w / merge²) + ``<|vision_end|>``; the chat template writes the three tokens, `expand` repeats the pad, as
  ``Qwen2VLProcessor`` does;
- `rope_index`: the 3-D M-RoPE positions (temporal, height, width) of a prompt with images, and the offset its
  decode positions take after it (``Qwen2VLModel.get_rope_index`` in transformers 4.57, still images only);
- `vision_positions`: the vision tower's per-patch input that HF derives from grid_thw inside the model (each
  patch's row and column in the merger's 2×2 order); the graph runs one image at a time (attention within the
  image, as HF's per-image split).

`Qwen2VLFamily` puts them behind the family interface (families/__init__.py), with `positions` for the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class Qwen2VLLayout:
    vision_start: str = "<|vision_start|>"
    image_pad: str = "<|image_pad|>"
    vision_end: str = "<|vision_end|>"
    merge_size: int = 2

    @property
    def placeholder(self) -> str:
        """What the Instruct chat template writes for each image."""
        return self.vision_start + self.image_pad + self.vision_end

    def num_image_tokens(self, grid_thw: Sequence[int]) -> int:
        t, h, w = grid_thw
        return t * h * w // (self.merge_size ** 2)

    def expand(self, text: str, grids: Sequence[Sequence[int]]) -> str:
        """Replace the i-th image's single pad token with as many as its features."""
        pieces = text.split(self.placeholder)
        if len(pieces) - 1 != len(grids):
            raise InvalidRequestError(
                f"the prompt has {len(pieces) - 1} image placeholder(s) but the request has {len(grids)} image(s); "
                f"the text of the messages must not contain {self.placeholder!r}", param="messages")
        out = [pieces[0]]
        for grid, piece in zip(grids, pieces[1:]):
            out.append(self.vision_start + self.image_pad * self.num_image_tokens(grid) + self.vision_end)
            out.append(piece)
        return "".join(out)


def rope_index(input_ids: Sequence[int], grids: Sequence[Sequence[int]], image_token_id: int,
               merge_size: int = 2) -> tuple[np.ndarray, int]:
    """→ (positions [3, len(input_ids)] int64, delta): text tokens count up on all three rows; an image's tokens
    take (t, row, column) of its merged patch grid after the text before it; text after an image continues from
    the image's largest position + 1. A decode step at KV position p uses position p + delta on all three rows."""
    ids = np.asarray(input_ids, dtype=np.int64)
    rows, start, next_position = [], 0, 0
    image_positions = np.flatnonzero(ids == image_token_id)
    used = 0
    for t, h, w in grids:
        gh, gw = h // merge_size, w // merge_size
        count = t * gh * gw
        if used + count > len(image_positions):
            raise InvalidRequestError("the prompt has fewer image tokens than its images need", param="messages")
        end = int(image_positions[used])  # the image's first token
        text = end - start
        rows.append(np.broadcast_to(np.arange(text, dtype=np.int64) + next_position, (3, text)))
        grid = np.stack([np.repeat(np.arange(t), gh * gw), np.tile(np.repeat(np.arange(gh), gw), t),
                         np.tile(np.arange(gw), t * gh)]).astype(np.int64)
        rows.append(grid + text + next_position)
        next_position = int(rows[-1].max()) + 1
        start, used = end + count, used + count
    rest = len(ids) - start
    rows.append(np.broadcast_to(np.arange(rest, dtype=np.int64) + next_position, (3, rest)))
    positions = np.concatenate(rows, axis=1)
    return positions, int(positions.max()) + 1 - len(ids) if len(ids) else 0


def vision_positions(grid: Sequence[int], merge_size: int = 2) -> np.ndarray:
    """→ position_ids [patches, 2] int64 of one image of grid (t, h, w): each patch's row and column, patches in the
    order the image processor emits them (HF's ``rot_pos_emb``)."""
    t, h, w = grid
    m = merge_size
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3)
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3)
    pairs = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)
    return np.tile(pairs, (t, 1)).astype(np.int64)



class Qwen2VLFamily:
    name = "qwen2_vl"

    def __init__(self, package):
        from ..preprocess.qwen2vl import Qwen2VLImageConfig

        self.config = Qwen2VLImageConfig.from_dict(package.image_processor)
        tokens = package.tokens
        self.layout = Qwen2VLLayout(vision_start=tokens.get("vision_start_token", "<|vision_start|>"),
                                    image_pad=tokens["image_token"],
                                    vision_end=tokens.get("vision_end_token", "<|vision_end|>"),
                                    merge_size=self.config.merge_size)
        self.image_token_id = tokens["image_token_id"]

    @property
    def placeholder(self) -> str:
        return self.layout.placeholder

    def plan(self, width: int, height: int, detail: str):
        from ..preprocess.qwen2vl import image_grid
        from . import ImagePlan

        # detail "low": at most 256 image tokens (OpenAI's low detail is one small fixed-size view).
        budget = LOW_DETAIL_PIXELS if detail == "low" else None
        grid = image_grid(width, height, self.config, max_pixels=budget)
        return ImagePlan(layout=grid, tokens=self.layout.num_image_tokens(grid), runs=1, budget=budget)

    def fit(self, image, plan):
        from ..preprocess.qwen2vl import fit

        return fit(image, self.config, max_pixels=plan.budget)

    def expand(self, text: str, plans) -> str:
        return self.layout.expand(text, [plan.layout for plan in plans])

    def vision_inputs(self, image, plan):
        from ..preprocess.qwen2vl import patchify

        values, grid = patchify(image, self.config)
        yield {"pixel_values": values, "position_ids": vision_positions(grid, self.config.merge_size)}

    def positions(self, input_ids, plans) -> tuple[np.ndarray, int]:
        return rope_index(input_ids, [plan.layout for plan in plans], self.image_token_id, self.config.merge_size)


LOW_DETAIL_PIXELS = 256 * 28 * 28


def family(package) -> Qwen2VLFamily:
    return Qwen2VLFamily(package)
