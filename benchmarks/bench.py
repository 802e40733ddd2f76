"""Speed and memory of edgevlm packages against transformers eager fp32, measured in the same run.

    python benchmarks/bench.py                       # SmolVLM-256M dimensions, random weights, fp32/int8/int4
    python benchmarks/bench.py --package PKG ...     # packages you exported (same checkpoint as --checkpoint)
    python benchmarks/bench.py --quick               # fewer repeats and contexts, for a smoke run

Every configuration runs in its own subprocess (so peak RSS is its own) and reports medians of `--repeats` runs
after a warm-up. The table shows each figure and its ratio against transformers on the same checkpoint and inputs.
The machines this project runs on drift ±20% within minutes: compare ratios, not absolute numbers across runs.
Writes benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "tests" / "fixtures" / "smolvlm-256m-instruct"
QUESTION = "Describe this image."


def _image_uri(width: int, height: int) -> str:
    from edgevlm.export.samples import sample_image

    buffer = io.BytesIO()
    sample_image(width, height, seed=1).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _median_time(fn, repeats: int, setup=None) -> float:
    """Median seconds of `fn(setup())` over `repeats` runs after one warm-up; `setup` (untimed) makes each run's
    input, e.g. a fresh copy of a prefilled KV cache."""
    fn(*(() if setup is None else (setup(),)))  # warm-up
    times = []
    for _ in range(repeats):
        arg = () if setup is None else (setup(),)
        start = time.perf_counter()
        fn(*arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_mb() -> float:
    """This process's resident set now (VmRSS)."""
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """This process's resident-set high-water mark (VmHWM; ru_maxrss would carry the parent's across exec)."""
    return _status_mb("VmHWM")


def _text_ids(tokenizer_encode, length: int) -> list[int]:
    words = ("the quick brown fox jumps over the lazy dog and keeps running across the wide green field " * 400)
    ids = tokenizer_encode(words)
    return ids[:length]


# ------------------------------------------------------------------------------------------- edgevlm worker


def worker_edgevlm(package: str, args) -> dict:
    import numpy as np

    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    rss_before = _rss_mb()  # the interpreter, numpy, onnxruntime, tokenizers: before any weights
    start = time.perf_counter()
    vlm = VisionLanguageModel.load(package, threads=args.threads)
    load = time.perf_counter() - start
    out = {"load_s": load, "package_mb": sum(f.stat().st_size for f in Path(package).iterdir()) / 1e6,
           "rss_before_load_mb": rss_before}

    def messages(uri, detail):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri, "detail": detail}},
                                             {"type": "text", "text": QUESTION}]}]

    greedy = SamplingParams(temperature=0)
    for name, (w, h, detail) in _image_cases(args).items():
        uri = _image_uri(w, h)
        out[f"encode_{name}_s"] = _median_time(lambda: vlm.prepare(messages(uri, detail)), args.repeats)
    uri = _image_uri(512, 512)
    out["ttft_s"] = _median_time(
        lambda: next(iter(vlm.generate(vlm.prepare(messages(uri, "auto")), greedy, max_tokens=1))), args.repeats)

    engine = vlm.engine

    def decode_rate(ids, features=None) -> float:
        """Decode tokens/s after a prefill of `ids` (untimed). A fused decoder's cache is one buffer extended in
        place: each run rewinds it to the prompt (the decoded positions are overwritten, nothing is copied); a
        portable cache is immutable, so each run starts from the same prefill."""
        _, base = engine.prefill(ids, features, reserve=args.decode_tokens + 1)
        prompt_length = base.length

        def fresh():
            if base.used is not None:
                base.used = prompt_length
            return base

        def decode(cache):
            for _ in range(args.decode_tokens):
                _, cache = engine.decode_step(42, cache)

        return args.decode_tokens / _median_time(decode, args.repeats, setup=fresh)

    image_prompt = vlm.prepare(messages(_image_uri(512, 512), "auto"))
    out["image_context_tokens"] = len(image_prompt.input_ids)
    out["decode_image_tok_s"] = decode_rate(np.asarray(image_prompt.input_ids), image_prompt.image_features)
    for context in args.contexts:
        ids = np.array(_text_ids(lambda t: vlm.tokenizer.encode(t, add_special_tokens=False).ids, context))
        out[f"decode_{context}_tok_s"] = decode_rate(ids)
    out["decoder_weight_bytes"] = sum(
        (Path(package) / n).stat().st_size for n in [vlm.package.graph("decoder")["file"],
                                                     *vlm.package.graph("decoder").get("external_data", [])])
    text = vlm.package.text
    out["kv_bytes_per_token"] = 2 * text["num_layers"] * text["num_key_value_heads"] * text["head_dim"] * 4
    out["max_context"] = max([*args.contexts, out["image_context_tokens"]]) + args.decode_tokens + 1
    out["quantization"] = vlm.package.manifest.get("quantization", "fp32")
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


