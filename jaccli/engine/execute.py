"""Execution: the chunk loops that fill the result, and the fall-backs when a mode fails.

:func:`compute` takes a request (or a plan made for it) to a flat ``[N, …]`` result:
it plans (or takes a plan already made), refuses what cannot fit, runs the Taylor or
the torch.func loop over chunks of points and directions, and falls back to reverse
mode where an op has no forward-mode derivative. Failures inside the model become
:class:`~jaccli.errors.ModelError`, memory exhaustion :class:`~jaccli.errors.ResourceError`.

Imports: torch, numpy, :mod:`jaccli.jets`, :mod:`.problem`, :mod:`.probe`, :mod:`.strategies`, :mod:`.planner`,
:mod:`.choice`.
"""

from __future__ import annotations

import functools

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

from jaccli import jets as taylor
from jaccli.jets import fused
from jaccli.errors import first_line, JaccliError, JaccliWarning, ResourceError
from jaccli.engine.choice import prepare, reuse
from jaccli.engine.planner import Plan, check_fits, make_plan, strategy_key
from jaccli.engine.probe import model_failed, probe_rows
from jaccli.engine.problem import Problem
from jaccli.request.spec import Derivative
from jaccli.engine.strategies import ASSIGNING_SCATTERS, STRATEGIES, Strategy, hutchinson_product

#: where a strategy goes when an op of the model has no forward-mode derivative
_FALLBACK = {
    ("jacobian", "forward"): "reverse",
    ("divergence", "forward"): "reverse",
    ("hutchinson", "forward"): "reverse",
    ("hessian", "forward"): "reverse-only",
    ("hessian", "reverse"): "reverse-only",
    ("laplacian", "forward"): "reverse-only",
    ("laplacian", "reverse"): "reverse-only",
}

