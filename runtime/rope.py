"""Rotary tables for decoders whose positions the graph takes as inputs (M-RoPE: Qwen2-VL, Qwen2.5-VL)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """The rotary inverse frequencies [head_dim / 2], float32 as transformers computes them."""
    return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
            ).astype(np.float32)


def mrope_tables(positions: np.ndarray, frequencies: np.ndarray, sections: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin rows [tokens, head_dim / 2] for tokens at 3-D `positions` [3, tokens]: the first sections[0]
    frequencies turn with the temporal position, the next sections[1] with the row, the last with the column
    (``apply_multimodal_rotary_pos_emb``; the other half of each head repeats these)."""
    bounds = np.cumsum([0, *sections])
    row = np.repeat(np.arange(3), np.diff(bounds))  # which of t / h / w drives each frequency
    angles = positions[row].T.astype(np.float32) * frequencies[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
