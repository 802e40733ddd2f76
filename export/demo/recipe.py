"""The whole demo-model recipe in one command: data → tokenizer → training → export → evaluation.

    python -m edgevlm.export.demo.recipe --out models/demo-shapes [--work build/demo-shapes-work]

- data: the seeded generator (`data.py`) is previewed and timed; training draws its images on the fly from seed
  `TrainConfig.seed`, the evaluation from seeds training never uses.
- tokenizer: a byte-level BPE trained on the corpus with SmolVLM's special tokens and chat template (`tokenizer.py`).
- training: `train.py` (torch, CPU), checkpoints in `<work>/best` and `<work>/last` (complete HF checkpoint folders).
- export: the project's exporter (`edgevlm export`), with its verification against transformers, into `--out`.
- evaluation: `benchmarks/demo_accuracy.py` through the runtime (onnxruntime), then `<out>/README.md` is written
  with the accuracy table, the training curve and the timings.

`--skip-train` exports and evaluates the checkpoint already in `--work` (e.g. after a run of `train.py`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(msg, flush=True)


def stage(name: str):
    class _Stage:
        def __enter__(self):
            self.t0 = time.time()
            log(f"== {name}")
            return self

        def __exit__(self, *exc):
            self.seconds = time.time() - self.t0
            log(f"== {name}: {self.seconds:.1f} s")
            TIMES[name] = self.seconds
    return _Stage()


TIMES: dict[str, float] = {}


def main(argv=None) -> int:
    from .train import Dims, TrainConfig

    ap = argparse.ArgumentParser(description="train, export and evaluate the bundled demo model")
    ap.add_argument("--out", default=str(ROOT / "models" / "demo-shapes"))
    ap.add_argument("--work", default=str(ROOT / "build" / "demo-shapes-work"),
                    help="tokenizer files, checkpoints and the training curve")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--max-minutes", type=float, default=60.0,
                    help="wall-clock cap on training; the LR decay follows it if it binds")
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--checkpoint", choices=("best", "last"), default="best",
                    help="export the best checkpoint on the progress set (default) or the last one")
    ap.add_argument("--quant", choices=("fp32", "int8", "int4"), default="int8",
                    help="package precision (default int8: same answers as fp32 on the held-out set, 3× smaller)")
    ap.add_argument("--eval-n", type=int, default=1050)
    ap.add_argument("--eval-seed", type=int, default=20261125)
    ap.add_argument("--json-n", type=int, default=300, help="held-out JSON questions (with and without the schema)")
    ap.add_argument("--json-seed", type=int, default=20261126)
    ap.add_argument("--skip-train", action="store_true", help="reuse the checkpoint in --work")
    a = ap.parse_args(argv)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()

    with stage("data"):
        from . import data as D

        rng = random.Random(a.seed)
        t0 = time.time()
        scenes = [D.make_scene(rng) for _ in range(200)]
        log(f"  {1000 * (time.time() - t0) / 200:.1f} ms per image; e.g.:")
        for s in D.eval_samples(a.seed, 7):
            log(f"  [{s.qtype}] {s.question} → {s.answer}")
        del scenes

    with stage("tokenizer"):
        from .tokenizer import train_tokenizer

        tok = train_tokenizer()
        log(f"  vocabulary: {tok.get_vocab_size()} tokens")

    train_info = None
    if a.skip_train:
        log("== training: skipped (--skip-train), using " + str(work / a.checkpoint))
    else:
        with stage("training"):
            from .train import train

            cfg = TrainConfig(seed=a.seed, steps=a.steps, max_minutes=a.max_minutes)
            train_info = train(work, cfg, Dims(), log=log)
            (work / "train_info.json").write_text(json.dumps({k: v for k, v in train_info.items()}, indent=1))

    with stage("export"):
        from edgevlm.export.convert import Progress, export_package

        package, report = export_package(str(work / a.checkpoint), out, quant=a.quant, overwrite=True,
                                         progress=Progress())
        for line in report.lines():
            log("  " + line)
        if not report.ok:
            log("export verification failed")
            return 1
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        log(f"  package: {size / 1e6:.2f} MB in {out}")

    with stage("evaluation"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import demo_accuracy

        from edgevlm.runtime.vlm import VisionLanguageModel

        vlm = VisionLanguageModel.load(out)
        result = demo_accuracy.evaluate(out, a.eval_n, a.eval_seed, vlm=vlm, show_errors=10, log=log)
        tab = demo_accuracy.table(result)
        log(tab)
        for qtype, q, want, got in result["errors"]:
            log(f"  wrong: {qtype} | {q} | {want} | {got.strip()!r}")
        json_results = [demo_accuracy.evaluate_json(out, a.json_n, a.json_seed, vlm=vlm, show_errors=10,
                                                    constrained=c) for c in (True, False)]
        result["json"] = json_results
        log(demo_accuracy.json_table(json_results))
        for r in json_results:
            for _, q, want, got in r["errors"]:
                log(f"  wrong json ({'constrained' if r['constrained'] else 'text'}): {q} | {want} | {got.strip()!r}")

    curve = json.loads((work / "curve.json").read_text()) if (work / "curve.json").exists() else []
    write_readme(out, tab, curve, a, size, result)
    log(f"== all stages: {(time.time() - t_all) / 60:.1f} min")
    return 0


def write_readme(out: Path, tab: str, curve: list, a, size: int, result: dict) -> None:
    from .train import QTYPE_WEIGHTS, Dims, TrainConfig

    dims, cfg = Dims(), TrainConfig()
    train_minutes = curve[-1]["minutes"] if curve else float("nan")
    steps = curve[-1]["step"] if curve else 0
    rows = ["| step | minutes | shape | colour | colour of shape | count | position | describe | small talk | json "
            "| overall |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in curve:
        rows.append(f"| {c['step']} | {c['minutes']:.1f} | " + " | ".join(
            f"{100 * c.get(k, 0):.0f}" for k in ("shape", "colour", "colour_of_shape", "count", "position",
                                                 "describe", "smalltalk", "json", "overall")) + " |")
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "benchmarks"))
    import demo_accuracy

    json_tab = demo_accuracy.json_table(result["json"]) if result.get("json") else "(not measured)"
    json_n = result["json"][0]["n"] if result.get("json") else 0
    weights = ", ".join(f"{k} {v}" for k, v in QTYPE_WEIGHTS.items())
    ending = (f"on this run the cap bound first (training stopped at step {steps} of {a.steps})" if steps < a.steps
              else "on this run all steps ran within the cap")
    text = f"""# demo-shapes: the bundled demo model

