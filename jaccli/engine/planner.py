"""Planning: mode, memory budget and chunk sizes of either engine (Taylor or torch.func).

Owns :class:`Plan` (what a request will do, shown by ``--dry-run``), the predicted cost of
every engine that can run a request (:func:`estimates`, from :mod:`.costs`), the chunks that
fit the memory budget of one pass (:mod:`.memory`'s), the refusal of results that cannot fit,
the plans kept for kept programs, and the Taylor program a request may run on. Which engine
runs is :mod:`.choice`'s to decide. A plan carries the normalised request it was made for, so
that computing it probes and traces the model no second time.

Imports: torch, :mod:`jaccli.jets`, :mod:`.problem`, :mod:`.programs`, :mod:`.strategies`,
:mod:`.costs`, :mod:`.memory` (what the machine can hand out, what one pass may use).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import NamedTuple

import torch

from jaccli import jets as taylor
from jaccli.errors import format_bytes, ModelError, ResourceError, shape_str, UsageError
from jaccli.engine.programs import program_for
from jaccli.engine.problem import Problem
from jaccli.request.choices import ESTIMATORS, MODES
from jaccli.request.kinds import kind as kind_of
from jaccli.request.spec import Derivative
from jaccli.engine.costs import COSTS, estimate_seconds, point_seconds
from jaccli.engine.memory import MIB as _MIB, memory_available, working_budget
from jaccli.engine.strategies import STRATEGIES, count_directions

#: working-memory multiple of one forward pass, per point and direction (empirical), by the
#: Taylor order of the kind (first derivatives and their trace; second derivatives and
#: theirs) and the resolved mode
_MEMORY_FACTOR = {
    (1, "forward"): 2.0,
    (1, "reverse"): 3.0,
    (2, "forward"): 4.0,
    (2, "reverse"): 6.0,
    (2, "reverse-only"): 8.0,
}


#: the fields of a :class:`~jaccli.request.spec.Derivative` a plan fixes (the seed is the run's)
PLANNED_FIELDS = ("wrt", "per_sample", "mode", "chunk_size", "output", "select", "estimator", "probes",
                  "check_batch", "strict")  # fmt: skip


class Request(NamedTuple):
    """What a plan was made for: the normalised problem, the Taylor program, the typed request."""

    problem: Problem
    program: taylor.TaylorProgram | None
    derivative: Derivative


@dataclass(frozen=True)
class Plan:
    """What a request will do: mode, chunking, result size and memory estimate."""

    kind: str
    mode: str
    estimator: str
    per_sample: bool
    points: int
    directions: int
    points_per_chunk: int
    directions_per_pass: int
    result_shape: tuple[int, ...]
    result_bytes: int
    peak_bytes: int
    available_bytes: int
    dtype: torch.dtype
    device: torch.device
    #: "taylor" (traced forward streams, see jaccli.jets) or "torch.func"
    engine: str = "torch.func"
    #: why the Taylor path was tried and not taken (the op without a rule, ...)
    engine_note: str | None = None
    #: processes sharing the work (torch.distributed ranks) when the result streams to a file
    world_size: int = 1
    #: what auto mode weighed: predicted seconds of each engine that could run the request,
    #: as ("taylor forward" | "torch.func forward" | "torch.func reverse", seconds) pairs
    estimates: tuple[tuple[str, float], ...] = ()
    #: what the computation did with fused Taylor kernels (:mod:`jaccli.jets.fused`), once it ran
    compiled: str | None = None
    #: the normalised request and traced program, so that computing the plan needs no
    #: second probe or trace (see :func:`.choice.prepare` and :func:`.choice.reuse`)
    _request: Request | None = field(default=None, repr=False, compare=False)

    @property
    def chunks(self) -> int:
        return math.ceil(self.points / self.points_per_chunk) * math.ceil(
            self.directions / self.directions_per_pass
        )

    @property
    def predicted(self) -> str:
        """The engines auto mode weighed with their predicted times, cheapest first, as ``--verbose``
        prints them (``"taylor forward 4 ms, torch.func reverse 500 ms"``; ``""`` where none were weighed)."""
        return ", ".join(f"{name} {seconds_text(s)}" for name, s in sorted(self.estimates, key=lambda e: e[1]))

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "mode": self.mode,
            "estimator": self.estimator,
            "per_sample": self.per_sample,
            "points": self.points,
            "directions_per_point": self.directions,
            "points_per_chunk": self.points_per_chunk,
            "directions_per_pass": self.directions_per_pass,
            "passes": self.chunks,
            "result_shape": list(self.result_shape),
            "result_bytes": self.result_bytes,
            "peak_bytes_estimate": self.peak_bytes,
            "available_bytes": self.available_bytes,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "engine": self.engine,
            "engine_note": self.engine_note,
            "world_size": self.world_size,
            "estimated_seconds": {name: float(f"{s:.4g}") for name, s in self.estimates},
            "compiled": self.compiled,
        }


def _result_shape(kind: str, p: Problem, estimator: str) -> tuple[int, ...]:
    """The user-facing shape of the whole result (all differentiated inputs together)."""
    k = kind_of(kind)
    lead = (p.n,) if p.per_sample else ()
    flat_in = (p.n_in,) if len(p.in_shapes) > 1 else p.in_shapes[0]
    out = () if k.square else p.out_shape  # a trace of a square Jacobian has no output axes
    return lead + out + flat_in * k.order


def strategy_key(kind: str, estimator: str, mode: str) -> tuple[str, str]:
    return ("hutchinson" if estimator == "hutchinson" else kind, mode)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UsageError("unknown mode", expected="one of " + ", ".join(MODES), got=str(mode))


#: ops whose second derivative by forward over forward mode is wrong in PyTorch (their
#: forward-mode formulas treat the saved mean and 1/σ as constants): measured on torch
#: 2.13, layer_norm's Laplacian by ``jvp(jvp)`` is off by O(1) while ``jvp(vjp)`` is exact
FORWARD_OVER_FORWARD_WRONG = frozenset({"native_layer_norm", "native_batch_norm", "_native_batch_norm_legit"})


#: the engines auto mode weighs, in the order that breaks ties (Taylor first: no tape, one
#: pass for all directions)
_CANDIDATES = (("taylor", "forward"), ("taylor", "reverse"), ("torch.func", "forward"), ("torch.func", "reverse"))


def fast_path_applies(p: Problem) -> bool:
    """Whether the Taylor engine can take ``p``: one per-sample input, no static batch size."""
    return FAST_PATH and p.per_sample and len(p.args.values) == 1 and p.static_batch is None


def estimates(kind: str, p: Problem, estimator: str, probes: int) -> dict[tuple[str, str], float]:
    """Predicted seconds of every (engine, mode) that can run the request, in
    :data:`_CANDIDATES` order (the cost model is :data:`.costs.COSTS`)."""
    out = {}
    for engine, mode in _CANDIDATES:
        if engine == "taylor" and not fast_path_applies(p):
            continue
        if (engine, mode) == ("torch.func", "forward") and _forward_wrong(kind, p):
            continue
        record = strategy_key(kind, estimator, mode)[0]
        if record not in COSTS[(engine, mode)]:  # the Taylor engine's reverse mode makes Hessians only
            continue
        out[(engine, mode)] = estimate_seconds(
            record, engine, mode, n_in=p.n_in, n_out=p.n_out,
            points=p.n, seconds_per_point=point_seconds(p.flops, p.device.type), probes=int(probes),
        )  # fmt: skip
    return out


def cheapest(costs: dict[tuple[str, str], float], engine: str | None = None) -> tuple[str, str]:
    """The cheapest (engine, mode) of ``costs`` (of ``engine`` only, when given)."""
    pool = {k: v for k, v in costs.items() if engine is None or k[0] == engine}
    return min(pool, key=pool.__getitem__)


def _forward_wrong(kind: str, p: Problem) -> bool:
    """Second derivatives through an op whose forward-over-forward rule is wrong in torch."""
    return kind_of(kind).taylor_order == 2 and bool(p.ops & FORWARD_OVER_FORWARD_WRONG)


def make_plan(kind: str, p: Problem, mode: str, estimator: str, probes: int, chunk_size) -> Plan:
    """The torch.func plan; ``mode="auto"`` takes the cheaper of its forward and reverse modes."""
    resolved = cheapest(estimates(kind, p, estimator, probes), "torch.func")[1] if mode == "auto" else mode
    if resolved == "forward" and _forward_wrong(kind, p):
        resolved = "reverse"  # forward over reverse: right where forward over forward is not
    key = strategy_key(kind, estimator, resolved)
    strategy = STRATEGIES[key]
    n_dirs = count_directions(strategy.directions, p, probes)
    shape = _result_shape(kind, p, estimator)
    itemsize = torch.empty((), dtype=p.dtype).element_size()
    result_bytes = math.prod(shape) * itemsize
    available = memory_available(p.device)
    budget = working_budget(p.device, available)
    per_point_dir = max(p.act_bytes, 1.0) * _MEMORY_FACTOR[(kind_of(kind).taylor_order, resolved)] * strategy.width(p)
    row_bytes = math.prod(strategy.result_shape(p)) * itemsize
    if p.per_sample:
        if chunk_size is not None:
            ppc = int(chunk_size)
            dpp = max(1, min(n_dirs, int(budget // max(per_point_dir * ppc, 1))))
        else:
            dpp = max(1, min(n_dirs, int(budget // (per_point_dir * min(p.n, 64)))))
            ppc = int(budget // (per_point_dir * dpp + p.act_bytes + row_bytes))
        ppc = max(1, min(ppc, p.n))
        if p.static_batch is not None:
            ppc = p.static_batch
    else:
        ppc = 1
        dpp = int(chunk_size) if chunk_size is not None else int(budget // per_point_dir)
        dpp = max(1, min(dpp, n_dirs))
    if chunk_size is not None and int(chunk_size) < 1:
        raise UsageError("chunk size must be positive", got=str(chunk_size))
    working = per_point_dir * dpp * ppc + p.act_bytes * ppc + row_bytes * ppc
    return Plan(
        kind=kind,
        mode=resolved,
        estimator=estimator,
        per_sample=p.per_sample,
        points=p.n,
        directions=n_dirs,
        points_per_chunk=ppc,
        directions_per_pass=dpp,
        result_shape=shape,
        result_bytes=int(result_bytes),
        peak_bytes=int(result_bytes + working),
        available_bytes=int(available),
        dtype=p.dtype,
        device=p.device,
    )


def check_preconditions(kind: str, p: Problem, estimator: str, probes: int) -> None:
    if estimator not in ESTIMATORS:
        raise UsageError("unknown estimator", expected="one of " + ", ".join(ESTIMATORS), got=estimator)
    if estimator == "hutchinson":
        if "estimator" not in kind_of(kind).options:
            raise UsageError("the hutchinson estimator is for divergence only", got=kind)
        if int(probes) < 2:
            raise UsageError("hutchinson needs at least 2 probes for a standard error", got=str(probes))
    if kind_of(kind).square:
        if len(p.wrt) != 1:
            raise UsageError("divergence is taken with respect to one input", got=str(len(p.wrt)))
        if p.out_shape != p.in_shapes[0]:
            raise ModelError(
                "divergence needs a square Jacobian: output and input shapes per point must match",
                where=p.where,
                expected=f"output {shape_str(p.in_shapes[0])} per point",
                got=shape_str(p.out_shape),
            )




def check_fits(plan: Plan, p: Problem, *, in_memory: bool = True) -> None:
    """Refuse a result that cannot fit in memory (one streamed to disk needs only its chunks)."""
    if in_memory and plan.result_bytes > 0.9 * plan.available_bytes:
        if not p.per_sample and p.n_in > 1:
            hint = "pass per_sample=True if axis 0 holds independent points"
            cli = "pass --per-sample if axis 0 holds independent points"
        elif p.per_sample:
            hint = "stream it to disk: save='FILE.npy' (or .safetensors) writes it chunk by chunk"
            cli = "stream it to disk: --save FILE.npy (or .safetensors) writes it chunk by chunk"
        else:
            hint = cli = "use a smaller input or a divergence/laplacian instead of the full matrix"
        raise ResourceError(
            f"the result would not fit in memory ({str(p.dtype).removeprefix('torch.')} "
            f"{shape_str(plan.result_shape)})",
            expected=f"at most {format_bytes(0.9 * plan.available_bytes)} available on {p.device}",
            got=format_bytes(plan.result_bytes),
            hint=hint,
            cli_hint=cli,
        )


# Forward-mode requests on one per-sample input run through jaccli.jets: the model is
# traced once and its value, first- and second-order streams go through it together
# (one matrix product per layer for all of them) instead of torch.func's vmap over jvp.
# Everything else (several inputs, reverse mode, an op without a Taylor rule) runs the
# torch.func strategies above, unchanged; the plan says which engine ran and why.

#: JACCLI_FAST_PATH=0 in the environment turns the Taylor path off (to compare or rule it out)
FAST_PATH = os.environ.get("JACCLI_FAST_PATH", "1") != "0"

#: on CPU a pass's working set is kept near cache size: more points per pass only
#: stream the same matrices through memory again (GPUs want big passes instead)
_CACHE_BYTES = 8 * _MIB
_MIN_POINTS = 64
#: the Hessian by adjoints pays a fixed cost per pass (its reverse sweep vmapped over the
#: outputs, a few ms on a transformer: the encoder's took 203 ms in passes of 32 points, 65
#: in one of 512), so its passes may hold more: per-sample Hessians of 512 points, float32,
#: one thread (2026-12-07): encoder 78.7 -> 64.8 ms, GPT-2 32.4 -> 27.3, BERT 32.2 -> 26.1,
#: depthwise CNN 88.6 -> 83.0; the CNNs whose points need ~1 MB stay at _MIN_POINTS
_ADJOINT_CACHE_BYTES = 32 * _MIB


def _taylor_kind(kind: str, estimator: str) -> str:
    return "jvp" if estimator == "hutchinson" else kind


def taylor_program(kind: str, p: Problem, mode: str) -> tuple[taylor.TaylorProgram | None, str | None]:
    """The traced program where the fast path applies; else None and why (None if never tried).

    The fast path is forward mode (forward-over-forward for second derivatives), so it
    is tried only where that mode was asked for or auto mode picks it (``mode`` is
    then "forward"), on one per-sample input without a static batch size.
    """
    if not (mode == "forward" and fast_path_applies(p)):
        return None, None
    try:
        return program_for(p, kind_of(kind).taylor_order), None
    except taylor.Unsupported as exc:
        return None, f"Taylor path not used: {exc}"


def taylor_plan(kind: str, p: Problem, program: taylor.TaylorProgram, estimator: str, probes: int,
                 chunk_size, estimates: tuple[tuple[str, float], ...] = (), mode: str = "forward") -> Plan:  # fmt: skip
    """Points per pass and directions per pass from the program's own memory estimate;
    ``estimates`` go into the plan. The last plan is kept on the program itself
    (``program._plan``: it lives and dies with it), keyed by everything else it is made
    from: a model called again with the same request and the same memory figures gets the
    same plan without the arithmetic and the dataclass (0.03-0.05 ms a call)."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise UsageError("chunk size must be positive", got=str(chunk_size))
        chunk_size = int(chunk_size)  # an int keys the kept plan whatever type it came as
    available = memory_available(p.device)  # read once (and at most every MEMINFO_EVERY s)
    budget = working_budget(p.device, available)
    key = (kind, mode, estimator, probes, chunk_size, p.n, p.per_sample, p.in_shapes, p.out_shape, p.dtype,
           p.device, available, budget, _CACHE_BYTES, _ADJOINT_CACHE_BYTES, _MIN_POINTS, estimates)  # fmt: skip
    kept = program._plan
    if kept is not None and kept[0] == key:
        return kept[1]
    plan = _make_taylor_plan(kind, p, program, estimator, probes, chunk_size, available, budget, estimates, mode)
    program._plan = (key, plan)
    return plan


