"""Auto mode's choice of engine, and a request's way in: :func:`prepare` normalises and
probes a request once and plans it (:func:`choose_plan`), :func:`reuse` takes a plan made
for it.

Owns what auto weighs beyond :mod:`.planner`'s predictions: the adjoints' n² term (known
once the Taylor program is), the clock where two candidates are predicted close
(:mod:`.measure`: the two Taylor Hessians, and the Taylor pick against torch.func's reverse
mode), and the fall-backs where the adjoints do not serve a model. :mod:`.planner` sizes the
plan of whichever engine is chosen.

Imports: :mod:`jaccli.jets`, :mod:`jaccli.request`, :mod:`.problem`, :mod:`.programs`,
:mod:`.measure`, :mod:`.costs`, :mod:`.planner`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from jaccli import jets as taylor
from jaccli.errors import UsageError
from jaccli.engine import costs as cost_model
from jaccli.engine import measure
from jaccli.engine.costs import point_seconds
from jaccli.engine.planner import (
    PLANNED_FIELDS, Plan, Request, seconds_text, taylor_plan, taylor_program, check_mode, check_preconditions,
    cheapest, estimates, make_plan,
)  # fmt: skip
from jaccli.engine.problem import Problem, arg_names, check_inputs, normalise_args
from jaccli.engine.programs import adjoint_agrees, settle
from jaccli.request.choices import KINDS
from jaccli.request.spec import Derivative, Selection


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
    program, why_not = taylor_program(kind, p, "forward" if wanted else mode)
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
            pl = taylor_plan(kind, p, program, estimator, probes, chunk_size, shown, m)
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
            def passes(mode: str = pick[1]) -> tuple[measure.Pass, measure.Pass]:  # one of each plan's
                mine = taylor_plan(kind, p, program, estimator, probes, chunk_size, shown, mode)
                theirs = make_plan(kind, p, "reverse", estimator, probes, chunk_size)
                return (measure.taylor_pass(kind, p, program, mode, mine.points_per_chunk, mine.directions_per_pass),
                        measure.func_pass(kind, p, probes, theirs.points_per_chunk, theirs.directions_per_pass))

            predicted = pick if best[0] == "taylor" else best
            chosen, timed = measure.against_func(program, p, kind, pick, predicted, passes, chunk_size)
            if chosen[0] == "taylor":
                note = timed if note is None else f"{note}; {timed}"
            else:
                pick, func_mode, why_not = None, "reverse", f"Taylor path not used: {timed}"
        elif best[0] != "taylor":
            pick = None
    if pick is not None:
        plan = taylor_plan(kind, p, program, estimator, probes, chunk_size, shown, pick[1])
        return (plan if note is None else replace(plan, engine_note=note)), program
    plan = make_plan(kind, p, func_mode, estimator, probes, chunk_size)
    if why_not is None and mode == "auto" and ("taylor", "forward") in costs:
        why_not = _why_not_taylor(p, plan.mode, costs)
    return replace(plan, engine_note=why_not, estimates=shown), None


def _why_not_taylor(p: Problem, mode: str, costs: dict[tuple[str, str], float]) -> str:
    """What auto mode weighed when it chose torch.func over the Taylor fast path."""
    return (f"{mode} mode: {seconds_text(costs[('torch.func', mode)])} predicted against "
            f"{seconds_text(costs[('taylor', 'forward')])} by the Taylor fast path ({_count(p.n_in, 'input')}, "
            f"{_count(p.n_out, 'output')}, {_count(p.n, 'point')}); --mode forward takes the fast path")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


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
