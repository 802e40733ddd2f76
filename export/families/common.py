"""Graph wrappers every family shares."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class EmbedTokens(nn.Module):
    """input_ids → the text model's token embeddings (the embed_tokens graph)."""

    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class Decoder(nn.Module):
    """The portable decoder: text model + lm_head with the cache as flat tensors (optimum's patcher turns them
    into a DynamicCache). `position_ids` is [B, S], or [3, B, S] for an M-RoPE model (temporal, height, width)."""

    def __init__(self, text_model, lm_head, config):
        super().__init__()
        self.text_model, self.lm_head, self.config = text_model, lm_head, config

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):
        out = self.text_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
        )
        return {"logits": self.lm_head(out.last_hidden_state), "past_key_values": out.past_key_values}


def decoder_onnx_config(text_config, *, mrope: bool = False):
    """optimum's Llama ONNX config, taking inputs_embeds instead of input_ids (a VLM splices image features in);
    with `mrope`, position_ids are [3, batch, sequence] (onnx-community's Qwen2-VL decoder interface)."""
    from optimum.exporters.onnx.model_configs import LlamaOnnxConfig

    class DecoderOnnxConfig(LlamaOnnxConfig):
        # The base class pads the mask it builds from input_ids; ours is built in generate_dummy_inputs.
        PAD_ATTENTION_MASK_TO_PAST = False

        @property
        def inputs(self):
            inputs = OrderedDict(
                inputs_embeds={0: "batch_size", 1: "sequence_length"},
                attention_mask={0: "batch_size", 1: "total_sequence_length"},
                position_ids={1: "batch_size", 2: "sequence_length"} if mrope
                else {0: "batch_size", 1: "sequence_length"},
            )
            self.add_past_key_values(inputs, direction="inputs")
            return inputs

        @property
        def outputs(self):
            outputs = OrderedDict(logits={0: "batch_size", 1: "sequence_length"})
            self.add_past_key_values(outputs, direction="outputs")
            return outputs

        def generate_dummy_inputs(self, framework: str = "pt", **kwargs):
            # Batch 2 and past 2: sizes 0 and 1 get specialised by tracing. The traced graph still runs with past 0
            # (the prefill) and batch 1.
            batch, seq, past = 2, 3, 2
            cfg = self._config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            kv_shape = (batch, cfg.num_key_value_heads, past, head_dim)
            generator = torch.Generator().manual_seed(0)
            positions = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq)
            if mrope:  # three different rows, so none is traced as a copy of another
                positions = torch.stack([positions, positions + 1, positions + 2])
            return {
                "inputs_embeds": torch.randn(batch, seq, cfg.hidden_size, generator=generator),
                "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64),
                "position_ids": positions,
                "past_key_values": [
                    (torch.randn(kv_shape, generator=generator), torch.randn(kv_shape, generator=generator))
                    for _ in range(cfg.num_hidden_layers)
                ],
            }

        def generate_dummy_inputs_for_validation(self, reference_model_inputs, onnx_input_names=None):
            return reference_model_inputs

    return DecoderOnnxConfig(text_config, task="text-generation", use_past=True, use_past_in_inputs=True)
