"""Incremental parser for the generic tool-calling answer (chat templates without tool syntax).

The grammar constrains the model's whole answer to ONE compact JSON object (no whitespace outside strings, keys
in this order) of one of two shapes:

    {"tool_calls":[{"name":"NAME","arguments":ARGS},{"name":"NAME2","arguments":ARGS2}]}
    {"response":"TEXT"}

NAME matches [A-Za-z0-9_-]{1,64}, ARGS is a compact JSON object, TEXT a JSON string. The text arrives in
arbitrary fragments (tokens split anywhere, even inside an escape) and may stop anywhere (max_tokens), so
`GenericOutput` is a character-level state machine that turns it into stream events as early as they are known:
`Content` (decoded TEXT), `CallStart` (a call's NAME, once its closing quote arrived) and `Arguments` (raw ARGS
text exactly as generated). The wrapper JSON never appears in events. Text off this shape (which the grammar
should make impossible) raises ValueError instead of streaming garbage; the parser is unusable afterwards.
"""

from __future__ import annotations

import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True)
class Arguments:
    index: int
    text: str


Event = Content | CallStart | Arguments

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-")
_OPENER = {"}": "{", "]": "["}
# Characters compact JSON can have outside strings besides brackets and quotes: numbers, separators, literals.
_BARE = frozenset("0123456789+-.eE,:truefalsn")


