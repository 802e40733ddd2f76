"""numpy/Pillow image processors, one module per model family, matching the Hugging Face processors."""
