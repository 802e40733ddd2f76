"""edgevlm: offline vision-language model runtime with an OpenAI-compatible API.

The code lives in the top-level folders `runtime/` (ships to the device) and `export/` (needs torch); they are
installed as `edgevlm.runtime` and `edgevlm.export`.

In-process use (runtime/inprocess.py), without HTTP:

    import edgevlm
    with edgevlm.load() as model:  # the bundled demo model, or edgevlm.load("path/to/package")
        print(model.ask("What shape is this?", images=["shape.png"]))

The names below are imported on first use, so `import edgevlm` (and `edgevlm --version`) stays cheap.
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

# name → the module that defines it, imported when the name is first used (PEP 562).
_LAZY = {
    **{name: "edgevlm.runtime.inprocess" for name in ("load", "Model", "Completion", "Choice", "Stream", "Usage")},
    **{name: "edgevlm.runtime.errors" for name in ("EdgeVLMError", "InvalidRequestError", "ImageError",
                                                   "ContextLengthError", "PackageError", "Cancelled")},
    **{name: "edgevlm.runtime.limits" for name in ("ImageLimits", "EngineConfig")},
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgevlm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY})
