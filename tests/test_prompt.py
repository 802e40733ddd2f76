"""Prompt building against transformers as the oracle: rendered chat template strings and input_ids.

The oracle is Idefics3Processor built from the SmolVLM-256M-Instruct card with the tiny image sizes of
`edgevlm.export.random_model.TinyDims` (64 px tiles, image_seq_len 16), as `build_random_idefics3` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoTokenizer, Idefics3ImageProcessor, Idefics3Processor
from transformers.models.idefics3.processing_idefics3 import get_image_prompt_string

from edgevlm.export.random_model import TinyDims
from edgevlm.runtime.errors import InvalidRequestError, PackageError
from edgevlm.runtime.prompt import (
    ChatTemplate,
    Idefics3PromptLayout,
    ImageRef,
    convert_messages,
    encode_prompt,
    special_tokens_from_config,
)

FIXTURE = Path(__file__).parent / "fixtures" / "smolvlm-256m-instruct"
DIMS = TinyDims()
IMAGE_SEQ_LEN = (DIMS.image_size // DIMS.patch_size) ** 2 // DIMS.scale_factor**2  # 16


def _image_processor(**overrides) -> Idefics3ImageProcessor:
    config = json.loads((FIXTURE / "preprocessor_config.json").read_text())
    for key in ("image_processor_type", "processor_class"):
        config.pop(key, None)
    config["max_image_size"] = {"longest_edge": DIMS.image_size}
    config["size"] = {"longest_edge": DIMS.image_size * DIMS.longest_edge_tiles}
    config.update(overrides)
    return Idefics3ImageProcessor(**config)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(str(FIXTURE))


@pytest.fixture(scope="module")
def processor(hf_tokenizer):
    template = json.loads((FIXTURE / "chat_template.json").read_text())["chat_template"]
    return Idefics3Processor(_image_processor(), hf_tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=template)


@pytest.fixture(scope="module")
def processor_no_split(hf_tokenizer):
    template = json.loads((FIXTURE / "chat_template.json").read_text())["chat_template"]
    return Idefics3Processor(_image_processor(do_image_splitting=False), hf_tokenizer,
                             image_seq_len=IMAGE_SEQ_LEN, chat_template=template)


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate.from_model_dir(FIXTURE)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))


@pytest.fixture(scope="module")
def layout() -> Idefics3PromptLayout:
    config = json.loads((FIXTURE / "processor_config.json").read_text())
    return Idefics3PromptLayout.from_config({**config, "image_seq_len": IMAGE_SEQ_LEN})


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def url(n: int) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,IMAGE{n}"}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


HF_IMAGE = {"type": "image"}

# (OpenAI request messages, the same conversation as Hugging Face chat-template messages)
CONVERSATIONS = {
    "text_only": (
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": [text("What is 2+2?")]}],
    ),
    "one_image": (
        [{"role": "user", "content": [url(0), text("Describe this image.")]}],
        [{"role": "user", "content": [HF_IMAGE, text("Describe this image.")]}],
    ),
    "text_then_image": (
        [{"role": "user", "content": [text("Look: "), url(0)]}],
        [{"role": "user", "content": [text("Look: "), HF_IMAGE]}],
    ),
    "several_images": (
        [{"role": "user", "content": [url(0), text("and"), url(1), url(2), text("Compare them.")]}],
        [{"role": "user", "content": [HF_IMAGE, text("and"), HF_IMAGE, HF_IMAGE, text("Compare them.")]}],
    ),
    "system": (
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": [url(0), text("What?")]}],
        [{"role": "system", "content": [text("You are terse.")]},
         {"role": "user", "content": [HF_IMAGE, text("What?")]}],
    ),
    "developer_is_system": (
        [{"role": "developer", "content": [text("Answer in French.")]}, {"role": "user", "content": "Hi"}],
        [{"role": "system", "content": [text("Answer in French.")]}, {"role": "user", "content": [text("Hi")]}],
    ),
    "multi_turn": (
        [
            {"role": "system", "content": "Be helpful."},
            {"role": "user", "content": [url(0), text("What is in the picture?")]},
            {"role": "assistant", "content": "A cat on a mat."},
            {"role": "user", "content": [text("And here?"), url(1)]},
            {"role": "assistant", "content": [text("A dog."), text(" Also a ball.")]},
            {"role": "user", "content": "Thanks! Anything else?"},
        ],
        [
            {"role": "system", "content": [text("Be helpful.")]},
            {"role": "user", "content": [HF_IMAGE, text("What is in the picture?")]},
            {"role": "assistant", "content": [text("A cat on a mat.")]},
            {"role": "user", "content": [text("And here?"), HF_IMAGE]},
            {"role": "assistant", "content": [text("A dog."), text(" Also a ball.")]},
            {"role": "user", "content": [text("Thanks! Anything else?")]},
        ],
    ),
    "content_parts_unicode": (
        [{"role": "user", "content": [text("Ünïcödé 😀 你好\n"), {"type": "image_url", "image_url": {
            "url": "https://example.com/a.png", "detail": "high"}}, text("line 2\n\n  indented")]}],
        [{"role": "user", "content": [text("Ünïcödé 😀 你好\n"), HF_IMAGE, text("line 2\n\n  indented")]}],
    ),
    "assistant_tool_call_and_tool_result": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 °C, sunny"},
        ],
        [
            {"role": "user", "content": [text("Weather in Paris?")]},
            {"role": "assistant", "content": [text("")]},
            {"role": "tool", "content": [text("18 °C, sunny")]},
        ],
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_processor_apply_chat_template(template, processor, name, add_generation_prompt):
    openai_messages, hf_messages = CONVERSATIONS[name]
    converted = convert_messages(openai_messages)
    ours = template.render(converted.messages, add_generation_prompt=add_generation_prompt)
    oracle = processor.apply_chat_template(hf_messages, add_generation_prompt=add_generation_prompt)
    assert ours == oracle
    assert ours.count("<image>") == len(converted.images)


def test_render_matches_tokenizer_apply_chat_template(template, hf_tokenizer):
    _, hf_messages = CONVERSATIONS["multi_turn"]
    assert template.render(hf_messages) == hf_tokenizer.apply_chat_template(
        hf_messages, tokenize=False, add_generation_prompt=True)


def test_expected_smolvlm_prompt(template):
    converted = convert_messages(CONVERSATIONS["system"][0])
    assert template.render(converted.messages) == (
        "<|im_start|>System: You are terse.<end_of_utterance>\n"
        "User:<image>What?<end_of_utterance>\n"
        "Assistant:"
    )


def test_raw_template_messages_render_like_transformers(template, processor):
    """ChatTemplate alone on template-shaped input, including shapes convert_messages never produces."""
    conversations = [
        [{"role": "user", "content": "bare string"}],  # SmolVLM's template drops it: both do
        [{"role": "user", "content": [text("a"), {"type": "video"}, HF_IMAGE]}],
        [{"role": "assistant", "content": [HF_IMAGE]}],
    ]
    for messages in conversations:
        assert template.render(messages) == processor.apply_chat_template(messages, add_generation_prompt=True)
    assert template.render(conversations[0]) == "<|im_start|>User: <end_of_utterance>\nAssistant:"


def test_continue_final_message_matches_transformers(template, processor):
    messages = [{"role": "user", "content": [HF_IMAGE, text("Name it.")]},
                {"role": "assistant", "content": [text("It is a")]}]
    ours = template.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert ours == processor.apply_chat_template(messages, continue_final_message=True)
    assert ours.endswith("Assistant: It is a")


CUSTOM_TEMPLATE = """
{%- for message in messages %}
    {%- if loop.index0 > 5 %}{% break %}{% endif %}
    {%- if message['role'] == 'bad' %}{{ raise_exception('roles must be good') }}{% endif %}
    {{ bos_token }}[{{ message['role'] }}]
    {% generation %}{{ message['content'] | tojson }}{% endgeneration %}
    {{ eos_token }}
{% endfor %}
{% if tools %}TOOLS {{ tools | tojson(indent=2) }}{% endif %}
{% if documents %}{% for d in documents %}DOC {{ d.title }}: {{ d.text }}
{% endfor %}{% endif %}
{{ additional_special_tokens | join(',') }} {{ pad_token }} {{ unk_token }} year={{ strftime_now('%Y') }}
{% if add_generation_prompt %}<gen>{% endif %}"""


def test_environment_matches_transformers(hf_tokenizer):
    """trim/lstrip blocks, loopcontrols, generation tag, tojson (no HTML escaping), raise_exception,
    strftime_now, special tokens, tools and documents: same string as transformers."""
    special = special_tokens_from_config(json.loads((FIXTURE / "tokenizer_config.json").read_text()),
                                         json.loads((FIXTURE / "special_tokens_map.json").read_text()))
    ours = ChatTemplate(CUSTOM_TEMPLATE, special)
    messages = [{"role": "user", "content": "<b>&'quoted' \"ü\" 😀</b>"}] * 3 + \
        [{"role": "assistant", "content": [text("x")]}] * 5
    tools = [{"type": "function", "function": {"name": "f", "description": "ü <tag>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    documents = [{"title": "T", "text": "body"}]
    for kwargs in ({}, {"tools": tools, "documents": documents}):
        for gen in (True, False):
            expected = hf_tokenizer.apply_chat_template(messages, chat_template=CUSTOM_TEMPLATE, tokenize=False,
                                                        add_generation_prompt=gen, **kwargs)
            assert ours.render(messages, add_generation_prompt=gen, **kwargs) == expected
    rendered = ours.render(messages, tools=tools)
    assert '"<b>&\'quoted\' \\"ü\\" 😀</b>"' in rendered  # tojson: ensure_ascii=False, no HTML escaping
    assert "<fake_token_around_image>,<image>,<end_of_utterance>" in rendered


def test_special_tokens_as_transformers_resolves_them(hf_tokenizer):
    tokenizer_config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    special_map = json.loads((FIXTURE / "special_tokens_map.json").read_text())
    # tokenizer_config.json (eos <end_of_utterance>) wins over special_tokens_map.json (eos <|im_end|>).
    assert special_tokens_from_config(tokenizer_config, special_map) == hf_tokenizer.special_tokens_map
    assert ChatTemplate.from_model_dir(FIXTURE).special_tokens == hf_tokenizer.special_tokens_map
    # Legacy configs without added_tokens_decoder take special_tokens_map.json's values.
    legacy = {k: v for k, v in tokenizer_config.items() if k != "added_tokens_decoder"}
    assert special_tokens_from_config(legacy, special_map)["eos_token"] == "<|im_end|>"


def test_template_errors_become_invalid_request():
    raising = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(InvalidRequestError) as err:
        raising.render([{"role": "user", "content": [text("x")]}])
    assert "Conversation roles must alternate" in err.value.message
    assert err.value.status == 400 and err.value.param == "messages"
    assert err.value.to_dict()["error"]["type"] == "invalid_request_error"

    undefined = ChatTemplate("{{ messages[0]['content'][0]['missing']['deeper'] }}")
    with pytest.raises(InvalidRequestError, match="chat template"):
        undefined.render([{"role": "user", "content": [text("x")]}])

    mutating = ChatTemplate("{{ messages.append(1) }}")  # the sandbox refuses to mutate messages
    with pytest.raises(InvalidRequestError):
        mutating.render([{"role": "user", "content": [text("x")]}])

    type_error = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(InvalidRequestError):
        type_error.render([{"role": "user", "content": "x"}])


def test_bad_template_is_a_package_error():
    with pytest.raises(PackageError):
        ChatTemplate("{% for m in messages %}unclosed")
    with pytest.raises(PackageError):
        ChatTemplate("")


def test_render_rejects_bad_tools(template):
    with pytest.raises(InvalidRequestError) as err:
        template.render([{"role": "user", "content": [text("x")]}], tools="weather")
    assert err.value.param == "tools"


# --------------------------------------------------------------------------------------------------------------
# Message conversion


def test_convert_collects_images_in_order():
    messages = [
        {"role": "user", "content": [url(0), text("a")]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [text("b"), {"type": "image_url", "image_url": {"url": "u1", "detail": "low"}},
                                     {"type": "image_url", "image_url": {"url": "u2", "detail": None}}]},
    ]
    converted = convert_messages(messages)
    assert converted.images == [
        ImageRef(url="data:image/png;base64,IMAGE0", detail="auto", message_index=0, part_index=0),
        ImageRef(url="u1", detail="low", message_index=2, part_index=1),
        ImageRef(url="u2", detail="auto", message_index=2, part_index=2),
    ]
    assert converted.images[1].param == "messages[2].content[1]"
    assert converted.messages[2]["content"] == [text("b"), HF_IMAGE, HF_IMAGE]
    assert messages[0]["content"][0] == url(0)  # the request is not modified


def test_convert_tool_calls_and_passthrough_fields():
    messages = [
        {"role": "user", "content": "hi", "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": [text("1")]},
    ]
    out = convert_messages(messages).messages
    assert out[0] == {"role": "user", "content": [text("hi")], "name": "alice"}
    assert out[1]["content"] == [text("")]
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert out[1]["tool_calls"][1]["function"]["arguments"] == "not json"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == "{\"x\": 1}"
    assert out[2] == {"role": "tool", "content": [text("1")], "tool_call_id": "c1"}


def test_convert_string_content_format():
    messages = [{"role": "developer", "content": [text("a"), text("b")]}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": None}]
    out = convert_messages(messages, content_format="string").messages
    assert out == [{"role": "system", "content": "a\nb"}, {"role": "user", "content": "c"},
                   {"role": "assistant", "content": ""}]
    with pytest.raises(InvalidRequestError, match="text only"):
        convert_messages([{"role": "user", "content": [url(0)]}], content_format="string")


@pytest.mark.parametrize("messages, param, message", [
    ([{"role": "system", "content": "s"}, {"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
     "messages[1].content[0].type", "messages[1].content[0].type: unsupported content part type 'input_audio'"),
    ([], "messages", "non-empty"),
    ("hello", "messages", "non-empty"),
    (["hello"], "messages[0]", "object"),
    ([{"role": "function", "content": "x"}], "messages[0].role", "unsupported role 'function'"),
    ([{"content": "x"}], "messages[0].role", "unsupported role None"),
    ([{"role": "user"}], "messages[0].content", "content is required"),
    ([{"role": "user", "content": None}], "messages[0].content", "content is required"),
    ([{"role": "user", "content": []}], "messages[0].content", "empty array"),
    ([{"role": "user", "content": 42}], "messages[0].content", "string, an array"),
    ([{"role": "user", "content": ["text"]}], "messages[0].content[0]", "object"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "string 'text'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}],
     "messages[0].content[0].image_url", "string 'url'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
     "messages[0].content[0].image_url", "string 'url'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u", "detail": "ultra"}}]}],
     "messages[0].content[0].image_url.detail", "detail must be one of auto, low, high"),
    ([{"role": "system", "content": [url(0)]}], "messages[0].content[0].type", "only allowed in user messages"),
    ([{"role": "assistant", "content": [url(0)]}], "messages[0].content[0].type", "only allowed in user messages"),
    ([{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}], "messages[0].content[0].type",
     "unsupported content part type 'refusal'"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls", "only assistant"),
    ([{"role": "assistant", "content": "x", "tool_calls": {}}], "messages[0].tool_calls", "array"),
    ([{"role": "tool", "content": "x", "tool_call_id": 3}], "messages[0].tool_call_id", "must be a string"),
])
def test_convert_errors(messages, param, message):
    with pytest.raises(InvalidRequestError) as err:
        convert_messages(messages)
    assert err.value.param == param
    assert message in err.value.message
    assert err.value.status == 400


def test_refusal_parts_of_assistant_messages_are_text():
    out = convert_messages([{"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}])
    assert out.messages[0]["content"] == [text("I can't.")]


def test_reserved_image_placeholder_in_text_is_refused(layout):
    for content in ("see <image> here", [text("ok"), text("<image>")]):
        with pytest.raises(InvalidRequestError, match="reserves for image positions") as err:
            convert_messages([{"role": "user", "content": content}], reserved_text=[layout.placeholder])
        assert err.value.param.startswith("messages[0].content")
    # Without reserved_text, the count check in expand() still catches it.
    converted = convert_messages([{"role": "user", "content": [url(0), text("<image>")]}])
    rendered = ChatTemplate.from_model_dir(FIXTURE).render(converted.messages)
    with pytest.raises(InvalidRequestError, match="2 image placeholder") as err:
        layout.expand(rendered, [(0, 0)])
    assert err.value.param == "messages"


# --------------------------------------------------------------------------------------------------------------
# Image-token layout and input_ids


@pytest.mark.parametrize("grid", [(0, 0), (1, 1), (1, 4), (2, 3), (3, 2), (4, 4), (4, 1)])
def test_layout_equals_get_image_prompt_string(layout, grid):
    rows, cols = grid
    expected = get_image_prompt_string(rows, cols, IMAGE_SEQ_LEN, fake_token_around_image="<fake_token_around_image>",
                                       image_token="<image>", global_img_token="<global-img>")
    assert layout.image_prompt(rows, cols) == expected
    assert layout.num_image_tokens(rows, cols) == expected.count("<image>")


def test_layout_from_config():
    real = Idefics3PromptLayout.from_config(json.loads((FIXTURE / "processor_config.json").read_text()))
    assert real.image_seq_len == 64 and real.placeholder == "<image>"
    assert real.image_prompt(0, 0) == "<fake_token_around_image><global-img>" + "<image>" * 64 + \
        "<fake_token_around_image>"
    custom = Idefics3PromptLayout.from_config({"image_seq_len": 2, "image_token": "<im>"})
    assert custom.image_prompt(1, 1) == "<fake_token_around_image><row_1_col_1><im><im>\n\n" \
        "<fake_token_around_image><global-img><im><im><fake_token_around_image>"
    for bad in ({}, {"image_seq_len": 0}, {"image_seq_len": "64"}):
        with pytest.raises(PackageError):
            Idefics3PromptLayout.from_config(bad)
    for grid in ((0, 1), (2, 0), (-1, -1)):
        with pytest.raises(ValueError):
            real.image_prompt(*grid)


def _grids(image_processor, images) -> list[tuple[int, int]]:
    info = image_processor(images, return_row_col_info=True)
    return list(zip(info["rows"][0], info["cols"][0]))


def _build(template, layout, tokenizer, openai_messages, grids) -> tuple[str, list[int]]:
    converted = convert_messages(openai_messages, reserved_text=[layout.placeholder])
    rendered = template.render(converted.messages)
    assert len(converted.images) == len(grids)
    expanded = layout.expand(rendered, grids)
    return rendered, encode_prompt(tokenizer, expanded, bos_token=template.special_tokens.get("bos_token"))


def test_input_ids_text_only(template, layout, tokenizer, processor):
    for name in ("text_only", "developer_is_system", "assistant_tool_call_and_tool_result"):
        rendered, ids = _build(template, layout, tokenizer, CONVERSATIONS[name][0], [])
        assert ids == processor(text=rendered)["input_ids"][0]
        assert ids[0] == tokenizer.token_to_id("<|im_start|>") and ids.count(ids[0]) == 1  # BOS once


# (width, height) → various splits with 64 px tiles and a 256 px longest edge
SPLIT_SIZES = [(300, 200), (100, 50), (50, 400), (256, 256), (640, 130), (130, 180), (10, 10), (70, 260)]


@pytest.mark.parametrize("size", SPLIT_SIZES)
def test_input_ids_one_split_image(template, layout, tokenizer, processor, size):
    img = image(*size)
    grids = _grids(processor.image_processor, [img])
    rows, cols = grids[0]
    assert rows >= 1 and cols >= 1
    messages = [{"role": "user", "content": [url(0), text("What is this?")]}]
    rendered, ids = _build(template, layout, tokenizer, messages, grids)
    oracle = processor(text=rendered, images=[img])["input_ids"][0]
    assert ids == oracle
    image_id = tokenizer.token_to_id("<image>")
    assert ids.count(image_id) == layout.num_image_tokens(rows, cols) == IMAGE_SEQ_LEN * (rows * cols + 1)


def test_split_sizes_cover_various_grids(processor):
    grids = {_grids(processor.image_processor, [image(*size)])[0] for size in SPLIT_SIZES}
    assert len(grids) >= 5, grids


@pytest.mark.parametrize("size", [(300, 200), (10, 10), (50, 400)])
def test_input_ids_one_image_without_splitting(template, layout, tokenizer, processor_no_split, size):
    img = image(*size)
    grids = _grids(processor_no_split.image_processor, [img])
    assert grids == [(0, 0)]
    messages = [{"role": "user", "content": [text("Caption:"), url(0)]}]
    rendered, ids = _build(template, layout, tokenizer, messages, grids)
    assert ids == processor_no_split(text=rendered, images=[img])["input_ids"][0]
    assert ids.count(tokenizer.token_to_id("<image>")) == IMAGE_SEQ_LEN


@pytest.mark.parametrize("sizes", [[(300, 200), (50, 400)], [(100, 50), (256, 256), (130, 180)]])
def test_input_ids_several_images_across_turns(template, layout, tokenizer, processor, sizes):
    images = [image(*size, seed=i) for i, size in enumerate(sizes)]
    grids = _grids(processor.image_processor, images)
    messages = [
        {"role": "system", "content": "You compare images."},
        {"role": "user", "content": [url(0), text("First. "), url(1)]},
        {"role": "assistant", "content": "Two images: 你好 😀."},
        {"role": "user", "content": [text("And this?")] + ([url(2)] if len(images) == 3 else [])},
    ]
    rendered, ids = _build(template, layout, tokenizer, messages, grids)
    assert ids == processor(text=rendered, images=images)["input_ids"][0]
    assert ids.count(tokenizer.token_to_id("<image>")) == sum(layout.num_image_tokens(*g) for g in grids)


def test_encode_prompt_adds_bos_only_when_missing(tokenizer):
    from tokenizers.processors import TemplateProcessing

    with_bos = Tokenizer.from_str(tokenizer.to_str())
    with_bos.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    assert encode_prompt(with_bos, "<|im_start|>User: hi", bos_token="<|im_start|>") == \
        tokenizer.encode("<|im_start|>User: hi").ids
    assert encode_prompt(with_bos, "User: hi", bos_token="<|im_start|>")[0] == 1
    assert encode_prompt(with_bos, "User: hi", bos_token="<|im_start|>")[1:] == tokenizer.encode("User: hi").ids