def _make_taylor_plan(kind: str, p: Problem, program: taylor.TaylorProgram, estimator: str, probes: int,
                      chunk_size, available: int, budget: int, estimates: tuple, mode: str = "forward") -> Plan:  # fmt: skip
    tkind = _taylor_kind(kind, estimator)
    adjoints = mode == "reverse"  # the Hessian by adjoints: every first-order row in one pass
    n_dirs = p.n_in if adjoints else {"jvp": int(probes), "hessian": p.n_in * (p.n_in + 1) // 2}.get(tkind, p.n_in)
    shape = _result_shape(kind, p, estimator)
    itemsize = torch.empty((), dtype=p.dtype).element_size()
    result_bytes = math.prod(shape) * itemsize
    row_bytes = 16 if tkind == "jvp" else math.prod(shape[1:]) * itemsize

    def per_point(directions: int) -> int:
        if adjoints:
            return taylor.adjoint.bytes_per_point(program) + row_bytes
        return program.bytes_per_point(tkind, directions) + row_bytes

    lead = int(chunk_size) if chunk_size is not None else min(p.n, _MIN_POINTS)
    dpp = n_dirs
    while not adjoints and dpp > 1 and per_point(dpp) * lead > budget:
        dpp = math.ceil(dpp / 2)
    if chunk_size is not None:
        ppc = int(chunk_size)
    else:
        ppc = budget // per_point(dpp)
        if p.device.type == "cpu":
            ppc = min(ppc, max(_MIN_POINTS, (_ADJOINT_CACHE_BYTES if adjoints else _CACHE_BYTES) // per_point(dpp)))
    ppc = max(1, min(ppc, p.n))
    return Plan(
        kind=kind,
        mode=mode,
        estimator=estimator,
        per_sample=True,
        points=p.n,
        directions=n_dirs,
        points_per_chunk=ppc,
        directions_per_pass=dpp,
        result_shape=shape,
        result_bytes=int(result_bytes),
        peak_bytes=int(result_bytes + ppc * per_point(dpp)),
        available_bytes=int(available),
        dtype=p.dtype,
        device=p.device,
        engine="taylor",
        estimates=estimates,
    )


def seconds_text(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"
