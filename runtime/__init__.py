"""The lean on-device runtime: onnxruntime, numpy, Pillow, tokenizers, aiohttp and jinja2 only."""
