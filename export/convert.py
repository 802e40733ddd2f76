"""`edgevlm export`: a Hugging Face VLM checkpoint → a verified edgevlm model package.

Steps: check the source and the output folder, load the model and processor, export the three graphs (vision
encoder, token embeddings, decoder with KV cache), write tokenizer, chat template and model.json with checksums,
then verify the package against transformers and exit non-zero if it does not match.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from ..runtime.package import FORMAT, FORMAT_VERSION, MANIFEST, ModelPackage, sha256_file

SUPPORTED = ("idefics3 (SmolVLM-256M/500M/2.2B-Instruct, Idefics3), qwen2_vl (Qwen2-VL-2B/7B[-Instruct]), "
             "qwen2_5_vl (Qwen2.5-VL-3B/7B[-Instruct])")
OPSET = 17
# A protobuf file cannot exceed 2 GB: bigger graphs keep their weights in one external file beside them.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
GRAPH_FILES = {
    "vision_encoder": "vision_encoder.onnx",
    "embed_tokens": "embed_tokens.onnx",
    "decoder": "decoder_model_merged.onnx",
}
# The decoder comes in two forms (model.json graphs.decoder.form):
#   "fused"    (default) built node by node by export/fused_decoder.py: GroupQueryAttention with the KV cache
#              updated in place in one preallocated buffer, fused RMSNorms, last-position logits. The fast one.
#   "portable" traced from transformers: onnx-community's decoder_model_merged.onnx interface (attention_mask,
#              position_ids, a fresh present tensor per step), every op standard ONNX. For other tools and for
#              fp16 GPU packages.
DECODER_FORMS = ("fused", "portable")
FUSED_DECODER_FILE = "decoder_model_fused.onnx"


class ExportError(Exception):
    """A user-facing problem (bad source, unsupported model, no space): printed as one line, no traceback."""


class Progress:
    def __init__(self, stream=sys.stderr):
        self.start = time.perf_counter()
        self.stream = stream

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=self.stream, flush=True)


def _read_config(source: str, hub_kwargs: dict) -> tuple[dict, str]:
    """config.json of a local folder or hub id → (config, what to load the checkpoint from)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"{source} is a file; give the checkpoint folder (with config.json and weights)")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ExportError(f"{source} has no config.json: not a Hugging Face checkpoint folder")
        try:
            return json.loads(config_path.read_text(encoding="utf-8")), source
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"{config_path} is not readable JSON ({exc})") from None
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ExportError(f"checkpoint not found: {source} (a local folder or a Hugging Face hub id like org/name)")
    import requests
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        if not constants.HF_HUB_OFFLINE:
            try:
                # hf_hub_download retries an unreachable hub five times with backoff (~24 s) before it gives up:
                # one request without retries finds out first.
                HfApi().model_info(source, timeout=constants.HF_HUB_ETAG_TIMEOUT, **hub_kwargs)
            except (requests.ConnectionError, requests.Timeout):
                pass
            else:
                config_file = hf_hub_download(source, "config.json", **hub_kwargs)
                return json.loads(Path(config_file).read_text(encoding="utf-8")), source
        # Offline or unreachable: a copy in the local cache still exports, loaded as a local folder (transformers'
        # AutoProcessor drops local_files_only and would retry the hub for each of its files).
        return _read_config(snapshot_download(source, local_files_only=True, **hub_kwargs), {})
    except LocalEntryNotFoundError:
        why = "offline (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else f"unreachable ({constants.ENDPOINT})"
        raise ExportError(f"checkpoint not found: {source} is neither a local folder nor in the local Hugging "
                          f"Face cache, and the Hugging Face hub is {why}") from None
    except ExportError:
        raise
    except Exception as exc:  # unknown repo, gated repo: all one message for the user
        raise ExportError(
            f"checkpoint not found: {source} is not a local folder, and fetching it from the Hugging Face hub "
            f"failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _family_for(config: dict):
    from .families import family_for

    family = family_for(config)
    if family is None:
        names = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise ExportError(f"unsupported model: {names} (model_type {config.get('model_type')!r}); supported "
                          f"families: {SUPPORTED}")
    return family


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"output folder {out_dir} is not empty (pass --overwrite to replace its contents)")
        if not (out_dir / MANIFEST).is_file():
            raise ExportError(f"refusing to overwrite {out_dir}: it is not empty and holds no edgevlm package")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_space(out_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise ExportError(
            f"not enough disk space in {out_dir}: the package needs about {needed / 1e6:,.0f} MB, "
            f"{free / 1e6:,.0f} MB free"
        )


def _save_external_if_large(path: Path) -> list[str]:
    """Graphs over 2 GB keep their weights in one `<name>_data` file; returns the files that make up the graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data if entry.key == "location"
    }
    if not locations and path.stat().st_size < EXTERNAL_DATA_THRESHOLD:
        return [path.name]
    # torch's exporter writes one file per tensor; gather them into a single file beside the graph.
    data_name = path.name + "_data"
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    for location in locations - {data_name}:
        (path.parent / location).unlink(missing_ok=True)
    return [path.name, data_name]


def _graph_io(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = {}
        for v in values:
            tensor = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            out[v.name] = {"dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def _export_graphs(family, model, work: Path, progress: Progress,
                   decoder_form: str = "fused") -> tuple[dict[str, list[str]], dict]:
    """Export the three graphs into `work`; → ({graph: files}, extra model.json fields of the decoder entry)."""
    import torch
    from optimum.exporters.onnx.convert import export_pytorch

    from .families.common import EmbedTokens

    files: dict[str, list[str]] = {}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python-level branch it freezes; the ones here are checked by verification
        # (a second input shape, past length 0 and > 0), so they only bury the progress lines.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        progress("vision_encoder: tracing and exporting (torch.onnx, TorchScript exporter)")
        path = work / GRAPH_FILES["vision_encoder"]
        family.export_vision(model, path, OPSET)
        files["vision_encoder"] = _save_external_if_large(path)
        progress(f"vision_encoder: done ({_size_mb(work, files['vision_encoder'])})")

        progress("embed_tokens: exporting")
        path = work / GRAPH_FILES["embed_tokens"]
        torch.onnx.export(
            EmbedTokens(model).eval(), (torch.tensor([[1, 2, 3], [4, 5, 6]]),), str(path),
            input_names=["input_ids"], output_names=["inputs_embeds"],
            dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                          "inputs_embeds": {0: "batch_size", 1: "sequence_length"}},
            opset_version=OPSET, dynamo=False,
        )
        files["embed_tokens"] = _save_external_if_large(path)
        progress(f"embed_tokens: done ({_size_mb(work, files['embed_tokens'])})")

        if decoder_form == "fused":
            from .fused_decoder import build_fused_decoder

            progress("decoder (fused): building the GroupQueryAttention graph from the weights")
            description = build_fused_decoder(model, work / FUSED_DECODER_FILE,
                                              external_threshold=EXTERNAL_DATA_THRESHOLD)
            files["decoder"] = [description["file"], *description.get("external_data", [])]
            decoder_fields = {key: description[key] for key in (
                "form", "kv_dtype", "kv_layout", "max_sequence_length", "past_present_share_buffer", "logits",
                "rotary", "mrope_section", "rope_theta") if key in description}
            progress(f"decoder (fused): done, {description['node_count']} nodes "
                     f"({_size_mb(work, files['decoder'])})")
        else:
            if not hasattr(family, "Decoder"):
                raise ExportError(f"the portable decoder form is not available for {family.FAMILY} yet; export "
                                  "the fused form (the default)")
            progress("decoder_model_merged: exporting with optimum's ONNX config and model patcher")
            path = work / GRAPH_FILES["decoder"]
            export_pytorch(family.Decoder(model).eval(), family.decoder_onnx_config(model.config.text_config),
                           OPSET, path)
            files["decoder"] = _save_external_if_large(path)
            decoder_fields = {"form": "portable", "kv_dtype": "float32", "logits": "all_positions",
                              **getattr(family, "portable_decoder_fields", lambda m: {})(model)}
            progress(f"decoder_model_merged: done ({_size_mb(work, files['decoder'])})")
    return files, decoder_fields


def _size_mb(folder: Path, names: list[str]) -> str:
    return f"{sum((folder / n).stat().st_size for n in names) / 1e6:,.1f} MB"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("edgevlm", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _generation_defaults(model) -> dict:
    gen = model.generation_config
    return {
        "temperature": 0.0 if not gen.do_sample else float(gen.temperature or 1.0),
        "top_p": float(gen.top_p or 1.0) if gen.do_sample else 1.0,
        "max_tokens": 512,
    }


def export_package(source: str, out_dir: str | Path, *, quant: str = "fp32", graph_quant: dict | None = None,
                   decoder_form: str | None = None, overwrite: bool = False, verify: bool = True,
                   greedy_tokens: int = 16,
                   revision: str | None = None, progress: Progress | None = None) -> tuple[ModelPackage, object]:
    """Export `source` (local folder or hub id) to `out_dir`; returns the package and the verification report.

    `quant` picks the per-graph plan (`export.quantize.PLANS`); `graph_quant` overrides single graphs. The fp32
    graphs are always exported and verified against transformers first; a quantized package is then measured
    against them (the report's `quantization` lines). `decoder_form` is "fused" or "portable" (see DECODER_FORMS);
    by default fused, except for an fp16 decoder (GPU packages), which is portable.
    """
    from .quantize import QuantizationError, plan_for

    progress = progress or Progress()
    try:
        plan = plan_for(quant)
    except QuantizationError as exc:
        raise ExportError(str(exc)) from None
    plan.update({graph: mode for graph, mode in (graph_quant or {}).items() if mode})
    quantized = any(mode != "fp32" for mode in plan.values())
    if decoder_form is None:
        decoder_form = "portable" if plan["decoder"] == "fp16" else "fused"
    if decoder_form not in DECODER_FORMS:
        raise ExportError(f"unknown decoder form {decoder_form!r} (choose one of: {', '.join(DECODER_FORMS)})")
    if decoder_form == "fused" and plan["decoder"] == "fp16":
        # The fused graph's fp16 conversion (fp16 KV buffer, GroupQueryAttention's CUDA kernel) is not built yet.
        raise ExportError("an fp16 decoder is only available in the portable form: pass --decoder-form portable "
                          "(or another --decoder-quant)")
    out_dir = Path(out_dir)
    hub_kwargs = {"revision": revision} if revision else {}
    config, load_from = _read_config(source, hub_kwargs)
    family = _family_for(config)
    _prepare_output(out_dir, overwrite)

    progress(f"loading {source} ({family.FAMILY})")
    try:
        model = family.load_model(load_from, **hub_kwargs)
        processor = family.load_processor(load_from, **hub_kwargs)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the checkpoint {source}: {str(exc).splitlines()[0]}") from None
    params = sum(p.numel() for p in model.parameters())
    progress(f"loaded: {params / 1e6:,.1f} M parameters")
    # fp32 graphs hold about every weight once; quantizing needs the fp32 reference beside the result.
    _check_space(out_dir, int(params * 4 * (2.2 if quantized else 1.15)) + 50_000_000)

    # A quantized package is made from fp32 graphs exported (and verified) in a hidden folder inside out_dir.
    fp32_dir = out_dir / ".fp32-reference" if quantized else out_dir
    fp32_dir.mkdir(exist_ok=True)
    try:
        files, decoder_fields = _export_graphs(family, model, fp32_dir, progress, decoder_form)
        metadata = family.package_metadata(model, processor)
        template = processor.chat_template or processor.tokenizer.chat_template
        if not template:
            raise ExportError(f"{source} has no chat template (chat_template.json / .jinja / tokenizer_config)")
        for folder in {fp32_dir, out_dir}:
            # pretty=False: the same JSON without indentation (SmolVLM's 3.5 MB file → 1.5 MB)
            processor.tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"), pretty=False)
            (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"out of disk space while writing the package to {out_dir}") from None
        raise

    graphs = {}
    for graph, names in files.items():
        entry = {"file": names[0], **_graph_io(fp32_dir / names[0]), "quantization": "fp32"}
        if len(names) > 1:
            entry["external_data"] = names[1:]
        graphs[graph] = entry
    graphs["decoder"].update(decoder_fields)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": out_dir.resolve().name,
        "family": family.FAMILY,
        "architecture": (config.get("architectures") or [family.ARCHITECTURES[0]])[0],
        "quantization": "fp32",
        "graphs": graphs,
        **metadata,
        "tokenizer": "tokenizer.json",
        "chat_template": "chat_template.jinja",
        "generation": _generation_defaults(model),
        "source": {"checkpoint": str(source), "revision": revision,
                   "model_type": config.get("model_type")},
        "export": {"opset": OPSET, "versions": _versions(),
                   "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    reference = _write_package(fp32_dir, manifest)
    progress(f"fp32 graphs written: {_size_mb(fp32_dir, list(manifest['files']))}")

    report = None
    if verify:
        from .verify import verify_package

        progress(f"verifying against transformers (each graph on a real input, greedy {greedy_tokens} tokens)")
        report = verify_package(model, processor, reference, greedy_tokens=greedy_tokens)
        manifest["verification"] = report.to_dict()
        reference = _write_package(fp32_dir, manifest, files_changed=False)
    if not quantized:
        progress(f"package written: {out_dir}")
        return reference, report

    package = _quantize_package(reference, out_dir, manifest, plan, quant, progress)
    if report is not None:
        from .verify import compare_packages

        progress("measuring the quantized package against the fp32 graphs")
        report.quantization = compare_packages(processor, reference, package, model)
        manifest["verification"] = report.to_dict()
        package = _write_package(out_dir, manifest, files_changed=False)
    shutil.rmtree(fp32_dir)
    progress(f"package written: {_size_mb(out_dir, list(manifest['files']))} in {out_dir}")
    return package, report


def _quantize_package(reference: ModelPackage, out_dir: Path, manifest: dict, plan: dict, quant: str,
                      progress: Progress) -> ModelPackage:
    from .quantize import QuantizationError, quantize_package_graphs

    files = {graph: entry["file"] for graph, entry in manifest["graphs"].items()}
    try:
        reports = quantize_package_graphs(reference.path, out_dir, plan, files=files, progress=progress)
    except QuantizationError as exc:
        raise ExportError(str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"out of disk space while quantizing the package in {out_dir}") from None
        raise
    for graph, quant_report in reports.items():
        entry = manifest["graphs"][graph]
        entry.pop("external_data", None)
        entry.update(quant_report.manifest_entry())
        entry.update(_graph_io(out_dir / entry["file"]))
    decoder = manifest["graphs"]["decoder"]
    if plan.get("decoder") == "int4" and decoder.get("form") == "fused":
        from .prefill_graph import write_prefill_graph

        fields = write_prefill_graph(out_dir, decoder["file"])  # prompt chunks on int8 matrix units
        if fields is not None:
            decoder.update(fields)
            progress(f"decoder: int8 prefill graph {fields['prefill']['file']} ({len(fields['prefill']['weights'])} "
                     f"projections; int8 weights made at load: {fields['prefill']['derived_bytes'] / 1e6:.1f} MB in "
                     "memory, none on disk)")
            # ...and, over the same external weights, the decoder with an int8 KV cache (a load-time choice)
            from .kv_int8 import calibrate, write_int8_cache_graphs

            amax, tokens = calibrate(reference.path)
            decoder["kv_int8"] = write_int8_cache_graphs(out_dir, decoder, amax, tokens)
            progress(f"decoder: int8 KV cache graph ({decoder['kv_int8']['file']}; steps calibrated on {tokens} "
                     "tokens of the fp32 package; `edgevlm serve --kv-cache int8` takes them)")
    manifest["quantization"] = quant if set(plan.values()) != {"fp32"} else "fp32"
    manifest["quantization_plan"] = dict(plan)
    return _write_package(out_dir, manifest)


def _write_package(folder: Path, manifest: dict, *, files_changed: bool = True) -> ModelPackage:
    """List the package's files with their checksums in `manifest`, write it to `folder`, load it back.

    `files_changed=False` when only the manifest's own fields changed: the checksums stand (hashing a 1 GB
    package takes seconds)."""
    if files_changed:
        listed = [n for e in manifest["graphs"].values() for n in [e["file"], *e.get("external_data", [])]]
        listed += [e["prefill"]["file"] for e in manifest["graphs"].values() if "prefill" in e]
        listed += [name for e in manifest["graphs"].values() if "kv_int8" in e
                   for name in (e["kv_int8"]["file"], e["kv_int8"]["scales"]["file"])]
        listed += [manifest["tokenizer"], manifest["chat_template"]]
        manifest["files"] = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
                             for name in listed}
    _write_manifest(folder, manifest)
    return ModelPackage.load(folder, verify=False)


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)


def main(args) -> int:
    """Entry point for `edgevlm export` (args from runtime/cli.py's parser)."""
    progress = Progress()
    try:
        graph_quant = {"vision_encoder": args.vision_quant, "embed_tokens": args.embed_quant,
                       "decoder": args.decoder_quant}
        package, report = export_package(args.source, args.out_dir, quant=args.quant, graph_quant=graph_quant,
                                         decoder_form=args.decoder_form, overwrite=args.overwrite,
                                         verify=not args.no_verify, greedy_tokens=args.verify_tokens,
                                         revision=args.revision, progress=progress)
    except ExportError as exc:
        print(f"edgevlm export: error: {exc}", file=sys.stderr)
        return 2
    if report is None:
        progress("verification skipped (--no-verify)")
        return 0
    for line in report.lines():
        print(line, file=sys.stderr)
    if not report.ok:
        print(f"edgevlm export: error: the package in {args.out_dir} does not match transformers", file=sys.stderr)
        return 1
    progress(f"done: {package.path}")
    return 0
