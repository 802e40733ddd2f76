"""Qwen2-VL's runtime pieces against transformers: preprocessing within 1e-5, the image-token layout and the M-RoPE
positions (`get_rope_index`). The family is not servable yet (no export): these are its parts, proven first."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from edgevlm.runtime.errors import ImageError
from edgevlm.runtime.families.qwen2vl import Qwen2VLLayout, rope_index
from edgevlm.runtime.preprocess.qwen2vl import Qwen2VLImageConfig, image_grid, preprocess

FIXTURE = Path(__file__).parent / "fixtures" / "qwen2-vl-2b"
PROCESSOR = json.loads((FIXTURE / "preprocessor_config.json").read_text())
CONFIG = json.loads((FIXTURE / "config.json").read_text())


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: every resampling filter and rounding shows in it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(1, width - 1), y * 255 / max(1, height - 1),
                     (x + y) * 127 / max(1, width + height - 2)], axis=-1)
    noisy = base + rng.normal(0, 25, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


SIZES = [(10, 10), (28, 28), (56, 56), (57, 29), (100, 37), (37, 100), (224, 224), (333, 250), (640, 480),
         (480, 640), (1024, 768), (1500, 1000), (3000, 20), (20, 3000), (801, 799)]


@pytest.fixture(scope="module")
def hf():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(**PROCESSOR)


@pytest.mark.parametrize("width, height", SIZES)
def test_preprocessing_matches_the_processor(hf, width, height):
    config = Qwen2VLImageConfig.from_dict(PROCESSOR)
    image = picture(width, height, seed=width * 7 + height)
    expected = hf(images=[image], return_tensors="np")
    values, grids = preprocess([image], config)
    assert grids.tolist() == expected["image_grid_thw"].tolist()
    assert tuple(image_grid(width, height, config)) == tuple(expected["image_grid_thw"][0])
    assert values.shape == expected["pixel_values"].shape and values.dtype == np.float32
    assert np.abs(values - expected["pixel_values"]).max() <= 1e-5


def test_two_images_and_a_lower_pixel_budget(hf):
    """Several images concatenate their patches in order; detail "low" is the processor with a smaller
    max_pixels (256 tokens' worth)."""
    from transformers import Qwen2VLImageProcessor

    config = Qwen2VLImageConfig.from_dict(PROCESSOR)
    images = [picture(640, 480, 1), picture(300, 900, 2)]
    expected = hf(images=images, return_tensors="np")
    values, grids = preprocess(images, config)
    assert grids.tolist() == expected["image_grid_thw"].tolist()
    assert np.abs(values - expected["pixel_values"]).max() <= 1e-5
    low = 256 * 28 * 28
    reference = Qwen2VLImageProcessor(**{**PROCESSOR, "max_pixels": low})(images=images, return_tensors="np")
    values, grids = preprocess(images, config, max_pixels=low)
    assert grids.tolist() == reference["image_grid_thw"].tolist()
    assert np.abs(values - reference["pixel_values"]).max() <= 1e-5
    assert all(t * h * w // 4 <= 256 for t, h, w in grids.tolist())


def test_an_extreme_aspect_ratio_is_a_clear_error(hf):
    config = Qwen2VLImageConfig.from_dict(PROCESSOR)
    with pytest.raises(ValueError):
        hf(images=[picture(2010, 10, 0)], return_tensors="np")
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess([picture(2010, 10, 0)], config)


def test_the_image_tokens_expand_as_the_processor_does():
    layout = Qwen2VLLayout()
    template = json.loads((FIXTURE / "chat_template.instruct.json").read_text())["chat_template"]
    from edgevlm.runtime.prompt import ChatTemplate

    text = ChatTemplate(template).render([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "text", "text": "?"}]}],
        add_generation_prompt=True)
    assert text.count(layout.placeholder) == 2
    grids = [(1, 16, 22), (1, 4, 6)]
    expanded = layout.expand(text, grids)
    # Qwen2VLProcessor: each <|image_pad|> becomes grid.prod() // merge_size**2 of them.
    assert expanded.count("<|image_pad|>") == 16 * 22 // 4 + 4 * 6 // 4
    first = expanded.index("<|vision_start|>")
    assert expanded[first:].startswith("<|vision_start|>" + "<|image_pad|>" * 88 + "<|vision_end|>")
    assert expanded.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("grids", [[], [(1, 16, 22)], [(1, 4, 6), (1, 30, 2)], [(1, 2, 2), (1, 6, 4), (1, 8, 8)]])
