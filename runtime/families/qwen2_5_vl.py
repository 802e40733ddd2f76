"""Qwen2.5-VL: Qwen2-VL's processor, prompt layout and M-RoPE positions, with a windowed vision tower.

Its vision blocks attend within windows of `window_size` pixels (112: 4×4 merged tokens, 8×8 patches), except the
`fullatt_block_indexes` blocks, which attend across the whole image. HF reorders the patches window by window
inside the model (`get_window_index`, a Python loop over grid_thw); here the host does it, as for Qwen2-VL's
positions, and the graph (one image a run) gets:

    pixel_values [patches, 3·2·14·14] f32 and position_ids [patches, 2] i64 in window order;
    window_gather [W·L] i64 (the patches laid out as W windows of L = 64 slots, `patches` = a zero padding row),
    window_mask [W, L] i32 (1: a real patch), window_scatter [patches] i64 (each patch's slot), for the windowed
    blocks' attention (W small blocks instead of one patches × patches mask);
    restore_index [patches / 4] i64 (the merged tokens back in the processor's order)
    →  image_features [patches / 4, text_hidden]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .qwen2vl import Qwen2VLFamily, vision_positions

DEFAULT_WINDOW = 112  # pixels (the Qwen2.5-VL cards' vision_config.window_size)


def window_tokens(window_size: int, merge_size: int, patch_size: int) -> int:
    """A window's side in merged tokens (112 px / 2 / 14 = 4): `window_index`'s `window`."""
    return window_size // merge_size // patch_size


def window_index(grids: Sequence[Sequence[int]], merge_size: int = 2, window: int = 4
                 ) -> tuple[np.ndarray, np.ndarray]:
    """HF's ``get_window_index`` in numpy → (index [tokens]: merged tokens in window order, window_of [tokens]:
    each of those tokens' window number). `window`: merged tokens per window side (window_size / merge / patch)."""
    order, windows, offset, next_window = [], [], 0, 0
    for t, h, w in grids:
        gh, gw = h // merge_size, w // merge_size
        rows, cols = -(-gh // window), -(-gw // window)  # windows down and across (the last ones partial)
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        padded = np.full((t, rows * window, cols * window), -1)
        padded[:, :gh, :gw] = index
        tiles = padded.reshape(t, rows, window, cols, window).transpose(0, 1, 3, 2, 4).reshape(t * rows * cols, -1)
        for tile in tiles:
            kept = tile[tile >= 0]
            if kept.size:
                order.append(kept + offset)
                windows.append(np.full(kept.size, next_window))
                next_window += 1
        offset += t * gh * gw
    if not order:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(order).astype(np.int64), np.concatenate(windows).astype(np.int64)


def vision_feed(pixel_values: np.ndarray, grid: Sequence[int], merge_size: int = 2, window: int = 4
                ) -> dict[str, np.ndarray]:
    """The vision graph's feed for one image: `pixel_values` [patches, width] of grid `grid`, processor order."""
    unit = merge_size * merge_size
    positions = vision_positions(grid, merge_size)
    order, window_of = window_index([grid], merge_size, window)

    def by_window(values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(values.reshape(-1, unit, *values.shape[1:])[order].reshape(values.shape))

    patches, slots = len(positions), window * window * unit
    patch_window = np.repeat(window_of, unit)  # window order: each window's patches are contiguous
    starts = np.concatenate([[0], np.cumsum(np.bincount(patch_window))[:-1]])
    scatter = patch_window * slots + np.arange(patches) - starts[patch_window]
    count = int(patch_window[-1]) + 1 if patches else 0
    gather = np.full(count * slots, patches, np.int64)
    gather[scatter] = np.arange(patches)
    return {"pixel_values": by_window(pixel_values), "position_ids": by_window(positions),
            "window_gather": gather, "window_mask": (gather < patches).astype(np.int32).reshape(count, slots),
            "window_scatter": scatter.astype(np.int64), "restore_index": np.argsort(order).astype(np.int64)}


class Qwen25VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"

    def __init__(self, package):
        super().__init__(package)
        vision = package.vision
        self.window = window_tokens(int(vision.get("window_size", DEFAULT_WINDOW)), self.config.merge_size,
                                    self.config.patch_size)

    def vision_inputs(self, image, plan):
        from ..preprocess.qwen2vl import patchify

        values, grid = patchify(image, self.config)
        yield vision_feed(values, grid, self.config.merge_size, self.window)


def family(package) -> Qwen25VLFamily:
    return Qwen25VLFamily(package)
