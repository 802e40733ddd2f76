"""Tied embeddings (export/tied.py): when lm_head is the embedding table, a quantized package stores it once.

The tiny SmolVLM checkpoint is untied (as SmolVLM-256M is); a copy with lm_head set to the embedding table stands in
for the checkpoints that tie them (Qwen2-VL-2B, Qwen2.5-VL-3B, SmolLM2). The embed_tokens graph must then give what
the decoder's own 8-bit MatMulNBits lm_head dequantizes to (checked by running that node in onnxruntime), within
8-bit block rounding of the float table, and the exported package must pass verification and serve.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgevlm.export import quantize as q
from edgevlm.export.convert import Progress, export_package
from edgevlm.export.tied import TIED_FILE, tied_table


@pytest.fixture(scope="module")
def tied_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("tied") / "checkpoint"
    shutil.copytree(tiny_checkpoint, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.text_model.embed_tokens.weight"].copy()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _export(checkpoint, out, quant):
    with open(os.devnull, "w") as quiet:
        package, report = export_package(str(checkpoint), out, quant=quant, progress=Progress(quiet))
    assert report.ok, "\n".join(report.lines())
    return package.path


@pytest.fixture(scope="module")
def packages(tied_checkpoint, tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("tied-packages")
    return {"tied": _export(tied_checkpoint, root / "tied", "int4"),
            "untied": _export(tiny_checkpoint, root / "untied", "int4")}


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _lm_head_dequantized(package: Path) -> np.ndarray:
    """Run the decoder's own lm_head MatMulNBits node on the identity: its dequantized weight, [hidden, vocab]."""
    decoder = onnx.load(str(package / "decoder_model_fused.onnx"), load_external_data=True)
    node = next(n for n in decoder.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {t.name: t for t in decoder.graph.initializer}
    casts = [n for n in decoder.graph.node if n.op_type == "Cast" and n.output[0] in node.input[1:]]  # fp16 scales
    sources = [name for name in node.input[1:] if name in inits] + [c.input[0] for c in casts]
    graph = helper.make_graph(
        casts + [helper.make_node("MatMulNBits", ["a", *node.input[1:]], ["y"], domain="com.microsoft", **attrs)],
        "head",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", attrs["K"]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", attrs["N"]])],
        initializer=[inits[name] for name in sources])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"a": np.eye(attrs["K"], dtype=np.float32)})[0]


def test_detects_tied_tables_only(tied_checkpoint, tiny_checkpoint, tmp_path):
    for name, checkpoint, expected in (("tied", tied_checkpoint, True), ("untied", tiny_checkpoint, False)):
        fp32 = _export(checkpoint, tmp_path / name, "fp32")
        assert tied_table(fp32 / "embed_tokens.onnx", fp32 / "decoder_model_fused.onnx") is expected


def test_tied_package_stores_the_table_once(packages):
    tied, untied = packages["tied"], packages["untied"]
    manifest = json.loads((tied / "model.json").read_text())
    assert manifest["graphs"]["embed_tokens"]["external_data"] == [TIED_FILE]
    # the decoder's other weights are in its own data file (which its int8 prefill graph reads too)
    assert TIED_FILE in manifest["graphs"]["decoder"]["external_data"]
    assert list(manifest["files"]).count(TIED_FILE) == 1
    assert "external_data" not in json.loads((untied / "model.json").read_text())["graphs"]["embed_tokens"]
    assert not (untied / TIED_FILE).exists()
    # The table's bytes are gone from embed_tokens: what is left is a few nodes and the reshape constant.
    assert (tied / "embed_tokens.onnx").stat().st_size < 4096
    embed = onnx.load(str(tied / "embed_tokens.onnx"), load_external_data=False)
    assert {n.op_type for n in embed.graph.node} == {"Gather", "Cast", "Sub", "Mul", "Reshape"}
    size = {name: sum(f.stat().st_size for f in p.iterdir()) for name, p in packages.items()}
    untied_table = (untied / "embed_tokens.onnx").stat().st_size
    assert size["tied"] <= size["untied"] - untied_table + 8192  # the package lost its second copy of the table


