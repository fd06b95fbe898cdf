"""What a model called again with the same shapes need not be asked again: the facts its
probe found (output shape, memory and operations per point, the ops it ran, whether a
derivative reaches the output), kept per model and request.

The probe runs the model under a dispatch mode that sees every op in Python (a few ms on
a small model, as much as its whole Laplacian of 512 points); a model called again with
inputs of the same per-point shapes runs the same ops: a trace or an exported program
has no control flow left, and an eager model that reads input values into Python shows
it in the ops (``_local_scalar_dense``), which keeps it off the Taylor engine, whatever
the values. The key holds the model weakly and what it computes with (:func:`state`, as
the program cache keys it); the batch-independence check still runs on every call (it is
about these points) unless a kept program vouches for them (:mod:`.programs`).

Imports: torch only.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch

#: entries kept (least recently used dropped first)
_SIZE = 16
_FACTS: OrderedDict[tuple, tuple[weakref.ref, tuple, Any]] = OrderedDict()
_LOCK = threading.Lock()
#: counts of probes answered from memory and probes run (for tests and benchmarks)
STATS = {"hits": 0, "probed": 0}


def state(module: torch.nn.Module) -> tuple:
    """What the model computes with, down to in-place updates of its tensors: ``training``,
    and every parameter's and buffer's identity, address, shape, dtype and version counter.

    Taken once per call, before the model runs (``Problem.state``), and kept with what the
    call records: version counters only grow, so a model that updates its own tensors as it
    runs is never matched by a later call. One walk of the module tree reading each module's
    own tables (``parameters()`` and ``buffers()`` walk it twice, through generators:
    0.02-0.05 ms against 0.01-0.035); a tensor shared by two modules is listed by each."""
    return state_and_dtype(module)[0]


def state_and_dtype(module: torch.nn.Module) -> tuple[tuple, torch.dtype | None]:
    """:func:`state`, and the dtype of the first floating parameter (what
    :func:`jaccli.load.models.model_dtype` answers: the same walk, in the same order)."""
    out: list = [module.training]
    dtype = None
    for m in module.modules():
        for t in m._parameters.values():
            if t is not None:
                out.append((id(t), t.data_ptr(), tuple(t.shape), t.dtype, t._version))
                if dtype is None and t.is_floating_point():
                    dtype = t.dtype
        for t in m._buffers.values():
            if t is not None:
                out.append((id(t), t.data_ptr(), tuple(t.shape), t.dtype, t._version))
    return tuple(out), dtype


def recall(module, request: tuple, now: tuple | None):
    """The facts kept for ``module`` and ``request``, or None (also for anything but a module);
    ``now``: the module's :func:`state` (``Problem.state``, taken once per call for a module)."""
    if not isinstance(module, torch.nn.Module):
        return None
    key = (id(module), request)
    with _LOCK:
        hit = _FACTS.get(key)
        if hit is None or hit[0]() is not module or hit[1] != now:
            return None
        _FACTS.move_to_end(key)
    STATS["hits"] += 1
    return hit[2]


def keep(module, request: tuple, facts, now: tuple | None) -> None:
    """Remember ``facts`` for ``module`` and ``request`` (modules only; the model held weakly),
    under the module's :func:`state` ``now``, taken before the probe ran (``Problem.state``)."""
    STATS["probed"] += 1
    if not isinstance(module, torch.nn.Module):
        return
    key = (id(module), request)
    with _LOCK:
        _FACTS[key] = (weakref.ref(module), now, facts)
        _FACTS.move_to_end(key)
        while len(_FACTS) > _SIZE:
            _FACTS.popitem(last=False)


def clear() -> None:
    """Forget every kept probe (and zero the counts)."""
    with _LOCK:
        _FACTS.clear()
        STATS.update(hits=0, probed=0)
