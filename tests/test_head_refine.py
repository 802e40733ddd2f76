"""export/head_refine.py: the 8-bit lm_head rewritten as 4-bit + 4-bit residual with the top candidates refined,
run in onnxruntime on a small graph of the decoder's shape at the head ([batch, 1, hidden] → logits)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgevlm.export import head_refine, int4_search

K, N, BLOCK, TOPK = 128, 700, 64, 8


def _head_graph(w: np.ndarray):
    """x [B, 1, K] → logits [B, 1, N] through an 8-bit symmetric MatMulNBits of w [K, N], as the int4 plan's head."""
    node = helper.make_node("MatMul", ["x", "lm_head.weight"], ["logits"], name="/lm_head/MatMul")
    quant = int4_search.rtn(w, BLOCK, True, bits=8)
    made, inits = int4_search.to_matmulnbits(node, "lm_head.weight", quant, K, None)
    graph = helper.make_graph([made], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, K])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 1, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _table(model, name):
    """The float [N, K] weight a refined head's 4-bit table `name` (packed codes + block scales) holds."""
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    b, s = arrays[name], arrays[name + "_scales"]
    codes = np.empty(b.shape[:-1] + (2 * b.shape[-1],), np.float32)
    codes[..., 0::2], codes[..., 1::2] = b & 15, b >> 4
    return ((codes - 8) * s[..., None]).reshape(N, K)


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def head():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((K, N)) * np.exp(rng.normal(0, 0.5, (K, 1)))).astype(np.float32) * 0.05
    model = _head_graph(w)
    eight = _run(model, np.zeros((1, 1, K), np.float32))  # session check of the 8-bit graph itself
    assert eight.shape == (1, 1, N)
    refined = _head_graph(w)
    description = head_refine.refine_output_projection(refined, TOPK)
    return w, model, refined, description


def test_the_top_candidates_get_the_two_tables_logits_and_the_rest_the_4bit_ones(head):
    w, _, refined, description = head
    assert description is not None and f"top {TOPK}" in description
    ops = [n.op_type for n in refined.graph.node]
    assert ops.count("MatMulNBits") == 1 and "TopK" in ops and ops[-1] == "ScatterElements"
    # what the rewrite stored: the 4-bit table and its residual, as the graph's weights
    w4, r4 = _table(refined, "lm_head.weight_Q4"), _table(refined, "lm_head.weight_R4")
    x = np.random.default_rng(4).standard_normal((3, 1, K)).astype(np.float32)
    logits = _run(refined, x)
    coarse, exact = x @ w4.T, x @ (w4 + r4).T
    for row in range(3):
        top = np.argsort(-coarse[row, 0])[:TOPK]
        rest = np.setdiff1d(np.arange(N), top)
        np.testing.assert_allclose(logits[row, 0, top], exact[row, 0, top], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits[row, 0, rest], coarse[row, 0, rest], rtol=1e-4, atol=1e-4)
    # the two tables hold the 8-bit head they replace (their source) to within ~1.3x of its own rounding error;
    # the 4-bit table alone is ~15x off
    eight = int4_search.rtn(w, BLOCK, True, bits=8)
    w8 = ((eight.q.astype(np.float32) - 128) * eight.scales[..., None]).reshape(N, -1)[:, :K]
    err8 = np.abs(w8 - w.T).max()
    assert np.abs(w4 + r4 - w8).max() < 1.5 * err8 < np.abs(w4 - w8).max() / 4


def test_greedy_picks_of_the_refined_head_follow_the_8bit_head_not_the_4bit_one(head):
    """Over many hidden states: where the 8-bit head's argmax and a plain 4-bit head's differ, the refined head
    sides with the 8-bit one."""
    w, eight_bit, refined, _ = head
    x = np.random.default_rng(5).standard_normal((400, 1, K)).astype(np.float32)
    eight = _run(eight_bit, x)[:, 0].argmax(-1)
    ours = _run(refined, x)[:, 0].argmax(-1)
    four = (x[:, 0] @ _table(refined, "lm_head.weight_Q4").T).argmax(-1)
    assert (four != eight).sum() >= 10  # the 4-bit head alone disagrees often enough to tell
    assert (ours == eight).mean() > 0.97 and (ours == eight).sum() > (four == eight).sum() + 8


def test_heads_it_cannot_rewrite_are_left_alone():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((K, N)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "lm_head.weight"], ["logits"], name="/lm_head/MatMul")
    made, inits = int4_search.to_matmulnbits(node, "lm_head.weight", int4_search.rtn(w, BLOCK, True), K, None)
    graph = helper.make_graph([made], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, K])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 1, N])], inits)
    model = helper.make_model(graph)
    assert head_refine.refine_output_projection(model, TOPK) is None  # already 4-bit
    assert head_refine.refine_output_projection(_head_graph(w), 0) is None


def test_the_prefill_graph_leaves_a_refined_head_out(tiny_package, tmp_path):
    """The int8 prefill graph computes no logits: the refined head's 4-bit table gets no int8 copy made at load."""
    import json
    import shutil

    from edgevlm.export import quantize as q
    from edgevlm.export.prefill_graph import write_prefill_graph

    decoder = json.loads((tiny_package / "model.json").read_text())["graphs"]["decoder"]["file"]
    vocab = json.loads((tiny_package / "model.json").read_text())["text"]["vocab_size"]
    tables = {}
    for topk in (0, 32):
        out = tmp_path / f"top{topk}"
        shutil.copytree(tiny_package, out)
        options = q.QuantOptions(int4_output_topk=topk, int4_scale_alphas=())
        q.quantize_graph(tiny_package / decoder, out / decoder, "int4", graph="decoder", options=options)
        tables[topk] = write_prefill_graph(out, decoder)["prefill"]["weights"]
    assert [(r["k"], r["n"]) for r in tables[32]] == [(r["k"], r["n"]) for r in tables[0]]
    assert tables[32] and all(row["n"] != vocab for row in tables[32])
