"""Raw image bytes + OpenAI-style messages through the runtime give exactly transformers' greedy tokens."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from edgevlm.export.samples import sample_image
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.vlm import VisionLanguageModel


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def data_uri(data: bytes, fmt: str) -> str:
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode()}"


PNG = encoded(sample_image(320, 240, 1), "PNG")
JPEG = encoded(sample_image(90, 200, 2), "JPEG")


def conversation(name):
    """(OpenAI messages, HF template messages, images as the HF processor gets them)."""
    png_image = Image.open(io.BytesIO(PNG)).convert("RGB")
    jpeg_image = Image.open(io.BytesIO(JPEG)).convert("RGB")
    if name == "text-only":
        return ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}],
                [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
                 {"role": "user", "content": [{"type": "text", "text": "Hello there!"}]}], [])
    if name == "one-image":
        return ([{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(PNG, "PNG")}},
                    {"type": "text", "text": "What is in the image?"}]}],
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
                [png_image])
    if name == "two-images":
        return ([{"role": "user", "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": data_uri(PNG, "PNG")}},
                    {"type": "text", "text": "with"},
                    {"type": "image_url", "image_url": {"url": data_uri(JPEG, "JPEG"), "detail": "auto"}}]}],
                [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                              {"type": "text", "text": "with"}, {"type": "image"}]}],
                [png_image, jpeg_image])
    assert name == "multi-turn"
    return ([{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": base64.b64encode(JPEG).decode()}},  # raw base64
                {"type": "text", "text": "Describe it."}]},
             {"role": "assistant", "content": "A tall picture with shapes."},
             {"role": "user", "content": "Which colour is on top?"}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A tall picture with shapes."}]},
             {"role": "user", "content": [{"type": "text", "text": "Which colour is on top?"}]}],
            [jpeg_image])


@pytest.fixture(scope="module")
def vlm(tiny_package):
    return VisionLanguageModel.load(tiny_package)


@pytest.mark.parametrize("name", ["text-only", "one-image", "two-images", "multi-turn"])
def test_runtime_greedy_tokens_equal_transformers_generate(name, vlm, hf_model, hf_processor):
    openai_messages, hf_messages, images = conversation(name)
    prompt = vlm.prepare(openai_messages)
    text = hf_processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    inputs = hf_processor(text=text, images=images or None, return_tensors="pt")
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert prompt.image_tokens == int((inputs["input_ids"] == hf_model.config.image_token_id).sum())

    with torch.no_grad():
        generated = hf_model.generate(**inputs, max_new_tokens=24, do_sample=False,
                                      eos_token_id=list(vlm.eos_token_ids), pad_token_id=2)
    reference = generated[0, inputs["input_ids"].shape[1]:].tolist()
    steps = list(vlm.generate(prompt, SamplingParams(temperature=0), max_tokens=24))
    assert [s.token for s in steps] == reference
    assert steps[-1].finish_reason in ("stop", "length") and all(s.finish_reason is None for s in steps[:-1])
    text_out = "".join(s.text for s in steps)
    assert text_out == hf_processor.tokenizer.decode(reference, skip_special_tokens=True)
