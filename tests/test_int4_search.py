"""export/int4_search.py on small random matrices: the calibrated 4-bit algorithms beat round-to-nearest on the
error they minimise, and what they write runs in onnxruntime's MatMulNBits as exactly the weights they report."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgevlm.export import int4_search as s

K, N, BLOCK = 96, 40, 32  # three blocks per column


def _activations(rng, tokens=512):
    """Inputs with uneven channel scales and correlations (like a transformer's: a few outlier channels)."""
    scale = np.exp(rng.normal(0, 1.0, K)).astype(np.float32)
    mix = np.eye(K) + 0.3 * rng.normal(0, 1, (K, K)) / np.sqrt(K)
    return (rng.normal(0, 1, (tokens, K)) @ mix * scale).astype(np.float32)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    w[rng.random((K, N)) < 0.01] *= 8  # a few large weights, as in real layers
    x = _activations(rng)
    return w, x, (x.T.astype(np.float64) @ x) / len(x)


def _run_matmulnbits(quant, x, w_shape, accuracy_level=None):
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    made, inits = s.to_matmulnbits(node, "w", quant, w_shape[0], accuracy_level)
    graph = helper.make_graph([made], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_search_beats_rtn_on_weighted_error(problem, symmetric):
    w, _, hessian = problem
    importance = np.diagonal(hessian)
    base = s.rtn(w, BLOCK, symmetric)
    found = s.search(w, importance, BLOCK, symmetric)
    assert s.weighted_error(w, found, importance) < 0.9 * s.weighted_error(w, base, importance)
    assert found.q.max() <= 15 and found.q.dtype == np.uint8
    if not symmetric:
        assert found.zero_points.max() <= 15


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_search_and_rtn_on_output_error(problem, symmetric):
    w, _, hessian = problem
    base = s.output_error(w, s.rtn(w, BLOCK, symmetric), hessian)
    searched = s.output_error(w, s.search(w, np.diagonal(hessian), BLOCK, symmetric), hessian)
    compensated = s.output_error(w, s.gptq(w, hessian, BLOCK, symmetric), hessian)
    assert compensated < searched < base


def test_rtn_matches_onnxruntime_quantizer(problem):
    """The RTN reference is onnxruntime's own grid (so "better than RTN" means better than the current plan)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_4bits

    w = problem[0]
    for symmetric in (True, False):
        nb = K // BLOCK
        packed = np.zeros((N, nb, BLOCK // 2), np.uint8)
        zp = np.zeros((N, (nb + 1) // 2), np.uint8)
        scales = np.zeros((N, nb), np.float32)
        quantize_matmul_4bits(packed, np.ascontiguousarray(w), scales, zp, BLOCK, N, K, symmetric)
        ours = s.rtn(w, BLOCK, symmetric)
        ours_packed, ours_zp = s.pack(ours)
        np.testing.assert_allclose(ours.scales, scales, rtol=1e-6)
        assert (ours_packed != packed).mean() < 0.01  # ties may round the other way
        if not symmetric:
            np.testing.assert_array_equal(ours_zp, zp)


@pytest.mark.parametrize("algorithm", ["search", "gptq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_round_trip(problem, algorithm, symmetric):
    """MatMulNBits computes x @ the dequantized weights the algorithm reports (float activations: exact up to
    float rounding; accuracy_level 4, int8 activations, within their rounding)."""
    w, x, hessian = problem
    quant = (s.gptq(w, hessian, BLOCK, symmetric) if algorithm == "gptq"
             else s.search(w, np.diagonal(hessian), BLOCK, symmetric))
    expected = x[:64] @ quant.dequantize(K)
    got = _run_matmulnbits(quant, x[:64], w.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    got4 = _run_matmulnbits(quant, x[:64], w.shape, accuracy_level=4)
    assert np.abs(got4 - expected).max() < 0.02 * np.abs(expected).max()


def test_odd_block_count_packs_zero_points():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (K + BLOCK, N)).astype(np.float32)  # 4 blocks → then 5 with a partial one
    for k in (K, K + 16):
        quant = s.search(w[:k], None, BLOCK, symmetric=False)
        packed, zp = s.pack(quant)
        assert packed.shape == (N, -(-k // BLOCK), BLOCK // 2) and zp.shape == (N, (-(-k // BLOCK) + 1) // 2)
        low = zp & 0x0F
        np.testing.assert_array_equal(low, quant.zero_points[:, 0::2])


def test_calibration_prompts_are_not_the_evaluation_prompts():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "quant_quality.py"
    spec = importlib.util.spec_from_file_location("quant_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    texts = {m["content"] for conv in s.calibration_conversations() for m in conv}
    assert not texts & set(module.TEXT_PROMPTS + module.IMAGE_PROMPTS)


def test_int4_default_runs_gptq_in_a_package_and_rtn_where_its_hessians_would_not_fit(tiny_package_portable,
                                                                                       tmp_path):
    """The int4 default calibrates (GPTQ, block 64) on the fp32 package the decoder lies in; over the Hessian memory
    bound, and for a lone graph file, it is round to nearest at block 32, and the report says why."""
    import json
    import shutil

    import onnx

    from edgevlm.export import quantize as q

    decoder = json.loads((tiny_package_portable / "model.json").read_text())["graphs"]["decoder"]["file"]

    def blocks(path):
        return {a.i for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"
                for a in n.attribute if a.name == "block_size"}

    report = q.quantize_graph(tiny_package_portable / decoder, tmp_path / "gptq.onnx", "int4", graph="decoder")
    assert "GPTQ, act order" in report.method and blocks(tmp_path / "gptq.onnx") == {64}
    report = q.quantize_graph(tiny_package_portable / decoder, tmp_path / "big.onnx", "int4", graph="decoder",
                              options=q.QuantOptions(gptq_memory_bytes=1000))
    assert "GPTQ not run: its Hessians would hold" in report.method and blocks(tmp_path / "big.onnx") == {32}
    lone = tmp_path / "lone"
    lone.mkdir()
    for f in tiny_package_portable.iterdir():
        if f.name.startswith(decoder):
            shutil.copy(f, lone / f.name)
    report = q.quantize_graph(lone / decoder, tmp_path / "lone.onnx", "int4", graph="decoder")
    assert "GPTQ" not in report.method and blocks(tmp_path / "lone.onnx") == {32}
