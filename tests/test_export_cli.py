"""`edgevlm export` through its real command line: progress, verification report, and one-line user errors."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgevlm.export import convert


def run_export(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "edgevlm.runtime.cli", "export", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("edgevlm export: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.parametrize("form", ["fused", "portable"])
def test_export_writes_a_verified_package_and_reports_progress(tiny_checkpoint, tmp_path, form):
    out = tmp_path / "pkg"
    args = () if form == "fused" else ("--decoder-form", "portable")
    result = run_export(str(tiny_checkpoint), str(out), "--verify-tokens", "8", *args)
    assert result.returncode == 0, result.stderr
    decoder = {"fused": ("decoder (fused)", "decoder_model_fused"),
               "portable": ("decoder_model_merged", "decoder_model_merged")}[form]
    for step, file in (("vision_encoder", "vision_encoder"), ("embed_tokens", "embed_tokens"), decoder):
        assert f"{step}: done" in result.stderr
        assert (out / f"{file}.onnx").is_file()
    assert "greedy 8 tokens with KV cache: identical to transformers.generate" in result.stderr
    assert "FAIL" not in result.stderr
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["graphs"]["decoder"]["form"] == form
    assert manifest["verification"]["ok"] is True
    assert manifest["verification"]["max_abs_diff"]["decoder prefill logits"] <= 1e-3

    # A second export into the same folder needs --overwrite.
    assert_one_line_error(run_export(str(tiny_checkpoint), str(out)), "is not empty", "--overwrite")


def test_unsupported_architecture_names_the_supported_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert_one_line_error(run_export(str(tmp_path), str(tmp_path / "out")),
                          "unsupported model: BertModel", "supported families: idefics3")
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_and_unreachable_hub_id(tmp_path):
    assert_one_line_error(run_export(str(tmp_path / "no-such-folder"), str(tmp_path / "out")),
                          "checkpoint not found")
    assert_one_line_error(run_export("edgevlm-tests/no-such-model", str(tmp_path / "out")),
                          "checkpoint not found", "Hugging Face hub", "HF_HUB_OFFLINE is set")


def _network_namespaces_work() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-n", "true"]).returncode == 0


@pytest.mark.skipif(not _network_namespaces_work(), reason="needs `unshare -n` (root on Linux) to cut the network")
def test_unreachable_hub_fails_at_once_without_retries(tmp_path):
    """Not offline by setting, but no network: one attempt, not huggingface_hub's five retries (~24 s)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache
    start = time.monotonic()
    # A network namespace of its own has no interfaces up: no connection can leave this process.
    result = subprocess.run(["unshare", "-n", sys.executable, "-m", "edgevlm.runtime.cli", "export",
                             "edgevlm-tests/no-such-model", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert time.monotonic() - start < 10, result.stderr
    assert_one_line_error(result, "checkpoint not found", "Hugging Face hub", "unreachable")
    assert "Retrying" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


# What a runtime-only install (`pip install -e .`, no [export] extra) looks like to Python: a None in sys.modules
# makes `import torch` raise ModuleNotFoundError and importlib.util.find_spec answer None, as for a missing module.
RUNTIME_ONLY = """
import sys
for name in ("torch", "transformers", "optimum", "onnx"):
    sys.modules[name] = None
from edgevlm.runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_runtime_only_install_names_the_export_extra(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, "export", str(tiny_checkpoint), str(out)],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert_one_line_error(result, "torch", "pip install 'edgevlm[export]'")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not out.exists()


def test_unreadable_config_and_missing_weights(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    assert_one_line_error(run_export(str(broken), str(tmp_path / "out")), "config.json is not readable JSON")

    no_weights = shutil.copytree(tiny_checkpoint, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    assert_one_line_error(run_export(str(no_weights), str(tmp_path / "out2")), "cannot load the checkpoint")


def _args(source, out) -> argparse.Namespace:
    return argparse.Namespace(source=str(source), out_dir=str(out), quant="fp32", overwrite=False,
                              no_verify=True, verify_tokens=4, revision=None, vision_quant=None,
                              embed_quant=None, decoder_quant=None, decoder_form=None)


def test_out_of_space_before_export_is_one_clear_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    assert convert.main(_args(tiny_checkpoint, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "edgevlm export: error: not enough disk space" in err and "Traceback" not in err


def test_disk_filling_up_during_export_is_one_clear_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "_export_graphs", full_disk)
    assert convert.main(_args(tiny_checkpoint, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "edgevlm export: error: out of disk space while writing the package" in err


def test_verification_fails_and_exits_non_zero_when_a_graph_is_wrong(tiny_checkpoint, tmp_path, monkeypatch,
                                                                     capsys):
    """A graph that computes something else than the PyTorch module is caught by the export's own report."""
    from edgevlm.export.families.common import EmbedTokens

    original = EmbedTokens.forward
    monkeypatch.setattr(EmbedTokens, "forward", lambda self, ids: original(self, ids) * 1.01)
    args = _args(tiny_checkpoint, tmp_path / "out")
    args.no_verify = False
    assert convert.main(args) == 1
    err = capsys.readouterr().err
    assert "embed_tokens" in err and "FAIL" in err
    assert "does not match transformers" in err


@pytest.mark.parametrize("form", ["fused", "portable"])
def test_large_graphs_keep_their_weights_in_one_external_data_file(tiny_checkpoint, tmp_path, monkeypatch, form):
    """Graphs past the 2 GB protobuf limit are written with external data; the threshold is lowered here."""
    from edgevlm.runtime.engine import Engine

    monkeypatch.setattr(convert, "EXTERNAL_DATA_THRESHOLD", 1_000_000)
    with open(os.devnull, "w") as quiet:
        package, report = convert.export_package(str(tiny_checkpoint), tmp_path / "pkg", greedy_tokens=4,
                                                 decoder_form=form, progress=convert.Progress(quiet))
    assert report.ok
    decoder_file = {"fused": "decoder_model_fused.onnx", "portable": "decoder_model_merged.onnx"}[form]
    decoder = package.graph("decoder")
    assert decoder["file"] == decoder_file
    assert decoder["external_data"] == [decoder_file + "_data"]
    assert (package.path / decoder_file).stat().st_size < 1_000_000
    assert decoder_file + "_data" in package.manifest["files"]
    assert "external_data" not in package.graph("vision_encoder")  # 0.2 MB stays in one file
    assert sorted(p.name for p in package.path.iterdir() if "onnx" in p.name) == sorted([
        decoder_file, decoder_file + "_data", "embed_tokens.onnx", "embed_tokens.onnx_data", "vision_encoder.onnx"])
    Engine(package)  # loads with the weights beside the graphs


def test_quantized_export_records_each_graph_and_serves(tiny_checkpoint, tmp_path):
    """--quant int4 with a per-graph override: fp32 verified first, then quantized and measured against it."""
    from edgevlm.runtime.package import ModelPackage
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    out = tmp_path / "int4"
    result = run_export(str(tiny_checkpoint), str(out), "--quant", "int4", "--vision-quant", "fp32",
                        "--verify-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "identical to transformers.generate" in result.stderr  # the fp32 graphs were proven first
    assert "quantized package against the fp32 graphs" in result.stderr
    package = ModelPackage.load(out)
    manifest = package.manifest
    assert manifest["quantization"] == "int4"
    assert manifest["quantization_plan"] == {"vision_encoder": "fp32", "embed_tokens": "int4", "decoder": "int4"}
    assert package.graph("decoder")["quantization"] == "int4"
    assert "MatMulNBits" in package.graph("decoder")["contrib_ops"]
    assert package.graph("decoder")["form"] == "fused"  # the default form, quantized
    assert package.graph("embed_tokens")["quantization"] == "int4"
    assert manifest["verification"]["quantization_vs_fp32"]["top1_agreement"] > 0.5
    # the int8 KV cache variant is measured against fp32 too (export/kv_int8.py)
    assert "with the int8 KV cache" in result.stderr
    assert manifest["verification"]["quantization_vs_fp32"]["kv_int8_top1_agreement"] > 0.5
    assert not (out / ".fp32-reference").exists()
    sizes = {g: (out / package.graph(g)["file"]).stat().st_size for g in ("decoder", "embed_tokens")}
    assert sizes["decoder"] < 0.35 * 13_000_000 and sizes["embed_tokens"] < 0.3 * 12_600_000

    vlm = VisionLanguageModel.load(out)
    steps = list(vlm.generate(vlm.prepare([{"role": "user", "content": "hi"}]), SamplingParams(temperature=0),
                              max_tokens=5))
    assert len(steps) == 5
