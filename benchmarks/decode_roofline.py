"""Bytes a decode step reads against what this machine can read: is the decoder at the memory limit, or its kernels?

    python benchmarks/decode_roofline.py                        # the int4 bench package, contexts 64 and 2,000
    python benchmarks/decode_roofline.py --package PKG --contexts 64 1140 2000 --output table.md

A decode step reads every weight once and the whole KV cache once. This measures, in one run:
- the machine's read bandwidth: one process summing a 256 MB array, and --threads processes at once (their bytes
  over the slowest one's time), median of 5 — the roofline;
- the bare decoder step (the package's fused decoder graph, each KV cache it carries — int8 and float32 —, its
  own session options, IOBinding with the cache buffers shared as past and present, random cache contents,
  batch 1) at each context: median of --steps steps, repeated --rounds times, rounds interleaved;
- where a step's time goes (onnxruntime's profiler, a separate session): MatMulNBits (the weights),
  GroupQueryAttention (the KV cache), the rest; and both at the longest context with 1 thread against --threads
  threads (a kernel bound by memory gains little from a second thread, one bound by compute ~2x; one thread alone
  can read what the 1-process bandwidth says);
- bytes a step reads: the MatMulNBits weights as onnxruntime packs them for its int8 kernels (accuracy level 4:
  the 4- or 8-bit values plus a float scale and a float block sum per block; the file's zero points, if any, are
  folded into the sums), and the KV cache at that context (layers × 2 × kv_heads × positions × head_dim × item
  size); against the first context, the extra KV bytes over the extra step time (unprofiled): what the attention
  reads a second.

With --llama-bench BIN --gguf MODEL (benchmarks/serve_bench.py --anchor llama.cpp builds `llama-server`; `cmake
--build WORKDIR/build-no-amx --target llama-bench` adds this, seconds), llama.cpp's own bare decode (`llama-bench -p 0
-n 64 -d 0,CONTEXT`, flash attention off and on, its better one per context) runs in the same run, after edgevlm's,
as the baseline: its tok/s, edgevlm's tok/s ÷ its tok/s, and its whole-file bytes × tok/s (an upper bound of what it
reads a second: the token embedding rows are gathered, not read).

The table: per cache and context, the step's time, the GB/s each part achieves and that as a share of the
bandwidth measured by --threads processes. Not in CI (a measurement, ~1 minute on 2 cores). Run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

DEFAULT_PACKAGE = "/tmp/edgevlm-bench/smolvlm-256m-random-int4"  # benchmarks/serve_bench.py's default


def _sum_worker(nbytes: int, start, done) -> None:
    data = np.ones(nbytes // 8, np.int64)
    data.sum()
    start.wait()
    t = time.perf_counter()
    data.sum()
    done.put(time.perf_counter() - t)


def read_bandwidth(processes: int, nbytes: int = 256 * 2**20) -> float:
    """GB/s read by `processes` processes each summing its own `nbytes` array at once (median of 5)."""
    ctx = multiprocessing.get_context("spawn")
    rates = []
    for _ in range(5):
        start, done = ctx.Barrier(processes + 1), ctx.Queue()
        workers = [ctx.Process(target=_sum_worker, args=(nbytes, start, done)) for _ in range(processes)]
        for w in workers:
            w.start()
        start.wait()
        seconds = max(done.get() for _ in workers)
        for w in workers:
            w.join()
        rates.append(processes * nbytes / seconds / 1e9)
    return statistics.median(rates)


def weight_bytes(model_path: Path) -> int:
    """Bytes MatMulNBits reads a step in onnxruntime's packed layout for accuracy level 4: N × K × bits / 8 of
    values, and per block a float32 scale and a float32 block sum."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    total = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n, k, bits, block = attrs["N"], attrs["K"], attrs.get("bits", 4), attrs["block_size"]
        blocks = -(-k // block)
        total += n * blocks * block * bits // 8 + n * blocks * 8
    return total


class Decoder:
    """One decoder graph's session at batch 1, its KV buffers shared as past and present."""

    def __init__(self, engine, path: Path, capacity: int, threads: int, profile: str | None = None):
        import onnxruntime as ort

        from edgevlm.runtime.engine import shared_kv_binding

        options = engine._session_options(threads)
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = profile
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        shape = (1, engine.kv_heads, capacity, engine.head_dim)
        dtype = engine._kv_dtype
        make = (lambda: rng.integers(-60, 60, shape, dtype=np.int8)) if dtype == np.int8 else \
            (lambda: (rng.standard_normal(shape) * 0.5).astype(dtype))
        self.keys = [ort.OrtValue.ortvalue_from_numpy(make()) for _ in range(engine.num_layers)]
        self.values = [ort.OrtValue.ortvalue_from_numpy(make()) for _ in range(engine.num_layers)]
        self.binding = shared_kv_binding(self.session, self.keys, self.values)
        self.binding.bind_output("logits")
        self.binding.bind_cpu_input("inputs_embeds", (rng.standard_normal((1, 1, engine.package.text["hidden_size"])) * 0.05)
                                    .astype(np.float32))

    def steps(self, context: int, count: int) -> float:
        """Median seconds of `count` steps at `context` cached positions (each writes position `context`)."""
        self.binding.bind_cpu_input("seqlens_k", np.array([context], np.int32))
        self.binding.bind_cpu_input("total_sequence_length", np.array(context + 1, np.int32))
        times = []
        for _ in range(count):
            t = time.perf_counter()
            self.session.run_with_iobinding(self.binding)
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def profile_split(decoder: Decoder, context: int, count: int) -> dict[str, float]:
    """Seconds a step spends in MatMulNBits, GroupQueryAttention and the rest (profiled, median op totals)."""
    decoder.steps(context, count + 1)
    trace = json.loads(Path(decoder.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace
                  if e.get("cat") == "Session" and e["name"] == "model_run")
    warm_end = runs[0][1]  # the first step (arena growth) is left out
    parts = {"weights": 0.0, "attention": 0.0, "other": 0.0}
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warm_end:
            op = event["args"]["op_name"]
            part = "weights" if op == "MatMulNBits" else "attention" if op == "GroupQueryAttention" else "other"
            parts[part] += event["dur"] * 1e-6
    return {k: v / (len(runs) - 1) for k, v in parts.items()}


def llama_bench(binary: str, gguf: str, contexts: list[int], threads: int, rounds: int) -> dict[int, float]:
    """llama.cpp's bare decode tok/s at each context (64 tokens after `context` cached ones), the better of flash
    attention off and on."""
    cmd = [binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", "64", "-r", str(rounds), "-fa", "0,1",
           "-d", ",".join(str(c) for c in contexts), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    best: dict[int, float] = {}
    for row in json.loads(out):
        best[row["n_depth"]] = max(best.get(row["n_depth"], 0.0), float(row["avg_ts"]))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default=DEFAULT_PACKAGE, help="an int4 (fused decoder) edgevlm package")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 2000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary: its decode as the baseline")
    parser.add_argument("--gguf", help="the GGUF for --llama-bench (the same checkpoint, e.g. Q4_0)")
    args = parser.parse_args()
    if bool(args.llama_bench) != bool(args.gguf):
        parser.error("--llama-bench and --gguf go together")

    from edgevlm.runtime.engine import Engine
    from edgevlm.runtime.package import ModelPackage

    package = ModelPackage.load(args.package, verify=False)
    decoder_entry = package.graph("decoder")
    caches = ["int8", "float32"] if "kv_int8" in decoder_entry else ["float32"]
    capacity = max(args.contexts) + 64
    one = read_bandwidth(1)
    many = read_bandwidth(args.threads)
    print(f"read bandwidth: 1 process {one:.1f} GB/s, {args.threads} processes {many:.1f} GB/s", file=sys.stderr)

    rows = []
    for cache in caches:
        engine = Engine(package, threads=args.threads, defer_vision=True, int8_prefill=False, kv_cache=cache)
        path = package.path / (decoder_entry["kv_int8"]["file"] if cache == "int8" else decoder_entry["file"])
        wbytes = weight_bytes(path)
        item = engine._kv_dtype.itemsize
        timed = Decoder(engine, path, capacity, args.threads)
        rounds = {c: [] for c in args.contexts}
        for _ in range(args.rounds):  # contexts interleaved within each round
            for c in args.contexts:
                rounds[c].append(timed.steps(c, args.steps))
        with tempfile.TemporaryDirectory() as tmp:
            splits = {c: profile_split(Decoder(engine, path, capacity, args.threads, f"{tmp}/p{c}"), c, args.steps)
                      for c in args.contexts}
            longest = max(args.contexts)
            single = profile_split(Decoder(engine, path, capacity, 1, f"{tmp}/single"), longest, args.steps)
        for c in args.contexts:
            step = statistics.median(rounds[c])
            kv = engine.num_layers * 2 * engine.kv_heads * c * engine.head_dim * item
            split = splits[c]
            rows.append({"cache": cache, "context": c, "step_ms": step * 1e3, "weights_mb": wbytes / 1e6,
                         "kv_mb": kv / 1e6, "weights_ms": split["weights"] * 1e3,
                         "attention_ms": split["attention"] * 1e3, "other_ms": split["other"] * 1e3,
                         "weights_gbs": wbytes / split["weights"] / 1e9,
                         "kv_gbs": kv / split["attention"] / 1e9 if split["attention"] else 0.0,
                         "step_gbs": (wbytes + kv) / step / 1e9,
                         "attention_1thread_ms": single["attention"] * 1e3 if c == longest else None,
                         "weights_1thread_ms": single["weights"] * 1e3 if c == longest else None})
        print(f"{cache}: done", file=sys.stderr)
    llama = llama_bench(args.llama_bench, args.gguf, args.contexts, args.threads, args.rounds) \
        if args.llama_bench else {}

    lines = [f"`python benchmarks/decode_roofline.py` ({time.strftime('%Y-%m-%d %H:%M')}): {package.path.name}, "
             f"{args.threads} threads, batch 1, median of {args.rounds} rounds × {args.steps} steps. Read bandwidth "
             f"(numpy sum of 256 MB, median of 5): 1 process {one:.1f} GB/s, {args.threads} processes "
             f"{many:.1f} GB/s. Op times from onnxruntime's profiler (a separate session: it adds a few µs a node, "
             "so they sum to more than the step); the step, its GB/s and the extra KV bytes over the extra time "
             "against the first context are unprofiled.", "",
             "| KV cache | context | step (ms) | tok/s | ÷ first context | weights MB | KV MB | MatMulNBits ms "
             f"(GB/s, of {many:.0f}) | GroupQueryAttention ms (GB/s) | other ops ms | whole step GB/s | "
             "extra KV ÷ extra time (GB/s) | MatMulNBits, 1 thread ms (GB/s) | attention, 1 thread ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    first, first_kv = {}, {}
    for r in rows:
        first.setdefault(r["cache"], r["step_ms"])
        first_kv.setdefault(r["cache"], r["kv_mb"])
        extra = r["step_ms"] - first[r["cache"]]
        marginal = f"{(r['kv_mb'] - first_kv[r['cache']]) / extra:.1f}" if extra > 0 else "–"
        single = f"{r['attention_1thread_ms']:.2f}" if r["attention_1thread_ms"] is not None else "–"
        single_w = (f"{r['weights_1thread_ms']:.2f} ({r['weights_mb'] / r['weights_1thread_ms']:.1f})"
                    if r["weights_1thread_ms"] is not None else "–")
        lines.append(
            f"| {r['cache']} | {r['context']:,} | {r['step_ms']:.2f} | {1e3 / r['step_ms']:.0f} | "
            f"{first[r['cache']] / r['step_ms']:.2f} | {r['weights_mb']:.1f} | {r['kv_mb']:.1f} | "
            f"{r['weights_ms']:.2f} ({r['weights_gbs']:.1f}, {r['weights_gbs'] / many:.0%}) | "
            f"{r['attention_ms']:.2f} ({r['kv_gbs']:.1f}) | {r['other_ms']:.2f} | {r['step_gbs']:.1f} | {marginal} | "
            f"{single_w} | {single} |")
    if llama:
        size = Path(args.gguf).stat().st_size
        lines += ["", f"llama.cpp baseline, same run (`llama-bench -p 0 -n 64 -t {args.threads} -r {args.rounds}`, "
                  f"{Path(args.gguf).name}, {size / 1e6:.1f} MB; the better of -fa 0 / 1):", "",
                  "| context | llama.cpp tok/s | ÷ its first context | file MB × tok/s (GB/s, upper bound) | "
                  + " | ".join(f"edgevlm {c} KV ÷ llama.cpp" for c in caches) + " |",
                  "|---:|---:|---:|---:|" + "---:|" * len(caches)]
        base = llama[args.contexts[0]]
        for c in args.contexts:
            ratios = [next(f"{1e3 / r['step_ms'] / llama[c]:.2f}×" for r in rows
                           if r["cache"] == cache and r["context"] == c) for cache in caches]
            lines.append(f"| {c:,} | {llama[c]:.1f} | {llama[c] / base:.2f} | {size * llama[c] / 1e9:.1f} | "
                         + " | ".join(ratios) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
