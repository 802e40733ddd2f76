"""Qwen2-VL and Qwen2.5-VL against transformers: preprocessing within 1e-5, the image-token layout, the M-RoPE
positions (`get_rope_index`), Qwen2.5-VL's window order (`get_window_index`), the vision graphs, the fused M-RoPE
decoder, and tiny random-weight models of both families exported in both decoder forms and served by `edgevlm
serve` with transformers' greedy tokens and logprobs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from edgevlm.runtime.errors import ImageError
from edgevlm.runtime.families.qwen2_5_vl import vision_feed as windowed_feed
from edgevlm.runtime.families.qwen2_5_vl import window_index
from edgevlm.runtime.families.qwen2vl import Qwen2VLLayout, rope_index, vision_positions
from edgevlm.runtime.preprocess.qwen2vl import Qwen2VLImageConfig, image_grid, preprocess

FIXTURE = Path(__file__).parent / "fixtures" / "qwen2-vl-2b"
FIXTURE_25 = Path(__file__).parent / "fixtures" / "qwen2.5-vl-3b"  # configs only: tokenizer etc. are Qwen2-VL's
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


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("grids", [[], [(1, 16, 22)], [(1, 4, 6), (1, 30, 2)], [(1, 2, 2), (1, 6, 4), (1, 8, 8)]])
def test_mrope_positions_match_get_rope_index(grids, family):
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    image, start, end = CONFIG["image_token_id"], CONFIG["vision_start_token_id"], CONFIG["vision_end_token_id"]
    rng = np.random.default_rng(len(grids))
    ids = list(rng.integers(0, 1000, 5))
    for t, h, w in grids:
        ids += [start] + [image] * (t * h * w // 4) + [end] + list(rng.integers(0, 1000, int(rng.integers(1, 9))))
    fake = SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(spatial_merge_size=2, tokens_per_second=2), image_token_id=image,
        video_token_id=CONFIG["video_token_id"], vision_start_token_id=start))
    model = Qwen2VLModel if family == "qwen2_vl" else Qwen2_5_VLModel
    expected, delta = model.get_rope_index(fake, torch.tensor([ids]), torch.tensor(grids) if grids else None)
    positions, ours = rope_index(ids, grids, image)
    assert positions.tolist() == expected[:, 0].tolist()
    assert ours == int(delta.reshape(-1)[0])


@pytest.mark.parametrize("grids", [[(1, 16, 22)], [(1, 8, 8)], [(1, 2, 2), (1, 18, 10)], [(1, 10, 30), (1, 4, 6)],
                                   [(2, 8, 12)]])
def test_the_window_order_matches_get_window_index(grids):
    """Qwen2.5-VL's patch order (windows of 4×4 merged tokens, the edge ones partial, empty ones dropped) and window
    boundaries are HF's for one and several images, whole and partial windows, and a 2-frame grid."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    fake = SimpleNamespace(window_size=112, spatial_merge_size=2, patch_size=14, spatial_merge_unit=4)
    expected, boundaries = Qwen2_5_VisionTransformerPretrainedModel.get_window_index(fake, torch.tensor(grids))
    order, window_of = window_index(grids, 2, 4)
    assert order.tolist() == expected.tolist()
    sizes = np.bincount(window_of) * 4
    assert [0, *np.cumsum(sizes).tolist()] == torch.unique_consecutive(torch.tensor(boundaries)).tolist()


HF_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_qwen(request, tmp_path_factory):
    """A tiny random checkpoint of each family (Qwen2.5-VL: 4 vision blocks, windowed and full-attention ones)."""
    from edgevlm.export.random_model import QwenTinyDims, build_random_qwen2vl

    family = request.param
    if family == "qwen2_vl":
        return build_random_qwen2vl(FIXTURE, tmp_path_factory.mktemp("tiny-qwen2vl"), dims=QwenTinyDims())
    return build_random_qwen2vl(FIXTURE_25, tmp_path_factory.mktemp("tiny-qwen25vl"),
                                dims=QwenTinyDims(vision_layers=4), tokenizer_dir=FIXTURE)


def family_of(checkpoint: Path) -> str:
    return json.loads((checkpoint / "config.json").read_text())["model_type"]


def hf_model(checkpoint: Path):
    import transformers

    return getattr(transformers, HF_CLASSES[family_of(checkpoint)]).from_pretrained(checkpoint).eval()


def export_family(checkpoint: Path):
    from edgevlm.export.families import family_named

    return family_named(family_of(checkpoint))


def vision_feeds(checkpoint: Path, values: np.ndarray, grids: list) -> list[dict[str, np.ndarray]]:
    """The family's vision graph inputs, one feed per image (one image a run), made on the host as the runtime
    makes them."""
    feeds, start = [], 0
    for t, h, w in grids:
        image = values[start:start + t * h * w]
        start += t * h * w
        if family_of(checkpoint) == "qwen2_5_vl":
            feeds.append(windowed_feed(image, (t, h, w), 2, 4))
        else:
            feeds.append({"pixel_values": image, "position_ids": vision_positions((t, h, w))})
    return feeds


