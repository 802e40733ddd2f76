"""An int8 KV cache for the fused decoder: the same graphs with GroupQueryAttention's quantized cache, chosen at load.

A decode step at long context reads the whole KV cache once per layer: at SmolVLM-256M size a float32 cache is 46 KB
a position, 94 MB a token at 2,043 positions — as much as all the 4-bit weights. onnxruntime (1.32) runs
GroupQueryAttention on CPU over an int8 cache (`k_quant_type` / `v_quant_type` "PER_CHANNEL", `kv_cache_bit_width`
8, with a float `k_scale` / `v_scale` of [1, kv_heads, 1, head_dim]): new keys and values are stored as
round(x / scale) saturated to [-128, 127] and read back as q · scale. On a 2-core Xeon a decode step at 2,000
positions took 13.7 ms with the float32 cache and 7.4 ms with it (GroupQueryAttention ~9 → ~4 ms a step); the
4-bit cache the op also takes was slower than the 8-bit one there.

The scales are static, one per layer, K or V, head and channel: calibrated here on the fp32 package (the export
prompts of export/int4_search.py plus two image prompts), as the largest |value| seen / 127. Keys are stored after
rotary, which turns each channel i with channel i + head_dim/2 by the position's angle: both take the largest
magnitude of the pair, |(k_i, k_i+d/2)|, which bounds either at every position, not only the calibrated ones.

Prompt chunks do not run on the int8 cache: onnxruntime's quantized GroupQueryAttention made a 2,043-token prefill
2.3x slower than the float32 one (each chunk's attention over a longer quantized past). The runtime runs them on the
int4 package's float32-cache prefill graph over a float32 copy of the prompt's cache — the int8 positions
dequantized, so a chunk sees what a decode step sees — and stores the chunk's new keys and values as int8
(runtime/kv_int8.py); decode steps and a prompt's last position run on this int8-cache decoder graph.

The variant graph is small (the decoder's weights live in its external data file, read by every decoder graph), so
a package carries both caches and the runtime takes one at load: int8 by default for the int4 packages that carry
it, `edgevlm serve --kv-cache float32` for the reference's cache (README, KV cache precision, for what each costs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DECODER_FILE = "decoder_model_fused.kv8.onnx"
SCALES_FILE = "decoder_kv_int8.scales"  # float32 [layers, 2 (K, V), kv_heads, head_dim]: the quantization steps
METHOD = ("int8 per channel (GroupQueryAttention PER_CHANNEL, 8 bits), static scales: largest |value| on the "
          "calibration prompts / 127; keys after rotary, bounded per rotary channel pair")
_K_SCALE, _V_SCALE = 12, 13  # GroupQueryAttention's k_scale / v_scale inputs


def calibration_prompts() -> list[list[dict]]:
    """The int4 calibration conversations (text) and two prompts with an image (one tile each; skipped for M-RoPE
    decoders, whose image positions are not 1-D)."""
    import base64
    import io

    from .int4_search import calibration_conversations
    from .samples import sample_image

    out = calibration_conversations()
    for seed, question in ((7, "Describe this image in detail."), (8, "What colours and shapes do you see?")):
        buffer = io.BytesIO()
        sample_image(448, 336, seed=seed).save(buffer, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri, "detail": "low"}},
                                                  {"type": "text", "text": question}]}])
    return out


def calibrate(package_dir, prompts: list[list[dict]] | None = None) -> tuple[np.ndarray, int]:
    """Per-channel largest |key| and |value| of the fused float32-cache decoder in `package_dir` over `prompts`
    (default `calibration_prompts()`): → (amax [layers, 2 (K, V), kv_heads, head_dim] float32, tokens)."""
    from ..runtime.vlm import VisionLanguageModel

    vlm = VisionLanguageModel.load(package_dir, defer_vision=True)
    try:
        engine = vlm.engine
        if engine.decoder_form != "fused" or engine._kv_dtype != np.float32:
            raise ValueError(f"KV calibration needs a fused decoder with a float32 cache ({package_dir})")
        half = engine.head_dim // 2
        amax = np.zeros((engine.num_layers, 2, engine.kv_heads, engine.head_dim), np.float32)
        tokens = 0
        for messages in prompts or calibration_prompts():
            prompt = vlm.prepare(messages)
            if prompt.images and engine.rotary == "mrope":  # 1-D positions only here: text prompts calibrate it
                continue
            ids = np.asarray(prompt.input_ids)[None]
            embeds = engine.embed(ids)
            if prompt.images:
                features = [engine.run_vision(feed).reshape(-1, embeds.shape[-1])
                            for image in prompt.images for feed in vlm.scheduler.vision_inputs(image)]
                embeds = engine.splice_image_features(ids, embeds, np.concatenate(features))
            _, cache = engine.forward(embeds, engine.empty_cache())
            n = ids.shape[1]
            tokens += n
            for layer in range(engine.num_layers):
                keys, values = (a[0, :, :n] for a in cache.arrays(layer))
                pair = np.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2).max(axis=1)
                amax[layer, 0] = np.maximum(amax[layer, 0], np.concatenate([pair, pair], axis=-1))
                amax[layer, 1] = np.maximum(amax[layer, 1], np.abs(values).max(axis=1))
        return amax, tokens
    finally:
        vlm.close()


def scales_from(amax: np.ndarray) -> np.ndarray:
    """Quantization steps from the calibrated largest magnitudes (a channel never seen non-zero gets a tiny step)."""
    return (np.maximum(amax, 1e-6) / 127.0).astype(np.float32)


def int8_cache_model(model, scales: np.ndarray, scales_file: str):
    """`model` (a fused decoder, ModelProto) with an int8 KV cache: every GroupQueryAttention quantizes per channel
    with its layer's steps, which the graph reads from `scales_file` (raw float32 `scales` [layers, 2 (K, V),
    kv_heads, head_dim], the file the runtime reads them from too); the past/present inputs and outputs become int8.
    Edits `model` in place and returns it."""
    from onnx import TensorProto, helper

    from .quantize import point_external

    graph = model.graph
    layers, _, heads, dim = scales.shape
    done = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = int(node.input[3].split(".")[1])  # past_key_values.<layer>.key
        names = (f"kv_int8.{layer}.k_scale", f"kv_int8.{layer}.v_scale")
        for which, name in enumerate(names):
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[1, heads, 1, dim])
            point_external(tensor, scales_file, (layer * 2 + which) * heads * dim * 4, heads * dim * 4)
            graph.initializer.append(tensor)
        inputs = list(node.input) + [""] * max(0, _K_SCALE - len(node.input))
        inputs[_K_SCALE:_V_SCALE + 1] = names
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        done += 1
    if done != layers:
        raise ValueError(f"{done} GroupQueryAttention nodes for {layers} layers of KV scales: only a fused decoder "
                         "takes an int8 KV cache")
    for value in list(graph.input) + list(graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    return model


def write_int8_cache_graphs(folder: str | Path, decoder: dict, amax: np.ndarray, tokens: int) -> dict:
    """Write the int8-cache variant of the fused decoder named by the manifest entry `decoder` into `folder`, beside
    the float32 one and over the same external data, and its steps (`SCALES_FILE`). → the decoder entry's
    "kv_int8" field."""
    import onnx

    folder = Path(folder)
    scales = scales_from(amax)
    scales.tofile(folder / SCALES_FILE)
    model = onnx.load(str(folder / decoder["file"]), load_external_data=False)
    onnx.save_model(int8_cache_model(model, scales, SCALES_FILE), str(folder / DECODER_FILE))
    return {"file": DECODER_FILE, "kv_dtype": "int8", "method": METHOD, "calibration_tokens": tokens,
            "scales": {"file": SCALES_FILE, "dtype": "float32", "shape": list(scales.shape)}}
