"""Qwen2-VL: the export family (vision graph, package metadata, verification inputs, the portable decoder).

HF's vision tower loops over images (`rot_pos_emb`, split-by-length attention with `.tolist()`): tracing would
bake the image count and sizes into the graph. Here what depends on the grid is computed on the host
(`runtime.families.qwen2vl.vision_positions`, two integers per patch) and enters as an input, one image a run:

    pixel_values [patches, 3·2·14·14] f32, position_ids [patches, 2] i64 (row, column of each patch, in the
    merger's 2×2 order)  →  image_features [patches / 4, text_hidden]

The rotary angles are `position_ids × inv_freq` (what indexing HF's table computes); attention is onnxruntime's
MultiHeadAttention over the whole image (HF attends within each image: one image a run is the same), whose CPU
kernel is flash attention.
"""

from __future__ import annotations

import torch
from torch import nn


from . import common

FAMILY = "qwen2_vl"
ARCHITECTURES = ("Qwen2VLForConditionalGeneration",)
MODEL_TYPES = ("qwen2_vl",)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionEncoder(nn.Module):
    """One image a run: pixel_values [patches, 1176], position_ids [patches, 2] → image_features [patches / 4, hidden].
    Attention over all the image's patches is onnxruntime's MultiHeadAttention (flash attention on CPU)."""

    def __init__(self, model):
        super().__init__()
        self.visual = model.model.visual

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.visual.patch_embed(pixel_values)
        cos, sin = self._rotary(position_ids)
        for block in self.visual.blocks:
            hidden = self._block(block, hidden, cos, sin)
        return self.visual.merger(hidden)

    def _rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.visual.rotary_pos_emb.inv_freq
        angles = (position_ids.to(inv_freq.dtype)[:, :, None] * inv_freq).flatten(1)  # [patches, head_dim / 2]
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]

    def _block(self, block, hidden, cos, sin, windows=None) -> torch.Tensor:
        hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, windows)
        return hidden + block.mlp(block.norm2(hidden))

    @staticmethod
    def _attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, windows=None) -> torch.Tensor:
        """`windows` None: every patch attends to every other; else (gather [W·L], scatter [patches], mask [W, L]):
        the patches laid out as W padded windows of L, attention within each window (Qwen2.5-VL)."""
        patches = x.shape[0]
        q, k, v = attn.qkv(x).reshape(patches, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        q, k, v = (t.reshape(patches, -1) for t in (q, k, v))
        if windows is None:
            out = common.attention(q[None], k[None], v[None], attn.num_heads, attn.scaling)[0]
        else:
            gather, scatter, mask = windows

            def laid_out(t):  # [patches, width] → [W, L, width], padding rows zero
                padded = torch.cat([t, torch.zeros_like(t[:1])])
                return padded[gather].reshape(mask.shape[0], mask.shape[1], t.shape[-1])

            out = common.attention(laid_out(q), laid_out(k), laid_out(v), attn.num_heads, attn.scaling, mask)
            out = out.reshape(-1, out.shape[-1])[scatter]
        return attn.proj(out)


def vision_dummy_inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """An image of 4×6 patches; the graph takes any grid (nothing about the size is a constant of the trace)."""
    from ...runtime.families.qwen2vl import vision_positions

    vision = model.config.vision_config
    width = vision.in_chans * vision.temporal_patch_size * vision.patch_size ** 2
    positions = vision_positions((1, 4, 6), vision.spatial_merge_size)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(len(positions), width, generator=generator), torch.from_numpy(positions)


def export_vision(model, path, opset: int) -> None:
    """The vision encoder graph: pixel_values, position_ids → image_features (one image a run)."""
    torch.onnx.export(
        VisionEncoder(model).eval(), vision_dummy_inputs(model), str(path),
        input_names=["pixel_values", "position_ids"], output_names=["image_features"],
        dynamic_axes={"pixel_values": {0: "patches"}, "position_ids": {0: "patches"},
                      "image_features": {0: "image_tokens"}},
        opset_version=opset, dynamo=False, custom_opsets={common.PLACEHOLDER_DOMAIN: 1},
    )
    common.contrib_attention(path)


# ----------------------------------------------------------------------------------- loading and package metadata


def load_model(source: str, **hub_kwargs):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32, **hub_kwargs).eval()


