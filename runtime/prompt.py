"""From an OpenAI Chat Completions request to the prompt's token ids.

Three steps, each replicating what Hugging Face transformers does so that the ids are the ones the model was
trained with:

1. `convert_messages` maps OpenAI messages (string content or text / image_url parts) to the shape Hugging Face
   VLM chat templates expect (content as a list of `{"type": "text", "text": ...}` / `{"type": "image"}`) and
   collects the image references in prompt order.
2. `ChatTemplate.render` renders the model's Jinja chat template exactly as `apply_chat_template` does (same
   sandboxed environment, filters, globals and variables), so the string is identical.
3. A family's prompt layout expands each image placeholder into the image-token layout of that family, given how
   each image was tiled (`Idefics3PromptLayout` for Idefics3 / SmolVLM), and `encode_prompt` tokenizes the result
   with the `tokenizers` library the way the processor does.

Mapping choices (see `convert_messages`):

* role `developer` is rendered as `system` (as vLLM does); roles `system`, `user`, `assistant` and `tool` pass
  through; anything else is refused.
* string content becomes a one-part list `[{"type": "text", "text": content}]` (SmolVLM's template indexes
  `message['content'][0]['type']`; given a bare string it silently drops the text).
* an assistant message with `content: null` (or no content, e.g. a tool-call turn) gets one empty text part, so it
  renders like `content: ""` and templates that index the first part still work.
* images are accepted in `user` messages only (as OpenAI does); `refusal` parts of assistant messages are text.
* `tool_calls[*].function.arguments`, a JSON string in OpenAI's API, is parsed into an object for the template
  (Hugging Face templates expect a dict, as vLLM does); a string that is not a JSON object is passed unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import safejson
from .errors import InvalidRequestError, PackageError

IMAGE_DETAILS = ("auto", "low", "high")
ROLES = ("system", "developer", "user", "assistant", "tool")
# Message keys passed on to the template besides role and content.
_PASSTHROUGH_KEYS = ("name", "tool_call_id", "tool_calls")
# The attributes of a Hugging Face tokenizer's `special_tokens_map`, in its order.
SPECIAL_TOKEN_KEYS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
    "additional_special_tokens",
)


# --------------------------------------------------------------------------------------------------------------
# 1. OpenAI messages → template messages


@dataclass(frozen=True)
class ImageRef:
    """One image of the request, in prompt order: where to get it and at which detail."""

    url: str
    detail: str = "auto"
    message_index: int = 0
    part_index: int = 0

    @property
    def param(self) -> str:
        """The request path of this image, for error messages: messages[i].content[j]."""
        return f"messages[{self.message_index}].content[{self.part_index}]"


@dataclass
class TemplateMessages:
    """Messages shaped for a Hugging Face chat template, and the images they reference, in order."""

    messages: list[dict]
    images: list[ImageRef] = field(default_factory=list)


def _error(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param=param)


def _check_reserved(text: str, reserved: Sequence[str], param: str) -> None:
    for token in reserved:
        if token in text:
            raise _error(
                f"the text contains {token!r}, which this model reserves for image positions; "
                "send images as image_url content parts",
                param,
            )


def _tool_calls(value: Any, param: str) -> list:
    if not isinstance(value, list):
        raise _error("must be an array of tool calls", param)
    calls = []
    for j, call in enumerate(value):
        if not isinstance(call, dict):
            raise _error("must be an object", f"{param}[{j}]")
        call = dict(call)
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:  # the template renders the arguments again: only plain, sane JSON is unpacked
                arguments = safejson.loads(function["arguments"])
            except safejson.UnsafeJSON:
                arguments = None
            if isinstance(arguments, dict):
                call["function"] = {**function, "arguments": arguments}
        calls.append(call)
    return calls


def convert_messages(messages: Any, *, content_format: str = "parts",
                     reserved_text: Sequence[str] = ()) -> TemplateMessages:
    """Map OpenAI Chat Completions `messages` to chat-template messages plus the ordered image references.

    `content_format` "parts" (for VLM templates) gives every message's content as a list of
    `{"type": "text", "text": ...}` / `{"type": "image"}`; "string" (text-only templates) joins the text parts
    with "\\n" and refuses images. `reserved_text`: strings user text may not contain (a family's image
    placeholder, e.g. "<image>", which would otherwise be taken for an image). Raises `InvalidRequestError` with
    `param` set to the offending path, e.g. "messages[1].content[0].type".
    """
    if content_format not in ("parts", "string"):
        raise ValueError(f"content_format must be 'parts' or 'string', not {content_format!r}")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty array of messages", param="messages")

    out: list[dict] = []
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _error("each message must be an object with a role and content", where)
        role = message.get("role")
        if role not in ROLES:
            raise _error(
                f"unsupported role {role!r} (supported: {', '.join(ROLES)})", f"{where}.role"
            )
        template_role = "system" if role == "developer" else role

        content = message.get("content")
        parts: list[dict] = []
        if content is None:
            if role != "assistant":
                raise _error("content is required", f"{where}.content")
            parts.append({"type": "text", "text": ""})
        elif isinstance(content, str):
            _check_reserved(content, reserved_text, f"{where}.content")
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            if not content:
                raise _error("content is an empty array; give at least one content part", f"{where}.content")
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                if not isinstance(part, dict):
                    raise _error("a content part must be an object with a type", at)
                kind = part.get("type")
                if kind == "text" or (kind == "refusal" and role == "assistant"):
                    text = part.get(kind)
                    if not isinstance(text, str):
                        raise _error(f"a {kind} part needs a string '{kind}'", f"{at}.{kind}")
                    _check_reserved(text, reserved_text, f"{at}.{kind}")
                    parts.append({"type": "text", "text": text})
                elif kind == "image_url":
                    if role != "user":
                        raise _error(f"image_url parts are only allowed in user messages, not {role}", f"{at}.type")
                    if content_format == "string":
                        raise _error("this model's chat template takes text only", f"{at}.type")
                    image_url = part.get("image_url")
                    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str) \
                            or not image_url["url"]:
                        raise _error("an image_url part needs an object 'image_url' with a string 'url'",
                                     f"{at}.image_url")
                    detail = image_url.get("detail")
                    detail = "auto" if detail is None else detail
                    if detail not in IMAGE_DETAILS:
                        raise _error(f"detail must be one of {', '.join(IMAGE_DETAILS)}, not {detail!r}",
                                     f"{at}.image_url.detail")
                    parts.append({"type": "image"})
                    images.append(ImageRef(url=image_url["url"], detail=detail, message_index=i, part_index=j))
                else:
                    raise _error(f"unsupported content part type {kind!r}", f"{at}.type")
        else:
            raise _error("content must be a string, an array of content parts or null", f"{where}.content")

        converted: dict[str, Any] = {"role": template_role}
        if content_format == "string":
            converted["content"] = "\n".join(part["text"] for part in parts)
        else:
            converted["content"] = parts
        for key in _PASSTHROUGH_KEYS:
            value = message.get(key)
            if value is None:
                continue
            if key == "tool_calls":
                if role != "assistant":
                    raise _error("only assistant messages carry tool_calls", f"{where}.tool_calls")
                value = _tool_calls(value, f"{where}.tool_calls")
            elif not isinstance(value, str):
                raise _error(f"{key} must be a string", f"{where}.{key}")
            converted[key] = value
        out.append(converted)
    return TemplateMessages(messages=out, images=images)


# --------------------------------------------------------------------------------------------------------------
# 2. The chat template


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' assistant-mask marker; renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers: no HTML escaping (jinja's own tojson escapes <, >, &, ') and json.dumps' options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_content(value: Any) -> Any:
    """A special token as tokenizer_config / special_tokens_map store it (string or AddedToken dict) → string."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_content(v) for v in value]
    return value


