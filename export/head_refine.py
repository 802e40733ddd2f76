"""A refined 4-bit output projection: decode steps read a 4-bit lm_head, the top candidates get 8-bit-grade logits.

A decode step is bound by the bytes it reads, and in an int4 package the 8-bit lm_head is a third of them (SmolVLM-256M:
49,280 × 576 weights at 9 bits a weight with block 64's scales, 32 MB of ~98 MB a token). A plain 4-bit lm_head
decodes ~13% faster but loses 5–11 points of top-1 agreement with fp32 (benchmarks/QUALITY.md, round 3): the
4-bit logits of close candidates swap places. So the head is stored as two 4-bit tables on MatMulNBits' symmetric
block grid, W ≈ W4 + R4 with R4 the 4-bit quantization of the residual W − W4 (W4 unclipped, so R4's steps are
~14× finer than W4's and the sum is within ~1.3× of 8-bit's error), 10 bits a weight on disk as the 8-bit head's 9 — and the graph computes

    coarse = x · W4                                  (MatMulNBits 4-bit: the only full read of the table)
    top    = TopK(coarse, k)                         (the k candidates)
    exact  = rows_top(W4 + R4) · x                   (k rows gathered and unpacked: k × 576 weights)
    logits = ScatterElements(coarse, top, exact)

so the logits of the k most likely tokens are those of a ~7.6-bit head and the rest keep their 4-bit values. The
argmax equals the two-table head's whenever its argmax is among the 4-bit head's k best (k = 32 measured); the
tail the sampler rarely reaches is 4-bit. Everything stays inside the decoder graph: the runtime, the KV-cache
variants and the prefill graph (which computes no logits) are unchanged.

A tied checkpoint's lm_head is its embedding table, which the embed_tokens graph reads as the 8-bit head's blocks
(export/tied.py): there the 8-bit head is kept (QuantOptions.int4_output_topk is set to 0 for such a decoder).
"""

from __future__ import annotations

import numpy as np

from .int4_search import BlockQuant, pack
from .tied import _attr

PREFIX = "/lm_head/refine"


