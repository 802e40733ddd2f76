"""The demo model's tokenizer: a tiny byte-level BPE trained with `tokenizers` on the demo corpus.

Byte-level like SmolVLM's (GPT-2 style: every byte has a token, so any user text encodes, and decoding is exact),
with SmolVLM's special tokens (same strings, same order, at the start of the vocabulary) and SmolVLM's chat
template, so the Idefics3 processor, image-token expansion and stop tokens work as they do for SmolVLM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .data import corpus_texts

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "smolvlm-256m-instruct"

# SmolVLM's special tokens that the Idefics3 processor, the chat template and the runtime use, in SmolVLM's order.
SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
)
VOCAB_SIZE = 640


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The corpus: every question/answer text, plus the chat template's words, weighted so whole words get merged.
    base = corpus_texts()
    texts = (base + [" " + t for t in base]) * 4 + ["User:", "Assistant:", "User: Hello", "\n", " ", "Assistant: "] * 20
    tok.train_from_iterator(texts, trainer=trainer)
    # Special tokens must never be split or normalized.
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_tokenizer_files(out_dir: str | Path, tok: Tokenizer | None = None) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.json; return key ids."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tok or train_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"))
    template = json.loads((FIXTURE / "chat_template.json").read_text())["chat_template"]
    shutil.copyfile(FIXTURE / "chat_template.json", out_dir / "chat_template.json")
    shutil.copyfile(FIXTURE / "special_tokens_map.json", out_dir / "special_tokens_map.json")
    config = {
        "add_prefix_space": False,
        "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        "bos_token": "<|im_start|>",
        "eos_token": "<end_of_utterance>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "model_input_names": ["input_ids", "attention_mask"],
        "processor_class": "Idefics3Processor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return token_ids(tok)


def token_ids(tok: Tokenizer) -> dict[str, int]:
    return {
        "vocab_size": tok.get_vocab_size(),
        "bos": tok.token_to_id("<|im_start|>"),
        "im_end": tok.token_to_id("<|im_end|>"),
        "eou": tok.token_to_id("<end_of_utterance>"),
        "image": tok.token_to_id("<image>"),
        "fake": tok.token_to_id("<fake_token_around_image>"),
        "global": tok.token_to_id("<global-img>"),
    }


if __name__ == "__main__":
    t = train_tokenizer()
    print(t.get_vocab_size(), token_ids(t))
    for s in ["<|im_start|>User:<image>What shape is in the image?<end_of_utterance>\nAssistant: A red circle.",
              "The blue square is on the left.", "I am a small demo model that describes shapes and colours in images."]:
        enc = t.encode(s)
        print(len(enc.ids), enc.tokens, repr(t.decode(enc.ids)))
