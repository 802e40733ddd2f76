"""Qwen2-VL-2B dimensions (random weights): edgevlm packages against transformers fp32 in the same run.

    python benchmarks/qwen2vl.py --prepare               # build the checkpoint and export int4 + int8 (~20 min)
    python benchmarks/qwen2vl.py                         # measure; writes the table into benchmarks/RESULTS.md

The checkpoint is `export.random_model.build_random_qwen2vl` on the vendored Qwen2-VL-2B card at its real
dimensions (1.5B text + 0.67B vision parameters, 8.8 GB fp32), the packages `edgevlm export --quant int4/int8` of
it. Each engine runs in its own subprocess (peak RSS is its own): load time, time to first token for a 448×448
and a 1024×768 image (a fresh image each run, so no cache helps; decoding, preprocessing, vision, prefill and the
first token, through `VisionLanguageModel.generate` / `model.generate(max_new_tokens=1)`), decode tokens/s after
the 448×448 prompt, and peak RSS. Medians of --repeats after one warm-up on a small image.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "tests" / "fixtures" / "qwen2-vl-2b"
WORK = Path(os.environ.get("EDGEVLM_BENCH_DIR", "/tmp/edgevlm-bench"))
CHECKPOINT = WORK / "qwen2-vl-2b-random"
QUESTION = "Describe this image."
IMAGES = {"448x448": (448, 448), "1024x768": (1024, 768)}


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _image(width: int, height: int, seed: int):
    from edgevlm.export.samples import sample_image

    return sample_image(width, height, seed=seed)


def _median(fn, repeats: int, warm_up) -> float:
    warm_up()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker_edgevlm(package: str, args) -> dict:
    import base64
    import io

    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    start = time.perf_counter()
    vlm = VisionLanguageModel.load(package, threads=args.threads)
    out = {"load_s": time.perf_counter() - start,
           "size_mb": sum(f.stat().st_size for f in Path(package).iterdir()) / 1e6}

    def messages(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": QUESTION}]}]

    greedy = SamplingParams(temperature=0, max_tokens=1)

    def first_token(image):
        next(iter(vlm.generate(vlm.prepare(messages(image), greedy), greedy)))

    warm = lambda: first_token(_image(224, 224, 999))  # noqa: E731
    for name, (w, h) in IMAGES.items():
        out[f"ttft_{name}_s"] = _median(lambda i: first_token(_image(w, h, 100 + i)), args.repeats, warm)
    # The stop tokens banned (logit_bias), so every run decodes all its tokens.
    decode = SamplingParams(temperature=0, max_tokens=args.decode_tokens,
                            logit_bias={t: -100 for t in vlm.package.tokens["eos_token_ids"]})
    rates = []
    for i in range(args.repeats):
        stamps = [time.perf_counter() for _ in vlm.generate(vlm.prepare(messages(_image(448, 448, 200 + i)), decode),
                                                            decode)]
        if len(stamps) > 2:
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    out["decode_tok_s"] = statistics.median(rates)
    out["peak_rss_mb"] = _peak_rss_mb()
    vlm.close()
    return out


def worker_transformers(checkpoint: str, args) -> dict:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from edgevlm.export.families import qwen2vl

    torch.set_num_threads(args.threads or os.cpu_count())
    start = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()  # sdpa
    processor = qwen2vl.load_processor(checkpoint)
    out = {"load_s": time.perf_counter() - start,
           "size_mb": sum(f.stat().st_size for f in Path(checkpoint).iterdir()) / 1e6,
           "attention": model.config._attn_implementation}

    def first_token(image):
        inputs = qwen2vl.chat_inputs(processor, [image], QUESTION)
        model.generate(**inputs, max_new_tokens=1, do_sample=False)

    with torch.no_grad():
        warm = lambda: first_token(_image(224, 224, 999))  # noqa: E731
        for name, (w, h) in IMAGES.items():
            out[f"ttft_{name}_s"] = _median(lambda i: first_token(_image(w, h, 100 + i)), args.repeats, warm)
        rates = []
        for i in range(args.repeats):
            inputs = qwen2vl.chat_inputs(processor, [_image(448, 448, 200 + i)], QUESTION)
            prefill = model(**inputs, use_cache=True)
            cache, token = prefill.past_key_values, int(prefill.logits[0, -1].argmax())
            length = inputs["input_ids"].shape[1]
            start = time.perf_counter()
            for step in range(args.decode_tokens - 1):  # as generate's decode steps: positions after the image
                position = torch.full((3, 1, 1), length + step + int(model.model.rope_deltas.reshape(-1)[0]))
                out_step = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=position,
                                 use_cache=True)
                cache, token = out_step.past_key_values, int(out_step.logits[0, -1].argmax())
            rates.append((args.decode_tokens - 1) / (time.perf_counter() - start))
        out["decode_tok_s"] = statistics.median(rates)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def prepare(quants: list[str]) -> None:
    from edgevlm.export.convert import Progress, export_package
    from edgevlm.export.random_model import build_random_qwen2vl

    if not (CHECKPOINT / "config.json").exists():
        print(f"building {CHECKPOINT} (real dimensions, random weights)", flush=True)
        build_random_qwen2vl(CARD, CHECKPOINT, dims=None)
    for quant in quants:
        target = WORK / f"qwen2-vl-2b-random-{quant}"
        if (target / "model.json").exists():
            continue
        _, report = export_package(str(CHECKPOINT), target, quant=quant, overwrite=True, progress=Progress())
        print("\n".join(report.lines()), flush=True)


def run_worker(kind: str, target: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--target", target, "--repeats", str(args.repeats),
           "--decode-tokens", str(args.decode_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"  measuring {kind}: {target}", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"benchmark worker failed ({kind} {target}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict], baseline: str) -> str:
    base = rows[baseline]
    lines = ["| engine | size | load | TTFT 448×448 | TTFT 1024×768 | decode | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        def cell(key, unit, lower_better=True, digits=1):
            value = row[key]
            text = f"{value:,.{digits}f} {unit}"
            if name != baseline:
                text += f" ({value / base[key]:.2f}×)"
            return text
        lines.append(f"| {name} | {cell('size_mb', 'MB', digits=0)} | {cell('load_s', 's')} | "
                     f"{cell('ttft_448x448_s', 's')} | {cell('ttft_1024x768_s', 's')} | "
                     f"{cell('decode_tok_s', 'tok/s', digits=2)} | {cell('peak_rss_mb', 'MB', digits=0)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="build the checkpoint and export the packages")
    parser.add_argument("--quants", nargs="+", default=["int4", "int8"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", choices=["edgevlm", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fn = worker_edgevlm if args.worker == "edgevlm" else worker_transformers
        print(json.dumps(fn(args.target, args)))
        return 0
    if args.prepare:
        prepare(args.quants)
        return 0
    rows = {"transformers fp32 (sdpa)": run_worker("transformers", str(CHECKPOINT), args)}
    for quant in args.quants:
        rows[f"edgevlm {quant}"] = run_worker("edgevlm", str(WORK / f"qwen2-vl-2b-random-{quant}"), args)
    print(table(rows, "transformers fp32 (sdpa)"))
    print(json.dumps(rows, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
