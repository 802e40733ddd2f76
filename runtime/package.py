"""Read and verify a model package: a folder of ONNX graphs, model.json, tokenizer and chat template.

The format is described in models/README.md. A package is self-contained; this module refuses one whose files are
missing or whose checksums do not match model.json, with a message that says which file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

from .errors import PackageError
from .families import FAMILIES

FORMAT = "edgevlm.package"
FORMAT_VERSION = 1
MANIFEST = "model.json"
GRAPHS = ("vision_encoder", "embed_tokens", "decoder")


# Verification modes: "auto" hashes a file unless the verification record says this very file (same path, size,
# mtime, ctime, inode and device) already matched this sha256; "always" hashes every file at every load.
VERIFY_MODES = ("auto", "always")
VERIFY_ENV = "EDGEVLM_VERIFY_PACKAGE"  # "always": full sha256 at every load, whatever the caller asked for
RECORD_ENV = "EDGEVLM_VERIFY_RECORD"  # the record file; "off" (or empty): no record, every load hashes
RECORD_LIMIT = 512  # files remembered; the least recently verified go first
# A file changed within this long of its hashing is not remembered: a filesystem with coarse timestamps (FAT: 2 s)
# could give a later same-size rewrite the same mtime and ctime ("racy git"). It is hashed again next load.
RACY_NS = 3_000_000_000


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()  # update() releases the GIL for large buffers: hashing can run beside other work
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def record_path() -> Path | None:
    """Where verified files are remembered: $EDGEVLM_VERIFY_RECORD, else $XDG_CACHE_HOME/edgevlm/verified.json,
    else ~/.cache/edgevlm/verified.json; None when turned off."""
    value = os.environ.get(RECORD_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgevlm" / "verified.json"


def _signature(stat: os.stat_result) -> list[int]:
    """What any change to a file changes: a rewrite moves mtime and ctime (ctime cannot be set back: `touch -d` and
    os.utime set mtime and move ctime to now), a replacement (rename over it, re-copy) gives a new inode."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


class VerificationRecord:
    """path → (stat signature, sha256) of files whose full sha256 matched: a small JSON file, written atomically
    (temporary file + rename), read once per load. Unreadable or unwritable: loads hash every file, as without it."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.added: dict[str, dict] = {}
        if path is not None:
            self.entries = self._read(path)

    @staticmethod
    def _read(path: Path) -> dict[str, dict]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            files = data["files"] if data.get("version") == 1 else {}
            return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return {}

    def matches(self, file: Path, stat: os.stat_result, sha256: str) -> bool:
        entry = self.entries.get(str(file))
        return entry is not None and entry.get("sha256") == sha256 and entry.get("stat") == _signature(stat)

    def remember(self, file: Path, before: os.stat_result, sha256: str, hashed_at_ns: int) -> None:
        try:
            after = os.stat(file)
        except OSError:
            return
        if _signature(after) != _signature(before):  # changed while it was hashed
            return
        if hashed_at_ns - max(before.st_mtime_ns, before.st_ctime_ns) < RACY_NS:
            return
        self.added[str(file)] = {"stat": _signature(before), "sha256": sha256, "at": time.time()}

    def save(self) -> None:
        if self.path is None or not self.added:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            entries = self._read(self.path)  # another process may have added its own since we read it
            entries.update(self.added)
            if len(entries) > RECORD_LIMIT:
                keep = sorted(entries, key=lambda k: entries[k].get("at", 0), reverse=True)[:RECORD_LIMIT]
                entries = {k: entries[k] for k in keep}
            fd, temporary = tempfile.mkstemp(prefix=".verified-", suffix=".json", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"version": 1, "files": entries}, f)
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except (OSError, TypeError, ValueError):
            pass  # not writable: the next load hashes again


class Verification:
    """`ModelPackage.verify` running on its own thread (`ModelPackage.start_verify`); `result()` waits and raises
    its PackageError, if any."""

    def __init__(self, package: "ModelPackage", mode: str):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(package, mode), name="edgevlm-verify", daemon=True)
        self._thread.start()

    def _run(self, package: "ModelPackage", mode: str) -> None:
        try:
            package.verify(mode)
        except BaseException as exc:
            self._error = exc

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


@dataclass
class ModelPackage:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path, *, verify: bool | str = True) -> "ModelPackage":
        """Read `path`/model.json; with `verify` (True or "auto", or "always"), check every listed file's size and
        sha256 (`verify`)."""
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
            package.verify("auto" if verify is True else verify)
        return package

    def verify(self, mode: str = "auto") -> None:
        """Every file listed in model.json exists with the recorded size and sha256.

        "auto": a file the verification record (`record_path`) holds with its current size, mtime, ctime, inode and
        device and this sha256 is not hashed again; any other is hashed in full, and remembered when it matches.
        "always" (or EDGEVLM_VERIFY_PACKAGE=always): every file is hashed.
        """
        if mode not in VERIFY_MODES:
            raise ValueError(f"verify mode {mode!r}: use one of {', '.join(VERIFY_MODES)}")
        if os.environ.get(VERIFY_ENV, "").strip().lower() == "always":
            mode = "always"
        record = VerificationRecord(record_path() if mode == "auto" else None)
        try:
            for name, entry in self.manifest["files"].items():
                file = (self.path / name).absolute()
                try:
                    stat = os.stat(file)
                except OSError:
                    stat = None
                if stat is None or not S_ISREG(stat.st_mode):
                    raise PackageError(f"model package {self.path}: {name} is missing")
                if stat.st_size != entry["bytes"]:
                    raise PackageError(
                        f"model package {self.path}: {name} is {stat.st_size} bytes, model.json says "
                        f"{entry['bytes']} (truncated or replaced file; re-export or re-copy the package)"
                    )
                if record.matches(file, stat, entry["sha256"]):
                    continue
                hashed_at = time.time_ns()
                if sha256_file(file) != entry["sha256"]:
                    raise PackageError(
                        f"model package {self.path}: {name} does not match its sha256 in model.json "
                        "(corrupted file; re-export or re-copy the package)"
                    )
                record.remember(file, stat, entry["sha256"], hashed_at)
        finally:
            record.save()  # the files that matched before a failure stay remembered

    def start_verify(self, mode: str = "auto") -> Verification:
        """`verify` on a thread, beside other loading work; `.result()` waits for it and raises its error."""
        return Verification(self, mode)

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
