"""Auto mode's choice of engine, and a request's way in: :func:`prepare` normalises and
probes a request once and plans it (:func:`choose_plan`), :func:`reuse` takes a plan made
for it.

Owns what auto (and a forced reverse mode) weighs beyond :mod:`.planner`'s predictions: the
adjoints' n² term (known once the Taylor program is), the Taylor engine's own pick, the clock
where two candidates are predicted close (:mod:`.measure`: the two Taylor Hessians, and the
Taylor pick against torch.func's reverse mode), and the fall-back where the adjoints do not
serve a model; run as the stages of :data:`_STAGES` over the request's :class:`_Weighing`.
:mod:`.planner` sizes the plan of whichever engine is chosen.

Imports: :mod:`jaccli.jets`, :mod:`jaccli.request`, :mod:`jaccli.errors`, :mod:`.problem`,
:mod:`.programs`, :mod:`.measure`, :mod:`.costs`, :mod:`.planner`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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


#: why the adjoints, once picked (predicted, timed or asked for), were not run
_ADJOINTS_REFUSED = ("Taylor reverse mode not used: the Hessian by adjoints does not serve this model (a nonlinear "
                     "step's points cannot be told apart by its shape, it disagreed with the forward Hessian on "
                     "the probe points, or inference mode is on)")  # fmt: skip


@dataclass(slots=True)
class _Weighing:
    """One request's choice as the stages of :data:`_STAGES` refine it: the predicted costs,
    the candidate they put first (``best``: for a forced mode, that mode), and the Taylor
    engine's pick (``(engine, mode)``; None: torch.func runs, in ``func_mode``)."""

    kind: str
    p: Problem
    mode: str
    estimator: str
    probes: int
    chunk_size: int | None
    #: predicted seconds of each candidate, the adjoints' n² term added by :func:`_contractions`
    #: and not changed after it (:attr:`shown`, made from them, keys the program's kept plan)
    costs: dict[tuple[str, str], float]
    #: the records' own predictions, before that term (the two Taylor Hessians' timing weighs these)
    record: dict[tuple[str, str], float]
    best: tuple[str, str]
    #: auto mode, torch.func timed against at all (``measure.FUNC_WITHIN``; not for Hutchinson's
    #: estimator), torch.func already started and a Taylor mode predicted near its reverse mode:
    #: the clock may decide between them
    rival: bool
    program: taylor.TaylorProgram | None
    pick: tuple[str, str] | None = None
    #: how the pick was measured (the plan's engine note)
    note: str | None = None
    #: why the Taylor path was not taken (the note of a torch.func plan)
    why_not: str | None = None
    #: the mode of torch.func's plan where it runs (the mode asked for; reverse once timing sent auto there)
    func_mode: str = ""

    @property
    def shown(self) -> tuple[tuple[str, float], ...]:
        return tuple((f"{e} {m}", s) for (e, m), s in self.costs.items())

    def plan_for(self, mode: str) -> Plan:
        """The Taylor plan of ``mode`` on this request's program."""
        return taylor_plan(self.kind, self.p, self.program, self.estimator, self.probes, self.chunk_size,
                           self.shown, mode)  # fmt: skip


def _weighing(kind: str, p: Problem, mode: str, estimator: str, probes: int, chunk_size: int | None) -> _Weighing:
    """The predictions, and the Taylor program where the fast path applies and may be wanted
    (forward mode or the adjoints asked for, predicted cheapest in auto mode, or near torch.func)."""
    costs = estimates(kind, p, estimator, probes)
    best = cheapest(costs) if mode == "auto" else ("taylor", mode)
    rival = (mode == "auto" and bool(measure.FUNC_WITHIN) and estimator != "hutchinson" and cost_model.torch_func_started()
             and any(measure.rivals(costs, k) for k in costs if k[0] == "taylor"))  # fmt: skip
    wanted = best[0] == "taylor" and best in costs or mode == "forward" or rival
    program, why_not = taylor_program(kind, p, "forward" if wanted else mode)
    return _Weighing(kind, p, mode, estimator, probes, chunk_size, costs, dict(costs), best, rival, program,
                     why_not=why_not, func_mode=mode)  # fmt: skip


def _contractions(w: _Weighing) -> None:
    """The adjoints' contractions grow as n² times the activations, which their record (fitted
    on inputs up to :data:`_ADJOINT_FIT_INPUTS`, where it absorbs them) leaves out: known once
    the program is. A forced reverse mode runs the adjoints unless that term alone costs more
    than forward over reverse does in all (as on a 3,072-input CNN)."""
    beyond = max(0.0, 1.0 - (_ADJOINT_FIT_INPUTS / w.p.n_in) ** 2)
    if w.program is None or not beyond or w.mode not in ("auto", "reverse") or ("taylor", "reverse") not in w.costs:
        return
    extra = w.p.n * point_seconds(2 * taylor.adjoint.contraction_flops(w.program) * beyond, w.p.device.type)
    w.costs[("taylor", "reverse")] += extra
    others = {k: v for k, v in w.costs.items() if k[1] == "reverse" and k[0] != "taylor"}
    if w.mode == "auto":
        w.best = cheapest(w.costs)
    elif others and extra > min(others.values()):
        w.best = cheapest(others)
        w.why_not = (f"Taylor reverse mode not used: the Hessian by adjoints' contractions ({w.p.n_in:,} inputs "
                     f"squared times the activations) predict {w.costs[('taylor', 'reverse')]:.3g} s against "
                     f"{others[w.best]:.3g} s by torch.func reverse mode")  # fmt: skip


