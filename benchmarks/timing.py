"""Timing candidates against each other in one process, timing fresh processes, and reading
this process's memory figures (shared by the benchmark scripts).

:func:`blocks`: each candidate runs in its own block: one warm-up, then ``repeats`` timed
calls, median. Not round-robin: a candidate that grows the heap by gigabytes (nested
torch.func) makes the next call of whatever runs after it pay for the heap's first reuse
(measured: jaccli's u_xxxx of the seed PINN, 0.16 s alone, took 1.17 s right after nested
``vmap(jacfwd⁴)``), which round-robin would charge to every repeat of the candidate that
follows. :func:`rotated`: the candidates interleaved, who goes first rotating each repeat,
for peers of like memory (on a shared machine, the fair comparison: every candidate meets
the same load). :func:`child_seconds`: the wall and CPU time of one fresh process.
"""

from __future__ import annotations

import resource
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


def rotated(fns: dict[str, Callable[[int], object]], repeats: int,
            keep: bool = False) -> tuple[dict[str, list[float]], dict[str, list]]:  # fmt: skip
    """Each candidate ``fn(r)`` called once per repeat ``r``, interleaved, the order rotated
    each repeat (candidate ``r mod k`` first): the seconds of every call per candidate, and
    (``keep``) what each call returned (else empty lists: results of gigabytes are let go)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, list] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            got = fns[n](r)
            times[n].append(time.perf_counter() - t0)
            if keep:
                results[n].append(got)
    return times, results


def child_seconds(cmd: list[str], env: dict | None = None, cwd: Path | str | None = None) -> tuple[float, float]:
    """Wall and CPU (user + system, from ``RUSAGE_CHILDREN``) seconds of one fresh process;
    a failed one raises with its last line of stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    # stdout is dropped, not piped: draining and decoding what the child prints would count
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} … failed: {done.stderr.strip().splitlines()[-1:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