# --------------------------------------------------------------------------------------- transformers worker


def worker_transformers(checkpoint: str, args) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    torch.set_num_threads(args.threads or os.cpu_count())
    start = time.perf_counter()
    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    out = {"load_s": time.perf_counter() - start,
           "package_mb": sum(f.stat().st_size for f in Path(checkpoint).iterdir()) / 1e6}

    def inputs(uri, split):
        image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
        content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        processor.image_processor.do_image_splitting = split
        return processor(text=prompt, images=[image], return_tensors="pt")

    with torch.no_grad():
        for name, (w, h, detail) in _image_cases(args).items():
            uri = _image_uri(w, h)

            def encode(uri=uri, detail=detail):
                batch = inputs(uri, detail != "low")
                model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])

            out[f"encode_{name}_s"] = _median_time(encode, args.repeats)
        uri = _image_uri(512, 512)
        out["ttft_s"] = _median_time(
            lambda: model.generate(**inputs(uri, True), max_new_tokens=1, do_sample=False), args.repeats)

        def decode_rate(**prefill_inputs) -> float:
            """Decode tokens/s after a prefill (untimed); each run starts from an untimed copy of its cache."""
            from copy import deepcopy

            prefill = model(**prefill_inputs, use_cache=True)
            length = prefill_inputs["input_ids"].shape[1]

            def decode(cache):
                for i in range(args.decode_tokens):
                    step = model(input_ids=torch.tensor([[42]]), past_key_values=cache, use_cache=True,
                                 attention_mask=torch.ones(1, length + i + 1, dtype=torch.long))
                    cache = step.past_key_values

            return args.decode_tokens / _median_time(decode, args.repeats,
                                                     setup=lambda: deepcopy(prefill.past_key_values))

        image_inputs = inputs(_image_uri(512, 512), True)
        out["image_context_tokens"] = image_inputs["input_ids"].shape[1]
        out["decode_image_tok_s"] = decode_rate(**image_inputs)
        for context in args.contexts:
            ids = torch.tensor([_text_ids(lambda t: processor.tokenizer(t)["input_ids"], context)])
            out[f"decode_{context}_tok_s"] = decode_rate(input_ids=ids)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _image_cases(args) -> dict:
    cases = {"512_1tile": (512, 512, "low"), "512_split": (512, 512, "auto")}
    if not args.quick:
        cases["1024x768_split"] = (1024, 768, "auto")
    return cases


# ------------------------------------------------------------------------------------------------- driver


def copy_bandwidth_gbs() -> float:
    """Measured memory bandwidth: bytes read + written per second copying a 512 MB array (median of 5)."""
    import numpy as np

    src = np.ones(64 * 1024 * 1024, dtype=np.float64)
    dst = np.empty_like(src)
    seconds = _median_time(lambda: np.copyto(dst, src), 5)
    return 2 * src.nbytes / seconds / 1e9


