"""export/quantize.py on the tiny random-weight package: int8, int4 and fp16 graphs load in onnxruntime, keep their
inputs and outputs, shrink, quantize every weight MatMul, and stay close to the fp32 outputs.

Random-weight tiny models have almost flat logits, so greedy tokens are not compared after quantization: the error
is bounded relative to the fp32 output's scale instead, and top-1 agreement is only recorded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgevlm.export import quantize as q

GRAPHS = dict(q.GRAPH_FILES)
MODES = ("int8", "int4", "fp16")

# max |quantized - fp32| / max |fp32| on the tiny package (measured: int8 0.004 / 0.012 / 0.013,
# int4 0.065 / 0.11 / 0.17, fp16 < 0.001). Embedding bounds follow from the formats: int8 per row rounds to within
# rowmax/254, symmetric 4-bit blocks to within blockmax/16.
BOUNDS = {
    ("embed_tokens", "int8"): 1 / 254 + 1e-6,
    ("embed_tokens", "int4"): 1 / 16 + 1e-6,
    ("embed_tokens", "fp16"): 1e-3,
    ("vision_encoder", "int8"): 0.05,
    ("vision_encoder", "int4"): 0.25,
    ("vision_encoder", "fp16"): 5e-3,
    ("decoder", "int8"): 0.08,
    ("decoder", "int4"): 0.35,
    ("decoder", "fp16"): 5e-3,
}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def quantized(tiny_package_portable, tmp_path_factory):
    """{(graph, mode): (path, report)} for every graph in every mode."""
    out = tmp_path_factory.mktemp("quantized")
    result = {}
    for mode in MODES:
        folder = out / mode
        for graph, file in GRAPHS.items():
            report = q.quantize_graph(tiny_package_portable / file, folder / file, mode, graph=graph)
            result[graph, mode] = (folder / file, report)
    return result


@pytest.fixture(scope="module")
def manifest(tiny_package_portable) -> dict:
    return json.loads((tiny_package_portable / "model.json").read_text())


@pytest.fixture(scope="module")
def inputs(manifest, tiny_package_portable):
    """One input per graph, and the fp32 output for it."""
    rng = np.random.default_rng(0)
    side = manifest["vision"]["image_size"]
    text = manifest["text"]
    ids = rng.integers(0, text["vocab_size"] - 200, size=(1, 12)).astype(np.int64)
    embeds = _session(tiny_package_portable / GRAPHS["embed_tokens"]).run(None, {"input_ids": ids})[0]
    feeds = {
        "vision_encoder": {"pixel_values": rng.uniform(-1, 1, (1, 2, 3, side, side)).astype(np.float32),
                           "pixel_attention_mask": np.ones((1, 2, side, side), bool)},
        "embed_tokens": {"input_ids": ids},
        "decoder": _decoder_feeds(embeds, text, np.float32),
    }
    reference = {g: _session(tiny_package_portable / GRAPHS[g]).run(None, feeds[g])[0] for g in GRAPHS}
    return feeds, reference


def _decoder_feeds(embeds, text, kv_dtype, start=0):
    seq = embeds.shape[1]
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, seq), np.int64),
             "position_ids": np.arange(start, start + seq, dtype=np.int64)[None]}
    for i in range(text["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, text["num_key_value_heads"], 0, text["head_dim"]),
                                                            kv_dtype)
    return feeds


def _weight_matmuls(model) -> list[str]:
    inits = {t.name for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]


def _ops(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_loads_with_same_io(quantized, tiny_package_portable, graph, mode):
    path, report = quantized[graph, mode]
    before, after = _session(tiny_package_portable / GRAPHS[graph]), _session(path)
    io = lambda s: [(v.name, v.type) for v in s.get_inputs()] + [(v.name, v.type) for v in s.get_outputs()]
    expected = io(before)
    if graph == "decoder" and mode == "fp16":
        assert report.kv_dtype == "float16"
        expected = [(name, "tensor(float16)" if name.startswith(("past_key_values.", "present.")) else kind)
                    for name, kind in expected]
    else:
        assert report.kv_dtype is None
    assert io(after) == expected
    assert report.files == [path.name]
    assert report.bytes_after == path.stat().st_size
    assert report.bytes_before == (tiny_package_portable / GRAPHS[graph]).stat().st_size


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_smaller(quantized, graph, mode):
    _, report = quantized[graph, mode]
    print(f"{graph} {mode}: {report.bytes_before} → {report.bytes_after} bytes ({report.ratio:.1%})")
    assert report.bytes_after < report.bytes_before
    if graph != "vision_encoder":  # the tiny vision graph is mostly graph structure, not weights
        # int4 decoder: its 8-bit output projection (64 × 49,280) is nearly all of the tiny decoder's weights.
        limit = {"int8": 0.30, "int4": 0.30 if graph == "decoder" else 0.20, "fp16": 0.55}[mode]
        assert report.ratio < limit, report.lines()


def _check_all_weight_matmuls_quantized(src: Path, path: Path, report, new_op: str) -> list:
    weight_matmuls = _weight_matmuls(onnx.load(str(src)))
    assert _weight_matmuls(onnx.load(str(path))) == []
    ops_before, ops_after = _ops(src), _ops(path)
    assert ops_after.get(new_op, 0) == len(weight_matmuls)
    # What stays MatMul multiplies two activations (attention, rotary): unchanged in number (none in a vision
    # graph whose attention is the fused MultiHeadAttention).
    assert ops_after.get("MatMul", 0) == ops_before["MatMul"] - len(weight_matmuls) == report.activation_matmuls
    assert report.quantized == {"MatMul": len(weight_matmuls)}
    assert report.warnings == []
    return weight_matmuls


@pytest.mark.parametrize("mode", ("int8", "int4"))
@pytest.mark.parametrize("graph", ("vision_encoder", "decoder"))
def test_every_weight_matmul_is_quantized(quantized, tiny_package_portable, graph, mode):
    path, report = quantized[graph, mode]
    dynamic = graph == "vision_encoder" and mode == "int8"  # vision int8 is quantize_dynamic, the rest MatMulNBits
    weight_matmuls = _check_all_weight_matmuls_quantized(tiny_package_portable / GRAPHS[graph], path, report,
                                                         "MatMulInteger" if dynamic else "MatMulNBits")
    assert len(weight_matmuls) == (13 if graph == "vision_encoder" else 15)  # 2 layers × 6 or 7 linears + 1
    left = [(item.op_type, item.node) for item in report.left_in_float]
    assert left == ([("Conv", "/patch_embedding/Conv")] if graph == "vision_encoder" else [])
    if not dynamic:
        # the vision tower's tanh GELU is onnxruntime's FastGelu from the fp32 export on
        assert report.contrib_ops == (["FastGelu", "MatMulNBits"] if graph == "vision_encoder" else ["MatMulNBits"])
        bits = {}
        for node in onnx.load(str(path)).graph.node:
            if node.op_type == "MatMulNBits":
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                # int4: GPTQ at block 64 for the decoder (in its package), round to nearest at 32 for the rest
                block = 64 if mode == "int4" and graph == "decoder" else 32
                assert (attrs["block_size"], attrs.get("accuracy_level")) == (block, 4)
                bits[attrs["bits"]] = bits.get(attrs["bits"], 0) + 1
        expected = {8: len(weight_matmuls)} if mode == "int8" else {4: len(weight_matmuls)}
        if graph == "decoder" and mode == "int4":  # the output projection (lm_head) stays 8-bit
            expected = {4: len(weight_matmuls) - 1, 8: 1}
        assert bits == expected


@pytest.mark.parametrize("graph", ("vision_encoder", "decoder"))
def test_int8_methods(tiny_package_portable, tmp_path, inputs, graph):
    """Both int8 methods quantize every weight MatMul of both graphs and stay close to fp32."""
    feeds, reference = inputs
    for method, new_op in (("dynamic", "MatMulInteger"), ("matmulnbits", "MatMulNBits")):
        path = tmp_path / f"{method}.onnx"
        report = q.quantize_graph(tiny_package_portable / GRAPHS[graph], path, "int8", graph=graph,
                                  options=q.QuantOptions(int8_method=method))
        _check_all_weight_matmuls_quantized(tiny_package_portable / GRAPHS[graph], path, report, new_op)
        out = _session(path).run(None, feeds[graph])[0]
        assert np.abs(out - reference[graph]).max() / np.abs(reference[graph]).max() < BOUNDS[graph, "int8"]


def test_embedding_table_quantized(quantized):
    path, report = quantized["embed_tokens", "int8"]
    inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    assert report.quantized == {"Gather": 1} and report.left_in_float == []
    assert [t.data_type for t in inits.values() if len(t.dims) == 2 and t.dims[1] > 1] == [TensorProto.INT8]
    path, report = quantized["embed_tokens", "int4"]
    assert _ops(path) in ({"GatherBlockQuantized": 1}, {"GatherBlockQuantized": 1, "Cast": 1})  # fp16-stored scales
    assert report.contrib_ops == ["GatherBlockQuantized"]


def test_fp16_structure(quantized):
    for graph in GRAPHS:
        path, report = quantized[graph, "fp16"]
        model = onnx.load(str(path))
        weights = [t for t in model.graph.initializer if len(t.dims) == 2 and min(t.dims) > 1]
        assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights), graph
        boundary = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
        for name in ("pixel_values", "image_features", "inputs_embeds", "logits"):
            if name in boundary:
                assert boundary[name] == TensorProto.FLOAT, (graph, name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_outputs_close_to_fp32(quantized, inputs, graph, mode, record_property):
    feeds, reference = inputs
    path, report = quantized[graph, mode]
    session = _session(path)
    if graph == "decoder" and report.kv_dtype == "float16":
        feeds = {k: v.astype(np.float16) if k.startswith("past_key_values.") else v for k, v in feeds[graph].items()}
    else:
        feeds = feeds[graph]
    out = session.run(None, feeds)[0]
    ref = reference[graph]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert np.isfinite(out).all()
    error = float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())
    record_property("relative_error", error)
    if graph == "decoder":
        record_property("top1_agreement", float((out.argmax(-1) == ref.argmax(-1)).mean()))
    assert error <= BOUNDS[graph, mode], f"{graph} {mode}: max|Δ|/max|ref| = {error:.4f}"


def test_fp16_decoder_far_positions(quantized, tiny_package_portable, inputs, manifest):
    """Rotary angles at position ~3,000 are computed in float32: float16 cannot even represent the positions."""
    feeds, _ = inputs
    embeds = feeds["decoder"]["inputs_embeds"]
    reference = _session(tiny_package_portable / GRAPHS["decoder"]).run(
        None, _decoder_feeds(embeds, manifest["text"], np.float32, start=3001))[0]
    path, _ = quantized["decoder", "fp16"]
    out = _session(path).run(None, _decoder_feeds(embeds, manifest["text"], np.float16, start=3001))[0]
    assert np.abs(out - reference).max() / np.abs(reference).max() < 5e-3


def test_fp16_keeps_norm_statistics_and_rotary_in_fp32(quantized):
    """x² of RMSNorm overflows float16 past |x| = 256 on GPUs, rotary angles need float32: check those stay float32.

    (On CPU onnxruntime computes most float16 ops in float32 anyway, so this is checked on the graph's types.)
    """
    path, _ = quantized["decoder", "fp16"]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    stats = [n for n in model.graph.node if n.op_type in ("Pow", "ReduceMean", "Sqrt", "Cos", "Sin")]
    assert len([n for n in stats if n.op_type == "Pow"]) == 5  # 2 layers × 2 norms + the final norm
    assert {n.op_type for n in stats} == {"Pow", "ReduceMean", "Sqrt", "Cos", "Sin"}
    assert {types[n.output[0]] for n in stats} == {TensorProto.FLOAT}
    matmul_weights = [t for t in model.graph.initializer if len(t.dims) == 2 and min(t.dims) > 1]
    assert {t.data_type for t in matmul_weights} == {TensorProto.FLOAT16}


def test_package_plan_runs_in_engine(tiny_package_portable, tmp_path, inputs):
    """`--quant int4` (decoder int4, vision and embeddings int8) and fp16 packages run through the runtime Engine."""
    from edgevlm.runtime.engine import Engine
    from edgevlm.runtime.package import ModelPackage

    assert q.plan_for("int4") == {"vision_encoder": "int8", "embed_tokens": "int4", "decoder": "int4"}
    reference = Engine(ModelPackage.load(tiny_package_portable), threads=2)
    ids = inputs[0]["embed_tokens"]["input_ids"]
    ref_logits, _ = reference.prefill(ids)
    for quant in ("int4", "fp16"):
        out = tmp_path / quant
        shutil.copytree(tiny_package_portable, out)
        reports = q.quantize_package_graphs(tiny_package_portable, out, q.plan_for(quant))
        manifest = json.loads((out / "model.json").read_text())
        for graph, report in reports.items():
            manifest["graphs"][graph].update(report.manifest_entry())
        (out / "model.json").write_text(json.dumps(manifest))
        engine = Engine(ModelPackage.load(out, verify=False), threads=2)
        logits, cache = engine.prefill(ids)
        assert cache.keys[0].numpy().dtype == (np.float16 if quant == "fp16" else np.float32)
        logits, cache = engine.decode_step(int(logits[0, -1].argmax()), cache)
        assert logits.shape == (1, 1, ref_logits.shape[-1]) and np.isfinite(logits).all()
        assert cache.length == ids.shape[1] + 1
        bound = 0.35 if quant == "int4" else 5e-3
        full, _ = engine.prefill(ids)
        assert np.abs(full - ref_logits).max() / np.abs(ref_logits).max() < bound


def _gemm_model(path: Path, rng) -> None:
    """x[4,16] → Gemm(const W^T, alpha 0.5, beta 2, bias) → y1; Gemm(x, runtime B) → y2."""
    w = rng.normal(size=(32, 16)).astype(np.float32)
    bias = rng.normal(size=(32,)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "bias"], ["y1"], name="linear", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Gemm", ["x", "b"], ["y2"], name="runtime_b"),
    ]
    graph = helper.make_graph(
        nodes, "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [16, 8])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [4, 32]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("mode", ("int8", "int4"))
def test_gemm_is_rewritten_and_quantized(tmp_path, mode):
    rng = np.random.default_rng(1)
    src = tmp_path / "gemm.onnx"
    _gemm_model(src, rng)
    report = q.quantize_graph(src, tmp_path / f"gemm_{mode}.onnx", mode, graph="other")
    assert report.gemm_rewritten == 1
    assert report.quantized == {"MatMul": 1}
    assert [(i.op_type, i.node) for i in report.left_in_float] == [("Gemm", "runtime_b")]
    assert "not a constant weight" in report.left_in_float[0].reason
    feeds = {"x": rng.normal(size=(4, 16)).astype(np.float32), "b": rng.normal(size=(16, 8)).astype(np.float32)}
    ref = _session(src).run(None, feeds)
    out = _session(tmp_path / f"gemm_{mode}.onnx").run(None, feeds)
    np.testing.assert_array_equal(out[1], ref[1])
    assert np.abs(out[0] - ref[0]).max() / np.abs(ref[0]).max() < (0.02 if mode == "int8" else 0.1)


def test_large_float_weights_are_stored_as_fp16(tmp_path):
    """A patch Conv weight and a Gather table that int8 leaves in float (a vision tower's patch embedding and
    position table) are stored as float16 + Cast; small weights and other uses (an Add's constant: biases, rotary
    caches) stay float32; the graph computes as before within fp16 rounding."""
    rng = np.random.default_rng(3)
    weights = {
        "conv": rng.normal(scale=0.02, size=(4, 3, 16, 16)),  # 3,072 elements: below the threshold
        "big_conv": rng.normal(scale=0.02, size=(96, 3, 16, 16)),  # 73,728
        "table": rng.normal(scale=0.02, size=(1024, 96)),
        "bias": rng.normal(size=(64, 96)),  # 6,144 elements, but an Add's: not a storage use
    }
    nodes = [
        helper.make_node("Conv", ["pixels", "conv"], ["small"], strides=[16, 16]),
        helper.make_node("Conv", ["pixels", "big_conv"], ["big"], strides=[16, 16]),
        helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
        helper.make_node("Add", ["x", "bias"], ["shifted"]),
    ]
    graph = helper.make_graph(
        nodes, "floats",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 64, 64]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [5]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 96])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("small", "shifted", "big", "rows")],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    src = tmp_path / "floats.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    report = q.quantize_graph(src, tmp_path / "floats_int8.onnx", "int8", graph="vision_encoder")
    assert "2 float weights stored as float16" in report.method
    model = onnx.load(str(tmp_path / "floats_int8.onnx"))
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    assert dtypes == {"conv": TensorProto.FLOAT, "big_conv_fp16": TensorProto.FLOAT16,
                      "table_fp16": TensorProto.FLOAT16, "bias": TensorProto.FLOAT}
    assert report.bytes_after < report.bytes_before - (73_728 + 98_304) * 2 + 4096
    feeds = {"pixels": rng.normal(size=(1, 3, 64, 64)).astype(np.float32), "ids": np.array([0, 5, 1023, 5, 7]),
             "x": rng.normal(size=(64, 96)).astype(np.float32)}
    ref = _session(src).run(None, feeds)
    out = _session(tmp_path / "floats_int8.onnx").run(None, feeds)
    np.testing.assert_array_equal(out[0], ref[0])
    np.testing.assert_array_equal(out[1], ref[1])
    for got, want in zip(out[2:], ref[2:]):
        assert got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()  # float16's 11 bits, summed over 768 terms
        assert not np.array_equal(got, want)  # the rounding happened: this is the fp16-stored weight


def test_external_data_in_and_out(tiny_package_portable, tmp_path, inputs, monkeypatch):
    """A graph with external data quantizes; a result past the size limit gets one `<name>_data` file."""
    src = tmp_path / "in" / GRAPHS["decoder"]
    src.parent.mkdir()
    model = onnx.load(str(tiny_package_portable / GRAPHS["decoder"]))
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=src.name + "_data", size_threshold=1024)
    assert (src.parent / (src.name + "_data")).is_file()
    feeds, reference = inputs

    small = q.quantize_graph(src, tmp_path / "one" / src.name, "int4", graph="decoder")
    assert small.files == [src.name]
    assert small.bytes_before == sum(p.stat().st_size for p in src.parent.iterdir())

    monkeypatch.setattr(q, "EXTERNAL_DATA_THRESHOLD", 1024 * 1024)
    big = q.quantize_graph(src, tmp_path / "two" / src.name, "int4", graph="decoder")
    assert big.files == [src.name, src.name + "_data"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(big.files)
    assert big.bytes_after == sum((tmp_path / "two" / n).stat().st_size for n in big.files)
    one = _session(tmp_path / "one" / src.name).run(None, feeds["decoder"])[0]
    two = _session(tmp_path / "two" / src.name).run(None, feeds["decoder"])[0]
    np.testing.assert_array_equal(one, two)

    # In place: the graph is replaced and its old external data file removed.
    monkeypatch.undo()
    again = q.quantize_graph(src, src, "int8", graph="decoder")
    assert again.files == [src.name] and sorted(p.name for p in src.parent.iterdir()) == [src.name]
    assert np.abs(_session(src).run(None, feeds["decoder"])[0] - reference["decoder"]).max() < 1.0


def test_errors(tiny_package_portable, tmp_path):
    with pytest.raises(q.QuantizationError, match="unknown quantization mode"):
        q.quantize_graph(tiny_package_portable / GRAPHS["decoder"], tmp_path / "x.onnx", "int3")
    with pytest.raises(q.QuantizationError, match="unknown quantization"):
        q.plan_for("nf4")
    with pytest.raises(q.QuantizationError, match="no such graph"):
        q.quantize_graph(tmp_path / "missing.onnx", tmp_path / "x.onnx", "int8")
    with pytest.raises(q.QuantizationError, match="does not have"):
        q.quantize_package_graphs(tiny_package_portable, tmp_path / "out", {"audio_encoder": "int8"})
