"""Memory of large images through `edgevlm serve`: the peak while a request's images are decoded, and what stays.

    python benchmarks/image_memory.py                         # the bundled demo model
    python benchmarks/image_memory.py --model out/smolvlm-256m-int8

Starts the server (raising --max-request-image-mp so that 16 × 36 MP pass), then sends, each case twice:
16 PNGs of 6000×6000 in one request, one 36 MP RGBA PNG, and that RGBA image with `detail: auto` (the model's
tiles). For each it reads the server's /proc/PID/status: VmRSS before, the peak (VmHWM, reset before each request
through /proc/PID/clear_refs) and VmRSS after the answer. All 16 images decoded at once would hold 1.7 GB of RGB
pixels; the server decodes and reduces one image at a time. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import base64
import io
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def status_kb(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def png_uri(mode: str) -> str:
    from PIL import Image, ImageDraw

    image = Image.new(mode, (6000, 6000), (255, 255, 255, 0) if mode == "RGBA" else "white")
    ImageDraw.Draw(image).ellipse([1000, 1000, 5000, 5000], fill=(220, 30, 30, 200) if mode == "RGBA" else "red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "demo-shapes"))
    args = parser.parse_args()
    import openai

    server = subprocess.Popen([sys.executable, "-u", "-m", "edgevlm.runtime.cli", "serve", "--model", args.model,
                               "--port", "0", "--max-request-image-mp", "600"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    for line in server.stdout:
        url = line.split("listening on ")[1].split()[0] if "listening on " in line else url
        if " ready" in line or "error" in line:
            break
    if url is None or "ready" not in line:
        print(line, file=sys.stderr)
        return 1
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    rgb, rgba = png_uri("RGB"), png_uri("RGBA")
    cases = [("16 × 6000×6000 RGB PNG, detail low", rgb, 16, "low"),
             ("1 × 6000×6000 RGBA PNG, detail low", rgba, 1, "low"),
             ("1 × 6000×6000 RGBA PNG, detail auto", rgba, 1, "auto")]
    client.chat.completions.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    start = status_kb(server.pid, "VmRSS")
    rows = []
    for name, uri, count, detail in cases:
        for _ in range(2):
            before = status_kb(server.pid, "VmRSS")
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            t0 = time.perf_counter()
            part = {"type": "image_url", "image_url": {"url": uri, "detail": detail}}
            client.chat.completions.create(model="m", max_tokens=1, messages=[
                {"role": "user", "content": [part] * count + [{"type": "text", "text": "What is it?"}]}])
            seconds = time.perf_counter() - t0
            rows.append((name, before, status_kb(server.pid, "VmHWM"), status_kb(server.pid, "VmRSS"), seconds))
    server.terminate()
    server.wait(timeout=60)

    print(f"model {args.model}; server RSS after one text request: {start / 1024:.0f} MB\n")
    print("| request | RSS before | peak | peak − before | RSS after | kept | time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, before, peak, after, seconds in rows:
        print(f"| {name} | {before / 1024:.0f} MB | {peak / 1024:.0f} MB | {(peak - before) / 1024:.0f} MB | "
              f"{after / 1024:.0f} MB | {(after - before) / 1024:+.0f} MB | {seconds:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