def run_worker(kind: str, target: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--target", target, "--repeats", str(args.repeats),
           "--decode-tokens", str(args.decode_tokens), "--contexts", *map(str, args.contexts)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    print(f"  measuring {kind}: {target}", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"benchmark worker failed ({kind} {target}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict], baseline: str, contexts: list[int], bandwidth: float) -> str:
    def fmt(value, unit):
        return f"{value:,.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"

    metrics = [("package / checkpoint", "package_mb", "MB", False), ("load", "load_s", "s", False)]
    metrics += [(f"image encode {k[len('encode_'):-len('_s')].replace('_', ' ')}", k, "s", False)
                for k in rows[baseline] if k.startswith("encode_")]
    metrics += [("time to first token (512×512, split)", "ttft_s", "s", False)]
    image_tokens = rows[baseline].get("image_context_tokens", "?")
    metrics += [(f"decode after the 512×512 image prompt ({image_tokens} tokens)", "decode_image_tok_s", "tok/s",
                 True)]
    metrics += [(f"decode at context {c} (text)", f"decode_{c}_tok_s", "tok/s", True) for c in contexts]
    metrics += [("peak RSS", "peak_rss_mb", "MB", False)]
    names = list(rows)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, key, unit, higher_better in metrics:
        cells = []
        for name in names:
            value = rows[name].get(key)
            if value is None:
                cells.append("—")
                continue
            cell = fmt(value, unit)
            if name != baseline and rows[baseline].get(key):
                ratio = value / rows[baseline][key]
                cell += f" ({ratio:.2f}×)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Memory bandwidth (numpy copy, read + write): {bandwidth:.1f} GB/s. Decoder weights read per "
                 "token × decode tokens/s at the shortest context:")
    for name in names:
        if name == baseline or "decoder_weight_bytes" not in rows[name]:
            continue
        achieved = rows[name]["decoder_weight_bytes"] * rows[name][f"decode_{contexts[0]}_tok_s"] / 1e9
        lines.append(f"- {name}: {achieved:.1f} GB/s ({achieved / bandwidth:.0%} of the copy bandwidth)")
    lines += ["", targets(rows, baseline, contexts)]
    return "\n".join(lines)


def targets(rows: dict[str, dict], baseline: str, contexts: list[int]) -> str:
    """The step-5 targets, each checked on the figures above (ratios against the baseline of the same run)."""
    base = rows[baseline]
    short, long = f"decode_{contexts[0]}_tok_s", f"decode_{contexts[-1]}_tok_s"
    lines = ["| target | package | measured | met |", "|---|---|---|---|"]

    def add(label, name, value, ok):
        lines.append(f"| {label} | {name} | {value} | {'yes' if ok else '**no**'} |")

    for name, row in rows.items():
        if name == baseline:
            continue
        quant = row.get("quantization")
        image = row["decode_image_tok_s"] / base["decode_image_tok_s"]
        if quant in ("int4", "int8"):
            need = 5 if quant == "int4" else 4
            add(f"decode with the image context ≥ {need}× transformers", name, f"{image:.2f}×", image >= need)
        if quant == "int4":
            ratio = row[short] / base[short]
            add(f"decode at context {contexts[0]} ≥ 8× transformers", name, f"{ratio:.2f}×", ratio >= 8)
            size = row["package_mb"] / base["package_mb"]
            add("package ≤ 25% of the fp32 checkpoint", name, f"{size:.1%}", size <= 0.25)
        ttft = row["ttft_s"] / base["ttft_s"]
        add("time to first token (17 tiles) ≤ 0.5× transformers", name, f"{ttft:.2f}×", ttft <= 0.5)
        flat = row[long] / row[short]
        add(f"decode at context {contexts[-1]} within 15% of context {contexts[0]}", name,
            f"{flat:.2f} of it", flat >= 0.85)
        budget = 1.3 * row["package_mb"] + row["kv_bytes_per_token"] * row["max_context"] / 1e6
        add("peak RSS ≤ 1.3× package + KV cache", name,
            f"{row['peak_rss_mb']:,.0f} MB (limit {budget:,.0f} MB; the process held "
            f"{row['rss_before_load_mb']:,.0f} MB before loading the package)", row["peak_rss_mb"] <= budget)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="HF checkpoint for the baseline (default: random SmolVLM-256M build)")
    parser.add_argument("--package", action="append", default=[], help="package(s) to measure (default: export "
                        "the checkpoint to fp32)")
    parser.add_argument("--quant", nargs="+", default=["fp32", "int8", "int4"],
                        help="plans to export and measure when no --package is given")
    parser.add_argument("--workdir", default="/tmp/edgevlm-bench", help="where built checkpoints/packages go")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.contexts = min(args.repeats, 2), args.contexts[:2]

    if args.worker:
        fn = worker_edgevlm if args.worker == "edgevlm" else worker_transformers
        print(json.dumps(fn(args.target, args)))
        return 0

    workdir = Path(args.workdir)
    checkpoint = Path(args.checkpoint) if args.checkpoint else workdir / "smolvlm-256m-random"
    if not args.checkpoint and not (checkpoint / "model.safetensors").exists():
        from edgevlm.export.random_model import build_random_idefics3

        print("building a random-weight checkpoint with SmolVLM-256M's dimensions", file=sys.stderr)
        build_random_idefics3(CARD, checkpoint)
    packages = [Path(p) for p in args.package]
    if not packages:
        from edgevlm.export.convert import Progress, export_package

        for quant in args.quant:
            package = workdir / f"{checkpoint.name}-{quant}"
            if not (package / "model.json").exists():
                export_package(str(checkpoint), package, quant=quant, verify=False, progress=Progress())
            packages.append(package)

    bandwidth = copy_bandwidth_gbs()
    rows = {"transformers eager fp32": run_worker("transformers", str(checkpoint), args)}
    for package in packages:
        quant = json.loads((package / "model.json").read_text()).get("quantization", "?")
        rows[f"edgevlm {quant} ({package.name})"] = run_worker("edgevlm", str(package), args)

    import numpy
    import onnxruntime
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    header = (f"# Benchmark results\n\nMachine: {cpu or platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}; onnxruntime {onnxruntime.__version__}, "
              f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {numpy.__version__}. "
              f"Checkpoint: {checkpoint.name}. Medians of {args.repeats} runs after a "
              f"warm-up; decode over {args.decode_tokens} tokens; ratios are against transformers eager fp32 "
              "measured in the same run (higher is better for tok/s, lower for seconds and MB).\n\n"
              f"Command: `python benchmarks/bench.py {' '.join(sys.argv[1:])}`\n\n")
    text = header + table(rows, "transformers eager fp32", args.contexts, bandwidth) + "\n"
    print(text)
    Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
