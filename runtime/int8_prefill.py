"""The int8 weights of an int4 package's prefill graph, made at load from the decoder's 4-bit blocks.

export/prefill_graph.py explains the graph: prompt chunks run their projections as per-row uint8 activations × int8
weights (onnxruntime's MatMulIntegerToFloat, on AMX / VNNI / AVX2 int8 dot products), decode steps stay on the 4-bit
`MatMulNBits` weights. The int8 weights are not stored in the package; model.json's `graphs.decoder.prefill.weights`
says, for each projection, where its 4-bit B tensor ([N, blocks, block/2], two codes per byte, low nibble first,
value = (code − 8) × block scale) and its block scales lie in the decoder's data file, and where the int8 [K, N]
weight and its float32 [N] column scales go in the prefill graph's virtual external file (`derived_file`). Each
column is requantized with one scale: c = max |block scale| × 8 / 127, w8 = round((code − 8) × scale / c), through
a 16-entry table per block, so |w8| ≤ 127 and the 4-bit grid is kept to within c / 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def column_int8(packed: np.ndarray, scales: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """4-bit blocks (B [N, blocks, block/2] uint8, scales [N, blocks]) → (int8 [K, N], float32 column scales [N])."""
    n, blocks, half = packed.shape
    scales = scales.astype(np.float32).reshape(n, blocks)
    column = np.abs(scales).max(1) * np.float32(8 / 127)
    column[column == 0] = 1
    ratio = scales / column[:, None]
    table = np.rint(ratio[:, :, None] * np.arange(-8, 8, dtype=np.float32)).astype(np.int8)  # [N, blocks, 16]
    codes = np.empty((n, blocks, 2 * half), np.uint8)
    np.bitwise_and(packed, 15, out=codes[:, :, 0::2])
    np.right_shift(packed, 4, out=codes[:, :, 1::2])
    weights = np.take_along_axis(table, codes, axis=2).reshape(n, -1)[:, :k]
    return np.ascontiguousarray(weights.T), column


def derived_file(folder: Path, prefill: dict) -> np.ndarray:
    """The bytes of the prefill graph's virtual external file (`prefill["derived_file"]`), as a uint8 array."""
    out = np.zeros(int(prefill["derived_bytes"]), np.uint8)
    maps: dict[str, np.memmap] = {}

    def read(where: dict) -> np.ndarray:
        data = maps.get(where["file"])
        if data is None:
            data = maps[where["file"]] = np.memmap(folder / where["file"], dtype=np.uint8, mode="r")
        raw = data[where["offset"]:where["offset"] + where["bytes"]]
        return raw.view(np.dtype(where["dtype"])).reshape(where["shape"])

    for row in prefill["weights"]:
        k, n = int(row["k"]), int(row["n"])
        weights, column = column_int8(read(row["b"]), read(row["scales"]), k)
        out[row["w8"]:row["w8"] + k * n] = weights.reshape(-1).view(np.uint8)
        out[row["c"]:row["c"] + 4 * n] = column.astype("<f4").view(np.uint8)
    return out
