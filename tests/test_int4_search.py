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


@pytest.fixture(scope="module")
def uneven_package(tiny_package, tmp_path_factory):
    """The tiny fp32 package with uneven activations, as a trained model has: each layer's norm gammas and the up
    half of its gate_up columns multiplied by exp(1.5 N(0, 1)) per channel (a valid model of its own; the oracle
    of these tests is its fp32 logits). → (package, decoder file, number of layers)."""
    import json
    import shutil

    import onnx
    from onnx import numpy_helper

    from edgevlm.runtime.package import sha256_file

    package = tmp_path_factory.mktemp("uneven") / "package"
    shutil.copytree(tiny_package, package)
    manifest = json.loads((package / "model.json").read_text())
    decoder = manifest["graphs"]["decoder"]["file"]
    model = onnx.load(str(package / decoder))
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        a = numpy_helper.to_array(tensor).astype(np.float32).copy()
        if "layers." in tensor.name and "layernorm" in tensor.name:
            a *= np.exp(1.5 * rng.standard_normal(a.shape)).astype(np.float32)
        elif "gate_up_proj" in tensor.name:
            a[:, a.shape[1] // 2:] *= np.exp(1.5 * rng.standard_normal(a.shape[1] // 2)).astype(np.float32)
        else:
            continue
        tensor.CopyFrom(numpy_helper.from_array(a, tensor.name))
    onnx.save(model, str(package / decoder))
    manifest["files"][decoder] = {"bytes": (package / decoder).stat().st_size,
                                  "sha256": sha256_file(package / decoder)}
    (package / "model.json").write_text(json.dumps(manifest))
    return package, decoder, manifest["text"]["num_layers"]


def _prefill_logits(package):
    from edgevlm.runtime.engine import Engine
    from edgevlm.runtime.package import ModelPackage

    ids = (np.arange(40) * 29 + 3) % 500 + 20
    return Engine(ModelPackage.load(package, verify=False), threads=2).prefill(ids)[0]


def _copy(package, to):
    import shutil

    shutil.copytree(package, to)
    return to


def test_activation_aware_scaling_folds_exactly_into_the_norms_and_up_columns(uneven_package, tmp_path,
                                                                              monkeypatch):
    """With the rounding taken out (each MatMulNBits written back as a float MatMul of the scaled weight it was
    quantized from), the input scaling must leave the model's logits unchanged: 1/s folded into each norm's gamma
    and into the up columns of gate_up, s into the weights. A fold left out or put in the wrong place moves them by
    the scales themselves (here by ~1 in logits of ~1.6)."""
    import onnx
    from onnx import helper, numpy_helper

    package, decoder, layers = uneven_package
    reference = _prefill_logits(package)
    scaled_weights = {}
    real_gptq = s.gptq

    def keeping_gptq(w, hessian, *args, **kwargs):
        quant = real_gptq(w, hessian, *args, **kwargs)
        scaled_weights[id(quant)] = (quant, w.copy())
        return quant

    def float_matmul(node, weight_name, quant, k, accuracy_level):
        init = numpy_helper.from_array(scaled_weights[id(quant)][1], weight_name + "_scaled")
        return helper.make_node("MatMul", [node.input[0], init.name], list(node.output), name=node.name), [init]

    monkeypatch.setattr(s, "gptq", keeping_gptq)
    monkeypatch.setattr(s, "to_matmulnbits", float_matmul)
    model, summary = s.quantize_matmuls(onnx.load(str(package / decoder)), algorithm="gptq", block=32,
                                        symmetric=True, accuracy_level=None, package_dir=package,
                                        scale_alphas=(1.0,))
    assert summary["scaled"] == 3 * layers  # qkv (input norm), gate_up (post-attention norm), down (act * up)
    out = _copy(package, tmp_path / "folded")
    onnx.save(model, str(out / decoder))
    logits = _prefill_logits(out)
    assert np.abs(logits - reference).max() < 1e-4 * np.abs(reference).max()
    gammas = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if "layernorm" in t.name}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(package / decoder)).graph.initializer}
    assert sum(not np.allclose(g, original[name]) for name, g in gammas.items()) == 2 * layers


def test_activation_aware_scaling_lowers_the_4bit_error_where_activations_are_uneven(uneven_package, tmp_path):
    """The default int4 plan (a grid of scaling exponents, the one with the least output error per MatMul after
    GPTQ) and its faster variant (the exponent picked by round to nearest's error) against the same GPTQ unscaled,
    end to end on the package's prefill logits."""
    from edgevlm.export import quantize as q

    package, decoder, layers = uneven_package
    reference = _prefill_logits(package)
    errors = {}
    plans = (("default", q.QuantOptions()), ("rtn-select", q.QuantOptions(int4_scale_select="rtn")),
             ("unscaled", q.QuantOptions(int4_scale_alphas=())))
    for name, options in plans:
        out = _copy(package, tmp_path / name)
        report = q.quantize_graph(package / decoder, out / decoder, "int4", graph="decoder", options=options)
        assert ("activation-aware input scaling" in report.method) == (name != "unscaled")
        errors[name] = np.abs(_prefill_logits(out) - reference).max()
    assert errors["default"] < 0.6 * errors["unscaled"]
    assert errors["rtn-select"] < 0.6 * errors["unscaled"]
    with pytest.raises(ValueError, match="scale_select"):
        q.quantize_graph(package / decoder, tmp_path / "bad.onnx", "int4", graph="decoder",
                         options=q.QuantOptions(int4_scale_select="best"))