def _empty_result(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised result; on CPU backed by numpy, whose allocator asks the kernel for
    transparent huge pages: first-touch page faults of a 200 MB result drop from about
    60 ms to 15 ms, as much as the whole Jacobian of a small network costs beyond its
    forward pass. The tensor keeps the array alive; nothing else refers to it."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is None:  # numpy's name for it, asked once per dtype (a tensor made each call: 2 µs)
        np_dtype = _NUMPY_DTYPES[dtype] = torch.empty((), dtype=dtype).numpy().dtype
    return torch.from_numpy(np.empty(shape, dtype=np_dtype))


#: torch dtype -> numpy dtype of the results made so far
_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {}


class MemorySink:
    """Where the chunk loops write a result held in memory: each chunk straight into its rows.

    The other sink, :class:`jaccli.io.stream.FileSink`, has the same methods and writes each
    finished chunk into its rows of a file instead (and may compute only some chunks: those
    of its rank, not yet done by an interrupted run). ``progress(done, total)`` is called
    with the points done after each chunk. The loops call ``flush()`` after the last
    chunk: a sink may still be writing committed chunks (FileSink on a GPU does).
    """

    def __init__(self, progress: Callable[[int, int], None] | None = None) -> None:
        self.progress = progress

    def open(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *,
             zero: bool, ppc: int) -> None:  # fmt: skip
        self.result = torch.zeros(shape, dtype=dtype, device=device) if zero else _empty_result(shape, dtype, device)
        self.ppc, self.done = ppc, 0
        if self.progress is not None:
            self.progress(0, shape[0])

    def chunks(self, n: int) -> Iterator[tuple[int, int]]:
        for start in range(0, n, self.ppc):
            yield start, min(start + self.ppc, n)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.result[start:stop]

    def commit(self, start: int, stop: int) -> None:
        self.done += stop - start
        if self.progress is not None:
            self.progress(self.done, self.result.shape[0])

    def flush(self) -> None:
        pass  # the rows are the result: nothing is in flight

    def value(self) -> torch.Tensor:
        return self.result


def _execute(kind: str, p: Problem, plan: Plan, strategy: Strategy, sink, *, seed: int, probes: int):
    """Loop over chunks of points and directions, writing into ``sink``."""
    dirs = strategy.directions(p, seed, probes).to(p.device)
    row_shape = strategy.result_shape(p)
    acc_dtype = torch.float64 if plan.estimator == "hutchinson" else p.dtype
    # Scatters that assign every entry (Jacobian, Hessian) need no zero fill, and a chunk
    # writes straight into its rows of the result (a padded static-batch chunk excepted):
    # filling and copying a 260 MB Jacobian cost half as much again as computing it.
    assigns = strategy.scatter in ASSIGNING_SCATTERS
    sink.open((p.n, *row_shape), acc_dtype, p.device, zero=not assigns, ppc=plan.points_per_chunk)
    ctx = {"n_out": p.n_out, "seed": seed}
    dpp = plan.directions_per_pass
    with torch.no_grad():
        for start, stop in sink.chunks(p.n):
            rows = torch.arange(start, stop, device=p.device)
            if p.static_batch is not None and rows.numel() < p.static_batch:
                rows = torch.cat([rows, rows[-1:].expand(p.static_batch - rows.numel())])
            g, z = p.fn(rows), p.z(rows)
            ctx["points"] = rows
            padded = rows.numel() != stop - start
            if padded:
                block_rows = torch.zeros((rows.numel(), *row_shape), dtype=acc_dtype, device=p.device)
            else:
                block_rows = sink.rows(start, stop)
            for d0 in range(0, dirs.shape[0], dpp):
                idx = dirs[d0 : d0 + dpp]
                block = strategy.product(g, z, idx, ctx)
                strategy.scatter(block_rows, idx, block.to(acc_dtype))
            if padded:
                sink.rows(start, stop)[:] = block_rows[: stop - start]
            sink.commit(start, stop)
        sink.flush()


def _execute_taylor(kind: str, p: Problem, plan: Plan, program: taylor.TaylorProgram, sink, *,
                    seed: int, probes: int, compile="auto") -> None:  # fmt: skip
    """The fast path's loop over chunks of points: each pass writes its rows of ``sink`` in place;
    ``compile`` decides whether elementwise rules run as fused kernels (:mod:`jaccli.jets.fused`)."""
    dpp = plan.directions_per_pass
    hutchinson = plan.estimator == "hutchinson"
    if hutchinson:
        sink.open((p.n, 2), torch.float64, p.device, zero=True, ppc=plan.points_per_chunk)
        estimate = hutchinson_product(lambda g, z, v: program.jvp(z, v))
    else:
        # every entry is written by its pass: no zero fill of what may be gigabytes
        row_shape = STRATEGIES[(kind, "forward")].result_shape(p)
        sink.open((p.n, *row_shape), p.dtype, p.device, zero=False, ppc=plan.points_per_chunk)
        # reverse mode on the Taylor engine: the Hessian by adjoints
        compute = functools.partial(taylor.adjoint.hessian, program) if plan.mode == "reverse" else getattr(program, kind)
    fz = fused.fuser(compile, plan.points_per_chunk, program.fusion)
    # the passes reuse their buffers from chunk to chunk (see jaccli.jets.workspace)
    with torch.no_grad(), program.workspace():
        for start, stop in sink.chunks(p.n):
            # the chunk's points by a slice: a view of the input, where an index of rows copied them
            z, out = p.z(slice(start, stop)), sink.rows(start, stop)
            with fz.chunk(stop - start):
                if not hutchinson:
                    compute(z, directions=dpp, out=out)
                else:
                    ctx = {"seed": seed, "points": torch.arange(start, stop, device=p.device)}
                    for d0 in range(0, int(probes), dpp):
                        idx = torch.arange(d0, min(d0 + dpp, int(probes)))[:, None]
                        out += estimate(None, z, idx, ctx)
            sink.commit(start, stop)
        sink.flush()
    fz.finish()


def compute(d: Derivative, f, x, *, plan: Plan | None = None, sink=None) -> tuple[Problem, Plan, torch.Tensor | None]:
    """Plan the request ``d`` (or take ``plan``, made for it) and compute it.

    Returns the problem, the plan that ran (a fall-back's where one was needed) and the
    flat ``[N, …]`` result (None when the result went to a sink other than a
    :class:`MemorySink`). ``sink=`` also accepts a callable ``sink(problem, plan)`` that
    makes one once the request is normalised.
    """
    kind, seed = d.kind.name, d.seed
    if plan is None:
        plan = prepare(d, f, x)
        request = plan._request
    else:
        request = reuse(plan, d, f, x)
    p, program, planned = request
    estimator, probes, mode, chunk_size = planned.estimator, planned.probes, planned.mode, planned.chunk_size
    if callable(sink) and not hasattr(sink, "open"):
        sink = sink(p, plan)
    check_fits(plan, p, in_memory=sink is None or isinstance(sink, MemorySink))
    sink = sink or MemorySink()
    try:
        _guarded(kind, p, plan, sink, seed, probes, program, d.compile)
        return p, plan, _value(sink)
    except NotImplementedError as exc:
        fallback = _FALLBACK.get(strategy_key(kind, estimator, plan.mode))
        if fallback is None or "forward AD" not in str(exc):
            model_failed(p, exc, probe_rows(p))
        if mode != "auto":
            warnings.warn(
                f"{p.where}: {first_line(exc)}; used {fallback} mode instead of {mode}",
                JaccliWarning,
                stacklevel=3,
            )
        plan = make_plan(kind, p, fallback, estimator, probes, chunk_size)
        try:
            _guarded(kind, p, plan, sink, seed, probes)
            return p, plan, _value(sink)
        except NotImplementedError as exc2:
            model_failed(p, exc2, probe_rows(p))


def _value(sink) -> torch.Tensor | None:
    return sink.value() if isinstance(sink, MemorySink) else None


def _guarded(kind: str, p: Problem, plan: Plan, sink, seed: int, probes: int,
             program: taylor.TaylorProgram | None = None, compile="auto") -> None:  # fmt: skip
    """Execute ``plan`` into ``sink``, turning failures into jaccli errors (NotImplementedError passes)."""
    strategy = STRATEGIES[strategy_key(kind, plan.estimator, plan.mode)]
    try:
        if program is not None:
            return _execute_taylor(kind, p, plan, program, sink, seed=seed, probes=probes, compile=compile)
        return _execute(kind, p, plan, strategy, sink, seed=seed, probes=probes)
    except (JaccliError, NotImplementedError):
        raise
    except torch.OutOfMemoryError:
        raise ResourceError(
            "out of memory while computing",
            where=str(p.device),
            hint=f"pass a smaller chunk_size than {plan.points_per_chunk if p.per_sample else plan.directions_per_pass}",
            cli_hint=f"pass a smaller --chunk-size than {plan.points_per_chunk if p.per_sample else plan.directions_per_pass}",
        ) from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
            raise ResourceError("out of memory while computing", where=str(p.device)) from None
        model_failed(p, exc, probe_rows(p))
