"""The in-process API: load a model package and ask it about images from Python, without HTTP.

    import edgevlm

    with edgevlm.load() as model:  # the bundled demo model; or edgevlm.load("path/to/package")
        print(model.ask("What shape is this?", images=["shape.png"]))       # → "A circle."
        for delta in model.ask("Describe the image.", images=[pil_image], stream=True):
            print(delta, end="", flush=True)
        reply = model.chat([{"role": "user", "content": "Hello"}], temperature=0, max_tokens=20)
        reply.text, reply.finish_reason, reply.usage.completion_tokens

A request goes through the server's own functions (api.py: `parse_chat_request`, `check_cost`, `prepare`,
`choices`), so it takes the same parameters (temperature, top_p, n, max_tokens / max_completion_tokens, stop,
seed, presence / frequency penalty, logit_bias, logprobs / top_logprobs, response_format json_object / json_schema,
tools / tool_choice / parallel_tool_calls), applies the same limits (images: `ImageLimits`; n and n × max_tokens:
`max_n`, `max_request_tokens`; the engine's KV slots and budget: `EngineConfig`), and refuses what the server
refuses with the same exception and message. Errors are the runtime's own (runtime/errors.py), all `EdgeVLMError`
with `.message` and `.param`: `InvalidRequestError` for a bad parameter or message (`ImageError` for an image,
`ContextLengthError` for a prompt too long), `PackageError` for a package that cannot be loaded, `Cancelled` for an
answer cut short by `close()`. `.status` and `.to_dict()` are what the server answers with.

Images: besides OpenAI's base64 data URIs, an image is given as encoded file bytes (PNG, JPEG, WebP, GIF, BMP),
a file path (`str` or `os.PathLike`), a Pillow image, or a numpy uint8 array (H×W×3 RGB, H×W×4 RGBA or H×W grey).
Bytes and files are passed on as they are; Pillow images and arrays are encoded to PNG (lossless), so every
image is decoded, checked and cached (by content) exactly as the server does it.

Thread-safe: one `Model` serves any number of threads. Each call is its own request to the engine's scheduler
thread, which decodes all running requests together (batched, as for the server's clients); requests' images are
decoded one request at a time, as the server's preparing thread does, so one full-size image is held at once.
Importing this module does not import aiohttp.
"""

from __future__ import annotations

import base64
import io
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from . import api
from .cli import DEFAULT_MODEL
from .errors import Cancelled, EdgeVLMError, ImageError, InvalidRequestError, PackageError
from .limits import EngineConfig, ImageLimits, ServerLimits
from .scheduler import JobEnd
from .tools import ToolAnswer
from .vlm import VisionLanguageModel

__all__ = ["Choice", "Completion", "Model", "Stream", "Usage", "image_url", "load"]

ImageInput = Any  # bytes | str | os.PathLike | PIL.Image.Image | numpy.ndarray


def load(path: str | os.PathLike | None = None, *, device: str = "cpu", threads: int | None = None,
         image_limits: ImageLimits = ImageLimits(), max_n: int = ServerLimits.max_n,
         max_request_tokens: int | None = None, engine_config: EngineConfig = EngineConfig()) -> Model:
    """Load a model package (a folder made by `edgevlm export`); without `path`, the bundled demo model, as
    `edgevlm serve` finds it. The limits are `edgevlm serve`'s and have its defaults: `image_limits` (images per
    request, their file size and pixels), `max_n` (choices per request), `max_request_tokens` (n × max_tokens per
    request; None: the model's context), `engine_config` (KV slots, KV budget, image-feature cache)."""
    if path is None:
        if not (DEFAULT_MODEL / "model.json").is_file():
            raise PackageError(f"no path given and the bundled demo model is not installed ({DEFAULT_MODEL} has no "
                               "model.json); pass the path of a package made by `edgevlm export`")
        path = DEFAULT_MODEL
    vlm = VisionLanguageModel.load(path, device=device, threads=threads, image_limits=image_limits,
                                   engine_config=engine_config)
    try:
        vlm.warm_up()
    except BaseException:
        vlm.close()
        raise
    return Model(vlm, ServerLimits(max_n=max_n, max_request_tokens=max_request_tokens, images=image_limits))


