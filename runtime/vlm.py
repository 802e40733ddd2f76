"""A loaded model: the narrow interface the server, the CLI and embedding code use.

request messages ─► convert_messages ─► chat template ─► images (base64 → RGB, or the feature cache) ─► fit
                 ─► image-token layout ─► token ids ─► plan (the request's size, checked once) ─► Prompt
Prompt + sampling ─► submit ─► the engine's thread (scheduler.py: vision tiles, chunked prefill, batched decode)
                 ─► Steps, then JobEnd, delivered to the caller's `emit`; `generate` wraps that in an iterator.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .cache import FeatureCache, image_key
from .engine import Engine
from .errors import Cancelled, ContextLengthError, InvalidRequestError
from .generate import Step
from .grammar import Grammars
from .images import check_image_count, decode_image, image_payload
from .limits import EngineConfig, ImageLimits
from .metrics import Metrics
from .package import ModelPackage
from .families import load_family
from .prompt import ChatTemplate, convert_messages, encode_prompt
from .sampling import SamplingParams
from .scheduler import Job, JobEnd, Prompt, PromptImage, Scheduler

__all__ = ["EngineConfig", "JobEnd", "Prompt", "Step", "VisionLanguageModel"]


class VisionLanguageModel:
    def __init__(self, package: ModelPackage, *, device: str = "cpu", threads: int | None = None,
                 image_limits: ImageLimits = ImageLimits(), engine_config: EngineConfig = EngineConfig(),
                 defer_vision: bool = False):
        self.package = package
        # onnxruntime builds the sessions on a thread, without the GIL, while this one reads the tokenizer (which
        # holds the GIL: it starts once the first session is under way, or it would keep that thread from starting).
        opening = threading.Event()
        built: dict = {}

        def build() -> None:
            try:
                built["engine"] = Engine(package, device=device, threads=threads, defer_vision=defer_vision,
                                         opening=opening, int8_prefill=engine_config.int8_prefill,
                                         kv_cache=engine_config.kv_cache)
            except BaseException as exc:
                built["error"] = exc
            finally:
                opening.set()

        builder = threading.Thread(target=build, name="edgevlm-sessions", daemon=True)
        builder.start()
        opening.wait()
        try:
            self.tokenizer = Tokenizer.from_file(str(package.tokenizer_path))
        finally:
            builder.join()
        if "error" in built:
            raise built.pop("error")
        self.engine = built.pop("engine")
        tokens = package.tokens
        self.eos_token_ids = tuple(tokens["eos_token_ids"])
        self._grammars: Grammars | str | None = None  # built on first use; a str says why it cannot be
        self._grammars_lock = threading.Lock()
        self.template = ChatTemplate(package.chat_template, tokens.get("special_tokens"))
        self.family = load_family(package)  # images → prompt tokens and vision inputs (families/)
        self.image_limits = image_limits
        self.engine_config = engine_config
        self.metrics = Metrics()
        self.image_cache = FeatureCache(engine_config.image_cache_bytes)
        self.defaults = SamplingDefaults(package.generation_defaults)
        self.scheduler = Scheduler(
            self.engine, self.tokenizer, self.eos_token_ids, max_batch=engine_config.max_batch,
            kv_budget_bytes=engine_config.kv_budget_bytes, image_cache=self.image_cache,
            vision_inputs=lambda image: self.family.vision_inputs(image.image, image.plan), metrics=self.metrics,
            default_max_tokens=self.defaults.max_tokens, prefix_cache_bytes=engine_config.prefix_cache_bytes)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (81 for SmolVLM's: a newline and 80 spaces), for
        `_check_length`; on first use (40 ms over a 49k vocabulary: not at load)."""
        return max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    @property
    def grammars(self) -> Grammars:
        """response_format's grammar compiler. Its tokenizer-side index costs ~0.7 s for SmolVLM's 49k tokens (as
        much as creating every onnxruntime session), so it is built on first use, not at load: the server builds
        it on its worker right after it reports ready."""
        with self._grammars_lock:
            if self._grammars is None:
                try:
                    self._grammars = Grammars(self.tokenizer, self.eos_token_ids)
                except Exception as exc:  # llguidance cannot index this tokenizer: say so on every JSON request
                    self._grammars = f"its tokenizer cannot be indexed for constrained decoding ({exc})"
            if isinstance(self._grammars, str):  # a new error each time: re-raising one would grow its traceback
                raise InvalidRequestError("response_format json_object / json_schema is not available for this "
                                          f"model: {self._grammars}", param="response_format")
            return self._grammars

    @classmethod
    def load(cls, path: str | Path, *, verify: str = "auto", **kwargs) -> "VisionLanguageModel":
        """Load the package at `path`. Its files are verified (`ModelPackage.verify`: "auto" hashes only files the
        verification record does not hold unchanged, "always" every file) on a thread beside the onnxruntime
        sessions and the tokenizer; this returns only once verification passed, and a mismatch raises its
        PackageError (before any error the unverified files made onnxruntime raise)."""
        package = ModelPackage.load(path, verify=False)
        verification = package.start_verify(verify)
        try:
            model = cls(package, **kwargs)
        except BaseException:
            verification.result()  # a corrupted file is reported as such, not as the graph error it caused
            raise
        try:
            verification.result()
        except BaseException:
            model.close()
            raise
        return model

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def vocab_size(self) -> int:
        """Width of the decoder's logits: the ids logit_bias may name."""
        return self.package.text["vocab_size"]

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def check_choices(self, n: int) -> None:
        """Refuse n choices that can never run together (more than the engine's KV slots)."""
        self.scheduler.check_choices(n)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        """A digest of the package's files and the KV cache precision (OpenAI's system_fingerprint: it changes with
        what changes the outputs): the same weights served the same way give the same one."""
        digest = hashlib.sha256()
        for name, entry in sorted(self.package.manifest["files"].items()):
            digest.update(f"{name}:{entry['sha256']}".encode())
        if self.engine.kv_cache != "float32":
            digest.update(f"kv_cache:{self.engine.kv_cache}".encode())
        return digest.hexdigest()[:12]

    def warm_up(self) -> None:
        """One decoder run at load, so the first request does not pay for first-run allocations."""
        self.engine.warm_up()

    def close(self) -> None:
        """Stop the engine's thread (requests still inside end cut short)."""
        self.scheduler.close()

    # ---------------------------------------------------------------------------------------------- requests

    def prepare(self, messages: Sequence[Mapping], params: SamplingParams | None = None, *,
                max_request_tokens: int | None = None, cancelled: Callable[[], bool] = lambda: False) -> Prompt:
        """Validate and render the conversation, decode and fit its images; errors are InvalidRequestError.

        Each check runs before the work it guards: the text's length against the context before it is tokenized,
        each image's header before its pixels are decoded, the request's size (`Scheduler.plan`: context, KV slot,
        `max_request_tokens` = n × max_tokens) before anything is encoded. An image whose features are cached is
        not decoded at all. Images are decoded and reduced to the processor's first size one at a time, so one
        full-size image is held at once; the engine encodes them one vision run (tile) at a time.
        """
        params = params or SamplingParams()
        family = self.family
        converted = convert_messages(messages, reserved_text=[family.placeholder])
        limits = self.image_limits
        check_image_count(len(converted.images), limits)
        text = self.template.render(converted.messages, add_generation_prompt=True)
        self._check_length(text)
        images: list[PromptImage] = []
        pixels_left = limits.max_request_pixels
        for index, ref in enumerate(converted.images, 1):
            if cancelled():
                raise Cancelled("the request was cancelled while its images were decoded")
            key = image_key(image_payload(ref.url, index), ref.detail)
            cached = self.image_cache.get(key)
            if cached is not None:
                self.metrics.image_hits.inc()
                images.append(PromptImage(key, cached.plan, features=cached.features))
                continue
            image = decode_image(ref.url, index, limits, pixels_left=pixels_left)
            pixels_left -= image.width * image.height
            plan = family.plan(image.width, image.height, ref.detail)
            images.append(PromptImage(key, plan, image=family.fit(image, plan)))
            del image  # the full-size image goes before the next one is decoded
        bos = self.template.special_tokens.get("bos_token")
        input_ids = encode_prompt(self.tokenizer, family.expand(text, [i.plan for i in images]), bos_token=bos)
        max_tokens = self.scheduler.plan(len(input_ids), params.n, params.max_tokens)
        if params.max_tokens is None:  # left to us: the request's share of max_request_tokens at most
            max_tokens = min(max_tokens, (max_request_tokens or self.context_length) // params.n)
        positions = family.positions(input_ids, [i.plan for i in images]) if hasattr(family, "positions") else None
        return Prompt(input_ids=input_ids, key=self._prefix_key(input_ids, images), images=images,
                      image_tokens=sum(i.plan.tokens for i in images), max_tokens=max_tokens, positions=positions)

    def _prefix_key(self, input_ids: list[int], images: list[PromptImage]) -> np.ndarray:
        """The ids with each image token replaced by a negative tag of its image and its place in it: two prompts
        share a KV prefix only where both their tokens and their images agree."""
        key = np.asarray(input_ids, dtype=np.int64)
        positions = np.flatnonzero(key == self.engine.image_token_id)
        start = 0
        for image in images:
            count = image.plan.tokens
            tag = int(image.key[:15], 16)  # 60 bits of the image's hash
            key[positions[start:start + count]] = -1 - ((tag + np.arange(count, dtype=np.int64)) % (1 << 62))
            start += count
        return key

    def _check_length(self, text: str) -> None:
        """Refuse, before tokenizing it, a text that cannot fit: no token covers more than `max_token_chars`."""
        at_least = -(-len(text) // self.max_token_chars)
        if at_least >= self.engine.context_length:
            raise ContextLengthError(
                f"the prompt is {len(text)} characters, at least {at_least} tokens; the model's context is "
                f"{self.engine.context_length} tokens", param="messages")

    def submit(self, prompt: Prompt, params: SamplingParams, emit: Callable[[object], None], *,
               schema: Mapping | None = None, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Start generating: `emit` gets each `Step` (from the engine's thread), an exception if the request
        failed, then `JobEnd`. With a JSON `schema` (`grammar.parse_response_format`) the answer follows it;
        compiling it raises InvalidRequestError here, for one that cannot be enforced."""
        grammar = self.grammars.compile(schema) if schema is not None else None
        self.scheduler.submit(Job(prompt, params, emit, grammar=grammar, cancelled=cancelled))

    def generate(self, prompt: Prompt, params: SamplingParams, *, max_tokens: int | None = None,
                 cancelled: Callable[[], bool] = lambda: False, schema: Mapping | None = None) -> Iterator[Step]:
        """The steps of the answer, as an iterator (in-process use); `max_tokens` (or the params') re-plans the
        prompt's. Safe from several threads at once: each call is its own request to the engine."""
        max_tokens = max_tokens or params.max_tokens
        if max_tokens is not None and max_tokens != prompt.max_tokens:
            prompt = dataclasses.replace(prompt, max_tokens=self.scheduler.plan(
                len(prompt.input_ids), params.n, max_tokens))
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        self.submit(prompt, params, events.put, schema=schema, cancelled=lambda: stop.is_set() or cancelled())

        def steps() -> Iterator[Step]:
            try:
                while not isinstance(event := events.get(), JobEnd):
                    if isinstance(event, Exception):
                        raise event
                    if cancelled():  # what the engine made before it saw the cancellation is not shown
                        return
                    yield event
            finally:
                stop.set()  # an iterator dropped early cancels its request

        return steps()


class SamplingDefaults:
    """The package's generation defaults (model.json "generation"): they apply where a request is silent, so the
    order is request > package > OpenAI's defaults (as vLLM does with a model's generation_config)."""

    FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")

    def __init__(self, generation: Mapping):
        self.values = {name: generation[name] for name in self.FIELDS if generation.get(name) is not None}
        self.max_tokens = generation.get("max_tokens")
