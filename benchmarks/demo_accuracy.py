"""Accuracy of the demo model package through the runtime (onnxruntime, no torch) on held-out generated samples.

    python benchmarks/demo_accuracy.py [--model models/demo-shapes] [-n 1050] [--seed 20261125] [--json-n 300]

Samples come from `edgevlm.export.demo.data.eval_samples` with a seed the training never used (training draws
from seed 1234 and its progress set from 99000001), balanced over the question types. Each sample is sent the way
a client sends it: OpenAI messages with the image as a base64 PNG data URL, rendered by the package's chat template,
greedy decoding (temperature 0). Scoring is exact match after light normalisation (strip, lowercase, collapse
spaces, "colour" = "color").

JSON answers (`--json-n`, seed 20261126): one-shape images asked "Answer in JSON." and the like, generated with the
`response_format` below (`RESPONSE_FORMAT`: enums for shape and colour, count 1–3) through
`grammar.parse_response_format` and `VisionLanguageModel.generate(..., schema=...)` — the server's path. Scored on
the parsed object: shape and colour both right, and the whole object exact (count 1 too). The same questions without
a response_format (plain text) are scored by exact match with the compact JSON the model was trained on.
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
DEFAULT_JSON_SEED = 20261126
SHAPES = ["circle", "square", "triangle", "star"]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "black", "white"]
SHAPE_SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"enum": SHAPES},
        "color": {"enum": COLORS},
        "count": {"type": "integer", "minimum": 1, "maximum": 3},
    },
    "required": ["shape", "color", "count"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "shape", "strict": True, "schema": SHAPE_SCHEMA}}


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


def score_json(text: str, sample) -> tuple[bool, bool, bool]:
    """(valid JSON object, shape and colour right, whole object right) for one answer."""
    import json

    want = json.loads(sample.answer)
    try:
        got = json.loads(text)
    except ValueError:
        return False, False, False
    if not isinstance(got, dict):
        return False, False, False
    both = got.get("shape") == want["shape"] and got.get("color") == want["color"]
    return True, both, got == want


def evaluate_json(model_dir: str | Path, n: int, seed: int = DEFAULT_JSON_SEED, *, vlm=None, show_errors: int = 0,
                  constrained: bool = True) -> dict:
    """JSON questions on one-shape images: with `RESPONSE_FORMAT` (constrained) or as plain text."""
    from edgevlm.export.demo.data import json_eval_samples
    from edgevlm.runtime.grammar import parse_response_format
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    vlm = vlm or VisionLanguageModel.load(model_dir)
    schema = parse_response_format(RESPONSE_FORMAT) if constrained else None
    params = SamplingParams(temperature=0)
    valid = both = exact = 0
    errors = []
    t0 = time.time()
    samples = json_eval_samples(seed, n)
    for s in samples:
        prompt = vlm.prepare(messages_for(s))
        text = "".join(step.text for step in vlm.generate(prompt, params, max_tokens=40, schema=schema))
        v, b, e = score_json(text, s)
        if not constrained:  # plain text: the exact compact string the model was trained on
            e = text.strip() == s.answer
        valid, both, exact = valid + v, both + b, exact + e
        if not b and len(errors) < show_errors:
            errors.append(("json", s.question, s.answer, text))
    return {"n": len(samples), "valid": valid, "shape_color": both, "exact": exact, "errors": errors,
            "seconds": time.time() - t0, "constrained": constrained}


def json_table(results: list[dict]) -> str:
    lines = ["| JSON questions (one shape) | valid JSON | shape + colour right | exact object | total |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        n = max(r["n"], 1)
        how = "with the json_schema (constrained)" if r["constrained"] else "no response_format (plain text)"
        lines.append(f"| {how} | {100 * r['valid'] / n:.1f}% | {r['shape_color']} ({100 * r['shape_color'] / n:.1f}%) "
                     f"| {r['exact']} ({100 * r['exact'] / n:.1f}%) | {r['n']} |")
    return "\n".join(lines)


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
    ap.add_argument("--json-n", type=int, default=300, help="JSON questions, each with and without the schema "
                                                             "(default 300; 0: skip)")
    ap.add_argument("--json-seed", type=int, default=DEFAULT_JSON_SEED)
    a = ap.parse_args(argv)
    from edgevlm.runtime.vlm import VisionLanguageModel

    vlm = VisionLanguageModel.load(a.model)
    result = evaluate(a.model, a.n, a.seed, vlm=vlm, show_errors=a.errors, log=lambda m: print(m, file=sys.stderr))
    print(f"model: {a.model}; {a.n} held-out samples, seed {a.seed}; {result['seconds']:.0f} s "
          f"({1000 * result['seconds'] / a.n:.0f} ms per sample) through edgevlm.runtime")
    print(table(result))
    if result["errors"]:
        print("\nsome wrong answers (type | question | expected | got):")
        for qtype, q, want, got in result["errors"]:
            print(f"  {qtype} | {q} | {want} | {got.strip()!r}")
    if a.json_n:
        results = [evaluate_json(a.model, a.json_n, a.json_seed, vlm=vlm, show_errors=a.errors, constrained=c)
                   for c in (True, False)]
        print(f"\n{a.json_n} held-out JSON questions, seed {a.json_seed}; response_format {RESPONSE_FORMAT}")
        print(json_table(results))
        for r in results:
            for qtype, q, want, got in r["errors"]:
                print(f"  wrong ({'constrained' if r['constrained'] else 'text'}): {q} | {want} | {got.strip()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
