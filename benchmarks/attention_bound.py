"""What a decode-attention kernel could do on this CPU: onnxruntime's GroupQueryAttention against a small C kernel.

    python benchmarks/attention_bound.py                  # SmolVLM-256M's attention shape, contexts 64 / 1,140 / 2,000
    python benchmarks/attention_bound.py --contexts 512 4000 --output table.md

A decode step at long context spends most of its extra time in GroupQueryAttention over the int8 KV cache
(benchmarks/decode_roofline.py: ~4 GB/s, compute-bound). This measures, in one run and on the same int8 cache
(30 layers, 9 query heads, 3 KV heads, head dim 64, per-channel steps, random values), one decode position's
attention for all layers:
- the baseline: onnxruntime's CPU GroupQueryAttention as the int4 packages' int8-cache decoder graph calls it
  (`k_quant_type` / `v_quant_type` PER_CHANNEL, 8 bits, rotary inside, the cache shared as past and present through
  IOBinding), 30 nodes in one graph, on 1 and on 2 threads;
- a plain C kernel (below; AVX-512F intrinsics, compiled here with `cc -O3 -march=native -ffast-math`): for each
  KV head it reads every key once for its 3 query heads (the per-channel key steps folded into the queries; 4
  positions' dot products reduced together; software prefetch 64 positions ahead), a softmax, then every value
  once, on 1 thread or 2 (the positions split in halves, the partial softmaxes merged), its output checked against
  a float64 numpy reference. It does not apply rotary or store the new position's key and value (the baseline does
  both: ~1% of the bytes at these sizes).

--sets independent caches (default 8: 190 MB at 2,000 positions) are used in turn, so that each run reads its
cache from memory as a decode step does (its weights pass through the caches between two layers' attention), not
from the last level cache; `--sets 1` gives the warm-cache figures.

It is a measurement of the bound, not part of edgevlm: onnxruntime runs no such kernel, and adding one to the runtime
means a native custom-op library (benchmarks/RESULTS.md, step 11 seventh session). Needs a C compiler; on a CPU
without AVX-512F only the baseline runs. Not in CI.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64  # SmolVLM-256M's text model
SCALE = HEAD_DIM ** -0.5

KERNEL = r"""
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#define D 64
#define G 3
#ifndef PREFETCH
#define PREFETCH 64  /* positions ahead (64 bytes each) */
#endif

static inline void load64(const int8_t *p, __m512 f[4]) {
    __m512i b = _mm512_loadu_si512((const void *)p);
    f[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(b)));
    f[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 1)));
    f[2] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 2)));
    f[3] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 3)));
}

