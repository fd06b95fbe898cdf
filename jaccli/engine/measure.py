"""Auto mode's measured choices: between the Taylor engine's two Hessians, and between the
Taylor engine's pick and torch.func's reverse mode.

The cost records of the forward Hessian and of the Hessian by adjoints
(:data:`.costs.COSTS`) count streams and sweeps from the request's sizes alone. What they
cost also depends on the model's ops. A tanh's pair rows are cheap. Pair rows through
attention's products and quotients cost many times more, and the Hessian by adjoints
contracts those in one product each. So on the 12-input, 4-output transformers of
``tests/architectures.py`` the adjoints ran 1.3-2x faster than the forward Hessian, though
the records, fitted on tanh MLPs, predict the forward one faster. Alike between engines:
torch.func's vmapped products cost more per forward pass on convolutions than on the MLPs
the records were fitted on (:func:`against_func`).

Where two predictions are within :data:`WITHIN` of each other, auto times one pass of each
on the first points, each as its plan would run it (its points per pass, at most
:data:`POINTS`, and its directions per pass). It takes the one faster per point unless the two
are within :data:`MARGIN`; then the prediction stands. This runs once per program (again where a later
request has more points to time than the first had), and the times are kept on it
(:attr:`~jaccli.jets.TaylorProgram.measured`). Every pass is exact, so the choice moves the
result's last bits at most, never its value.

Imports: :mod:`jaccli.jets`, :mod:`.problem`, :mod:`.programs`, :mod:`.strategies`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from jaccli import jets
from jaccli.engine.problem import Problem
from jaccli.engine.programs import adjoint_agrees
from jaccli.engine.strategies import STRATEGIES

#: the two Taylor Hessians' predictions within this factor of each other are measured (0: never)
WITHIN = 4.0
#: torch.func's reverse mode predicted cheaper than the Taylor engine's pick by at most this
#: factor, or dearer by at most :data:`FUNC_BEHIND`, is timed against it (0: never). The records
#: put torch.func 2x ahead of the adjoints on a depthwise-separable CNN where it ran 6x behind;
#: where they put it behind, on the MLPs they were fitted to, they are off by 20-30 %
FUNC_WITHIN = 8.0
FUNC_BEHIND = 1.25
#: points a timed pass takes at most (fewer where its plan's passes are smaller). Too few hide
#: the per-point cost behind a pass's fixed cost: on 64 points the BERT-like model of the
#: architecture tests timed its forward Hessian 13.5 ms against the adjoints' 11.6 (a tie), on
#: 256 points 51 against 19, as at 512 (89 against 36). A 5-input tanh MLP's forward Hessian
#: took 0.58x the adjoints' time on 64 points, 0.99x on 256, 1.09x on 1,024 and 1.47x on
#: 4,096: timed at 256 points, auto kept the forward Hessian where its plan's passes (512 and
#: 900 points) ran 1.14x slower than the adjoints'
POINTS = 1024
#: passes of each mode timed, alternately (the fastest counts)
ROUNDS = 2
#: a mode is taken only where it took at most this fraction of the other's time per point
MARGIN = 0.9
#: the clock (tests set it)
_clock = time.perf_counter
#: torch.func's candidate against the Taylor engine's pick
FUNC = ("torch.func", "reverse")
FUNC_NAME = " ".join(FUNC)
#: a pass to time: the points of its plan's pass, and ``run(k)`` computing a pass of ``k`` points
Pass = tuple[int, Callable[[int], object]]
#: the Taylor pick and torch.func timed to the end: the one predicted stands unless the other
#: took at most this fraction of its time per point. Wider than :data:`MARGIN`: the passes are
#: timed at :data:`POINTS` points at most, and torch.func's vmapped products gain more from a
#: request's larger passes (a 10-input width-16 MLP's Jacobian: 0.72-0.94 ms a pass of 1,024
#: points against Taylor's 0.83-0.90, but 7.5 ms against 10.9 for 20,000 points)
FUNC_MARGIN = 0.75
#: points of torch.func's first timed pass (:func:`against_func`: doubled up to its plan's pass)
FIRST_POINTS = 8
#: torch.func's request projected from its last two timed passes at more than this many times
#: the whole request by Taylor stops its timing (the factor: room for a noisy pass)
PROJECTED = 2.0
#: a projection only from a pass of at least this many seconds, and this much longer than the pass before
PROJECT_FROM = 0.005
GROWN = 1.3


def ambiguous(costs: dict[tuple[str, str], float]) -> bool:
    """Whether the two Taylor Hessians are both predicted, within :data:`WITHIN` of each other."""
    a, b = costs.get(("taylor", "forward")), costs.get(("taylor", "reverse"))
    return a is not None and b is not None and max(a, b) <= WITHIN * min(a, b)


def rivals(costs: dict[tuple[str, str], float], pick: tuple[str, str]) -> bool:
    """Whether torch.func's reverse mode and the Taylor engine's ``pick`` are both predicted, torch.func
    at most :data:`FUNC_WITHIN` times cheaper and :data:`FUNC_BEHIND` times dearer (:func:`against_func`
    then times them)."""
    a, b = costs.get(pick), costs.get(FUNC)
    return a is not None and b is not None and a <= FUNC_WITHIN * b and b <= FUNC_BEHIND * a


def hessian_mode(program: jets.TaylorProgram, p: Problem, predicted: str,
                 chunk: Callable[[str], tuple[int, int]], chunk_size=None) -> tuple[str, str | None]:  # fmt: skip
    """``"forward"`` or ``"reverse"`` for ``p``'s Hessian on ``program``, by their times per
    point on the first points (``predicted`` where they are close, or the adjoints do not
    serve the program), and a note saying so (None where nothing was measured).

    ``chunk(mode)`` gives the points and directions of one pass as the plan of that mode
    would run it: each mode is timed on its own pass (at most :data:`POINTS` points), since
    a pass's cost per point moves with its size (cache, fixed costs), and not alike for the
    two (a 5-input MLP: forward 0.58x the adjoints' time on 64 points, 1.47x on 4,096).
    The times are kept per dtype, device and ``chunk_size`` (the user's points per pass, which
    sets both plans' passes), and taken again where a timed pass took every point of the
    request it was timed for and a later request has more."""
    if not adjoint_agrees(program, p):
        return "forward", None
    names = ("taylor forward", "taylor reverse")
    key = ("hessian", p.dtype, str(p.device), None if chunk_size is None else str(chunk_size))
    times = program.measured.get(key)
    if _stale(times, p, names):  # the passes (two plans) are made only to be timed
        passes = {f"taylor {m}": taylor_pass("hessian", p, program, m, *chunk(m)) for m in ("forward", "reverse")}
        times = program.measured[key] = _alternately(program, p, passes)
    chosen = _faster(times, *names, f"taylor {predicted}")
    return chosen.removeprefix("taylor "), _note(times, names)


def against_func(program: jets.TaylorProgram, p: Problem, kind: str, pick: tuple[str, str], predicted: tuple[str, str],
                 passes: Callable[[], tuple[Pass, Pass]], chunk_size=None) -> tuple[tuple[str, str], str]:  # fmt: skip
    """The faster per point of the Taylor engine's ``pick`` and torch.func's reverse mode, timed
    on a pass of each, ``predicted`` where the two are within :data:`FUNC_MARGIN`; and the note.
    ``passes()`` makes the two passes (:func:`taylor_pass`, :func:`func_pass`), called only
    where they are to be timed (not for a request whose times are kept).

    The cost records count forward passes alike for every engine, but what a forward pass
    costs under each differs by model: on the depthwise-separable CNN of the architecture
    tests (75 inputs) torch.func's vmapped forward over reverse took 15x its prediction, the
    Hessian by adjoints 3.6x, so the records put torch.func first where it ran 6x slower.

    The Taylor pass is timed first (:data:`ROUNDS` times, the fastest counts), which prices
    the whole request by it; torch.func's passes then grow from :data:`FIRST_POINTS` points,
    doubling up to its plan's pass, and stop as soon as one took longer than the whole request
    would by the Taylor engine (torch.func cannot be the faster then: its request holds that
    pass's points at least), or its request, projected from what a point added between its last
    two passes, would take :data:`PROJECTED` times as long. So timing a loser costs a few times
    the request at most, and mostly far less (on that CNN's Laplacian, 512 points: 1.3 s of
    torch.func passes before, against the request's 34 ms). Timed only where torch.func has
    started (nothing to pay for its first product); kept on the program as
    :func:`hessian_mode`'s times are."""
    name = f"{pick[0]} {pick[1]}"
    key = ("vs torch.func", kind, pick[1], p.dtype, str(p.device), None if chunk_size is None else str(chunk_size))
    points = min(p.n, POINTS)
    # torch.func loses once a pass of it takes longer than the whole request by Taylor (by the
    # margin, which favours the prediction)
    bound = MARGIN if predicted[0] == "taylor" else 1 / MARGIN
    times = program.measured.get(key)
    if times is not None and times.get("stopped") and not _stops(times, name, p.n, bound):
        times = None  # stopped for a smaller request: what stopped it is no proof for this one
    if _stale(times, p, (name, FUNC_NAME)):
        mine, theirs = passes()
        times = _alternately(program, p, {name: mine})
        times["stopped"] = None
        with torch.no_grad():  # torch.func's passes take no buffer of the Taylor workspace
            last, size = max(1, min(theirs[0], points)), max(1, min(FIRST_POINTS, theirs[0], points))
            try:
                while True:
                    took = _timed(p, theirs[1], size)
                    before = times.get(FUNC_NAME)
                    if before is not None and took >= max(PROJECT_FROM, GROWN * before[0]):
                        # what a point adds, from the last two passes (their fixed cost cancels);
                        # only where a pass is long and grew with its points: below that the
                        # difference is the clock's noise (a 10-input MLP: 8 and 16 points 0.1
                        # and 1.0 ms projected 0.64 s for a request that took 7 ms)
                        times["per_point"] = max(0.0, (took - before[0]) / (size - before[1]))
                    times[FUNC_NAME] = (took, size)
                    times["stopped"] = _stops(times, name, p.n, bound)
                    if times["stopped"]:
                        break
                    if size == last:  # a second pass of the full size: the faster counts
                        times[FUNC_NAME] = (min(took, _timed(p, theirs[1], size)), size)
                        break
                    size = min(2 * size, last)
            except Exception as exc:  # noqa: BLE001 - torch.func cannot run it (an op without a rule): Taylor stands
                times["failed"] = f"{type(exc).__name__} on a pass of {size} point{'s' * (size != 1)}"
        program.measured[key] = times
    if "failed" in times:
        ms = times[name][0] * 1e3
        return pick, f"measured {name} {ms:.3g} ms on {times[name][1]} points; torch.func reverse failed: {times['failed']}"
    note = _note(times, (name, FUNC_NAME))
    if times["stopped"] == "projected":
        projected = _projected(times, p.n)
        return pick, f"{note} (its request projected at {projected:.3g} s, past the whole request by {name})"
    if times["stopped"]:
        return pick, f"{note} (more than the whole request by {name})"
    chosen = _faster(times, name, FUNC_NAME, f"{predicted[0]} {predicted[1]}", FUNC_MARGIN)
    return (pick if chosen == name else FUNC), note


def _stops(times: dict, name: str, n: int, bound: float) -> str | None:
    """Why torch.func's timing stops, for a request of ``n`` points: ``"pass"`` where its last pass
    alone took longer than the whole request by Taylor (``bound`` times it), ``"projected"`` where
    its request, projected from its last two passes, is :data:`PROJECTED` times that; else None."""
    whole = bound * _whole(times[name], n)
    if times[FUNC_NAME][0] > whole:
        return "pass"
    if "per_point" in times and _projected(times, n) > PROJECTED * whole:
        return "projected"
    return None


def _projected(times: dict, n: int) -> float:
    took, size = times[FUNC_NAME]
    return took + times["per_point"] * max(0, n - size)


def _whole(timed: tuple[float, int], n: int) -> float:
    """Seconds of a request of ``n`` points at the time per point of a timed pass ``(seconds, points)``."""
    return timed[0] / timed[1] * n


def _timed(p: Problem, run: Callable[[int], object], size: int) -> float:
    start = _clock()
    run(size)
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    return _clock() - start


def taylor_pass(kind: str, p: Problem, program: jets.TaylorProgram, mode: str, points: int,
                directions: int | None) -> Pass:  # fmt: skip
    """A pass of the Taylor plan of ``mode`` (its ``points`` and ``directions`` per pass):
    ``(points, run)``, ``run(k)`` computing a pass of the first ``k`` points."""
    compute = functools.partial(jets.adjoint.hessian, program) if mode == "reverse" else getattr(program, kind)

    def run(size: int) -> None:
        compute(p.z(slice(0, size)), directions=directions)  # a view, as the chunk loop takes its points

    return points, run


def func_pass(kind: str, p: Problem, probes: int, points: int, directions: int) -> Pass:
    """A pass of torch.func's reverse-mode plan (its ``points`` and ``directions`` per pass), as
    :func:`taylor_pass` gives one of the Taylor plan's."""
    strategy = STRATEGIES[(kind, "reverse")]
    dirs = strategy.directions(p, 0, probes).to(p.device)

    def run(size: int) -> None:
        rows = torch.arange(size, device=p.device)
        g, z, ctx = p.fn(rows), p.z(rows), {"n_out": p.n_out, "seed": 0, "points": rows}
        for d0 in range(0, dirs.shape[0], directions):
            strategy.product(g, z, dirs[d0 : d0 + directions], ctx)

    return points, run


def _stale(times: dict | None, p: Problem, names: tuple[str, ...]) -> bool:
    """Whether ``times`` (kept for ``names``) are to be taken (again) for ``p``: none kept, or a
    timed pass took every point of the request it was timed for and this request has more."""
    return times is None or min(p.n, POINTS) > times["points"] and any(
        n in times and times[n][1] >= times["points"] for n in names  # a failed pass has no time
    )


def _alternately(program: jets.TaylorProgram, p: Problem, passes: dict[str, Pass]) -> dict:
    """Each pass's fastest time of :data:`ROUNDS`, taken alternately, and its points (``passes``
    maps a name to a :data:`Pass`, each capped at :data:`POINTS` and at ``p``'s points)."""
    points = min(p.n, POINTS)
    times: dict = {"points": points}
    sizes = {name: max(1, min(size, points)) for name, (size, _) in passes.items()}
    with torch.no_grad(), program.workspace():
        for _ in range(ROUNDS):  # alternately; the first pass of a size pays its allocations
            for name, (_, run) in passes.items():
                took = _timed(p, run, sizes[name])
                times[name] = (min(took, times[name][0]) if name in times else took, sizes[name])
    return times


def _faster(times: dict, a: str, b: str, predicted: str, margin: float = MARGIN) -> str:
    """``a`` or ``b``, whichever took at most ``margin`` of the other's time per point; else ``predicted``."""
    per_a, per_b = times[a][0] / times[a][1], times[b][0] / times[b][1]
    return b if per_b <= margin * per_a else a if per_a <= margin * per_b else predicted


def _note(times: dict, names: tuple[str, str]) -> str:
    (ta, na), (tb, nb) = (times[n] for n in names)
    if na == nb:
        return f"measured on {na} point{'s' * (na != 1)}: {names[0]} {ta * 1e3:.3g} ms, {names[1]} {tb * 1e3:.3g} ms"
    return (f"measured on a pass of each: {names[0]} {ta * 1e3:.3g} ms on {na} points, "
            f"{names[1]} {tb * 1e3:.3g} ms on {nb} points")  # fmt: skip
