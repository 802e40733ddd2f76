"""An int4 package's int8 prefill graph (export/prefill_graph.py, runtime/int8_prefill.py): exported without int8
bytes on disk, its weights made at load hold the 4-bit grid, prompts run through it and agree with the 4-bit route,
and a prompt's keys and values do not depend on how it is cut into chunks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from edgevlm.runtime.engine import Engine
from edgevlm.runtime.int8_prefill import column_int8
from edgevlm.runtime.limits import EngineConfig
from edgevlm.runtime.package import ModelPackage
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.vlm import VisionLanguageModel


def _manifest(path: Path) -> dict:
    return json.loads((path / "model.json").read_text())


def test_the_package_has_a_prefill_graph_and_no_int8_weights_on_disk(int4_package):
    decoder = _manifest(int4_package)["graphs"]["decoder"]
    spec = decoder["prefill"]
    files = _manifest(int4_package)["files"]
    assert spec["file"] in files and all(name in files for name in decoder["external_data"])
    assert not (int4_package / spec["derived_file"]).exists()
    graph = onnx.load(str(int4_package / spec["file"]), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    four_bit = [n for n in onnx.load(str(int4_package / decoder["file"]), load_external_data=False).graph.node
                if n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 4 for a in n.attribute)]
    # every 4-bit projection but the last layer's o_proj and MLP (they feed only the logits, which it does not give)
    assert ops.count("MatMulIntegerToFloat") == len(spec["weights"]) == len(four_bit) - 3 > 0
    assert "MatMulNBits" not in ops  # the 8-bit lm_head is not in it: it outputs keys and values only
    assert {o.name for o in graph.graph.output} == {o.name for o in graph.graph.output if o.name.startswith("present.")}
    # its weights are references into the decoder's data file or the derived (in-memory) one, not copies
    stored = sum(len(t.raw_data) for t in graph.graph.initializer)
    assert stored < 4096 and (int4_package / spec["file"]).stat().st_size < 64_000
    derived = sum(int(row["k"]) * int(row["n"]) for row in spec["weights"])
    assert spec["derived_bytes"] >= derived


def test_int8_columns_hold_the_4bit_grid(int4_package):
    spec = _manifest(int4_package)["graphs"]["decoder"]["prefill"]
    data = {}
    for row in spec["weights"][:6]:
        arrays = []
        for where in (row["b"], row["scales"]):
            raw = data.setdefault(where["file"], np.fromfile(int4_package / where["file"], dtype=np.uint8))
            arrays.append(raw[where["offset"]:where["offset"] + where["bytes"]].view(where["dtype"])
                          .reshape(where["shape"]))
        packed, scales = arrays
        k, n = row["k"], row["n"]
        high, low = np.divmod(packed.astype(np.int32), 16)
        codes = np.stack([low, high], axis=-1).reshape(n, -1)[:, :k]  # low nibble first
        block = row["block_size"]
        weights = (codes - 8) * np.repeat(scales.astype(np.float32).reshape(n, -1), block, axis=1)[:, :k]
        w8, column = column_int8(packed, scales, k)
        assert w8.dtype == np.int8 and w8.shape == (k, n) and np.abs(w8.astype(np.int32)).max() <= 127
        error = np.abs(w8.T.astype(np.float32) * column[:, None] - weights)
        assert (error <= column[:, None] * (0.5 + 1e-4)).all()
        # the column's largest 4-bit value (-8 × its largest block scale) lands on the int8 grid's end
        assert (np.abs(w8).max(axis=0) == 127).mean() > 0.5


def _prompt(length: int) -> np.ndarray:
    return ((np.arange(length, dtype=np.int64) * 37 + 11) % 900) + 50


def test_prompts_run_on_the_int8_graph_close_to_the_4bit_route(int4_package):
    package = ModelPackage.load(int4_package)
    int8 = Engine(package, threads=2)
    four = Engine(package, threads=2, int8_prefill=False)
    assert int8.has_prefill_graph and not four.has_prefill_graph
    ids = _prompt(40)
    a, cache_a = int8.prefill(ids)
    b, cache_b = four.prefill(ids)
    assert int8._prefill is not None  # made and used
    keys_a, keys_b = cache_a.arrays(0)[0], cache_b.arrays(0)[0]
    assert not np.array_equal(keys_a[:, :, :-1], keys_b[:, :, :-1])  # another kernel wrote them
    assert np.abs(keys_a - keys_b).max() < 0.05 * np.abs(keys_b).max()
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()
    # decode steps after it are the decoder graph's, whichever route filled the prompt
    token = int(a[0, -1].argmax())
    step_a, _ = int8.decode_step(token, cache_a)
    step_b, _ = four.decode_step(token, cache_b)
    assert np.abs(step_a - step_b).max() < 0.1 * np.abs(step_b).max()


def test_a_prompt_cut_into_chunks_gets_the_same_keys(int4_package):
    engine = Engine(ModelPackage.load(int4_package), threads=2)
    ids = _prompt(300)
    embeds = engine.embed(ids[None])
    whole, chunked = engine.slab(2, 512), engine.slab(2, 512)
    one = whole.run(0, embeds, np.array([0]))
    for begin in range(0, 300, 128):  # what the scheduler does, with logits for the last chunk only
        end = min(begin + 128, 300)
        last = chunked.run(1, embeds[:, begin:end], np.array([begin]), logits=end == 300)
        assert (last is None) == (end != 300)
    for layer in (0, engine.num_layers - 1):
        for a, b in ((whole.keys[layer], chunked.keys[layer]), (whole.values[layer], chunked.values[layer])):
            np.testing.assert_allclose(a[0, :, :300], b[1, :, :300], rtol=0, atol=1e-5 * np.abs(a).max())
    np.testing.assert_allclose(one, last, rtol=0, atol=1e-4 * np.abs(one).max())


def test_the_served_path_answers_a_long_prompt_as_the_engine_does(int4_package):
    """Through the scheduler (prompt chunks of 256 in the KV slab) and through Engine.greedy (one prefill)."""
    model = VisionLanguageModel.load(int4_package, engine_config=EngineConfig(max_batch=2, kv_cache="float32"))
    try:
        no_eos = {t: -100 for t in model.eos_token_ids}
        params = SamplingParams(temperature=0, max_tokens=12, logit_bias=no_eos)
        prompt = model.prepare([{"role": "user", "content": "one two three " * 120}], params)
        assert len(prompt.input_ids) > 256
        served = [step.token for step in model.generate(prompt, params)]
        engine = Engine(ModelPackage.load(int4_package), threads=2)
        alone = []
        logits, cache = engine.prefill(np.asarray(prompt.input_ids))
        for _ in range(12):
            scores = logits[0, -1].copy()
            scores[list(no_eos)] -= 100
            alone.append(int(scores.argmax()))
            logits, cache = engine.decode_step(alone[-1], cache)
        assert served == alone
        assert model.engine._prefill is not None
    finally:
        model.close()
