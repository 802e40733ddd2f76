"""Quantize a package's fp32 ONNX graphs: int8, int4 (weight-only) and fp16, one graph file at a time.

Every function here reads one fp32 graph (with its external data, if any) and writes one quantized graph with the
same input and output names; input and output dtypes stay the same too, except the decoder's KV cache in fp16 mode
(see `QuantReport.kv_dtype`). Each call returns a `QuantReport`: what was quantized, what stayed in float and why,
bytes before and after, and which onnxruntime contrib ops the new graph needs.

Modes (`quantize_graph(src, dst, mode, graph=...)`):

- ``int8``: every MatMul with a constant weight is quantized (Gemm is first rewritten to MatMul + Add, since
  neither quantizer handles Gemm). Two methods (`QuantOptions.int8_method`), chosen per graph by default:
  * decoder (and any other graph): weight-only 8-bit `MatMulNBits` (block 32, symmetric, accuracy_level 4).
    Measured on SmolLM2-135M's real weights: perplexity 19.48 (fp32) → 19.58, where `quantize_dynamic` gives 35.6
    (its one activation scale per tensor cannot hold the outlier channels entering down_proj); decode speed is the
    same for both.
  * vision encoder: dynamic int8 (`onnxruntime.quantization.quantize_dynamic`, QInt8 weights per channel,
    MatMulInteger, fused at load to MatMulIntegerToFloat): a 512×512 tile runs ~1.8x faster than fp32, where
    MatMulNBits runs compute-bound work at fp32 speed. The patch-embedding Conv stays float (<1% of the compute).
  In the ``embed_tokens`` graph the table becomes int8 with one scale per row (plain ONNX: Gather, Gather, Cast,
  Mul), whatever the method.
- ``int4``: weight-only 4-bit `MatMulNBits` (block 64, symmetric, accuracy_level 4: int8 activations inside the
  kernel); the decoder's output projection (lm_head) is 8-bit (`int4_output_bits`). A decoder in a package (as
  `export_package` quantizes it, beside its fp32 graphs) is quantized by GPTQ with act order, calibrated on that
  fp32 package (export/int4_search.py; `int4_algorithm="auto"`); a lone graph file, or a decoder whose GPTQ
  Hessians would exceed `gptq_memory_bytes` (the 2B-and-larger ones), by round to nearest at block 32. Measured on
  SmolLM2-135M's real text weights (benchmarks/QUALITY.md, "int4 plans" rounds 2-3): text top-1 agreement with
  fp32 87.0% (held-out 89.1%), KL 0.066, where round to nearest at block 32 gave 58%, KL 0.51; block 64 decodes
  ~8% faster than block 32 (fewer per-block scale and sum bytes read per token). Measured and not taken: a 4-bit
  lm_head (+10% decode, −5 to −11 points), block 128 (−21 points with a 4-bit lm_head), asymmetric blocks, HQQ
  (float zero points take MatMulNBits off its int8 kernels: ~13x slower decode). In the ``embed_tokens`` graph the
  table becomes a 4-bit `GatherBlockQuantized` (block 32, symmetric; the graph's opset becomes 21 for the int4
  tensor type), unless it is tied to the lm_head (below).
- ``fp16``: float16 weights and compute (`onnxruntime.transformers.float16`), float32 kept at the graph boundary
  (pixel_values, image_features, inputs_embeds, logits), and float32 kept for RMSNorm's mean of squares (x²
  overflows float16 past |x| = 256) and for position/mask/index arithmetic (rotary angles, attention masks,
  Idefics3's patch position buckets), whose float32 results are clipped to ±65504 where they meet float16. The
  decoder's KV cache becomes float16 (`QuantReport.kv_dtype`; `QuantOptions.fp16_kv_dtype="float32"` keeps it).
- ``fp32``: an unchanged copy (for plans that keep a graph in full precision).

In int8 and int4 graphs, float32 block scales, patch Convs and position tables are stored as float16 and Cast back
at load (`_store_float_weights_fp16`: −8.4 MB of SmolVLM-256M's int4 decoder, −2.8 MB of its vision file). When the
checkpoint ties lm_head to the embedding table, `quantize_package_graphs` stores the table once: the embed_tokens
graph reads the decoder's 8-bit lm_head blocks (export/tied.py).

`PLANS` gives the default per-graph plan for a package-level choice (``--quant int4`` → decoder int4, embeddings and
vision int8), and `quantize_package_graphs` applies a plan to a folder of graphs.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .convert import EXTERNAL_DATA_THRESHOLD, GRAPH_FILES

PROTOBUF_LIMIT = 2 * 1024**3

MODES = ("fp32", "int8", "int4", "fp16")
# Default per-graph modes for a package-level quantization choice. Vision towers lose more from 4-bit weights than
# decoders do, so the vision graph stays int8 in the int4 plan. The embedding table is 4-bit there (as llama.cpp's
# Q4_0 does): −13 MB at SmolVLM-256M's size, and on SmolLM2-135M's real weights the int4 package's text top-1
# agreement with fp32 was 57.3% with it against 58.8% with int8 rows, KL 0.49 against 0.51 (benchmarks/QUALITY.md):
# the 4-bit decoder's error, not the table's. A tied table (lm_head = embeddings) is shared with the lm_head's
# 8-bit blocks instead (export/tied.py).
PLANS: dict[str, dict[str, str]] = {
    "fp32": {"vision_encoder": "fp32", "embed_tokens": "fp32", "decoder": "fp32"},
    "int8": {"vision_encoder": "int8", "embed_tokens": "int8", "decoder": "int8"},
    "int4": {"vision_encoder": "int8", "embed_tokens": "int4", "decoder": "int4"},
    "fp16": {"vision_encoder": "fp16", "embed_tokens": "fp16", "decoder": "fp16"},
}

_FLOAT_TYPES = (1, 10, 16)  # TensorProto FLOAT, FLOAT16, BFLOAT16
_LINEAR_OPS = ("MatMul", "Gemm", "Conv")


class QuantizationError(Exception):
    """A problem the caller should show as one line (unknown mode, not enough disk space, graph I/O changed)."""


@dataclass
class QuantOptions:
    """Knobs for each mode; the defaults are the measured choices (see the module docstring)."""

    # int8 method, per graph when None: "dynamic" for the vision encoder, "matmulnbits" for the rest.
    # "matmulnbits" = weight-only 8-bit MatMulNBits (block-wise scales; with accuracy_level 4 the activations are
    # quantized per block of 32 inside the kernel): on SmolLM2-135M's real weights perplexity 19.48 → 19.58, where
    # quantize_dynamic's single activation scale per tensor loses the outlier channels (→ 35.6). Same decode speed.
    # "dynamic" = onnxruntime quantize_dynamic (MatMulInteger): ~1.8x faster than fp32 on compute-bound work
    # (a 1,024-patch vision tile, long prefills), where MatMulNBits runs at fp32 speed.
    int8_method: str | None = None
    # quantize_dynamic settings (int8_method="dynamic"). QInt8 weights use onnxruntime's u8s8 kernels (VNNI/AMX
    # where the CPU has them); per channel keeps one scale per output column at no run-time cost.
    int8_weight_type: str = "QInt8"  # or "QUInt8"
    int8_per_channel: bool = True
    int8_reduce_range: bool = False  # 7-bit weights: avoids u8s8 saturation on AVX2-without-VNNI CPUs
    int8_conv: bool = False  # the vision patch embedding (Conv) as ConvInteger
    # MatMulNBits settings (int8 with int8_method="matmulnbits"; int4 takes int4_block_size)
    block_size: int = 32
    # int4 MatMulNBits block. A decode step reads every weight once, and MatMulNBits' packed layout for its int8
    # kernels holds a float scale and a float block sum per block: 6 bits a weight at block 32, 5 at block 64
    # (llama.cpp's Q4_0: 4.5). Block 64 decodes ~8% faster than 32 (SmolVLM-256M dimensions, 2 cores) at the same
    # quality once GPTQ places the weights (text top-1 87.0% vs 86.3%, benchmarks/QUALITY.md, round 3).
    # None: 64 where GPTQ runs, 32 with round to nearest (which loses more at 64: benchmarks/QUALITY.md round 3)
    int4_block_size: int | None = None
    symmetric: bool = True
    accuracy_level: int | None = 4  # 4: int8 activations inside the kernel; None/0: float (8-bit: ~10x slower)
    # int4 decoder weights: "rtn" (round to nearest on MatMulNBits' grid: uint4 zero points when asymmetric) or
    # "hqq" (onnxruntime's HQQ: asymmetric, float zero points fitted per block; float activations in the kernel),
    # or calibrated on the fp32 package, same grid and kernel as "rtn" (export/int4_search.py): "search"
    # (importance-weighted scale/zero-point search per block) or "gptq" (Hessian-based error compensation)
    # "auto" (the default): "gptq" for a decoder whose fp32 package is at hand (int4_calibration_package, or the
    # package folder the graph lies in, as in export_package) and whose Hessians fit `gptq_memory_bytes`, "rtn"
    # otherwise (a lone graph file; a model too large) - the report says which one ran and why.
    int4_algorithm: str = "auto"
    # GPTQ holds one float64 [K, K] matrix per distinct MatMul input of the whole decoder at once: 0.8 GB at
    # SmolVLM-256M's size, ~20 GB at Qwen2-VL-2B's (its 8,960-wide down_proj inputs): "auto" stays with "rtn" above
    gptq_memory_bytes: int = 4_000_000_000
    # gptq: quantize the columns in order of decreasing Hessian diagonal (act order; text top-1 79% -> 87%)
    int4_act_order: bool = True
    # gptq: activation-aware input scaling (export/int4_search.py): each MatMul fed by a norm (qkv, gate_up) or by
    # act(gate) * up (down_proj) takes x W = (x / s)(s W), s = rms(x)^alpha per input channel with 1/s folded
    # exactly into the norm's gamma / the up columns, alpha the one of these giving the least output error after
    # GPTQ (0: unscaled). Real SmolLM2-135M text KL vs fp32 0.0665 -> 0.0512 (held-out 0.0740 -> 0.0681); the
    # decoder's GPTQ ~4.7x longer (once per alpha). () turns it off.
    int4_scale_alphas: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    # "rtn": pick each alpha by round to nearest's output error and run GPTQ once (decoder GPTQ ~1.5x instead of
    # ~4.7x; KL 0.0601, held-out 0.0677: benchmarks/QUALITY.md round 4)
    int4_scale_select: str = "gptq"
    # calibrated int4_algorithm: the fp32 package to calibrate on (None: the folder of the graph being quantized)
    int4_calibration_package: str | None = None
    int4_output_bits: int = 8  # bits for the decoder's output projection (lm_head) in int4 mode: 4 or 8
    # int4_output_bits 8: store the lm_head as 4-bit + 4-bit residual and refine the logits of the 4-bit head's top
    # k candidates from both (export/head_refine.py): a decode step reads 4-bit head bytes; 0 keeps the 8-bit head.
    # Not for a tied lm_head (the embedding reads the 8-bit blocks): quantize_package_graphs sets 0 there.
    # Off by default: on real SmolLM2-135M text weights k=32 kept top-1 (89.3%) but doubled KL (0.060 -> 0.130:
    # the tail is 4-bit) for ~4% faster decode (head alone 1.12 -> 0.95 ms) - benchmarks/QUALITY.md round 4.
    int4_output_topk: int = 0
    # int4 mode: MatMul nodes (fnmatch patterns on the node name) quantized to 8 bits instead of 4
    int4_8bit_nodes: tuple[str, ...] = ()
    # embedding tables (Gather on a constant table) in the embed_tokens graph, int4 mode
    embed_int4_block_size: int = 32
    # fp16
    fp16_kv_dtype: str = "float16"  # "float32" keeps the decoder's KV cache inputs/outputs float32
    fp16_keep_norms_fp32: bool = True


@dataclass
class LeftInFloat:
    """A weight-carrying node left in floating point."""

    node: str
    op_type: str
    weight_shape: list[int]
    reason: str


@dataclass
class QuantReport:
    graph: str
    mode: str
    method: str
    src: str
    dst: str
    files: list[str] = field(default_factory=list)  # the output graph file, then its external data file if any
    bytes_before: int = 0
    bytes_after: int = 0
    quantized: dict[str, int] = field(default_factory=dict)  # original op type → how many nodes were quantized
    gemm_rewritten: int = 0  # Gemm nodes rewritten to MatMul (+ Add) before quantizing
    left_in_float: list[LeftInFloat] = field(default_factory=list)
    activation_matmuls: int = 0  # MatMuls of two activations (attention scores, rotary): no weight to quantize
    node_types_before: dict[str, int] = field(default_factory=dict)
    node_types_after: dict[str, int] = field(default_factory=dict)
    contrib_ops: list[str] = field(default_factory=list)  # com.microsoft ops the output needs
    opset: dict[str, int] = field(default_factory=dict)
    kv_dtype: str | None = None  # decoder graphs: dtype of past_key_values.* / present.* in the output
    warnings: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ratio"] = round(self.ratio, 4)
        return out

    def manifest_entry(self) -> dict:
        """What model.json's graphs.<graph> entry should say about this graph's file and quantization."""
        entry = {"file": self.files[0], "quantization": self.mode, "quantization_method": self.method}
        if len(self.files) > 1:
            entry["external_data"] = self.files[1:]
        if self.kv_dtype:
            entry["kv_dtype"] = self.kv_dtype
        if self.contrib_ops:
            entry["contrib_ops"] = list(self.contrib_ops)
        return entry

    def lines(self) -> list[str]:
        done = ", ".join(f"{n} {op}" for op, n in sorted(self.quantized.items())) or "nothing"
        out = [f"{self.graph}: {self.mode} ({self.method}): {self.bytes_before / 1e6:,.1f} MB → "
               f"{self.bytes_after / 1e6:,.1f} MB ({self.ratio:.0%}); quantized {done}"]
        if self.gemm_rewritten:
            out.append(f"  {self.gemm_rewritten} Gemm rewritten to MatMul + Add first")
        for item in self.left_in_float:
            out.append(f"  left in float: {item.op_type} {item.node} {item.weight_shape}: {item.reason}")
        if self.kv_dtype:
            out.append(f"  KV cache dtype: {self.kv_dtype}")
        if self.contrib_ops:
            out.append(f"  needs onnxruntime contrib ops: {', '.join(self.contrib_ops)}")
        out.extend(f"  warning: {w}" for w in self.warnings)
        return out


# --------------------------------------------------------------------------------------------------------------
# public API


def plan_for(quant: str) -> dict[str, str]:
    """The default per-graph modes for a package-level choice (`fp32`, `int8`, `int4`, `fp16`)."""
    if quant not in PLANS:
        raise QuantizationError(f"unknown quantization {quant!r} (choose one of: {', '.join(PLANS)})")
    return dict(PLANS[quant])


def quantize_package_graphs(package_dir: str | Path, out_dir: str | Path, plan: dict[str, str], *,
                            files: dict[str, str] | None = None, options: QuantOptions | None = None,
                            progress=None, share_tied: bool = True) -> dict[str, QuantReport]:
    """Quantize each graph of `package_dir` by `plan` ({graph: mode}) into `out_dir` under the same file name.

    `share_tied`: when the embedding table is the decoder's lm_head (tied weights) and both are quantized, the
    embed_tokens graph reads the lm_head's 8-bit blocks and the package stores the table once (export/tied.py).

    Graph file names come from `files`, else from `package_dir`/model.json's graphs entries, else `GRAPH_FILES`.
    `out_dir` may be `package_dir` (each graph is replaced in place). model.json is not written: use each report's
    `manifest_entry()` (file, external_data, quantization, kv_dtype) and `to_dict()`.
    """
    package_dir, out_dir = Path(package_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if files is None:
        files = dict(GRAPH_FILES)
        manifest = package_dir / "model.json"
        if manifest.is_file():
            import json

            graphs = json.loads(manifest.read_text(encoding="utf-8")).get("graphs", {})
            files.update({name: entry["file"] for name, entry in graphs.items() if "file" in entry})
    unknown = set(plan) - set(files)
    if unknown:
        raise QuantizationError(f"plan names graphs this package does not have: {', '.join(sorted(unknown))}")
    tied = (share_tied and plan.get("embed_tokens") in ("int8", "int4") and plan.get("decoder") in ("int8", "int4")
            and {"embed_tokens", "decoder"} <= set(files))
    if tied:  # decided on the float graphs, before out_dir (which may be package_dir) is overwritten
        from .tied import tied_table

        tied = tied_table(package_dir / files["embed_tokens"], package_dir / files["decoder"])
    reports = {}
    for graph, mode in plan.items():
        if progress:
            progress(f"{graph}: quantizing to {mode}")
        graph_options = options
        if tied and graph == "decoder" and options is not None and options.int4_output_topk:
            graph_options = dataclasses.replace(options, int4_output_topk=0)  # the 8-bit blocks are shared
        reports[graph] = quantize_graph(package_dir / files[graph], out_dir / files[graph], mode, graph=graph,
                                        options=graph_options)
        if progress:
            for line in reports[graph].lines():
                progress(line)
    if tied:
        _share_tied(out_dir, files, reports, progress)
    return reports


def _share_tied(out_dir: Path, files: dict[str, str], reports: dict[str, QuantReport], progress) -> None:
    import onnx

    from .tied import TIED_FILE, share_tied_table

    shared = share_tied_table(out_dir, files["embed_tokens"], files["decoder"])
    if shared is None:
        if progress:
            progress("embed_tokens: tied to lm_head, but the lm_head is not 8-bit MatMulNBits: kept its own table")
        return
    for graph in ("embed_tokens", "decoder"):
        report = reports[graph]
        report.files = [p.name for p in _graph_files(out_dir / files[graph])]
        report.bytes_after = sum((out_dir / name).stat().st_size for name in report.files)
    embed = reports["embed_tokens"]
    model = onnx.load(str(out_dir / files["embed_tokens"]), load_external_data=False)
    embed.quantized = {"Gather": 1}
    embed.left_in_float = []
    embed.node_types_after = _count_ops(model)
    embed.contrib_ops = []
    embed.opset = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    embed.method = (f"reads the decoder's {shared['bits']}-bit lm_head blocks (tied weights, block "
                    f"{shared['block_size']}, stored once in {TIED_FILE}): Gather, Cast, Sub, Mul, Reshape")
    reports["decoder"].method += f"; lm_head's bytes in {TIED_FILE}, shared with embed_tokens"
    if progress:
        progress(f"embed_tokens: tied to lm_head: the table is stored once ({TIED_FILE}, "
                 f"{shared['bytes'] / 1e6:,.1f} MB)")


def quantize_graph(src: str | Path, dst: str | Path, mode: str, *, graph: str | None = None,
                   options: QuantOptions | None = None) -> QuantReport:
    """Write `src` quantized to `mode` as `dst` (may equal `src`); `graph` is the package graph name.

    `graph` picks per-graph behaviour ("embed_tokens": quantize the Gather table; "decoder": KV cache dtype and
    output projection); by default it is guessed from the file name.
    """
    import onnx

    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r} (choose one of: {', '.join(MODES)})")
    options = options or QuantOptions()
    if options.int4_algorithm not in ("auto", "rtn", "hqq", "search", "gptq"):
        raise QuantizationError(f"int4_algorithm must be 'auto', 'rtn', 'hqq', 'search' or 'gptq', "
                                f"not {options.int4_algorithm!r}")
    if options.int8_method not in (None, "matmulnbits", "dynamic"):
        raise QuantizationError(f"int8_method must be 'matmulnbits' or 'dynamic', not {options.int8_method!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise QuantizationError(f"{src}: no such graph file")
    graph = graph or _guess_graph(src)
    int8_method = options.int8_method or ("dynamic" if graph == "vision_encoder" else "matmulnbits")
    src_files = _graph_files(src)
    bytes_before = sum(p.stat().st_size for p in src_files)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _check_space(dst.parent, bytes_before)

    report = QuantReport(graph=graph, mode=mode, method="", src=str(src), dst=str(dst), bytes_before=bytes_before)
    model = onnx.load(str(src), load_external_data=True)
    io_before = _io_signature(model)
    report.node_types_before = _count_ops(model)

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as tmp:
        tmp = Path(tmp)
        if mode == "fp32":
            report.method = "unchanged (float32)"
        elif mode == "fp16":
            model = _to_fp16(model, graph, options, report, tmp)
        elif graph == "embed_tokens":
            model = _quantize_embedding(model, mode, options, report)
        elif mode == "int8" and int8_method == "dynamic":
            model = _to_int8_dynamic(model, graph, options, report, tmp)
        elif mode == "int8":
            model = _to_nbits(model, graph, 8, options, report)
        else:
            model = _to_nbits(model, graph, 4, options, report, source=src)

        expected = dict(io_before)
        if report.kv_dtype:
            expected.update({name: report.kv_dtype for name in io_before if _is_kv(name)})
        io_after = _io_signature(model)
        if io_after != expected:
            changed = sorted(k for k in set(expected) | set(io_after) if expected.get(k) != io_after.get(k))
            raise QuantizationError(f"{graph}: {mode} changed the graph's inputs/outputs: {', '.join(changed)}")
        _describe_result(model, report, options, int8_method)
        if mode in ("int8", "int4"):
            _store_float_weights_fp16(model, report)

        # Write beside the destination first, then move into place: dst may be src (in-place quantization).
        staged = tmp / "out" / dst.name
        staged.parent.mkdir()
        names = _save(model, staged)
        del model
        for old in _graph_files(dst) if dst.exists() else []:
            old.unlink()
        for name in names:
            os.replace(staged.parent / name, dst.parent / name)
    report.files = names
    report.bytes_after = sum((dst.parent / n).stat().st_size for n in names)
    return report


# --------------------------------------------------------------------------------------------------------------
# files


def _guess_graph(path: Path) -> str:
    for name, file in GRAPH_FILES.items():
        if path.name == file:
            return name
    return path.stem


def _graph_files(path: Path) -> list[Path]:
    """The graph file and every external data file it references."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = []
    for tensor in _all_initializers(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in locations:
                    locations.append(entry.value)
    return [path] + [path.parent / loc for loc in locations]


def point_external(tensor, location: str, offset: int, length: int) -> None:
    """Make initializer `tensor` an external reference to `length` bytes at `offset` of file `location` (beside
    the graph), dropping any inline data."""
    import onnx

    for key in ("raw_data", "int32_data", "float_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(key)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.ByteSize():
                yield from _all_initializers(attr.g)
            for sub in attr.graphs:
                yield from _all_initializers(sub)


def _check_space(folder: Path, bytes_before: int) -> None:
    # Staged output (never larger than the input) plus, for int8, the quantizer's own temporary copy.
    needed = int(bytes_before * 2.1) + 64 * 1024**2
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise QuantizationError(f"not enough disk space in {folder}: quantizing needs about {needed / 1e6:,.0f} MB, "
                                f"{free / 1e6:,.0f} MB free")


def _tensor_bytes(model) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in _all_initializers(model.graph))


def _save(model, path: Path) -> list[str]:
    """Save as one file, or with all weights in one `<name>_data` file when the graph would pass 2 GB."""
    import onnx

    external = _tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    if external:
        data_name = path.name + "_data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        names = [path.name, data_name]
    else:
        onnx.save_model(model, str(path))
        names = [path.name]
    size = path.stat().st_size
    if size >= PROTOBUF_LIMIT:
        raise QuantizationError(f"{path.name}: the written graph is {size / 1e9:.2f} GB, over protobuf's 2 GB limit")
    onnx.load(str(path), load_external_data=False)  # readable back (catches a truncated write)
    return names


def _save_for_tool(model, path: Path) -> Path:
    """A temporary copy for tools that take a path (weights always external: any size works)."""
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path


# --------------------------------------------------------------------------------------------------------------
# graph inspection


def _count_ops(model) -> dict[str, int]:
    counts = Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.g.ByteSize():
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return dict(sorted(counts.items()))


def _io_signature(model) -> dict[str, str]:
    import onnx

    out = {}
    for prefix, values in (("in:", model.graph.input), ("out:", model.graph.output)):
        for v in values:
            out[prefix + v.name] = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
    return out


def _is_kv(io_name: str) -> bool:
    name = io_name.split(":", 1)[1]
    return name.startswith(("past_key_values.", "present."))


def _float_initializers(model) -> dict:
    return {t.name: t for t in model.graph.initializer if t.data_type in _FLOAT_TYPES}


def _logits_producer(model, op_types=("MatMul", "Gemm")):
    """The node of `op_types` that produces the `logits` output (lm_head), following only shape/dtype-preserving
    nodes; None when there is none."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits") if any(o.name == "logits" for o in model.graph.output) else None
    for _ in range(4):
        if node is None:
            return None
        if node.op_type in op_types:
            return node
        if node.op_type not in ("Identity", "Cast", "Reshape", "Add"):
            return None
        node = producers.get(node.input[0])
    return None


def _output_projection(model) -> str | None:
    """The name of the MatMul that produces the `logits` output (lm_head)."""
    node = _logits_producer(model)
    return node.name if node is not None else None


def _table_gathers(model) -> list:
    """Gather nodes reading a 2-D float initializer along axis 0: embedding tables."""
    from onnx import helper

    inits = _float_initializers(model)
    tables = []
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if len(inits[node.input[0]].dims) == 2 and axis == 0:
            tables.append(node)
    return tables


def _describe_result(model, report: QuantReport, options: QuantOptions, int8_method: str) -> None:
    """Fill the report's left_in_float, activation_matmuls, node types, contrib ops and opset from the output."""
    inits = _float_initializers(model)
    report.left_in_float = [item for item in report.left_in_float if item.op_type == "Gemm"]  # from the rewrite
    gemm_left = {item.node for item in report.left_in_float}
    report.activation_matmuls = 0
    for node in model.graph.node:
        if node.op_type in _LINEAR_OPS:
            weight = inits.get(node.input[1]) if len(node.input) > 1 else None
            if weight is None:
                if node.op_type == "MatMul":
                    report.activation_matmuls += 1
                continue
            if node.name in gemm_left:
                continue
            report.left_in_float.append(LeftInFloat(node.name, node.op_type, list(weight.dims),
                                                    _float_reason(node.op_type, report.mode, options,
                                                                  int8_method)))
        elif node.op_type == "Gather":
            table = inits.get(node.input[0])
            if table is not None and len(table.dims) == 2 and min(table.dims) > 1 and _numel(table) >= 4096:
                report.left_in_float.append(LeftInFloat(node.name, "Gather", list(table.dims),
                                                        _gather_reason(report.graph, report.mode)))
    if report.mode in ("int8", "int4"):
        unexpected = [i.node for i in report.left_in_float if i.op_type == "MatMul"]
        if unexpected:
            report.warnings.append(f"{len(unexpected)} MatMul with a constant weight left in float: "
                                   f"{', '.join(unexpected[:5])}")
    report.node_types_after = _count_ops(model)
    report.contrib_ops = sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})
    report.opset = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    if report.mode in ("fp32", "fp16"):
        report.left_in_float = []  # nothing is quantized in these modes: listing every weight says nothing