def rtn4(w: np.ndarray, block: int, divisors=(7.0, 7.5, 8.0)) -> BlockQuant:
    """Symmetric 4-bit blocks of w [N, K] along K (K a multiple of `block`), each block's scale the one of
    absmax / `divisors` with the least squared error (7 alone: nothing clipped, every error within half a step —
    unlike `int4_search.rtn`, whose grid may clip the side opposite the block's extreme by a whole step)."""
    n, k = w.shape
    wb = w.reshape(n, k // block, block).astype(np.float32)
    amax = np.abs(wb).max(-1)
    best_q = best_s = best_err = None
    for div in divisors:
        s = np.where(amax > 0, amax / div, 1.0).astype(np.float32)
        q = np.clip(np.rint(wb / s[..., None]), -8, 7)
        err = ((q * s[..., None] - wb) ** 2).sum(-1)
        if best_err is None:
            best_q, best_s, best_err = q, s, err
        else:
            take = err < best_err
            best_q = np.where(take[..., None], q, best_q)
            best_s = np.where(take, s, best_s)
            best_err = np.minimum(err, best_err)
    return BlockQuant((best_q + 8).astype(np.uint8), best_s.astype(np.float32), None, 4)


def refine_output_projection(model, topk: int) -> str | None:
    """Rewrite the decoder's 8-bit MatMulNBits lm_head (symmetric, no zero points, blocks tiling K) as the refined
    4-bit head described above, in place. → a description for the report, or None when the head is not that."""
    from onnx import TensorProto, helper, numpy_helper

    from .quantize import _logits_producer

    head = _logits_producer(model, ("MatMulNBits",))
    if head is None or topk <= 0 or head.output[0] != "logits":
        return None
    bits, block, k, n = _attr(head, "bits", 4), _attr(head, "block_size"), _attr(head, "K"), _attr(head, "N")
    inits = {t.name: t for t in model.graph.initializer}
    if bits != 8 or not block or k % block or len([i for i in head.input if i]) != 3 \
            or any(i not in inits for i in head.input[1:3]) or topk >= n:
        return None
    blocks = k // block
    eight = BlockQuant(numpy_helper.to_array(inits[head.input[1]]).reshape(n, blocks, block),
                       numpy_helper.to_array(inits[head.input[2]]).astype(np.float32).reshape(n, blocks), None, 8)
    w = eight.dequantize(k).T  # [N, K]
    main = rtn4(w, block, (7.0,))  # unclipped: the residual stays within half a 4-bit step
    rest = w - main.dequantize(k).T
    resid = rtn4(rest, block, (7.0, 7.5))  # clips at most 1/15 of a block's largest value
    base = head.input[1].rsplit("_Q", 1)[0]
    names = {"b": f"{base}_Q4", "s": f"{base}_Q4_scales", "rb": f"{base}_R4", "rs": f"{base}_R4_scales"}
    tensors = [numpy_helper.from_array(pack(main)[0], names["b"]),
               numpy_helper.from_array(main.scales, names["s"]),
               numpy_helper.from_array(pack(resid)[0], names["rb"]),
               numpy_helper.from_array(resid.scales, names["rs"])]

    def const(name, values, dtype=np.int64):
        tensors.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), f"{PREFIX}/{name}"))
        return f"{PREFIX}/{name}"

    x = head.input[0]
    p = PREFIX
    nodes = [helper.make_node("MatMulNBits", [x, names["b"], names["s"]], [f"{p}/coarse"], name=f"{p}/coarse_Q4",
                              domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                              **({"accuracy_level": _attr(head, "accuracy_level")}
                                 if _attr(head, "accuracy_level") else {})),
             helper.make_node("TopK", [f"{p}/coarse", const("k", [topk])], [f"{p}/top_values", f"{p}/top"],
                              name=f"{p}/TopK", axis=-1, largest=1, sorted=0)]
    sixteen, eight, shape = const("sixteen", 16, np.int32), const("eight", 8.0, np.float32), \
        const("rows_shape", [0, 0, 0, blocks, block])
    last = const("last", [-1])
    parts = []
    for tag, table, scales in (("main", names["b"], names["s"]), ("residual", names["rb"], names["rs"])):
        q = f"{p}/{tag}"
        nodes += [
            helper.make_node("Gather", [table, f"{p}/top"], [f"{q}/bytes"], name=f"{q}/Gather", axis=0),
            helper.make_node("Cast", [f"{q}/bytes"], [f"{q}/bytes_i32"], name=f"{q}/Cast", to=TensorProto.INT32),
            helper.make_node("Mod", [f"{q}/bytes_i32", sixteen], [f"{q}/low"], name=f"{q}/Mod"),
            helper.make_node("Div", [f"{q}/bytes_i32", sixteen], [f"{q}/high"], name=f"{q}/Div"),
            helper.make_node("Unsqueeze", [f"{q}/low", last], [f"{q}/low1"], name=f"{q}/UnsqueezeLow"),
            helper.make_node("Unsqueeze", [f"{q}/high", last], [f"{q}/high1"], name=f"{q}/UnsqueezeHigh"),
            helper.make_node("Concat", [f"{q}/low1", f"{q}/high1"], [f"{q}/pairs"], name=f"{q}/Concat", axis=-1),
            helper.make_node("Reshape", [f"{q}/pairs", shape], [f"{q}/codes"], name=f"{q}/Reshape"),
            helper.make_node("Cast", [f"{q}/codes"], [f"{q}/codes_f"], name=f"{q}/CastFloat", to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"{q}/codes_f", eight], [f"{q}/centred"], name=f"{q}/Sub"),
            helper.make_node("Gather", [scales, f"{p}/top"], [f"{q}/scales"], name=f"{q}/GatherScales", axis=0),
            helper.make_node("Unsqueeze", [f"{q}/scales", last], [f"{q}/scales1"], name=f"{q}/UnsqueezeScales"),
            helper.make_node("Mul", [f"{q}/centred", f"{q}/scales1"], [f"{q}/values"], name=f"{q}/Mul"),
        ]
        parts.append(f"{q}/values")
    nodes += [
        helper.make_node("Add", parts, [f"{p}/rows_blocks"], name=f"{p}/Add"),
        helper.make_node("Reshape", [f"{p}/rows_blocks", const("rows_flat", [0, 0, 0, k])], [f"{p}/rows"],
                         name=f"{p}/ReshapeRows"),
        helper.make_node("Unsqueeze", [x, last], [f"{p}/x_column"], name=f"{p}/UnsqueezeX"),
        helper.make_node("MatMul", [f"{p}/rows", f"{p}/x_column"], [f"{p}/exact1"], name=f"{p}/MatMul"),
        helper.make_node("Squeeze", [f"{p}/exact1", last], [f"{p}/exact"], name=f"{p}/Squeeze"),
        helper.make_node("ScatterElements", [f"{p}/coarse", f"{p}/top", f"{p}/exact"], ["logits"],
                         name=f"{p}/ScatterElements", axis=-1),
    ]
    position = list(model.graph.node).index(head)
    kept = [node for node in model.graph.node if node is not head]
    del model.graph.node[:]
    model.graph.node.extend(kept[:position] + nodes + kept[position:])
    old = set(head.input[1:3])
    keep = [t for t in model.graph.initializer if t.name not in old]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + tensors)
    err = np.abs(rest - resid.dequantize(k).T).max()
    return (f"output projection 4-bit + 4-bit residual, logits of the top {topk} refined "
            f"(two-table max |error| {err:.2e} vs 8-bit blocks)")