A tiny vision-language model in SmolVLM's architecture (`Idefics3ForConditionalGeneration`: SigLIP vision tower,
pixel-shuffle connector, Llama text model) trained from scratch on synthetic images, so that a fresh clone serves
something real, offline. It answers questions about 1–3 coloured shapes (circle, square, triangle, star; red,
orange, yellow, green, blue, purple, black, white) on plain or textured backgrounds, and nothing else: it is a demo
of the runtime, not a general model.

What it answers (greedy, exact answers):

| question (each has ≥ 5 phrasings) | answer |
|---|---|
| What shape is in the image? (one shape) | A circle. |
| What color is the shape? (one shape) | It is red. |
| What color is the star? | The star is green. |
| How many shapes are there? | There are 2 shapes. / There is 1 shape. |
| Where is the blue square? | The blue square is on the left. (on the left / on the right / at the top / at the bottom / in the center) |
| Describe the image. | A red circle and a green star. (left, top, center, bottom, right order) |
| Answer in JSON. (one shape) | {{"shape":"circle","color":"red","count":1}} |
| Hello / What can you do? (no image) | I am a small demo model that describes shapes and colours in images. |

Images are read as one 96×96 tile (`do_image_splitting: false`; 16 image tokens); positions refer to the image as
sent.

## Asking for JSON

