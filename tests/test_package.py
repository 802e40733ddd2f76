"""model.json: what the exporter records, and a runtime that refuses a package that does not match it."""

from __future__ import annotations

import json
import shutil

import pytest

from edgevlm.runtime.errors import PackageError
from edgevlm.runtime.package import ModelPackage, sha256_file


@pytest.fixture
def package_copy(tiny_package, tmp_path):
    return shutil.copytree(tiny_package, tmp_path / "pkg")


def test_portable_decoder_has_onnx_communitys_interface(tiny_package_portable, hf_model):
    decoder = ModelPackage.load(tiny_package_portable).graph("decoder")
    layers = hf_model.config.text_config.num_hidden_layers
    assert decoder["file"] == "decoder_model_merged.onnx"
    assert decoder["form"] == "portable" and decoder["logits"] == "all_positions"
    assert list(decoder["inputs"])[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert [n for n in decoder["inputs"] if n.startswith("past_key_values")] == [
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert list(decoder["outputs"]) == ["logits"] + [
        f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def test_manifest_describes_the_graphs_tokens_and_checksums(tiny_package, hf_model):
    package = ModelPackage.load(tiny_package)
    manifest = package.manifest
    config = hf_model.config
    assert manifest["family"] == "idefics3"
    assert set(manifest["graphs"]) == {"vision_encoder", "embed_tokens", "decoder"}
    decoder_io = manifest["graphs"]["decoder"]
    assert decoder_io["file"] == "decoder_model_fused.onnx"
    assert decoder_io["form"] == "fused" and decoder_io["logits"] == "last_position"
    assert decoder_io["past_present_share_buffer"] is True
    assert decoder_io["max_sequence_length"] == config.text_config.max_position_embeddings
    layers = config.text_config.num_hidden_layers
    assert list(decoder_io["inputs"]) == ["inputs_embeds"] + [
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")] + [
        "seqlens_k", "total_sequence_length"]
    assert list(decoder_io["outputs"]) == ["logits"] + [
        f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert manifest["graphs"]["vision_encoder"]["inputs"]["pixel_attention_mask"]["dtype"] == "bool"
    assert manifest["text"]["num_key_value_heads"] == config.text_config.num_key_value_heads
    assert manifest["text"]["head_dim"] == config.text_config.head_dim
    assert manifest["vision"]["image_seq_len"] == 16
    # SmolVLM ends a turn with <end_of_utterance> and its text model's eos is <|im_end|>: stop on both.
    assert sorted(manifest["tokens"]["eos_token_ids"]) == [2, 49279]
    assert manifest["tokens"]["image_token_id"] == config.image_token_id == 49190
    assert manifest["verification"]["ok"] is True
    for name, entry in manifest["files"].items():
        assert sha256_file(package.path / name) == entry["sha256"]
    assert {"tokenizer.json", "chat_template.jinja", "decoder_model_fused.onnx"} <= set(manifest["files"])


def test_corrupted_graph_is_refused_with_a_clear_error(package_copy):
    graph = package_copy / "decoder_model_fused.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"decoder_model_fused\.onnx does not match its sha256"):
        ModelPackage.load(package_copy)


def test_truncated_and_missing_files_are_refused(package_copy):
    tokenizer = package_copy / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])
    with pytest.raises(PackageError, match=r"tokenizer\.json is 100 bytes, model\.json says"):
        ModelPackage.load(package_copy)
    tokenizer.unlink()
    with pytest.raises(PackageError, match=r"tokenizer\.json is missing"):
        ModelPackage.load(package_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(family="llava"), "model family 'llava' is not supported"),
    (lambda m: m.update(format_version=99), "format version 99 is not supported"),
    (lambda m: m.update(format="something-else"), "not an edgevlm package manifest"),
])
def test_manifest_that_this_runtime_cannot_run_is_refused(package_copy, edit, message):
    manifest_path = package_copy / "model.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=message):
        ModelPackage.load(package_copy)


def test_not_a_package(tmp_path):
    with pytest.raises(PackageError, match="no such directory"):
        ModelPackage.load(tmp_path / "nope")
    with pytest.raises(PackageError, match="model.json is missing"):
        ModelPackage.load(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(PackageError, match="not readable JSON"):
        ModelPackage.load(tmp_path)


def test_fused_float32_decoder_is_refused_on_cuda_with_a_clear_error(tiny_package, monkeypatch):
    """onnxruntime's CUDA GroupQueryAttention is fp16-only: a fused fp32 package on a GPU would silently run its
    attention on the CPU, so the engine says what to export instead (the CUDA provider is faked here)."""
    from edgevlm.runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "_providers", lambda device: ["CPUExecutionProvider"])
    with pytest.raises(PackageError, match=r"fused float32 decoder is built for CPUs.*--quant fp16"):
        engine_module.Engine(ModelPackage.load(tiny_package), device="cuda")


def test_a_gpu_engine_that_onnxruntime_puts_on_the_cpu_is_an_error(tiny_package_portable, monkeypatch):
    """Asked for CUDA, onnxruntime starts a session on the CPU when the CUDA provider cannot start (here: this CPU
    build has none, and the engine's own availability check is bypassed); the engine refuses to run that way
    rather than serve a GPU deployment at CPU speed with only a hidden warning."""
    from edgevlm.runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "_providers", lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(PackageError, match=r"did not start on CUDAExecutionProvider \(onnxruntime fell back to "
                                           r"CPUExecutionProvider\)"):
        engine_module.Engine(ModelPackage.load(tiny_package_portable), device="cuda")
