"""The lean on-device runtime: onnxruntime, numpy, Pillow, tokenizers, aiohttp, jinja2 and llguidance only."""
