"""Time to first token with an image (or, with --text, a 2,034-token text prompt), edgevlm packages against
transformers at its default (sdpa) and eager attention, in the same run.

    python benchmarks/image_ttft.py --package /tmp/edgevlm-bench/smolvlm-256m-random-int4 [--package OTHER ...]
    python benchmarks/image_ttft.py --text --package ...    # text prefill: 2,034 prompt tokens, a fresh one each run

SmolVLM-256M dimensions by default (the random checkpoint bench.py builds in --workdir). A fresh 512×512 image each
run (17 tiles, 1,141 prompt tokens: no cache helps), through `VisionLanguageModel.generate` / `model.generate(
max_new_tokens=1)` on the processor's inputs; each engine in its own subprocess, medians of --repeats after a
warm-up run. Prints a table with ratios against transformers sdpa.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "Describe this image."


def _image(seed: int):
    from edgevlm.export.samples import sample_image

    return sample_image(512, 512, seed=seed)


TEXT_TOKENS = 2034


def _text(seed: int) -> str:
    """A long prompt, different each run (no prefix is shared between runs)."""
    words = "the quick brown fox jumps over the lazy dog and keeps running across the wide green field".split()
    return f"{seed}: " + " ".join(words[(seed + i) % len(words)] for i in range(3000))


def _times(first_token, repeats: int, text: bool = False) -> list[float]:
    make = _text if text else _image
    first_token(make(999))  # warm-up
    out = []
    for i in range(repeats):
        start = time.perf_counter()
        first_token(make(100 + i))
        out.append(time.perf_counter() - start)
    return out


def worker_edgevlm(package: str, args) -> list[float]:
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    vlm = VisionLanguageModel.load(package)
    params = SamplingParams(temperature=0, max_tokens=1)

    def first_token(image):
        if args.text:  # the prompt cut to TEXT_TOKENS tokens of the package's tokenizer
            ids = vlm.tokenizer.encode(image, add_special_tokens=False).ids[:TEXT_TOKENS]
            messages = [{"role": "user", "content": vlm.tokenizer.decode(ids)}]
        else:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                     {"type": "text", "text": QUESTION}]}]
        prompt = vlm.prepare(messages, params)
        first_token.tokens = len(prompt.input_ids)
        next(iter(vlm.generate(prompt, params)))

    try:
        return _times(first_token, args.repeats, args.text) + [first_token.tokens]
    finally:
        vlm.close()


def worker_transformers(target: str, args) -> list[float]:
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    checkpoint, attention = target.rsplit("@", 1)
    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                             attn_implementation=attention).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)

    def first_token(image):
        if args.text:
            ids = processor.tokenizer(image, add_special_tokens=False)["input_ids"][:TEXT_TOKENS]
            content = [{"type": "text", "text": processor.tokenizer.decode(ids)}]
            prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True)
            inputs = processor(text=prompt, return_tensors="pt")
        else:
            content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
            prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True)
            inputs = processor(text=prompt, images=[image], return_tensors="pt")
        first_token.tokens = inputs["input_ids"].shape[1]
        model.generate(**inputs, max_new_tokens=1, do_sample=False)

    with torch.no_grad():
        return _times(first_token, args.repeats, args.text) + [first_token.tokens]


def run_worker(kind: str, target: str, args) -> list[float]:
    print(f"  measuring {kind}: {target}", file=sys.stderr, flush=True)
    result = subprocess.run([sys.executable, __file__, "--worker", kind, "--target", target,
                             "--repeats", str(args.repeats), *(["--text"] if args.text else [])],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker failed ({kind} {target}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/edgevlm-bench/smolvlm-256m-random")
    parser.add_argument("--package", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text", action="store_true", help=f"a {TEXT_TOKENS}-token text prompt, no image")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fn = worker_edgevlm if args.worker == "edgevlm" else worker_transformers
        print(json.dumps(fn(args.target, args)))
        return 0
    rows = {f"transformers fp32 ({attention})": run_worker("transformers", f"{args.checkpoint}@{attention}", args)
            for attention in ("sdpa", "eager")}
    for package in args.package:
        rows[f"edgevlm {Path(package).name}"] = run_worker("edgevlm", package, args)
    base = statistics.median(rows["transformers fp32 (sdpa)"][:-1])
    what = "text prompt" if args.text else "512×512 (17 tiles)"
    print(f"| engine | TTFT, {what}, median | × transformers sdpa | prompt tokens | runs |\n|---|---|---|---|---|")
    for name, (*times, tokens) in rows.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.2f} s | {median / base:.2f}× | {tokens:,} | {', '.join(f'{t:.1f}' for t in times)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
