"""Never online: `edgevlm serve` opens no connection of its own.

The real server runs in a new network namespace that has only loopback, under strace, and answers the official
client for about 20 s (onnxruntime's built-in telemetry, before edgevlm switched it off, resolved its endpoint
every 5–20 s while serving). Any connect or send to an address other than loopback, to a DNS port, or to the name
service cache fails the test. Linux, root (CI runs as root) and strace are needed: in CI their absence is a
failure, elsewhere a skip that says why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

SERVE_SECONDS = 20

# Runs inside the namespace: start the traced server, use it through the openai client, stop it.
PROBE = textwrap.dedent("""
    import base64, io, os, signal, subprocess, sys, time
    import openai
    from PIL import Image, ImageDraw

    package, trace, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    server = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o", trace,
         sys.executable, "-u", "-m", "edgevlm.runtime.cli", "serve", "--model", package, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    for line in server.stdout:
        print(line, end="", flush=True)
        if "listening on " in line:
            url = line.split("listening on ")[1].split()[0]
        if " ready" in line or "error" in line:
            break
    image = Image.new("RGB", (120, 90), "white")
    ImageDraw.Draw(image).ellipse([30, 20, 90, 70], fill="red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                + base64.b64encode(buffer.getvalue()).decode()}}, {"type": "text", "text": "What is it?"}]
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    served, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], max_tokens=8)
        for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=8, stream=True):
            pass
        served += 2
    tracee = int(open(f"/proc/{server.pid}/task/{server.pid}/children").read().split()[0])
    os.kill(tracee, signal.SIGTERM)  # the server itself: strace then exits with its exit code
    print(server.stdout.read(), end="")
    print(f"served {served} requests, server exit code {server.wait()}", flush=True)
""")

ALLOWED = re.compile(r'inet_addr\("127\.|inet_pton\(AF_INET6, "::1"|sa_family=AF_UNIX|sa_family=AF_NETLINK')


def _requirements() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs Linux and root (a network namespace of its own)"
    for tool in ("strace", "unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install strace iproute2 util-linux)"
    return None


def test_the_server_opens_no_connection_of_its_own(tiny_package, tmp_path):
    missing = _requirements()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the no-network test cannot run in CI: it {missing}")
        pytest.skip(missing)
    probe, trace = tmp_path / "probe.py", tmp_path / "trace.txt"
    probe.write_text(PROBE)
    # Clear what could make the process reach out: a proxy, and the variables edgevlm sets itself.
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy") and k != "ORT_DISABLE_TELEMETRY"}
    result = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, str(probe),
         str(tiny_package), str(trace), str(SERVE_SECONDS)],
        capture_output=True, text=True, timeout=SERVE_SECONDS + 120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "served " in result.stdout and "server exit code 0" in result.stdout, result.stdout
    calls = [line for line in trace.read_text().splitlines()
             if re.search(r"\b(connect|sendto|sendmsg|sendmmsg)\(", line)]
    reaching_out = [line for line in calls if "htons(53)" in line or "nscd" in line or not ALLOWED.search(line)]
    # sendto/sendmsg on a connected socket name no address: those to loopback clients are the server's answers.
    reaching_out = [line for line in reaching_out if "sa_family=" in line or line.split("(", 1)[0].endswith("connect")]
    assert not reaching_out, "\n".join(reaching_out[:20])