def _taylor_pick(w: _Weighing) -> None:
    """The Taylor engine's own pick: its cheaper mode in auto mode, else the mode asked for;
    none where the fast path does not apply, torch.func is cheaper by far, or the n² term sent
    a forced reverse mode to torch.func."""
    if w.program is None or w.best[0] != "taylor" and (w.mode != "auto" or not w.rival):
        return
    w.pick = cheapest(w.costs, "taylor") if w.mode == "auto" else w.best
    if w.best[0] != "taylor" and not measure.rivals(w.costs, w.pick):
        w.pick = None  # the Taylor pick is not close enough to torch.func to time


def _taylor_hessians(w: _Weighing) -> None:
    """The two Taylor Hessians predicted close: the clock decides between them. Closeness is
    judged on the records, before the adjoints' n² term, because the clock measures that term
    itself; only auto mode's pick is timed (a pick in auto mode is predicted cheapest or near
    torch.func, :func:`_taylor_pick`)."""
    if w.pick is None or w.mode != "auto" or not measure.ambiguous(w.record):
        return

    def chunk(m: str) -> tuple[int, int]:  # one pass of the plan of mode m
        pl = w.plan_for(m)
        return pl.points_per_chunk, pl.directions_per_pass

    taylor_mode, w.note = measure.hessian_mode(w.program, w.p, w.pick[1], chunk, w.chunk_size)
    w.pick = ("taylor", taylor_mode)


def _adjoints_fall_back(w: _Weighing) -> None:
    """The adjoints picked where they do not serve the model: auto takes the next cheapest
    engine (the forward Hessian on this very program where that is it); a forced reverse mode
    runs torch.func's."""
    if w.pick is None or w.pick[1] != "reverse" or adjoint_agrees(w.program, w.p):
        return
    w.why_not = _ADJOINTS_REFUSED
    nxt = cheapest({k: v for k, v in w.costs.items() if k != w.pick}) if w.mode == "auto" else None
    if w.best == w.pick:
        w.best = nxt or w.best
    w.pick, w.note = (nxt, w.why_not) if nxt == ("taylor", "forward") else (None, None)


def _against_func(w: _Weighing) -> None:
    """In auto mode, a Taylor pick predicted near torch.func's reverse mode is timed against
    it (:func:`.measure.against_func`); where torch.func is predicted cheapest and the pick is
    not close enough to time, torch.func runs."""
    if w.mode != "auto" or w.pick is None:
        return
    if not (w.rival and measure.rivals(w.costs, w.pick)):
        if w.best[0] != "taylor":
            w.pick = None
        return
    program, pick = w.program, w.pick

    def passes() -> tuple[measure.Pass, measure.Pass]:  # one of each plan's
        mine = w.plan_for(pick[1])
        theirs = make_plan(w.kind, w.p, "reverse", w.estimator, w.probes, w.chunk_size)
        return (measure.taylor_pass(w.kind, w.p, program, pick[1], mine.points_per_chunk, mine.directions_per_pass),
                measure.func_pass(w.kind, w.p, w.probes, theirs.points_per_chunk, theirs.directions_per_pass))

    predicted = pick if w.best[0] == "taylor" else w.best
    chosen, timed = measure.against_func(program, w.p, w.kind, pick, predicted, passes, w.chunk_size)
    if chosen[0] == "taylor":
        w.note = timed if w.note is None else f"{w.note}; {timed}"
    else:
        w.pick, w.func_mode, w.why_not = None, "reverse", f"Taylor path not used: {timed}"


#: what is weighed after the predictions, in this order (it is load-bearing: the later stages
#: rely on what :func:`_taylor_pick` left); each refines the costs, the best candidate, the pick
#: or the notes. The timing against torch.func comes last, once the Taylor engine's own
#: candidate is settled.
_STAGES = (_contractions, _taylor_pick, _taylor_hessians, _adjoints_fall_back, _against_func)


def choose_plan(kind: str, p: Problem, mode: str, estimator: str, probes: int,
                 chunk_size: int | None) -> tuple[Plan, taylor.TaylorProgram | None]:  # fmt: skip
    """The Taylor plan and program where the fast path applies and is wanted (forward mode or
    the adjoints asked for, or auto's pick: predicted cheapest, or faster by the clock), else
    the torch.func plan."""
    w = _weighing(kind, p, mode, estimator, probes, chunk_size)
    for stage in _STAGES:
        stage(w)
    if w.pick is not None:
        plan = w.plan_for(w.pick[1])
        return (plan if w.note is None else replace(plan, engine_note=w.note)), w.program
    plan = make_plan(w.kind, w.p, w.func_mode, w.estimator, w.probes, w.chunk_size)
    why_not = w.why_not
    if why_not is None and w.mode == "auto" and ("taylor", "forward") in w.costs:
        why_not = _why_not_taylor(w.p, plan.mode, w.costs)
    return replace(plan, engine_note=why_not, estimates=w.shown), None


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