class GenericOutput:
    def __init__(self) -> None:
        self._kind: str | None = None
        self._complete = False
        self._finished = False
        self._pos = 0                  # offset of the current character, for error messages
        self._expect, self._then = '{"', "key"   # a wrapper literal still to match, then the next state
        self._state = "lit"
        self._name: list[str] = []     # characters of the NAME being read
        self._calls: list[list] = []   # [name, [ARGS fragments]] per call
        self._content: list[str] = []
        self._stack: list[str] = []    # brackets open inside ARGS; ARGS ends when it empties
        self._in_str = self._esc = False
        self._hex: str | None = None   # digits of a \uXXXX still incomplete (TEXT only)
        self._high: int | None = None  # a high surrogate held back until its low half arrives
        self._buf: list[str] = []      # characters of the current Content / Arguments run, flushed per fragment
        self._events: list[Event] = []

    # --- public API ---------------------------------------------------------------------------------------
    @property
    def kind(self) -> str | None:
        return self._kind

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def calls(self) -> list[tuple[str, str]]:
        return [(name, "".join(parts)) for name, parts in self._calls]

    @property
    def content(self) -> str:
        return "".join(self._content)

    def feed(self, fragment: str) -> list[Event]:
        if self._finished:
            raise ValueError("feed() after finish()")
        for ch in fragment:
            getattr(self, "_s_" + self._state)(ch)
            self._pos += 1
        self._flush()  # emit what this fragment made known: no buffering across fragments
        events, self._events = self._events, []
        return events

    def finish(self) -> list[Event]:
        # Everything complete was already flushed by feed(); a truncated escape or a high surrogate still waiting
        # for its low half cannot be decoded and is dropped. Truncation is not an error (max_tokens).
        self._finished = True
        return []

    # --- helpers --------------------------------------------------------------------------------------------
    def _fail(self, ch: str, why: str) -> None:
        self._state = "failed"
        raise ValueError(f"tool-call output: unexpected {ch!r} at offset {self._pos}: {why}")

    def _lit(self, expect: str, then: str) -> None:
        self._expect, self._then, self._state = expect, then, "lit"

    def _flush(self) -> None:
        if not self._buf:
            return
        text, self._buf = "".join(self._buf), []
        if self._kind == "response":
            self._content.append(text)
            self._events.append(Content(text))
        else:
            self._calls[-1][1].append(text)
            self._events.append(Arguments(len(self._calls) - 1, text))

    def _char(self, c: str) -> None:
        if self._high is not None:  # a high surrogate not followed by a low one: keep it lone, as json.loads does
            self._buf.append(chr(self._high))
            self._high = None
        if c:
            self._buf.append(c)

    def _unit(self, u: int) -> None:
        if 0xDC00 <= u < 0xE000 and self._high is not None:
            self._buf.append(chr(0x10000 + ((self._high - 0xD800) << 10) + (u - 0xDC00)))
            self._high = None
        elif 0xD800 <= u < 0xDC00:
            self._char("")  # releases an earlier lone high surrogate
            self._high = u
        else:
            self._char(chr(u))

    # --- states: one method per state, called with each character --------------------------------------------
    def _s_failed(self, ch: str) -> None:
        self._fail(ch, "the parser already failed")

    def _s_lit(self, ch: str) -> None:
        if ch != self._expect[0]:
            self._fail(ch, f"expected {self._expect[0]!r} of the wrapper {self._expect!r}")
        self._expect = self._expect[1:]
        if not self._expect:
            self._state = self._then

    def _s_key(self, ch: str) -> None:  # the first key's first letter decides the shape
        if ch == "t":
            self._kind = "tool_calls"
            self._lit('ool_calls":[', "call_or_end")
        elif ch == "r":
            self._kind = "response"
            self._lit('esponse":"', "text")
        else:
            self._fail(ch, 'expected key "tool_calls" or "response"')

    def _s_call_or_end(self, ch: str) -> None:
        if ch == "{":
            self._lit('"name":"', "name")
        elif ch == "]" and not self._calls:  # an empty list, if a schema ever allows it
            self._state = "close"
        else:
            self._fail(ch, "expected a call object")

    def _s_name(self, ch: str) -> None:
        if ch == '"':
            if not 1 <= len(self._name) <= 64:
                self._fail(ch, "a tool name has 1 to 64 characters")
            self._calls.append(["".join(self._name), []])
            self._name = []
            self._events.append(CallStart(len(self._calls) - 1, self._calls[-1][0]))
            self._lit(',"arguments":', "args_start")
        elif ch in _NAME_CHARS:
            self._name.append(ch)
        else:
            self._fail(ch, "a tool name matches [A-Za-z0-9_-]")

    def _s_args_start(self, ch: str) -> None:
        if ch != "{":
            self._fail(ch, "arguments must be a JSON object")
        self._stack = ["{"]
        self._buf.append(ch)
        self._state = "args"

    def _s_args(self, ch: str) -> None:
        self._buf.append(ch)
        if self._in_str:  # brackets and quotes inside strings do not count; an escape hides the next character
            if self._esc:
                self._esc = False
            elif ch == "\\":
                self._esc = True
            elif ch == '"':
                self._in_str = False
        elif ch == '"':
            self._in_str = True
        elif ch in "{[":
            self._stack.append(ch)
        elif ch in "}]":
            if self._stack.pop() != _OPENER[ch]:
                self._fail(ch, "mismatched bracket in arguments")
            if not self._stack:  # ARGS closed: flush it before the wrapper's "}" which is no part of it
                self._flush()
                self._lit("}", "after_call")
        elif ch not in _BARE:
            self._fail(ch, "not compact JSON in arguments")

    def _s_after_call(self, ch: str) -> None:
        if ch == ",":
            self._lit('{"name":"', "name")
        elif ch == "]":
            self._state = "close"
        else:
            self._fail(ch, "expected ',' or ']' after a call")

    def _s_text(self, ch: str) -> None:
        if self._hex is not None:
            if ch not in string.hexdigits:
                self._fail(ch, "a \\u escape needs 4 hex digits")
            self._hex += ch
            if len(self._hex) == 4:
                u, self._hex = int(self._hex, 16), None
                self._unit(u)
        elif self._esc:
            self._esc = False
            if ch == "u":
                self._hex = ""
            elif ch in _ESCAPES:
                self._char(_ESCAPES[ch])
            else:
                self._fail(ch, "invalid escape in response text")
        elif ch == "\\":
            self._esc = True
        elif ch == '"':
            self._char("")  # a lone high surrogate right before the end is kept, as json.loads does
            self._state = "close"
        elif ch < " ":
            self._fail(ch, "control character in response text")
        else:
            self._char(ch)

    def _s_close(self, ch: str) -> None:
        if ch != "}":
            self._fail(ch, "expected '}' closing the answer")
        self._complete = True
        self._state = "done"

    def _s_done(self, ch: str) -> None:
        self._fail(ch, "text after the closed answer")
