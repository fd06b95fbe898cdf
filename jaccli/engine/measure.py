"""Auto mode's measured choice between the Taylor engine's two Hessians.

The cost records of the forward Hessian and of the Hessian by adjoints
(:data:`.costs.COSTS`) count streams and sweeps from the request's sizes alone. What they
cost also depends on the model's ops. A tanh's pair rows are cheap. Pair rows through
attention's products and quotients cost many times more, and the Hessian by adjoints
contracts those in one product each. So on the 12-input, 4-output transformers of
``tests/architectures.py`` the adjoints ran 1.3-2x faster than the forward Hessian, though
the records, fitted on tanh MLPs, predict the forward one faster.

Where the two predictions are within :data:`WITHIN` of each other, auto times one pass of each
on the first :data:`POINTS` points. It takes the faster one unless the two are within
:data:`MARGIN`; then the prediction stands. This runs once per program (again where a later
request has more points to time than the first had), and the times are kept on it
(:attr:`~jaccli.jets.TaylorProgram.measured`). Both passes are exact, so the choice moves the
result's last bits at most, never its value.

Imports: :mod:`jaccli.jets`, :mod:`.problem`, :mod:`.programs`.
"""

from __future__ import annotations

import functools
import time

import torch

from jaccli import jets
from jaccli.engine.problem import Problem
from jaccli.engine.programs import adjoint_agrees

#: the two Taylor Hessians' predictions within this factor of each other are measured (0: never)
WITHIN = 4.0
#: points each pass is timed on (at most): enough that the per-point cost shows through a
#: pass's fixed cost. On 64 points the BERT-like model of the architecture tests timed its
#: forward Hessian 13.5 ms against the adjoints' 11.6 (a tie), on 256 points 51 against 19,
#: as at 512 (89 against 36); a 4-input flow's 1.5 against 3.3 ms kept its sign throughout
POINTS = 256
#: a mode is taken only where it took at most this fraction of the other's time
MARGIN = 0.9
#: the clock (tests set it)
_clock = time.perf_counter


def ambiguous(costs: dict[tuple[str, str], float]) -> bool:
    """Whether the two Taylor Hessians are both predicted, within :data:`WITHIN` of each other."""
    a, b = costs.get(("taylor", "forward")), costs.get(("taylor", "reverse"))
    return a is not None and b is not None and max(a, b) <= WITHIN * min(a, b)


def hessian_mode(program: jets.TaylorProgram, p: Problem, predicted: str) -> tuple[str, str | None]:
    """``"forward"`` or ``"reverse"`` for ``p``'s Hessian on ``program``, by their times on the
    first points (``predicted`` where they are close, or the adjoints do not serve the
    program), and a note saying so (None where nothing was measured)."""
    if not adjoint_agrees(program, p):
        return "forward", None
    key = ("hessian", p.dtype, str(p.device))
    points = min(p.n, POINTS)
    times = program.measured.get(key)
    if times is None or times["points"] < points:  # a few points' times say little about more
        z = p.z(torch.arange(points, device=p.device))
        runs = {"forward": program.hessian, "reverse": functools.partial(jets.adjoint.hessian, program)}
        times = {}
        with torch.no_grad(), program.workspace():
            for mode, run in runs.items():
                start = _clock()
                run(z)
                if z.device.type == "cuda":
                    torch.cuda.synchronize(z.device)
                times[mode] = _clock() - start
        times["points"] = points
        program.measured[key] = times
    fwd, rev, points = times["forward"], times["reverse"], times["points"]
    chosen = "reverse" if rev <= MARGIN * fwd else "forward" if fwd <= MARGIN * rev else predicted
    return chosen, (f"measured on {points} point{'s' * (points != 1)}: taylor forward "
                    f"{fwd * 1e3:.3g} ms, taylor reverse {rev * 1e3:.3g} ms")  # fmt: skip
