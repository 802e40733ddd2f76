"""How far quantized packages are from the fp32 package of the same checkpoint, through the runtime.

    python benchmarks/quant_quality.py --checkpoint CKPT               # exports fp32 / int8 / int4 (fused) first
    python benchmarks/quant_quality.py --package FP32_PKG --package INT8_PKG ...   # the first one is the reference

Over a fixed prompt set — chat prompts without images, and with one image (one tile, `detail: low`) — the next-token
logits at each prompt's last 32 positions (teacher-forced) are compared with the fp32 package's: max |Δ| (absolute
and relative to the largest fp32 logit), top-1 agreement, mean KL(fp32 ‖ quantized) in nats. Then a greedy answer
(at most 24 tokens, ending at EOS) to each prompt: the share of prompts whose answer is identical to fp32's, and the
mean length of the common prefix against the mean length of fp32's answers. Random weights have near-flat logits
that flip their argmax easily; run it on trained weights (e.g. a checkpoint whose text model carries
SmolLM2-135M-Instruct's real weights) to judge the quantization.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

TEXT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "How do I boil an egg?",
    "What is 12 times 7?",
    "Give me a name for a small grey cat.",
    "Translate 'good morning' into Spanish.",
]
IMAGE_PROMPTS = [
    "Describe this image.",
    "What colours do you see?",
    "Is there any text in the image?",
    "What is in the center of the picture?",
]
POSITIONS = 32
GREEDY_TOKENS = 24


def _image_uri(seed: int) -> str:
    from edgevlm.export.samples import sample_image

    buffer = io.BytesIO()
    sample_image(512, 384, seed=seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def prompt_set() -> list[tuple[str, list[dict]]]:
    prompts = [("text", [{"role": "user", "content": q}]) for q in TEXT_PROMPTS]
    for i, question in enumerate(IMAGE_PROMPTS):
        content = [{"type": "image_url", "image_url": {"url": _image_uri(100 + i), "detail": "low"}},
                   {"type": "text", "text": question}]
        prompts.append(("image", [{"role": "user", "content": content}]))
    return prompts


def run_package(path: Path, prompts, kv_cache: str = "float32") -> list[dict]:
    """Per prompt: teacher-forced logits at the last positions, and a greedy answer."""
    from edgevlm.export.verify import position_logits
    from edgevlm.runtime.limits import EngineConfig
    from edgevlm.runtime.vlm import VisionLanguageModel

    vlm = VisionLanguageModel.load(path, engine_config=EngineConfig(kv_cache=kv_cache))
    out = []
    for kind, messages in prompts:
        prompt = vlm.prepare(messages)
        features = _image_features(vlm, prompt)
        logits = position_logits(vlm.engine, np.asarray(prompt.input_ids), features, POSITIONS)
        greedy = vlm.engine.greedy(np.asarray(prompt.input_ids), features, GREEDY_TOKENS, vlm.eos_token_ids)
        out.append({"kind": kind, "logits": logits.astype(np.float64), "greedy": greedy})
    return out


def _image_features(vlm, prompt) -> np.ndarray | None:
    """The prompt's image features [tokens, hidden] in prompt order (the scheduler's vision runs), or None."""
    if not prompt.images:
        return None
    rows = []
    for image in prompt.images:
        if image.features is not None:
            rows.append(image.features.reshape(-1, image.features.shape[-1]))
            continue
        feeds = list(vlm.scheduler.vision_inputs(image))
        for i, feed in enumerate(feeds):
            features = vlm.engine.run_vision(feed, last=i == len(feeds) - 1)
            rows.append(features.reshape(-1, features.shape[-1]))
    return np.concatenate(rows)


def compare(reference: list[dict], candidate: list[dict], kind: str | None) -> dict:
    pairs = [(r, c) for r, c in zip(reference, candidate) if kind is None or r["kind"] == kind]
    ref = np.concatenate([r["logits"] for r, _ in pairs])
    got = np.concatenate([c["logits"] for _, c in pairs])

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref_lp, got_lp = log_softmax(ref), log_softmax(got)
    prefixes = []
    for r, c in pairs:
        n = 0
        while n < min(len(r["greedy"]), len(c["greedy"])) and r["greedy"][n] == c["greedy"][n]:
            n += 1
        prefixes.append(n)
    return {
        "prompts": len(pairs),
        "positions": int(ref.shape[0]),
        "max_abs": float(np.abs(got - ref).max()),
        "rel": float(np.abs(got - ref).max() / np.abs(ref).max()),
        "top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "kl": float((np.exp(ref_lp) * (ref_lp - got_lp)).sum(-1).mean()),
        "greedy_identical": float(np.mean([r["greedy"] == c["greedy"] for r, c in pairs])),
        "common_prefix": float(np.mean(prefixes)),
        "reference_length": float(np.mean([len(r["greedy"]) for r, _ in pairs])),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="HF checkpoint to export at --quant (the first plan is the reference)")
    parser.add_argument("--quant", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--package", action="append", default=[], help="packages (the first is the reference)")
    parser.add_argument("--int8-kv", action="append", default=[],
                        help="also measure this package with its int8 KV cache (serve --kv-cache int8)")
    parser.add_argument("--workdir", default="/tmp/edgevlm-quant-quality")
    parser.add_argument("--output", help="also write the table (markdown) to this file")
    args = parser.parse_args()

    packages = [Path(p) for p in args.package]
    if not packages:
        if not args.checkpoint:
            parser.error("give --checkpoint or --package")
        from edgevlm.export.convert import Progress, export_package

        checkpoint = Path(args.checkpoint)
        for quant in args.quant:
            package = Path(args.workdir) / f"{checkpoint.name}-{quant}"
            if not (package / "model.json").exists():
                export_package(str(checkpoint), package, quant=quant, verify=False, progress=Progress())
            packages.append(package)

    prompts = prompt_set()
    results = {}
    runs = [(package, "float32") for package in packages] + [(Path(p), "int8") for p in args.int8_kv]
    for package, kv_cache in runs:
        start = time.perf_counter()
        results[(package, kv_cache)] = run_package(package, prompts, kv_cache)
        print(f"  {package.name} ({kv_cache} KV): {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    reference = runs[0]
    lines = [f"Reference: {reference[0].name}. {len(TEXT_PROMPTS)} text prompts and {len(IMAGE_PROMPTS)} prompts with "
             f"one image (one tile); logits at each prompt's last {POSITIONS} positions (teacher-forced); greedy "
             f"answers of {GREEDY_TOKENS} tokens.", "",
             "| package | prompts | max abs Δlogit | Δ / max abs logit | top-1 agreement | mean KL (nats) | "
             "greedy answers identical | common prefix / fp32 answer length (mean tokens) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for package, kv_cache in runs[1:]:
        manifest = json.loads((package / "model.json").read_text())
        name = f"{package.name} ({manifest.get('quantization', '?')}{', int8 KV' if kv_cache == 'int8' else ''})"
        for kind in ("text", "image", None):
            m = compare(results[reference], results[(package, kv_cache)], kind)
            lines.append(f"| {name} | {kind or 'all'} ({m['prompts']}) | {m['max_abs']:.3f} | {m['rel']:.2%} | "
                         f"{m['top1']:.1%} | {m['kl']:.4f} | {m['greedy_identical']:.0%} | "
                         f"{m['common_prefix']:.1f} / {m['reference_length']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
