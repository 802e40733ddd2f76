"""Idefics3 (SmolVLM-256M/500M/2.2B-Instruct): the three exportable sub-graphs and the package metadata.

The graphs follow onnx-community's published SmolVLM ONNX files (same file, input and output names), so users can
move between the two:

- vision_encoder:  pixel_values [B, N, 3, H, W] f32, pixel_attention_mask [B, N, H, W] bool
                   → image_features [n_real_images, image_seq_len, text_hidden] (already projected)
- embed_tokens:    input_ids [B, S] i64 → inputs_embeds [B, S, text_hidden]
- decoder:         inputs_embeds, attention_mask [B, P+S], position_ids [B, S], past_key_values.{i}.key/value
                   [B, kv_heads, P, head_dim] → logits [B, S, vocab], present.{i}.key/value [B, kv_heads, P+S, head_dim]

Why the modules below are not HF's forward methods as they are:
- HF's vision embeddings loop over images and fill position ids by boolean-index assignment, with `bucketize`;
  the legacy exporter turns that into a graph onnxruntime refuses, and tracing would fix the image count. The
  vectorised form here computes the same numbers with the same float32 arithmetic (including the `(1 - 1e-6)`
  factor that makes position ids differ from 0, 1, 2, …: kept, or outputs diverge from HF).
- HF's pixel shuffle takes the grid side as `int(seq ** 0.5)`, which tracing bakes in as a constant; here it comes
  from the pixel tensor's shape, so it stays symbolic.
- The decoder wraps the text model and lm_head so the KV cache enters and leaves as flat tensors; optimum's ONNX
  config and model patcher do the rest (they patch the mask functions and `DynamicLayer.update`, which the legacy
  TorchScript exporter cannot trace on transformers ≥ 4.56).
"""

from __future__ import annotations

import torch
from torch import nn


from . import common

FAMILY = "idefics3"
ARCHITECTURES = ("Idefics3ForConditionalGeneration",)
MODEL_TYPES = ("idefics3",)


def load_model(source: str, **hub_kwargs):
    from transformers import Idefics3ForConditionalGeneration

    # float32: the reference for fp32 parity and what the graphs are traced from.
    model = Idefics3ForConditionalGeneration.from_pretrained(source, dtype=torch.float32, **hub_kwargs)
    return model.eval()


def load_processor(source: str, **hub_kwargs):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(source, **hub_kwargs)