def test_the_runtime_prompt_and_pixels_drive_transformers_like_its_own(tiny_qwen):
    """A tiny random Qwen2VLForConditionalGeneration built from the card: the runtime's chat template rendering,
    image-token expansion, tokenization (tokenizers, tokenizer.json) and pixels give the ids transformers' own
    tokenizer gives for the processor's expansion, and the same greedy tokens from the model."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

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

    model = hf_model(tiny_qwen)
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
    on two images of different sizes (attention stays within each image; Qwen2.5-VL: and within each window in
    its windowed blocks)."""
    import torch

    model = hf_model(tiny_qwen)
    config = Qwen2VLImageConfig.from_dict(json.loads((tiny_qwen / "preprocessor_config.json").read_text()))
    family = export_family(tiny_qwen)
    encoder = family.VisionEncoder(model).eval()
    for images in ([picture(300, 200, 5)], [picture(300, 200, 5), picture(90, 400, 6)]):
        values, grids = preprocess(images, config)
        feeds = [{k: torch.from_numpy(v) for k, v in feed.items()}
                 for feed in vision_feeds(tiny_qwen, values, grids.tolist())]
        with torch.no_grad():
            expected = model.model.visual(torch.from_numpy(values), grid_thw=torch.from_numpy(grids))
            ours = torch.cat([encoder(**feed) for feed in feeds])
            if family.FAMILY == "qwen2_5_vl":  # the windows matter: without them the features are not HF's
                windowed = list(model.model.visual.fullatt_block_indexes)
                model.model.visual.fullatt_block_indexes = list(range(len(model.model.visual.blocks)))
                try:
                    unwindowed = torch.cat([encoder(**feed) for feed in feeds])
                finally:
                    model.model.visual.fullatt_block_indexes = windowed
                assert float((unwindowed - expected).abs().max()) > 1e-3
        assert ours.shape == expected.shape
        assert float((ours - expected).abs().max()) < 1e-5


def test_the_vision_graph_runs_any_image_count_and_size(tiny_qwen, tmp_path):
    """Exported once (traced on one image), the ONNX graph gives HF's features for other sizes, one image a run
    (HF's attention stays within each image: several images are several runs): nothing about the grid (or
    Qwen2.5-VL's windows) is baked in, and attention is onnxruntime's fused MultiHeadAttention."""
    import onnxruntime as ort
    import torch

    model = hf_model(tiny_qwen)
    path = tmp_path / "vision_encoder.onnx"
    with torch.no_grad():
        export_family(tiny_qwen).export_vision(model, path, 17)
    import onnx

    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    # one fused attention per block: MultiHeadAttention, or an If between the flash and the masked one (windows)
    assert ops.count("MultiHeadAttention") + ops.count("If") == len(model.model.visual.blocks)
    assert "Softmax" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    config = Qwen2VLImageConfig.from_dict(json.loads((tiny_qwen / "preprocessor_config.json").read_text()))
    for images in ([picture(500, 300, 7)], [picture(60, 60, 8), picture(200, 420, 9), picture(333, 111, 10)]):
        values, grids = preprocess(images, config)
        features = np.concatenate([session.run(None, feed)[0]
                                   for feed in vision_feeds(tiny_qwen, values, grids.tolist())])
        with torch.no_grad():
            expected = model.model.visual(torch.from_numpy(values), grid_thw=torch.from_numpy(grids)).numpy()
        assert features.shape == expected.shape
        assert float(np.abs(features - expected).max()) < 1e-4


def test_the_fused_mrope_decoder_matches_transformers(tiny_qwen, tmp_path):
    """The fused decoder built for Qwen2-VL (q/k/v biases, M-RoPE through RotaryEmbedding with host-made cos/sin
    rows) gives HF's logits on an image prompt at prefill and at two decode steps at position + rope offset."""
    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer

    from edgevlm.export.fused_decoder import build_fused_decoder
    from edgevlm.runtime.rope import inv_freq, mrope_tables

    model = hf_model(tiny_qwen)
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
def qwen_packages(tiny_qwen, tmp_path_factory):
    """The checkpoint exported in both decoder forms; `export_package` verified each against transformers."""
    import os

    from edgevlm.export.convert import Progress, export_package

    out = {}
    for form in ("fused", "portable"):
        with open(os.devnull, "w") as quiet:
            package, report = export_package(str(tiny_qwen), tmp_path_factory.mktemp("qwen-pkg") / form,
                                             decoder_form=form, progress=Progress(quiet))
        assert report.ok, "\n".join(report.lines())  # vision, embeddings, decoder and greedy tokens against HF
        out[form] = package.path
    return out


