"""The bundled demo model (models/demo-shapes) answers held-out shape questions correctly through the runtime.

Held-out samples are generated with a seed that neither training (1234), its progress set (99000001) nor the
benchmark (20261125) uses. Through `VisionLanguageModel` (onnxruntime, greedy), as a client would send them:
OpenAI messages with base64 PNG data URLs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "models" / "demo-shapes"
SEED = 4242
N = 140  # 20 per question type


@pytest.fixture(scope="module")
def demo_vlm():
    from edgevlm.runtime.vlm import VisionLanguageModel

    assert (PACKAGE / "model.json").is_file(), f"the demo package is missing: {PACKAGE}"
    return VisionLanguageModel.load(PACKAGE)


def _evaluate(vlm, n: int, seed: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import demo_accuracy
    finally:
        sys.path.pop(0)
    return demo_accuracy.evaluate(PACKAGE, n, seed, vlm=vlm, show_errors=10)


def test_demo_package_is_small():
    size = sum(f.stat().st_size for f in PACKAGE.iterdir() if f.is_file())
    assert size <= 15 * 1024 * 1024, f"{size / 1e6:.1f} MB"


def test_demo_model_accuracy(demo_vlm):
    result = _evaluate(demo_vlm, N, SEED)
    correct, total = result["overall"]
    assert total >= 100
    per = {q: f"{c}/{t}" for q, (c, t) in result["per_type"].items()}
    assert correct / total >= 0.90, f"overall {correct}/{total}; per type {per}; errors {result['errors']}"


def test_demo_model_red_circle(demo_vlm):
    """The README's example: a red circle in the middle of a white image."""
    from PIL import Image, ImageDraw

    from edgevlm.runtime.sampling import SamplingParams

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from demo_accuracy import image_url
    finally:
        sys.path.pop(0)
    image = Image.new("RGB", (200, 200), "white")
    ImageDraw.Draw(image).ellipse([60, 60, 140, 140], fill=(220, 30, 30))
    answers = {}
    for question in ("What shape is in the image?", "What color is the shape?", "Describe the image."):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(image)}},
                                                 {"type": "text", "text": question}]}]
        steps = demo_vlm.generate(demo_vlm.prepare(messages), SamplingParams(temperature=0), max_tokens=32)
        answers[question] = "".join(s.text for s in steps).strip()
    assert answers == {"What shape is in the image?": "A circle.", "What color is the shape?": "It is red.",
                       "Describe the image.": "A red circle."}