class VisionEncoder(nn.Module):
    """pixel_values + pixel_attention_mask → image features in the text embedding space (HF get_image_features)."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.model.vision_model
        self.connector = model.model.connector
        self.patch_size = model.config.vision_config.patch_size
        self.scale_factor = model.config.scale_factor
        self._activation = model.config.vision_config.hidden_act

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
        batch, num_images, channels, height, width = pixel_values.shape
        pixel_values = pixel_values.reshape(batch * num_images, channels, height, width)
        pixel_attention_mask = pixel_attention_mask.reshape(batch * num_images, height, width)

        # HF drops padding images (all zeros) before the vision tower.
        values_per_image = channels * height * width
        real_images = (pixel_values == 0.0).to(torch.int64).sum(dim=(1, 2, 3)) != values_per_image
        pixel_values = pixel_values[real_images]
        pixel_attention_mask = pixel_attention_mask[real_images]

        # A patch is attended if any of its pixels is (HF: unfold + sum; a reshape-and-sum exports cleanly).
        p = self.patch_size
        n = pixel_values.shape[0]
        h, w = height // p, width // p
        patch_mask = pixel_attention_mask.to(torch.int32).reshape(n, h, p, w, p).sum(dim=(2, 4)) > 0

        hidden = self._embeddings(pixel_values, patch_mask)
        key_mask = patch_mask.reshape(n, h * w)
        for layer in self.vision_model.encoder.layers:  # HF's Idefics3EncoderLayer, its attention fused
            hidden = hidden + self._attention(layer.self_attn, layer.layer_norm1(hidden), key_mask)
            hidden = hidden + common.mlp(layer.mlp, layer.layer_norm2(hidden), self._activation)
        hidden = self.vision_model.post_layernorm(hidden)
        return self.connector.modality_projection(self._pixel_shuffle(hidden, h, w))

    @staticmethod
    def _attention(attn, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """onnxruntime's MultiHeadAttention in the graph (flash attention when no patch is padding: every tile of
        a split image; the masked kernel for a padded view)."""
        out = common.attention(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.num_heads, attn.scale, key_mask)
        return attn.out_proj(out)

    def _embeddings(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        emb = self.vision_model.embeddings
        side = emb.num_patches_per_side
        embeddings = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)

        boundaries = torch.arange(1 / side, 1.0, 1 / side)
        h, w = patch_mask.shape[1], patch_mask.shape[2]
        # The attended patches form a top-left rectangle (the processor pads right and bottom): its height is the
        # count in the first column, its width the count in the first row, as in HF.
        rows = patch_mask[:, :, 0].to(torch.int64).sum(1, keepdim=True)
        cols = patch_mask[:, 0, :].to(torch.int64).sum(1, keepdim=True)
        h_indices = torch.arange(h, dtype=pixel_values.dtype).unsqueeze(0)
        w_indices = torch.arange(w, dtype=pixel_values.dtype).unsqueeze(0)
        frac_h = h_indices / rows * (1 - 1e-6)
        frac_w = w_indices / cols * (1 - 1e-6)
        # bucketize(x, boundaries, right=True) == number of boundaries <= x
        bucket_h = (frac_h.unsqueeze(-1) >= boundaries).to(torch.int64).sum(-1)
        bucket_w = (frac_w.unsqueeze(-1) >= boundaries).to(torch.int64).sum(-1)
        position_ids = bucket_h.unsqueeze(2) * side + bucket_w.unsqueeze(1)
        position_ids = torch.where(patch_mask, position_ids, torch.zeros_like(position_ids))
        return embeddings + emb.position_embedding(position_ids.flatten(1))

    def _pixel_shuffle(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        s = self.scale_factor
        n, _, dim = x.shape
        x = x.reshape(n, h, w // s, dim * s)
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(n, w // s, h // s, dim * s * s)
        x = x.permute(0, 2, 1, 3)
        return x.reshape(n, (h // s) * (w // s), dim * s * s)


class Decoder(common.Decoder):
    def __init__(self, model):
        super().__init__(model.model.text_model, model.lm_head, model.config.text_config)


def decoder_onnx_config(text_config):
    return common.decoder_onnx_config(text_config)


def export_vision(model, path, opset: int) -> None:
    """The vision encoder graph: pixel_values + pixel_attention_mask → image_features (onnx-community's names)."""
    pixel_values, pixel_mask = vision_dummy_inputs(model)
    torch.onnx.export(
        VisionEncoder(model).eval(), (pixel_values, pixel_mask), str(path),
        input_names=["pixel_values", "pixel_attention_mask"], output_names=["image_features"],
        dynamic_axes={
            "pixel_values": {0: "batch_size", 1: "num_images", 3: "height", 4: "width"},
            "pixel_attention_mask": {0: "batch_size", 1: "num_images", 2: "height", 3: "width"},
            "image_features": {0: "num_real_images", 1: "image_sequence_length"},
        },
        opset_version=opset, dynamo=False, custom_opsets={common.PLACEHOLDER_DOMAIN: 1},
    )
    common.contrib_attention(path)


def chat_inputs(processor, images, question: str, *, single_view: bool | None = None) -> dict:
    """Processor outputs for one user turn with `images` then `question`, as transformers builds them;
    `single_view`: True = no image splitting (one tile per image), None = the processor's setting."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    image_processor = processor.image_processor
    configured = image_processor.do_image_splitting
    if single_view is not None:
        # The processor's call takes no per-call switch for splitting in transformers 4.57.
        image_processor.do_image_splitting = not single_view
    try:
        return processor(text=prompt, images=images or None, return_tensors="pt")
    finally:
        image_processor.do_image_splitting = configured


def reference_features(model, inputs) -> torch.Tensor:
    """transformers' image features for processor `inputs` (the reference for the vision graph)."""
    return model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"].bool())


def package_features(engine, inputs):
    """The exported vision graph's features for the same inputs, through the runtime engine."""
    return engine.encode_images(inputs["pixel_values"].numpy(), inputs["pixel_attention_mask"].numpy().astype(bool))


def vision_dummy_inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of two tiles each, one tile with a padded bottom-right area (dims ≥ 2 stay symbolic)."""
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 2, 3, size, size, generator=generator)
    mask = torch.ones(2, 2, size, size, dtype=torch.bool)
    pad = model.config.vision_config.patch_size * 2
    mask[1, 1, size - pad:, :] = False
    mask[1, 1, :, size - pad:] = False
    pixel_values[1, 1, :, size - pad:, :] = 0
    pixel_values[1, 1, :, :, size - pad:] = 0
    return pixel_values, mask


def package_metadata(model, processor) -> dict:
    """The family-specific part of model.json: dimensions, image processing and token ids."""
    config = model.config
    text, vision = config.text_config, config.vision_config
    tokenizer = processor.tokenizer
    image_processor = processor.image_processor

    def token_id(token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token!r} token")
        return int(token_id)

    eos_ids = []
    for token in ("<|im_end|>", "<end_of_utterance>"):
        if token in tokenizer.get_vocab():
            eos_ids.append(token_id(token))
    if text.eos_token_id is not None and text.eos_token_id not in eos_ids:
        eos_ids.append(int(text.eos_token_id))
    generation_eos = getattr(model.generation_config, "eos_token_id", None)
    for eos in generation_eos if isinstance(generation_eos, list) else [generation_eos]:
        if eos is not None and int(eos) not in eos_ids:
            eos_ids.append(int(eos))

    return {
        "text": {
            "num_layers": text.num_hidden_layers,
            "hidden_size": text.hidden_size,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            "vocab_size": text.vocab_size,
            "context_length": text.max_position_embeddings,
            "rope_theta": text.rope_theta,
        },
        "vision": {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_size": vision.hidden_size,
            "num_layers": vision.num_hidden_layers,
            "scale_factor": config.scale_factor,
            "image_seq_len": model.model.image_seq_len,
        },
        "image_processor": {
            "type": type(image_processor).__name__,
            "do_convert_rgb": image_processor.do_convert_rgb,
            "do_resize": image_processor.do_resize,
            "size": dict(image_processor.size),
            "resample": int(image_processor.resample),
            "do_image_splitting": image_processor.do_image_splitting,
            "max_image_size": dict(image_processor.max_image_size),
            "do_rescale": image_processor.do_rescale,
            "rescale_factor": image_processor.rescale_factor,
            "do_normalize": image_processor.do_normalize,
            "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std),
            "do_pad": image_processor.do_pad,
        },
        "tokens": {
            "image_token": processor.image_token.content if hasattr(processor.image_token, "content")
            else str(processor.image_token),
            "image_token_id": int(config.image_token_id),
            "fake_image_token": str(processor.fake_image_token),
            "global_image_token": str(processor.global_image_tag),
            "end_of_utterance_token": str(processor.end_of_utterance_token),
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": text.pad_token_id,
            "eos_token_ids": eos_ids,
            # What transformers passes to the chat template besides the messages (bos_token, eos_token, …).
            "special_tokens": dict(tokenizer.special_tokens_map),
        },
    }
