"""`edgevlm serve` against llama.cpp's `llama-server` (the "llama.cpp anchor"), same run, same OpenAI streaming client.

    python benchmarks/serve_bench.py --anchor llama.cpp                  # edgevlm int4 vs llama.cpp -fa on / off
    python benchmarks/serve_bench.py --anchor llama.cpp --fa on off auto --repeats 5 --output benchmarks/RESULTS.md
    python benchmarks/serve_bench.py --anchor llama.cpp --prepare-only   # only build + convert (cached)
    python benchmarks/serve_bench.py --package PKG                       # edgevlm alone, no anchor
    python benchmarks/serve_bench.py --anchor llama.cpp --repeats 1 --no-warmup   # smoke run: every figure once

Not in CI: --anchor llama.cpp builds and converts on first use, then caches in --workdir (default
/tmp/edgevlm-bench/llama.cpp), skipping what is already there:
1. the llama.cpp source vendored in PyPI's llama-cpp-python sdist (`pip download llama-cpp-python==VERSION --no-deps
   --no-binary :all:`, extracted; --llama-cpp-python), or --llama-src DIR;
2. `llama-server` and `llama-quantize`, CPU only (cmake Release, GGML_NATIVE — on a CPU with AMX every extension
   but AMX instead, in WORKDIR/build-no-amx: ggml's AMX matmul crashed this llama.cpp — no curl/openssl/web UI download,
   static; 15 minutes on 2 busy cores) in WORKDIR/build;
3. the checkpoint (--checkpoint, the HF Idefics3 checkpoint the package was exported from; default the random
   SmolVLM-256M-dimension one benchmarks/bench.py builds) to GGUF with the sdist's convert_hf_to_gguf.py (gguf-py
   on PYTHONPATH, this Python; it needs torch, transformers, numpy and sentencepiece): the text model to f16, then
   `llama-quantize ... Q4_0`, and the vision tower + connector with `--mmproj --outtype q8_0`.

Engines: the edgevlm package (--package, default the int4 one) through `python -m edgevlm.runtime.cli serve
--threads T --kv-cache K` for each K of --kv-cache (default auto: int8 for an int4 package), and `llama-server -m
TEXT_Q4_0 --mmproj MMPROJ_Q8_0 -t T -np 1 -fa X --cache-ram 0 -ctk C -ctv C` for each X of --fa (its default is auto)
and C of --llama-kv (f16, its default; q8_0 with -fa on only, as llama.cpp quantizes V only with flash attention). --threads (default 2) goes to both. Each engine runs as its own server process, all of them
up for the whole run and idle while another is measured (an idle server uses no CPU: checked); a warm-up of each
request kind first, then --repeats repetitions, engines interleaved within each (for rep: for engine: image, short
text, long text). Every request is fresh (a new image / a new prompt), so no cache helps: llama-server also gets
"cache_prompt": false (and --cache-ram 0: no host-memory prompt cache to fill RSS). Greedy,
max_tokens --max-tokens (64), EOS never chosen: edgevlm gets logit_bias -100 on the package's EOS ids (edgevlm has no
ignore_eos), llama-server "ignore_eos": true; a run with fewer than 16 completion tokens is discarded anyway.

Figures (medians over the repetitions):
- TTFT, image: request sent → first content chunk, a fresh 512×512 sample image (SmolVLM splits it into 16 tiles
  and a global view, 17 × 64 image tokens: 1,139 prompt tokens in edgevlm serve, 1,140 in llama-server, whose mtmd
  does the same split) with "Describe this image.";
- decode after the image, decode with a short text prompt, decode at a 2,034-token text context: from the stream,
  (completion_tokens - 1) / (time of the last content chunk - time of the first), completion_tokens from
  stream_options.include_usage (or the content chunks, when a server sends no usage);
- TTFT, 2,034-token text prompt (a prompt cut to 2,034 tokens of the package's tokenizer; with the chat template
  2,043 in both servers): prefill;
- peak RSS: VmHWM of the server process (/proc/PID/status) at the end of the run, after every request;
- cold start: process spawn → first 200 from GET /health (model loaded and warmed up), --repeats fresh processes
  per engine after the measured requests (the others stopped), page cache warm, interleaved;
- size on disk: the package's files; the text Q4_0 GGUF + the mmproj GGUF.

The table goes to stdout and, with --output, into that file (replacing its "## llama.cpp anchor" section). Ratios
are edgevlm's figure over llama.cpp's better flash-attention setting for that figure (lower time / memory / size,
higher tok/s). Server logs: WORKDIR/logs/. Run it on a quiet machine: nothing else on the cores.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_ttft import QUESTION, TEXT_TOKENS, _text  # noqa: E402  (the same prompts as the in-process TTFT)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGE = "/tmp/edgevlm-bench/smolvlm-256m-random-int4"
DEFAULT_CHECKPOINT = "/tmp/edgevlm-bench/smolvlm-256m-random"
DEFAULT_WORKDIR = "/tmp/edgevlm-bench/llama.cpp"
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp is built (llama-server 0.5.0-dev, commit 0c1e570)
SHORT_PROMPTS = ("Tell me about the sea.", "What is a volcano?", "Describe a city at night.", "How do birds fly?",
                 "Write about a forest.", "Explain the weather.", "What are stars?", "Tell me a story about a cat.")
MIN_TOKENS = 16  # a run with fewer completion tokens says nothing about decode speed: discarded
KINDS = ("image", "short", "long")
SECTION = "## llama.cpp anchor (benchmarks/serve_bench.py)"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no web UI (the prebuilt one is a download)
               "-DLLAMA_OPENSSL=OFF"]  # (LLAMA_CURL is gone from this llama.cpp: no downloader is built)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- llama.cpp: build, convert


def _run(command: list, log_file: Path, **kwargs) -> None:
    log("  $ " + " ".join(map(str, command)) + f"   (log: {log_file})")
    with open(log_file, "w") as out:
        done = subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, command))}\n{tail}")


def llama_source(args, work: Path) -> Path:
    if args.llama_src:
        return Path(args.llama_src)
    src = work / f"llama_cpp_python-{args.llama_cpp_python}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    sdist_dir = work / "sdist"
    sdist_dir.mkdir(exist_ok=True)
    sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{args.llama_cpp_python}.tar.gz"))
    if not sdists:
        log(f"downloading the llama-cpp-python {args.llama_cpp_python} sdist (PyPI)")
        _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={args.llama_cpp_python}", "--no-deps",
              "--no-binary", ":all:", "-d", sdist_dir], work / "pip-download.log")
        sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{args.llama_cpp_python}.tar.gz"))
    log(f"extracting {sdists[0]}")
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(work, filter="data")
    return src


# ggml's AMX matmul (compiled in by GGML_NATIVE on a CPU with AMX) crashed this llama.cpp (SIGSEGV in
# ggml_backend_amx_mul_mat at the server's first decode, SmolVLM-256M's Q4_0 text model, a 2-core Xeon with
# amx_int8, 2026-12-02): on such a CPU the build names every ISA extension that GGML_NATIVE would find but AMX.
NO_AMX_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
                "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
                "-DGGML_AMX_BF16=OFF"]


def _cpu_has_amx() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return "amx_int8" in flags.split()


def llama_build(src: Path, work: Path) -> tuple[Path, Path]:
    amx = _cpu_has_amx()
    build = work / ("build-no-amx" if amx else "build")
    flags = [f for f in CMAKE_FLAGS if f != "-DGGML_NATIVE=ON"] + NO_AMX_FLAGS if amx else CMAKE_FLAGS
    server, quantize = build / "bin" / "llama-server", build / "bin" / "llama-quantize"
    if server.exists() and quantize.exists():
        return server, quantize
    cache = build / "CMakeCache.txt"
    if cache.exists() and f"CMAKE_HOME_DIRECTORY:INTERNAL={src.resolve()}\n" not in cache.read_text():
        shutil.rmtree(build)  # configured for another source tree: cmake would refuse it
    log(f"building llama-server and llama-quantize from {src} in {build} (CPU, -j{os.cpu_count()}; long)")
    _run(["cmake", "-S", src, "-B", build, *flags], work / "cmake-configure.log")
    _run(["cmake", "--build", build, "--config", "Release", "--target", "llama-server", "llama-quantize",
          "-j", str(os.cpu_count() or 2)], work / "cmake-build.log")
    return server, quantize


def _stale(target: Path, checkpoint: Path) -> bool:
    """True when `target` is missing or older than any file of the checkpoint."""
    if not target.exists():
        return True
    return any(f.stat().st_mtime > target.stat().st_mtime for f in checkpoint.iterdir() if f.is_file())


def llama_ggufs(args, src: Path, quantize: Path, work: Path) -> tuple[Path, Path]:
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").exists():
        raise SystemExit(f"no HF checkpoint at {checkpoint} (benchmarks/bench.py builds the random one): --checkpoint")
    name = checkpoint.name
    f16, text, mmproj = work / f"{name}-f16.gguf", work / f"{name}-Q4_0.gguf", work / f"{name}-mmproj-q8_0.gguf"
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    convert = [sys.executable, src / "convert_hf_to_gguf.py", checkpoint]
    if _stale(text, checkpoint):
        if _stale(f16, checkpoint):
            log(f"converting the text model of {checkpoint} to GGUF f16")
            _run([*convert, "--outtype", "f16", "--outfile", f16], work / "convert-text.log", env=env)
        log("quantizing it to Q4_0")
        _run([quantize, f16, text, "Q4_0", str(os.cpu_count() or 2)], work / "quantize.log")
    if _stale(mmproj, checkpoint):
        log(f"converting the vision tower of {checkpoint} to a q8_0 mmproj GGUF")
        _run([*convert, "--mmproj", "--outtype", "q8_0", "--outfile", mmproj], work / "convert-mmproj.log", env=env)
    return text, mmproj


def llama_version(server: Path) -> str:
    done = subprocess.run([str(server), "--version"], capture_output=True, text=True)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
    return lines[0].strip() if lines else "version unknown"


# -------------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class Engine:
    name: str
    command: list[str]  # with "{port}" where the port goes
    size_bytes: int
    request: dict  # extra arguments of chat.completions.create for every request
    results: dict = field(default_factory=lambda: {kind: [] for kind in KINDS})
    cold: list = field(default_factory=list)
    peak_rss_mb: float = float("nan")
    server: Server | None = None


class Server:
    """One server process: started, polled until GET /health answers 200, stopped."""

    def __init__(self, engine: Engine, logs: Path, timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / (engine.name.replace(" ", "_").replace(",", "") + ".log")
        command = [part.replace("{port}", str(self.port)) for part in engine.command]
        self.log_file = open(self.log_path, "a")
        self.log_file.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(command)}\n")
        self.log_file.flush()
        start = time.perf_counter()
        self.proc = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.ready_s = self._wait_ready(start, timeout)
        import openai

        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=900)

    def _wait_ready(self, start: float, timeout: float) -> float:
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}); its log {self.log_path}:\n"
                                 + self.log_path.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:  # refused while starting, 503 while loading
                pass
            time.sleep(0.01)
        self.stop()
        raise SystemExit(f"server not ready after {timeout} s; its log: {self.log_path}")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


# ------------------------------------------------------------------------------------------------- requests


class Prompts:
    """A fresh prompt of each kind on every call: a new sample image, a new short question, a new long text."""

    def __init__(self, tokenizer_path: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.seed = 100

    def __call__(self, kind: str) -> list[dict]:
        self.seed += 1
        if kind == "image":
            from edgevlm.export.samples import sample_image

            buffer = io.BytesIO()
            sample_image(512, 512, seed=self.seed).save(buffer, format="PNG")
            uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                 {"type": "text", "text": QUESTION}]}]
        if kind == "short":
            return [{"role": "user", "content": f"{SHORT_PROMPTS[self.seed % len(SHORT_PROMPTS)]} ({self.seed})"}]
        ids = self.tokenizer.encode(_text(self.seed), add_special_tokens=False).ids[:TEXT_TOKENS]
        return [{"role": "user", "content": self.tokenizer.decode(ids)}]


def measure(engine: Engine, messages: list[dict], max_tokens: int) -> dict:
    """One streamed request: ttft (s), rate (tok/s, None when too few tokens), tokens, prompt_tokens, usage."""
    times: list[float] = []
    usage = None
    start = time.perf_counter()
    stream = engine.server.client.chat.completions.create(
        model="m", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, **engine.request)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    if not times:
        raise RuntimeError(f"{engine.name}: no content in the stream")
    tokens = usage.completion_tokens if usage is not None else len(times)
    rate = (tokens - 1) / (times[-1] - times[0]) if tokens >= MIN_TOKENS and times[-1] > times[0] else None
    return {"ttft": times[0] - start, "rate": rate, "tokens": tokens, "chunks": len(times),
            "prompt_tokens": usage.prompt_tokens if usage is not None else None, "usage": usage is not None}


# ---------------------------------------------------------------------------------------------------- report


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# (label, unit, format, higher is better, values of an engine)
FIGURES = [
    ("TTFT, fresh 512×512 image", "s", "{:.2f} s", False, lambda e: [r["ttft"] for r in e.results["image"]]),
    ("decode after the image prompt", "tok/s", "{:.1f} tok/s", True, lambda e: [r["rate"] for r in e.results["image"]]),
    ("decode, short text prompt", "tok/s", "{:.1f} tok/s", True, lambda e: [r["rate"] for r in e.results["short"]]),
    (f"decode at a {TEXT_TOKENS:,}-token text context", "tok/s", "{:.1f} tok/s", True,
     lambda e: [r["rate"] for r in e.results["long"]]),
    (f"TTFT, {TEXT_TOKENS:,}-token text prompt (prefill)", "s", "{:.2f} s", False,
     lambda e: [r["ttft"] for r in e.results["long"]]),
    ("peak RSS of the server (VmHWM)", "MB", "{:,.0f} MB", False, lambda e: [e.peak_rss_mb]),
    ("cold start (spawn → /health 200)", "s", "{:.2f} s", False, lambda e: e.cold),
    ("size on disk", "MB", "{:,.1f} MB", False, lambda e: [e.size_bytes / 1e6]),
]


def table(engines: list[Engine], anchors: list[Engine]) -> str:
    ours = [e for e in engines if e not in anchors]
    head = ["figure", *(e.name for e in ours)]
    if anchors:
        head += [*(f"{e.name} ÷ llama.cpp best" for e in ours), *(e.name for e in anchors)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, _, fmt, higher, values in FIGURES:
        medians = {e.name: _median(values(e)) for e in engines}
        cells = [label + (" (higher is better)" if higher else "")]
        cells += [fmt.format(medians[e.name]) if medians[e.name] is not None else "-" for e in ours]
        if anchors:
            known = [medians[a.name] for a in anchors if medians[a.name] is not None]
            best = (max if higher else min)(known) if known else None
            for e in ours:
                mine = medians[e.name]
                cells.append(f"{mine / best:.2f}×" if best and mine is not None else "-")
            for a in anchors:
                value = medians[a.name]
                text = fmt.format(value) if value is not None else "-"
                cells.append(f"**{text}**" if value is not None and value == best and len(anchors) > 1 else text)
        lines.append("| " + " | ".join(cells) + " |")
    # what the prompts were, as each server counted them
    for kind, label in (("image", "prompt tokens, image request"), ("long", "prompt tokens, long text request"),
                        ("short", "prompt tokens, short text request")):
        cells = [label]
        for e in ours + ([None] * len(ours) if anchors else []) + anchors:
            if e is None:
                cells.append("")
                continue
            counts = sorted({r["prompt_tokens"] for r in e.results[kind] if r["prompt_tokens"] is not None})
            cells.append(", ".join(f"{c:,}" for c in counts) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["completion tokens per request (min-max; decode runs kept / runs)"]
    for e in ours + ([None] * len(ours) if anchors else []) + anchors:
        if e is None:
            cells.append("")
            continue
        rs = [r for kind in KINDS for r in e.results[kind]]
        kept = sum(r["rate"] is not None for r in rs)
        usage = "" if all(r["usage"] for r in rs) else " (no usage: chunks counted)"
        cells.append(f"{min(r['tokens'] for r in rs)}-{max(r['tokens'] for r in rs)}; {kept}/{len(rs)}{usage}"
                     if rs else "-")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(engines: list[Engine]) -> str:
    lines = ["| figure | " + " | ".join(e.name for e in engines) + " |", "|" + "---|" * (len(engines) + 1)]
    for label, _, _, _, values in FIGURES[:5] + FIGURES[6:7]:
        cells = [", ".join("-" if v is None else f"{v:.2f}" if v < 100 else f"{v:.0f}" for v in values(e))
                 for e in engines]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main


def package_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def edgevlm_engine(package: Path, threads: int, kv_cache: str = "auto") -> Engine:
    manifest = json.loads((package / "model.json").read_text())
    eos = manifest.get("tokens", {}).get("eos_token_ids", [])
    request = {"logit_bias": {str(t): -100 for t in eos}} if eos else {}
    name = f"edgevlm {manifest.get('quantization', package.name)}" + ("" if kv_cache == "auto" else f", {kv_cache} KV")
    return Engine(name, [sys.executable, "-u", "-m", "edgevlm.runtime.cli", "serve", "--model", str(package),
                         "--host", "127.0.0.1", "--port", "{port}", "--threads", str(threads),
                         "--kv-cache", kv_cache],
                  package_bytes(package), request)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default=DEFAULT_PACKAGE, help="the edgevlm package to serve")
    parser.add_argument("--anchor", choices=["llama.cpp"], help="also measure llama-server (built and converted "
                        "on first use, cached in --workdir)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="HF checkpoint the package came from, converted to GGUF for llama.cpp")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="llama.cpp source, build, GGUFs and server logs")
    parser.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON, help="the sdist version to build from")
    parser.add_argument("--llama-src", help="an existing llama.cpp source tree instead of the sdist's")
    parser.add_argument("--fa", nargs="+", default=["on", "off"], choices=["on", "off", "auto"],
                        help="llama-server --flash-attn settings, one server each (default: on off)")
    parser.add_argument("--kv-cache", nargs="+", default=["auto"], choices=["auto", "float32", "int8"],
                        help="edgevlm's KV cache (serve --kv-cache): one server each (default auto)")
    parser.add_argument("--llama-kv", nargs="+", default=["f16"], choices=["f16", "q8_0"],
                        help="llama.cpp's KV cache types (-ctk/-ctv; q8_0 with -fa on only; default f16)")
    parser.add_argument("--threads", type=int, default=2, help="inference threads of every server (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="measured repetitions after the warm-up")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the warm-up requests (a smoke run; first-request figures)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="with --anchor: build llama.cpp and convert the GGUFs, then exit")
    parser.add_argument("--output", type=Path, help=f"also write the tables into this file's '{SECTION}' section")
    args = parser.parse_args()

    package = Path(args.package).resolve()
    if not (package / "model.json").exists():
        raise SystemExit(f"no edgevlm package at {package}: --package")
    work = Path(args.workdir)
    engines = [edgevlm_engine(package, args.threads, kv_cache) for kv_cache in args.kv_cache]
    anchors: list[Engine] = []
    version = ""
    if args.anchor == "llama.cpp":
        work.mkdir(parents=True, exist_ok=True)
        src = llama_source(args, work)
        server_bin, quantize = llama_build(src, work)
        text, mmproj = llama_ggufs(args, src, quantize, work)
        version = llama_version(server_bin)
        if args.prepare_only:
            log(f"ready: {server_bin} ({version}), {text}, {mmproj}")
            return 0
        for fa in args.fa:
            for cache in args.llama_kv:
                if cache != "f16" and fa != "on":
                    continue  # llama.cpp quantizes the V cache only with flash attention
                anchors.append(Engine(
                    f"llama.cpp Q4_0 -fa {fa}" + ("" if cache == "f16" else f", {cache} KV"),
                    [str(server_bin), "-m", str(text), "--mmproj", str(mmproj), "--host", "127.0.0.1",
                     "--port", "{port}", "-t", str(args.threads), "-np", "1", "-fa", fa, "--cache-ram", "0",
                     "-ctk", cache, "-ctv", cache],
                    text.stat().st_size + mmproj.stat().st_size,
                    {"extra_body": {"cache_prompt": False, "ignore_eos": True}}))
        engines += anchors
    manifest = json.loads((package / "model.json").read_text())
    tokenizer = package / manifest.get("tokenizer", "tokenizer.json")
    if not tokenizer.exists():
        tokenizer = Path(args.checkpoint) / "tokenizer.json"
    prompts = Prompts(tokenizer)
    logs = work / "logs" if args.anchor else Path("/tmp/edgevlm-bench/serve_bench-logs")

    started = time.strftime("%Y-%m-%d %H:%M")
    try:
        for engine in engines:
            log(f"starting {engine.name}")
            engine.server = Server(engine, logs)
            if not args.no_warmup:
                for kind in KINDS:
                    measure(engine, prompts(kind), args.max_tokens)
        for rep in range(args.repeats):
            for engine in engines:
                for kind in KINDS:
                    result = measure(engine, prompts(kind), args.max_tokens)
                    engine.results[kind].append(result)
                    rate = f"{result['rate']:.1f} tok/s" if result["rate"] else "-"
                    log(f"  rep {rep + 1}/{args.repeats} {engine.name} {kind}: TTFT {result['ttft']:.2f} s, "
                        f"{rate}, {result['tokens']} tokens, prompt {result['prompt_tokens']}")
        for engine in engines:
            engine.peak_rss_mb = engine.server.peak_rss_mb()
            engine.server.stop()
            engine.server = None
        for rep in range(args.repeats):  # cold starts: fresh processes, the measured servers gone
            for engine in engines:
                server = Server(engine, logs)
                engine.cold.append(server.ready_s)
                server.stop()
            log(f"  cold start {rep + 1}/{args.repeats} done")
    finally:
        for engine in engines:
            if engine.server is not None:
                engine.server.stop()

    load = os.getloadavg()
    about = [f"`python benchmarks/serve_bench.py {' '.join(sys.argv[1:])}` ({started}): {package.name}, "
             f"{os.cpu_count()} CPUs, --threads {args.threads}, medians of {args.repeats} "
             f"{'without warm-up (a smoke run)' if args.no_warmup else 'after a warm-up'}, "
             f"engines interleaved, max_tokens {args.max_tokens}, greedy, load average {load[0]:.2f} at the end."]
    if anchors:
        about.append(f"llama.cpp: llama-server from the llama-cpp-python {args.llama_cpp_python} sdist ({version}), "
                     f"`-np 1 -t {args.threads} --cache-ram 0`, \"cache_prompt\": false, \"ignore_eos\": true; "
                     f"the text model Q4_0, the mmproj q8_0 (converted from {Path(args.checkpoint).name}).")
    report = "\n".join([" ".join(about), "", table(engines, anchors), "", "Every run (seconds or tok/s):", "",
                        runs_table(engines)])
    print(report, flush=True)
    if args.output:
        text = args.output.read_text() if args.output.exists() else ""
        before, found, rest = text.partition(SECTION)
        after = rest[rest.find("\n## "):] if found and "\n## " in rest else ""
        args.output.write_text((before.rstrip("\n") + "\n\n" if before.strip() else "") + SECTION + "\n\n" + report
                               + "\n" + after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
