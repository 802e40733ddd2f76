"""edgevlm: offline vision-language model runtime with an OpenAI-compatible API.

The code lives in the top-level folders `runtime/` (ships to the device) and `export/` (needs torch); they are
installed as `edgevlm.runtime` and `edgevlm.export`.
"""

import os
import sys

__version__ = "0.1.0"

# Never online: onnxruntime's wheels carry telemetry that resolves and posts to a Microsoft endpoint every few
# seconds (measured: a DNS query 5-20 s apart while serving). Only this variable, read when onnxruntime is
# imported, stops it (`onnxruntime.disable_telemetry_events()` after the import does not). Every entry point
# imports this package before onnxruntime, so it is set here, and set unconditionally: the runtime promises
# no connection of its own. The hub's telemetry goes too (the exporter only contacts the hub for a hub id).
# True when onnxruntime was imported first without the variable: the engine warns then, it is too late to stop it.
ORT_TELEMETRY_MAY_BE_ON = "onnxruntime" in sys.modules and os.environ.get("ORT_DISABLE_TELEMETRY") != "1"
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