class Processor:
    """The tokenizer, image processor and chat template: what Qwen2VLProcessor holds, without its video half
    (which needs torchvision in transformers 4.57)."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None):
        self.tokenizer, self.image_processor, self.chat_template = tokenizer, image_processor, chat_template


def load_processor(source: str, **hub_kwargs) -> Processor:
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    template = tokenizer.chat_template
    path = Path(source) / "chat_template.json"
    if path.is_file():
        template = json.loads(path.read_text())["chat_template"]
    return Processor(tokenizer, Qwen2VLImageProcessor.from_pretrained(source, **hub_kwargs), template)


def package_metadata(model, processor) -> dict:
    config = model.config
    text, vision = config.text_config, config.vision_config
    tokenizer, images = processor.tokenizer, processor.image_processor
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    generation_eos = getattr(model.generation_config, "eos_token_id", None)
    for token in generation_eos if isinstance(generation_eos, list) else [generation_eos]:
        if token is not None and int(token) not in eos:
            eos.append(int(token))
    return {
        "text": {
            "num_layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
            "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
            "head_dim": text.hidden_size // text.num_attention_heads, "vocab_size": text.vocab_size,
            "context_length": text.max_position_embeddings, "rope_theta": text.rope_theta,
            "mrope_section": list(text.rope_scaling["mrope_section"]),
        },
        "vision": {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
                   "merge_size": vision.spatial_merge_size,
                   "hidden_size": getattr(vision, "embed_dim", None) or vision.hidden_size,
                   "num_layers": vision.depth},
        "image_processor": {
            "type": type(images).__name__, "min_pixels": images.min_pixels, "max_pixels": images.max_pixels,
            "patch_size": images.patch_size, "temporal_patch_size": images.temporal_patch_size,
            "merge_size": images.merge_size, "image_mean": list(images.image_mean),
            "image_std": list(images.image_std), "rescale_factor": images.rescale_factor,
            "resample": int(images.resample), "do_resize": images.do_resize, "do_rescale": images.do_rescale,
            "do_normalize": images.do_normalize,
        },
        "tokens": {
            "image_token": "<|image_pad|>", "image_token_id": int(config.image_token_id),
            "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
            "bos_token_id": None, "pad_token_id": tokenizer.pad_token_id, "eos_token_ids": eos,
            "special_tokens": dict(tokenizer.special_tokens_map),
        },
    }


# ------------------------------------------------------------------------------------------------ verification


def chat_inputs(processor, images, question: str, *, single_view: bool | None = None) -> dict:
    """What Qwen2VLProcessor gives for one user turn (images then question): input_ids, pixel_values,
    image_grid_thw; `single_view` (a small pixel budget) keeps the check fast at real sizes."""
    from ...runtime.families.qwen2vl import Qwen2VLLayout

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                     add_generation_prompt=True, chat_template=processor.chat_template)
    out = {}
    if images:
        kwargs = {"max_pixels": 64 * 28 * 28} if single_view else {}
        out = dict(processor.image_processor(images=images, return_tensors="pt", **kwargs))
        prompt = Qwen2VLLayout().expand(prompt, out["image_grid_thw"].tolist())
    out["input_ids"] = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    return out


def reference_features(model, inputs) -> torch.Tensor:
    return torch.cat(list(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])))


def _per_image(inputs):
    """(pixel_values, grid) of each image in a processor batch."""
    grids = inputs["image_grid_thw"].tolist()
    start = 0
    for t, h, w in grids:
        yield inputs["pixel_values"][start:start + t * h * w].numpy(), (t, h, w)
        start += t * h * w


def package_features(engine, inputs):
    import numpy as np

    from ...runtime.families.qwen2vl import vision_positions

    return np.concatenate([engine.run_vision({"pixel_values": values,
                                              "position_ids": vision_positions(grid)})
                           for values, grid in _per_image(inputs)])


def positions(model, inputs) -> tuple:
    """The prompt's M-RoPE positions [3, S] and the decode offset (for the decoder's check)."""
    from ...runtime.families.qwen2vl import rope_index

    grids = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []
    return rope_index(inputs["input_ids"][0].tolist(), grids, int(model.config.image_token_id))


# ------------------------------------------------------------------------------------ the portable decoder form


class Decoder(common.Decoder):
    def __init__(self, model):
        super().__init__(model.model.language_model, model.lm_head, model.config.text_config)


def decoder_onnx_config(text_config):
    return common.decoder_onnx_config(text_config, mrope=True)


def portable_decoder_fields(model) -> dict:
    """model.json's decoder entry: the portable graph takes 3-D M-RoPE position ids."""
    text = model.config.text_config
    return {"rotary": "mrope", "mrope_section": list(text.rope_scaling["mrope_section"]),
            "rope_theta": float(text.rope_theta)}
