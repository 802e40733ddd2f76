"""Read and verify a model package: a folder of ONNX graphs, model.json, tokenizer and chat template.

The format is described in models/README.md. A package is self-contained; this module refuses one whose files are
missing or whose checksums do not match model.json, with a message that says which file and what to do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import PackageError
from .families import FAMILIES

FORMAT = "edgevlm.package"
FORMAT_VERSION = 1
MANIFEST = "model.json"
GRAPHS = ("vision_encoder", "embed_tokens", "decoder")


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ModelPackage:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> "ModelPackage":
        """Read `path`/model.json; with `verify`, check every listed file's size and sha256."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise PackageError(f"model package {path}: no such directory")
        if not manifest_path.is_file():
            raise PackageError(f"model package {path}: {MANIFEST} is missing (not an edgevlm model package?)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackageError(f"model package {path}: {MANIFEST} is not readable JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise PackageError(f"model package {path}: {MANIFEST} is not an edgevlm package manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise PackageError(
                f"model package {path}: format version {manifest.get('format_version')!r} is not supported by this "
                f"runtime (it reads version {FORMAT_VERSION}); re-export the model with this edgevlm version"
            )
        if manifest.get("family") not in FAMILIES:
            raise PackageError(
                f"model package {path}: model family {manifest.get('family')!r} is not supported "
                f"(supported: {', '.join(FAMILIES)})"
            )
        package = cls(path=path, manifest=manifest)
        if verify:
            package.verify()
        return package

    def verify(self) -> None:
        """Every file listed in model.json exists with the recorded size and sha256."""
        for name, entry in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise PackageError(f"model package {self.path}: {name} is missing")
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise PackageError(
                    f"model package {self.path}: {name} is {size} bytes, model.json says {entry['bytes']} "
                    "(truncated or replaced file; re-export or re-copy the package)"
                )
            if sha256_file(file) != entry["sha256"]:
                raise PackageError(
                    f"model package {self.path}: {name} does not match its sha256 in model.json "
                    "(corrupted file; re-export or re-copy the package)"
                )

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.path.name

    def graph(self, name: str) -> dict:
        return self.manifest["graphs"][name]

    def graph_path(self, name: str) -> Path:
        return self.path / self.graph(name)["file"]

    @property
    def text(self) -> dict:
        return self.manifest["text"]

    @property
    def vision(self) -> dict:
        return self.manifest["vision"]

    @property
    def tokens(self) -> dict:
        return self.manifest["tokens"]

    @property
    def image_processor(self) -> dict:
        return self.manifest["image_processor"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]

    @property
    def chat_template(self) -> str:
        return (self.path / self.manifest["chat_template"]).read_text(encoding="utf-8")

    @property
    def generation_defaults(self) -> dict:
        return self.manifest.get("generation", {})
