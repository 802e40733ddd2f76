"""The int8 prefill graph of an int4 fused decoder: prompt chunks on int8 matrix units, decode steps on 4-bit weights.

A 4-bit `MatMulNBits` decoder reads the fewest bytes per decode step (the step is memory-bound), but a prompt chunk
is compute-bound, and there onnxruntime's 4-bit kernels run at fp32-GEMM speed: on a 2-core Xeon with AMX a
[256 × 576] · [576 × 1536] product took 1.66 ms in MatMulNBits (accuracy level 4) and 0.27 ms as a u8·s8
`MatMulInteger` (onnxruntime's MLAS runs that on AMX / VNNI / AVX2 int8 dot products). So beside the decoder the
package carries a second graph for prefill: the same graph, each 4-bit `MatMulNBits` replaced by

    x ─ per-row absmax → s = max|x_row| / 127 ─ QuantizeLinear(x, s, 128) → uint8
      ─ MatMulIntegerToFloat(·, W8, 1, c) ─ Mul(s) → y          (W8 int8 [K, N], c a float scale per column)

where W8 is the decoder's 4-bit weight requantized per output column (c its scale).

The int8 weights are not stored: they are made at load by the runtime (runtime/int8_prefill.py) from the 4-bit blocks
— each output column requantized to int8 with one scale, 0.7 s for SmolVLM-256M's 106 M weights in numpy — and
given to onnxruntime as the contents of a virtual external data file (`DERIVED_FILE`). model.json's decoder entry
says where each 4-bit tensor lies in the decoder's data file and where its int8 form goes (`prefill.weights`). The
decoder's weights move to one external data file that both graphs read (the prefill graph for its norms and rotary
tables), so nothing is stored twice. The prefill graph outputs keys and values only: the runtime runs a chunk's
last position through the decoder graph for the logits (one decode step per chunk), so the lm_head and its 28 MB
are not loaded twice.

Why per-row activation scales (not `DynamicQuantizeLinear`'s one scale per tensor): each row's result then depends
on that row alone, so a prompt gives the same keys and values whatever chunks it is cut into, or whatever other
rows share its run — a cached prefix and a fresh prefill agree. The int8 columns hold the 4-bit grid closely (a
column's step is its largest block scale × 8 / 127); the activations lose what per-row int8 loses, measured in
benchmarks/QUALITY.md.

The 8-bit lm_head stays a `MatMulNBits` (the prefill graph computes logits for the last position only). Decoders
with 4-bit zero points (asymmetric blocks) or `g_idx` are left without a prefill graph.
"""

from __future__ import annotations

from pathlib import Path

from .quantize import point_external

PREFILL_FILE = "decoder_prefill.onnx"
# The int8 weights are not in any file: the prefill graph's MatMulIntegerToFloat weights name this external data
# "file", which the runtime fills in memory at load from the decoder's 4-bit blocks (runtime/int8_prefill.py) and
# hands to onnxruntime (SessionOptions.add_external_initializers_from_files_in_memory).
DERIVED_FILE = "decoder_prefill.int8"
_ALIGN = 64


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def eligible(model) -> list:
    """The 4-bit MatMulNBits nodes a prefill graph replaces, or [] when the decoder cannot have one."""
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits" and _attrs(n).get("bits") == 4]
    if not nodes or any(len(n.input) > 3 and any(n.input[3:]) for n in nodes):
        return []  # zero points, g_idx or bias: not the symmetric block layout derived below
    if not any(n.op_type == "GroupQueryAttention" for n in model.graph.node):
        return []  # the fused form only (the portable decoder has no prefill/decode split)
    return nodes



