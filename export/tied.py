"""Tied embeddings: store the table once when the decoder's output projection (lm_head) is the embedding table.

A checkpoint that ties `lm_head.weight` to `embed_tokens.weight` (SmolVLM, Qwen2-VL-2B, Qwen2.5-VL-3B) put the same
[vocab, hidden] table into a package twice: in the embed_tokens graph and in the decoder's lm_head. Quantized
(int8 and int4 plans), the lm_head is a `MatMulNBits` node whose B input holds, for each output row n, row n of the
table quantized in blocks along the hidden axis (one scale per block, an optional zero point per block, 128 when
there is none): exactly what an embedding lookup needs. So the embed_tokens graph reads those same bytes instead of
a table of its own:

    Gather(B, ids) → Cast → Sub(zero point) → Mul(Gather(scales, ids)) → Reshape → inputs_embeds

and both graphs name one external data file, `TIED_FILE`, for B, its scales and zero points. Each graph still
loads on its own (onnxruntime reads the file once per session, as it read two tables before); the package holds
the table once: −28.6 MB of 231 at SmolVLM-256M's size, −233 MB at Qwen2-VL-2B's. The embedding rows become the
lm_head's 8-bit blocks (block 32, one scale per 32 values) instead of int8 with one scale per row: finer, not
coarser. A 4-bit lm_head is not shared (its rows are nibble-packed; the embedding keeps its own table).

`tied_table(embed, decoder)` says whether two fp32 graphs tie (the tables are equal, bit for bit);
`share_tied_table(folder, embed_file, decoder_file)` rewrites the quantized pair in place.
"""

from __future__ import annotations

from pathlib import Path

TIED_FILE = "tied_embedding.data"
_ALIGN = 4096


def _array(tensor, folder: Path):
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(tensor) and not tensor.HasField("raw_data"):
        load_external_data_for_tensor(tensor, str(folder))
    return numpy_helper.to_array(tensor)


def tied_table(embed_path: str | Path, decoder_path: str | Path) -> bool:
    """True when the (float) embed_tokens table equals the decoder's lm_head weight, transposed, exactly."""
    import numpy as np
    import onnx

    from .quantize import _logits_producer, _table_gathers

    embed_path, decoder_path = Path(embed_path), Path(decoder_path)
    embed = onnx.load(str(embed_path), load_external_data=False)
    gathers = _table_gathers(embed)
    if len(gathers) != 1:
        return False
    table = next(t for t in embed.graph.initializer if t.name == gathers[0].input[0])
    decoder = onnx.load(str(decoder_path), load_external_data=False)
    head = _logits_producer(decoder, ("MatMul",))
    inits = {t.name: t for t in decoder.graph.initializer}
    if head is None or head.input[1] not in inits:
        return False
    weight = inits[head.input[1]]
    if list(weight.dims) != list(reversed(table.dims)) or weight.data_type != table.data_type:
        return False
    return bool(np.array_equal(_array(table, embed_path.parent), _array(weight, decoder_path.parent).T))


