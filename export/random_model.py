"""Random-weight Idefics3, Qwen2-VL and Qwen2.5-VL checkpoints built from a model card's real metadata.

No pretrained weights can be downloaded where this project is tested, so tests and benchmarks build checkpoints
from a model card folder (config, tokenizer, chat template, processor configs): either at the card's real size
(speed does not depend on the weight values) or shrunk. Shrinking keeps the real tokenizer, special tokens and chat
template, and shrinks the image size and image sequence length consistently, so the processor, the image-token
layout and every export and runtime code path are exercised as they are for the real model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

# Files copied from the model card unchanged (when present).
_CARD_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass(frozen=True)
class TinyDims:
    """Widths and depths for a shrunk Idefics3 model (vision tower, connector, Llama text model)."""

    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    image_size: int = 64  # one tile's side in pixels (the real model: 512)
    patch_size: int = 8  # 8×8 patches per tile
    scale_factor: int = 2  # pixel shuffle: 64 patches → 16 image tokens per tile
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    max_positions: int = 2048
    # Resize target for the longest edge before splitting, in tiles (the real model: 2048 = 4 × 512).
    longest_edge_tiles: int = 4


def shrink_config(config_dict: dict, dims: TinyDims) -> None:
    """Set an Idefics3 config dict's vision and text widths, depths and tile size to `dims`, in place."""
    vision, text = config_dict["vision_config"], config_dict["text_config"]
    vision.update(
        hidden_size=dims.vision_hidden,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
        intermediate_size=dims.vision_intermediate,
        image_size=dims.image_size,
        patch_size=dims.patch_size,
        max_image_size={"longest_edge": dims.image_size},
        size={"longest_edge": dims.image_size * dims.longest_edge_tiles},
    )
    text.update(
        hidden_size=dims.text_hidden,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_kv_heads,
        head_dim=dims.text_hidden // dims.text_heads,
        intermediate_size=dims.text_intermediate,
        max_position_embeddings=dims.max_positions,
    )
    config_dict["scale_factor"] = dims.scale_factor


