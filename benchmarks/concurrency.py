"""Concurrent serving through `edgevlm serve` and the openai client: batching, interleaved prefill, caches.

    python benchmarks/concurrency.py                          # the 256M-dimension int4 and int8 packages
    python benchmarks/concurrency.py --package PKG [--package PKG2] [--streams 1 2 4 8] [--rounds 3]

For each package a server is started (`--max-batch 8`), and, as the baseline in the same run, one with
`--max-batch 1` (requests one at a time, as before step 8). Measured, medians over --rounds:
- streams 1/2/4/8: every stream asks a different text question (greedy, EOS banned, --tokens tokens); time to
  first token p50/p90 over all streams, per-stream decode tok/s, aggregate completion tok/s (all tokens over the
  wall time from the first request to the last token), and the aggregate's ratio to one stream;
- interference: two streams decoding, then a 512×512 image request (17 tiles at SmolVLM size) and, while its
  prefill runs, a short text request: that request's time to first token, the image request's, and the running
  streams' tok/s during the image prefill against the same two streams alone on a fresh server over the same
  window (same context length: decode slows as the context grows);
- a second question about the same image (the first answer in the conversation): its time to first token against
  the first question's, and usage.prompt_tokens_details.cached_tokens.
Writes a markdown table to stdout and, with --output, into that file (replacing its "## Concurrency" section).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGES = [Path("/tmp/edgevlm-bench/smolvlm-256m-random-int4"),
                    Path("/tmp/edgevlm-bench/smolvlm-256m-random-int8")]
QUESTIONS = ["Tell me about the sea.", "What is a volcano?", "Describe a city at night.", "How do birds fly?",
             "Write about a forest.", "Explain the weather.", "What are stars?", "Tell me a story about a cat."]


def image_uri(width: int, height: int, seed: int) -> str:
    from edgevlm.export.samples import sample_image

    buffer = io.BytesIO()
    sample_image(width, height, seed=seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Server:
    def __init__(self, package: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "edgevlm.runtime.cli", "serve", "--model",
                                      str(package), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = None
        for line in self.proc.stdout:
            if "listening on " in line:
                self.url = line.split("listening on ")[1].split()[0]
            if line.rstrip().endswith("ready"):
                break
            if "error" in line:
                raise RuntimeError(line)
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        import openai

        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=600)
        manifest = json.loads((package / "model.json").read_text())
        self.no_eos = {str(t): -100 for t in manifest["tokens"]["eos_token_ids"]}
        self.context = manifest["text"]["context_length"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def stream(server: Server, messages, max_tokens: int, out: dict, ban_eos: bool = True) -> None:
    """One streamed request; fills out[start, first, end, times (per content chunk), text, tokens, cached], or
    out[error]."""
    try:
        _stream(server, messages, max_tokens, out, ban_eos)
    except Exception as exc:
        out["error"] = exc
        raise


def _stream(server: Server, messages, max_tokens: int, out: dict, ban_eos: bool) -> None:
    out["start"] = time.perf_counter()
    times = out.setdefault("times", [])
    text = out.setdefault("text", [])
    extra = {"logit_bias": server.no_eos} if ban_eos else {}
    for chunk in server.client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                                       temperature=0, stream=True,
                                                       stream_options={"include_usage": True}, **extra):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            out["tokens"] = chunk.usage.completion_tokens
            details = chunk.usage.prompt_tokens_details
            out["cached"] = details.cached_tokens if details else 0
    out["first"], out["end"] = times[0], times[-1]


def run_streams(server: Server, count: int, tokens: int) -> dict:
    results = [{} for _ in range(count)]
    threads = [threading.Thread(target=stream, args=(server, [{"role": "user", "content": QUESTIONS[i % 8] +
                                                               f" ({i})"}], tokens, results[i]))
               for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    ttfts = sorted(r["first"] - r["start"] for r in results)
    per_stream = [(r["tokens"] - 1) / (r["end"] - r["first"]) for r in results]
    return {"ttft_p50": statistics.median(ttfts), "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            "per_stream": statistics.median(per_stream),
            "aggregate": sum(r["tokens"] for r in results) / (end - start)}


def rate(times: list[float], lo: float, hi: float) -> float:
    inside = [t for t in times if lo <= t <= hi]
    return (len(inside) - 1) / (inside[-1] - inside[0]) if len(inside) > 2 else 0.0


def _running_streams(server: Server) -> tuple[list[dict], list[threading.Thread]]:
    """Two long text streams, returned once both are decoding."""
    running = [{} for _ in range(2)]
    long = min(2000, server.context - 64)
    threads = [threading.Thread(target=stream, args=(server, [{"role": "user", "content": QUESTIONS[i]}], long,
                                                     running[i])) for i in range(2)]
    for thread in threads:
        thread.start()
    while not all(len(r.get("times", ())) > 20 for r in running):
        if any("error" in r for r in running):
            raise RuntimeError(f"a running stream failed: {[r.get('error') for r in running]}")
        time.sleep(0.01)
    return running, threads


def interference(package: Path, max_batch: int, image: str) -> dict:
    """Two streams decoding; then a 17-tile image request and, 0.5 s later (in its prefill), a short text request.
    Control: the same two streams on a fresh server with nothing else, their rate over the same window (measured
    from each stream's start, so at the same context: decode slows as the context grows)."""
    server = Server(package, "--max-batch", str(max_batch))
    try:
        running, threads = _running_streams(server)
        heavy, short = {}, {}
        heavy_thread = threading.Thread(target=stream, args=(server, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe this image."}]}],
            8, heavy))
        heavy_thread.start()
        time.sleep(0.5)  # the image request is in its prefill (decoded, its tiles being encoded)
        stream(server, [{"role": "user", "content": "Hi!"}], 8, short)
        heavy_thread.join()
        windows = [(heavy["start"] + 0.5 - r["start"], heavy["first"] - r["start"]) for r in running]
        during = statistics.median(rate(r["times"], r["start"] + lo, r["start"] + hi)
                                   for r, (lo, hi) in zip(running, windows))
    finally:
        server.stop()  # ends the two long streams
    control = Server(package, "--max-batch", str(max_batch))
    try:
        alone, _ = _running_streams(control)
        while time.perf_counter() < max(r["start"] + hi for r, (_, hi) in zip(alone, windows)) + 0.1:
            time.sleep(0.05)
        undisturbed = statistics.median(rate(r["times"], r["start"] + lo, r["start"] + hi)
                                        for r, (lo, hi) in zip(alone, windows))
    finally:
        control.stop()
    return {"short_ttft": short["first"] - short["start"], "image_ttft": heavy["first"] - heavy["start"],
            "during": during, "undisturbed": undisturbed}


def same_image(server: Server, seed: int) -> dict:
    """A new image's first question (it pays for the vision encoder), then a follow-up in the same conversation."""
    image = image_uri(512, 512, seed)
    question = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": "What is in this image?"}]}]
    one, two = {}, {}
    stream(server, question, 16, one, ban_eos=False)
    follow = question + [{"role": "assistant", "content": "".join(one["text"])},
                         {"role": "user", "content": "And its colour?"}]
    stream(server, follow, 4, two, ban_eos=False)
    return {"first": one["first"] - one["start"], "second": two["first"] - two["start"],
            "cached": two.get("cached", 0)}


def measure(package: Path, streams: list[int], rounds: int, tokens: int, max_batch: int) -> dict:
    server = Server(package, "--max-batch", str(max_batch))
    try:
        run_streams(server, 2, 16)  # warm-up
        out = {"streams": {}}
        for count in streams:
            runs = [run_streams(server, count, tokens) for _ in range(rounds)]
            out["streams"][count] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            print(f"  max-batch {max_batch}, {count} streams: {out['streams'][count]}", file=sys.stderr, flush=True)
        if max_batch > 1:
            out["same_image"] = [same_image(server, seed) for seed in range(100, 100 + rounds)]
            server.stop()
            out["interference"] = interference(package, max_batch, image_uri(512, 512, seed=1))
        return out
    finally:
        server.stop()


def table(name: str, batched: dict, serial: dict, streams: list[int]) -> str:
    one = batched["streams"][streams[0]]["aggregate"]
    lines = [f"### {name}", "",
             "| streams | TTFT p50 | TTFT p90 | per-stream tok/s | aggregate tok/s | × one stream | "
             "one at a time (--max-batch 1): aggregate | TTFT p50 |",
             "|---|---|---|---|---|---|---|---|"]
    for count in streams:
        b, s = batched["streams"][count], serial["streams"][count]
        lines.append(f"| {count} | {b['ttft_p50'] * 1000:.0f} ms | {b['ttft_p90'] * 1000:.0f} ms | "
                     f"{b['per_stream']:.1f} | {b['aggregate']:.1f} | {b['aggregate'] / one:.2f}× | "
                     f"{s['aggregate']:.1f} | {s['ttft_p50'] * 1000:.0f} ms |")
    i = batched["interference"]
    lines += ["", "| while a 17-tile image prompt is prefilled | |", "|---|---|",
              f"| short text request: time to first token | {i['short_ttft']:.2f} s |",
              f"| the image request: time to first token | {i['image_ttft']:.2f} s |",
              f"| two running streams meanwhile: tok/s, against the same streams alone over the same window | "
              f"{i['during']:.1f} vs {i['undisturbed']:.1f} "
              f"({i['during'] / i['undisturbed'] if i['undisturbed'] else float('nan'):.2f}×) |"]
    same = batched["same_image"]
    first = statistics.median(s["first"] for s in same)
    second = statistics.median(s["second"] for s in same)
    cached = statistics.median(s["cached"] for s in same)
    lines += [f"| same image, second question: time to first token | {second:.3f} s vs {first:.2f} s for the "
              f"first ({second / first:.3f}×), cached_tokens {cached:.0f} |", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", action="append", type=Path)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    packages = args.package or [p for p in DEFAULT_PACKAGES if (p / "model.json").exists()]
    if not packages:
        print("no package: pass --package (benchmarks/bench.py builds the 256M-dimension ones)", file=sys.stderr)
        return 2
    sections = []
    for package in packages:
        batched = measure(package, args.streams, args.rounds, args.tokens, 8)
        serial = measure(package, args.streams, args.rounds, args.tokens, 1)
        sections.append(table(package.name, batched, serial, args.streams))
        print(sections[-1], flush=True)
    report = "\n".join(sections)
    if args.output:
        text = args.output.read_text() if args.output.exists() else ""
        head = "## Concurrency (benchmarks/concurrency.py)"
        before, _, rest = text.partition(head)
        after = rest[rest.find("\n## "):] if "\n## " in rest else ""
        args.output.write_text(before + head + "\n\n" + report + "\n" + after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
