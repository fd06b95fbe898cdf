"""Memory: what the machine (or GPU) can still hand out, and what one pass may use of it.

:func:`memory_available` answers the first (the host's figure read from ``/proc/meminfo``
at most every :data:`MEMINFO_EVERY` seconds), :func:`working_budget` the second. The
planner sizes its chunks and refuses results that cannot fit by them; the curvature
package sizes its chunks and kept graphs by them.

Imports: torch only.
"""

from __future__ import annotations

import math
import os
import time

import torch

MIB = 2**20


#: seconds a reading of the host's free memory is reused: reading ``/proc/meminfo`` takes
#: 17-70 µs, a tenth of a small model's fixed cost per call, and a plan needs the figure to
#: a quarter of itself (:func:`working_budget`), not to the millisecond
MEMINFO_EVERY = 0.5
#: the last reading of the host's free memory: (monotonic time, bytes)
_HOST_FREE: list[tuple[float, int]] = [(-math.inf, 0)]
#: the clock those readings are timed by (a test can set its own without touching the process's)
_clock = time.monotonic


def memory_available(device: torch.device) -> int:
    """Bytes the machine (or GPU) can still hand out (the host's: read at most every
    :data:`MEMINFO_EVERY` seconds)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    now = _clock()
    read_at, free = _HOST_FREE[0]
    if now - read_at < MEMINFO_EVERY:
        return free
    free = _read_host_free()
    _HOST_FREE[0] = (now, free)
    return free


def _read_host_free() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def working_budget(device: torch.device, free: int | None = None) -> int:
    """Bytes one pass may use: a quarter of what is free (``free``, else asked), at most 2 GiB on CPU.

    Larger passes gain nothing on CPU (the products are already long matrix
    multiplications) and leave the machine unusable; GPUs want big passes.
    """
    free = memory_available(device) if free is None else free
    cap = free // 2 if device.type == "cuda" else 2 * 2**30
    return max(64 * MIB, min(free // 4, cap))
