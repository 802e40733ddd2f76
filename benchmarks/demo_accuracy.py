"""Accuracy of the demo model package through the runtime (onnxruntime, no torch) on held-out generated samples.

    python benchmarks/demo_accuracy.py [--model models/demo-shapes] [-n 1050] [--seed 20261125]

Samples come from `edgevlm.export.demo.data.eval_samples` with a seed the training never used (training draws
from seed 1234 and its progress set from 99000001), balanced over the question types. Each sample is sent the way
a client sends it: OpenAI messages with the image as a base64 PNG data URL, rendered by the package's chat template,
greedy decoding (temperature 0). Scoring is exact match after light normalisation (strip, lowercase, collapse
spaces, "colour" = "color").
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "demo-shapes"
DEFAULT_SEED = 20261125


def image_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def messages_for(sample) -> list[dict]:
    if sample.scene is None:
        return [{"role": "user", "content": sample.question}]
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url(sample.scene.image)}},
        {"type": "text", "text": sample.question},
    ]}]


def evaluate(model_dir: str | Path, n: int, seed: int, *, vlm=None, show_errors: int = 0, log=None) -> dict:
    """Per-type and overall accuracy; returns {"per_type": {type: (correct, total)}, "overall": (c, t), ...}."""
    from edgevlm.export.demo.data import QTYPES, eval_samples, normalise
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    vlm = vlm or VisionLanguageModel.load(model_dir)
    samples = eval_samples(seed, n)
    params = SamplingParams(temperature=0)
    per = {q: [0, 0] for q in QTYPES}
    errors = []
    t0 = time.time()
    for i, s in enumerate(samples):
        prompt = vlm.prepare(messages_for(s))
        text = "".join(step.text for step in vlm.generate(prompt, params, max_tokens=40))
        ok = normalise(text) == normalise(s.answer)
        per[s.qtype][0] += ok
        per[s.qtype][1] += 1
        if not ok and len(errors) < show_errors:
            errors.append((s.qtype, s.question, s.answer, text))
        if log and (i + 1) % 250 == 0:
            log(f"  {i + 1}/{len(samples)} ({time.time() - t0:.0f} s)")
    correct = sum(c for c, _ in per.values())
    return {"per_type": per, "overall": (correct, len(samples)), "seconds": time.time() - t0, "errors": errors}


def table(result: dict) -> str:
    names = {"shape": "shape", "colour": "colour", "colour_of_shape": "colour of named shape", "count": "count",
             "position": "position", "describe": "describe", "smalltalk": "small talk"}
    lines = ["| question type | correct | total | accuracy |", "|---|---:|---:|---:|"]
    for q, (c, t) in result["per_type"].items():
        lines.append(f"| {names.get(q, q)} | {c} | {t} | {100 * c / max(t, 1):.1f}% |")
    c, t = result["overall"]
    lines.append(f"| **overall** | **{c}** | **{t}** | **{100 * c / max(t, 1):.1f}%** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="package folder (default: models/demo-shapes)")
    ap.add_argument("-n", type=int, default=1050, help="number of samples (default 1050: 150 per question type)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--errors", type=int, default=10, help="show up to this many wrong answers")
    a = ap.parse_args(argv)
    result = evaluate(a.model, a.n, a.seed, show_errors=a.errors, log=lambda m: print(m, file=sys.stderr))
    print(f"model: {a.model}; {a.n} held-out samples, seed {a.seed}; {result['seconds']:.0f} s "
          f"({1000 * result['seconds'] / a.n:.0f} ms per sample) through edgevlm.runtime")
    print(table(result))
    if result["errors"]:
        print("\nsome wrong answers (type | question | expected | got):")
        for qtype, q, want, got in result["errors"]:
            print(f"  {qtype} | {q} | {want} | {got.strip()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
