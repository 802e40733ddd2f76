"""IncrementalDetokenizer against the real SmolVLM tokenizer: deltas are final, valid text, and add up to decode()."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgevlm.runtime.detokenize import IncrementalDetokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "smolvlm-256m-instruct"
FFFD = "\ufffd"

TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. 1234567890!",
    "emoji": "Hello 😀 world 🤗🦙 done 🎉!",
    "emoji_zwj_and_flags": "family 👨‍👩‍👧‍👦, rainbow flag 🏳️‍🌈, flags 🇫🇷🇯🇵, skin tone 👍🏽.",
    "cjk": "你好，世界！这是一个测试。",
    "japanese_korean": "日本語のテキストです。한국어 텍스트입니다.",
    "mixed": "Mixed: café ☕, 東京 🗼, Ελληνικά, русский, العربية, हिन्दी, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
    "accented": "héllo naïve café résumé Ångström façade coöperate Zürich",
    "combining": "e\u0301 a\u0308 n\u0303 — precomposed é ä ñ",
    "newlines_and_code": "def f(x):\n    return x ** 2  # 平方\n\n\tdone\r\n",
    "special_tokens": "<|im_start|>User: hi 🎉<end_of_utterance>\nAssistant: 好的<|im_end|><image><fake_token_around_image>",
    "replacement_char": "a literal \ufffd replacement char \ufffd\ufffd and 😀 after",
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))


def stream(tokenizer, ids, **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_deltas_are_valid_and_add_up_to_decode(tokenizer, name, skip):
    text = TEXTS[name]
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    deltas, detok = stream(tokenizer, ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    assert detok.text == full
    assert detok.num_tokens == len(ids)
    for delta in deltas:
        delta.encode("utf-8")  # a complete, encodable string
        if FFFD not in text:
            assert FFFD not in delta
    if FFFD in text:
        assert sum(d.count(FFFD) for d in deltas) == text.count(FFFD)


def test_special_tokens_are_skipped_or_kept(tokenizer):
    text = TEXTS["special_tokens"]
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.token_to_id("<end_of_utterance>") in ids
    skipped, _ = stream(tokenizer, ids, skip_special_tokens=True)
    kept, _ = stream(tokenizer, ids, skip_special_tokens=False)
    assert "<end_of_utterance>" not in "".join(skipped)
    assert "".join(skipped) == "User: hi 🎉\nAssistant: 好的"
    assert "".join(kept) == text
    # A special token on its own gives exactly its text when kept, nothing when skipped.
    eou = tokenizer.token_to_id("<end_of_utterance>")
    assert IncrementalDetokenizer(tokenizer, skip_special_tokens=False).add(eou) == "<end_of_utterance>"
    assert IncrementalDetokenizer(tokenizer, skip_special_tokens=True).add(eou) == ""


@pytest.mark.parametrize("emoji", ["😀", "🤗", "🦙", "🫠", "𝔘"])
def test_multi_token_character_is_held_until_complete(tokenizer, emoji):
    prefix_ids = tokenizer.encode("ok", add_special_tokens=False).ids
    emoji_ids = tokenizer.encode(emoji, add_special_tokens=False).ids
    assert 3 <= len(emoji_ids) <= 4  # byte-level BPE splits this 4-byte character
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add(i) for i in prefix_ids) == "ok"
    for token in emoji_ids[:-1]:
        assert detok.add(token) == ""  # nothing, not a broken sequence
    assert detok.add(emoji_ids[-1]) == emoji
    assert detok.flush() == ""
    assert detok.text == "ok" + emoji


def test_text_before_a_split_character_is_not_held_back(tokenizer):
    # " 😀" → 'ĠðŁĺ' 'Ģ': the space is final as soon as its token arrives, the emoji when it completes.
    ids = tokenizer.encode("Hello 😀 world", add_special_tokens=False).ids
    assert [tokenizer.id_to_token(i) for i in ids] == ["Hello", "ĠðŁĺ", "Ģ", "Ġworld"]
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids] == ["Hello", " ", "😀", " world"]


def test_flush_emits_an_incomplete_character_as_decode_does(tokenizer):
    ids = tokenizer.encode("ab😀", add_special_tokens=False).ids[:-1]  # stop inside the emoji
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == "ab"
    tail = detok.flush()
    assert tail == FFFD
    assert detok.text == tokenizer.decode(ids) == "ab" + FFFD
    assert detok.flush() == ""


def test_accepts_numpy_integers(tokenizer):
    ids = np.array(tokenizer.encode("numpy ids 你好", add_special_tokens=False).ids, dtype=np.int64)
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "numpy ids 你好"


def _byte_token_ids(tokenizer) -> dict[int, int]:
    """byte value → id of the single-byte token (GPT-2 byte-to-unicode mapping); SmolVLM's vocabulary lacks a few
    bytes that never occur in UTF-8 text (C0, C1, F5–FF, some control characters)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    ids = {b: tokenizer.token_to_id(ch) for b, ch in mapping.items()}
    return {b: i for b, i in ids.items() if i is not None}


