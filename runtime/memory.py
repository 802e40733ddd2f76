"""Give freed memory back to the system, so that one request's peak is not what the process keeps.

glibc's malloc keeps freed heap memory for reuse, and raises its mmap threshold to the largest block it has seen
freed (up to 32 MB): after one large image, the next ones' decoded pixels (Pillow allocates 16 MB blocks) and
numpy buffers come from the heap and stay resident after they are freed. Measured on `edgevlm serve`: one request
of 16 images of 6000×6000 took RSS from 104 MB to 2.47 GB and 2.35 GB was still held 30 s later. A fixed
threshold keeps every large buffer in its own mapping, returned when freed; `release` trims what small
allocations left in the heap. Both do nothing where the C library is not glibc (musl, macOS).
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD = 4 * 1024 * 1024  # buffers at least this large are mapped on their own and unmapped when freed


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both exist in glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def configure() -> bool:
    """Fix the mmap threshold for this process (call once, early); True where it took effect."""
    return bool(_LIBC is not None and _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release() -> None:
    """Return the heap's free pages to the system (after a request's images and generation)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_MADV_NOHUGEPAGE = 15 if sys.platform.startswith("linux") else None  # asm-generic/mman-common.h


def _madvise():
    if _MADV_NOHUGEPAGE is None:
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None


_MADVISE = _madvise()


def sparse(array: np.ndarray) -> bool:
    """Keep a large, mostly untouched buffer (the KV slab) in small pages, so memory is used where it is written.

    With transparent huge pages on ("always", the default of many distributions), the first write into each 2 MB
    region of a zero-filled buffer makes the whole region resident: a decode step writing one position per head of
    a KV slot made all of that slot's buffer resident (115 MB for one slot at SmolVLM-256M size, 0.5 s of page
    zeroing on its first use). In 4 KB pages, it costs what is written. True where the advice took effect.
    """
    if array.nbytes < 2 * mmap.PAGESIZE:
        return False
    return _advise(array, _MADV_NOHUGEPAGE)


def _advise(array: np.ndarray, advice: int | None) -> bool:
    """madvise the whole pages inside `array`'s memory; True where it took effect."""
    if _MADVISE is None or advice is None:
        return False
    start, page = array.ctypes.data, mmap.PAGESIZE
    first = -(-start // page) * page
    last = (start + array.nbytes) // page * page
    if last <= first:
        return False
    return _MADVISE(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice) == 0


_MADV_DONTNEED = 4 if sys.platform.startswith("linux") else None


def discard(array: np.ndarray) -> bool:
    """Give a contiguous buffer's whole pages back to the system (an emptied KV row): they read as zeros after and
    cost memory again only when written. The partial pages at either end keep their contents. True where it took
    effect."""
    return array.flags.c_contiguous and _advise(array, _MADV_DONTNEED)