def _where(tensor) -> tuple[str, int, int]:
    info = {e.key: e.value for e in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def _externalize(model, folder: Path, data_name: str, threshold: int = 1024, force: frozenset = frozenset()) -> None:
    """Move the graph's inline initializers of ≥ `threshold` bytes, and those named in `force`, to the end of
    `folder`/`data_name` (tensors that are external already, e.g. a tied table's shared file, stay where they
    are). Smaller ones stay inline: onnxruntime's shape inference reads shape constants from the graph itself."""
    from onnx import TensorProto, numpy_helper

    path = folder / data_name
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.seek(0, 2)  # append (a file opened "ab" would ignore the aligning seeks below)
        for tensor in model.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                continue
            raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            if len(raw) < threshold and tensor.name not in force:
                continue
            align = 4096 if len(raw) >= 1 << 20 else 64  # pages for the big ones, little padding for norms
            offset = -(-f.tell() // align) * align
            f.seek(offset)
            f.write(raw)
            point_external(tensor, data_name, offset, len(raw))


def _prune(graph, outputs: set[str]) -> None:
    """Keep only the nodes (and initializers) that `outputs` need."""
    needed, keep = set(outputs), []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    outs = [o for o in graph.output if o.name in outputs]
    del graph.output[:]
    graph.output.extend(outs)


def build_prefill_model(decoder) -> tuple[object, list[dict]]:
    """(the prefill ModelProto, the derivation table) for `decoder`, an onnx ModelProto whose 4-bit weights and
    block scales are external. Each table row: where a 4-bit B tensor and its scales lie
    ({file, offset} each, shapes, the scales' dtype), K, and the offsets of its int8 [K, N] weight and float32 [N]
    column scales in `DERIVED_FILE`."""
    import onnx
    from onnx import TensorProto, helper

    targets = eligible(decoder)
    if not targets:
        raise ValueError("the decoder has no symmetric 4-bit MatMulNBits in a fused graph")
    model = onnx.ModelProto()
    model.CopyFrom(decoder)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    replace = {n.output[0]: n for n in targets}
    consts = [
        helper.make_tensor("pf/inv127", TensorProto.FLOAT, [], [1 / 127]),
        helper.make_tensor("pf/tiny", TensorProto.FLOAT, [], [1e-30]),
        helper.make_tensor("pf/one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("pf/zp", TensorProto.UINT8, [], [128]),
        helper.make_tensor("pf/rows", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("pf/zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("pf/last", TensorProto.INT64, [1], [-1]),
    ]
    table, derived, quantized, body = [], [0], {}, []

    def place(nbytes: int) -> int:
        offset = -(-derived[0] // _ALIGN) * _ALIGN
        derived[0] = offset + nbytes
        return offset

    def node(op, inputs, outputs, name, **attrs):
        domain = attrs.pop("domain", "")
        body.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0]

    def source(name: str) -> tuple:
        """The initializer behind a MatMulNBits input (through the float16 scales' Cast), and its dtype."""
        tensor = inits.get(name)
        if tensor is None:
            cast = producers[name]
            tensor = inits[cast.input[0]]
        if tensor.data_location != TensorProto.EXTERNAL:
            raise ValueError(f"{tensor.name} is not external")
        file, offset, length = _where(tensor)
        return {"file": file, "offset": offset, "bytes": length,
                "dtype": helper.tensor_dtype_to_np_dtype(tensor.data_type).name, "shape": list(tensor.dims)}

    def activations(name: str, k: int) -> tuple[str, str]:
        """Per-row uint8 codes (zero point 128) of activation `name` viewed as [rows, K], and the rows' scales."""
        if name not in quantized:
            p = f"/prefill/act{len(quantized)}"
            consts.append(helper.make_tensor(p + "/shape", TensorProto.INT64, [2], [-1, k]))
            rows = node("Reshape", [name, p + "/shape"], [p + "/rows"], p + "/Rows")
            amax = node("ReduceMax", [node("Abs", [rows], [p + "/abs"], p + "/Abs")], [p + "/amax"], p + "/Absmax",
                        axes=[1], keepdims=1)
            scale = node("Max", [node("Mul", [amax, "pf/inv127"], [p + "/s0"], p + "/Step"), "pf/tiny"],
                         [p + "/s"], p + "/StepFloor")
            flat = node("Reshape", [scale, "pf/rows"], [p + "/s_rows"], p + "/RowScales")
            zero = node("Expand", ["pf/zp", node("Shape", [flat], [p + "/count"], p + "/Count")], [p + "/zp"],
                        p + "/ZeroPoints")
            codes = node("QuantizeLinear", [rows, flat, zero], [p + "/q"], p + "/Quantize", axis=0)
            quantized[name] = (codes, scale)
        return quantized[name]

    for original in decoder.graph.node:
        target = replace.get(original.output[0])
        if target is None:
            body.append(original)
            continue
        a = _attrs(target)
        k, n = a["K"], a["N"]
        p = f"/prefill/{target.name or target.output[0]}"
        w8 = TensorProto(name=p + "/w8", data_type=TensorProto.INT8, dims=[k, n])
        column = TensorProto(name=p + "/c", data_type=TensorProto.FLOAT, dims=[n])
        consts += [w8, column]
        table.append(({"b": source(target.input[1]), "scales": source(target.input[2]), "k": k, "n": n,
                       "block_size": a["block_size"]}, w8, column))
        codes, scale = activations(target.input[0], k)
        y = node("MatMulIntegerToFloat", [codes, w8.name, "pf/one", column.name, "pf/zp"], [p + "/y_rows"],
                 p + "/MatMul", domain="com.microsoft")
        y = node("Mul", [y, scale], [p + "/y_scaled"], p + "/RowScale")
        lead = node("Slice", [node("Shape", [target.input[0]], [p + "/in_shape"], p + "/InShape"), "pf/zero",
                              "pf/last"], [p + "/lead"], p + "/Lead")
        consts.append(helper.make_tensor(p + "/n", TensorProto.INT64, [1], [n]))
        shape = node("Concat", [lead, p + "/n"], [p + "/out_shape"], p + "/OutShape", axis=0)
        node("Reshape", [y, shape], list(target.output), p + "/Out")
    del graph.node[:]
    graph.node.extend(body)
    graph.initializer.extend(consts)
    # Keys and values only: the last layer's attention output and MLP feed nothing but the logits, so they go too.
    _prune(graph, {o.name for o in graph.output if o.name.startswith("present.")})
    kept = {t.name: t for t in graph.initializer}  # (the graph holds copies of the protos made above)
    rows = []
    for row, w8, column in table:
        if w8.name in kept:
            row["w8"], row["c"] = place(w8.dims[0] * w8.dims[1]), place(4 * column.dims[0])
            point_external(kept[w8.name], DERIVED_FILE, row["w8"], w8.dims[0] * w8.dims[1])
            point_external(kept[column.name], DERIVED_FILE, row["c"], 4 * column.dims[0])
            rows.append(row)
    graph.name = (graph.name or "decoder") + "_prefill"
    return model, rows


def write_prefill_graph(folder: str | Path, decoder_file: str) -> dict | None:
    """Give the int4 fused decoder in `folder` an int8 prefill graph (`PREFILL_FILE`) over the same weights.

    The decoder's inline weights move to one external file (`<decoder file>_data`, appended to when the graph has
    one already); tensors already external (a tied table) stay. Returns the manifest fields for the decoder entry
    ({"external_data": [...], "prefill": {...}}), or None when the decoder cannot have a prefill graph (nothing
    written)."""
    import onnx

    folder = Path(folder)
    path = folder / decoder_file
    decoder = onnx.load(str(path), load_external_data=False)
    targets = eligible(decoder)
    if not targets:
        return None
    data_name = decoder_file + "_data"
    producers = {out: node for node in decoder.graph.node for out in node.output}
    sources = set()  # the 4-bit blocks and their scales (through the float16 scales' Cast), which the runtime reads
    for target in targets:
        for name in target.input[1:3]:
            sources.add(producers[name].input[0] if name in producers else name)
    _externalize(decoder, folder, data_name, force=frozenset(sources))
    onnx.save_model(decoder, str(path))
    prefill, table = build_prefill_model(decoder)
    onnx.save_model(prefill, str(folder / PREFILL_FILE))
    files = []
    for tensor in decoder.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and _where(tensor)[0] not in files:
            files.append(_where(tensor)[0])
    derived = max(row["c"] + 4 * row["n"] for row in table)
    reads = sorted({_where(t)[0] for t in prefill.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL} - {DERIVED_FILE})
    return {"external_data": files,
            "prefill": {"file": PREFILL_FILE, "external_data": reads, "derived_file": DERIVED_FILE,
                        "derived_bytes": derived,
                        "method": "per-row uint8 activations (zero point 128) x int8 weights requantized per column "
                                  "from the 4-bit blocks at load (MatMulIntegerToFloat)",
                        "weights": table}}
