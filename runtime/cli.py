"""The `edgevlm` command line: one subcommand per task."""

from __future__ import annotations

import argparse
import sys


def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="convert a Hugging Face VLM checkpoint into an edgevlm model package (needs edgevlm[export])",
        description="Convert a Hugging Face checkpoint (local folder, or hub id when online) into a verified "
                    "ONNX model package. Supported families: idefics3 (SmolVLM-256M/500M/2.2B-Instruct).",
    )
    p.add_argument("source", help="checkpoint folder, or a Hugging Face hub id such as HuggingFaceTB/SmolVLM-256M-Instruct")
    p.add_argument("out_dir", help="folder to write the package to (created; must be empty unless --overwrite)")
    p.add_argument("--quant", default="fp32", choices=["fp32"], help="weight precision of the graphs (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package in OUT_DIR")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when SOURCE is a hub id")
    p.add_argument("--verify-tokens", type=int, default=16, metavar="N",
                   help="greedy tokens compared with transformers.generate during verification (default 16)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against transformers")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    try:
        from edgevlm.export.convert import main
    except ImportError as exc:
        print(f"edgevlm export: error: the exporter needs torch, transformers, optimum and onnx ({exc.name} is "
              "missing): pip install 'edgevlm[export]'", file=sys.stderr)
        return 2
    return main(args)


def build_parser() -> argparse.ArgumentParser:
    from edgevlm import __version__

    parser = argparse.ArgumentParser(prog="edgevlm", description="Offline vision-language models with an "
                                     "OpenAI-compatible API.")
    parser.add_argument("--version", action="version", version=f"edgevlm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_export(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