def _float_reason(op_type: str, mode: str, options: QuantOptions, int8_method: str) -> str:
    if mode in ("fp32", "fp16"):
        return f"{mode} mode keeps weights in floating point"
    if op_type == "Conv":
        if mode == "int4" or int8_method != "dynamic":
            return "MatMulNBits is for MatMul only; Conv (the vision patch embedding, <1% of its weights) stays float"
        return ("int8_conv=False: the patch-embedding Conv is <1% of a tile's compute; ConvInteger's gain was "
                "within timing noise")
    return "not quantized by onnxruntime's quantizer (unexpected: check the warnings)"


def _gather_reason(graph: str, mode: str) -> str:
    if mode in ("fp32", "fp16"):
        return f"{mode} mode keeps tables in floating point"
    return ("lookup tables are quantized only in the embed_tokens graph (a Gather reads few rows: no speed gain, "
            "small tables)") if graph != "embed_tokens" else "not a 2-D table gathered on axis 0"


def _numel(tensor) -> int:
    n = 1
    for d in tensor.dims:
        n *= d
    return n


# --------------------------------------------------------------------------------------------------------------
# pre-passes


def _promote_constant_weights(model) -> None:
    """Constant nodes holding float matrices → initializers, so that the quantizers see them as weights."""
    used_by_linear = {n.input[1] for n in model.graph.node if n.op_type in _LINEAR_OPS and len(n.input) > 1}
    used_by_linear |= {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in used_by_linear:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and value.data_type in _FLOAT_TYPES and len(value.dims) >= 2:
                tensor = model.graph.initializer.add()
                tensor.CopyFrom(value)
                tensor.name = node.output[0]
                continue
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _rewrite_gemm(model, report: QuantReport) -> None:
    """Gemm(A, B, C) with a constant B → MatMul(A, alpha·op(B)) [+ Add(·, beta·C)]: the quantizers then see it.

    Gemm's A is 2-D, so MatMul gives the same result; C broadcasts the same way in Add. Gemms with transA=1 or a
    non-constant B stay as they are and are reported.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    inits = _float_initializers(model)
    consumers = Counter(i for n in model.graph.node for i in n.input)
    new_nodes = []
    new_inits = []
    for node in model.graph.node:
        if node.op_type != "Gemm":
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        weight = inits.get(node.input[1])
        reason = None
        if weight is None:
            reason = "Gemm whose B is not a constant weight"
        elif attrs.get("transA", 0):
            reason = "Gemm with transA=1 (not rewritten to MatMul)"
        if reason:
            report.left_in_float.append(LeftInFloat(node.name, "Gemm", list(weight.dims) if weight else [], reason))
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        if attrs.get("transB", 0):
            w = w.T
        if alpha != 1.0:
            w = w * np.asarray(alpha, dtype=w.dtype)
        base = node.name or node.output[0]
        w_name = f"{weight.name}_as_matmul" if consumers[weight.name] > 1 or alpha != 1.0 or attrs.get("transB") \
            else weight.name
        if w_name != weight.name:
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        has_c = len(node.input) > 2 and node.input[2]
        mm_out = f"{base}_matmul_out" if has_c else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{base}_MatMul"))
        if has_c:
            c_name = node.input[2]
            if beta != 1.0:
                c_init = inits.get(c_name)
                if c_init is not None:
                    c = numpy_helper.to_array(c_init) * np.asarray(beta, dtype=w.dtype)
                    c_name = f"{c_name}_beta"
                    new_inits.append(numpy_helper.from_array(c, c_name))
                else:
                    beta_name = f"{base}_beta"
                    new_inits.append(numpy_helper.from_array(np.asarray(beta, dtype=w.dtype), beta_name))
                    new_nodes.append(helper.make_node("Mul", [c_name, beta_name], [f"{base}_c_scaled"],
                                                      name=f"{base}_BetaMul"))
                    c_name = f"{base}_c_scaled"
            new_nodes.append(helper.make_node("Add", [mm_out, c_name], [node.output[0]], name=f"{base}_Add"))
        report.gemm_rewritten += 1
    if report.gemm_rewritten:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        model.graph.initializer.extend(new_inits)
        _drop_unused_initializers(model)


def _drop_unused_initializers(model) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:  # subgraphs may read outer-scope initializers
        for attr in node.attribute:
            for sub in ([attr.g] if attr.g.ByteSize() else []) + list(attr.graphs):
                used |= {i for n in sub.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


# --------------------------------------------------------------------------------------------------------------
# int8


def _to_int8_dynamic(model, graph: str, options: QuantOptions, report: QuantReport, tmp: Path):
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _promote_constant_weights(model)
    _rewrite_gemm(model, report)
    before = Counter(n.op_type for n in model.graph.node)
    op_types = ["MatMul"] + (["Conv"] if options.int8_conv else [])
    weight_type = {"QInt8": QuantType.QInt8, "QUInt8": QuantType.QUInt8}[options.int8_weight_type]
    src = _save_for_tool(model, tmp / "int8-in.onnx")
    del model
    out = tmp / "int8-out.onnx"
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "please run pre-processing" and per-node info lines
    try:
        quantize_dynamic(src, out, op_types_to_quantize=op_types, per_channel=options.int8_per_channel,
                         reduce_range=options.int8_reduce_range, weight_type=weight_type,
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    finally:
        logging.getLogger().setLevel(quiet)
    model = onnx.load(str(out), load_external_data=True)
    after = Counter(n.op_type for n in model.graph.node)
    # Count what was made, not what disappeared: the quantizer also turns leftover Gemms into MatMul + Add.
    made = {"MatMul": "MatMulInteger", "Conv": "ConvInteger"}
    report.quantized = {op: after[made[op]] - before[made[op]] for op in op_types
                        if after[made[op]] - before[made[op]]}
    report.method = (f"onnxruntime quantize_dynamic, {options.int8_weight_type} weights "
                     f"{'per channel' if options.int8_per_channel else 'per tensor'}"
                     f"{', reduce_range' if options.int8_reduce_range else ''}, uint8 activations")
    return model


# --------------------------------------------------------------------------------------------------------------
# int4


def _nbits_quantizer(model, *, bits: int, options: QuantOptions, exclude=(), op_types=("MatMul",), **extra):
    import logging

    import numpy as np
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block_size = options.embed_int4_block_size if "Gather" in op_types else options.block_size
    kwargs = dict(bits=bits, block_size=block_size, is_symmetric=options.symmetric,
                  nodes_to_exclude=list(exclude), op_types_to_quantize=tuple(op_types), **extra)
    params = inspect.signature(MatMulNBitsQuantizer.__init__).parameters
    if options.accuracy_level and "accuracy_level" in params:
        kwargs["accuracy_level"] = options.accuracy_level
    if bits == 4 and options.int4_algorithm == "hqq" and "Gather" not in op_types:
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

        kwargs["algo_config"] = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4,
                                                         op_types_to_quantize=tuple(op_types))
    quantizer = MatMulNBitsQuantizer(model, **kwargs)
    # Its warnings say it raises the opset to 21 / IR 10 for int4 tensors (GatherBlockQuantized), which is what we
    # want; numpy warns about all-zero blocks (e.g. the padding row), which it maps to 0 correctly.
    nbits_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = nbits_logger.level
    nbits_logger.setLevel(logging.ERROR)
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            quantizer.process()
    finally:
        nbits_logger.setLevel(level)
    model = quantizer.model.model
    if "algo_config" in kwargs and options.accuracy_level:  # HQQ's nodes carry no accuracy_level of their own
        from onnx import helper

        for node in model.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(helper.make_attribute("accuracy_level", options.accuracy_level))
    return model


def _hessian_bytes(model) -> int:
    """What GPTQ's Hessians of `model` would hold: float64 K × K for each distinct input of a MatMul with a constant
    2-D weight (the MatMuls it would quantize; the lm_head's input counted too, as an upper bound)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    widths = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and len(shapes.get(node.input[1], [])) == 2:
            widths[node.input[0]] = shapes[node.input[1]][0]
    return sum(8 * k * k for k in widths.values())


def _to_nbits(model, graph: str, bits: int, options: QuantOptions, report: QuantReport, source: Path | None = None):
    """Weight-only MatMulNBits for every MatMul with a constant weight (Gemm rewritten to MatMul first)."""
    _promote_constant_weights(model)
    _rewrite_gemm(model, report)
    note = ""
    if bits == 4:  # the whole int4 graph, its 8-bit lm_head and 8-bit nodes too, at the int4 block
        algorithm = options.int4_algorithm
        if algorithm == "auto":
            from .int4_search import calibration_package

            algorithm = "gptq" if graph == "decoder" and calibration_package(options, source) else "rtn"
            need = _hessian_bytes(model) if algorithm == "gptq" else 0
            if need > options.gptq_memory_bytes:
                algorithm = "rtn"
                note = (f" (GPTQ not run: its Hessians would hold {need / 1e9:.1f} GB, over gptq_memory_bytes "
                        f"{options.gptq_memory_bytes / 1e9:g} GB)")
        block = options.int4_block_size or (64 if algorithm in ("gptq", "search") else 32)
        options = dataclasses.replace(options, block_size=block, int4_algorithm=algorithm)
    before = Counter(n.op_type for n in model.graph.node)
    head = _output_projection(model) if bits == 4 and options.int4_output_bits != 4 else None
    special = [head] if head else []
    eight = []
    if bits == 4 and options.int4_8bit_nodes:
        from fnmatch import fnmatchcase

        eight = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head
                 and any(fnmatchcase(n.name, pat) for pat in options.int4_8bit_nodes)]
    calibrated = ""
    if bits == 4 and options.int4_algorithm in ("search", "gptq"):  # calibrated, export/int4_search.py
        from .int4_search import quantize_for_options

        model, calibrated = quantize_for_options(model, options, special + eight, source)
    else:
        model = _nbits_quantizer(model, bits=bits, options=options, exclude=special + eight)
    if special or eight:  # the rest: lm_head (int4_output_bits is 4 or 8) and the 8-bit layers
        model = _nbits_quantizer(model, bits=8, options=options)
    refined = None
    if special and options.int4_output_topk:
        from .head_refine import refine_output_projection

        refined = refine_output_projection(model, options.int4_output_topk)
    head_note = refined or (f"output projection {options.int4_output_bits}-bit" if special else "")
    after = Counter(n.op_type for n in model.graph.node)
    made = after["MatMulNBits"] - before["MatMulNBits"]
    report.quantized = {"MatMul": made} if made else {}
    level = options.accuracy_level
    patterns = ", ".join(options.int4_8bit_nodes)
    algorithm = "HQQ (float zero points), " if bits == 4 and options.int4_algorithm == "hqq" else calibrated
    report.method = (f"MatMulNBits {bits}-bit {algorithm}{note}, block {options.block_size}, "
                     f"{'symmetric' if options.symmetric else 'asymmetric'}"
                     f"{f', accuracy_level {level}' if level else ''}"
                     f"{f'; {head_note}' if head_note else ''}"
                     f"{f'; {len(eight)} MatMuls 8-bit ({patterns})' if eight else ''}")
    return model


# --------------------------------------------------------------------------------------------------------------
# embedding tables


def _quantize_embedding(model, mode: str, options: QuantOptions, report: QuantReport):
    """int8: a per-row int8 table (Gather int8 rows and their scales, Cast, Mul). int4: GatherBlockQuantized."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    _promote_constant_weights(model)
    inits = _float_initializers(model)
    tables = _table_gathers(model)
    if mode == "int4":
        names = {n.name for n in tables}
        exclude = [n.name for n in model.graph.node if n.op_type == "Gather" and n.name not in names]
        model = _nbits_quantizer(model, bits=4, options=options, exclude=exclude, op_types=("Gather",),
                                 quant_axes=(("Gather", 1),))
        done = sum(1 for n in model.graph.node if n.op_type == "GatherBlockQuantized")
        report.quantized = {"Gather": done} if done else {}
        report.method = (f"GatherBlockQuantized 4-bit, block {options.embed_int4_block_size} along the hidden "
                         f"axis, {'symmetric' if options.symmetric else 'asymmetric'}")
        return model

    new_nodes = []
    for node in model.graph.node:
        if node not in tables:
            new_nodes.append(node)
            continue
        table = inits[node.input[0]]
        w = numpy_helper.to_array(table)
        out_type = table.data_type
        w32 = w.astype(np.float32)
        scale = np.abs(w32).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w32 / scale), -127, 127).astype(np.int8)
        base = node.name or node.output[0]
        q_name, s_name = f"{table.name}_int8", f"{table.name}_row_scale"
        model.graph.initializer.extend([
            numpy_helper.from_array(q, q_name),
            numpy_helper.from_array(scale.astype(w.dtype if out_type != TensorProto.BFLOAT16 else np.float32),
                                    s_name),
        ])
        ids = node.input[1]
        new_nodes += [
            helper.make_node("Gather", [q_name, ids], [f"{base}_q_rows"], name=f"{base}_GatherInt8", axis=0),
            helper.make_node("Gather", [s_name, ids], [f"{base}_row_scales"], name=f"{base}_GatherScale", axis=0),
            helper.make_node("Cast", [f"{base}_q_rows"], [f"{base}_rows_float"], name=f"{base}_Cast",
                             to=TensorProto.FLOAT if out_type == TensorProto.BFLOAT16 else out_type),
            helper.make_node("Mul", [f"{base}_rows_float", f"{base}_row_scales"], [node.output[0]],
                             name=f"{base}_Dequantize"),
        ]
    if tables:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        _drop_unused_initializers(model)
    report.quantized = {"Gather": len(tables)} if tables else {}
    report.method = "int8 table with one symmetric scale per row (Gather, Gather, Cast, Mul)"
    return model


# --------------------------------------------------------------------------------------------------------------
# fp16


def _rms_norm_nodes(model) -> list[str]:
    """Names of the nodes computing x * rsqrt(mean(x²) + eps) in each RMSNorm (Pow → ReduceMean → … → Mul)."""
    consumers: dict[str, list] = {}
    producers = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
        for o in node.output:
            producers[o] = node
    blocked = []
    for pow_node in (n for n in model.graph.node if n.op_type == "Pow"):
        chain = [pow_node]
        node = pow_node
        for expected in (("ReduceMean",), ("Add",), ("Sqrt",), ("Div", "Reciprocal"), ("Mul",)):
            nxt = [c for c in consumers.get(node.output[0], []) if c.op_type in expected]
            if len(nxt) != 1:
                break
            node = nxt[0]
            chain.append(node)
        else:
            source = producers.get(pow_node.input[0])
            if source is not None and source.op_type == "Cast":
                chain.append(source)
            blocked.extend(n.name for n in chain)
    return blocked


def _index_islands(model) -> list[str]:
    """Nodes that compute positions, masks and indices rather than activations: keep them in float32.

    A node is on the data path when it reads (transitively) a float graph input or a weight matrix; the rest work
    from integer inputs and shapes: rotary cos/sin from position_ids, attention masks, Idefics3's patch position
    buckets (`x - x·1e-6` compared against boundaries). In float16 those go wrong: positions past 2,048 are not
    representable, rotary angles lose every digit, the patch buckets shift. They cost next to nothing in float32.
    """
    float_types = set(_FLOAT_TYPES)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    data = {v.name for v in model.graph.input if v.type.tensor_type.elem_type in float_types}
    data |= {t.name for t in model.graph.initializer
             if t.data_type in float_types and len(t.dims) >= 2 and _numel(t) >= 256}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = value.data_type
                if value.data_type in float_types and len(value.dims) >= 2 and _numel(value) >= 256:
                    data.add(node.output[0])
    runtime = {v.name for v in model.graph.input}  # values that change from run to run
    islands = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type == "Constant":
            continue
        inputs = _node_inputs(node)
        if any(i in runtime for i in inputs):
            runtime.update(node.output)
        if any(i in data for i in inputs):
            # Float results of activations are activations; integer/bool results (Shape, comparisons) are not.
            data.update(o for o in node.output if types.get(o, 1) in float_types)
        elif (any(o in runtime for o in node.output)
              and any(types.get(t) in float_types for t in inputs + list(node.output))):
            islands.append(node)
    # Constant-only computations (Constant, Identity of a shared weight, inv_freq reshapes) stay float32 when only
    # islands read them (rotary's inv_freq in float16 would put every angle off), else become float16 as usual.
    island_names = {n.name for n in islands}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in _node_inputs(node):
            consumers.setdefault(i, []).append(node)
    for node in reversed(model.graph.node):
        if node.name in island_names or any(o in runtime or o in data for o in node.output):
            continue
        users = [u for o in node.output for u in consumers.get(o, [])]
        if users and all(u.name in island_names for u in users):
            islands.append(node)
            island_names.add(node.name)
    return [n.name for n in islands]


def _node_inputs(node) -> list[str]:
    """A node's inputs, with the outer-scope values its subgraphs read (an If's branches take q, k, v that way)."""
    inputs = list(node.input)
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            made = {o for n in graph.node for o in n.output}
            inputs += [i for n in graph.node for i in _node_inputs(n) if i and i not in made]
    return inputs


def _keep_internal_fp32(model, blocked: set[str]) -> None:
    """Drop the value_info of tensors passed between two float32-kept nodes.

    The converter marks every float value_info as float16 and then casts around blocked nodes by those marks, so a
    tensor between two blocked nodes would make a float32 → float16 → float32 round trip (x² of an RMSNorm overflows
    there, positions lose precision). Without a value_info entry it is left alone and stays float32.
    """
    graph_outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.name)
    internal = set()
    for node in model.graph.node:
        if node.name in blocked:
            for out in node.output:
                users = consumers.get(out, [])
                if out not in graph_outputs and users and all(u in blocked for u in users):
                    internal.add(out)
    keep = [v for v in model.graph.value_info if v.name not in internal]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _clip_island_casts(model, islands: set[str]) -> int:
    """Clip float32 values to ±65504 where an island hands them to float16 nodes (masks hold -3.4e38 → -inf)."""
    import numpy as np
    from onnx import helper, numpy_helper

    producers = {out: node for node in model.graph.node for out in node.output}
    lo, hi = "_fp16_clip_min", "_fp16_clip_max"
    count = 0
    new_nodes = []
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
        source = producers.get(node.input[0]) if to == 10 else None
        if source is not None and source.name in islands:
            clipped = node.input[0] + "_clipped"
            new_nodes.append(helper.make_node("Clip", [node.input[0], lo, hi], [clipped], name=node.name + "_clip"))
            node.input[0] = clipped
            count += 1
        new_nodes.append(node)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        model.graph.initializer.extend([numpy_helper.from_array(np.array(-65504.0, np.float32), lo),
                                        numpy_helper.from_array(np.array(65504.0, np.float32), hi)])
    return count


def _to_fp16(model, graph: str, options: QuantOptions, report: QuantReport, tmp: Path):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if options.fp16_kv_dtype not in ("float16", "float32"):
        raise QuantizationError(f"fp16_kv_dtype must be float16 or float32, not {options.fp16_kv_dtype!r}")
    unnamed = [n for n in model.graph.node if not n.name]
    for i, node in enumerate(unnamed):  # the block list works by node name
        node.name = f"_unnamed_{node.op_type}_{i}"
    keep = [v.name for v in list(model.graph.input) + list(model.graph.output)
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    has_kv = any(name.startswith(("past_key_values.", "present.")) for name in keep)
    if has_kv and options.fp16_kv_dtype == "float16":
        keep = [name for name in keep if not name.startswith(("past_key_values.", "present."))]
    # Shape inference gives the converter the value types it needs; the path form works past 2 GB.
    path = _save_for_tool(model, tmp / "fp16-in.onnx")
    del model
    inferred = tmp / "fp16-inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    model = onnx.load(str(inferred), load_external_data=True)
    norms = _rms_norm_nodes(model) if options.fp16_keep_norms_fp32 else []
    islands = _index_islands(model)
    blocked = set(norms) | set(islands)
    _keep_internal_fp32(model, blocked)
    model = convert_float_to_float16(model, keep_io_types=keep, disable_shape_infer=True,
                                     node_block_list=sorted(blocked))
    clipped = _clip_island_casts(model, set(islands))
    if has_kv:
        report.kv_dtype = options.fp16_kv_dtype
    n_weights = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    report.quantized = {"float16 initializers": n_weights}
    kept = []
    if norms:
        kept.append(f"{len(norms)} RMSNorm nodes")
    if islands:
        kept.append(f"{len(islands)} position/mask/index nodes ({clipped} outputs clipped to ±65504)")
    report.method = ("onnxruntime.transformers.float16, float32 at the graph boundary"
                     f"{' except the KV cache' if has_kv and options.fp16_kv_dtype == 'float16' else ''}"
                     f"{'; float32 kept for ' + ', '.join(kept) if kept else ''}")
    return model


# --------------------------------------------------------------------------------------------------------------
# float weights left in int8 / int4 graphs

FP16_STORAGE_MIN_ELEMENTS = 4096
# (op type, input index) of the float weights stored as float16: block scales, the patch Conv, position tables. Not
# the rotary cos/sin caches, norms or biases.
FP16_STORAGE_USES = {("MatMulNBits", 2), ("GatherBlockQuantized", 2), ("Conv", 1), ("Gather", 0)}


def _store_float_weights_fp16(model, report: QuantReport) -> None:
    """Float32 weights of an int8/int4 graph that are block scales (MatMulNBits, GatherBlockQuantized: 16 of
    SmolVLM-256M's 100 MB int4 decoder), a patch Conv or a position table (5.5 of its 98 MB vision file) are
    stored as float16 and Cast back to float32 in the graph; onnxruntime folds the Cast when it loads the graph, so
    what runs is float32 as before (MatMulNBits prepacks the folded scales), rounded to float16's 11 bits: a
    relative 2^-12, far under the 4- or 8-bit weights' own rounding."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    uses: dict[str, set] = {}

    def collect(graph, outer: bool):
        for node in graph.node:
            for index, name in enumerate(node.input):
                uses.setdefault(name, set()).add((node.op_type, index) if outer else ("subgraph", index))
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    collect(sub, False)

    collect(model.graph, True)
    casts, kept, saved = [], [], 0
    outputs = {o.name for o in model.graph.output}
    for tensor in list(model.graph.initializer):
        if (tensor.data_type != TensorProto.FLOAT or _numel(tensor) < FP16_STORAGE_MIN_ELEMENTS
                or not uses.get(tensor.name) or not uses[tensor.name] <= FP16_STORAGE_USES
                or tensor.name in outputs):
            kept.append(tensor)
            continue
        array = numpy_helper.to_array(tensor)
        half = array.astype(np.float16)
        if not np.isfinite(half).all() and np.isfinite(array).all():
            kept.append(tensor)  # beyond float16's range: keep it float32
            continue
        kept.append(numpy_helper.from_array(half, f"{tensor.name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{tensor.name}_fp16"], [tensor.name],
                                      name=f"{tensor.name}_CastToFloat", to=TensorProto.FLOAT))
        saved += array.nbytes - half.nbytes
    if not casts:
        return
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    report.method += f"; {len(casts)} float weights stored as float16 (-{saved / 1e6:.1f} MB, Cast folded at load)"
