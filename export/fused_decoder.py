"""A fused decoder graph for Idefics3 / SmolVLM's Llama text model, written node by node with `onnx.helper`.

Why not trace torch: the traced ("portable") decoder has thousands of small nodes (rotary, repeat_kv, masks, RMSNorm
spelled out as Pow/ReduceMean/Sqrt/Div, ...). At SmolVLM-256M size a decode step is dominated by per-node overhead
and by copying the whole KV cache into fresh `present` tensors every step. This builder emits the graph that
onnxruntime-genai's model builder emits for Llama-type decoders (~10 nodes per layer), using onnxruntime contrib ops
that ship in the plain `onnxruntime` wheel:

    layer i:  [Skip]SimplifiedLayerNormalization   (RMSNorm, fused with the residual add of the previous block)
              MatMul  x @ W_qkv                    (Q, K and V in one weight read, N = (heads + 2·kv_heads)·head_dim)
              com.microsoft.GroupQueryAttention    (packed QKV, rotary inside, causal, GQA head sharing, KV append)
              MatMul  attn @ W_o
              com.microsoft.SkipSimplifiedLayerNormalization   (residual add + post-attention RMSNorm)
              MatMul  x @ W_gate_up                (gate and up in one weight read)
              Split → QuickGelu(alpha=1) = SiLU → Mul  (SwiGLU)
              MatMul  @ W_down
    final:    SkipSimplifiedLayerNormalization (residual + final norm) → Slice(last position) → MatMul lm_head

Interface (the "fused" form; see `build_fused_decoder`'s return value for the machine-readable description):

    inputs   inputs_embeds            float32 [batch, sequence_length, hidden]
             past_key_values.{i}.key  float32 [batch, kv_heads, past_sequence_length, head_dim]   (BNSH)
             past_key_values.{i}.value  (same)
             seqlens_k                int32   [batch]  total sequence length − 1 per row (past + new − 1, i.e. the
                                                       0-based position of the row's last valid token)
             total_sequence_length    int32   []       scalar: past + new tokens (max over the batch)
    outputs  logits                   float32 [batch, 1, vocab]  (last position only)
             present.{i}.key / .value float32 [batch, kv_heads, present_sequence_length, head_dim]

There is no attention_mask and no position_ids: GroupQueryAttention derives the causal mask and the rotary positions
from seqlens_k / total_sequence_length (new tokens sit at positions total − sequence_length … total − 1).

KV cache, two ways to run it:
  * separate past/present: past length P, present length P + S (a fresh tensor every step, like the portable graph);
  * shared buffer (onnxruntime-genai's `past_present_share_buffer`): allocate one OrtValue per layer and K/V of
    shape [batch, kv_heads, max_sequence_length, head_dim] and bind it (IOBinding) both as `past_key_values.{i}.*`
    and as `present.{i}.*`. GroupQueryAttention sees that past and present share memory and only writes the new
    tokens' K/V at positions [past, past + S) in place, so a decode step costs the same at any context length
    (no per-step copy of the whole cache). The buffer length must not exceed `max_sequence_length` (the rotary
    cos/sin caches have that many rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_MS = "com.microsoft"


def _text_parts(model):
    """(text model, lm_head weight, text_config) from an Idefics3 / Qwen2-VL ForConditionalGeneration (or a Llama
    CausalLM)."""
    inner = model.model
    text_model = getattr(inner, "text_model", None) or getattr(inner, "language_model", None) or inner
    config = getattr(model.config, "text_config", model.config)
    return text_model, model.lm_head.weight, config


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _rotary_caches(text_model, config, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_len, rotary_dim/2] for GroupQueryAttention's `do_rotary`.

    Taken from HF's own rotary module (its `inv_freq` and `attention_scaling`), so any rope_scaling type HF applies
    at init (llama3, linear, ...) is reproduced, not just rope_theta. GQA with rotary_interleaved=0 rotates the two
    halves of each head (x[:d/2], x[d/2:]) exactly like HF Llama's `rotate_half`, so only half-width caches are
    stored (the half is duplicated in HF's cos/sin).
    """
    rotary = text_model.rotary_emb
    inv_freq = rotary.inv_freq.detach().double().cpu().numpy()
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if getattr(rotary, "rope_type", "default") == "dynamic":
        raise NotImplementedError("dynamic NTK rope scaling changes with sequence length; not supported")
    positions = np.arange(max_len, dtype=np.float64)
    freqs = np.outer(positions, inv_freq)  # float64 then cast: matches HF's fp32 values to ~1e-7 at 8k positions
    return ((np.cos(freqs) * scaling).astype(np.float32), (np.sin(freqs) * scaling).astype(np.float32))