def test_embedding_is_what_the_lm_head_dequantizes_to(packages, tied_checkpoint):
    from safetensors.numpy import load_file

    tied = packages["tied"]
    table = load_file(str(tied_checkpoint / "model.safetensors"))["model.text_model.embed_tokens.weight"]
    vocab, hidden = table.shape
    ids = np.arange(vocab, dtype=np.int64).reshape(1, -1)
    rows = _session(tied / "embed_tokens.onnx").run(None, {"input_ids": ids})[0][0]
    np.testing.assert_allclose(rows, _lm_head_dequantized(tied).T, rtol=0, atol=1e-6)
    # 8-bit blocks of 64 (the int4 plan's block) along the hidden axis, symmetric (onnxruntime's grid is [-128, 127]
    # times max/-128, so the value opposite the block's extreme clips by up to one step): within one step of
    # absmax/128, plus the float16-stored scale's rounding (2^-11 relative, times up to 128 steps: 1/16 of a step)
    blocks = table.astype(np.float32).reshape(vocab, hidden // 64, 64)
    step = np.abs(blocks).max(axis=-1, keepdims=True) / 128
    assert (np.abs(rows.reshape(blocks.shape) - blocks) <= step * (1 + 1 / 16) + 1e-7).all()
    # the ids a batch of prompts would use, in any shape
    some = np.array([[5, 17, 5], [0, vocab - 1, 42]], dtype=np.int64)
    out = _session(tied / "embed_tokens.onnx").run(None, {"input_ids": some})[0]
    np.testing.assert_array_equal(out, rows[some])


def test_asymmetric_blocks_share_their_zero_points(tied_checkpoint, tmp_path):
    fp32 = _export(tied_checkpoint, tmp_path / "fp32", "fp32")
    out = tmp_path / "int8"
    shutil.copytree(fp32, out)
    reports = q.quantize_package_graphs(fp32, out, q.plan_for("int8"), options=q.QuantOptions(symmetric=False))
    assert reports["embed_tokens"].files == ["embed_tokens.onnx", TIED_FILE]
    embed = onnx.load(str(out / "embed_tokens.onnx"), load_external_data=False)
    assert "tied_table_zero_points" in {t.name for t in embed.graph.initializer}
    vocab = embed.graph.initializer[0].dims[0]
    rows = _session(out / "embed_tokens.onnx").run(None, {"input_ids": np.arange(vocab).reshape(1, -1)})[0][0]
    np.testing.assert_allclose(rows, _lm_head_dequantized(out).T, rtol=0, atol=1e-6)


def test_a_refined_head_is_not_made_where_the_embedding_reads_the_8bit_blocks(tied_checkpoint, tiny_checkpoint,
                                                                            tmp_path):
    """QuantOptions.int4_output_topk (export/head_refine.py) replaces the 8-bit lm_head; a tied package keeps it, and
    shares it, while an untied one takes the refined head."""
    options = q.QuantOptions(int4_output_topk=32, int4_scale_alphas=())
    for name, checkpoint, refined in (("tied", tied_checkpoint, False), ("untied", tiny_checkpoint, True)):
        fp32 = _export(checkpoint, tmp_path / f"{name}-fp32", "fp32")
        out = tmp_path / name
        shutil.copytree(fp32, out)
        reports = q.quantize_package_graphs(fp32, out, q.plan_for("int4"), options=options)
        ops = [n.op_type for n in onnx.load(str(out / "decoder_model_fused.onnx"), load_external_data=False).graph.node]
        assert ("TopK" in ops) is refined and ("4-bit residual" in reports["decoder"].method) is refined
        assert (TIED_FILE in reports["embed_tokens"].files) is (not refined)


def test_tied_package_runs_close_to_fp32_and_serves(packages, tied_checkpoint, tmp_path):
    import edgevlm
    from edgevlm.runtime.engine import Engine
    from edgevlm.runtime.package import ModelPackage

    fp32 = _export(tied_checkpoint, tmp_path / "fp32", "fp32")
    ids = np.array([[1, 5, 9, 200, 7, 3, 11, 42]], dtype=np.int64)
    reference, _ = Engine(ModelPackage.load(fp32), threads=2).prefill(ids)
    logits, _ = Engine(ModelPackage.load(packages["tied"]), threads=2).prefill(ids)
    assert np.abs(logits - reference).max() / np.abs(reference).max() < 0.35  # test_quantize's int4 bound
    with edgevlm.load(str(packages["tied"])) as model:  # verified in full at load: the shared file is listed
        reply = model.chat([{"role": "user", "content": "Hello there"}], temperature=0, max_tokens=6)
    assert reply.usage.completion_tokens > 0
