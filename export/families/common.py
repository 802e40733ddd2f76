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


class _Attention(torch.autograd.Function):
    """Multi-head attention over q, k, v [B, S, heads · head_dim] (rotary already applied), no causal mask;
    `mask` [B, S] (1: a real key, 0: padding) or None. Exported as a placeholder node that `contrib_attention`
    turns into onnxruntime's com.microsoft.MultiHeadAttention."""

    @staticmethod
    def forward(ctx, q, k, v, mask, heads: int, scale: float):
        batch, length, width = q.shape

        def split(x):
            return x.reshape(batch, length, heads, width // heads).transpose(1, 2)

        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask,
                                                               scale=scale)
        return out.transpose(1, 2).reshape(batch, length, width)

    @staticmethod
    def symbolic(g, q, k, v, mask, heads: int, scale: float):
        inputs = [q, k, v] if mask is None else [q, k, v, mask]
        out = g.op(f"{PLACEHOLDER_DOMAIN}::Attention", *inputs, num_heads_i=heads, scale_f=scale)
        out.setType(q.type())
        return out


PLACEHOLDER_DOMAIN = "edgevlm"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional multi-head attention (a vision tower's); in an exported graph, onnxruntime's fused
    MultiHeadAttention: without a mask its CPU kernel is flash attention, O(S) memory instead of the O(S²) scores
    of MatMul + Softmax + MatMul (4.2 GB → 0.24 GB and 4× faster for one 1024×768 image's 3,996 patches at
    Qwen2-VL's 16 heads × 80); with a key padding mask [B, S], flash when every key is real, else the plain
    kernel (`contrib_attention`)."""
    return _Attention.apply(q, k, v, None if mask is None else mask.to(torch.int32), heads, scale)


class _FastGelu(torch.autograd.Function):
    """tanh-approximated GELU of x + bias (HF's "gelu_pytorch_tanh"); exported as a placeholder node that
    `contrib_attention` turns into onnxruntime's com.microsoft.FastGelu: one pass over the activations instead of
    the traced formula's eight element-wise nodes and the bias Add (~12% of a SigLIP tile on 2 CPU cores)."""

    @staticmethod
    def forward(ctx, x, bias):
        return torch.nn.functional.gelu(x + bias, approximate="tanh")

    @staticmethod
    def symbolic(g, x, bias):
        out = g.op(f"{PLACEHOLDER_DOMAIN}::FastGelu", x, bias)
        out.setType(x.type())
        return out


def mlp(module: nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor:
    """A vision tower's fc1 → activation → fc2 MLP (`activation`: the config's hidden_act); with the tanh GELU, its
    bias and activation become one fused FastGelu node in the exported graph (`_FastGelu`)."""
    if activation != "gelu_pytorch_tanh" or module.fc1.bias is None:
        return module(x)
    hidden = _FastGelu.apply(torch.nn.functional.linear(x, module.fc1.weight), module.fc1.bias)
    return module.fc2(hidden)


def contrib_attention(path) -> int:
    """Rewrite the exported graph at `path`: each placeholder Attention node → com.microsoft.MultiHeadAttention
    (query, key, value, bias '', key_padding_mask), each placeholder FastGelu → com.microsoft.FastGelu; → the number
    of attention nodes rewritten.

    A node with a key padding mask becomes an If on "every key is real": then the mask-free MultiHeadAttention
    (flash attention on CPU), else the masked one (onnxruntime's flash kernel takes no mask). Images are mostly
    unpadded (Idefics3's tiles, Qwen2.5-VL's whole windows), so most runs take the fast branch; the weights are
    outside the If, nothing is stored twice."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    count, nodes = 0, []
    for node in model.graph.node:
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type == "FastGelu":  # the same inputs: x, bias
            node.domain = "com.microsoft"
            nodes.append(node)
            continue
        if node.domain != PLACEHOLDER_DOMAIN or node.op_type != "Attention":
            nodes.append(node)
            continue
        count += 1
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        q, k, v, *mask = node.input
        out, name = node.output[0], node.name or f"attention_{count}"
        if not mask:
            nodes.append(helper.make_node("MultiHeadAttention", [q, k, v], [out], name=name, domain="com.microsoft",
                                          **attributes))
            continue
        lowest, every = f"{name}/mask_min", f"{name}/every_key_real"
        one = helper.make_tensor(f"{name}/one", TensorProto.INT32, [], [1])
        nodes.append(helper.make_node("ReduceMin", [mask[0]], [lowest], name=f"{name}/ReduceMin", keepdims=0))
        nodes.append(helper.make_node("Constant", [], [f"{name}/one"], name=f"{name}/One", value=one))
        nodes.append(helper.make_node("Equal", [lowest, f"{name}/one"], [every], name=f"{name}/Equal"))

        def branch(inputs, label):
            result = f"{name}/{label}_out"
            body = helper.make_node("MultiHeadAttention", inputs, [result], name=f"{name}/{label}",
                                    domain="com.microsoft", **attributes)
            # The output's type is left to inference: an fp16 conversion changes it (the If must follow).
            return helper.make_graph([body], f"{name}_{label}", [], [helper.make_empty_tensor_value_info(result)])

        nodes.append(helper.make_node("If", [every], [out], name=f"{name}/If",
                                      then_branch=branch([q, k, v], "flash"),
                                      else_branch=branch([q, k, v, "", mask[0]], "masked")))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    imports = [op for op in model.opset_import if op.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    if not any(op.domain == "com.microsoft" for op in imports):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))
    return count
