"""Qwen2-VL: the vision encoder as an exportable module (issue 13, in progress; not registered as a family yet).

HF's vision tower loops over images (`rot_pos_emb`, split-by-length attention with `.tolist()`): tracing would
bake the image count and sizes into the graph. Here everything that depends on the grid is computed on the host
(`runtime.families.qwen2vl.vision_positions`, a few integers per patch) and enters as inputs:

    pixel_values [patches, 3·2·14·14] f32, position_ids [patches, 2] i64 (row, column of each patch, in the
    merger's 2×2 order), segment_ids [patches] i64 (which image)  →  image_features [patches / 4, text_hidden]

The rotary angles are `position_ids × inv_freq` (what indexing HF's table computes); attention is one SDPA call
over all patches with a block-diagonal mask from the segment ids (attention stays within each image, as HF's
per-image split does), so any number of images of any size runs in one graph.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FAMILY = "qwen2_vl"
ARCHITECTURES = ("Qwen2VLForConditionalGeneration",)
MODEL_TYPES = ("qwen2_vl",)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.visual = model.model.visual

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor
                ) -> torch.Tensor:
        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        inv_freq = visual.rotary_pos_emb.inv_freq
        angles = (position_ids.to(inv_freq.dtype)[:, :, None] * inv_freq).flatten(1)  # [patches, head_dim / 2]
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        same_image = segment_ids[:, None] == segment_ids[None, :]
        mask = torch.zeros(same_image.shape, dtype=hidden.dtype).masked_fill(~same_image, torch.finfo(hidden.dtype).min)
        for block in visual.blocks:
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, mask)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)

    @staticmethod
    def _attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        patches = x.shape[0]
        q, k, v = attn.qkv(x).reshape(patches, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, scale=attn.scaling)
        return attn.proj(out.transpose(0, 1).reshape(patches, -1))


def vision_dummy_inputs(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images of different grids (4×6 and 2×8 patches), so no size is a constant of the trace."""
    from ...runtime.families.qwen2vl import vision_positions

    vision = model.config.vision_config
    width = vision.in_chans * vision.temporal_patch_size * vision.patch_size ** 2
    grids = [(1, 4, 6), (1, 2, 8)]
    positions, segments = vision_positions(grids, vision.spatial_merge_size)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(len(segments), width, generator=generator)
    return pixel_values, torch.from_numpy(positions), torch.from_numpy(segments)


def export_vision(model, path, opset: int) -> None:
    """The vision encoder graph: pixel_values, position_ids, segment_ids → image_features."""
    torch.onnx.export(
        VisionEncoder(model).eval(), vision_dummy_inputs(model), str(path),
        input_names=["pixel_values", "position_ids", "segment_ids"], output_names=["image_features"],
        dynamic_axes={"pixel_values": {0: "patches"}, "position_ids": {0: "patches"}, "segment_ids": {0: "patches"},
                      "image_features": {0: "image_tokens"}},
        opset_version=opset, dynamo=False,
    )
