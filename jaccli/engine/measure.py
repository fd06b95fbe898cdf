"""Auto mode's measured choice between the Taylor engine's two Hessians.

The cost records of the forward Hessian and of the Hessian by adjoints
(:data:`.costs.COSTS`) count streams and sweeps from the request's sizes alone. What they
cost also depends on the model's ops. A tanh's pair rows are cheap. Pair rows through
attention's products and quotients cost many times more, and the Hessian by adjoints
contracts those in one product each. So on the 12-input, 4-output transformers of
``tests/architectures.py`` the adjoints ran 1.3-2x faster than the forward Hessian, though
the records, fitted on tanh MLPs, predict the forward one faster.

Where the two predictions are within :data:`WITHIN` of each other, auto times one pass of each
on the first points, each as its plan would run it (its points per pass, at most
:data:`POINTS`, and its directions per pass). It takes the one faster per point unless the two
are within :data:`MARGIN`; then the prediction stands. This runs once per program (again where a later
request has more points to time than the first had), and the times are kept on it
(:attr:`~jaccli.jets.TaylorProgram.measured`). Both passes are exact, so the choice moves the
result's last bits at most, never its value.

Imports: :mod:`jaccli.jets`, :mod:`.problem`, :mod:`.programs`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from jaccli import jets
from jaccli.engine.problem import Problem
from jaccli.engine.programs import adjoint_agrees

#: the two Taylor Hessians' predictions within this factor of each other are measured (0: never)
WITHIN = 4.0
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


def ambiguous(costs: dict[tuple[str, str], float]) -> bool:
    """Whether the two Taylor Hessians are both predicted, within :data:`WITHIN` of each other."""
    a, b = costs.get(("taylor", "forward")), costs.get(("taylor", "reverse"))
    return a is not None and b is not None and max(a, b) <= WITHIN * min(a, b)


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
    key = ("hessian", p.dtype, str(p.device), None if chunk_size is None else str(chunk_size))
    points = min(p.n, POINTS)
    times = program.measured.get(key)
    # a pass that took every point an earlier request had is timed again where this one has more
    if times is None or points > times["points"] and any(size >= times["points"] for _, size in
                                                         (times["forward"], times["reverse"])):  # fmt: skip
        runs = {"forward": program.hessian, "reverse": functools.partial(jets.adjoint.hessian, program)}
        times = {"points": points}
        passes = {}
        for mode in runs:
            size, directions = chunk(mode)
            size = max(1, min(size, points))
            passes[mode] = (p.z(torch.arange(size, device=p.device)), directions)
        with torch.no_grad(), program.workspace():
            for _ in range(ROUNDS):  # alternately; the first pass of a size pays its allocations
                for mode, run in runs.items():
                    z, directions = passes[mode]
                    start = _clock()
                    run(z, directions=directions)
                    if z.device.type == "cuda":
                        torch.cuda.synchronize(z.device)
                    took = _clock() - start
                    times[mode] = min(took, times[mode][0]) if mode in times else took, z.shape[0]
        program.measured[key] = times
    (fwd, nf), (rev, nr) = times["forward"], times["reverse"]
    per_f, per_r = fwd / nf, rev / nr
    chosen = "reverse" if per_r <= MARGIN * per_f else "forward" if per_f <= MARGIN * per_r else predicted
    if nf == nr:
        return chosen, (f"measured on {nf} point{'s' * (nf != 1)}: taylor forward "
                        f"{fwd * 1e3:.3g} ms, taylor reverse {rev * 1e3:.3g} ms")  # fmt: skip
    return chosen, (f"measured on a pass of each: taylor forward {fwd * 1e3:.3g} ms on {nf} points, "
                    f"taylor reverse {rev * 1e3:.3g} ms on {nr} points")  # fmt: skip