# ------------------------------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # of all choices together
    total_tokens: int
    image_tokens: int  # prompt positions taken by image features
    cached_tokens: int  # prompt tokens whose KV cache was reused from an earlier request

    @classmethod
    def from_dict(cls, usage: Mapping) -> Usage:
        details = usage["prompt_tokens_details"]
        return cls(usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"],
                   details["image_tokens"], details["cached_tokens"])

    def to_dict(self) -> dict:
        """OpenAI's usage object, as the server sends it."""
        return api.usage(self.prompt_tokens, self.completion_tokens, self.image_tokens, self.cached_tokens)


@dataclass(frozen=True)
class Choice:
    index: int
    message: dict  # OpenAI's assistant message: {"role", "content"} or, for tool calls, {..., "tool_calls"}
    finish_reason: str  # "stop", "length" or "tool_calls"
    logprobs: list | None  # with logprobs=True: one OpenAI logprobs entry per token

    @property
    def text(self) -> str:
        """The answer's text ("" for an answer that only calls tools)."""
        return self.message.get("content") or ""

    @property
    def tool_calls(self) -> list:
        """OpenAI's tool calls ({"id", "type": "function", "function": {"name", "arguments"}}), or []."""
        return self.message.get("tool_calls") or []


@dataclass(frozen=True)
class Completion:
    """A whole answer: `text` and `finish_reason` are the first choice's (the only one unless n > 1)."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: tuple[Choice, ...]
    usage: Usage

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def tool_calls(self) -> list:
        return self.choices[0].tool_calls

    def to_dict(self) -> dict:
        """The chat.completion object the server answers with."""
        choices = [{"index": c.index, "message": c.message, "finish_reason": c.finish_reason,
                    "logprobs": None if c.logprobs is None else {"content": c.logprobs}} for c in self.choices]
        return api.completion(self.id, self.created, self.model, self.system_fingerprint, choices,
                              self.usage.to_dict())


class _Run:
    """One request inside the engine: its events (Steps, an exception, then JobEnd) as they arrive, and at the end
    the response, built by the server's own `api.choices`."""

    def __init__(self, model: Model, chat: api.ChatRequest, prompt, schema):
        self.model, self.chat, self.prompt = model, chat, prompt
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.steps: list = []
        self.end: JobEnd | None = None
        model.vlm.submit(prompt, chat.params, self.events.put, schema=schema, cancelled=self.stop.is_set)

    def __iter__(self) -> Iterator:
        """The steps, as the engine makes them; leaving early cancels the request."""
        try:
            while not isinstance(event := self.events.get(), JobEnd):
                if isinstance(event, Exception):
                    raise event
                self.steps.append(event)
                yield event
            self.end = event
        finally:
            self.stop.set()  # done, failed or dropped: the engine lets go of its slots at its next step

    def completion(self) -> Completion:
        chat, vlm = self.chat, self.model.vlm
        if self.end is None or api.unfinished(self.steps, chat.params.n):
            raise Cancelled("the model was closed: this answer was cut short" if self.model.closed
                            else "the generation was cancelled")
        choices = tuple(Choice(c["index"], c["message"], c["finish_reason"],
                               None if c["logprobs"] is None else c["logprobs"]["content"])
                        for c in api.choices(self.steps, chat, vlm.token_text))
        usage = api.usage(len(self.prompt.input_ids), len(self.steps), self.prompt.image_tokens,
                          self.end.cached_tokens)
        return Completion(api.completion_id(), api.now(), chat.model or vlm.name, self.model.fingerprint, choices,
                          Usage.from_dict(usage))


