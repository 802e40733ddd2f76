"""The image-feature cache: vision-encoder output by image content, bounded in bytes, least recently used first out.

A second question about the same image (same bytes, same detail) skips decoding it and running the vision
encoder. Keys are the SHA-256 of the image's base64 payload with the tiling it was encoded with; each entry keeps
the image's plan (families.ImagePlan) too, so its prompt layout needs no pixels. Shared by the thread that prepares requests
(lookups) and the engine's thread (inserts).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def image_key(payload: str, detail: str) -> str:
    """The cache key of one client image: its base64 text (as sent) and whether it asked for detail "low"."""
    return f"{hashlib.sha256(payload.encode('utf-8', 'surrogatepass')).hexdigest()}:{detail == 'low'}"


@dataclass(frozen=True)
class CachedImage:
    features: np.ndarray  # [tokens, hidden]
    plan: object  # the family's ImagePlan for it


class FeatureCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> CachedImage | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, features: np.ndarray, plan) -> None:
        size = features.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.features.nbytes
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.features.nbytes
            self._entries[key] = CachedImage(features, plan)
            self._bytes += size
