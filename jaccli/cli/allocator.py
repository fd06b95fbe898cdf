"""glibc's allocator tuned for tensor work, for the ``jaccli`` process (not on import).

PyTorch's CPU tensors come from ``malloc``; glibc serves blocks above its mmap threshold
(128 KiB, growing to at most 32 MiB) from fresh ``mmap`` pages and hands them back on
``free``, so a chunked computation that allocates the same few-MiB tensors over and over
page-faults on every one. Raising the thresholds keeps freed blocks for reuse: on the
seed PINN's ``u_xxxx`` (N = 100 000) the series run takes 0.21 s instead of 0.30 s.
Peak memory is unchanged (it is what the largest moment holds); what is freed stays with
the process until it exits. Users who choose their allocator (``MALLOC_*`` variables,
jemalloc or tcmalloc by ``LD_PRELOAD``) keep their choice.

Imports: the standard library only (this runs before torch is imported).
"""

from __future__ import annotations

import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds; False where it does not apply."""
    if not sys.platform.startswith("linux") or "LD_PRELOAD" in os.environ:
        return False
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 256 * 2**20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1024 * 2**20))
