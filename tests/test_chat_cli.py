"""`edgevlm chat` streams the answer to stdout and its timings to stderr."""

from __future__ import annotations

import subprocess
import sys

import torch
from PIL import Image

from edgevlm.export.samples import sample_image
from edgevlm.export.families.idefics3 import chat_inputs


def chat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevlm.runtime.cli", "chat", *args], capture_output=True,
                          text=True, timeout=300)


def test_chat_answers_like_transformers_and_reports_speed(tiny_package, hf_model, hf_processor, tmp_path):
    sample_image(300, 200, 11).convert("RGB").save(tmp_path / "photo.jpg", quality=92)
    result = chat("--model", str(tiny_package), "--image", str(tmp_path / "photo.jpg"), "--max-tokens", "10",
                  "What is in the photo?")
    assert result.returncode == 0, result.stderr

    image = Image.open(tmp_path / "photo.jpg").convert("RGB")
    inputs = chat_inputs(hf_processor, [image], "What is in the photo?")
    with torch.no_grad():
        generated = hf_model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=[2, 49279],
                                      pad_token_id=2)
    expected = hf_processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert result.stdout == expected + "\n"
    assert "time to first token" in result.stderr and "tokens/s" in result.stderr


def test_chat_errors_are_one_clear_line(tiny_package, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    result = chat("--model", str(tiny_package), "--image", str(tmp_path / "notes.txt"), "hi")
    assert result.returncode == 2
    assert result.stderr.strip() == "edgevlm chat: error: image 1: unsupported or corrupt image data"
    result = chat("--model", str(tmp_path / "missing"), "hi")
    assert result.returncode == 2 and "no such directory" in result.stderr and "Traceback" not in result.stderr
