"""The `edgevlm` command line: one subcommand per task."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import PackageError


def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="convert a Hugging Face VLM checkpoint into an edgevlm model package (needs edgevlm[export])",
        description="Convert a Hugging Face checkpoint (local folder, or hub id when online) into a verified "
                    "ONNX model package. Supported families: idefics3 (SmolVLM-256M/500M/2.2B-Instruct).",
    )
    p.add_argument("source", help="checkpoint folder, or a Hugging Face hub id such as HuggingFaceTB/SmolVLM-256M-Instruct")
    p.add_argument("out_dir", help="folder to write the package to (created; must be empty unless --overwrite)")
    modes = ["fp32", "fp16", "int8", "int4"]
    p.add_argument("--quant", default="fp32", choices=modes,
                   help="precision plan: fp32; int8 (all graphs); int4 (decoder 4-bit, embeddings and vision int8); "
                        "fp16 (GPU packages). Default fp32")
    for graph, flag in (("vision encoder", "--vision-quant"), ("token embeddings", "--embed-quant"),
                        ("decoder", "--decoder-quant")):
        p.add_argument(flag, choices=modes, help=f"override the plan for the {graph} graph")
    p.add_argument("--decoder-form", choices=["fused", "portable"],
                   help="fused (default; GroupQueryAttention, in-place KV cache, fastest on CPU) or portable (the "
                        "traced graph with onnx-community's decoder_model_merged.onnx interface; default for fp16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package in OUT_DIR")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when SOURCE is a hub id")
    p.add_argument("--verify-tokens", type=int, default=16, metavar="N",
                   help="greedy tokens compared with transformers.generate during verification (default 16)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against transformers")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from importlib.util import find_spec

    # export/convert.py imports the export stack inside the functions that use it, so importing convert succeeds
    # in a runtime-only install and torch would go missing halfway through, as a traceback: check the extra first.
    missing = []
    for module, dist in (("torch", "torch"), ("transformers", "transformers"), ("optimum", "optimum"),
                         ("optimum.exporters.onnx", "optimum-onnx"), ("onnx", "onnx")):
        try:
            found = find_spec(module) is not None
        except ImportError:  # the parent package is missing (optimum, for optimum.exporters.onnx)
            found = False
        if not found:
            missing.append(dist)
    if missing:
        print(f"edgevlm export: error: the exporter needs torch, transformers, optimum, optimum-onnx and onnx "
              f"({', '.join(missing)} missing): pip install 'edgevlm[export]'", file=sys.stderr)
        return 2
    from edgevlm.export.convert import main

    return main(args)


# The bundled demo model (models/demo-shapes, step 4) is what `chat` and `serve` use without --model.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo-shapes"


def _add_chat(subparsers) -> None:
    p = subparsers.add_parser("chat", help="ask a model about images from the terminal; streams the answer",
                              description="Answer one question about zero or more images, streaming the text to "
                                          "stdout; time to first token and speed go to stderr.")
    p.add_argument("question")
    p.add_argument("--model", help=f"model package folder (default: the bundled model, {DEFAULT_MODEL})")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="image file (repeat for several)")
    p.add_argument("--detail", choices=["auto", "low", "high"], default="auto",
                   help="low: one tile per image (faster); auto/high: the model's image splitting")
    p.add_argument("--system", help="a system message")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.set_defaults(func=_run_chat)


def _resolve_model(model: str | None) -> Path:
    if model:
        return Path(model)
    if not (DEFAULT_MODEL / "model.json").is_file():
        raise PackageError(f"no --model given and the bundled demo model is not installed ({DEFAULT_MODEL} has no "
                           "model.json); pass --model PATH to a package made by `edgevlm export`")
    return DEFAULT_MODEL


def _run_chat(args) -> int:
    import base64
    import time

    from .errors import EdgeVLMError
    from .sampling import SamplingParams
    from .vlm import VisionLanguageModel

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_tokens=args.max_tokens).validate()
        content = []
        for file in args.image:
            try:
                data = Path(file).read_bytes()
            except OSError as exc:
                raise EdgeVLMError(f"cannot read image {file}: {exc.strerror}") from None
            url = "data:;base64," + base64.b64encode(data).decode("ascii")
            content.append({"type": "image_url", "image_url": {"url": url, "detail": args.detail}})
        content.append({"type": "text", "text": args.question})
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": content}]
        start = time.perf_counter()
        model = VisionLanguageModel.load(_resolve_model(args.model), device=args.device, threads=args.threads)
        loaded = time.perf_counter()
        prompt = model.prepare(messages, params)
        first = None
        count = 0
        for step in model.generate(prompt, params):
            count += 1
            if first is None:
                first = time.perf_counter()
            sys.stdout.write(step.text)
            sys.stdout.flush()
        end = time.perf_counter()
    except EdgeVLMError as exc:
        print(f"edgevlm chat: error: {exc.message}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    decode_rate = (count - 1) / (end - first) if count > 1 and end > first else float("nan")
    print(f"load {loaded - start:.2f} s · prompt {len(prompt.input_ids)} tokens ({prompt.image_tokens} image) · "
          f"time to first token {first - loaded:.2f} s · {count} tokens · {decode_rate:.1f} tokens/s",
          file=sys.stderr)
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0 to 65535; 0 picks a free one)")
    return port


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):  # NaN compares false: refused too
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value

    return parse


def _add_serve(subparsers) -> None:
    from .limits import EngineConfig, ServerLimits

    config = ServerLimits()
    images = config.images
    engine = EngineConfig()
    p = subparsers.add_parser("serve", help="serve a model over the OpenAI Chat Completions API",
                              description="Serve POST /v1/chat/completions (streaming and not), GET /v1/models, "
                                          "GET /health, GET /openapi.json, and a playground page at GET / "
                                          "(open it in a browser). Sizes are in MB of 10^6 bytes and "
                                          "MP of 10^6 pixels; the defaults fit a 4 GB device.")
    p.add_argument("--model", help=f"model package folder (default: the bundled model, {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=os.environ.get("EDGEVLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $EDGEVLM_API_KEY; none = open)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=_positive(int), help="CPU threads for inference (default: all cores)")
    p.add_argument("--verify-package", choices=["auto", "always"], default="auto",
                   help="auto (default): sha256 of each package file, except files the verification record "
                        "holds unchanged since they last matched (same size, mtime, ctime, inode); always: the "
                        "sha256 of every file at every start (also EDGEVLM_VERIFY_PACKAGE=always)")
    limits = p.add_argument_group("limits", "what one client can make the server hold (README: Limits)")
    for flag, kind, default, text in (
        ("--max-queue", int, config.max_queue, "requests running or waiting before 429"),
        ("--max-body-mb", float, config.max_body_bytes / 1e6, "largest request body, in MB (413 past it)"),
        ("--max-pending-body-mb", float, config.max_pending_body_bytes / 1e6,
         "request bodies of all requests running or waiting, in MB (429 past it)"),
        ("--read-timeout", float, config.read_timeout, "seconds for a request body to arrive (408 past it)"),
        ("--write-timeout", float, config.write_timeout,
         "seconds a client may leave the server's writes unread before it is dropped"),
        ("--shutdown-timeout", float, config.shutdown_timeout,
         "seconds running requests get to finish after SIGTERM/SIGINT before they are cut"),
        ("--max-n", int, config.max_n, "choices (n) per request"),
        ("--max-request-tokens", int, None,
         "n × max_tokens per request (default: the model's context length)"),
        ("--max-images", int, images.max_images, "images per request"),
        ("--max-image-mb", float, images.max_bytes / 1e6, "one image's encoded (file) size, in MB"),
        ("--max-image-mp", float, images.max_pixels / 1e6, "one image's decoded size, in megapixels"),
        ("--max-request-image-mp", float, images.max_request_pixels / 1e6,
         "decoded size of a request's images together, in megapixels"),
    ):
        shown = "" if default is None else f" (default {default:g})"
        limits.add_argument(flag, type=_positive(kind), default=default, help=text + shown)
    group = p.add_argument_group("engine", "what the engine runs at once and holds (README: Concurrency)")
    group.add_argument("--max-batch", type=_positive(int), default=engine.max_batch,
                       help=f"sequences (choices of all requests) decoded together: KV slots (default "
                            f"{engine.max_batch})")
    group.add_argument("--kv-budget-mb", "--max-kv-mb", dest="kv_budget_mb", type=_positive(float),
                       default=engine.kv_budget_bytes / 1e6,
                       help="the KV cache of all slots, in MB; each slot holds budget / max-batch positions "
                            f"(default {engine.kv_budget_bytes / 1e6:g})")
    group.add_argument("--image-cache-mb", type=_positive(float), default=engine.image_cache_bytes / 1e6,
                       help="image features kept for later questions about the same image, in MB (default "
                            f"{engine.image_cache_bytes / 1e6:g})")
    group.add_argument("--prefix-cache-mb", type=_positive(float), default=engine.prefix_cache_bytes / 1e6,
                       help="KV that idle slots keep for prefix reuse (the next turn of a conversation), in MB; "
                            "past it the least recently used are emptied and their memory given back (default "
                            f"{engine.prefix_cache_bytes / 1e6:g})")
    group.add_argument("--no-int8-prefill", dest="int8_prefill", action="store_false",
                       help="int4 packages: run prompts on the 4-bit weights instead of int8 weights made at load "
                            "(prefill ~2x slower on CPUs with int8 matrix units; ~150 MB less memory at "
                            "SmolVLM-256M size)")
    group.add_argument("--kv-cache", choices=("auto", "float32", "int8"), default=engine.kv_cache,
                       help="KV cache precision: int8 (int4 packages carry it) holds 4x the positions per "
                            "--kv-budget-mb and decodes long contexts faster, at a small accuracy cost; float32 is "
                            "the reference's; auto: int8 where the package has it, else float32 (README: KV cache "
                            f"precision) (default {engine.kv_cache})")
    p.set_defaults(func=_run_serve)


def _image_limits(args):
    from .limits import ImageLimits

    return ImageLimits(max_images=args.max_images, max_bytes=int(args.max_image_mb * 1e6),
                       max_pixels=int(args.max_image_mp * 1e6),
                       max_request_pixels=int(args.max_request_image_mp * 1e6))


def _engine_config(args):
    from .limits import EngineConfig

    return EngineConfig(max_batch=args.max_batch, kv_budget_bytes=int(args.kv_budget_mb * 1e6),
                        image_cache_bytes=int(args.image_cache_mb * 1e6),
                        prefix_cache_bytes=int(args.prefix_cache_mb * 1e6),
                        int8_prefill=getattr(args, "int8_prefill", True),
                        kv_cache=getattr(args, "kv_cache", "auto"))


def server_config(args, path: Path):
    """The `ServerConfig` that `edgevlm serve`'s parsed flags describe (also what each replica of a Ray Serve
    fleet runs, runtime/fleet.py)."""
    from .limits import ServerLimits
    from .server import ServerConfig

    limits = ServerLimits(
        max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 1e6),
        max_pending_body_bytes=int(args.max_pending_body_mb * 1e6), read_timeout=args.read_timeout,
        write_timeout=args.write_timeout, shutdown_timeout=args.shutdown_timeout, max_n=args.max_n,
        max_request_tokens=args.max_request_tokens, images=_image_limits(args))
    config = ServerConfig(model_path=path, host=args.host, port=args.port, api_key=args.api_key or None,
                          device=args.device, threads=args.threads, limits=limits,
                          verify=getattr(args, "verify_package", "auto"), engine=_engine_config(args))
    return config


def _preload(args, path: Path):
    """Start loading the model on a thread now, while the main thread imports the server (aiohttp, the API
    layer): onnxruntime builds its sessions and hashlib hashes without the GIL, so ~0.3-0.4 s of imports overlap
    them. → a loader for `serve`: it waits for this load and returns the model or raises its error. Nothing
    says "ready" before the server has its port and this load (verification included) succeeded."""
    import threading

    done: dict = {}

    def run() -> None:
        try:
            from . import memory
            from .vlm import VisionLanguageModel

            memory.configure()  # before the load allocates (serve() calls it again: the same setting)
            done["model"] = VisionLanguageModel.load(
                path, verify=getattr(args, "verify_package", "auto"), device=args.device, threads=args.threads,
                image_limits=_image_limits(args), engine_config=_engine_config(args), defer_vision=True)
        except BaseException as exc:
            done["error"] = exc

    thread = threading.Thread(target=run, name="edgevlm-load", daemon=True)
    thread.start()

    def loader():
        thread.join()
        if "error" in done:
            raise done.pop("error")
        return done.pop("model")

    return loader


def _run_serve(args) -> int:
    import asyncio

    from .package import ModelPackage

    try:
        path = _resolve_model(args.model)
        ModelPackage.load(path, verify=False)  # a wrong path fails here, before the port opens
    except PackageError as exc:
        print(f"edgevlm serve: error: {exc.message}", file=sys.stderr)
        return 2
    loader = _preload(args, path)
    from .server import serve

    config = server_config(args, path)
    try:
        asyncio.run(serve(config, loader=loader))
    except OSError as exc:  # the port could not be bound: nothing said "ready"
        reason = os.strerror(exc.errno) if exc.errno else exc
        print(f"edgevlm serve: error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        # The early load is still inside onnxruntime on its thread: an interpreter exit under it aborts the
        # process ("terminate called without an active exception", status -6). Let it finish, then drop it.
        try:
            loader().close()
        except BaseException:  # noqa: BLE001 - its own error does not matter any more
            pass
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from edgevlm import __version__

    parser = argparse.ArgumentParser(prog="edgevlm", description="Offline vision-language models with an "
                                     "OpenAI-compatible API.")
    parser.add_argument("--version", action="version", version=f"edgevlm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_export(subparsers)
    _add_chat(subparsers)
    _add_serve(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
