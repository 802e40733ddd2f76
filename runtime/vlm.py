"""A loaded model: OpenAI messages in, prompt ids and image features out, then a stream of `Step`s.

request messages ─► convert_messages ─► chat template ─► images (base64 → RGB) ─► preprocessing (tiles)
                 ─► image-token layout ─► token ids ─► vision encoder ─► generate (prefill + decode steps)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .engine import Engine
from .errors import ContextLengthError
from .generate import Step, generate
from .images import ImageLimits, check_image_count, decode_image
from .package import ModelPackage
from .preprocess.idefics3 import Idefics3ImageConfig, preprocess
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
        self.engine = Engine(package, device=device, threads=threads)
        self.tokenizer = Tokenizer.from_file(str(package.tokenizer_path))
        tokens = package.tokens
        self.template = ChatTemplate(package.chat_template, tokens.get("special_tokens"))
        self.layout = Idefics3PromptLayout.from_config({
            "image_seq_len": package.vision["image_seq_len"],
            "image_token": tokens["image_token"],
            "fake_image_token": tokens["fake_image_token"],
            "global_image_token": tokens["global_image_token"],
        })
        self.image_config = Idefics3ImageConfig.from_dict(package.image_processor)
        self.image_limits = image_limits
        self.eos_token_ids = tuple(tokens["eos_token_ids"])

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "VisionLanguageModel":
        return cls(ModelPackage.load(path), **kwargs)

    @property
    def name(self) -> str:
        return self.package.name

    def prepare(self, messages: Sequence[Mapping], *, tools: Sequence[Mapping] | None = None) -> Prompt:
        """Validate and render the conversation, decode and encode its images; errors are InvalidRequestError."""
        converted = convert_messages(messages, reserved_text=[self.layout.placeholder])
        check_image_count(len(converted.images), self.image_limits)
        text = self.template.render(converted.messages, add_generation_prompt=True, tools=tools)
        images = [decode_image(ref.url, i, self.image_limits) for i, ref in enumerate(converted.images, 1)]
        features, grids = None, []
        if images:
            # detail "low" asks for one tile per image; "auto" and "high" use the model's splitting.
            split = [False if ref.detail == "low" else None for ref in converted.images]
            pixel_values, pixel_mask, grids = self._pixels(images, split)
            features = self.engine.encode_images(pixel_values, pixel_mask)
        bos = self.template.special_tokens.get("bos_token")
        input_ids = encode_prompt(self.tokenizer, self.layout.expand(text, grids), bos_token=bos)
        if len(input_ids) >= self.engine.context_length:
            raise ContextLengthError(
                f"the prompt is {len(input_ids)} tokens; the model's context of {self.engine.context_length} "
                "tokens leaves no room for an answer", param="messages")
        image_tokens = sum(self.layout.num_image_tokens(rows, cols) for rows, cols in grids)
        return Prompt(input_ids=input_ids, image_features=features, image_tokens=image_tokens)

    def _pixels(self, images, split: list[bool | None]):
        """Tiles of all images in one batch; images asking for different splitting are processed apart."""
        if len(set(split)) == 1:
            batch = preprocess(images, self.image_config, do_image_splitting=split[0])
            return batch.pixel_values, batch.pixel_attention_mask, list(zip(batch.rows, batch.cols))
        parts = [preprocess([image], self.image_config, do_image_splitting=s) for image, s in zip(images, split)]
        height = max(p.pixel_values.shape[-2] for p in parts)
        width = max(p.pixel_values.shape[-1] for p in parts)
        values, masks = [], []
        for p in parts:  # pad each to the largest tile, as the processor pads a batch
            pad_h, pad_w = height - p.pixel_values.shape[-2], width - p.pixel_values.shape[-1]
            values.append(np.pad(p.pixel_values, ((0, 0), (0, 0), (0, 0), (0, pad_h), (0, pad_w))))
            masks.append(np.pad(p.pixel_attention_mask, ((0, 0), (0, 0), (0, pad_h), (0, pad_w))))
        grids = [(p.rows[0], p.cols[0]) for p in parts]
        return np.concatenate(values, axis=1), np.concatenate(masks, axis=1), grids

    def generate(self, prompt: Prompt, params: SamplingParams, *, max_tokens: int | None = None,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        limit = max_tokens or params.max_tokens or self.package.generation_defaults.get("max_tokens", 512)
        return generate(self.engine, self.tokenizer, prompt.input_ids, prompt.image_features, params,
                        max_tokens=limit, eos_token_ids=self.eos_token_ids, cancelled=cancelled)
