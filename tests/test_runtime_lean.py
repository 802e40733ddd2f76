"""The runtime runs a package with none of the export stack importable: torch, transformers, optimum."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'optimum', 'onnxruntime_genai'}:
            raise ImportError(f'the runtime must not import {name}')
sys.meta_path.insert(0, Block())
"""

SCRIPT = BLOCKER + """
import json, numpy as np
from tokenizers import Tokenizer
from edgevlm.runtime.engine import Engine
from edgevlm.runtime.package import ModelPackage

package = ModelPackage.load(sys.argv[1])
engine = Engine(package)
prompt = "<|im_start|>User: Tell me a story.<end_of_utterance>\\nAssistant:"
ids = Tokenizer.from_file(str(package.tokenizer_path)).encode(prompt, add_special_tokens=False).ids
tokens = engine.greedy(np.array(ids), None, 12, tuple(package.tokens["eos_token_ids"]))
size = package.vision["image_size"]
features = engine.encode_images(np.zeros((1, 1, 3, size, size), np.float32) + 0.5, np.ones((1, 1, size, size), bool))
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'optimum'})
print(json.dumps({"ids": ids, "tokens": tokens, "features": list(features.shape), "heavy": loaded}))
"""


def test_runtime_generates_without_the_export_stack(tiny_package, hf_model):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_package)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["heavy"] == []
    assert out["features"] == [1, 16, 64]
    with torch.no_grad():
        generated = hf_model.generate(torch.tensor([out["ids"]]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=[2, 49279], pad_token_id=2)
    assert out["tokens"] == generated[0, len(out["ids"]):].tolist()
