"""Planning: mode, memory budget, chunk sizes and the engine (Taylor or torch.func).

Owns :class:`Plan` (what a request will do, shown by ``--dry-run``), the memory budget
of one pass, the refusal of results that cannot fit, and the choice between the Taylor
fast path (:mod:`jaccli.jets`, forward-mode requests on one per-sample input) and
the torch.func strategies. A plan carries the normalised request it was made for, so
that computing it probes and traces the model no second time.

Imports: torch, :mod:`jaccli.jets`, :mod:`.problem`, :mod:`.strategies`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from jaccli import jets as taylor
from jaccli.errors import format_bytes, ModelError, ResourceError, shape_str, UsageError
from jaccli.engine.programs import program_for
from jaccli.engine.problem import Problem, arg_names, check_inputs, normalise_args
from jaccli.request.choices import ESTIMATORS, KINDS, MODES
from jaccli.engine.strategies import STRATEGIES, auto_mode, count_directions, mode_costs

_MIB = 2**20

#: working-memory multiple of one forward pass, per point and direction (empirical)
_MEMORY_FACTOR = {
    ("jacobian", "forward"): 2.0,
    ("jacobian", "reverse"): 3.0,
    ("divergence", "forward"): 2.0,
    ("divergence", "reverse"): 3.0,
    ("hessian", "forward"): 4.0,
    ("hessian", "reverse"): 6.0,
    ("laplacian", "forward"): 4.0,
    ("laplacian", "reverse"): 6.0,
    ("hessian", "reverse-only"): 8.0,
    ("laplacian", "reverse-only"): 8.0,
}


def memory_available(device: torch.device) -> int:
    """Bytes the machine (or GPU) can still hand out."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def working_budget(device: torch.device) -> int:
    """Bytes one pass may use: a quarter of what is free, at most 2 GiB on CPU.

    Larger passes gain nothing on CPU (the products are already long matrix
    multiplications) and leave the machine unusable; GPUs want big passes.
    """
    free = memory_available(device)
    cap = free // 2 if device.type == "cuda" else 2 * 2**30
    return max(64 * _MIB, min(free // 4, cap))


#: the options of a request and their defaults (the public functions' keywords)
REQUEST_DEFAULTS: dict[str, Any] = {
    "wrt": None,
    "per_sample": False,
    "mode": "auto",
    "chunk_size": None,
    "output": None,
    "estimator": "exact",
    "probes": 16,
    "check_batch": True,
    "strict": False,
}


class Request(NamedTuple):
    """What a plan was made for: the normalised problem, the Taylor program, the options."""

    problem: Problem
    program: taylor.TaylorProgram | None
    options: dict[str, Any]


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
    #: the normalised request and traced program, so that computing the plan needs no
    #: second probe or trace (see :func:`prepare` and :func:`reuse`)
    _request: Request | None = field(default=None, repr=False, compare=False)

    @property
    def chunks(self) -> int:
        return math.ceil(self.points / self.points_per_chunk) * math.ceil(
            self.directions / self.directions_per_pass
        )

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
        }


def _result_shape(kind: str, p: Problem, estimator: str) -> tuple[int, ...]:
    """The user-facing shape of the whole result (all differentiated inputs together)."""
    lead = (p.n,) if p.per_sample else ()
    flat_in = (p.n_in,) if len(p.in_shapes) > 1 else p.in_shapes[0]
    return {
        "jacobian": lead + p.out_shape + flat_in,
        "hessian": lead + p.out_shape + flat_in + flat_in,
        "laplacian": lead + p.out_shape,
        "divergence": lead,
    }[kind]


def strategy_key(kind: str, estimator: str, mode: str) -> tuple[str, str]:
    return ("hutchinson" if estimator == "hutchinson" else kind, mode)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UsageError("unknown mode", expected="one of " + ", ".join(MODES), got=str(mode))


#: ops whose second derivative by forward over forward mode is wrong in PyTorch (their
#: forward-mode formulas treat the saved mean and 1/σ as constants): measured on torch
#: 2.13, layer_norm's Laplacian by ``jvp(jvp)`` is off by O(1) while ``jvp(vjp)`` is exact
FORWARD_OVER_FORWARD_WRONG = frozenset({"native_layer_norm", "native_batch_norm", "_native_batch_norm_legit"})


def make_plan(kind: str, p: Problem, mode: str, estimator: str, probes: int, chunk_size) -> Plan:
    resolved = auto_mode(kind, p.n_in, p.n_out) if mode == "auto" else mode
    if kind in ("hessian", "laplacian") and resolved == "forward" and p.ops & FORWARD_OVER_FORWARD_WRONG:
        resolved = "reverse"  # forward over reverse: right where forward over forward is not
    key = strategy_key(kind, estimator, resolved)
    strategy = STRATEGIES[key]
    n_dirs = count_directions(strategy.directions, p, probes)
    shape = _result_shape(kind, p, estimator)
    itemsize = torch.empty((), dtype=p.dtype).element_size()
    result_bytes = math.prod(shape) * itemsize
    available = memory_available(p.device)
    budget = working_budget(p.device)
    per_point_dir = max(p.act_bytes, 1.0) * _MEMORY_FACTOR[(kind, resolved)]
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
        if kind != "divergence":
            raise UsageError("the hutchinson estimator is for divergence only", got=kind)
        if int(probes) < 2:
            raise UsageError("hutchinson needs at least 2 probes for a standard error", got=str(probes))
    if kind == "divergence":
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
            hint = "pass per_sample=True (--per-sample) if axis 0 holds independent points"
        elif p.per_sample:
            hint = ("stream it to disk: --save FILE.npy (or .safetensors) writes it chunk by chunk "
                    "(save= in Python)")
        else:
            hint = "use a smaller input or a divergence/laplacian instead of the full matrix"
        raise ResourceError(
            f"the result would not fit in memory ({str(p.dtype).removeprefix('torch.')} "
            f"{shape_str(plan.result_shape)})",
            expected=f"at most {format_bytes(0.9 * plan.available_bytes)} available on {p.device}",
            got=format_bytes(plan.result_bytes),
            hint=hint,
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
    is tried only where that mode was asked for or auto mode picks it, on one
    per-sample input without a static batch size.
    """
    resolved = auto_mode(kind, p.n_in, p.n_out) if mode == "auto" else mode
    eligible = p.per_sample and resolved == "forward" and len(p.args.values) == 1
    if not (FAST_PATH and eligible and p.static_batch is None):
        return None, None
    try:
        return program_for(p, 2 if kind in ("hessian", "laplacian") else 1), None
    except taylor.Unsupported as exc:
        return None, f"Taylor path not used: {exc}"


def _taylor_plan(kind: str, p: Problem, program: taylor.TaylorProgram, estimator: str, probes: int,
                 chunk_size) -> Plan:  # fmt: skip
    """Points per pass and directions per pass from the program's own memory estimate."""
    if chunk_size is not None and int(chunk_size) < 1:
        raise UsageError("chunk size must be positive", got=str(chunk_size))
    tkind = _taylor_kind(kind, estimator)
    n_dirs = {"jvp": int(probes), "hessian": p.n_in * (p.n_in + 1) // 2}.get(tkind, p.n_in)
    shape = _result_shape(kind, p, estimator)
    itemsize = torch.empty((), dtype=p.dtype).element_size()
    result_bytes = math.prod(shape) * itemsize
    row_bytes = 16 if tkind == "jvp" else math.prod(shape[1:]) * itemsize
    budget = working_budget(p.device)

    def per_point(directions: int) -> int:
        return program.bytes_per_point(tkind, directions) + row_bytes

    lead = int(chunk_size) if chunk_size is not None else min(p.n, _MIN_POINTS)
    dpp = n_dirs
    while dpp > 1 and per_point(dpp) * lead > budget:
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
        mode="forward",
        estimator=estimator,
        per_sample=True,
        points=p.n,
        directions=n_dirs,
        points_per_chunk=ppc,
        directions_per_pass=dpp,
        result_shape=shape,
        result_bytes=int(result_bytes),
        peak_bytes=int(result_bytes + ppc * per_point(dpp)),
        available_bytes=int(memory_available(p.device)),
        dtype=p.dtype,
        device=p.device,
        engine="taylor",
    )


def choose_plan(kind: str, p: Problem, mode: str, estimator: str, probes: int,
                 chunk_size) -> tuple[Plan, taylor.TaylorProgram | None]:  # fmt: skip
    """The Taylor plan and program where the fast path applies, else the torch.func plan."""
    program, why_not = _taylor_program(kind, p, mode)
    if program is not None:
        return _taylor_plan(kind, p, program, estimator, probes, chunk_size), program
    plan = make_plan(kind, p, mode, estimator, probes, chunk_size)
    if why_not is None and mode == "auto" and plan.mode == "reverse" and p.per_sample:
        why_not = _why_reverse(kind, p)
    return (replace(plan, engine_note=why_not) if why_not else plan), None


def _why_reverse(kind: str, p: Problem) -> str:
    """What auto mode weighed when it chose reverse mode (so the fast path, forward mode, was not tried)."""
    fwd, rev = mode_costs(kind, p.n_in, p.n_out)
    return (f"reverse mode: {rev:,} products per point against {fwd:,} in forward mode "
            f"({p.n_in:,} inputs, {p.n_out:,} outputs); --mode forward takes the Taylor fast path")


def prepare(kind: str, f: Callable, x, options: dict[str, Any]) -> Plan:
    """Normalise and probe the request once and plan it; the plan carries the request."""
    if kind not in KINDS:
        raise UsageError("unknown derivative", expected="one of " + ", ".join(KINDS), got=kind)
    o = {**REQUEST_DEFAULTS, **options}
    check_mode(o["mode"])
    p = check_inputs(
        f, x, wrt=o["wrt"], per_sample=o["per_sample"], output=o["output"],
        check_batch=o["check_batch"], strict=o["strict"],
    )  # fmt: skip
    check_preconditions(kind, p, o["estimator"], o["probes"])
    plan, program = choose_plan(kind, p, o["mode"], o["estimator"], o["probes"], o["chunk_size"])
    return replace(plan, _request=Request(p, program, o))


def reuse(plan: Plan, kind: str, f: Callable, x, options: dict[str, Any]) -> Request:
    """The request ``plan`` was made for, once it is sure to be this one.

    Options left at their defaults are taken from the plan; any other must agree with it.
    """
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
    for name, value in options.items():
        if value != REQUEST_DEFAULTS[name] and value != request.options[name]:
            raise UsageError(
                f"{name}={value!r} differs from the plan's {name}={request.options[name]!r}"
            )
    return request
