"""What an int4 package's int8 prefill graph costs in quality: next-token logits right after a prefill, vs fp32.

    python benchmarks/prefill_quality.py --fp32 FP32_PKG --int4 INT4_PKG

benchmarks/quant_quality.py teacher-forces the last 32 positions of short prompts one decode step at a time, so
it judges the decode graph. Here every scored position comes straight out of a prefill: for each prompt (the 8
chat prompts of quant_quality.py, the 24 held-out ones of int4_plans.py, and one ~1,000-token prompt: the README's
first 3,000 characters to summarise), fp32's greedy 24-token answer is appended and the sequence is prefilled up
to every second answer position; the last position's logits are compared with fp32's there (top-1 agreement, mean
KL(fp32 ‖ int4) in nats). The int4 package runs twice: prompts on its int8 prefill graph (the default), and on
its 4-bit decoder graph (`EngineConfig(int8_prefill=False)`, serve --no-int8-prefill). Run it on trained weights
(the realtext checkpoint of benchmarks/realtext_checkpoint.py): random weights flip their argmax at any change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def sequences(fp32: Path) -> list[tuple[list[int], list[int]]]:
    import int4_plans
    import quant_quality

    from edgevlm.runtime.vlm import VisionLanguageModel

    prompts = list(quant_quality.TEXT_PROMPTS) + list(int4_plans.HOLDOUT_PROMPTS)
    prompts.append("Summarize this text:\n" + (ROOT / "README.md").read_text(encoding="utf-8")[:3000])
    model = VisionLanguageModel.load(fp32)
    out = []
    try:
        for question in prompts:
            ids = list(model.prepare([{"role": "user", "content": question}]).input_ids)
            answer = model.engine.greedy(np.array(ids), None, 24, model.eos_token_ids)
            out.append((ids + list(answer), list(range(len(ids), len(ids) + len(answer) + 1, 2))))
    finally:
        model.close()
    return out


def prefill_logits(package: Path, seqs, *, int8_prefill: bool = True) -> np.ndarray:
    from edgevlm.runtime.limits import EngineConfig
    from edgevlm.runtime.vlm import VisionLanguageModel

    model = VisionLanguageModel.load(package, engine_config=EngineConfig(int8_prefill=int8_prefill))
    try:
        rows = []
        for ids, cuts in seqs:
            for cut in cuts:
                logits, _ = model.engine.prefill(np.array(ids[:cut]))
                rows.append(logits[0, -1].astype(np.float64))
        return np.stack(rows)
    finally:
        model.close()


def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref, got = log_softmax(reference), log_softmax(candidate)
    return float((reference.argmax(-1) == candidate.argmax(-1)).mean()), float((np.exp(ref) * (ref - got)).sum(-1).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", required=True, type=Path)
    parser.add_argument("--int4", required=True, type=Path, help="an int4 package with an int8 prefill graph")
    args = parser.parse_args()
    seqs = sequences(args.fp32)
    long_rows = len(seqs[-1][1])
    reference = prefill_logits(args.fp32, seqs)
    print(f"{len(seqs)} prompts, {sum(len(c) for _, c in seqs)} scored positions, the longest sequence "
          f"{max(len(s) for s, _ in seqs)} tokens")
    print("| prompts run on | top-1 vs fp32 | KL vs fp32 | long prompt top-1 | long prompt KL |")
    print("|---|---:|---:|---:|---:|")
    for label, int8 in (("int8 prefill graph (default)", True), ("4-bit decoder graph (--no-int8-prefill)", False)):
        got = prefill_logits(args.int4, seqs, int8_prefill=int8)
        top1, kl = compare(reference, got)
        long_top1, long_kl = compare(reference[-long_rows:], got[-long_rows:])
        print(f"| {label} | {top1:.1%} | {kl:.4f} | {long_top1:.1%} | {long_kl:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