def test_mrope_positions_match_get_rope_index(grids):
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    image, start, end = CONFIG["image_token_id"], CONFIG["vision_start_token_id"], CONFIG["vision_end_token_id"]
    rng = np.random.default_rng(len(grids))
    ids = list(rng.integers(0, 1000, 5))
    for t, h, w in grids:
        ids += [start] + [image] * (t * h * w // 4) + [end] + list(rng.integers(0, 1000, int(rng.integers(1, 9))))
    fake = SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(spatial_merge_size=2), image_token_id=image,
        video_token_id=CONFIG["video_token_id"], vision_start_token_id=start))
    expected, delta = Qwen2VLModel.get_rope_index(
        fake, torch.tensor([ids]), torch.tensor(grids) if grids else None, None, None)
    positions, ours = rope_index(ids, grids, image)
    assert positions.tolist() == expected[:, 0].tolist()
    assert ours == int(delta.reshape(-1)[0])


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from edgevlm.export.random_model import QwenTinyDims, build_random_qwen2vl

    return build_random_qwen2vl(FIXTURE, tmp_path_factory.mktemp("tiny-qwen2vl"), dims=QwenTinyDims())


def test_the_runtime_prompt_and_pixels_drive_transformers_like_its_own(tiny_qwen):
    """A tiny random Qwen2VLForConditionalGeneration built from the card: the runtime's chat template rendering,
    image-token expansion, tokenization (tokenizers, tokenizer.json) and pixels give the ids transformers' own
    tokenizer gives for the processor's expansion, and the same greedy tokens from the model."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    from edgevlm.runtime.prompt import ChatTemplate, encode_prompt

    images = [picture(300, 200, 3), picture(120, 260, 4)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                             {"type": "image"}, {"type": "text", "text": "please."}]}]
    processor_config = json.loads((tiny_qwen / "preprocessor_config.json").read_text())
    config = Qwen2VLImageConfig.from_dict(processor_config)
    layout = Qwen2VLLayout()
    template = json.loads((tiny_qwen / "chat_template.json").read_text())["chat_template"]
    values, grids = preprocess(images, config)
    text = layout.expand(ChatTemplate(template).render(messages, add_generation_prompt=True), grids.tolist())
    ours = encode_prompt(Tokenizer.from_file(str(tiny_qwen / "tokenizer.json")), text)

    hf_tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    hf_images = Qwen2VLImageProcessor(**processor_config)(images=images, return_tensors="pt")
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for grid in hf_images["image_grid_thw"]:  # Qwen2VLProcessor's expansion, one image at a time
        prompt = prompt.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
    reference = hf_tokenizer(prompt.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"]
    assert ours == reference

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen).eval()
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor([reference]), pixel_values=hf_images["pixel_values"],
                                image_grid_thw=hf_images["image_grid_thw"], max_new_tokens=8, do_sample=False)
        mine = model.generate(input_ids=torch.tensor([ours]), pixel_values=torch.from_numpy(values),
                              image_grid_thw=torch.from_numpy(grids), max_new_tokens=8, do_sample=False)
    assert mine.tolist() == theirs.tolist()
    positions, delta = rope_index(ours, grids.tolist(), CONFIG["image_token_id"])
    expected, expected_delta = model.model.get_rope_index(torch.tensor([ours]), torch.from_numpy(grids))
    assert positions.tolist() == expected[:, 0].tolist() and delta == int(expected_delta.reshape(-1)[0])


def test_the_exportable_vision_encoder_equals_transformers(tiny_qwen):
    """The vision tower with its grid-derived inputs computed on the host (runtime) equals HF's on one image and
    on two images of different sizes (attention stays within each image)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from edgevlm.export.families.qwen2vl import VisionEncoder
    from edgevlm.runtime.families.qwen2vl import vision_positions

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen).eval()
    config = Qwen2VLImageConfig.from_dict(json.loads((tiny_qwen / "preprocessor_config.json").read_text()))
    encoder = VisionEncoder(model).eval()
    for images in ([picture(300, 200, 5)], [picture(300, 200, 5), picture(90, 400, 6)]):
        values, grids = preprocess(images, config)
        positions, segments = vision_positions(grids.tolist())
        with torch.no_grad():
            expected = model.model.visual(torch.from_numpy(values), grid_thw=torch.from_numpy(grids))
            ours = encoder(torch.from_numpy(values), torch.from_numpy(positions), torch.from_numpy(segments))
        assert ours.shape == expected.shape
        assert float((ours - expected).abs().max()) < 1e-5