Asked for JSON about an image with one shape ("Answer in JSON.", "Describe the shape as JSON.", "Reply with JSON:
shape, color and count.", "What is in the image? Answer with a JSON object.", "Give me the shape, color and count
as JSON.", …), the model answers with a compact object, keys in the order shape, color, count — exactly the form
the server's constrained decoding emits (`runtime/grammar.py`: no whitespace, properties in schema order), so with a
`response_format` the grammar and the model agree token for token. With a schema of enums the answer is always
valid and one of the allowed values:

```python
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
schema = {{
    "type": "object",
    "properties": {{
        "shape": {{"enum": ["circle", "square", "triangle", "star"]}},
        "color": {{"enum": ["red", "orange", "yellow", "green", "blue", "purple", "black", "white"]}},
        "count": {{"type": "integer", "minimum": 1, "maximum": 3}},
    }},
    "required": ["shape", "color", "count"],
    "additionalProperties": False,
}}
response = client.chat.completions.create(
    model="demo-shapes", temperature=0,
    messages=[{{"role": "user", "content": [
        {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,..."}}}},
        {{"type": "text", "text": "Answer in JSON."}},
    ]}}],
    response_format={{"type": "json_schema", "json_schema": {{"name": "shape", "strict": True, "schema": schema}}}},
)
print(response.choices[0].message.content)  # {{"shape":"circle","color":"red","count":1}}
```

`client.chat.completions.parse(..., response_format=ShapeAnswer)` with a pydantic model (`Literal` shape and colour,
`count: int = Field(ge=1, le=3)`) works the same way (`tests/test_demo_server.py` does both through `edgevlm
serve`). Without a `response_format` the model still answers a JSON question with the same compact object (plain
text, not enforced). JSON is trained on one-shape images only (the generator never draws two shapes of the same
shape and colour), so the count it was taught is always 1; JSON questions about pictures with several shapes are
outside its training.

## Model

- vision: {dims.vision_layers} layers × {dims.vision_hidden} hidden, patch {dims.patch_size}, 96 px tile → 144 patches;
  pixel shuffle ×{dims.scale_factor} → 16 image tokens
- text: Llama, {dims.text_layers} layers × {dims.text_hidden} hidden, {dims.text_heads} heads ({dims.text_kv_heads} KV heads)
- tokenizer: byte-level BPE trained with `tokenizers` on the question/answer corpus ({len(json.loads((out / 'tokenizer.json').read_text())['model']['vocab'])} tokens) with SmolVLM's
  special tokens (`<|im_start|>`, `<end_of_utterance>`, `<image>`, `<fake_token_around_image>`, `<global-img>`,
  `<row_R_col_C>`, …) and SmolVLM's chat template; stops on `<end_of_utterance>` / `<|im_end|>`
- package: {a.quant} ONNX (plan {json.loads((out / 'model.json').read_text()).get('quantization_plan', 'fp32')}; fused
  decoder), {size / 1e6:.1f} MB, exported with `edgevlm export --quant {a.quant}`: the fp32 graphs verified against
  transformers first, then quantized

## How it was trained

```sh
python -m edgevlm.export.demo.recipe --out models/demo-shapes
```

runs data → tokenizer → training → export → evaluation (code in `export/demo/`). Training is one stage with two
losses: next-token cross-entropy on the answers, plus auxiliary classifiers (dropped at export) that give the vision tower a direct
signal: per vision patch, the shape (object patches only) and colour of the object under it; per image token after
the connector, the shape and colour of the object covering it and the token's own grid cell.
Each image's vision features are reused for {cfg.questions_per_image} questions. AdamW, batch {cfg.images_per_batch} images
(+ {cfg.text_only_per_batch} text-only small-talk samples); question types weighted
{weights} (json on one-shape images only), LR {cfg.lr} (vision {cfg.vision_lr}), warmup and cosine decay, seed {a.seed}.
Images are generated on the fly and preprocessed with the runtime's Idefics3 preprocessing (bit-identical to
transformers' `Idefics3ImageProcessor`), so training and serving see the same pixels.

Training: {steps} steps ({steps * cfg.images_per_batch:,} images, {steps * cfg.images_per_batch * cfg.questions_per_image:,} image questions) in {train_minutes:.0f} minutes on 2 CPU cores
(fp32, torch {_torch_version()}).

This package: training ran as `python -m edgevlm.export.demo.train --work {a.work} --steps {a.steps}
--max-minutes {a.max_minutes:g}` (the same `train()` the recipe calls), then
`python -m edgevlm.export.demo.recipe --out models/demo-shapes --work {a.work} --skip-train` exported and
evaluated it. The LR decay follows the step count or, when the {a.max_minutes:g}-minute cap would bind first, the wall
clock; {ending}; on a slower or busier machine a rerun can stop earlier and differ slightly.

Progress during training (teacher-forced exact match on a fixed set of {cfg.eval_size} held-out samples plus
{cfg.eval_json} JSON questions, %):

{chr(10).join(rows)}

## Accuracy

`python benchmarks/demo_accuracy.py` — {result['overall'][1]} held-out samples (seed {a.eval_seed}, never used in training),
through the runtime (onnxruntime, greedy), exact match after light normalisation:

{tab}

JSON questions — {json_n} held-out one-shape images (seed {a.json_seed}), through the runtime with the `response_format`
above (`VisionLanguageModel.generate(..., schema=grammar.parse_response_format(rf))`, the server's path), and the
same questions without one (plain text, exact match with the compact object):

{json_tab}

## License

Apache-2.0, as the rest of the project (the weights are trained from scratch on generated data; the chat template
and special-token names come from SmolVLM, Apache-2.0).
"""
    (out / "README.md").write_text(text)


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
