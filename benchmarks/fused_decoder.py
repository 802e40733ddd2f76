"""Decode speed: the portable (traced) decoder via Engine vs the fused GroupQueryAttention decoder with a shared KV
buffer, at SmolVLM-256M dimensions (random weights: speed does not depend on the values).

    python benchmarks/fused_decoder.py                          # builds what is missing under --work
    python benchmarks/fused_decoder.py --no-int4 --runs 5       # fp32 only

For each context length C the KV cache is filled with C random positions (a prefill of C tokens would give the same
cache shape; its values do not change decode speed), then 32 single-token decode steps are timed. Runs are
interleaved (for run r: every context, every graph) so machine drift hits all graphs alike; the table shows medians.
Embedding lookup is excluded for every graph (each step feeds a random [1, 1, hidden] embedding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "tests" / "fixtures" / "smolvlm-256m-instruct"


def _ensure_inputs(args) -> tuple[Path, Path, Path | None]:
    checkpoint, package, work = Path(args.checkpoint), Path(args.package), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (checkpoint / "config.json").exists():
        from edgevlm.export.random_model import build_random_idefics3

        print(f"building random SmolVLM-256M-size checkpoint at {checkpoint}", flush=True)
        build_random_idefics3(CARD, checkpoint)
    if not (package / "model.json").exists():
        from edgevlm.export.convert import export_package

        print(f"exporting portable fp32 package to {package}", flush=True)
        export_package(str(checkpoint), package)
    fused = work / "decoder_fused.onnx"
    if not fused.exists():
        from transformers import Idefics3ForConditionalGeneration

        from edgevlm.export.fused_decoder import build_fused_decoder

        print(f"building fused fp32 decoder at {fused}", flush=True)
        model = Idefics3ForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
        t0 = time.perf_counter()
        build_fused_decoder(model, fused, max_sequence_length=args.max_len)
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
        del model
    int4 = None
    if args.int4:
        int4 = work / "decoder_fused_int4.onnx"
        if not int4.exists():
            from edgevlm.export.fused_decoder import quantize_fused_decoder_int4

            print(f"quantising to int4 (MatMulNBits, block 32, accuracy_level 4) at {int4}", flush=True)
            t0 = time.perf_counter()
            quantize_fused_decoder_int4(fused, int4)
            print(f"  quantised in {time.perf_counter() - t0:.1f} s", flush=True)
    return package, fused, int4


class PortableRunner:
    """The existing engine path: Engine.forward with separate past/present (a new present every step)."""

    def __init__(self, package: Path, threads: int):
        from edgevlm.runtime.engine import Engine, KVCache
        from edgevlm.runtime.package import ModelPackage

        import onnxruntime as ort

        self.engine = Engine(ModelPackage.load(package), threads=threads)
        self._ort, self._cache_cls = ort, KVCache
        self.hidden = None
        self.cache = None

    def set_context(self, length: int, rng) -> None:
        e = self.engine
        shape = (1, e.kv_heads, length, e.head_dim)

        def value():
            return self._ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.5)

        self.cache = self._cache_cls(keys=[value() for _ in range(e.num_layers)],
                                     values=[value() for _ in range(e.num_layers)])

    def decode(self, embeds: list[np.ndarray]) -> None:
        cache = self.cache
        for x in embeds:
            _, cache = self.engine.forward(x, cache)


class FusedRunner:
    """The fused graph with one shared [1, kv_heads, max_len, head_dim] buffer per layer and K/V (IOBinding)."""

    def __init__(self, path: Path, threads: int, layers: int, kv_heads: int, head_dim: int, max_len: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.layers = layers
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, max_len, head_dim), np.float32))
                        for _ in range(2 * layers)]
        self.length = 0
        self.context = 0

    def set_context(self, length: int, rng) -> None:
        for buffer in self.buffers:
            array = buffer.numpy()  # a copy: write it back through a fresh OrtValue update
            array[:, :, :length] = rng.standard_normal(array[:, :, :length].shape).astype(np.float32) * 0.5
            buffer.update_inplace(array)
        self.context = length

    def decode(self, embeds: list[np.ndarray]) -> None:
        # Restarting at `context` each run overwrites the same positions: seqlens_k decides what is read.
        length = self.context
        for x in embeds:
            binding = self.session.io_binding()
            binding.bind_cpu_input("inputs_embeds", x)
            binding.bind_cpu_input("seqlens_k", np.array([length], np.int32))
            binding.bind_cpu_input("total_sequence_length", np.array(length + 1, np.int32))
            binding.bind_output("logits", "cpu")
            for i in range(self.layers):
                for j, kind in enumerate(("key", "value")):
                    buffer = self.buffers[2 * i + j]
                    binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffer)
                    binding.bind_ortvalue_output(f"present.{i}.{kind}", buffer)
            self.session.run_with_iobinding(binding)
            binding.get_outputs()[0].numpy()  # logits to host, as a sampler would need
            length += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/smolvlm256-random")
    parser.add_argument("--package", default="/tmp/pkg256")
    parser.add_argument("--work", default="/tmp/fused256")
    parser.add_argument("--contexts", default="64,512,2048")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-len", type=int, default=4096, help="fused graph's max_sequence_length and buffer length")
    parser.add_argument("--no-int4", dest="int4", action="store_false")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    contexts = [int(c) for c in args.contexts.split(",")]
    assert max(contexts) + args.steps <= args.max_len
    package, fused_path, int4_path = _ensure_inputs(args)

    portable = PortableRunner(package, args.threads)
    e = portable.engine
    runners = {"portable fp32 (Engine)": portable,
               "fused fp32 (shared KV)": FusedRunner(fused_path, args.threads, e.num_layers, e.kv_heads,
                                                     e.head_dim, args.max_len)}
    if int4_path is not None:
        runners["fused int4 (shared KV)"] = FusedRunner(int4_path, args.threads, e.num_layers, e.kv_heads,
                                                        e.head_dim, args.max_len)
    hidden = int(e.package.text.get("hidden_size", 576)) if isinstance(e.package.text, dict) else 576
    rng = np.random.default_rng(0)
    embeds = [rng.standard_normal((1, 1, hidden)).astype(np.float32) for _ in range(args.steps)]

    # Warm-up: one short run per graph (first-run allocations, thread pool spin-up).
    for runner in runners.values():
        runner.set_context(contexts[0], rng)
        runner.decode(embeds[:4])

    times: dict[tuple[str, int], list[float]] = {(n, c): [] for n in runners for c in contexts}
    for run in range(args.runs):
        for c in contexts:
            for name, runner in runners.items():
                runner.set_context(c, rng)
                t0 = time.perf_counter()
                runner.decode(embeds)
                times[(name, c)].append(time.perf_counter() - t0)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)

    print(f"\nDecode tokens/s, batch 1, {args.threads} threads, median of {args.runs} runs x {args.steps} steps "
          f"(SmolVLM-256M dims: {e.num_layers} layers, {e.kv_heads} KV heads, head_dim {e.head_dim})\n")
    header = "| graph | " + " | ".join(f"context {c}" for c in contexts) + " |"
    print(header)
    print("|---" * (len(contexts) + 1) + "|")
    base = {c: args.steps / statistics.median(times[(next(iter(runners)), c)]) for c in contexts}
    for name in runners:
        cells = []
        for c in contexts:
            tps = args.steps / statistics.median(times[(name, c)])
            cells.append(f"{tps:.1f} ({tps / base[c]:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
