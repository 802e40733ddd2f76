"""The exported fp32 package computes what transformers computes: logits and greedy tokens with the KV cache.

Every check runs on both decoder forms: fused (GroupQueryAttention, in-place KV buffer, last-position logits; the
default) and portable (the traced graph with onnx-community's interface)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgevlm.export.samples import sample_image
from edgevlm.export.families.idefics3 import chat_inputs
from edgevlm.runtime.engine import Engine
from edgevlm.runtime.package import ModelPackage

LOGITS_ATOL = 1e-3

SCENARIOS = {
    "text-only": [],
    # 320×240 is split into tiles (rows × cols + a global image); 40×90 is small and tall.
    "one-image": [(320, 240, 1)],
    "two-images": [(320, 240, 2), (40, 90, 3)],
}


@pytest.fixture(scope="module", params=["fused", "portable"])
def engine(request):
    fixture = "tiny_package" if request.param == "fused" else "tiny_package_portable"
    engine = Engine(ModelPackage.load(request.getfixturevalue(fixture)))
    assert engine.decoder_form == request.param
    return engine


def _inputs(processor, scenario):
    images = [sample_image(w, h, seed) for w, h, seed in SCENARIOS[scenario]]
    question = "What is in these images?" if images else "Write a short poem about the sea."
    return chat_inputs(processor, images, question)


def _features(engine, inputs):
    if "pixel_values" not in inputs:
        return None
    return engine.encode_images(inputs["pixel_values"].numpy(), inputs["pixel_attention_mask"].numpy().astype(bool))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@torch.no_grad()
def test_logits_match_transformers_at_prefill_and_decode_steps(scenario, engine, hf_model, hf_processor):
    inputs = _inputs(hf_processor, scenario)
    if SCENARIOS[scenario]:
        expected_tiles = sum(1 for _ in SCENARIOS[scenario])
        assert inputs["pixel_values"].shape[1] > expected_tiles  # the large image really was split

    reference = hf_model(**inputs, use_cache=True)
    logits, cache = engine.prefill(inputs["input_ids"].numpy(), _features(engine, inputs))
    expected = reference.logits.numpy() if engine.logits_all_positions else reference.logits[:, -1:].numpy()
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= LOGITS_ATOL

    past = reference.past_key_values
    length = inputs["input_ids"].shape[1]
    token = int(reference.logits[0, -1].argmax())
    for _ in range(4):
        length += 1
        step = hf_model(input_ids=torch.tensor([[token]]), attention_mask=torch.ones(1, length, dtype=torch.long),
                        past_key_values=past, use_cache=True)
        logits, cache = engine.decode_step(token, cache)
        assert cache.length == length
        assert np.abs(logits - step.logits.numpy()).max() <= LOGITS_ATOL
        for layer in (0, len(step.past_key_values.layers) - 1):
            keys, values = cache.arrays(layer)
            assert np.abs(keys - step.past_key_values.layers[layer].keys.numpy()).max() <= LOGITS_ATOL
            assert np.abs(values - step.past_key_values.layers[layer].values.numpy()).max() <= LOGITS_ATOL
        past = step.past_key_values
        token = int(step.logits[0, -1].argmax())


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@torch.no_grad()
def test_greedy_32_tokens_identical_to_generate(scenario, engine, hf_model, hf_processor):
    inputs = _inputs(hf_processor, scenario)
    eos_ids = engine.package.tokens["eos_token_ids"]
    generated = hf_model.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=eos_ids,
                                  pad_token_id=2)
    reference = generated[0, inputs["input_ids"].shape[1]:].tolist()
    ours = engine.greedy(inputs["input_ids"].numpy(), _features(engine, inputs), 32, tuple(eos_ids))
    assert ours == reference
    assert len(ours) == 32  # a random model that stopped at once would make this comparison weak


def test_vision_encoder_drops_padding_images_like_transformers(engine, hf_model, hf_processor):
    """A batch padded with an all-zero image gives the features of the real images only, as HF does."""
    inputs = _inputs(hf_processor, "one-image")
    pixel_values = inputs["pixel_values"].numpy()
    mask = inputs["pixel_attention_mask"].numpy().astype(bool)
    padded_values = np.concatenate([pixel_values, np.zeros_like(pixel_values[:, :1])], axis=1)
    padded_mask = np.concatenate([mask, np.zeros_like(mask[:, :1])], axis=1)
    features = engine.encode_images(padded_values, padded_mask)
    with torch.no_grad():
        reference = hf_model.model.get_image_features(torch.from_numpy(padded_values), torch.from_numpy(padded_mask))
    assert features.shape == tuple(reference.shape) == (pixel_values.shape[1], 16, 64)
    assert np.abs(features - reference.numpy()).max() <= LOGITS_ATOL


def test_decoder_has_a_dynamic_batch(engine, hf_processor):
    """Two rows through the graph give what each row gives alone (the graph was traced with batch 2)."""
    inputs = _inputs(hf_processor, "text-only")
    embeds = engine.embed(inputs["input_ids"].numpy())
    single, _ = engine.forward(embeds, engine.empty_cache(1))
    pair, cache = engine.forward(np.concatenate([embeds, embeds[:, ::-1]]), engine.empty_cache(2))
    reversed_single, _ = engine.forward(np.ascontiguousarray(embeds[:, ::-1]), engine.empty_cache(1))
    assert cache.batch == 2
    assert np.abs(pair[0] - single[0]).max() <= 1e-5
    assert np.abs(pair[1] - reversed_single[0]).max() <= 1e-5


def test_fused_cache_grows_in_place_and_survives_reallocation(tiny_package, hf_model, hf_processor):
    """A fused cache is one buffer per layer, written in place; when a long answer outgrows it, it is reallocated
    with the old positions kept, and decoding goes on exactly as transformers does."""
    engine = Engine(ModelPackage.load(tiny_package))
    inputs = _inputs(hf_processor, "text-only")
    ids = inputs["input_ids"].numpy()
    logits, cache = engine.prefill(ids, None)  # no reserve: capacity rounds up to 256 positions
    assert cache.length == ids.shape[1] and cache.capacity == 256
    buffer = cache.keys[0]
    first = logits
    kept = first.copy()
    token = int(logits[0, -1].argmax())
    tokens, steps = [token], 256 - ids.shape[1] + 3  # crosses the end of the first buffer
    for _ in range(steps):
        logits, cache = engine.decode_step(token, cache)
        if cache.capacity == 256:
            assert cache.keys[0] is buffer  # no copy while it fits
        token = int(logits[0, -1].argmax())
        tokens.append(token)
    assert cache.capacity == 512 and cache.length == ids.shape[1] + steps
    assert np.array_equal(first, kept)  # returned logits are the caller's: later steps do not overwrite them
    with torch.no_grad():
        reference = hf_model.generate(**inputs, max_new_tokens=len(tokens), min_new_tokens=len(tokens),
                                      do_sample=False, pad_token_id=2)
    assert tokens == reference[0, ids.shape[1]:].tolist()


def test_fused_decoder_matches_the_portable_graph(tiny_package, tiny_package_portable, hf_processor):
    """The fused graph (GroupQueryAttention, SkipSimplifiedLayerNormalization, packed QKV and gate/up) against the
    unfused traced graph on the same spliced prompt with an image, then decode steps: same logits and KV cache."""
    fused = Engine(ModelPackage.load(tiny_package))
    portable = Engine(ModelPackage.load(tiny_package_portable))
    inputs = _inputs(hf_processor, "one-image")
    ids = inputs["input_ids"].numpy()
    features = _features(portable, inputs)
    assert np.array_equal(features, _features(fused, inputs))  # the same vision graph in both packages
    (fused_logits, fused_cache), (portable_logits, portable_cache) = (
        engine.prefill(ids, features) for engine in (fused, portable))
    assert np.abs(fused_logits[:, -1] - portable_logits[:, -1]).max() <= 1e-4
    token = int(portable_logits[0, -1].argmax())
    for _ in range(3):
        fused_logits, fused_cache = fused.decode_step(token, fused_cache)
        portable_logits, portable_cache = portable.decode_step(token, portable_cache)
        assert np.abs(fused_logits - portable_logits).max() <= 1e-4
        token = int(portable_logits[0, -1].argmax())
    for layer in range(fused.num_layers):
        for a, b in zip(fused_cache.arrays(layer), portable_cache.arrays(layer)):
            assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4


@torch.no_grad()
def test_vision_attention_is_fused_for_whole_tiles_and_padded_views(tiny_package, hf_model, hf_processor):
    """The vision graph's attention is onnxruntime's MultiHeadAttention behind an If: flash attention when every
    patch is real (what the processor gives: each tile and the global view are whole), the masked kernel when a
    view is padded (here: a tile whose right half is padding, as a batch of unequal images pads); each run's
    features equal HF's within 1e-4 on both branches."""
    import onnx

    package = ModelPackage.load(tiny_package)
    graph = onnx.load(str(package.graph_path("vision_encoder"))).graph
    ifs = [node for node in graph.node if node.op_type == "If"]
    assert len(ifs) == hf_model.config.vision_config.num_hidden_layers
    assert not any(node.op_type == "Softmax" for node in graph.node)
    engine = Engine(package)
    inputs = _inputs(hf_processor, "one-image")
    tile = inputs["pixel_values"].numpy()[:, :1]
    whole = inputs["pixel_attention_mask"].numpy().astype(bool)[:, :1]
    assert whole.all()
    half = whole.copy()
    half[..., half.shape[-1] // 2:] = False
    padded_tile = np.where(half[:, :, None], tile, 0.0).astype(np.float32)
    for values, mask in ((tile, whole), (padded_tile, half)):
        ours = engine.encode_images(values, mask)
        reference = hf_model.model.get_image_features(torch.from_numpy(values), torch.from_numpy(mask))
        assert np.abs(ours - reference.numpy()).max() <= 1e-4, f"padded: {not mask.all()}"
    assert np.abs(engine.encode_images(padded_tile, half) - engine.encode_images(padded_tile, whole)).max() > 1e-3
