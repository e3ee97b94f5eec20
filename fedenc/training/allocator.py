"""Keep large freed buffers in the heap instead of handing them back to the OS.

A training step allocates and frees several 10-20 MB tensors (logits, the dense embedding gradient).
With glibc's defaults those are fresh ``mmap`` pages on every step and the first write to each page
faults, which runs at 1-2.5 GB/s on a small VM instead of 15+ GB/s (../shared/notes/perf-limits.md).
Raising the mmap and trim thresholds lets the buffers be reused: about 15% more training pairs/s on
the 2-core reference machine. Linux/glibc only; ``FEDENC_NO_MALLOPT=1`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
_TRIM_THRESHOLD = 1024 * 1024 * 1024
_done = False


def tune_allocator() -> bool:
    """Apply the thresholds once per process; returns whether they are in effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("FEDENC_NO_MALLOPT"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):  # not glibc (e.g. musl): keep the defaults
        return False
    _done = ok
    return ok
