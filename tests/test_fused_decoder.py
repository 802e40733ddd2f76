"""The fused decoder graph (export/fused_decoder.py) against Hugging Face, with the shared KV buffer.

Prefill of 20 random embeddings, then 8 greedy decode steps (the argmax token's embedding fed back), all through one
pre-allocated [1, kv_heads, max_len, head_dim] buffer per layer and K/V bound as both past and present (IOBinding),
so GroupQueryAttention appends in place. Every step's last-position logits must match HF within 1e-3.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

PROMPT = 20
STEPS = 8
MAX_LEN = 64


@pytest.fixture(scope="module")
def fused(hf_model, tmp_path_factory):
    from edgevlm.export.fused_decoder import build_fused_decoder

    path = tmp_path_factory.mktemp("fused") / "decoder_fused.onnx"
    description = build_fused_decoder(hf_model, path, max_sequence_length=MAX_LEN * 2)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return path, description, session


class SharedBufferRunner:
    """The engine-side contract: one buffer per layer and K/V, bound as past and present every step."""

    def __init__(self, session, description, max_len: int):
        self.session = session
        self.layers = description["num_layers"]
        shape = (1, description["num_key_value_heads"], max_len, description["head_dim"])
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in range(2 * self.layers)]
        self.length = 0

    def step(self, embeds: np.ndarray) -> np.ndarray:
        new = embeds.shape[1]
        total = self.length + new
        binding = self.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        binding.bind_output("logits", "cpu")
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                buffer = self.buffers[2 * i + j]
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffer)
                binding.bind_ortvalue_output(f"present.{i}.{kind}", buffer)
        self.session.run_with_iobinding(binding)
        self.length = total
        return binding.get_outputs()[0].numpy()


def test_io_contract(fused):
    path, description, session = fused
    assert [i.name for i in session.get_inputs()][:1] == ["inputs_embeds"]
    inputs = {i.name: i for i in session.get_inputs()}
    assert inputs["seqlens_k"].type == "tensor(int32)" and inputs["seqlens_k"].shape == ["batch_size"]
    assert inputs["total_sequence_length"].type == "tensor(int32)" and inputs["total_sequence_length"].shape == []
    assert "attention_mask" not in inputs and "position_ids" not in inputs
    assert session.get_outputs()[0].name == "logits"
    assert set(description["inputs"]) == set(inputs)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} <= ops


@pytest.mark.filterwarnings("ignore")
def test_node_count_far_below_portable(fused, hf_model, tmp_path):
    """~10 nodes per layer; the traced portable decoder of the same model has hundreds per layer."""
    from optimum.exporters.onnx.convert import export_pytorch

    from edgevlm.export.convert import OPSET
    from edgevlm.export.families import idefics3 as family

    path, description, _ = fused
    layers = description["num_layers"]
    fused_nodes = len(onnx.load(str(path)).graph.node)
    assert fused_nodes == description["node_count"] == 10 * layers + 3
    portable = tmp_path / "portable.onnx"
    with torch.no_grad():
        export_pytorch(family.Decoder(hf_model).eval(), family.decoder_onnx_config(hf_model.config.text_config),
                       OPSET, portable)
    portable_nodes = len(onnx.load(str(portable)).graph.node)
    assert fused_nodes * 10 < portable_nodes, (fused_nodes, portable_nodes)


def test_shared_buffer_prefill_and_greedy_decode_match_hf(fused, hf_model):
    _, description, session = fused
    text = hf_model.config.text_config
    embed = hf_model.model.text_model.embed_tokens.weight.detach()
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, PROMPT, text.hidden_size)).astype(np.float32)

    runner = SharedBufferRunner(session, description, MAX_LEN)
    with torch.no_grad():
        out = hf_model(inputs_embeds=torch.from_numpy(prompt), attention_mask=torch.ones(1, PROMPT, dtype=torch.long),
                       use_cache=True)
    reference = out.logits[:, -1:].numpy()
    logits = runner.step(prompt)
    assert logits.shape == (1, 1, text.vocab_size)
    assert np.abs(logits - reference).max() < 1e-3

    past = out.past_key_values
    hf_tokens, onnx_tokens = [], []
    token = int(reference[0, -1].argmax())
    for _ in range(STEPS):
        embeds = embed[token][None, None].clone()
        with torch.no_grad():
            out = hf_model(inputs_embeds=embeds, attention_mask=torch.ones(1, runner.length + 1, dtype=torch.long),
                           past_key_values=past, use_cache=True)
        past = out.past_key_values
        reference = out.logits[:, -1:].numpy()
        logits = runner.step(embeds.numpy())
        error = np.abs(logits - reference).max()
        assert error < 1e-3, f"step {len(hf_tokens)}: max |Δlogits| {error}"
        hf_tokens.append(int(reference[0, -1].argmax()))
        onnx_tokens.append(int(logits[0, -1].argmax()))
        token = hf_tokens[-1]
    assert onnx_tokens == hf_tokens

    # The cache really lives in the shared buffers: positions [0, length) hold HF's keys (rotary applied), the
    # rest of the buffer is untouched zeros.
    key0 = runner.buffers[0].numpy()
    hf_key0 = past.layers[0].keys.numpy() if hasattr(past, "layers") else past[0][0].numpy()
    assert runner.length == PROMPT + STEPS
    assert np.abs(key0[:, :, :runner.length] - hf_key0).max() < 1e-4
    assert not key0[:, :, runner.length:].any()


def test_chunked_continuation_and_separate_past_present(fused, hf_model):
    """A second multi-token chunk after a cached prefix (multi-turn chat), and the non-shared (copying) mode."""
    _, description, session = fused
    text = hf_model.config.text_config
    rng = np.random.default_rng(1)
    first = rng.standard_normal((1, 12, text.hidden_size)).astype(np.float32)
    second = rng.standard_normal((1, 5, text.hidden_size)).astype(np.float32)
    with torch.no_grad():
        out = hf_model(inputs_embeds=torch.from_numpy(first), attention_mask=torch.ones(1, 12, dtype=torch.long),
                       use_cache=True)
        out2 = hf_model(inputs_embeds=torch.from_numpy(second), attention_mask=torch.ones(1, 17, dtype=torch.long),
                        past_key_values=out.past_key_values, use_cache=True)

    runner = SharedBufferRunner(session, description, MAX_LEN)
    runner.step(first)
    assert np.abs(runner.step(second) - out2.logits[:, -1:].numpy()).max() < 1e-3

    # Separate past/present: past of length 0 → present of length 12 → fed back as past.
    layers, kv_heads, head_dim = description["num_layers"], description["num_key_value_heads"], description["head_dim"]
    feeds = {f"past_key_values.{i}.{k}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
             for i in range(layers) for k in ("key", "value")}
    names = [o.name for o in session.get_outputs()]
    results = session.run(None, {**feeds, "inputs_embeds": first, "seqlens_k": np.array([11], np.int32),
                                 "total_sequence_length": np.array(12, np.int32)})
    present = dict(zip(names, results))
    assert present["present.0.key"].shape == (1, kv_heads, 12, head_dim)
    feeds = {f"past_key_values.{i}.{k}": present[f"present.{i}.{k}"] for i in range(layers) for k in ("key", "value")}
    logits = session.run(["logits"], {**feeds, "inputs_embeds": second, "seqlens_k": np.array([16], np.int32),
                                      "total_sequence_length": np.array(17, np.int32)})[0]
    assert np.abs(logits - out2.logits[:, -1:].numpy()).max() < 1e-3


def test_int4_quantized_graph_runs_and_tracks_fp32(fused, tmp_path):
    from edgevlm.export.quantize import quantize_graph

    path, description, session = fused
    int4_path = tmp_path / "decoder_fused_int4.onnx"
    quantize_graph(path, int4_path, "int4", graph="decoder")
    ops = [n.op_type for n in onnx.load(str(int4_path)).graph.node]
    assert "MatMulNBits" in ops and "MatMul" not in ops
    options = ort.SessionOptions()
    options.log_severity_level = 3
    int4 = ort.InferenceSession(str(int4_path), options, providers=["CPUExecutionProvider"])
    prompt = np.random.default_rng(2).standard_normal((1, 10, 64)).astype(np.float32)
    ref = SharedBufferRunner(session, description, MAX_LEN).step(prompt)
    got = SharedBufferRunner(int4, description, MAX_LEN).step(prompt)
    # 4-bit weights: not bit-parity, but strongly correlated logits.
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95