/* Positions [t0, t1) of one layer: per query head the partial max m, sum l and unnormalised output acc. */
static void part(const float *q, const int8_t *K, const int8_t *V, const float *ks, int kv, int cap, int t0, int t1,
                 float scale, float *m, float *l, float *acc, float *scores) {
    int n = t1 - t0;
    for (int h = 0; h < kv; h++) {
        const int8_t *Kh = K + (size_t)h * cap * D, *Vh = V + (size_t)h * cap * D;
        __m512 qs[G][4];
        for (int g = 0; g < G; g++)
            for (int j = 0; j < 4; j++)
                qs[g][j] = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(q + (h * G + g) * D + 16 * j),
                                                       _mm512_loadu_ps(ks + h * D + 16 * j)), _mm512_set1_ps(scale));
        float mx[G] = {-FLT_MAX, -FLT_MAX, -FLT_MAX};
        int t = 0;
        for (; t + 4 <= n; t += 4) {  /* 4 positions at a time: their 4 dot products reduced together */
            __m512 a[G][4];
            _mm_prefetch((const char *)(Kh + (size_t)(t0 + t + PREFETCH) * D), _MM_HINT_T0);
            _mm_prefetch((const char *)(Kh + (size_t)(t0 + t + PREFETCH + 1) * D), _MM_HINT_T0);
            _mm_prefetch((const char *)(Kh + (size_t)(t0 + t + PREFETCH + 2) * D), _MM_HINT_T0);
            _mm_prefetch((const char *)(Kh + (size_t)(t0 + t + PREFETCH + 3) * D), _MM_HINT_T0);
            for (int u = 0; u < 4; u++) {
                __m512 k[4];
                load64(Kh + (size_t)(t0 + t + u) * D, k);
                for (int g = 0; g < G; g++) {
                    __m512 x = _mm512_mul_ps(qs[g][0], k[0]);
                    for (int j = 1; j < 4; j++) x = _mm512_fmadd_ps(qs[g][j], k[j], x);
                    a[g][u] = x;
                }
            }
            for (int g = 0; g < G; g++) {
                __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(a[g][0], a[g][1]), _mm512_unpackhi_ps(a[g][0], a[g][1]));
                __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(a[g][2], a[g][3]), _mm512_unpackhi_ps(a[g][2], a[g][3]));
                __m512 y = _mm512_add_ps(_mm512_shuffle_ps(x01, x23, 0x44), _mm512_shuffle_ps(x01, x23, 0xEE));
                __m128 z = _mm_add_ps(_mm_add_ps(_mm512_castps512_ps128(y), _mm512_extractf32x4_ps(y, 1)),
                                      _mm_add_ps(_mm512_extractf32x4_ps(y, 2), _mm512_extractf32x4_ps(y, 3)));
                /* z holds positions t, t+1, t+2, t+3 in the order unpack/shuffle leave them: 0, 1, 2, 3 */
                float r[4];
                _mm_storeu_ps(r, z);
                for (int u = 0; u < 4; u++) {
                    scores[g * n + t + u] = r[u];
                    mx[g] = r[u] > mx[g] ? r[u] : mx[g];
                }
            }
        }
        for (; t < n; t++) {
            __m512 k[4];
            load64(Kh + (size_t)(t0 + t) * D, k);
            for (int g = 0; g < G; g++) {
                __m512 x = _mm512_mul_ps(qs[g][0], k[0]);
                for (int j = 1; j < 4; j++) x = _mm512_fmadd_ps(qs[g][j], k[j], x);
                float v = _mm512_reduce_add_ps(x);
                scores[g * n + t] = v;
                mx[g] = v > mx[g] ? v : mx[g];
            }
        }
        float sum[G] = {0, 0, 0};
        for (int g = 0; g < G; g++)
            for (int t = 0; t < n; t++) {
                float e = expf(scores[g * n + t] - mx[g]);
                scores[g * n + t] = e;
                sum[g] += e;
            }
        __m512 ac[G][4];
        for (int g = 0; g < G; g++) for (int j = 0; j < 4; j++) ac[g][j] = _mm512_setzero_ps();
        for (int t = 0; t < n; t++) {
            __m512 v[4];
            _mm_prefetch((const char *)(Vh + (size_t)(t0 + t + PREFETCH) * D), _MM_HINT_T0);
            load64(Vh + (size_t)(t0 + t) * D, v);
            for (int g = 0; g < G; g++) {
                __m512 p = _mm512_set1_ps(scores[g * n + t]);
                for (int j = 0; j < 4; j++) ac[g][j] = _mm512_fmadd_ps(p, v[j], ac[g][j]);
            }
        }
        for (int g = 0; g < G; g++) {
            m[h * G + g] = mx[g];
            l[h * G + g] = sum[g];
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(acc + (h * G + g) * D + 16 * j, ac[g][j]);
        }
    }
}

typedef struct {
    int layers, kv, cap, t0, t1;
    const float *q, *ks;
    const int8_t *const *K, *const *V;
    float scale, *m, *l, *acc, *scores;
} job_t;

static void *run_job(void *arg) {
    job_t *j = arg;
    int h = j->kv * G;
    for (int i = 0; i < j->layers; i++)
        part(j->q, j->K[i], j->V[i], j->ks + i * j->kv * D, j->kv, j->cap, j->t0, j->t1, j->scale,
             j->m + i * h, j->l + i * h, j->acc + (size_t)i * h * D, j->scores);
    return 0;
}

/* Every layer's attention of one query q [H, D] (the same for each layer: a measurement) over T positions of
   K[layer], V[layer] ([kv, cap, D] int8, steps ks / vs [layers, kv, D]); out [layers, H, D]; work: scratch. */
