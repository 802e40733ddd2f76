"""The wheel, as `pip install edgevlm` gets it: what it holds and declares, and that installed into a fresh
virtual environment, away from this checkout, `edgevlm --version`, `edgevlm serve` (the bundled demo model and the
playground) and `edgevlm.load()` work.

The wheel is built by the build backend pyproject.toml names (PEP 517's build_wheel, as `python -m build
--no-isolation` calls it) from a copy of the checkout's files (git's tracked and untracked, not ignored), so the
checkout gets no build/ folder. The fresh environment is made without pip (`venv --without-pip`); this
environment's pip installs the wheel into it (`pip --python`) with --no-deps --no-index, and a .pth file lends it
this environment's packages for the dependencies. A .pth file's folder is not a site folder, so the editable
install of this checkout there (its finder is started by a .pth file of its own) stays off: the test checks that
`edgevlm` is imported from the wheel's files.
"""

from __future__ import annotations

import base64
import email.parser
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading

import zipfile
from pathlib import Path

import pytest

import edgevlm

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXPORT_ONLY = {"torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxscript"}
BUNDLED = "edgevlm/models/demo-shapes"


def _source_files() -> list[str]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist): every file
        skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache"}
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                and not skip.intersection(p.relative_to(ROOT).parts) and not p.name.endswith(".egg-info")]
    return [name for name in listed if name and (ROOT / name).is_file()]  # not files deleted but still tracked


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("source")
    for name in _source_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    backend = PYPROJECT["build-system"]["build-backend"]
    build = subprocess.run([sys.executable, "-c", f"import {backend} as b, sys; print(b.build_wheel(sys.argv[1]))",
                            str(out)], cwd=source, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return out / build.stdout.split()[-1]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    lent = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in lent))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True, timeout=300)
    return env


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")})


def test_the_wheel_holds_the_runtime_the_playground_and_the_demo_model(wheel, source):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("runtime", "edgevlm/runtime"), ("export", "edgevlm/export"), ("edgevlm", "edgevlm")):
        modules = {f"{package}/{p.relative_to(source / folder).as_posix()}" for p in (source / folder).rglob("*.py")}
        assert modules and modules <= names, f"left out of the wheel: {sorted(modules - names)}"  # a new subpackage
    playground = {f"edgevlm/runtime/playground/{p.name}" for p in (source / "runtime" / "playground").iterdir()}
    assert {"edgevlm/runtime/playground/index.html"} < playground <= names
    model = {f"{BUNDLED}/{p.name}" for p in (source / "models" / "demo-shapes").iterdir()}
    assert f"{BUNDLED}/model.json" in model
    assert model <= names, ("the bundled demo model is left out of the wheel (pyproject.toml: package edgevlm.models "
                            f"from models/, package-data demo-shapes/*): {sorted(model - names)}")
    assert not [n for n in names if re.match(r"(tests|benchmarks|examples|docs|\.ci)/|.*(conftest|test_\w+)\.py$", n)]


def test_the_runtime_requires_no_export_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(info).decode())
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert metadata["Name"] == "edgevlm"
    assert metadata["Version"] == PYPROJECT["project"]["version"] == edgevlm.__version__

    def name(requirement: str) -> str:
        return re.match(r"[A-Za-z0-9._-]+", requirement).group().lower().replace("_", "-")

    requires = metadata.get_all("Requires-Dist")
    runtime = {name(r) for r in requires if "extra ==" not in r}
    assert runtime == {name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert not runtime & EXPORT_ONLY
    export = {name(r) for r in requires if re.search(r"extra\s*==\s*['\"]export['\"]", r)}
    assert EXPORT_ONLY <= export
    assert re.search(r"^edgevlm\s*=\s*edgevlm\.runtime\.cli:main$", entry_points, re.M)


def test_installed_from_the_wheel(venv, tmp_path):
    out = _run(venv, "edgevlm", "--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"edgevlm {edgevlm.__version__}", out.stderr
    out = _run(venv, "python", "-c", "import edgevlm, edgevlm.runtime.cli as c; print(edgevlm.__file__); "
               "print(c.DEFAULT_MODEL); print(edgevlm.load().ask('Hello', temperature=0).strip())", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    imported, bundled, answer = out.stdout.splitlines()
    assert Path(imported).is_relative_to(venv) and Path(bundled).is_relative_to(venv), out.stdout  # not this checkout
    assert answer == "I am a small demo model that describes shapes and colours in images."


def test_edgevlm_serve_from_the_wheel(venv, tmp_path):
    from PIL import Image, ImageDraw

    server = subprocess.Popen([str(venv / "bin" / "edgevlm"), "serve", "--port", "0"], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    try:
        url = None
        for line in server.stdout:  # the address, then the model's "ready" (or an error)
            lines.append(line)
            url = url or (line.split("listening on ")[1].split()[0] if "listening on " in line else None)
            if " ready" in line or "error" in line:
                break
        assert url and lines[-1].rstrip().endswith("ready"), "".join(lines)
        threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
        host, port = url.removeprefix("http://").rsplit(":", 1)

        def request(method: str, path: str, body: dict | None = None) -> tuple[int, str, bytes]:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
            response = conn.getresponse()
            result = response.status, response.headers["Content-Type"], response.read()
            conn.close()
            return result

        status, _, body = request("GET", "/health")
        assert status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["model"] == "demo-shapes"
        image = Image.new("RGB", (200, 200), "white")
        ImageDraw.Draw(image).ellipse([60, 60, 140, 140], fill=(220, 30, 30))
        png = io.BytesIO()
        image.save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        status, _, body = request("POST", "/v1/chat/completions", {
            "model": "demo-shapes", "temperature": 0, "max_tokens": 20, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What shape is this?"}]}]})
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"].strip() == "A circle."
        status, kind, body = request("GET", "/")
        assert status == 200 and kind.startswith("text/html") and b"playground.js" in body
        status, kind, _ = request("GET", "/playground/playground.js")
        assert status == 200 and kind.startswith("text/javascript")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    assert code == 0, "".join(lines)


def test_without_the_bundled_model_the_message_says_so(venv, tmp_path):
    bundled = Path(_run(venv, "python", "-c", "import edgevlm.runtime.cli as c; print(c.DEFAULT_MODEL)",
                        cwd=tmp_path).stdout.strip())
    aside = bundled.with_name("demo-shapes.aside")
    if bundled.exists():
        bundled.rename(aside)  # put back below, for the tests that use it
    try:
        out = _run(venv, "edgevlm", "serve", "--port", "0", cwd=tmp_path)
        assert out.returncode == 2
        assert out.stderr.strip() == (f"edgevlm serve: error: no --model given and the bundled demo model is not "
                                      f"installed ({bundled} has no model.json); pass --model PATH to a package made "
                                      "by `edgevlm export`")
        out = _run(venv, "python", "-c", "import edgevlm; edgevlm.load()", cwd=tmp_path)
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1] == (
            f"edgevlm.runtime.errors.PackageError: no path given and the bundled demo model is not installed "
            f"({bundled} has no model.json); pass the path of a package made by `edgevlm export`")
    finally:
        if aside.exists():
            aside.rename(bundled)
