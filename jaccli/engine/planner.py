"""Planning: mode, memory budget, chunk sizes and the engine (Taylor or torch.func).

Owns :class:`Plan` (what a request will do, shown by ``--dry-run``), the chunks that fit
the memory budget of one pass (:mod:`.memory`'s), the refusal of results that cannot fit,
the plans kept for kept programs, and the choice between the Taylor
fast path (:mod:`jaccli.jets`, forward-mode requests on one per-sample input) and
the torch.func strategies. A plan carries the normalised request it was made for, so
that computing it probes and traces the model no second time.

Imports: torch, :mod:`jaccli.jets`, :mod:`.problem`, :mod:`.probe`, :mod:`.programs`, :mod:`.strategies`,
:mod:`.costs`, :mod:`.memory` (what the machine can hand out, what one pass may use).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from collections.abc import Callable
from typing import NamedTuple

import torch

from jaccli import jets as taylor
from jaccli.errors import format_bytes, ModelError, ResourceError, shape_str, UsageError
from jaccli.engine.programs import adjoint_agrees, program_for, settle
from jaccli.engine.problem import Problem, arg_names, check_inputs, normalise_args
from jaccli.request.choices import ESTIMATORS, KINDS, MODES
from jaccli.request.kinds import kind as kind_of
from jaccli.request.spec import Derivative, Selection
from jaccli.engine import measure
from jaccli.engine import costs as cost_model
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
    #: second probe or trace (see :func:`prepare` and :func:`reuse`)
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
        return ", ".join(f"{name} {_seconds(s)}" for name, s in sorted(self.estimates, key=lambda e: e[1]))

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


def _taylor_kind(kind: str, estimator: str) -> str:
    return "jvp" if estimator == "hutchinson" else kind


def _taylor_program(kind: str, p: Problem, mode: str) -> tuple[taylor.TaylorProgram | None, str | None]:
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


def _taylor_plan(kind: str, p: Problem, program: taylor.TaylorProgram, estimator: str, probes: int,
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
           p.device, available, budget, _CACHE_BYTES, _MIN_POINTS, estimates)  # fmt: skip
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
            ppc = min(ppc, max(_MIN_POINTS, _CACHE_BYTES // per_point(dpp)))
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


#: the widest input of the cases the adjoints' cost record was fitted on (:data:`.costs.COSTS`)
_ADJOINT_FIT_INPUTS = 32


def choose_plan(kind: str, p: Problem, mode: str, estimator: str, probes: int,
                 chunk_size) -> tuple[Plan, taylor.TaylorProgram | None]:  # fmt: skip
    """The Taylor plan and program where the fast path applies and is wanted (asked for
    with forward mode, or cheapest in auto mode), else the torch.func plan."""
    costs = estimates(kind, p, estimator, probes)
    best = cheapest(costs) if mode == "auto" else ("taylor", mode)
    # with torch.func started, a Taylor mode predicted near its reverse mode is timed against it
    rival = (mode == "auto" and bool(measure.FUNC_WITHIN) and estimator != "hutchinson" and cost_model.torch_func_started()
             and any(measure.rivals(costs, k) for k in costs if k[0] == "taylor"))  # fmt: skip
    wanted = best[0] == "taylor" and best in costs or mode == "forward" or rival
    program, why_not = _taylor_program(kind, p, "forward" if wanted else mode)
    note = None
    record = dict(costs)  # before the adjoints' n² term: the two Taylor Hessians' timing weighs these
    beyond = max(0.0, 1.0 - (_ADJOINT_FIT_INPUTS / p.n_in) ** 2)
    if program is not None and beyond and mode in ("auto", "reverse") and ("taylor", "reverse") in costs:
        # the adjoints' contractions grow as n² times the activations, which their record
        # (fitted on inputs up to _ADJOINT_FIT_INPUTS, where it absorbs them) leaves out:
        # known once the program is
        contractions = taylor.adjoint.contraction_flops(program) * beyond
        extra = p.n * point_seconds(2 * contractions, p.device.type)
        costs[("taylor", "reverse")] += extra
        others = {k: v for k, v in costs.items() if k[1] == "reverse" and k[0] != "taylor"}
        if mode == "auto":
            best = cheapest(costs)
        elif others and extra > min(others.values()):
            # asked for reverse mode, the adjoints run it unless their n² term alone costs more
            # than forward over reverse does in all (as on a 3,072-input CNN)
            best = cheapest(others)
            why_not = (f"Taylor reverse mode not used: the Hessian by adjoints' contractions ({p.n_in:,} inputs "
                       f"squared times the activations) predict {costs[('taylor', 'reverse')]:.3g} s against "
                       f"{others[best]:.3g} s by torch.func reverse mode")  # fmt: skip
    shown = tuple((f"{e} {m}", s) for (e, m), s in costs.items())
    # the Taylor engine's own pick: its cheaper mode in auto mode, else the mode asked for (none
    # where the fast path does not apply, torch.func is cheaper by far, or the adjoints' n² term
    # sent reverse mode to torch.func)
    if program is None or best[0] != "taylor" and (mode != "auto" or not rival):
        pick = None
    else:
        pick = cheapest(costs, "taylor") if mode == "auto" else best
        if best[0] != "taylor" and not measure.rivals(costs, pick):
            pick = None  # torch.func's lead grew past timing (the adjoints' n² term): nothing to time
    if pick is not None and mode == "auto" and (best[0] == "taylor" or rival) and measure.ambiguous(record):
        # the two Taylor Hessians predicted close (by their records: the n² term does not
        # make the forward Hessian cheaper): the clock decides between them
        def chunk(m: str) -> tuple[int, int]:  # one pass of the plan of mode m
            pl = _taylor_plan(kind, p, program, estimator, probes, chunk_size, shown, m)
            return pl.points_per_chunk, pl.directions_per_pass

        taylor_mode, note = measure.hessian_mode(program, p, pick[1], chunk, chunk_size)
        pick = ("taylor", taylor_mode)
    if pick is not None and pick[1] == "reverse" and not adjoint_agrees(program, p):
        why_not = ("Taylor reverse mode not used: the Hessian by adjoints does not serve this model (a nonlinear "
                   "step's points cannot be told apart by its shape, it disagreed with the forward Hessian on "
                   "the probe points, or inference mode is on)")  # fmt: skip
        # auto: the next cheapest engine, the forward Hessian on this very program where it is that
        nxt = cheapest({k: v for k, v in costs.items() if k != pick}) if mode == "auto" else None
        if best == pick:
            best = nxt or best
        pick, note = (nxt, why_not) if nxt == ("taylor", "forward") else (None, None)
    func_mode = mode
    if mode == "auto" and pick is not None:
        if rival and measure.rivals(costs, pick):  # predicted near torch.func's reverse mode: the clock decides
            mine = _taylor_plan(kind, p, program, estimator, probes, chunk_size, shown, pick[1])
            theirs = make_plan(kind, p, "reverse", estimator, probes, chunk_size)
            chosen, timed = measure.against_func(
                program, p, kind, pick, pick if best[0] == "taylor" else best,
                measure.taylor_pass(kind, p, program, pick[1], mine.points_per_chunk, mine.directions_per_pass),
                measure.func_pass(kind, p, probes, theirs.points_per_chunk, theirs.directions_per_pass),
                chunk_size,
            )  # fmt: skip
            if chosen[0] == "taylor":
                note = timed if note is None else f"{note}; {timed}"
            else:
                pick, func_mode, why_not = None, "reverse", f"Taylor path not used: {timed}"
        elif best[0] != "taylor":
            pick = None
    if pick is not None:
        plan = _taylor_plan(kind, p, program, estimator, probes, chunk_size, shown, pick[1])
        return (plan if note is None else replace(plan, engine_note=note)), program
    plan = make_plan(kind, p, func_mode, estimator, probes, chunk_size)
    if why_not is None and mode == "auto" and ("taylor", "forward") in costs:
        why_not = _why_not_taylor(p, plan.mode, costs)
    return replace(plan, engine_note=why_not, estimates=shown), None


def _why_not_taylor(p: Problem, mode: str, costs: dict[tuple[str, str], float]) -> str:
    """What auto mode weighed when it chose torch.func over the Taylor fast path."""
    return (f"{mode} mode: {_seconds(costs[('torch.func', mode)])} predicted against "
            f"{_seconds(costs[('taylor', 'forward')])} by the Taylor fast path ({_count(p.n_in, 'input')}, "
            f"{_count(p.n_out, 'output')}, {_count(p.n, 'point')}); --mode forward takes the fast path")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def prepare(d: Derivative, f: Callable, x) -> Plan:
    """Normalise and probe the request once and plan it; the plan carries the request."""
    kind = d.kind.name
    if not d.kind.planned:
        raise UsageError("unknown derivative", expected="one of " + ", ".join(KINDS), got=kind)
    check_mode(d.mode)
    p = check_inputs(
        f, x, wrt=d.wrt, per_sample=d.per_sample, output=d.output, check_batch=d.check_batch, strict=d.strict,
        select=d.select, defer_batch=True,
    )  # fmt: skip
    check_preconditions(kind, p, d.estimator, d.probes)
    plan, program = choose_plan(kind, p, d.mode, d.estimator, d.probes, d.chunk_size)
    settle(p, program, d.kind.taylor_order)
    return replace(plan, _request=Request(p, program, d))


def reuse(plan: Plan, d: Derivative, f: Callable, x) -> Request:
    """The request ``plan`` was made for, once it is sure to be ``d``.

    Fields of ``d`` left at their defaults are taken from the plan; any other must agree with it.
    """
    kind = d.kind.name
    request = plan._request if isinstance(plan, Plan) else None
    if request is None:
        raise UsageError("plan= takes a Plan made by jaccli.plan", got=type(plan).__name__)
    if plan.kind != kind:
        raise UsageError(f"the plan is for a {plan.kind}, not a {kind}")
    p = request.problem
    values = normalise_args(x, arg_names(f)).values if f is p.module else None
    if values is None or len(values) != len(p.args.values) or any(
        a is not b for a, b in zip(values, p.args.values)
    ):
        raise UsageError("the plan was made for another model or other input tensors", hint="plan again")
    default, planned = Derivative(d.kind), request.derivative
    for name in PLANNED_FIELDS:
        value, fixed = getattr(d, name), getattr(planned, name)
        if value != getattr(default, name) and value != fixed:
            shown = (lambda v: v.text if isinstance(v, Selection) else v)  # noqa: E731
            raise UsageError(f"{name}={shown(value)!r} differs from the plan's {name}={shown(fixed)!r}")
    return request