int attend(int layers, const float *q, const int8_t *const *K, const int8_t *const *V, const float *ks,
           const float *vs, int kv, int cap, int T, float scale, float *out, float *work, int threads) {
    int h = kv * G;
    job_t jobs[2];
    float *base = work;
    if (threads < 1 || threads > 2) return -1;
    for (int i = 0; i < threads; i++) {
        int t0 = T * i / threads, t1 = T * (i + 1) / threads;
        jobs[i] = (job_t){layers, kv, cap, t0, t1, q, ks, K, V, scale, base, base + layers * h,
                          base + 2 * layers * h, base + 2 * layers * h + (size_t)layers * h * D};
        base += 2 * layers * h + (size_t)layers * h * D + G * T;
    }
    pthread_t other;
    if (threads == 2 && pthread_create(&other, 0, run_job, &jobs[1]) != 0) return -2;
    run_job(&jobs[0]);
    if (threads == 2) pthread_join(other, 0);
    for (int i = 0; i < layers; i++)
        for (int x = 0; x < h; x++) {
            float M = -FLT_MAX, S = 0, o[D];
            memset(o, 0, sizeof o);
            for (int p = 0; p < threads; p++) M = fmaxf(M, jobs[p].m[i * h + x]);
            for (int p = 0; p < threads; p++) {
                float w = expf(jobs[p].m[i * h + x] - M);
                S += w * jobs[p].l[i * h + x];
                for (int c = 0; c < D; c++) o[c] += w * jobs[p].acc[((size_t)i * h + x) * D + c];
            }
            for (int c = 0; c < D; c++) out[((size_t)i * h + x) * D + c] = o[c] * vs[(i * kv + x / G) * D + c] / S;
        }
    return 0;
}
"""


def build_kernel(workdir: Path):
    """Compile KERNEL (cc -O3 -march=native) → its `attend` function, or None (no compiler / no AVX-512F)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx512f" not in flags:
        print("this CPU has no AVX-512F: the C kernel is not measured", file=sys.stderr)
        return None
    source, library = workdir / "attend.c", workdir / "libattend.so"
    source.write_text(KERNEL)
    cc = os.environ.get("CC", "cc")
    try:
        subprocess.run([cc, "-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-o", str(library), str(source), "-lm",
                        "-lpthread"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"cannot compile the C kernel ({cc}): {getattr(exc, 'stderr', exc)}", file=sys.stderr)
        return None
    attend = ctypes.CDLL(str(library)).attend
    p = ctypes.c_void_p
    attend.argtypes = [ctypes.c_int, p, p, p, p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, p, p,
                       ctypes.c_int]
    attend.restype = ctypes.c_int
    return attend


def gqa_model(capacity: int) -> bytes:
    """30 GroupQueryAttention nodes as the int8-cache decoder graph has them (export/kv_int8.py), one graph."""
    from onnx import TensorProto, helper, numpy_helper

    inv = 1.0 / (100000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    angles = np.arange(capacity + 1)[:, None] * inv[None]
    inits = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs, nodes = [], []
    shape = [1, KV_HEADS, capacity, HEAD_DIM]
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{layer}.{kind}", TensorProto.INT8, shape))
            outputs.append(helper.make_tensor_value_info(f"present.{layer}.{kind}", TensorProto.INT8, shape))
            inits.append(numpy_helper.from_array(np.full((1, KV_HEADS, 1, HEAD_DIM), 0.02, np.float32),
                                                 f"step.{layer}.{kind}"))
        outputs.append(helper.make_tensor_value_info(f"out.{layer}", TensorProto.FLOAT, None))
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            ["qkv", "", "", f"past.{layer}.key", f"past.{layer}.value", "seqlens_k", "total_sequence_length", "cos",
             "sin", "", "", "", f"step.{layer}.key", f"step.{layer}.value"],
            [f"out.{layer}", f"present.{layer}.key", f"present.{layer}.value"], domain="com.microsoft",
            num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1, local_window_size=-1, rotary_interleaved=0,
            scale=SCALE, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


class Baseline:
    """The GroupQueryAttention graph on `threads` threads, each cache set bound as past and present (its new
    position is written at index `context`, which no measured read of the C kernel covers)."""

    def __init__(self, model: bytes, sets, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1)
        qkv = rng.standard_normal((1, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32)
        self.bindings, self._values = [], []
        for keys, values in sets:
            binding = self.session.io_binding()
            for layer in range(LAYERS):
                for kind, array in (("key", keys[layer]), ("value", values[layer])):
                    value = ort.OrtValue.ortvalue_from_numpy(array)
                    self._values.append(value)
                    binding.bind_ortvalue_input(f"past.{layer}.{kind}", value)
                    binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)
                binding.bind_output(f"out.{layer}")
            binding.bind_cpu_input("qkv", qkv)
            self.bindings.append(binding)
        self.turn = 0

    def run(self, context: int) -> None:
        binding = self.bindings[self.turn]
        self.turn = (self.turn + 1) % len(self.bindings)
        binding.bind_cpu_input("seqlens_k", np.array([context], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(context + 1, np.int32))
        self.session.run_with_iobinding(binding)


def reference(q, keys, values, ks, vs, layer: int, context: int) -> np.ndarray:
    """float64 attention of q [H, D] over the first `context` positions of one layer's int8 cache."""
    out = np.zeros((HEADS, HEAD_DIM))
    for head in range(HEADS):
        kv = head // (HEADS // KV_HEADS)
        k = keys[layer][0, kv, :context].astype(np.float64) * ks[layer, kv]
        v = values[layer][0, kv, :context].astype(np.float64) * vs[layer, kv]
        s = k @ q[head] * SCALE
        p = np.exp(s - s.max())
        out[head] = (p / p.sum()) @ v
    return out


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 1140, 2000])
    parser.add_argument("--repeats", type=int, default=25, help="runs per figure (median)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the engines interleaved in each")
    parser.add_argument("--sets", type=int, default=8, help="independent caches, used in turn, so that a run reads "
                        "its cache from memory and not from the last level cache (8 × 23 MB at 2,000 positions)")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()

    capacity = max(args.contexts) + 64
    rng = np.random.default_rng(0)
    shape = (1, KV_HEADS, capacity, HEAD_DIM)
    sets = [([rng.integers(-127, 128, shape, dtype=np.int8) for _ in range(LAYERS)],
             [rng.integers(-127, 128, shape, dtype=np.int8) for _ in range(LAYERS)]) for _ in range(args.sets)]
    keys, values = sets[0]
    ks = (rng.random((LAYERS, KV_HEADS, HEAD_DIM)) * 0.05 + 0.01).astype(np.float32)
    vs = (rng.random((LAYERS, KV_HEADS, HEAD_DIM)) * 0.05 + 0.01).astype(np.float32)
    q = rng.standard_normal((HEADS, HEAD_DIM)).astype(np.float32)
    model = gqa_model(capacity)
    baselines = {t: Baseline(model, sets, t) for t in (1, 2)}
    out = np.zeros((LAYERS, HEADS, HEAD_DIM), np.float32)
    work = np.zeros(2 * (2 * LAYERS * HEADS + LAYERS * HEADS * HEAD_DIM + 3 * capacity), np.float32)
    pointers = [((ctypes.c_void_p * LAYERS)(*[k.ctypes.data for k in ks_]),
                 (ctypes.c_void_p * LAYERS)(*[v.ctypes.data for v in vs_])) for ks_, vs_ in sets]
    turn = [0]

    with tempfile.TemporaryDirectory() as tmp:
        attend = build_kernel(Path(tmp))

        def kernel(context: int, threads: int, which: int | None = None) -> None:
            if which is None:
                which = turn[0] = (turn[0] + 1) % len(pointers)
            key_ptrs, value_ptrs = pointers[which]
            if attend(LAYERS, q.ctypes.data, key_ptrs, value_ptrs, ks.ctypes.data, vs.ctypes.data, KV_HEADS,
                      capacity, context, SCALE, out.ctypes.data, work.ctypes.data, threads) != 0:
                raise RuntimeError("the C kernel failed")

        errors = {}
        if attend is not None:
            for context in args.contexts:
                for threads in (1, 2):
                    kernel(context, threads, 0)
                    errors[context, threads] = max(
                        float(np.abs(out[layer] - reference(q, keys, values, ks, vs, layer, context)).max())
                        for layer in (0, LAYERS // 2, LAYERS - 1))
        figures: dict[tuple, list[float]] = {}
        for _ in range(args.rounds):
            for context in args.contexts:
                for threads in (1, 2):
                    figures.setdefault(("ort", context, threads), []).append(
                        median_ms(lambda: baselines[threads].run(context), args.repeats))
                    if attend is not None:
                        figures.setdefault(("c", context, threads), []).append(
                            median_ms(lambda: kernel(context, threads), args.repeats))

    lines = [f"`python benchmarks/attention_bound.py` ({time.strftime('%Y-%m-%d %H:%M')}): one decode position's "
             f"attention, all {LAYERS} layers ({HEADS} query heads, {KV_HEADS} KV heads, head dim {HEAD_DIM}), "
             f"int8 cache, {args.sets} cache sets used in turn, medians of {args.rounds} interleaved rounds × "
             f"{args.repeats} runs.", "",
             "| context | cache MB | GroupQueryAttention 1 thread ms (GB/s) | 2 threads ms (GB/s) | "
             "C kernel 1 thread ms (GB/s) | 2 threads ms (GB/s) | C ÷ GroupQueryAttention, 2 threads | "
             "C kernel max error vs float64 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for context in args.contexts:
        mb = LAYERS * 2 * KV_HEADS * context * HEAD_DIM / 1e6

        def cell(kind, threads):
            found = figures.get((kind, context, threads))
            if not found:
                return "–"
            ms = statistics.median(found)
            return f"{ms:.2f} ({mb / ms:.1f})"

        ratio = "–"
        if ("c", context, 2) in figures:
            ratio = (f"{statistics.median(figures['ort', context, 2]) / statistics.median(figures['c', context, 2]):.1f}"
                     "× faster")
        error = f"{max(errors[context, 1], errors[context, 2]):.1e}" if errors else "–"
        lines.append(f"| {context:,} | {mb:.1f} | {cell('ort', 1)} | {cell('ort', 2)} | {cell('c', 1)} | "
                     f"{cell('c', 2)} | {ratio} | {error} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
