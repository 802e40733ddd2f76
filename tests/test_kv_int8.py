"""The int8 KV cache (export/kv_int8.py, runtime/kv_int8.py; `Engine(kv_cache="int8")`, `edgevlm serve --kv-cache
int8`): an int4 package carries an int8-cache variant of its decoder over the same weights, keys and values are
stored as round(x / step) per channel with the calibrated steps (prompt chunks on a float32 copy, decode steps in
the graph), decoding stays close to the float32 cache, prompt chunking and batching barely matter, and the server
takes it with 4x the positions per KV budget."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import openai
import pytest
from conftest import ServerProcess

from edgevlm.runtime.engine import Engine
from edgevlm.runtime.errors import PackageError
from edgevlm.runtime.limits import EngineConfig
from edgevlm.runtime.package import ModelPackage


def _decoder_entry(path) -> dict:
    return json.loads((path / "model.json").read_text())["graphs"]["decoder"]


def _prompt(length: int) -> np.ndarray:
    return ((np.arange(length, dtype=np.int64) * 53 + 7) % 900) + 40


def _steps(path) -> np.ndarray:
    """The package's K and V quantization steps [layers, 2, kv_heads, head_dim], from the file the graph reads."""
    scales = _decoder_entry(path)["kv_int8"]["scales"]
    return np.fromfile(path / scales["file"], dtype=scales["dtype"]).reshape(scales["shape"])


def test_the_package_carries_an_int8_cache_decoder_over_the_same_weights(int4_package):
    entry = _decoder_entry(int4_package)
    variant = entry["kv_int8"]
    files = json.loads((int4_package / "model.json").read_text())["files"]
    assert variant["file"] in files and variant["scales"]["file"] in files  # checksummed like every file
    assert variant["kv_dtype"] == "int8" and variant["calibration_tokens"] > 1000
    graph = onnx.load(str(int4_package / variant["file"]), load_external_data=False).graph
    plain = onnx.load(str(int4_package / entry["file"]), load_external_data=False).graph
    assert [n.op_type for n in graph.node] == [n.op_type for n in plain.node]
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert attention and all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["k_quant_type"]
                             == b"PER_CHANNEL" for n in attention)
    kv = [v for v in list(graph.input) + list(graph.output) if v.name.startswith(("past_key", "present."))]
    assert kv and all(v.type.tensor_type.elem_type == onnx.TensorProto.INT8 for v in kv)
    # nothing is stored twice: the weights stay in the shared data file, the steps in their own small file
    assert sum(len(t.raw_data) for t in graph.initializer) == sum(len(t.raw_data) for t in plain.initializer)
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {e.value for t in plain.initializer for e in t.external_data if e.key == "location"} | \
        {variant["scales"]["file"]}
    assert (int4_package / variant["scales"]["file"]).stat().st_size == 4 * np.prod(variant["scales"]["shape"])


def test_keys_and_values_are_stored_per_channel_at_the_calibrated_steps(int4_package):
    """Layer 0's keys and values depend on the embeddings alone, so the int8 cache must hold round(x / step) of the
    float32 cache's, channel by channel, with the rotary pairs sharing a step: for the prompt's positions (stored
    by the runtime) and for a decode step's (stored by the graph)."""
    package = ModelPackage.load(int4_package)
    ids = _prompt(120)
    _, exact = Engine(package, threads=2).prefill(ids)
    _, quantized = Engine(package, threads=2, kv_cache="int8").prefill(ids)
    steps = _steps(int4_package)[0]
    half = steps.shape[-1] // 2
    np.testing.assert_array_equal(steps[0, :, :half], steps[0, :, half:])
    for stored, reference, step in zip(quantized.arrays(0), exact.arrays(0), steps):
        assert stored.dtype == np.int8 and reference.dtype == np.float32
        stored, reference = stored[0].astype(np.float32), reference[0]
        clipped = (stored == 127) | (stored == -128)
        assert clipped.mean() < 0.01  # the calibrated range holds nearly all of a prompt unlike the calibration's
        error = np.abs(stored * step[:, None, :] - reference)
        assert (error[~clipped] <= 0.5 * np.broadcast_to(step[:, None, :], error.shape)[~clipped] * (1 + 1e-3)
                + 1e-6).all()
        assert np.abs(stored).mean() > 8  # steps fit the values, not a range far wider


def test_decoding_with_the_int8_cache_stays_close_to_the_float32_cache(int4_package):
    package = ModelPackage.load(int4_package)
    ids = _prompt(200)
    rows = {}
    for kv_cache in ("float32", "int8"):
        engine = Engine(package, threads=2, kv_cache=kv_cache)
        logits, cache = engine.prefill(ids)
        out = [logits[0, -1]]
        for token in (5, 17, 230, 41, 9, 77):
            logits, cache = engine.decode_step(token, cache)
            out.append(logits[0, -1])
        rows[kv_cache] = np.stack(out)
    exact, int8 = rows["float32"], rows["int8"]
    assert not np.array_equal(exact, int8)  # it did read an int8 cache
    assert np.abs(exact - int8).max() < 0.08 * np.abs(exact).max()


