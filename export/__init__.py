"""Hugging Face checkpoint → edgevlm model package. Needs the `export` extra (torch, transformers, optimum, onnx)."""
