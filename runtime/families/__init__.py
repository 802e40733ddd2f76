"""Model families on the runtime side: what differs between VLM families, behind one interface.

A family module turns a request's images into prompt tokens and vision-encoder inputs; everything else (messages,
chat template, tokenizer, engine, scheduler, sampling, server) is shared. The package's model.json "family" picks
the module, through one line of `FAMILIES`. The interface (`Family`) is documented in models/README.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import PackageError

# family name (model.json "family") → module defining `family(package)`
FAMILIES = {
    "idefics3": "edgevlm.runtime.families.idefics3",
    "qwen2_vl": "edgevlm.runtime.families.qwen2vl",
    "qwen2_5_vl": "edgevlm.runtime.families.qwen2_5_vl",
}


@dataclass(frozen=True)
class ImagePlan:
    """What one image becomes, decided from its size alone (no pixels): the prompt and the engine's work."""

    layout: Any  # the family's own description (Idefics3: the (rows, cols) tile grid)
    tokens: int  # image tokens in the prompt = image features the vision encoder gives for it
    runs: int  # vision encoder runs (Idefics3: tiles, one per run)
    split: bool | None = None  # Idefics3: the request's tiling choice (detail "low": False)
    budget: int | None = None  # Qwen2-VL: the request's pixel budget (detail "low"), None: the processor's


class Family(Protocol):
    name: str
    placeholder: str  # what the chat template writes for an image (reserved: clients' text may not contain it)

    def plan(self, width: int, height: int, detail: str) -> ImagePlan:
        """How an image of this size is laid out (detail: "low" / "high" / "auto", OpenAI's image_url.detail)."""

    def fit(self, image, plan: ImagePlan):
        """The decoded RGB image reduced to the processor's first size (so a request holds one full-size image)."""

    def expand(self, text: str, plans: Sequence[ImagePlan]) -> str:
        """The rendered prompt with the i-th placeholder replaced by the i-th image's tokens."""

    def vision_inputs(self, image, plan: ImagePlan) -> Iterator[dict[str, np.ndarray]]:
        """The vision encoder's feeds for one fitted image, one dict per run (`plan.runs` of them); each run gives
        [1, n, hidden] features, concatenated in order into the image's `plan.tokens` features."""

    # Families whose decoder takes its rotary positions as inputs (M-RoPE) also define
    # positions(input_ids, plans) → (3-D positions [3, len(input_ids)], decode offset).


def load_family(package) -> Family:
    name = package.manifest.get("family")
    module = FAMILIES.get(name)
    if module is None:
        raise PackageError(f"model package {package.path}: family {name!r} is not supported by this runtime "
                           f"(supported: {', '.join(FAMILIES)})")
    return importlib.import_module(module).family(package)
