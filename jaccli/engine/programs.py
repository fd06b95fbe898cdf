"""Recorded Taylor programs kept for a model called again: no re-recording per call.

Recording a model (two traces and a compile) and checking the program against autograd
costs more than the derivatives of a few thousand points. A model called again with
the same request reuses its program: :func:`program_for` keeps the last few, keyed by

- the model object itself (held weakly: a model that is gone is never matched; only
  ``torch.nn.Module`` objects, TorchScript ones included — a plain function's captured
  state cannot be versioned, so it is recorded each call);
- the state it computes with: every parameter and buffer's identity, storage address,
  shape, dtype and version counter (an in-place update, ``optimizer.step()`` or
  ``load_state_dict`` into the same tensors, bumps the version) and ``training``;
- the request: per-point input and output shapes, dtype, device, which output, the
  argument names, the ops the probe saw (they decide the RNN kernels) and the order.

Even then, a program taken from the cache is checked again against the model on the
new input's probe points (:func:`jaccli.jets.recheck`): its value, not its derivatives,
which were checked against autograd once, when the entry was recorded (checking them on
every call was about half of a small request's time). The model's side of that check is
the probe's own forward on the same rows (the batch-independence check's, kept in
``Problem.probe_output``): no forward of its own. A change the key cannot see (a
plain tensor attribute, a Python flag) makes another function, whose values show the
disagreement, and the model is then recorded anew. An entry recorded from (or later
taken for) a model that passed the batch-independence check vouches for that check on a
call whose recheck passes on distinct probe rows: the check left pending is not run
(docs/reuse.md says what this no longer catches). What the check cannot see — a change
that matters only away from the probe points — a fresh recording would not see either. Entries are few (:data:`_SIZE`), dropped with their model (a program holds
the model's weights) and hold no buffers between calls (the workspace is let go after
each computation), only what a fold made from small weights (≤ 256 KiB a fold, see
:class:`jaccli.jets.fold._Kept`).

Imports: :mod:`jaccli.jets`, :mod:`.problem`, :mod:`.probe`.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict

import torch

from jaccli import jets
from jaccli.jets import adjoint
from jaccli.engine.probe import probe_rows, settle_batch_check
from jaccli.engine.problem import Problem

#: programs kept (least recently used dropped first)
_SIZE = 8
#: key -> (the model, weakly; its state; the program; whether the batch check passed on the
#: model it was recorded from)
_CACHE: OrderedDict[tuple, tuple[weakref.ref, tuple, jets.TaylorProgram, bool]] = OrderedDict()
#: reentrant: a model collected while the lock is held forgets its entry from this thread
_LOCK = threading.RLock()
#: counts of hits and recordings (for tests and benchmarks)
STATS = {"hits": 0, "built": 0}


def _key(p: Problem, orders: int) -> tuple | None:
    if not isinstance(p.module, torch.nn.Module):
        return None
    return (id(p.module), p.in_shapes, p.out_shape, p.dtype, str(p.device), p.output, tuple(map(str, p.args.keys)),
            p.wrt, p.per_sample, p.ops, orders)  # fmt: skip


def program_for(p: Problem, orders: int) -> jets.TaylorProgram:
    """The Taylor program of ``p``'s batch function checked to ``orders``: a kept one where it
    is still this model's, else a new recording; raises :class:`jaccli.jets.Unsupported`."""
    rows = probe_rows(p)
    key = _key(p, orders)
    if key is not None:
        with _LOCK:
            hit = _CACHE.get(key)
        if hit is not None and hit[0]() is p.module and hit[1] == p.state:
            seen = _seen(p, rows)
            try:
                jets.recheck(hit[2], p.fn(rows), p.z(rows), orders, value=seen)
            except jets.Unsupported:
                pass  # the model changed in a way the key cannot see: record it again
            else:
                with _LOCK:
                    _CACHE.move_to_end(key)
                STATS["hits"] += 1
                if hit[3] and seen is not None and p.n >= rows.numel():
                    # the model computes, on these distinct rows, the function that passed the
                    # batch check when it was recorded: the check left pending is not run
                    p.batch_pending = None
                return hit[2]
    program = jets.build(p.fn(rows), p.z(rows), orders=orders)
    STATS["built"] += 1
    if key is not None:
        with _LOCK:
            _CACHE[key] = (weakref.ref(p.module, functools.partial(_forget, key)), p.state, program, p.batch_checked)
            _CACHE.move_to_end(key)
            while len(_CACHE) > _SIZE:
                _CACHE.popitem(last=False)
    return program


def settle(p: Problem, program: jets.TaylorProgram | None, orders: int) -> None:
    """A recalled model's pending batch check (:func:`.probe.settle_batch_check`), unless the
    kept ``program`` vouched for these rows (its model passed the check, and the recheck found
    the model computing it on them); where it ran and passed, ``program``'s entry vouches from
    now on (:func:`confirm`)."""
    if settle_batch_check(p) and program is not None:
        confirm(p, program, orders)


def confirm(p: Problem, program: jets.TaylorProgram, orders: int) -> None:
    """The batch check passed on ``p``'s model after ``program`` was taken for it: the kept
    entry now vouches for the rows of later calls (see :func:`program_for`)."""
    key = _key(p, orders)
    if key is None:
        return
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry[2] is program:
            _CACHE[key] = (*entry[:3], True)


def adjoint_agrees(program: jets.TaylorProgram, p: Problem) -> bool:
    """Whether the Hessian by adjoints (:mod:`jaccli.jets.adjoint`) serves ``program``: checked
    once per program against its forward Hessian on ``p``'s probe rows. Not under
    ``torch.inference_mode``, where no reverse sweep can be recorded."""
    if torch.is_inference_mode_enabled():
        return False
    if program.adjoint is not None:  # known: no probe rows to gather
        return program.adjoint
    return adjoint.agrees(program, p.z(probe_rows(p)))


def _seen(p: Problem, rows: torch.Tensor) -> torch.Tensor | None:
    """The model's output on ``rows`` where the probe's forward (the batch check's, most often)
    ran on those very rows of this input, else None (the recheck then runs the model itself)."""
    seen = p.probe_output
    if seen is None or (seen[0] is not rows and (seen[0].shape != rows.shape or not torch.equal(seen[0], rows))):
        return None
    return seen[1]


def _forget(key: tuple, ref: weakref.ref) -> None:
    """A kept model is gone: so is its program (it holds the weights)."""
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry[0] is ref:
            del _CACHE[key]


def clear() -> None:
    """Forget every kept program (and zero the counts)."""
    with _LOCK:
        _CACHE.clear()
        STATS.update(hits=0, built=0)
