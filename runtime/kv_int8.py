"""Prompt chunks for an int8 KV cache (export/kv_int8.py): on the float32-cache prefill graph, stored as int8.

onnxruntime's GroupQueryAttention reads an int8 cache well in a decode step (one position against the whole cache:
at long context ~1.8x faster than float32 here), but a prompt chunk over a quantized past was slow (a 2,043-token
prefill 2.3x the float32 one). So an int4 package's prompt chunks keep running on its float32-cache int8 prefill
graph, over a float32 copy of the one row being prefilled (`PromptScratch`): the row's int8 positions dequantized
(what a decode step reads, so a chunk attends to the same past either way), the chunk's new keys and values then
quantized into the int8 row with the package's per-channel steps (round to nearest even, saturated, as the graph
does for decode steps) and written back to the copy dequantized. Decode steps, and a prompt's last position (its
logits), run on the int8-cache decoder graph.

The copy holds float32 keys and values of one prompt (46 KB a position at SmolVLM-256M size: 94 MB for 2,043
positions); its pages are given back when the prompt's last chunk is in.
"""

from __future__ import annotations

import numpy as np

from . import memory


def load_steps(folder, spec: dict) -> np.ndarray:
    """The package's quantization steps, float32 [layers, 2 (K, V), kv_heads, head_dim] (`kv_int8.scales`)."""
    scales = spec["scales"]
    steps = np.fromfile(folder / scales["file"], dtype=np.dtype(scales["dtype"]))
    return steps.reshape(scales["shape"])


def quantize(values: np.ndarray, step: np.ndarray) -> np.ndarray:
    """round(values / step) saturated to int8; `step` broadcasts over positions ([kv_heads, 1, head_dim])."""
    return np.clip(np.rint(values / step), -128, 127).astype(np.int8)


class PromptScratch:
    """A float32 copy of one row's KV cache while its prompt is prefilled on a float32-cache prefill graph."""

    def __init__(self, engine, steps: np.ndarray):
        self.engine = engine
        self.k_steps = np.ascontiguousarray(steps[:, 0, :, None, :])  # [layers, kv_heads, 1, head_dim]
        self.v_steps = np.ascontiguousarray(steps[:, 1, :, None, :])
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._binding = None
        self._owner: object = None  # which row the copy holds, and how many of its positions
        self._valid = 0

    def _reserve(self, positions: int) -> None:
        if positions <= self.capacity:
            return
        import onnxruntime as ort

        from .engine import shared_kv_binding

        engine = self.engine
        capacity = min(max(positions, 2 * self.capacity, 1024), engine.max_kv_length)
        shape = (1, engine.kv_heads, capacity, engine.head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(engine.num_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(engine.num_layers)]
        for buffer in self.keys + self.values:
            memory.sparse(buffer)
        self.capacity, self._owner, self._valid = capacity, None, 0
        self._values = ([ort.OrtValue.ortvalue_from_numpy(k) for k in self.keys],
                        [ort.OrtValue.ortvalue_from_numpy(v) for v in self.values])
        self._binding = shared_kv_binding(engine.prefill_decoder, *self._values)

    def run(self, owner: object, keys: list[np.ndarray], values: list[np.ndarray], inputs_embeds: np.ndarray,
            past: int, rope: dict | None) -> None:
        """Prefill `inputs_embeds` [1, S, hidden] after `past` positions of the row whose int8 buffers per layer are
        `keys` / `values` ([1, kv_heads, capacity, head_dim] views), `owner` naming that row: its new positions are
        written there as int8."""
        seq = inputs_embeds.shape[1]
        self._reserve(past + seq)
        if self._owner != owner or self._valid != past:  # another row, or this one changed since: copy it again
            for layer in range(self.engine.num_layers):
                np.multiply(keys[layer][0, :, :past], self.k_steps[layer], out=self.keys[layer][0, :, :past])
                np.multiply(values[layer][0, :, :past], self.v_steps[layer], out=self.values[layer][0, :, :past])
        self._owner = None  # until the chunk is in
        self.engine.run_prefill(self._binding, inputs_embeds, past, rope)
        new = slice(past, past + seq)
        for layer in range(self.engine.num_layers):
            for scratch, stored, step in ((self.keys[layer], keys[layer], self.k_steps[layer]),
                                          (self.values[layer], values[layer], self.v_steps[layer])):
                q = quantize(scratch[0, :, new], step)
                stored[0, :, new] = q
                np.multiply(q, step, out=scratch[0, :, new])
        self._owner, self._valid = owner, past + seq

    def forget(self) -> None:
        """The rows changed (moved, copied, emptied): the next chunk copies its row again."""
        self._owner = None

    def release(self) -> None:
        """A prompt is in: give the copy's pages back (they read as zeros, resident again only when written)."""
        self._owner = None
        for buffer in self.keys + self.values:
            memory.discard(buffer)
