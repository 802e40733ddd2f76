"""The generic tool-call parser: same events however the text is split, sane events on every truncation."""

import json
import random

import pytest

from runtime.toolcalls import Arguments, CallStart, Content, GenericOutput

TEXTS = [
    # several calls, nested args with brackets/braces/quotes/backslashes inside strings
    r'{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris","days":3}},'
    r'{"name":"search-2","arguments":{"q":"a } ] { [ \" \\ \\\" end","opts":{"deep":[1,[2,{"x":null}]],'
    r'"ok":true,"no":false},"n":-1.5e+3}},{"name":"noop","arguments":{}}]}',
    # unicode raw and escaped, surrogate pairs, escapes right before the closing braces
    r'{"tool_calls":[{"name":"say","arguments":{"text":"h\u00e9llo w\u00f6rld \ud83d\ude00 😀 日本","t":"\\"}}]}',
    r'{"tool_calls":[{"name":"f","arguments":{"a":"\"}"}},{"name":"g","arguments":{"b":["]","\\]"]}}]}',
    r'{"tool_calls":[{"name":"' + "x" * 64 + r'","arguments":{}}]}',
    # response text with every escape
    r'{"response":"quote \" backslash \\ slash \/ b\b f\f n\n r\r t\t u\u0041\u00e9\u20ac pair \ud83d\ude00 raw 😀"}',
    r'{"response":""}',
    r'{"response":"\ud83d\ude00"}',
    r'{"response":"lone \ud83d then x, lone low \ude00"}',
    json.dumps({"response": "dumped ☃ \x01 \"x\""}, separators=(",", ":")),
    json.dumps({"tool_calls": [{"name": "k", "arguments": {"ü": "☃", "l": [[], {}, ""]}}]},
               separators=(",", ":"), ensure_ascii=False),
]


def run(fragments):
    p = GenericOutput()
    events = []
    for frag in fragments:
        events += p.feed(frag)
    events += p.finish()
    return p, events


def merge(events):
    """Coalesce consecutive Content, and consecutive Arguments of one call: the split-independent form."""
    out = []
    for e in events:
        if out and isinstance(e, Content) and isinstance(out[-1], Content):
            out[-1] = Content(out[-1].text + e.text)
        elif out and isinstance(e, Arguments) and isinstance(out[-1], Arguments) and out[-1].index == e.index:
            out[-1] = Arguments(e.index, out[-1].text + e.text)
        else:
            out.append(e)
    return out


def random_splits(text, seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(len(text)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    frags = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    if seed % 3 == 0:  # empty fragments (a token that decodes to nothing yet) must be harmless
        frags.insert(rng.randrange(len(frags) + 1), "")
    return frags


def check_full(text, p, events):
    want = json.loads(text)
    assert p.complete
    assert all(not (isinstance(e, (Content, Arguments)) and not e.text) for e in events), "no empty events"
    if "response" in want:
        assert p.kind == "response"
        assert all(isinstance(e, Content) for e in events)
        assert "".join(e.text for e in events) == p.content == want["response"]
        return
    assert p.kind == "tool_calls" and not any(isinstance(e, Content) for e in events)
    started, args = [], {}
    for e in events:
        if isinstance(e, CallStart):
            assert e.index == len(started)
            started.append(e.name)
        else:
            assert e.index == len(started) - 1, "Arguments only for the call just started"
            args[e.index] = args.get(e.index, "") + e.text
    assert started == [c["name"] for c in want["tool_calls"]]
    for i, call in enumerate(want["tool_calls"]):
        assert json.loads(args[i]) == call["arguments"]
        assert args[i] in text  # exactly the raw generated text
    assert p.calls == [(n, args[i]) for i, n in enumerate(started)]


@pytest.mark.parametrize("text", TEXTS)
def test_any_split_same_events(text):
    p, whole = run([text])
    check_full(text, p, whole)
    assert len(whole) == len(merge(whole))  # a single fragment already gives one event per run
    p, chars = run(list(text))
    check_full(text, p, chars)
    assert merge(chars) == whole
    for seed in range(150):
        p, events = run(random_splits(text, seed))
        check_full(text, p, events)
        assert merge(events) == whole, seed


@pytest.mark.parametrize("text", TEXTS)
def test_truncation_is_prefix_consistent(text):
    full, _ = run([text])
    for k in range(len(text)):
        for frags in ([text[:k]], random_splits(text[:k], k) if k > 1 else [text[:k]]):
            p, events = run(frags)
            assert not p.complete
            assert full.content.startswith(p.content)
            assert "".join(e.text for e in events if isinstance(e, Content)) == p.content
            assert len(p.calls) <= len(full.calls)
            for (name, args), (full_name, full_args) in zip(p.calls, full.calls):
                assert name == full_name and full_args.startswith(args)
            assert p.kind in (None, full.kind)


def test_truncated_surrogate_and_escape_are_held_then_dropped():
    p = GenericOutput()
    assert p.feed('{"response":"a\\') == [Content("a")]
    assert p.feed("u00") == []
    assert p.feed("e9\\ud83d") == [Content("é")]  # the high half waits for its low half
    assert p.feed("\\u") == [] and p.finish() == []
    assert p.content == "aé" and not p.complete


def test_args_streamed_without_wrapper():
    p = GenericOutput()
    assert p.feed('{"tool_calls":[{"name":"f') == [] and p.kind == "tool_calls"
    assert p.feed('n","argu') == [CallStart(0, "fn")]
    assert p.feed('ments":{"a":"}') == [Arguments(0, '{"a":"}')]
    assert p.feed('"}},{"name":"g","arguments":{}}]}') == [Arguments(0, '"}'), CallStart(1, "g"), Arguments(1, "{}")]
    assert p.complete and p.calls == [("fn", '{"a":"}"}'), ("g", "{}")]


BAD = [
    "hello",
    '{"foo":1}',
    '{"tool_calls":[{"name":"a b","arguments":{}}]}',
    '{"tool_calls":[{"name":"","arguments":{}}]}',
    '{"tool_calls":[{"name":"' + "x" * 65 + '","arguments":{}}]}',
    '{"tool_calls":[{"name":"f","arguments":[1]}]}',
    '{"tool_calls":[{"name":"f","arguments":{"a":[1}}]}',
    '{"tool_calls":[{"name":"f","arguments":{"a": 1}}]}',
    '{"tool_calls":[{"name":"f","arguments":{}}}',
    '{"tool_calls":[{"name":"f","arguments":{}},]}',
    '{"response":"\\q"}',
    '{"response":"\\u12G4"}',
    '{"response":"a\nb"}',
    '{"response":"x"} ',
    '{"response":"x"}{',
]


@pytest.mark.parametrize("text", BAD)
def test_deviating_text_raises(text):
    with pytest.raises(ValueError):
        run([text])
    with pytest.raises(ValueError):
        run(list(text))


def test_feed_after_failure_or_finish_raises():
    p = GenericOutput()
    with pytest.raises(ValueError):
        p.feed("x")
    with pytest.raises(ValueError):
        p.feed("{")
    p = GenericOutput()
    p.finish()
    with pytest.raises(ValueError):
        p.feed("{")
