"""A loaded model: OpenAI messages in, prompt ids and image features out, then a stream of `Step`s.

request messages ─► convert_messages ─► chat template ─► images (base64 → RGB) ─► preprocessing (tiles)
                 ─► image-token layout ─► token ids ─► vision encoder ─► generate (prefill + decode steps)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .engine import Engine
from .errors import Cancelled, ContextLengthError, InvalidRequestError
from .generate import Step, generate
from .grammar import Grammars
from .images import ImageLimits, check_image_count, iter_images
from .package import ModelPackage
from .preprocess.idefics3 import Idefics3ImageConfig, fit, preprocess, tile_grid
from .prompt import ChatTemplate, Idefics3PromptLayout, convert_messages, encode_prompt
from .sampling import SamplingParams


@dataclass(frozen=True)
class Prompt:
    """What the decoder needs for one request: token ids and the features of its images, in order."""

    input_ids: list[int]
    image_features: np.ndarray | None
    image_tokens: int  # prompt positions filled by image features (OpenAI's usage.prompt_tokens_details)


class VisionLanguageModel:
    def __init__(self, package: ModelPackage, *, device: str = "cpu", threads: int | None = None,
                 image_limits: ImageLimits = ImageLimits()):
        self.package = package
        self.tokenizer = Tokenizer.from_file(str(package.tokenizer_path))
        tokens = package.tokens
        self.eos_token_ids = tuple(tokens["eos_token_ids"])
        self._grammars: Grammars | str | None = None  # built on first use; a str says why it cannot be
        self._grammars_lock = threading.Lock()
        self.engine = Engine(package, device=device, threads=threads)
        self.template = ChatTemplate(package.chat_template, tokens.get("special_tokens"))
        self.layout = Idefics3PromptLayout.from_config({
            "image_seq_len": package.vision["image_seq_len"],
            "image_token": tokens["image_token"],
            "fake_image_token": tokens["fake_image_token"],
            "global_image_token": tokens["global_image_token"],
        })
        self.image_config = Idefics3ImageConfig.from_dict(package.image_processor)
        self.image_limits = image_limits
        # The most characters one token stands for (81 for SmolVLM's: a newline and 80 spaces), for `_check_length`.
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

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
    def load(cls, path: str | Path, **kwargs) -> "VisionLanguageModel":
        return cls(ModelPackage.load(path), **kwargs)

    @property
    def name(self) -> str:
        return self.package.name

    def prepare(self, messages: Sequence[Mapping], *, check_prompt: Callable[[int], None] | None = None,
                cancelled: Callable[[], bool] = lambda: False) -> Prompt:
        """Validate and render the conversation, decode and encode its images; errors are InvalidRequestError.

        Each check runs before the work it guards: the text's length against the context before it is tokenized,
        each image's header before its pixels are decoded, the prompt's token count (and `check_prompt`, the
        caller's own limits, given that count) before the vision encoder runs. Images are decoded and reduced to
        the processor's first size one at a time, so one full-size image is held at once, then encoded one image
        at a time; `cancelled` is checked between images.
        """
        converted = convert_messages(messages, reserved_text=[self.layout.placeholder])
        check_image_count(len(converted.images), self.image_limits)
        text = self.template.render(converted.messages, add_generation_prompt=True)
        self._check_length(text)
        fitted, grids = [], []
        for image in iter_images([ref.url for ref in converted.images], self.image_limits):
            # detail "low" asks for one tile per image; "auto" and "high" use the model's splitting.
            split = False if converted.images[len(fitted)].detail == "low" else None
            grids.append(tile_grid(image.width, image.height, self.image_config, do_image_splitting=split))
            fitted.append((fit(image, self.image_config), split))
            del image  # the full-size image goes before the next one is decoded
        bos = self.template.special_tokens.get("bos_token")
        input_ids = encode_prompt(self.tokenizer, self.layout.expand(text, grids), bos_token=bos)
        if len(input_ids) >= self.engine.context_length:
            raise ContextLengthError(
                f"the prompt is {len(input_ids)} tokens; the model's context of {self.engine.context_length} "
                "tokens leaves no room for an answer", param="messages")
        if check_prompt is not None:
            check_prompt(len(input_ids))
        features = []
        for image, split in fitted:
            if cancelled():
                raise Cancelled("the request was cancelled while its images were encoded")
            batch = preprocess([image], self.image_config, do_image_splitting=split, fitted=True)
            features.append(self.engine.encode_images(batch.pixel_values, batch.pixel_attention_mask))
        image_tokens = sum(self.layout.num_image_tokens(rows, cols) for rows, cols in grids)
        return Prompt(input_ids=input_ids, image_features=np.concatenate(features) if features else None,
                      image_tokens=image_tokens)

    def _check_length(self, text: str) -> None:
        """Refuse, before tokenizing it, a text that cannot fit: no token covers more than `max_token_chars`."""
        at_least = -(-len(text) // self.max_token_chars)
        if at_least >= self.engine.context_length:
            raise ContextLengthError(
                f"the prompt is {len(text)} characters, at least {at_least} tokens; the model's context is "
                f"{self.engine.context_length} tokens", param="messages")

    def generate(self, prompt: Prompt, params: SamplingParams, *, max_tokens: int | None = None,
                 cancelled: Callable[[], bool] = lambda: False, schema: Mapping | None = None) -> Iterator[Step]:
        """The steps of the answer; with a JSON `schema` (`grammar.parse_response_format`) it is constrained to
        it. Compiling the schema raises InvalidRequestError for one that cannot be enforced."""
        limit = max_tokens or params.max_tokens or self.package.generation_defaults.get("max_tokens", 512)
        grammar = self.grammars.compile(schema) if schema is not None else None
        return generate(self.engine, self.tokenizer, prompt.input_ids, prompt.image_features, params,
                        max_tokens=limit, eos_token_ids=self.eos_token_ids, cancelled=cancelled, grammar=grammar)
