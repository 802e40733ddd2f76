"""Cold start of `edgevlm serve --model PKG`: process start → "edgevlm: model NAME ready" on stdout, and → the first
200 of GET /health; then where the time goes, phase by phase.

    python benchmarks/startup.py --model /tmp/edgevlm-bench/smolvlm-256m-random-int4 --runs 5
    python benchmarks/startup.py --model PKG --tree before=/tmp/edgevlm-before --tree after=.   # A/B, interleaved
    python benchmarks/startup.py --model PKG --drop-caches   # also with the page cache dropped (root; Linux)

Each run is a new process. Runs of the trees (and of `--verify-package always` where the tree has it) are
interleaved, run 1 of every variant, then run 2 ..., so a machine whose load changes meanwhile shifts them alike;
the figures are medians. The page cache is warm (a first, untimed run of each variant reads the package) unless
--drop-caches, which also times runs after `sync; echo 3 > /proc/sys/vm/drop_caches` (that needs root, and it
slows everything else on the machine for a moment).

A tree is a source checkout (a folder with edgevlm/ and runtime/, e.g. `git archive HEAD runtime edgevlm models |
tar -x -C /tmp/edgevlm-before`): it runs through a shim folder on PYTHONPATH, ahead of the editable install.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Phase by phase in one process, in the order a load runs them (sequential here, whatever the server overlaps).
PHASES = r"""
import json, os, sys, time
import edgevlm.runtime
print("TREE", edgevlm.runtime.__file__, file=sys.stderr)
T0 = time.perf_counter()
out = {}
def mark(name, start):
    out[name] = time.perf_counter() - start
    return time.perf_counter()
t = time.perf_counter()
import edgevlm
import numpy
t = mark("import numpy", t)
import onnxruntime as ort
t = mark("import onnxruntime", t)
import aiohttp.web
t = mark("import aiohttp", t)
import edgevlm.runtime.cli
from edgevlm.runtime import server, package as pkg, vlm
t = mark("import edgevlm (rest)", t)
path = sys.argv[1]
package = pkg.ModelPackage.load(path, verify=False)
t = mark("read model.json", t)
for name in package.manifest["files"]:
    pkg.sha256_file(package.path / name)
t = mark("sha256 of every file", t)
package.verify()
t = mark("verify as load does", t)
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(str(package.tokenizer_path))
max(map(len, tokenizer.get_vocab(with_added_tokens=True)))
t = mark("tokenizer", t)
made = ort.InferenceSession
class Timed(made):
    def __init__(self, file, *args, **kwargs):
        start = time.perf_counter()
        super().__init__(file, *args, **kwargs)
        out["session " + os.path.basename(str(file))] = time.perf_counter() - start