def build_random_idefics3(card_dir: str | Path, out_dir: str | Path, *, dims: TinyDims | None = None,
                          seed: int = 0) -> Path:
    """Write a random-weight Idefics3ForConditionalGeneration checkpoint to `out_dir`.

    With `dims=None` the card's real dimensions are kept (e.g. SmolVLM-256M for benchmarks); otherwise the model is
    shrunk to `dims`. Returns `out_dir`.
    """
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    card_dir, out_dir = Path(card_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = json.loads((card_dir / "config.json").read_text())
    preprocessor = json.loads((card_dir / "preprocessor_config.json").read_text())
    processor = json.loads((card_dir / "processor_config.json").read_text())

    if dims is not None:
        shrink_config(config_dict, dims)
        preprocessor["max_image_size"] = {"longest_edge": dims.image_size}
        preprocessor["size"] = {"longest_edge": dims.image_size * dims.longest_edge_tiles}
        processor["image_seq_len"] = (dims.image_size // dims.patch_size) ** 2 // dims.scale_factor**2

    # Random weights are made and saved in float32: the checkpoint is a reference for fp32 parity.
    config_dict["torch_dtype"] = "float32"
    config_dict["text_config"]["torch_dtype"] = "float32"
    config = Idefics3Config(**config_dict)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)

    for name in _CARD_FILES:
        if (card_dir / name).exists():
            shutil.copyfile(card_dir / name, out_dir / name)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out_dir / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out_dir


@dataclass(frozen=True)
class QwenTinyDims:
    """Widths and depths for a shrunk Qwen2-VL model (the vision tower keeps 14-pixel patches and 2×2 merging,
    so the processor's arithmetic is the real one)."""

    vision_embed: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # halves of the rotary dims per (t, h, w): sum = head_dim / 2
    max_positions: int = 4096
    max_pixels: int = 64 * 28 * 28  # at most 64 image tokens an image (the card: 16,384)


def build_random_qwen2vl(card_dir: str | Path, out_dir: str | Path, *, dims: QwenTinyDims | None = None,
                         seed: int = 0, chat_template: str | None = None,
                         tokenizer_dir: str | Path | None = None) -> Path:
    """Write a random-weight Qwen2-VL or Qwen2.5-VL checkpoint (config.json's model_type says which) to
    `out_dir`, with a tokenizer.json built from vocab.json + merges.txt + tokenizer_config.json and `chat_template`
    (the Instruct template file's text by default, when there is one). Those and preprocessor_config.json come from
    `tokenizer_dir` (default: `card_dir`): Qwen2.5-VL uses Qwen2-VL's tokenizer, template and image processor.
    `dims=None` keeps the real dimensions."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    card_dir, out_dir = Path(card_dir), Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else card_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = json.loads((card_dir / "config.json").read_text())
    preprocessor = json.loads((tokenizer_dir / "preprocessor_config.json").read_text())
    qwen25 = config_dict.get("model_type") == "qwen2_5_vl"
    if dims is not None:
        config_dict.update(hidden_size=dims.text_hidden, num_hidden_layers=dims.text_layers,
                           num_attention_heads=dims.text_heads, num_key_value_heads=dims.text_kv_heads,
                           intermediate_size=dims.text_intermediate, max_position_embeddings=dims.max_positions,
                           max_window_layers=dims.text_layers)
        config_dict["rope_scaling"] = {"type": "mrope", "mrope_section": list(dims.mrope_section)}
        if qwen25:  # vision width is hidden_size there; out_hidden_size is the text width
            layers = dims.vision_layers
            config_dict["vision_config"].update(
                depth=layers, hidden_size=dims.vision_embed, intermediate_size=2 * dims.vision_embed,
                num_heads=dims.vision_heads, out_hidden_size=dims.text_hidden,
                fullatt_block_indexes=list(range(1, layers, 2)))  # every second block: both kinds
        else:
            config_dict["vision_config"].update(depth=dims.vision_layers, embed_dim=dims.vision_embed,
                                                num_heads=dims.vision_heads, hidden_size=dims.text_hidden)
        preprocessor["max_pixels"] = dims.max_pixels
    config_dict["torch_dtype"] = "float32"
    torch.manual_seed(seed)
    if qwen25:
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config_dict)).eval()
    else:
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config_dict)).eval()
    model.save_pretrained(out_dir, safe_serialization=True)

    template_file = tokenizer_dir / "chat_template.instruct.json"
    if chat_template is None and template_file.exists():
        chat_template = json.loads(template_file.read_text())["chat_template"]
    tokenizer = _qwen2_tokenizer(tokenizer_dir)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2) + "\n")
    tokenizer.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    if (card_dir / "generation_config.json").exists():
        shutil.copyfile(card_dir / "generation_config.json", out_dir / "generation_config.json")
    return out_dir


def _qwen2_tokenizer(card_dir: Path):
    """Qwen2TokenizerFast from vocab.json + merges.txt, with tokenizer_config.json's added tokens at their ids."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    settings = json.loads((card_dir / "tokenizer_config.json").read_text())
    added = sorted(((int(i), t) for i, t in settings.get("added_tokens_decoder", {}).items()), key=lambda x: x[0])
    tokenizer = Qwen2TokenizerFast(vocab_file=str(card_dir / "vocab.json"), merges_file=str(card_dir / "merges.txt"),
                                   errors=settings.get("errors", "replace"), unk_token=None, bos_token=None,
                                   eos_token=None, pad_token=None)
    for token_id, token in added:
        tokenizer.add_tokens([AddedToken(token["content"], special=token.get("special", True),
                                         normalized=token.get("normalized", False), lstrip=token.get("lstrip", False),
                                         rstrip=token.get("rstrip", False), single_word=token.get("single_word", False))],
                             special_tokens=token.get("special", True))
        if tokenizer.convert_tokens_to_ids(token["content"]) != token_id:
            raise ValueError(f"added token {token['content']!r} got id "
                             f"{tokenizer.convert_tokens_to_ids(token['content'])}, not {token_id}")
    tokenizer.eos_token = settings.get("eos_token")
    tokenizer.pad_token = settings.get("pad_token")
    tokenizer.additional_special_tokens = settings.get("additional_special_tokens", [])
    tokenizer.model_max_length = settings.get("model_max_length", tokenizer.model_max_length)
    return tokenizer