def special_tokens_from_config(tokenizer_config: Mapping, special_tokens_map: Mapping | None = None) -> dict:
    """The special tokens transformers passes to chat templates (a tokenizer's `special_tokens_map`).

    As `PreTrainedTokenizerBase.from_pretrained` resolves them: tokenizer_config.json's values; special_tokens_map.json
    is read only for legacy configs without `added_tokens_decoder`, and then overrides them (its additional special
    tokens are appended). Empty values are left out, as in transformers.
    """
    values = {key: tokenizer_config.get(key) for key in SPECIAL_TOKEN_KEYS}
    if special_tokens_map and "added_tokens_decoder" not in tokenizer_config:
        for key, value in special_tokens_map.items():
            if key not in SPECIAL_TOKEN_KEYS:
                continue
            if key == "additional_special_tokens" and isinstance(value, list):
                merged = list(values.get(key) or [])
                for token in value:
                    if _token_content(token) not in [_token_content(t) for t in merged]:
                        merged.append(token)
                value = merged
            values[key] = value
    return {key: _token_content(value) for key, value in values.items() if value}


class ChatTemplate:
    """A model's Jinja chat template, rendered as transformers' `apply_chat_template` renders it.

    `special_tokens`: the tokenizer's special tokens (bos_token, eos_token, …, additional_special_tokens), which
    transformers passes to every template; see `special_tokens_from_config`.
    """

    def __init__(self, template: str, special_tokens: Mapping[str, Any] | None = None):
        if not isinstance(template, str) or not template:
            raise PackageError("the chat template is empty or not a string")
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.TemplateError as exc:
            raise PackageError(f"the model's chat template does not compile: {exc}") from None
        self.template = template
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ChatTemplate":
        """Load the template as a Hugging Face processor would from a model folder.

        chat_template.jinja, else chat_template.json's "chat_template", else tokenizer_config.json's (its "default"
        when it holds several named templates); special tokens from tokenizer_config.json / special_tokens_map.json.
        """
        path = Path(path)

        def read_json(name: str) -> dict:
            file = path / name
            if not file.is_file():
                return {}
            try:
                return json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise PackageError(f"{file}: not readable JSON ({exc})") from None

        tokenizer_config = read_json("tokenizer_config.json")
        template: Any = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            template = read_json("chat_template.json").get("chat_template") or tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        elif isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise PackageError(f"{path}: no chat template (chat_template.jinja, chat_template.json or "
                               "tokenizer_config.json's chat_template)")
        special = special_tokens_from_config(tokenizer_config, read_json("special_tokens_map.json"))
        return cls(template, special)

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
               continue_final_message: bool = False, **kwargs: Any) -> str:
        """Render `messages` (template-shaped, see `convert_messages`) to the prompt string.

        The template sees what transformers gives it: `messages`, `tools`, `documents`, `add_generation_prompt`,
        the special tokens, and `kwargs` (which override special tokens of the same name). With
        `continue_final_message` the prompt ends inside the last message, as in transformers. Errors the template
        raises (`raise_exception`, undefined values) become `InvalidRequestError`.
        """
        if tools is not None and (not isinstance(tools, (list, tuple)) or
                                  not all(isinstance(t, Mapping) for t in tools)):
            raise InvalidRequestError("tools must be an array of tool objects", param="tools")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        variables = {**self.special_tokens, **kwargs}
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        final_text = None
        if continue_final_message:
            messages = [dict(m) for m in messages]
            last = messages[-1]
            content = last.get("content")
            if isinstance(content, (list, tuple)):
                content = [dict(part) for part in content]
                for part in reversed(content):
                    if "text" in part:
                        final_text = part["text"]
                        part["text"] = part["text"] + tag
                        break
                else:
                    raise InvalidRequestError("the final message has no text to continue", param="messages")
                last["content"] = content
            else:
                final_text = content or ""
                last["content"] = final_text + tag
        try:
            rendered = self._compiled.render(
                messages=messages, tools=list(tools) if tools is not None else None, documents=documents,
                add_generation_prompt=add_generation_prompt, **variables,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the chat template refused these messages: {exc}", param="messages") from None
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
            raise InvalidRequestError(
                f"the chat template could not render these messages ({type(exc).__name__}: {exc})", param="messages"
            ) from None
        if continue_final_message:
            if final_text.strip() not in rendered or tag.strip() not in rendered:
                raise InvalidRequestError(
                    "cannot continue the final message: the chat template does not render it as given",
                    param="messages",
                )
            at = rendered.rindex(tag.strip())
            rendered = rendered[:at] if rendered[at:at + len(tag)] == tag else rendered[:at].rstrip()
        return rendered


# --------------------------------------------------------------------------------------------------------------
# 3. Image-token layout (per model family) and tokenization


@dataclass(frozen=True)
class Idefics3PromptLayout:
    """Idefics3 / SmolVLM image-token layout, as `Idefics3Processor` expands the `<image>` placeholder.

    An image split into `rows` × `cols` tiles becomes, per row, `cols` × (`<fake_token_around_image>`
    `<row_r_col_c>` + `image_seq_len` × `<image>`) and a newline, then a blank line and the global view
    `<fake_token_around_image><global-img>` + `image_seq_len` × `<image>` + `<fake_token_around_image>`.
    An image that is not split (rows = cols = 0) is only the global view.
    """

    image_seq_len: int
    image_token: str = "<image>"
    fake_image_token: str = "<fake_token_around_image>"
    global_image_token: str = "<global-img>"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Idefics3PromptLayout":
        """From processor_config.json-like values: image_seq_len, and optionally image_token, fake_image_token,
        global_image_token (defaults: Idefics3Processor's fixed strings)."""
        seq_len = config.get("image_seq_len")
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
            raise PackageError(f"idefics3 prompt layout: image_seq_len must be a positive integer, not {seq_len!r}")
        tokens = {key: config[key] for key in ("image_token", "fake_image_token", "global_image_token")
                  if config.get(key)}
        return cls(image_seq_len=seq_len, **tokens)

    @property
    def placeholder(self) -> str:
        """What the chat template writes for an image, and what `expand` replaces."""
        return self.image_token

    @staticmethod
    def _check_grid(rows: int, cols: int) -> None:
        if not (isinstance(rows, int) and isinstance(cols, int) and rows >= 0 and cols >= 0
                and (rows == 0) == (cols == 0)):
            raise ValueError(f"an image grid is (rows, cols) with both 0 (not split) or both >= 1, not {(rows, cols)}")

    def image_prompt(self, rows: int, cols: int) -> str:
        """The text for one image tiled in `rows` × `cols` (0, 0: not split); `get_image_prompt_string`."""
        self._check_grid(rows, cols)
        image_tokens = self.image_token * self.image_seq_len
        global_view = f"{self.fake_image_token}{self.global_image_token}{image_tokens}{self.fake_image_token}"
        if rows == 0:
            return global_view
        text = ""
        for r in range(rows):
            for c in range(cols):
                text += f"{self.fake_image_token}<row_{r + 1}_col_{c + 1}>{image_tokens}"
            text += "\n"
        return text + "\n" + global_view

    def num_image_tokens(self, rows: int, cols: int) -> int:
        """How many `<image>` tokens (= image features) one image gives: one tile of features per tile + global."""
        self._check_grid(rows, cols)
        return self.image_seq_len * (rows * cols + 1)

    def expand(self, text: str, grids: Sequence[tuple[int, int]]) -> str:
        """Replace the i-th image placeholder in `text` with the layout for `grids[i]` = (rows, cols)."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(grids):
            raise InvalidRequestError(
                f"the prompt has {len(pieces) - 1} image placeholder(s) {self.image_token!r} but the request has "
                f"{len(grids)} image(s); the text of the messages must not contain {self.image_token!r}",
                param="messages",
            )
        out = [pieces[0]]
        for (rows, cols), piece in zip(grids, pieces[1:]):
            out.append(self.image_prompt(rows, cols))
            out.append(piece)
        return "".join(out)


def encode_prompt(tokenizer, text: str, *, bos_token: str | None = None) -> list[int]:
    """Token ids of the rendered, expanded prompt, with a `tokenizers.Tokenizer`.

    Like transformers' processor `apply_chat_template(tokenize=True)`: the tokenizer's post-processor (which may add
    BOS) runs unless the text already starts with `bos_token`, so a template that writes BOS does not get a second.
    For SmolVLM (no post-processor) this equals `processor(text=...)["input_ids"]` either way.
    """
    add_special_tokens = not (bos_token and text.startswith(bos_token))
    return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


__all__ = [
    "ChatTemplate",
    "IMAGE_DETAILS",
    "Idefics3PromptLayout",
    "ImageRef",
    "TemplateMessages",
    "convert_messages",
    "encode_prompt",
    "special_tokens_from_config",
]
