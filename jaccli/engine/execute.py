"""Execution: the chunk loops that fill the result, and the fall-backs when a mode fails.

:func:`compute` takes a request (or a plan made for it) to a flat ``[N, …]`` result:
it plans (or takes a plan already made), refuses what cannot fit, runs the Taylor or
the torch.func loop over chunks of points and directions, and falls back to reverse
mode where an op has no forward-mode derivative. Failures inside the model become
:class:`~jaccli.errors.ModelError`, memory exhaustion :class:`~jaccli.errors.ResourceError`.

Imports: torch, numpy, :mod:`jaccli.taylor`, :mod:`.problem`, :mod:`.strategies`, :mod:`.planner`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .. import taylor
from ..errors import JaccliError, JaccliWarning, ResourceError
from ..models import first_line
from .planner import Plan, check_fits, make_plan, prepare, reuse, strategy_key
from .problem import Problem, model_failed, probe_rows
from .strategies import ASSIGNING_SCATTERS, STRATEGIES, Strategy, hutchinson_product

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
    return torch.from_numpy(np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype))


def _execute(kind: str, p: Problem, plan: Plan, strategy: Strategy, *, seed: int, probes: int):
    """Loop over chunks of points and directions; returns the flat ``[N, …]`` result."""
    dirs = strategy.directions(p, seed, probes).to(p.device)
    row_shape = strategy.result_shape(p)
    acc_dtype = torch.float64 if kind == "divergence" and plan.estimator == "hutchinson" else p.dtype
    # Scatters that assign every entry (Jacobian, Hessian) need no zero fill, and a chunk
    # writes straight into its rows of the result (a padded static-batch chunk excepted):
    # filling and copying a 260 MB Jacobian cost half as much again as computing it.
    assigns = strategy.scatter in ASSIGNING_SCATTERS
    shape = (p.n, *row_shape)
    if assigns:
        result = _empty_result(shape, acc_dtype, p.device)
    else:
        result = torch.zeros(shape, dtype=acc_dtype, device=p.device)
    ctx = {"n_out": p.n_out, "seed": seed}
    ppc, dpp = plan.points_per_chunk, plan.directions_per_pass
    with torch.no_grad():
        for start in range(0, p.n, ppc):
            stop = min(start + ppc, p.n)
            rows = torch.arange(start, stop, device=p.device)
            if p.static_batch is not None and rows.numel() < p.static_batch:
                rows = torch.cat([rows, rows[-1:].expand(p.static_batch - rows.numel())])
            g, z = p.fn(rows), p.z(rows)
            ctx["points"] = rows
            padded = rows.numel() != stop - start
            if padded:
                block_rows = torch.zeros((rows.numel(), *row_shape), dtype=acc_dtype, device=p.device)
            else:
                block_rows = result[start:stop]
            for d0 in range(0, dirs.shape[0], dpp):
                idx = dirs[d0 : d0 + dpp]
                block = strategy.product(g, z, idx, ctx)
                strategy.scatter(block_rows, idx, block.to(acc_dtype))
            if padded:
                result[start:stop] = block_rows[: stop - start]
    return result


def _execute_taylor(kind: str, p: Problem, plan: Plan, program: taylor.TaylorProgram, *,
                    seed: int, probes: int) -> torch.Tensor:  # fmt: skip
    """The fast path's loop over chunks of points: each pass writes its rows of the result in place."""
    ppc, dpp = plan.points_per_chunk, plan.directions_per_pass
    hutchinson = plan.estimator == "hutchinson"
    if hutchinson:
        result = torch.zeros((p.n, 2), dtype=torch.float64, device=p.device)
        estimate = hutchinson_product(lambda g, z, v: program.jvp(z, v))
    else:
        # every entry is written by its pass: no zero fill of what may be gigabytes
        row_shape = STRATEGIES[(kind, "forward")].result_shape(p)
        result = _empty_result((p.n, *row_shape), p.dtype, p.device)
        compute = getattr(program, kind)
    with torch.no_grad():
        for start in range(0, p.n, ppc):
            rows = torch.arange(start, min(start + ppc, p.n), device=p.device)
            z, out = p.z(rows), result[start : start + rows.numel()]
            if not hutchinson:
                compute(z, directions=dpp, out=out)
                continue
            ctx = {"seed": seed, "points": rows}
            for d0 in range(0, int(probes), dpp):
                idx = torch.arange(d0, min(d0 + dpp, int(probes)))[:, None]
                out += estimate(None, z, idx, ctx)
    return result


def compute(kind: str, f, x, *, plan: Plan | None = None, seed: int = 0,
            **options) -> tuple[Problem, Plan, torch.Tensor]:  # fmt: skip
    """Plan the request (or take ``plan``, made for it) and compute it.

    Returns the problem, the plan that ran (a fall-back's where one was needed) and the
    flat ``[N, …]`` result.
    """
    if plan is None:
        plan = prepare(kind, f, x, options)
        request = plan._request
    else:
        request = reuse(plan, kind, f, x, options)
    p, program, o = request
    estimator, probes, mode, chunk_size = o["estimator"], o["probes"], o["mode"], o["chunk_size"]
    check_fits(plan, p)
    try:
        return p, plan, _guarded(kind, p, plan, seed, probes, program)
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
            return p, plan, _guarded(kind, p, plan, seed, probes)
        except NotImplementedError as exc2:
            model_failed(p, exc2, probe_rows(p))


def _guarded(kind: str, p: Problem, plan: Plan, seed: int, probes: int,
             program: taylor.TaylorProgram | None = None) -> torch.Tensor:  # fmt: skip
    """Execute ``plan``, turning failures into jaccli errors (NotImplementedError passes)."""
    strategy = STRATEGIES[strategy_key(kind, plan.estimator, plan.mode)]
    try:
        if program is not None:
            return _execute_taylor(kind, p, plan, program, seed=seed, probes=probes)
        return _execute(kind, p, plan, strategy, seed=seed, probes=probes)
    except (JaccliError, NotImplementedError):
        raise
    except torch.OutOfMemoryError:
        raise ResourceError(
            "out of memory while computing",
            where=str(p.device),
            hint=f"pass a smaller chunk size than {plan.points_per_chunk if p.per_sample else plan.directions_per_pass}",
        ) from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
            raise ResourceError("out of memory while computing", where=str(p.device)) from None
        model_failed(p, exc, probe_rows(p))