def _attr(node, name, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def share_tied_table(folder: str | Path, embed_file: str, decoder_file: str) -> dict | None:
    """Make `folder`/`embed_file` read the decoder's 8-bit lm_head bytes; both graphs then use `TIED_FILE`.

    Call only when `tied_table` said so on the float graphs. Returns {"file": TIED_FILE, "bytes": ..., "bits": 8,
    "block_size": ...}, or None (nothing changed) when the lm_head is not an 8-bit MatMulNBits whose blocks tile the
    hidden axis exactly."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .quantize import _graph_files, _logits_producer, _save, point_external

    folder = Path(folder)
    decoder_path, embed_path = folder / decoder_file, folder / embed_file
    decoder = onnx.load(str(decoder_path), load_external_data=True)
    head = _logits_producer(decoder, ("MatMulNBits",))
    if head is None:
        return None
    bits, block, k, n = _attr(head, "bits", 4), _attr(head, "block_size"), _attr(head, "K"), _attr(head, "N")
    inits = {t.name: t for t in decoder.graph.initializer}
    producers = {out: node for node in decoder.graph.node for out in node.output}
    # B, scales, zero points (optional): initializers, or (the scales) a float16 initializer Cast to float32, which
    # onnxruntime folds at load (quantize._store_float_weights_fp16)
    names = []
    for name in (n for n in head.input[1:4] if n):
        cast = producers.get(name)
        if name not in inits and cast is not None and cast.op_type == "Cast" and cast.input[0] in inits:
            name = cast.input[0]
        names.append(name)
    if bits != 8 or not block or k % block or any(name not in inits for name in names):
        return None
    if len(head.input) > 4 and any(head.input[4:]):  # g_idx / bias: not a plain blockwise table
        return None
    arrays = [numpy_helper.to_array(inits[name]) for name in names]
    blocks = k // block
    q, scales = arrays[0], arrays[1]
    if q.dtype != np.uint8 or q.size != n * blocks * block or scales.size != n * blocks:
        return None
    zero = arrays[2] if len(arrays) > 2 else None
    if zero is not None and (zero.dtype != np.uint8 or zero.size != n * blocks):
        return None  # 8-bit zero points are one byte per block; anything else is not this layout

    embed = onnx.load(str(embed_path), load_external_data=True)
    out_type = embed.graph.output[0].type.tensor_type.elem_type
    scale_type = inits[names[1]].data_type
    if scale_type not in (out_type, TensorProto.FLOAT16):
        return None
    old_embed_files = _graph_files(embed_path)
    old_decoder_files = _graph_files(decoder_path)

    # One file: B, then the scales, then the zero points, each at an aligned offset.
    data_path = folder / TIED_FILE
    placed = []
    with open(data_path, "wb") as f:
        for array in arrays:
            offset = -(-f.tell() // _ALIGN) * _ALIGN
            f.seek(offset)
            raw = np.ascontiguousarray(array).tobytes()
            f.write(raw)
            placed.append((offset, len(raw)))

    def external(tensor, where):
        point_external(tensor, TIED_FILE, *where)

    for name, where in zip(names, placed):
        external(inits[name], where)

    # The embed_tokens graph over the same bytes, viewed as [vocab, blocks, block] and [vocab, blocks, 1].
    ids = embed.graph.input[0].name
    out = embed.graph.output[0].name
    def view(name, dtype, dims):
        tensor = TensorProto(name=name, data_type=dtype)
        tensor.dims.extend(dims)
        return tensor

    views = [view("tied_table_q", TensorProto.UINT8, [n, blocks, block]),
             view("tied_table_scales", scale_type, [n, blocks, 1])]
    if zero is not None:
        views.append(view("tied_table_zero_points", TensorProto.UINT8, [n, blocks, 1]))
    for tensor, where in zip(views, placed):
        external(tensor, where)
    consts = [helper.make_tensor("tied_hidden_shape", TensorProto.INT64, [3], [0, 0, k])]
    nodes = [
        helper.make_node("Gather", ["tied_table_q", ids], ["tied_rows_q"], name="/embed_tokens/TiedGather", axis=0),
        helper.make_node("Cast", ["tied_rows_q"], ["tied_rows"], name="/embed_tokens/TiedCast", to=out_type),
    ]
    scales_name = "tied_table_scales"
    if scale_type != out_type:  # float16 scales, widened as the decoder widens them (folded at load)
        nodes.append(helper.make_node("Cast", [scales_name], ["tied_table_scales_wide"], name="/embed_tokens/TiedWiden",
                                      to=out_type))
        scales_name = "tied_table_scales_wide"
    nodes.append(helper.make_node("Gather", [scales_name, ids], ["tied_row_scales"], name="/embed_tokens/TiedScales",
                                  axis=0))
    if zero is None:
        default = np.array(2 ** (bits - 1), dtype=helper.tensor_dtype_to_np_dtype(out_type))
        consts.append(numpy_helper.from_array(default, "tied_zero_point"))
        zero_name = "tied_zero_point"
    else:
        nodes += [
            helper.make_node("Gather", ["tied_table_zero_points", ids], ["tied_row_zero_q"],
                             name="/embed_tokens/TiedZeroPoints", axis=0),
            helper.make_node("Cast", ["tied_row_zero_q"], ["tied_row_zero"], name="/embed_tokens/TiedZeroCast",
                             to=out_type),
        ]
        zero_name = "tied_row_zero"
    nodes += [
        helper.make_node("Sub", ["tied_rows", zero_name], ["tied_centred"], name="/embed_tokens/TiedCentre"),
        helper.make_node("Mul", ["tied_centred", "tied_row_scales"], ["tied_blocks"], name="/embed_tokens/TiedScale"),
        helper.make_node("Reshape", ["tied_blocks", "tied_hidden_shape"], [out], name="/embed_tokens/TiedReshape"),
    ]
    graph = helper.make_graph(nodes, embed.graph.name, list(embed.graph.input), list(embed.graph.output),
                              initializer=views + consts)
    new_embed = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  producer_name="edgevlm", ir_version=embed.ir_version)

    # The decoder's own data file (a graph over 2 GB) is rewritten from memory: drop the old one first.
    for old in old_decoder_files[1:]:
        if old.name != TIED_FILE:
            old.unlink(missing_ok=True)
    _save(decoder, decoder_path)
    for old in old_embed_files[1:]:
        if old.name != TIED_FILE:
            old.unlink(missing_ok=True)
    onnx.save_model(new_embed, str(embed_path))
    onnx.checker.check_model(str(embed_path))  # a path: the checker finds TIED_FILE beside it
    return {"file": TIED_FILE, "bytes": data_path.stat().st_size, "bits": bits, "block_size": block}