def test_without_the_prefill_graph_prompts_run_on_the_quantized_cache(int4_package):
    package = ModelPackage.load(int4_package)
    ids = _prompt(90)
    with_copy, _ = Engine(package, threads=2, kv_cache="int8").prefill(ids)
    engine = Engine(package, threads=2, kv_cache="int8", int8_prefill=False)
    assert not engine.has_prefill_graph
    direct, cache = engine.prefill(ids)
    assert cache.keys[0].numpy().dtype == np.int8
    # another route (4-bit weights, quantized past inside each chunk), the same answer within the int8 route's error
    assert np.abs(direct - with_copy).max() < 0.1 * np.abs(with_copy).max()


def test_chunking_barely_matters_and_batches_change_nothing(int4_package):
    """A chunk attends to the int8 past (dequantized) and to its own positions in float32, so a prompt cut into
    chunks stores almost the same int8 keys as in one piece; rows decoded together get what each gets alone."""
    engine = Engine(ModelPackage.load(int4_package), threads=2, kv_cache="int8")
    ids = _prompt(300)
    embeds = engine.embed(ids[None])
    slab = engine.slab(3, 512)
    whole = slab.run(0, embeds, np.array([0]))
    for begin in range(0, 300, 128):
        chunk = slab.run(1, embeds[:, begin:begin + 128], np.array([begin]), logits=begin + 128 >= 300)
    slab.run(2, embeds[:, :150], np.array([0]))
    for layer in (0, engine.num_layers - 1):
        for buffer in (slab.keys[layer], slab.values[layer]):
            assert buffer.dtype == np.int8
            a, b = buffer[0, :, :300].astype(int), buffer[1, :, :300].astype(int)
            assert np.abs(a - b).max() <= 3 and (a == b).mean() > 0.75  # a step or two, where any
            if layer == 0:  # nothing attended to yet: identical
                np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(whole, chunk, rtol=0, atol=0.05 * np.abs(whole).max())
    together = slab.run(1, engine.embed(np.array([[11], [12]])), np.array([300, 150]))
    alone = engine.slab(3, 512)
    for begin in range(0, 300, 128):
        alone.run(1, embeds[:, begin:begin + 128], np.array([begin]), logits=begin + 128 >= 300)
    alone.run(2, embeds[:, :150], np.array([0]))
    first = alone.run(1, engine.embed(np.array([[11]])), np.array([300]))
    second = alone.run(2, engine.embed(np.array([[12]])), np.array([150]))
    np.testing.assert_allclose(together, np.concatenate([first, second]), rtol=0, atol=1e-5 * np.abs(first).max())


def test_the_served_path_and_the_engine_agree(int4_package):
    """The scheduler's chunked prefill in the slab and Engine.prefill give the same greedy tokens."""
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    model = VisionLanguageModel.load(int4_package, engine_config=EngineConfig(max_batch=2, kv_cache="int8"))
    try:
        no_eos = {t: -100 for t in model.eos_token_ids}
        params = SamplingParams(temperature=0, max_tokens=10, logit_bias=no_eos)
        prompt = model.prepare([{"role": "user", "content": "four five six " * 50}], params)
        assert len(prompt.input_ids) < 256  # one chunk: the same cut as Engine.prefill's
        served = [step.token for step in model.generate(prompt, params)]
        engine = model.engine
        alone = []
        logits, cache = engine.prefill(np.asarray(prompt.input_ids))
        for _ in range(10):
            scores = logits[0, -1].copy()
            scores[list(no_eos)] -= 100
            alone.append(int(scores.argmax()))
            logits, cache = engine.decode_step(alone[-1], cache)
        assert served == alone
        assert model.engine.slab(1, 8).keys[0].dtype == np.int8
    finally:
        model.close()


def test_a_package_without_int8_cache_graphs_says_so(tiny_package):
    with pytest.raises(PackageError, match="no int8 KV cache graphs"):
        Engine(ModelPackage.load(tiny_package), kv_cache="int8")
    with pytest.raises(ValueError, match="kv_cache"):
        EngineConfig(kv_cache="fp8")


def _slot_positions(server: ServerProcess) -> int:
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics") as response:
        text = response.read().decode()
    return int(float(re.search(r"^edgevlm_kv_slot_positions (\S+)$", text, re.M).group(1)))


def test_the_server_serves_an_int8_cache_by_default_where_the_package_has_one(int4_package, tiny_package):
    budget = ("--kv-budget-mb", "0.4096", "--max-batch", "2")  # below the tiny decoder's 2,048 positions either way
    plain = ServerProcess("--model", str(int4_package), *budget, "--kv-cache", "float32")
    int8 = ServerProcess("--model", str(int4_package), *budget)  # auto: the package has an int8 cache graph
    try:
        assert _slot_positions(int8) == 4 * _slot_positions(plain)
        assert "edgevlm: KV cache int8\n" in int8.lines and "edgevlm: KV cache float32\n" in plain.lines
        client = openai.OpenAI(base_url=int8.base_url, api_key="x", max_retries=0)
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello " * 40}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens > 40
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    finally:
        plain.stop()
        int8.stop()
    with pytest.raises(RuntimeError, match="no int8 KV cache graphs"):
        ServerProcess("--model", str(tiny_package), "--kv-cache", "int8")
    fp32 = ServerProcess("--model", str(tiny_package))  # auto on a package without one: float32
    try:
        assert "edgevlm: KV cache float32\n" in fp32.lines
    finally:
        fp32.stop()