class Stream:
    """A streamed answer: iterate for its text deltas (str) as they are generated. Once the iteration has ended,
    `completion` holds the whole answer (finish_reason, usage, logprobs, tool calls). With tools, the deltas are a
    plain answer's text; the calls are in `completion.tool_calls`. `close()`, or dropping the stream unfinished,
    cancels the generation."""

    def __init__(self, run: _Run):
        self._run = run
        self._deltas = self._generate()
        self.completion: Completion | None = None

    def _generate(self) -> Iterator[str]:
        tools = ToolAnswer() if self._run.chat.tools else None
        steps = iter(self._run)
        try:
            for step in steps:
                if tools is None:
                    if step.text:
                        yield step.text
                    continue
                try:
                    deltas = tools.feed(step.text)
                except ValueError:  # output off the generic format (the grammar should make it impossible)
                    raise EdgeVLMError("the model's tool-call output could not be read") from None
                for delta in deltas:
                    if delta.get("content"):
                        yield delta["content"]
        finally:
            steps.close()  # closed or dropped early: the request is cancelled
        self.completion = self._run.completion()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        self._deltas.close()
        self._run.stop.set()  # never iterated: the request is cancelled all the same

    def __del__(self) -> None:
        self._run.stop.set()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _finished(self) -> Completion:
        if self.completion is None:
            raise RuntimeError("the stream has not ended yet: iterate it to the end first")
        return self.completion

    @property
    def text(self) -> str:
        return self._finished().text

    @property
    def finish_reason(self) -> str:
        return self._finished().finish_reason

    @property
    def usage(self) -> Usage:
        return self._finished().usage


# -------------------------------------------------------------------------------------------------- images


def _image_error(index: int, what: str, param: str) -> ImageError:
    return ImageError(f"image {index}: {what}", param=param)


def image_url(image: ImageInput, index: int = 1, *, param: str = "messages") -> str:
    """One image as the data URI the server takes: file bytes and files as they are, a Pillow image or a numpy
    array as PNG. A `str` is a file path unless it is a data URI already. `index` (1-based) names it in errors."""
    if isinstance(image, str) and image.strip()[:5].lower() == "data:":
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise _image_error(index, f"cannot read {os.fspath(image)}: {exc.strerror}", param) from None
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, Image.Image):
        data = _png(image, index, param)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
            raise _image_error(index, "a numpy image must be a uint8 array of shape H×W×3 (RGB), H×W×4 (RGBA) or "
                                      f"H×W (grey), got {image.dtype} {image.shape}", param)
        array = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        data = _png(Image.fromarray(np.ascontiguousarray(array)), index, param)
    else:
        raise _image_error(index, "expected image bytes, a file path, a PIL.Image or a numpy uint8 array, got "
                                  f"{type(image).__name__}", param)
    return "data:;base64," + base64.b64encode(data).decode("ascii")


def _png(image: Image.Image, index: int, param: str) -> bytes:
    try:
        image = ImageOps.exif_transpose(image)  # as the server does for an image file's bytes
    except Exception:  # a broken EXIF block should not cost the image: keep it as stored
        pass
    buffer = io.BytesIO()
    try:
        try:
            image.save(buffer, format="PNG", compress_level=1)
        except (OSError, ValueError, KeyError):  # a mode PNG cannot hold (CMYK, YCbCr, F...): RGB, as the server's
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    except (OSError, ValueError, KeyError) as exc:
        raise _image_error(index, f"this Pillow image cannot be used ({exc})", param) from None
    return buffer.getvalue()


def _with_image_urls(messages: Any) -> Any:
    """The messages with every image_url part whose url is not a string (bytes, a path, a Pillow image, an array)
    turned into a data URI; anything malformed is left as it is for the message checks to report."""
    if not isinstance(messages, list):
        return messages
    out, index = [], 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            url = part.get("image_url") if isinstance(part, Mapping) and part.get("type") == "image_url" else None
            if isinstance(url, Mapping):
                index += 1
                if url.get("url") is not None and not isinstance(url["url"], str):
                    part = {**part, "image_url": {**url, "url": image_url(url["url"], index)}}
            parts.append(part)
        out.append({**message, "content": parts})
    return out


# --------------------------------------------------------------------------------------------------- model