ort.InferenceSession = Timed
engine = vlm.Engine(package)
t = mark("Engine (all sessions)", t)
engine.warm_up()
t = mark("warm_up", t)
from edgevlm.runtime.grammar import Grammars
Grammars(tokenizer, tuple(package.tokens["eos_token_ids"]))
t = mark("grammars (after ready)", t)
import asyncio
async def start():
    app = aiohttp.web.Application()
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    await runner.cleanup()
asyncio.run(start())
t = mark("aiohttp start", t)
print("PHASES " + json.dumps(out), flush=True)
"""


def shim(tree: Path, folder: Path) -> Path:
    """A folder that makes `import edgevlm` load `tree`'s edgevlm/, runtime/ and export/ (as the editable install
    maps them), for PYTHONPATH."""
    tree = tree.resolve()
    package = folder / "edgevlm"
    package.mkdir(parents=True)
    (package / "__init__.py").symlink_to(tree / "edgevlm" / "__init__.py")
    for name in ("runtime", "export"):
        if (tree / name).is_dir():
            (package / name).symlink_to(tree / name)
    return folder


def environment(path: Path, extra: dict[str, str]) -> dict[str, str]:
    # -P (no current folder on sys.path): a checkout's own edgevlm/ must not shadow the shim.
    return dict(os.environ, PYTHONPATH=str(path), PYTHONUNBUFFERED="1", **extra)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux): what the start costs whatever else the machine runs
    (with two free cores, wall time to ready is about the longest chain of that work, not all of it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def serve_once(env: dict[str, str], model: str, extra_args: list[str], timeout: float = 120) -> dict[str, float]:
    """Start `edgevlm serve`, time the ready line and the first 200 of /health, stop it (SIGTERM)."""
    command = [sys.executable, "-P", "-c", "import sys; from edgevlm.runtime.cli import main; sys.exit(main())",
               "serve", "--model", model, "--port", "0", *extra_args]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    result: dict[str, float] = {}
    url = None
    try:
        for line in process.stdout:
            now = time.perf_counter() - start
            if "listening on http://" in line:
                result["listening"] = now
                url = line.split("listening on ")[1].split()[0]
            if line.startswith("edgevlm: model ") and line.rstrip().endswith(" ready"):
                result["ready"] = now
                result["CPU s used to ready"] = cpu_seconds(process.pid)
                break
            if now > timeout:
                break
        if "ready" not in result:
            raise RuntimeError(f"no ready line: {process.stderr.read() if process.poll() is not None else ''}")
        while time.perf_counter() - start < timeout:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        result["health 200"] = time.perf_counter() - start
                        break
            except OSError:
                time.sleep(0.005)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return result


def phases_once(env: dict[str, str], model: str) -> dict[str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-P", "-c", PHASES, model], capture_output=True, text=True, env=env,
                          check=True)
    total = time.perf_counter() - start
    line = next(line for line in done.stdout.splitlines() if line.startswith("PHASES "))
    phases = json.loads(line[len("PHASES "):])
    phases["(process total)"] = total
    return phases


def python_start(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-P", "-c", "pass"], check=True, env=env)
    return time.perf_counter() - start


def table(title: str, rows: dict[str, dict[str, list[float]]]) -> None:
    variants = list(rows)
    keys: list[str] = []
    for variant in variants:
        keys += [k for k in rows[variant] if k not in keys]
    width = max(len(k) for k in keys) + 2
    print(f"\n{title} (medians, seconds; runs per cell in brackets)")
    print("".ljust(width) + "".join(v.rjust(22) for v in variants))
    for key in keys:
        cells = []
        for variant in variants:
            values = rows[variant].get(key, [])
            cells.append((f"{statistics.median(values):.3f} [{len(values)}]" if values else "-").rjust(22))
        print(key.ljust(width) + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/tmp/edgevlm-bench/smolvlm-256m-random-int4")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="a source tree to time (repeat for A/B); default: this checkout")
    parser.add_argument("--always", action="store_true",
                        help="also time `--verify-package always` (full sha256) for trees that have the flag")
    parser.add_argument("--drop-caches", action="store_true", help="also time runs after dropping the page cache")
    parser.add_argument("--no-phases", action="store_true", help="skip the phase-by-phase breakdown")
    args = parser.parse_args(argv)
    args.model = str(Path(args.model).resolve())
    trees = [tuple(t.split("=", 1)) for t in args.tree] or [("this tree", str(ROOT))]
    with tempfile.TemporaryDirectory(prefix="edgevlm-startup-") as scratch:
        record = Path(scratch) / "verified.json"
        variants: list[tuple[str, dict[str, str], list[str]]] = []
        for name, tree in trees:
            env = environment(shim(Path(tree), Path(scratch) / name.replace("/", "_")),
                              {"EDGEVLM_VERIFY_RECORD": str(record)})
            variants.append((name, env, []))
            if args.always and "--verify-package" in (Path(tree) / "runtime" / "cli.py").read_text():
                variants.append((f"{name}, always", env, ["--verify-package", "always"]))
        for name, env, extra in variants:  # page cache warm, verification record made
            serve_once(env, args.model, extra)
        ends: dict[str, dict[str, list[float]]] = {name: {} for name, _, _ in variants}
        cold: dict[str, dict[str, list[float]]] = {name: {} for name, _, _ in variants}
        phases: dict[str, dict[str, list[float]]] = {} if args.no_phases else {
            name: {} for name, _, extra in variants if not extra}
        for run in range(args.runs):
            for name, env, extra in variants:
                ends[name].setdefault("python -c pass", []).append(python_start(env))
                for key, value in serve_once(env, args.model, extra).items():
                    ends[name].setdefault(key, []).append(value)
                if args.drop_caches and drop_caches():
                    for key, value in serve_once(env, args.model, extra).items():
                        cold[name].setdefault(key, []).append(value)
                if name in phases:
                    for key, value in phases_once(env, args.model).items():
                        phases[name].setdefault(key, []).append(value)
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"model {args.model}; {os.cpu_count()} CPUs; load average {load[0]:.2f} {load[1]:.2f} at the end")
    table("edgevlm serve, process start → (page cache warm)", ends)
    if args.drop_caches:
        table("edgevlm serve, process start → (page cache dropped before each run)", cold)
    if phases:
        table("phases, one after another in one process (page cache warm)", phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
