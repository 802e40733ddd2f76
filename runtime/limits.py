"""Every bound on what one client can make the server hold, in one place, with defaults that fit a 4 GB device.

The README's "Limits" table lists them with their `edgevlm serve` flags. Sizes here are bytes and pixels; the
flags and messages use MB (10^6 bytes) and MP (10^6 pixels). This module imports nothing heavy, so the command
line can show the defaults without loading the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


KV_CACHE_TYPES = ("auto", "float32", "int8")


def _check_positive(limits) -> None:
    for f in fields(limits):
        value = getattr(limits, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
            raise ValueError(f"{type(limits).__name__}.{f.name} must be positive, got {value!r}")


@dataclass(frozen=True)
class ImageLimits:
    """Per-request image limits. A full-size image is decoded one at a time and reduced at once, so the peak of
    image decoding is about one image at `max_pixels` (4 bytes a pixel with transparency, plus its RGB result)."""

    max_bytes: int = 20_000_000  # encoded (file) size of one image, after base64 decoding
    max_pixels: int = 40_000_000  # width * height of one image
    max_images: int = 16  # images in one request
    max_request_pixels: int = 200_000_000  # width * height summed over a request's images: decoding time

    def __post_init__(self):
        _check_positive(self)


@dataclass(frozen=True)
class ServerLimits:
    max_queue: int = 16  # requests running or waiting; more get 429
    max_body_bytes: int = 20_000_000  # one request body (413 past it)
    max_pending_body_bytes: int = 64_000_000  # bodies of the requests running or waiting, together (429)
    read_timeout: float = 30.0  # seconds for a request body to arrive (408)
    write_timeout: float = 30.0  # seconds a write may wait on a client that does not read; then it is dropped
    shutdown_timeout: float = 10.0  # seconds running requests get to finish after SIGTERM / SIGINT
    max_n: int = 8  # choices per request (at most the engine's --max-batch slots)
    max_request_tokens: int | None = None  # n × max_tokens per request; None: the model's context length
    images: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self):
        _check_positive(self)


@dataclass(frozen=True)
class EngineConfig:
    """What the engine runs at once and holds: fixed at load, whatever the requests."""

    max_batch: int = 8  # KV slots: sequences (choices of any requests) decoded together
    kv_budget_bytes: int = 1_000_000_000  # the KV slab of all slots; each holds budget / max_batch positions
    image_cache_bytes: int = 200_000_000  # image features kept for later questions about the same image
    # KV that idle slots keep for prefix reuse; past it the least recently used idle slots are emptied and their
    # memory given back (without a cap every slot's last conversation stayed resident: up to the whole KV budget)
    prefix_cache_bytes: int = 250_000_000
    # int4 packages with an int8 prefill graph: prompt chunks on int8 weights made at load (~2x faster prefill,
    # ~150 MB more memory at SmolVLM-256M size); False keeps prompts on the 4-bit weights
    int8_prefill: bool = True
    # KV cache precision. "int8": keys and values as int8 at per-channel steps calibrated at export (int4 packages
    # carry the graph, export/kv_int8.py): 4x the positions per KV budget and faster decode at long context, at a
    # small accuracy cost; "float32": the cache the reference model computes; "auto" (the default): int8 where the
    # package has it (its int4 weights already trade accuracy for speed), else float32
    kv_cache: str = "auto"

    def __post_init__(self):
        _check_positive(self)
        if self.kv_cache not in KV_CACHE_TYPES:
            raise ValueError(f"EngineConfig.kv_cache must be one of {', '.join(KV_CACHE_TYPES)}, got {self.kv_cache!r}")
