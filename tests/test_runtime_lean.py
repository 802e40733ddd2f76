"""The runtime runs a package with none of the export stack importable: torch, transformers, optimum."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import torch

from edgevlm.export.samples import sample_image
from edgevlm.export.families.idefics3 import chat_inputs

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'optimum', 'onnxruntime_genai'}:
            raise ImportError(f'the runtime must not import {name}')
sys.meta_path.insert(0, Block())
"""

SCRIPT = BLOCKER + """
import json
from edgevlm.runtime.cli import main
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.vlm import VisionLanguageModel

model = VisionLanguageModel.load(sys.argv[1])
messages = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + sys.argv[2]}},
    {"type": "text", "text": "Describe this image."}]}]
prompt = model.prepare(messages)
tokens = [step.token for step in model.generate(prompt, SamplingParams(temperature=0), max_tokens=12)]
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'optimum'})
print(json.dumps({"ids": prompt.input_ids, "tokens": tokens, "heavy": loaded}))
"""


def test_whole_pipeline_runs_without_the_export_stack(tiny_package, hf_model, hf_processor, tmp_path):
    image = sample_image(200, 150, 7)
    png = tmp_path / "image.png"
    image.save(png)
    b64 = base64.b64encode(png.read_bytes()).decode()
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_package), b64], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["heavy"] == []

    inputs = chat_inputs(hf_processor, [image], "Describe this image.")
    assert out["ids"] == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        generated = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=[2, 49279],
                                      pad_token_id=2)
    assert out["tokens"] == generated[0, inputs["input_ids"].shape[1]:].tolist()
