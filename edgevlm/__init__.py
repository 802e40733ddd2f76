"""edgevlm: offline vision-language model runtime with an OpenAI-compatible API.

The code lives in the top-level folders `runtime/` (ships to the device) and `export/` (needs torch); they are
installed as `edgevlm.runtime` and `edgevlm.export`.
"""

__version__ = "0.1.0"
