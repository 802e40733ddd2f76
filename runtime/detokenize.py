"""Incremental detokenization: generated token ids → text deltas that are final and valid UTF-8.

A character can span several tokens (byte-level BPE splits emoji and CJK into byte pieces; SentencePiece models
use byte-fallback tokens), and some decoders treat the first token of a sequence differently (a leading-space
strip). So, as vLLM, text-generation-inference and transformers' TextStreamer do, each step decodes a small window
of ids: a few context tokens that were already emitted, then the pending ones, and emits what lies beyond the
context text once it is final. The text is final up to the trailing U+FFFD replacement characters of the window's
decode: those may be an incomplete UTF-8 sequence that the next tokens complete, so they are held back. The window
slides forward whenever everything decoded is final, so each step costs O(window), not O(sequence length).

The concatenated deltas (`.text` after `flush()`) equal `tokenizer.decode(all_ids, skip_special_tokens=...)`.
The window stays bounded on degenerate output too: when more than `max_pending` tokens in a row leave the decode
ending in U+FFFD (invalid bytes, e.g. from a random-weight model), the window is cut at a token boundary that no
character straddles and only the last few tokens stay pending. (For a decoder where no such boundary is found, the
held-back text is emitted as it is, so a character split exactly there would show as U+FFFD.)
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns token ids, one at a time, into text deltas.

    `tokenizer` is a `tokenizers.Tokenizer`. `add(token_id)` returns the newly final text (possibly ""),
    `flush()` returns whatever is still held back (call it at the end of generation), `text` is everything
    emitted so far.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True, max_pending: int = 16):
        if max_pending < 4:
            raise ValueError("max_pending must be at least 4 (a UTF-8 character is up to 4 bytes)")
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_pending = max_pending
        # With skip_special_tokens, decode() drops special tokens before the decoder runs, so they contribute
        # nothing and are left out of the window altogether.
        self._skipped: frozenset[int] = frozenset(
            token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special
        ) if skip_special_tokens else frozenset()
        self._window: list[int] = []  # context tokens (already emitted), then pending tokens
        self._read = 0  # index in _window of the first pending token
        self._emitted = 0  # how many characters of decode(_window) have been emitted
        self._pieces: list[str] = []
        self._text: str | None = ""
        self.num_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, text: str, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = text[self._emitted:end]
        self._emitted = end
        self._pieces.append(delta)
        self._text = None
        return delta

    def _slide(self) -> None:
        """Everything decoded is final: the pending tokens become the context of the next step."""
        context = self._window[self._read:]
        self._window = context
        self._read = len(context)
        self._emitted = len(self._decode(context)) if context else 0

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text that became final with it ("" while a character is split)."""
        token_id = int(token_id)
        self.num_tokens += 1
        if token_id in self._skipped:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        pending = len(self._window) - self._read
        if text.endswith(REPLACEMENT) and pending <= self.max_pending:
            # Possibly an incomplete character at the end: emit only what precedes it.
            return self._emit(text, len(text.rstrip(REPLACEMENT)))
        if text.endswith(REPLACEMENT):
            return self._cut(text)
        delta = self._emit(text, len(text))
        if delta or pending > self.max_pending:
            self._slide()
        return delta

    def _cut(self, text: str) -> str:
        """Too many pending tokens end in U+FFFD: keep only the last few tokens pending.

        Cut the window at the latest token boundary (at most 4 back: a UTF-8 character is at most 4 bytes) where
        decoding the two sides apart gives the same text as decoding them together; no character straddles such a
        cut (byte-level decoders), so the head is final and the tail stays pending on its own. Without one, the
        text is taken as final as it is.
        """
        window = self._window
        for k in range(len(window) - 1, max(0, len(window) - 5), -1):
            head = self._decode(window[:k])
            if head + self._decode(window[k:]) == text:
                delta = self._emit(text, len(head))
                self._window = window[k:]
                self._read = 0
                self._emitted -= len(head)
                return delta
        delta = self._emit(text, len(text))
        self._slide()
        return delta

    def flush(self) -> str:
        """End of generation: return the text still held back (an incomplete character decodes as U+FFFD)."""
        if not self._window:
            return ""
        text = self._decode(self._window)
        delta = self._emit(text, len(text))
        self._slide()
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._text is None:
            self._text = "".join(self._pieces)
            self._pieces = [self._text] if self._text else []
        return self._text


__all__ = ["IncrementalDetokenizer"]
