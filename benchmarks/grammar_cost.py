"""What constrained decoding (response_format) costs per token, against a decode step of the same package.

    python benchmarks/grammar_cost.py                     # SmolVLM-256M dimensions, int4, random weights
    python benchmarks/grammar_cost.py --package out/my-pkg

Builds (once, under --workdir, as bench.py does) a random-weight checkpoint with SmolVLM-256M's real dimensions
and tokenizer and its int4 package, then generates greedily after a short text prompt: without a grammar (the
baseline, same run), with json_object and with a closed schema. Per token it times the decoder step
(`Engine.forward`) and the grammar's work (mask fill + applying it to the logits + advancing the matcher), and
prints medians and their ratio. It also measures whether fast-forwarding forced tokens (a schema's fixed keys)
through the decoder in one run would pay: one run over k new tokens against k single-token steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "tests" / "fixtures" / "smolvlm-256m-instruct"
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "additionalProperties": False, "required": ["shape", "color", "count", "where"],
    "properties": {"shape": {"enum": ["circle", "square", "triangle", "star"]},
                   "color": {"enum": ["red", "orange", "yellow", "green", "blue", "purple", "black", "white"]},
                   "count": {"type": "integer", "minimum": 1, "maximum": 3},
                   "where": {"enum": ["left", "right", "top", "bottom", "center"]}}}}}


def build_package(workdir: Path) -> Path:
    from edgevlm.export.convert import Progress, export_package
    from edgevlm.export.random_model import build_random_idefics3

    checkpoint = workdir / "smolvlm-256m-random"
    if not (checkpoint / "model.safetensors").exists():
        build_random_idefics3(CARD, checkpoint)
    package = workdir / "smolvlm-256m-random-int4"
    if not (package / "model.json").exists():
        export_package(str(checkpoint), package, quant="int4", verify=False, progress=Progress())
    return package


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package")
    parser.add_argument("--workdir", default="/tmp/edgevlm-bench")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from edgevlm.runtime.grammar import GrammarState, parse_response_format
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.vlm import VisionLanguageModel

    package = Path(args.package) if args.package else build_package(Path(args.workdir))
    t0 = time.perf_counter()
    vlm = VisionLanguageModel.load(package)
    loaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    type(vlm.grammars)(vlm.tokenizer, vlm.eos_token_ids)
    index_s = time.perf_counter() - t0
    prompt = vlm.prepare([{"role": "user", "content": "Describe the shapes in the image."}])
    no_eos = {token: -100 for token in vlm.eos_token_ids}  # the baseline runs the same number of steps

    steps_ms, grammar_ms = [], []
    forward, apply, advance = vlm.engine.forward, GrammarState.apply, GrammarState.advance

    def timed(fn, into):
        def run(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            into.append((time.perf_counter() - start) * 1e3)
            return out
        return run

    rows = []
    for name, response_format in (("none (baseline)", None), ("json_object", {"type": "json_object"}),
                                   ("closed schema (4 enums/int)", SCHEMA)):
        schema = parse_response_format(response_format)
        step_times, mask_times, tokens = [], [], []
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            steps_ms.clear()
            grammar_ms.clear()
            vlm.engine.forward = timed(forward, steps_ms)
            GrammarState.apply, GrammarState.advance = timed(apply, grammar_ms), timed(advance, grammar_ms)
            try:
                params = SamplingParams(temperature=0, logit_bias=no_eos if schema is None else {})
                out = list(vlm.generate(prompt, params, max_tokens=args.tokens, schema=schema))
            finally:
                vlm.engine.forward, GrammarState.apply, GrammarState.advance = forward, apply, advance
            if repeat:
                step_times.append(statistics.median(steps_ms[1:]))  # [0] is the prefill
                mask_times.append(sum(grammar_ms) / len(out) if grammar_ms else 0.0)
                tokens.append(len(out))
        rows.append((name, statistics.median(step_times), statistics.median(mask_times), statistics.median(tokens)))

    # Fast-forward: k forced tokens in one decoder run against k single steps, after the same prompt.
    k_values, ff = (4, 8), []
    for k in k_values:
        one_run, singles = [], []
        for _ in range(args.repeats):
            _, cache = vlm.engine.prefill(np.asarray(prompt.input_ids), None, reserve=k + 1)
            embeds = vlm.engine.embed(np.arange(100, 100 + k, dtype=np.int64)[None])
            start = time.perf_counter()
            vlm.engine.forward(embeds, cache)
            one_run.append(time.perf_counter() - start)
            _, cache = vlm.engine.prefill(np.asarray(prompt.input_ids), None, reserve=k + 1)
            start = time.perf_counter()
            for i in range(k):
                _, cache = vlm.engine.forward(embeds[:, i:i + 1], cache)
            singles.append(time.perf_counter() - start)
        ff.append((k, statistics.median(one_run) * 1e3, statistics.median(singles) * 1e3))

    print(f"package {package} (load {loaded:.2f} s; grammar tokenizer index {index_s:.2f} s of it); "
          f"{args.tokens} greedy tokens, medians of {args.repeats}\n")
    print("| response_format | tokens | decode step | grammar per token (mask + apply + advance) | share of a step |")
    print("|---|---:|---:|---:|---:|")
    for name, step, mask, count in rows:
        share = f"{100 * mask / step:.1f}%" if mask else "—"
        print(f"| {name} | {count:.0f} | {step:.2f} ms | {mask:.3f} ms | {share} |")
    print("\n| fast-forward of k forced tokens | one run | k single steps | saved |")
    print("|---|---:|---:|---:|")
    for k, one, singles in ff:
        saved = f"{singles - one:.1f} ms ({100 * (1 - one / singles):.0f}%)"
        print(f"| k = {k} | {one:.1f} ms | {singles:.1f} ms | {saved} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
