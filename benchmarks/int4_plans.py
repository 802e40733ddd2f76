"""Compare int4 decoder plans on one checkpoint: text quality against fp32, decoder size, decode speed.

    python benchmarks/quant_quality.py --checkpoint CKPT --quant fp32 int4 --workdir W   # the two packages first
    python benchmarks/int4_plans.py --fp32 W/CKPT-fp32 --int4 W/CKPT-int4 --plans rtn search gptq gptq-down8 \\
        --speed --output table.md

Each plan re-quantizes only the decoder, from the fp32 package's decoder graph (`export.quantize.quantize_graph`
with the plan's `QuantOptions`; the calibrated algorithms calibrate on the fp32 package); vision encoder,
embed_tokens, tokenizer and template are the --int4 package's (hard links). Quality: quant_quality.py's text
prompts (teacher-forced logits at the last 32 positions: top-1 agreement, mean KL; greedy answers of 24 tokens).
Speed (--speed): `engine.decode_step` at context 64, 16 tokens per round, median of 7 rounds, every plan's engine in
this one process and the rounds interleaved, reported as tokens/s relative to the "rtn" plan (the current int4).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DOWN8 = ("*/down_proj/*",)
QKV8 = ("*/qkv_proj/*",)

# name → QuantOptions fields (the defaults otherwise: block 32, symmetric, accuracy_level 4, lm_head 8-bit)
PLANS: dict[str, dict] = {
    "default": {"_default": True},  # QuantOptions() as `edgevlm export --quant int4` uses it
    "rtn": {},
    "rtn-asym": {"symmetric": False},
    "search": {"int4_algorithm": "search"},
    "search-asym": {"int4_algorithm": "search", "symmetric": False},
    "gptq": {"int4_algorithm": "gptq"},
    "gptq-asym": {"int4_algorithm": "gptq", "symmetric": False},
    "gptq-b16": {"int4_algorithm": "gptq", "block_size": 16},
    "rtn-down8": {"int4_8bit_nodes": DOWN8},
    "search-down8": {"int4_algorithm": "search", "int4_8bit_nodes": DOWN8},
    "gptq-down8": {"int4_algorithm": "gptq", "int4_8bit_nodes": DOWN8},
    "gptq-asym-down8": {"int4_algorithm": "gptq", "symmetric": False, "int4_8bit_nodes": DOWN8},
    "gptq-asym-qkv8": {"int4_algorithm": "gptq", "symmetric": False, "int4_8bit_nodes": QKV8},
    # references: the decoder in float32 or 8-bit (embeddings and vision as in the --int4 package)
    "fp32-decoder": {"_mode": "fp32"},
    "int8-decoder": {"_mode": "int8"},
    "gptq-act-qkv8": {"int4_algorithm": "gptq", "int4_8bit_nodes": QKV8, "_gptq": {"act_order": True}},
    "gptq-asym-act-qkv8": {"int4_algorithm": "gptq", "symmetric": False, "int4_8bit_nodes": QKV8,
                           "_gptq": {"act_order": True}},
    "gptq-act-down8": {"int4_algorithm": "gptq", "int4_8bit_nodes": DOWN8, "_gptq": {"act_order": True}},
    "gptq-act-damp0.1": {"int4_algorithm": "gptq", "_gptq": {"act_order": True, "damp": 0.1}},
    "gptq-asym-act-damp0.1": {"int4_algorithm": "gptq", "symmetric": False, "_gptq": {"act_order": True, "damp": 0.1}},
    "gptq-asym-act-damp0.03": {"int4_algorithm": "gptq", "symmetric": False,
                               "_gptq": {"act_order": True, "damp": 0.03}},
    "gptq-asym-act-ans64": {"int4_algorithm": "gptq", "symmetric": False, "_gptq": {"act_order": True},
                            "_calibrate": {"answer_tokens": 64}},
    "gptq-asym-act-2pass": {"int4_algorithm": "gptq", "symmetric": False, "_gptq": {"act_order": True},
                            "_calibrate": {"passes": 2}},
    "gptq-act-2pass": {"int4_algorithm": "gptq", "_gptq": {"act_order": True}, "_calibrate": {"passes": 2}},
    "gptq-asym-act-qkv8-2pass": {"int4_algorithm": "gptq", "symmetric": False, "int4_8bit_nodes": QKV8,
                                 "_gptq": {"act_order": True}, "_calibrate": {"passes": 2}},
    "gptq-act-ans64": {"int4_algorithm": "gptq", "_gptq": {"act_order": True}, "_calibrate": {"answer_tokens": 64}},
    # fewer bytes per token (decode reads every weight once a token: block 64 / 128 halve / quarter the per-block
    # scale and sum overhead of MatMulNBits' packed layout; "lm4": a 4-bit output projection)
    "rtn-b64": {"block_size": 64},
    "rtn-b64-lm4": {"block_size": 64, "int4_output_bits": 4},
    "rtn-b128-lm4": {"block_size": 128, "int4_output_bits": 4},
    "gptq-act-b64": {"int4_algorithm": "gptq", "block_size": 64, "_gptq": {"act_order": True}},
    "gptq-act-lm4": {"int4_algorithm": "gptq", "int4_output_bits": 4, "_gptq": {"act_order": True}},
    "gptq-act-b64-lm4": {"int4_algorithm": "gptq", "block_size": 64, "int4_output_bits": 4,
                         "_gptq": {"act_order": True}},
    "gptq-act-b128-lm4": {"int4_algorithm": "gptq", "block_size": 128, "int4_output_bits": 4,
                          "_gptq": {"act_order": True}},
    "gptq-asym-act-b64": {"int4_algorithm": "gptq", "symmetric": False, "block_size": 64, "_gptq": {"act_order": True}},
    "gptq-act-b64-noscale": {"int4_algorithm": "gptq", "block_size": 64, "int4_scale_alphas": (),
                             "_gptq": {"act_order": True}},  # the default before activation-aware scaling
    "gptq-act-b64-rtnpick": {"int4_algorithm": "gptq", "block_size": 64, "int4_scale_select": "rtn",
                             "_gptq": {"act_order": True}},  # alpha picked by RTN's error, one GPTQ per MatMul
    "gptq-act-b64-rtnpick-refine32": {"int4_algorithm": "gptq", "block_size": 64, "int4_scale_select": "rtn",
                                      "int4_output_topk": 32, "_gptq": {"act_order": True}},
    "gptq-act-b64-rtnpick-lm4": {"int4_algorithm": "gptq", "block_size": 64, "int4_scale_select": "rtn",
                                 "int4_output_bits": 4, "_gptq": {"act_order": True}},
    "gptq-act-b128-rtnpick": {"int4_algorithm": "gptq", "block_size": 128, "int4_scale_select": "rtn",
                              "_gptq": {"act_order": True}},  # 4.5 bits a weight, as llama.cpp's Q4_0
    "gptq-act-b64-scale4": {"int4_algorithm": "gptq", "block_size": 64, "int4_scale_alphas": (0.0, 0.25, 0.5, 0.75),
                            "_gptq": {"act_order": True}},
    "gptq-act-b64-qkv8": {"int4_algorithm": "gptq", "block_size": 64, "int4_8bit_nodes": QKV8,
                          "_gptq": {"act_order": True}},
    "gptq-asym-act-b64-lm4": {"int4_algorithm": "gptq", "symmetric": False, "block_size": 64, "int4_output_bits": 4,
                              "_gptq": {"act_order": True}},
    # experiments: "_gptq" holds keyword arguments for export.int4_search.gptq (not QuantOptions fields)
    "gptq-act": {"int4_algorithm": "gptq", "_gptq": {"act_order": True}},
    "gptq-asym-act": {"int4_algorithm": "gptq", "symmetric": False, "_gptq": {"act_order": True}},
    "gptq-asym-act-refit": {"int4_algorithm": "gptq", "symmetric": False,
                            "_gptq": {"act_order": True, "refit": True}},
    "gptq-asym-refit": {"int4_algorithm": "gptq", "symmetric": False, "_gptq": {"refit": True}},
}
# More prompts, neither quant_quality.py's nor the calibration's, for a less noisy second figure (--holdout).
HOLDOUT_PROMPTS = [
    "What is the chemical symbol for gold?", "Write two sentences about a rainy afternoon.",
    "How do I change a flat tyre on a bicycle?", "Name three famous composers.",
    "Why do we have seasons on Earth?", "What is a good way to start learning to draw?",
    "Explain what an atom is.", "What is 15 plus 27?", "Describe the taste of a lemon.",
    "Which animals are mammals: shark, dolphin, or trout?", "Write a thank-you note to a teacher.",
    "How do plants drink water?", "What is the longest river in South America?",
    "Give me a tip for saving money on groceries.", "What does a firefighter do?",
    "Tell me something interesting about octopuses.", "How many minutes are there in a day?",
    "What is the opposite of 'ancient'?", "Suggest a fun activity for a snowy day.",
    "Why is the ocean salty?", "Write a sentence using the word 'gigantic'.",
    "What language is spoken in Brazil?", "How do magnets work?", "Recommend a book for a child who likes dragons.",
]


def _quant_quality():
    spec = importlib.util.spec_from_file_location("quant_quality", HERE / "quant_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(name: str, fields: dict, fp32: Path, int4: Path, workdir: Path) -> Path:
    """The plan's package: the --int4 package with the decoder quantized from fp32 by the plan."""
    from edgevlm.export.quantize import QuantOptions, quantize_graph
    from edgevlm.runtime.package import sha256_file

    out = workdir / name
    if (out / "model.json").exists():
        return out
    tmp = workdir / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = json.loads((int4 / "model.json").read_text())
    decoder_file = manifest["graphs"]["decoder"]["file"]
    for f in int4.iterdir():
        if f.is_file() and f.name not in (decoder_file, "model.json") and not f.name.startswith(decoder_file):
            os.link(f, tmp / f.name)
    from edgevlm.export import int4_search

    extra = {k: v for k, v in fields.items() if k.startswith("_")}
    # A plan's fields are changes from the plan "rtn" (round to nearest, block 32, GPTQ without act order), the
    # int4 default before round 3; "block_size" is the int4 block.
    base = {"int4_algorithm": "rtn", "int4_block_size": 32, "int4_act_order": False}
    given = {("int4_block_size" if k == "block_size" else k): v for k, v in fields.items() if not k.startswith("_")}
    options = QuantOptions(**{**base, **given}) if "_default" not in fields else QuantOptions()
    if options.int4_algorithm in ("search", "gptq"):
        options.int4_calibration_package = str(fp32)
    start = time.perf_counter()
    plain = int4_search.quantize_matmuls  # experiments: keyword arguments quantize_for_options does not pass

    def patched(*a, gptq_options=None, **k):
        return plain(*a, gptq_options={**(gptq_options or {}), **extra.get("_gptq", {})},
                     **{**k, **extra.get("_calibrate", {})})

    int4_search.quantize_matmuls = patched
    try:
        report = quantize_graph(fp32 / decoder_file, tmp / decoder_file, extra.get("_mode", "int4"), graph="decoder",
                                options=options)
    finally:
        int4_search.quantize_matmuls = plain
    seconds = time.perf_counter() - start
    entry = manifest["graphs"]["decoder"]
    entry.pop("external_data", None)
    # the --int4 package's prefill and int8-cache graphs read its own decoder's weights: not the plan's
    for derived in (entry.pop("prefill", None), entry.pop("kv_int8", None)):
        for f in [derived["file"], derived.get("scales", {}).get("file")] if derived else []:
            manifest["files"].pop(f, None)
            if f and (tmp / f).exists():
                (tmp / f).unlink()
    entry.update(report.manifest_entry())
    for f in [k for k in manifest["files"] if k.startswith(decoder_file)]:
        del manifest["files"][f]
    for f in report.files:
        manifest["files"][f] = {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)}
    manifest["name"] = name
    manifest["int4_plan"] = {"fields": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
                             "method": report.method, "quantize_seconds": round(seconds, 1)}
    (tmp / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(out)
    print(f"  {name}: {report.method} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return out


def _swap_to(base, other, names: set[str]):
    """`base` (ONNX model) with its quantized nodes for the MatMuls `names` replaced by `other`'s (with the
    initializers and Cast nodes that feed them)."""
    from edgevlm.export.quantize import _drop_unused_initializers

    def original(node):
        return node.name.rsplit("_Q", 1)[0] if node.op_type == "MatMulNBits" else None

    import copy

    producers = {o: n for n in other.graph.node for o in n.output}
    other_inits = {t.name: t for t in other.graph.initializer}
    swapped = {original(n): copy.deepcopy(n) for n in other.graph.node if original(n) in names}
    feeders, tensors = [], []

    def renamed(tensor, name):  # both plans name their tensors after the weight: keep the 8-bit ones apart
        tensor = copy.deepcopy(tensor)
        tensor.name = name + ".8bit"
        return tensor

    for node in swapped.values():
        for i, name in enumerate(node.input):
            if i == 0:
                continue
            if name in other_inits:
                tensors.append(renamed(other_inits[name], name))
            elif name in producers:  # a Cast from a float16-stored tensor
                feeder = copy.deepcopy(producers[name])
                for j, source in enumerate(feeder.input):
                    if source in other_inits:
                        tensors.append(renamed(other_inits[source], source))
                        feeder.input[j] = source + ".8bit"
                feeder.output[0] = name + ".8bit"
                feeder.name += ".8bit"
                feeders.append(feeder)
            node.input[i] = name + ".8bit"
    nodes = feeders + [swapped.get(original(n), n) for n in base.graph.node]
    consumed = {i for n in nodes for i in n.input}
    nodes = [n for n in nodes if n.op_type != "Cast" or n.output[0] in consumed]  # the 4-bit scales' Casts
    del base.graph.node[:]
    base.graph.node.extend(nodes)
    have_inits = {t.name for t in base.graph.initializer}
    base.graph.initializer.extend(t for t in tensors if t.name not in have_inits)
    _drop_unused_initializers(base)
    return base


def sensitivity(base: str, fp32: Path, int4: Path, workdir: Path, reference, qq, groups: dict[str, list[str]]):
    """For each group of MatMuls: the base plan with that group 8-bit (same 8-bit quantizer as int4_8bit_nodes).
    → {group: quality}."""
    import onnx

    from edgevlm.export.quantize import quantize_graph

    decoder_file = json.loads((int4 / "model.json").read_text())["graphs"]["decoder"]["file"]
    int8_decoder = workdir / ".int8-for-swaps" / decoder_file
    if not int8_decoder.exists():
        quantize_graph(fp32 / decoder_file, int8_decoder, "int8", graph="decoder")
    base_dir = workdir / base
    other = onnx.load(str(int8_decoder))
    prompts = [p for p in qq.prompt_set() if p[0] == "text"]
    out = {}
    variant = workdir / f".{base}-variant"
    for group, names in groups.items():
        shutil.rmtree(variant, ignore_errors=True)
        variant.mkdir()
        for f in base_dir.iterdir():
            if f.name != decoder_file:
                os.link(f, variant / f.name)
        model = _swap_to(onnx.load(str(base_dir / decoder_file)), other, set(names))
        onnx.save_model(model, str(variant / decoder_file))
        manifest = json.loads((variant / "model.json").read_text())
        (variant / "model.json").unlink()
        manifest["files"].pop(decoder_file, None)  # not checked (verify=False loads)
        (variant / "model.json").write_text(json.dumps(manifest))
        out[group] = qq.compare(reference, qq.run_package(variant, prompts), "text")
        print(f"  {base} + {group} 8-bit: top-1 {out[group]['top1']:.1%}, KL {out[group]['kl']:.4f}",
              file=sys.stderr, flush=True)
    shutil.rmtree(variant, ignore_errors=True)
    return out


def decode_speed(packages: dict[str, Path], rounds: int = 7, context: int = 64, tokens: int = 16) -> dict:
    """Seconds per decode step (median over rounds), all engines in this process, rounds interleaved."""
    from edgevlm.runtime.engine import Engine
    from edgevlm.runtime.package import ModelPackage

    engines = {name: Engine(ModelPackage.load(path, verify=False), defer_vision=True)
               for name, path in packages.items()}
    ids = (np.arange(context, dtype=np.int64) * 37 + 11) % 1000 + 100
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds + 1):  # the first round warms up
        for name, engine in engines.items():
            logits, cache = engine.prefill(ids, reserve=tokens)
            token = int(np.argmax(logits[0, -1]))
            start = time.perf_counter()
            for _ in range(tokens):
                logits, cache = engine.decode_step(token, cache)
                token = int(np.argmax(logits[0, -1]))
            if r:
                times[name].append((time.perf_counter() - start) / tokens)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", required=True, type=Path, help="the fp32 package (reference, calibration)")
    parser.add_argument("--int4", required=True, type=Path, help="an int4 package of the same checkpoint")
    parser.add_argument("--plans", nargs="+", default=["rtn", "search", "gptq"], choices=sorted(PLANS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgevlm-int4-plans"))
    parser.add_argument("--speed", action="store_true", help="also measure decode speed (interleaved)")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--holdout", action="store_true", help=f"also {len(HOLDOUT_PROMPTS)} held-out prompts")
    parser.add_argument("--sensitivity", metavar="PLAN", help="per group of MatMuls: PLAN with that group 8-bit")
    parser.add_argument("--groups", default="layers", choices=["layers", "types", "matmuls"])
    args = parser.parse_args()

    qq = _quant_quality()
    args.workdir.mkdir(parents=True, exist_ok=True)
    packages = {name: build(name, PLANS[name], args.fp32, args.int4, args.workdir) for name in args.plans}
    prompts = [p for p in qq.prompt_set() if p[0] == "text"]
    reference_file = args.workdir / "fp32-reference.npz"
    if reference_file.exists():
        saved = np.load(reference_file, allow_pickle=True)
        reference = list(saved["results"])
    else:
        reference = qq.run_package(args.fp32, prompts)
        np.savez(reference_file, results=np.array(reference, dtype=object))
    holdout = [("text", [{"role": "user", "content": q}]) for q in HOLDOUT_PROMPTS]
    if args.holdout:
        holdout_file = args.workdir / "fp32-holdout.npz"
        if holdout_file.exists():
            holdout_reference = list(np.load(holdout_file, allow_pickle=True)["results"])
        else:
            holdout_reference = qq.run_package(args.fp32, holdout)
            np.savez(holdout_file, results=np.array(holdout_reference, dtype=object))
    rows, held = {}, {}
    for name, path in packages.items():
        start = time.perf_counter()
        rows[name] = qq.compare(reference, qq.run_package(path, prompts), "text")
        if args.holdout:
            held[name] = qq.compare(holdout_reference, qq.run_package(path, holdout), "text")
        print(f"  {name}: top-1 {rows[name]['top1']:.1%}, KL {rows[name]['kl']:.4f}"
              + (f"; held-out top-1 {held[name]['top1']:.1%}, KL {held[name]['kl']:.4f}" if args.holdout else "")
              + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    speed = decode_speed(packages) if args.speed else {}
    lines = [f"Text prompts of quant_quality.py: {rows[next(iter(rows))]['positions']} positions"
             + (f"; held-out: {len(HOLDOUT_PROMPTS)} other prompts, {held[next(iter(held))]['positions']} positions"
                if held else "") + ".", "",
             "| plan | top-1 text | KL (nats) | greedy identical | common prefix / fp32 length | "
             + ("held-out top-1 | held-out KL | " if held else "") + "decoder MB | decode ms/token | decode vs rtn |",
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if held else "") + "---:|---:|---:|"]
    for name, path in packages.items():
        m = rows[name]
        manifest = json.loads((path / "model.json").read_text())
        decoder_mb = sum(manifest["files"][f]["bytes"] for f in manifest["files"]
                         if f.startswith(manifest["graphs"]["decoder"]["file"])) / 1e6
        ms = f"{speed[name] * 1e3:.2f}" if name in speed else "–"
        ratio = f"{speed['rtn'] / speed[name]:.2f}" if name in speed and "rtn" in speed else "–"
        h = f"{held[name]['top1']:.1%} | {held[name]['kl']:.4f} | " if held else ""
        lines.append(f"| {name} | {m['top1']:.1%} | {m['kl']:.4f} | {m['greedy_identical']:.0%} | "
                     f"{m['common_prefix']:.1f} / {m['reference_length']:.1f} | {h}{decoder_mb:.1f} | {ms} | {ratio} |")
    if args.sensitivity:
        import onnx

        decoder = json.loads((args.int4 / "model.json").read_text())["graphs"]["decoder"]["file"]
        names = [n.name for n in onnx.load(str(args.fp32 / decoder), load_external_data=False).graph.node
                 if n.op_type == "MatMul" and "/layers." in n.name]
        if args.groups == "layers":
            groups = {}
            for name in names:
                groups.setdefault("layer " + name.split("/layers.")[1].split("/")[0], []).append(name)
        elif args.groups == "types":
            groups = {}
            for name in names:
                groups.setdefault(name.split("/")[-2], []).append(name)
        else:
            groups = {name: [name] for name in names}
        found = sensitivity(args.sensitivity, args.fp32, args.int4, args.workdir, reference, qq, groups)
        base = rows[args.sensitivity]
        lines += ["", f"{args.sensitivity} with one group of MatMuls 8-bit (base: top-1 {base['top1']:.1%}, "
                  f"KL {base['kl']:.4f}), by KL:", "", "| 8-bit group | top-1 text | KL (nats) | greedy identical |",
                  "|---|---:|---:|---:|"]
        for group, m in sorted(found.items(), key=lambda item: item[1]["kl"]):
            lines.append(f"| {group} | {m['top1']:.1%} | {m['kl']:.4f} | {m['greedy_identical']:.0%} |")
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