@pytest.mark.parametrize("max_pending", [4, 16])
@pytest.mark.parametrize("byte_fraction", [0.3, 0.9])
def test_random_token_streams_add_up_to_decode(tokenizer, max_pending, byte_fraction):
    """Random ids (words, byte pieces, special tokens, runs of invalid bytes) in both modes."""
    rng = random.Random(1234)
    vocab = tokenizer.get_vocab_size()
    byte_ids = list(_byte_token_ids(tokenizer).values())
    special = list(tokenizer.get_added_tokens_decoder())
    for trial in range(40):
        ids = []
        for _ in range(rng.randint(1, 120)):
            pick = rng.random()
            ids.append(rng.choice(byte_ids) if pick < byte_fraction else rng.choice(special)
                       if pick < byte_fraction + 0.05 else rng.randrange(vocab))
        for skip in (True, False):
            deltas, detok = stream(tokenizer, ids, skip_special_tokens=skip, max_pending=max_pending)
            assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip), (trial, ids)
            assert detok.text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_character_after_long_invalid_run_stays_intact(tokenizer):
    """Past max_pending the window is cut, but never inside a character that is still being completed."""
    byte_ids = _byte_token_ids(tokenizer)
    ids = [byte_ids[0x80]] * 10 + [byte_ids[b] for b in "😀".encode()] + [byte_ids[0xBF]] * 7 \
        + [byte_ids[b] for b in "界".encode()]
    detok = IncrementalDetokenizer(tokenizer, max_pending=4)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == FFFD * 10 + "😀" + FFFD * 7 + "界"
    assert "😀" in deltas and "界" in deltas


def test_byte_by_byte_utf8(tokenizer):
    """Every byte of a multilingual string as its own byte token: characters appear only when complete."""
    byte_ids = _byte_token_ids(tokenizer)
    text = TEXTS["mixed"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(byte_ids[b]) for b in text.encode("utf-8")]
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    assert [d for d in deltas if d] == list(text)  # one character per completed sequence


class CountingTokenizer:
    """Wraps a tokenizers.Tokenizer and records the length of every decode() call."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def get_added_tokens_decoder(self):
        return self.tokenizer.get_added_tokens_decoder()

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_window_stays_bounded_on_long_output(tokenizer):
    text = " ".join([TEXTS["mixed"], TEXTS["emoji"], TEXTS["cjk"], TEXTS["accented"]] * 40)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > 2000
    counting = CountingTokenizer(tokenizer)
    deltas, detok = stream(counting, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert max(counting.lengths) <= 8  # a few tokens around the longest split character, not the whole output
    assert len(counting.lengths) <= 2 * len(ids) + 2  # at most two small decodes per token


def test_window_stays_bounded_on_invalid_utf8(tokenizer):
    """A degenerate stream of lone continuation bytes (every decode ends in U+FFFD) does not grow the window."""
    continuation = _byte_token_ids(tokenizer)[0x80]
    ids = [continuation] * 500
    counting = CountingTokenizer(tokenizer)
    deltas, detok = stream(counting, ids, max_pending=16)
    assert "".join(deltas) == tokenizer.decode(ids) == FFFD * 500
    assert max(counting.lengths) <= 2 * 16 + 2


def test_max_pending_must_cover_a_character(tokenizer):
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tokenizer, max_pending=2)