def test_the_vision_graph_runs_any_image_count_and_size(tiny_qwen, tmp_path):
    """Exported once (traced on two images of 4×6 and 2×8 patches), the ONNX graph gives HF's features for other
    counts and sizes: nothing about the grid is baked in."""
    import onnxruntime as ort
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from edgevlm.export.families.qwen2vl import export_vision
    from edgevlm.runtime.families.qwen2vl import vision_positions

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen).eval()
    path = tmp_path / "vision_encoder.onnx"
    with torch.no_grad():
        export_vision(model, path, 17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    config = Qwen2VLImageConfig.from_dict(json.loads((tiny_qwen / "preprocessor_config.json").read_text()))
    for images in ([picture(500, 300, 7)], [picture(60, 60, 8), picture(200, 420, 9), picture(333, 111, 10)]):
        values, grids = preprocess(images, config)
        positions, segments = vision_positions(grids.tolist())
        (features,) = session.run(None, {"pixel_values": values, "position_ids": positions, "segment_ids": segments})
        with torch.no_grad():
            expected = model.model.visual(torch.from_numpy(values), grid_thw=torch.from_numpy(grids)).numpy()
        assert features.shape == expected.shape
        assert float(np.abs(features - expected).max()) < 1e-4


def test_the_fused_mrope_decoder_matches_transformers(tiny_qwen, tmp_path):
    """The fused decoder built for Qwen2-VL (q/k/v biases, M-RoPE through RotaryEmbedding with host-made cos/sin
    rows) gives HF's logits on an image prompt at prefill and at two decode steps at position + rope offset."""
    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    from edgevlm.export.fused_decoder import build_fused_decoder
    from edgevlm.runtime.rope import inv_freq, mrope_tables

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen).eval()
    info = build_fused_decoder(model, tmp_path / "decoder.onnx", max_sequence_length=512)
    assert info["rotary"] == "mrope"
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    text_config = model.config.text_config
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    frequencies = inv_freq(head_dim, text_config.rope_theta)
    sections = info["mrope_section"]

    config = Qwen2VLImageConfig.from_dict(json.loads((tiny_qwen / "preprocessor_config.json").read_text()))
    values, grids = preprocess([picture(300, 200, 11), picture(100, 160, 12)], config)
    layout, tokenizer = Qwen2VLLayout(), AutoTokenizer.from_pretrained(tiny_qwen)
    text = layout.expand("<|im_start|>user\n" + layout.placeholder + "and" + layout.placeholder
                         + "?<|im_end|>\n<|im_start|>assistant\n", grids.tolist())
    ids = tokenizer(text)["input_ids"]
    image_id = CONFIG["image_token_id"]
    positions, delta = rope_index(ids, grids.tolist(), image_id)
    with torch.no_grad():
        input_ids = torch.tensor([ids])
        embeds = model.model.get_input_embeddings()(input_ids)
        features = torch.cat(list(model.model.get_image_features(torch.from_numpy(values),
                                                                  torch.from_numpy(grids))))
        embeds[input_ids == image_id] = features
        reference = model(inputs_embeds=embeds, position_ids=torch.from_numpy(positions)[:, None, :], use_cache=True)

    layers, kv = text_config.num_hidden_layers, text_config.num_key_value_heads
    past = {f"past_key_values.{i}.{k}": np.zeros((1, kv, 0, head_dim), np.float32)
            for i in range(layers) for k in ("key", "value")}

    def run(embeds_np, past, rows_positions, seq, total):
        cos, sin = mrope_tables(rows_positions, frequencies, sections)
        feed = {"inputs_embeds": embeds_np, **past, "seqlens_k": np.array([total - 1], np.int32),
                "total_sequence_length": np.array(total, np.int32),
                "position_ids": np.arange(seq, dtype=np.int64)[None], "cos_cache": cos, "sin_cache": sin}
        logits, *present = session.run(None, feed)
        return logits, {name: value for name, value in zip(list(past), present)}

    logits, past = run(embeds.numpy(), past, positions, len(ids), len(ids))
    assert np.abs(logits[0, -1] - reference.logits[0, -1].numpy()).max() < 1e-3
    # The cached keys are rotated: they show any error in the M-RoPE angles (a tiny random model's logits are
    # too flat to).
    for i, layer in enumerate(reference.past_key_values.layers):
        assert np.abs(past[f"past_key_values.{i}.key"] - layer.keys.numpy()).max() < 1e-4
        assert np.abs(past[f"past_key_values.{i}.value"] - layer.values.numpy()).max() < 1e-4
    cache, total = reference.past_key_values, len(ids)
    token = int(reference.logits[0, -1].argmax())
    for _ in range(2):  # decode: text tokens, all three positions = KV position + the prompt's rope offset
        position = total + delta
        with torch.no_grad():
            step = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                         position_ids=torch.full((3, 1, 1), position), use_cache=True)
            embed = model.model.get_input_embeddings()(torch.tensor([[token]])).numpy()
        logits, past = run(embed, past, np.full((3, 1), position), 1, total + 1)
        assert np.abs(logits[0, -1] - step.logits[0, -1].numpy()).max() < 1e-3
        for i, layer in enumerate(step.past_key_values.layers):  # the new key, rotated at position + offset
            assert np.abs(past[f"past_key_values.{i}.key"][:, :, -1] - layer.keys[:, :, -1].numpy()).max() < 1e-4
        cache, total, token = step.past_key_values, total + 1, int(step.logits[0, -1].argmax())


