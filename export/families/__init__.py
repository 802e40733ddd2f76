"""Model families on the export side: one module per family, found through one line of `FAMILIES`.

A family module defines FAMILY, ARCHITECTURES, MODEL_TYPES; load_model / load_processor; the graph wrappers and
`export_vision(model, path, opset)`; `decoder_onnx_config`; `package_metadata(model, processor)` (model.json's
family part); and for verification `chat_inputs(processor, images, question, single_view=...)`,
`reference_features(model, inputs)` (transformers' own image features) and `package_features(engine, inputs)`
(the exported vision graph's, through the runtime engine). models/README.md documents the runtime side.
"""

from __future__ import annotations

import importlib

FAMILIES = {
    "idefics3": "edgevlm.export.families.idefics3",
    "qwen2_vl": "edgevlm.export.families.qwen2vl",
    "qwen2_5_vl": "edgevlm.export.families.qwen2_5_vl",
}


def family_named(name: str):
    return importlib.import_module(FAMILIES[name])


def family_for(config: dict):
    """The family module whose model_type or architecture the checkpoint's config.json names, else None."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    for name in FAMILIES:
        family = family_named(name)
        if model_type in family.MODEL_TYPES or any(a in family.ARCHITECTURES for a in architectures):
            return family
    return None
