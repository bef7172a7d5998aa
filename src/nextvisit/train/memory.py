"""CPU memory for training: keep the large per-step buffers in the C heap (``keep_large_buffers_in_the_heap``)."""

from __future__ import annotations

import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_large_buffers_in_the_heap() -> bool:
    """On glibc, serve allocations up to 32 MiB from the heap and keep up to 512 MiB of freed heap memory.

    A training step on CPU allocates and frees the same tensors of 1-30 MiB every step (activations, the
    embedding gradient, the head's chunks). By default glibc maps the first of them with ``mmap`` and, as its
    thresholds adapt, trims freed memory at the top of the heap back to the system, so pages are faulted in
    and zeroed again step after step; that showed as system time in the profile. A fixed mmap threshold of
    32 MiB (glibc's maximum) and a 512 MiB trim threshold keep the blocks for reuse, at the price of up to
    512 MiB of freed memory the process keeps. Measured on 2 cores: ``tiny`` at 42,343 tokens, 9.4k -> 11.2k
    tokens/s (before the fused head; docs/model.md). Returns whether the setting was applied (False on other
    C libraries; nothing changes there).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(_M_TRIM_THRESHOLD, 512 * 1024 * 1024))