class Model:
    """A loaded model, safe to use from several threads at once; `edgevlm.load()` makes one. `close()` (or leaving
    its `with` block) stops its engine."""

    def __init__(self, vlm: VisionLanguageModel, limits: ServerLimits = ServerLimits()):
        self.vlm = vlm  # the lower-level interface: prepare / submit / generate (runtime/vlm.py)
        self.limits = limits
        self.fingerprint = api.system_fingerprint(vlm)
        self.closed = False
        self._prepare = threading.Lock()  # one request's images decoded at a time, as the server's preparing thread

    @property
    def name(self) -> str:
        return self.vlm.name

    @property
    def context_length(self) -> int:
        return self.vlm.context_length

    def close(self) -> None:
        """Stop the engine: answers still being generated end with `Cancelled`; later requests raise it too."""
        self.closed = True
        self.vlm.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<edgevlm.Model {self.name!r}{' closed' if self.closed else ''}>"

    def ask(self, question: str, images: ImageInput | Sequence[ImageInput] | None = None, *,
            system: str | None = None, detail: str | None = None, stream: bool = False, **options) -> str | Stream:
        """Ask one question about zero or more images (each as bytes, a path, a Pillow image or a numpy array; one
        image may be given without a list): the answer's text, or with `stream=True` a `Stream` of its deltas.
        `detail` ("auto", "low": one tile per image, "high") applies to every image; `options` are `chat`'s."""
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not isinstance(question, str):
            raise InvalidRequestError(f"the question must be a string, got {type(question).__name__}",
                                      param="question")
        content: list[dict] = []
        for index, image in enumerate(images, 1):
            url: dict = {"url": image_url(image, index, param="images")}
            if detail is not None:
                url["detail"] = detail
            content.append({"type": "image_url", "image_url": url})
        content.append({"type": "text", "text": question})
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": content}]
        reply = self.chat(messages, stream=stream, **options)
        return reply if stream else reply.text

    def chat(self, messages: list, *, stream: bool = False, temperature: float | None = None,
             top_p: float | None = None, n: int | None = None, max_tokens: int | None = None,
             max_completion_tokens: int | None = None, stop: str | list[str] | None = None, seed: int | None = None,
             presence_penalty: float | None = None, frequency_penalty: float | None = None,
             logit_bias: Mapping[int | str, float] | None = None, logprobs: bool | None = None,
             top_logprobs: int | None = None, response_format: Mapping | None = None, tools: list | None = None,
             tool_choice: str | Mapping | None = None, parallel_tool_calls: bool | None = None,
             model: str | None = None) -> Completion | Stream:
        """Answer an OpenAI Chat Completions conversation: a `Completion`, or with `stream=True` a `Stream` of the
        answer's text deltas (one choice: n = 1). The parameters are the API's, with its defaults (left out, the
        package's generation defaults apply, then OpenAI's); an image_url part's url may be any image `ask`
        takes (a `str` stays what the API reads, a data URI or base64: give a path as a `pathlib.Path`).
        Everything is checked, and the images decoded, before this returns: a bad request raises here, not while
        a stream is read."""
        body = {name: value for name, value in (
            ("messages", _with_image_urls(messages)), ("model", model), ("temperature", temperature),
            ("top_p", top_p), ("n", n), ("max_tokens", max_tokens),
            ("max_completion_tokens", max_completion_tokens), ("stop", stop), ("seed", seed),
            ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
            ("logit_bias", logit_bias), ("logprobs", logprobs), ("top_logprobs", top_logprobs),
            ("response_format", response_format), ("tools", tools), ("tool_choice", tool_choice),
            ("parallel_tool_calls", parallel_tool_calls)) if value is not None}
        if not isinstance(stream, bool):
            raise InvalidRequestError(f"Invalid 'stream': expected a boolean, got {stream!r}", param="stream")
        vlm = self.vlm
        if self.closed:
            raise Cancelled("the model was closed")
        chat = api.parse_chat_request(body, vocab_size=vlm.vocab_size, defaults=vlm.defaults.values)
        if stream and chat.params.n > 1:
            raise InvalidRequestError("Invalid 'n': a stream carries one choice; ask without stream=True for "
                                      f"{chat.params.n} choices", param="n")
        api.check_cost(chat.params, self.limits, vlm)
        with self._prepare:
            prompt, schema = api.prepare(vlm, chat, self.limits)
        run = _Run(self, chat, prompt, schema)
        if stream:
            return Stream(run)
        for _ in run:
            pass
        return run.completion()
