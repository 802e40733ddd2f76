"""Qwen2.5-VL: Qwen2-VL's export with the windowed vision tower.

The text model, processor, prompt layout, M-RoPE positions and both decoder forms are Qwen2-VL's (same modules in
transformers, same tokenizer and chat template); the vision tower differs: RMSNorm, a gated SiLU MLP, and blocks
that attend within 112-pixel windows except `fullatt_block_indexes`. HF orders the patches window by window inside
the model (a Python loop over grid_thw that tracing would freeze); here the host does it
(`runtime.families.qwen2_5_vl.vision_feed`) and the graph takes

    pixel_values, position_ids in window order; window_gather, window_mask, window_scatter (the patches laid out
    as padded windows of 64); restore_index  →  image_features [patches / 4, text_hidden] in the processor's order

one image a run: the full-attention blocks attend across the image (flash attention), the others within windows.
"""

from __future__ import annotations

import torch

from . import common, qwen2vl

FAMILY = "qwen2_5_vl"
ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)
MODEL_TYPES = ("qwen2_5_vl",)
INPUTS = ["pixel_values", "position_ids", "window_gather", "window_mask", "window_scatter", "restore_index"]

# Qwen2-VL's, unchanged: processor, verification inputs and reference, M-RoPE positions, the portable decoder.
load_processor, chat_inputs, reference_features = qwen2vl.load_processor, qwen2vl.chat_inputs, qwen2vl.reference_features
positions, Decoder, decoder_onnx_config = qwen2vl.positions, qwen2vl.Decoder, qwen2vl.decoder_onnx_config
portable_decoder_fields = qwen2vl.portable_decoder_fields


class VisionEncoder(qwen2vl.VisionEncoder):
    """One image a run, in window order (`runtime.families.qwen2_5_vl.vision_feed`); the windowed blocks attend
    within padded windows, the full-attention ones across the image (flash attention)."""

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, window_gather: torch.Tensor,
                window_mask: torch.Tensor, window_scatter: torch.Tensor, restore_index: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        cos, sin = self._rotary(position_ids)
        windows = (window_gather, window_scatter, window_mask)
        full = set(visual.fullatt_block_indexes)
        for index, block in enumerate(visual.blocks):
            hidden = self._block(block, hidden, cos, sin, None if index in full else windows)
        return visual.merger(hidden)[restore_index]


def _window(model) -> int:
    from ...runtime.families.qwen2_5_vl import window_tokens

    vision = model.config.vision_config
    return window_tokens(vision.window_size, vision.spatial_merge_size, vision.patch_size)


def vision_dummy_inputs(model) -> tuple[torch.Tensor, ...]:
    """An image of 12×10 patches: several windows, the last ones partial (so no window count or size is a
    constant of the trace)."""
    from ...runtime.families.qwen2_5_vl import vision_feed

    vision = model.config.vision_config
    width = vision.in_chans * vision.temporal_patch_size * vision.patch_size ** 2
    grid = (1, 12, 10)
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(12 * 10, width, generator=generator).numpy()
    feed = vision_feed(values, grid, vision.spatial_merge_size, _window(model))
    return tuple(torch.from_numpy(feed[name]) for name in INPUTS)


def export_vision(model, path, opset: int) -> None:
    torch.onnx.export(
        VisionEncoder(model).eval(), vision_dummy_inputs(model), str(path),
        input_names=INPUTS, output_names=["image_features"],
        dynamic_axes={"pixel_values": {0: "patches"}, "position_ids": {0: "patches"},
                      "window_gather": {0: "window_slots"}, "window_mask": {0: "windows"},
                      "window_scatter": {0: "patches"}, "restore_index": {0: "image_tokens"},
                      "image_features": {0: "image_tokens"}},
        opset_version=opset, dynamo=False, custom_opsets={common.PLACEHOLDER_DOMAIN: 1},
    )
    common.contrib_attention(path)


def load_model(source: str, **hub_kwargs):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32, **hub_kwargs).eval()


def package_metadata(model, processor) -> dict:
    metadata = qwen2vl.package_metadata(model, processor)
    vision = model.config.vision_config
    metadata["vision"].update(window_size=vision.window_size,
                              fullatt_block_indexes=list(vision.fullatt_block_indexes))
    return metadata


def package_features(engine, inputs):
    import numpy as np

    from ...runtime.families.qwen2_5_vl import vision_feed, window_tokens

    vision = engine.package.vision
    window = window_tokens(vision["window_size"], vision["merge_size"], vision["patch_size"])
    return np.concatenate([engine.run_vision(vision_feed(values, grid, vision["merge_size"], window))
                           for values, grid in qwen2vl._per_image(inputs)])
