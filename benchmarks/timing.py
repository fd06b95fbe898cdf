"""Timing candidates against each other in one process, and reading this process's memory
figures (shared by the benchmark scripts).

Each candidate runs in its own block: one warm-up, then ``repeats`` timed calls, median.
Not round-robin: a candidate that grows the heap by gigabytes (nested torch.func) makes
the next call of whatever runs after it pay for the heap's first reuse (measured: jaccli's
u_xxxx of the seed PINN, 0.16 s alone, took 1.17 s right after nested ``vmap(jacfwd⁴)``),
which round-robin would charge to every repeat of the candidate that follows.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def blocks(fns: dict[str, Callable], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds per candidate, and each candidate's result (from its warm-up)."""
    times: dict[str, float] = {}
    results: dict[str, object] = {}
    for name, fn in fns.items():
        results[name] = fn()
        runs = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    return times, results


def status_kib(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def compile_checkouts(roots) -> None:
    """Byte-compile each checkout's ``jaccli`` package into its ``__pycache__`` (git ignores it),
    as an install leaves it: with ``PYTHONDONTWRITEBYTECODE`` set, an editable checkout would
    compile its modules again in every fresh process (0.1-0.2 s that no user pays)."""
    for root in roots:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(root) / "jaccli")], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
