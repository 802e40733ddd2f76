"""Shared fixtures: a tiny random-weight SmolVLM checkpoint built from the vendored model card, and its package.

Both are built once per test session (a few seconds) in a temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

# Never reach for the Hugging Face hub from the test suite, whatever the machine's network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Package verification records (runtime/package.py) go to a folder of this test session, not the user's cache;
# servers started by the tests inherit it.
if "EDGEVLM_VERIFY_RECORD" not in os.environ:
    import tempfile

    os.environ["EDGEVLM_VERIFY_RECORD"] = str(Path(tempfile.mkdtemp(prefix="edgevlm-tests-")) / "verified.json")

FIXTURES = Path(__file__).parent / "fixtures"
SMOLVLM_CARD = FIXTURES / "smolvlm-256m-instruct"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from edgevlm.export.random_model import TinyDims, build_random_idefics3

    return build_random_idefics3(SMOLVLM_CARD, tmp_path_factory.mktemp("tiny-smolvlm"), dims=TinyDims())


def export_tiny(checkpoint: Path, out: Path, **options) -> Path:
    """Export `checkpoint` into `out` quietly (export_package's `options`), verified against transformers."""
    from edgevlm.export.convert import Progress, export_package

    with open(os.devnull, "w") as quiet:
        package, report = export_package(str(checkpoint), out, progress=Progress(quiet), **options)
    assert report.ok, "\n".join(report.lines())
    return package.path


@pytest.fixture(scope="session")
def tiny_package(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_tiny(tiny_checkpoint, tmp_path_factory.mktemp("packages") / "tiny-smolvlm")


@pytest.fixture(scope="session")
def int4_package(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint as an int4 package: fused decoder, int8 prefill graph, int8 KV cache graphs."""
    return export_tiny(tiny_checkpoint, tmp_path_factory.mktemp("packages") / "tiny-int4", quant="int4")


@pytest.fixture(scope="session")
def tiny_package_portable(tiny_checkpoint, tmp_path_factory) -> Path:
    """The same checkpoint with the traced (onnx-community style) decoder instead of the default fused one."""
    return export_tiny(tiny_checkpoint, tmp_path_factory.mktemp("packages") / "tiny-smolvlm-portable",
                       decoder_form="portable")


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    from edgevlm.export.families.idefics3 import load_model

    return load_model(str(tiny_checkpoint))


@pytest.fixture(scope="session")
def hf_processor(tiny_checkpoint):
    from edgevlm.export.families.idefics3 import load_processor

    return load_processor(str(tiny_checkpoint))


class ServerProcess:
    """`edgevlm serve` in a subprocess on a free port; ready once it prints that the model is loaded."""

    def __init__(self, *args: str, env: dict | None = None):
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "edgevlm.runtime.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.url = None
        for line in self.proc.stdout:  # blocks until the server says where it listens, then that it is ready
            self.lines.append(line)
            if "listening on " in line:
                self.url = line.split("listening on ")[1].split()[0]
            if " ready" in line or "error" in line:
                break
        if self.url is None or not self.lines[-1].rstrip().endswith("ready"):
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        # Keep reading what it prints, so a full pipe never blocks the server.
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self) -> int:
        """Wait for the process to exit by itself (after a signal the test sent); its exit code."""
        self.proc.wait(timeout=60)
        if hasattr(self, "_reader"):  # not yet there when it failed to start
            self._reader.join(timeout=30)
        return self.proc.returncode


@pytest.fixture(scope="session")
def server(tiny_package):
    process = ServerProcess("--model", str(tiny_package))
    yield process
    process.stop()


@pytest.fixture(scope="session")
def start_server(tiny_package):
    """Start extra servers with their own options; each is stopped at the end of the session."""
    started = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        process = ServerProcess("--model", str(tiny_package), *args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