def _uri(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_quantized_packages_quantize_the_vision_tower_and_serve(tiny_qwen, tmp_path):
    """--quant int4: the fp32 graphs verify against transformers, the vision tower's linear layers are really
    int8 (its Gemms rewritten to MatMul first; attention stays the fused MultiHeadAttention), the decoder's
    matmuls 4-bit, and the package answers an image question."""
    import os

    import onnx

    from edgevlm.export.convert import Progress, export_package
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    with open(os.devnull, "w") as quiet:
        package, report = export_package(str(tiny_qwen), tmp_path / "int4", quant="int4", progress=Progress(quiet))
    assert report.ok, "\n".join(report.lines())
    vision = [n.op_type for n in onnx.load(str(package.graph_path("vision_encoder"))).graph.node]
    blocks = len(hf_model(tiny_qwen).model.visual.blocks)
    assert vision.count("MatMulInteger") >= 4 * blocks and "Gemm" not in vision  # qkv, proj, mlp per block
    assert vision.count("MultiHeadAttention") + vision.count("If") == blocks
    decoder = [n.op_type for n in onnx.load(str(package.graph_path("decoder"))).graph.node]
    assert decoder.count("MatMulNBits") >= 3
    vlm = VisionLanguageModel.load(package.path)
    try:
        params = SamplingParams(temperature=0, max_tokens=5)
        prompt = vlm.prepare([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _uri(picture(300, 200, 61))}},
            {"type": "text", "text": "What is it?"}]}], params)
        steps = list(vlm.generate(prompt, params))
        # the prompt's M-RoPE rows went through the int8 prefill graph (export/prefill_graph.py) as well
        assert vlm.engine.has_prefill_graph and vlm.engine._prefill is not None
        # ...and it decodes on the int8 KV cache (export/kv_int8.py, calibrated on text for M-RoPE decoders)
        assert vlm.engine.kv_cache == "int8" and "kv_int8" in package.graph("decoder")
    finally:
        vlm.close()
    assert prompt.image_tokens > 0 and len(steps) >= 1


@pytest.mark.parametrize("form", ["fused", "portable"])
def test_edgevlm_serve_answers_as_transformers(tiny_qwen, qwen_packages, form):
    """`edgevlm serve` on the package, through the openai client (streamed): for text, one image and two images of
    different sizes, the tokens are transformers.generate's greedy tokens on its own processor's inputs, their
    logprobs within 1e-4 (they agree to ~1e-6; a decode rope offset of 0 moves them ~1e-4 on the image prompts),
    and usage counts the prompt and its image tokens as the processor does; a required tool call works too."""
    import openai
    import torch
    from conftest import ServerProcess

    model, family = hf_model(tiny_qwen), export_family(tiny_qwen)
    processor = family.load_processor(str(tiny_qwen))
    tokenizer, image_id = processor.tokenizer, model.config.image_token_id
    eos = [int(t) for t in model.generation_config.eos_token_id]
    cases = {"text": [], "one image": [picture(500, 300, 21)],
             "two images": [picture(300, 200, 22), picture(120, 260, 23)]}
    server = ServerProcess("--model", str(qwen_packages[form]))
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        for case, images in cases.items():
            question = "What do you see?"
            inputs = family.chat_inputs(processor, images, question)
            with torch.no_grad():  # repetition_penalty 1: the card's generation config has 1.05, the API no such field
                out = model.generate(**inputs, max_new_tokens=12, do_sample=False, repetition_penalty=1.0,
                                     eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
            reference = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            reference = reference[:next((i for i, t in enumerate(reference) if t in eos), len(reference))]

            content = [{"type": "image_url", "image_url": {"url": _uri(image)}} for image in images]
            chunks = list(client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": content + [{"type": "text", "text": question}]}],
                max_tokens=12, temperature=0, logprobs=True, stream=True, stream_options={"include_usage": True}))
            entries = [e for c in chunks if c.choices and c.choices[0].logprobs
                       for e in c.choices[0].logprobs.content]
            assert [e.token for e in entries] == [tokenizer.decode([t]) for t in reference], case
            for entry, token, scores in zip(entries, reference, out.scores):
                assert abs(entry.logprob - float(torch.log_softmax(scores[0].double(), -1)[token])) < 1e-4, case
            usage = chunks[-1].usage
            assert usage.prompt_tokens == inputs["input_ids"].shape[1]
            assert usage.prompt_tokens_details.image_tokens == int((inputs["input_ids"] == image_id).sum())
            assert usage.completion_tokens == len(reference) and len(reference) >= 1
        # Tools on this family's chat template (it has no tools section; the server describes them): a required
        # call is a call of the named function with arguments of its schema.
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
            "additionalProperties": False}}}]
        response = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather?"}],
                                                  tools=tools, tool_choice="required", parallel_tool_calls=False,
                                                  max_tokens=60)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
        assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")
    finally:
        server.stop()


@pytest.mark.parametrize("form", ["fused", "portable"])
def test_batched_rows_keep_their_own_rope_offsets(qwen_packages, form):
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
    vlm = VisionLanguageModel.load(qwen_packages[form])
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


def test_structured_output_on_the_qwen_tokenizer(qwen_packages):
    """response_format json_schema works with Qwen2's 151k-token byte-level BPE (llguidance indexes it): the
    random model's answer is the schema's JSON."""
    from edgevlm.runtime.grammar import parse_response_format
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    schema = parse_response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"colour": {"enum": ["red", "blue"]}, "count": {"enum": [1, 2, 3]}},
        "required": ["colour", "count"], "additionalProperties": False}}})
    vlm = VisionLanguageModel.load(qwen_packages["fused"])
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