@pytest.fixture(scope="module")
def qwen_package(tiny_qwen, tmp_path_factory):
    import os

    from edgevlm.export.convert import Progress, export_package

    with open(os.devnull, "w") as quiet:
        package, report = export_package(str(tiny_qwen), tmp_path_factory.mktemp("qwen-pkg") / "tiny-qwen2vl",
                                         progress=Progress(quiet))
    assert report.ok, "\n".join(report.lines())  # vision, embeddings, decoder and greedy tokens against HF
    return package.path


def _uri(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("case", ["text", "one image", "two images"])
def test_served_answers_equal_transformers(tiny_qwen, qwen_package, case):
    """Through the engine (scheduler, KV slab, M-RoPE positions and offsets): greedy tokens identical to
    transformers.generate and logprobs within 1e-5 (they agree to ~5e-7; a decode rope offset of 0 moves them
    ~1e-4), for text, one image and two images of different sizes."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    images = {"text": [], "one image": [picture(500, 300, 21)],
              "two images": [picture(300, 200, 22), picture(120, 260, 23)]}[case]
    content = [{"type": "image_url", "image_url": {"url": _uri(image)}} for image in images]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": "What do you see?"}]}]
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=True)
    vlm = VisionLanguageModel.load(qwen_package)
    try:
        prompt = vlm.prepare(messages, params)
        steps = list(vlm.generate(prompt, params))
    finally:
        vlm.close()
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen).eval()
    extra = {}
    if images:
        pixels = Qwen2VLImageProcessor.from_pretrained(tiny_qwen)(images=images, return_tensors="pt")
        extra = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
    with torch.no_grad():  # repetition_penalty 1: the card's generation config has 1.05, the API has no such field
        out = model.generate(input_ids=torch.tensor([prompt.input_ids]), max_new_tokens=20, do_sample=False,
                             repetition_penalty=1.0, output_scores=True, return_dict_in_generate=True, **extra)
    reference = out.sequences[0, len(prompt.input_ids):].tolist()
    assert [s.token for s in steps] == reference[:len(steps)] and len(steps) >= 1
    for step, scores in zip(steps, out.scores):
        assert abs(step.sample.logprob - float(torch.log_softmax(scores[0].double(), -1)[step.token])) < 1e-5


def test_batched_rows_keep_their_own_rope_offsets(qwen_package):
    """Three requests (text, one image, two images: three different decode offsets) decoded together give the
    tokens and logprobs each gave alone (the second time their prompts come from the prefix cache, so prefix
    reuse keeps M-RoPE positions exact too)."""
    import threading

    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.scheduler import JobEnd
    from edgevlm.runtime.vlm import VisionLanguageModel

    conversations = [[], [picture(500, 300, 31)], [picture(300, 200, 32), picture(120, 260, 33)]]
    requests = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _uri(image)}}
                                              for image in images] + [{"type": "text", "text": "Go on."}]}]
                for images in conversations]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=True)
    vlm = VisionLanguageModel.load(qwen_package)
    try:
        alone = [[(s.token, s.sample.logprob) for s in vlm.generate(vlm.prepare(m, params), params)]
                 for m in requests]
        prompts = [vlm.prepare(m, params) for m in requests]
        assert len({p.positions[1] for p in prompts}) == 3  # three different offsets
        together, done = [[] for _ in prompts], [threading.Event() for _ in prompts]
        with vlm.scheduler._lock:  # admitted in one iteration, decoded as one batch
            for i, prompt in enumerate(prompts):
                vlm.submit(prompt, params, lambda e, i=i: done[i].set() if isinstance(e, JobEnd)
                           else together[i].append((e.token, e.sample.logprob)))
        assert all(event.wait(60) for event in done)
    finally:
        vlm.close()
    for got, expected in zip(together, alone):
        assert [t for t, _ in got] == [t for t, _ in expected]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, expected)) < 1e-5


def test_edgevlm_serve_answers_with_the_openai_client(qwen_package):
    """The real server on the Qwen2-VL package: an image question through the openai client streams the same
    tokens as the in-process engine, with the image's tokens counted in usage."""
    import openai
    from conftest import ServerProcess

    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    image = picture(400, 300, 41)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _uri(image)}},
                                             {"type": "text", "text": "Describe it."}]}]
    vlm = VisionLanguageModel.load(qwen_package)
    try:
        params = SamplingParams(temperature=0, max_tokens=10)
        prompt = vlm.prepare(messages, params)
        expected = "".join(s.text for s in vlm.generate(prompt, params))
    finally:
        vlm.close()
    server = ServerProcess("--model", str(qwen_package))
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert text == expected
        assert usage.prompt_tokens == len(prompt.input_ids)
        assert usage.prompt_tokens_details.image_tokens == prompt.image_tokens > 0
    finally:
        server.stop()


def test_structured_output_on_the_qwen_tokenizer(qwen_package):
    """response_format json_schema works with Qwen2's 151k-token byte-level BPE (llguidance indexes it): the
    random model's answer is the schema's JSON."""
    from edgevlm.runtime.grammar import parse_response_format
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    schema = parse_response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"colour": {"enum": ["red", "blue"]}, "count": {"enum": [1, 2, 3]}},
        "required": ["colour", "count"], "additionalProperties": False}}})
    vlm = VisionLanguageModel.load(qwen_package)
    try:
        params = SamplingParams(temperature=0, max_tokens=40)
        prompt = vlm.prepare([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _uri(picture(200, 200, 51))}},
            {"type": "text", "text": "Colour and count, as JSON."}]}], params)
        steps = list(vlm.generate(prompt, params, schema=schema))
    finally:
        vlm.close()
    answer = json.loads("".join(s.text for s in steps))
    assert set(answer) == {"colour", "count"} and answer["colour"] in ("red", "blue")
    assert answer["count"] in (1, 2, 3) and steps[-1].finish_reason == "stop"  # (an open integer: random digits)