def build_fused_decoder(model, out_path, *, max_sequence_length: int | None = None,
                        external_data: bool | None = None, external_threshold: int = 1_800_000_000) -> dict:
    """Write the fused decoder graph of `model` (Idefics3ForConditionalGeneration) to `out_path`.

    `max_sequence_length` (default: the text config's max_position_embeddings) bounds the rotary caches and so the
    longest context (and the shared KV buffer) the graph can serve. Returns the graph's I/O description in the
    model.json style ({"inputs": {...}, "outputs": {...}, plus the KV layout facts an engine needs}).
    """
    text_model, lm_head_weight, cfg = _text_parts(model)
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    layers = cfg.num_hidden_layers
    eps = float(cfg.rms_norm_eps)
    vocab = lm_head_weight.shape[0]
    max_len = int(max_sequence_length or cfg.max_position_embeddings)
    if getattr(cfg, "mlp_bias", False) or text_model.layers[0].self_attn.o_proj.bias is not None:
        raise NotImplementedError("MLP or output-projection biases are not supported by this builder")
    # Qwen2-VL's M-RoPE: each token's rotary angles come from 3 positions (t, h, w), one per section of the head
    # dims, so no single position per token (GroupQueryAttention's own rotary) describes them. Then the graph takes
    # cos/sin rows and per-token indices into them as inputs and rotates Q and K with RotaryEmbedding: a prefill
    # chunk passes its tokens' own rows, a decode step the 1-D table at each row's position + rope offset.
    rope = getattr(cfg, "rope_scaling", None) or {}
    mrope = list(rope["mrope_section"]) if "mrope_section" in rope else None
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act {cfg.hidden_act!r}: only SiLU (SwiGLU) is supported")

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))

    if mrope is None:
        cos, sin = _rotary_caches(text_model, cfg, max_len)
        init("cos_cache", cos)
        init("sin_cache", sin)

    # Weights are stored pre-transposed as [in, out] so MatMul reads them directly (and MatMulNBits quantisation
    # later sees the usual [K, N] layout).
    x = "inputs_embeds"
    residual = None  # the residual stream; None before the first layer (its input is the embeddings themselves)
    for i, layer in enumerate(text_model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        p = f"/model/layers.{i}"
        ln_w = init(f"model.layers.{i}.input_layernorm.weight", _np(layer.input_layernorm.weight))
        if residual is None:
            # First layer: nothing to add yet, plain RMSNorm; the embeddings are the residual.
            node("SimplifiedLayerNormalization", [x, ln_w], [f"{p}/input_layernorm/output_0"],
                 f"{p}/input_layernorm/LayerNorm", axis=-1, epsilon=eps, stash_type=1)
            residual = x
        else:
            # residual + previous MLP output, then RMSNorm, in one kernel; output 3 is the new residual sum.
            node("SkipSimplifiedLayerNormalization", [x, residual, ln_w],
                 [f"{p}/input_layernorm/output_0", "", "", f"{p}/input_layernorm/output_3"],
                 f"{p}/input_layernorm/SkipLayerNorm", domain=_MS, epsilon=eps)
            residual = f"{p}/input_layernorm/output_3"
        normed = f"{p}/input_layernorm/output_0"

        # Q, K, V in one MatMul: one pass over the activations, one GEMM dispatch instead of three.
        w_qkv = np.concatenate([_np(attn.q_proj.weight), _np(attn.k_proj.weight), _np(attn.v_proj.weight)], 0).T
        qkv_w = init(f"model.layers.{i}.attn.qkv_proj.MatMul.weight", w_qkv)
        qkv = f"{p}/attn/qkv_proj/output_0"
        node("MatMul", [normed, qkv_w], [qkv], f"{p}/attn/qkv_proj/MatMul")
        if attn.q_proj.bias is not None:  # Qwen2: q/k/v biases, added once to the packed projection
            bias = np.concatenate([_np(attn.q_proj.bias), _np(attn.k_proj.bias), _np(attn.v_proj.bias)])
            qkv_b = init(f"model.layers.{i}.attn.qkv_proj.Add.bias", bias)
            node("Add", [qkv, qkv_b], [f"{p}/attn/qkv_proj/Add/output_0"], f"{p}/attn/qkv_proj/Add")
            qkv = f"{p}/attn/qkv_proj/Add/output_0"
        gqa_inputs = [qkv, "", ""]
        if mrope is not None:
            sizes = init(f"{p}/attn/qkv_split_sizes",
                         np.array([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dtype=np.int64))
            node("Split", [qkv, sizes], [f"{p}/attn/q", f"{p}/attn/k", f"{p}/attn/v"], f"{p}/attn/qkv_Split", axis=-1)
            for name, count in (("q", heads), ("k", kv_heads)):
                node("RotaryEmbedding", [f"{p}/attn/{name}", "position_ids", "cos_cache", "sin_cache"],
                     [f"{p}/attn/{name}_rotary"], f"{p}/attn/{name}_rotary/RotaryEmbedding", domain=_MS,
                     num_heads=count, interleaved=0)
            gqa_inputs = [f"{p}/attn/q_rotary", f"{p}/attn/k_rotary", f"{p}/attn/v"]

        # Packed QKV into GroupQueryAttention (key/value inputs left empty). It applies rotary to Q and K using
        # positions derived from seqlens_k/total_sequence_length, appends K/V to the cache (in place when past and
        # present share a buffer), shares each KV head across heads/kv_heads query heads, and applies the causal
        # mask — the work of ~40 nodes in the traced graph.
        rotary = [] if mrope is not None else ["cos_cache", "sin_cache"]
        node("GroupQueryAttention",
             [*gqa_inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
              "seqlens_k", "total_sequence_length", *rotary],
             [f"{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
             f"{p}/attn/GroupQueryAttention", domain=_MS,
             num_heads=heads, kv_num_heads=kv_heads, scale=float(head_dim) ** -0.5,
             do_rotary=0 if mrope is not None else 1, rotary_interleaved=0, local_window_size=-1)
        o_w = init(f"model.layers.{i}.attn.o_proj.MatMul.weight", _np(attn.o_proj.weight).T)
        node("MatMul", [f"{p}/attn/GroupQueryAttention/output_0", o_w], [f"{p}/attn/o_proj/output_0"],
             f"{p}/attn/o_proj/MatMul")

        post_w = init(f"model.layers.{i}.post_attention_layernorm.weight", _np(layer.post_attention_layernorm.weight))
        node("SkipSimplifiedLayerNormalization", [f"{p}/attn/o_proj/output_0", residual, post_w],
             [f"{p}/post_attention_layernorm/output_0", "", "", f"{p}/post_attention_layernorm/output_3"],
             f"{p}/post_attention_layernorm/SkipLayerNorm", domain=_MS, epsilon=eps)
        residual = f"{p}/post_attention_layernorm/output_3"

        # gate and up in one MatMul (one weight stream), split, SiLU(gate) * up. QuickGelu(x, alpha=1) is
        # x·sigmoid(x) = SiLU in one vectorised contrib kernel instead of Sigmoid + Mul.
        inter = mlp.gate_proj.weight.shape[0]
        w_gu = np.concatenate([_np(mlp.gate_proj.weight), _np(mlp.up_proj.weight)], 0).T
        gu_w = init(f"model.layers.{i}.mlp.gate_up_proj.MatMul.weight", w_gu)
        node("MatMul", [f"{p}/post_attention_layernorm/output_0", gu_w], [f"{p}/mlp/gate_up_proj/output_0"],
             f"{p}/mlp/gate_up_proj/MatMul")
        split = init(f"{p}/mlp/split_sizes", np.array([inter, inter], dtype=np.int64))
        node("Split", [f"{p}/mlp/gate_up_proj/output_0", split], [f"{p}/mlp/gate", f"{p}/mlp/up"],
             f"{p}/mlp/Split", axis=-1)
        node("QuickGelu", [f"{p}/mlp/gate"], [f"{p}/mlp/act/output_0"], f"{p}/mlp/act/SiLU", domain=_MS, alpha=1.0)
        node("Mul", [f"{p}/mlp/act/output_0", f"{p}/mlp/up"], [f"{p}/mlp/Mul/output_0"], f"{p}/mlp/Mul")
        down_w = init(f"model.layers.{i}.mlp.down_proj.MatMul.weight", _np(mlp.down_proj.weight).T)
        node("MatMul", [f"{p}/mlp/Mul/output_0", down_w], [f"{p}/mlp/down_proj/output_0"],
             f"{p}/mlp/down_proj/MatMul")
        x = f"{p}/mlp/down_proj/output_0"

    # Final residual add + norm, then only the last position goes through lm_head: the vocab projection is the
    # single largest weight (576 × 49,280 at 256M size) and during prefill computing it for every prompt position
    # would cost S× the work for logits nobody reads.
    norm_w = init("model.norm.weight", _np(text_model.norm.weight))
    node("SkipSimplifiedLayerNormalization", [x, residual, norm_w], ["/model/norm/output_0"],
         "/model/norm/SkipLayerNorm", domain=_MS, epsilon=eps)
    init("/model/last/starts", np.array([-1], dtype=np.int64))
    init("/model/last/ends", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    init("/model/last/axes", np.array([1], dtype=np.int64))
    node("Slice", ["/model/norm/output_0", "/model/last/starts", "/model/last/ends", "/model/last/axes"],
         ["/model/last/output_0"], "/model/last/Slice")
    lm_w = init("lm_head.MatMul.weight", _np(lm_head_weight).T)
    node("MatMul", ["/model/last/output_0", lm_w], ["logits"], "/lm_head/MatMul")

    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    kv_in = ["batch_size", kv_heads, "past_sequence_length", head_dim]
    kv_out = ["batch_size", kv_heads, "present_sequence_length", head_dim]
    graph_inputs = [helper.make_tensor_value_info("inputs_embeds", f32, ["batch_size", "sequence_length", hidden])]
    graph_outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", 1, vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            graph_inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_in))
            graph_outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, kv_out))
    graph_inputs.append(helper.make_tensor_value_info("seqlens_k", i32, ["batch_size"]))
    graph_inputs.append(helper.make_tensor_value_info("total_sequence_length", i32, []))
    if mrope is not None:
        graph_inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                          ["batch_size", "sequence_length"]))
        graph_inputs.append(helper.make_tensor_value_info("cos_cache", f32, ["rotary_rows", head_dim // 2]))
        graph_inputs.append(helper.make_tensor_value_info("sin_cache", f32, ["rotary_rows", head_dim // 2]))

    graph = helper.make_graph(nodes, "edgevlm_fused_llama_decoder", graph_inputs, graph_outputs, inits)
    onnx_model = helper.make_model(
        graph, producer_name="edgevlm.export.fused_decoder",
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(_MS, 1)])
    onnx_model.ir_version = 8  # readable by any onnxruntime >= 1.14

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    total_bytes = sum(t.ByteSize() for t in inits)
    if external_data is None:
        external_data = total_bytes > external_threshold  # protobuf's hard limit is 2 GB
    if external_data:
        onnx.save_model(onnx_model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out_path.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(onnx_model, str(out_path))

    def io(values) -> dict:
        out = {}
        for v in values:
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            out[v.name] = {"dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                           "shape": dims}
        return out

    return {
        "file": out_path.name,
        **({"external_data": [out_path.name + "_data"]} if external_data else {}),
        "form": "fused",
        "inputs": io(graph_inputs),
        "outputs": io(graph_outputs),
        "kv_dtype": "float32",
        "kv_layout": "BNSH",
        "num_layers": layers,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_sequence_length": max_len,
        "past_present_share_buffer": True,  # supported (bind one buffer as past and present); not required
        "logits": "last_position",
        **({"rotary": "mrope", "mrope_section": mrope, "rope_theta": float(cfg.rope_theta)} if mrope else {}),
        "node_count": len(nodes),
        "quantization": "fp32",
    }

