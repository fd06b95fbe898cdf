"""The cost model by which auto mode chooses an engine: :data:`COSTS`, what each engine's
products cost per point in forward passes of the model, the start costs, and the
predicted seconds of a request (:func:`estimate_seconds`; the planner weighs them).

Imports: nothing of torch or jaccli (the cost of a request is arithmetic on its sizes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "COSTS", "Cost", "FLOPS_PER_SECOND", "TORCH_FUNC_START", "estimate_seconds", "passes_per_point", "point_seconds",
    "start_seconds", "torch_func_started",
]  # fmt: skip


# auto mode weighs every engine that can run a request by its predicted time:
#
#     seconds = start + points * (base + per_direction * directions) * seconds of one forward pass
#
# in units of one forward pass of one point. A product count alone is not enough: the
# Taylor engine pushes all its directions through each layer in one matrix product,
# cheaper per direction than torch.func's vmapped jvp or vjp, and torch.func's first
# product in a process imports torch._dynamo (0.5-0.8 s: far more than the whole
# computation of the commonest small request). A PINN u(t, x) with 2 000 points took 0.86 s
# by torch.func reverse mode against 0.07 s by Taylor forward mode from the CLI.


class Cost(NamedTuple):
    """One engine's cost per point of one kind, in forward passes of the model."""

    base: float  #: the primal pass (and the tape, in reverse mode)
    per_direction: float  #: each product (a stream of the Taylor engine)
    directions: Callable[[int, int, int], int]  #: (n_in, n_out, probes) -> directions per point
    #: what each direction adds per output it serves: forward over reverse shares one
    #: tangent (a forward pass and its tangent: ``per_direction``) among every output's
    #: pullback (``per_output`` each)
    per_output: float = 0.0


def _inputs(n_in: int, n_out: int, probes: int) -> int:
    return n_in


def _outputs(n_in: int, n_out: int, probes: int) -> int:
    return n_out


def _pairs(n_in: int, n_out: int, probes: int) -> int:
    return n_in * (n_in + 1) // 2


def _probes(n_in: int, n_out: int, probes: int) -> int:
    return probes


#: ``(engine, mode) -> kind -> Cost``, in forward passes as the planner counts them
#: (:func:`point_seconds`: the probe's operations per point at :data:`FLOPS_PER_SECOND`).
#:
#: What each record counts: the Taylor Jacobian runs n_in first-order streams, its Hessian
#: n_in first- and n_in(n_in+1)/2 second-order streams, its Laplacian n_in of each;
#: torch.func forward mode one jvp per input (Hessian: one jvp of jvp per pair of inputs);
#: reverse mode one vjp per output, and its Hessian and Laplacian (forward over reverse,
#: :func:`.strategies._hvps_shared`) one direction per input, whose forward pass and tangent
#: (``per_direction``) serve every output's pullback (``per_output`` each).
#:
#: Where each figure comes from: ``benchmarks/auto_mode.py --fit`` on its default grid
#: (39 cases: tanh MLPs n_in -> width x depth -> n_out, n_in 1-100, n_out 1-50, width
#: 16-200, depth 1-6, 500-60 000 points, plus a BatchNorm CNN, which the fit leaves out;
#: float32, one CPU thread, 3 interleaved rounds, 2026-12-06, 2 shared cores under load),
#: rounded to two digits. The fit takes the ratios between engines on each case (the
#: planner's unit is off by a factor per model, alike for every engine: 0.2-6x) and one
#: scale per kind; within a case, log(measured/predicted) has a spread of 0.13-0.19. With
#: these figures auto's pick is within 10% of the fastest engine on 39 of 39 cases of that
#: run (docs/auto-mode.md). The Jacobian's records were fitted again on 2026-12-07 on a quiet
#: machine (two runs of its 14 cases, the mean of the two fits; within cases sd 0.22-0.23):
#: the 2026-12-06 figures put the crossover between Taylor forward and torch.func reverse
#: mode at 2.5 inputs of a one-output width-50 MLP, measured at 4.5-5.3, so a 4-input
#: Jacobian ran by torch.func 1.17-1.58x slower. Records with no case of their own share the one that does the
#: same products: the divergence (the Jacobian's diagonal) and "hutchinson" (the
#: stochastic divergence, one product per probe) take the Jacobian's.
COSTS: dict[tuple[str, str], dict[str, Cost]] = {
    ("taylor", "forward"): {
        "jacobian": Cost(0.56, 0.33, _inputs),
        "divergence": Cost(0.56, 0.33, _inputs),
        "hessian": Cost(4.4, 1.0, lambda i, o, k: i + _pairs(i, o, k)),
        "laplacian": Cost(6.6, 0.84, _inputs),
        "hutchinson": Cost(0.56, 0.33, _probes),
    },
    # the Taylor engine's reverse mode is the Hessian by adjoints (:mod:`jaccli.jets.adjoint`):
    # n_in first-order streams, one reverse sweep per output, each nonlinear step's source
    # contracted in place. Fitted (by hand, 2026-12-07, under load) to its time against the
    # forward Hessian on tanh MLPs n_in -> 50^3 -> n_out: 1.65x at (2, 1), 0.72 at (4, 1),
    # 0.58 at (8, 1), 0.26 at (16, 1), 0.11 at (32, 1), 2.9 at (8, 8); it ran 1.1-28x faster
    # than torch.func's forward over reverse on the models of tests/architectures.py
    ("taylor", "reverse"): {
        "hessian": Cost(10.0, 0.5, _inputs, per_output=2.25),
    },
    ("torch.func", "forward"): {
        "jacobian": Cost(0.79, 1.4, _inputs),
        "divergence": Cost(0.79, 1.4, _inputs),
        "hessian": Cost(6.9, 9.3, _pairs),
        "laplacian": Cost(9.1, 7.6, _inputs),
        "hutchinson": Cost(0.79, 1.4, _probes),
    },
    ("torch.func", "reverse"): {
        "jacobian": Cost(1.5, 0.68, _outputs),
        "divergence": Cost(1.5, 0.68, _outputs),
        "hessian": Cost(9.3, 0.95, _inputs, per_output=3.2),
        # the same products as the Hessian's (its diagonal is gathered from them); the
        # Laplacian's cases, all but one with one output, fix only their sum per input at
        # one output (3.1), split as the Hessian's is (0.95 : 3.2)
        "laplacian": Cost(15.0, 0.71, _inputs, per_output=2.4),
        "hutchinson": Cost(1.5, 0.68, _probes),
    },
}

#: seconds a torch.func product pays once per process: importing torch._dynamo, which its
#: pullbacks (and its jvps through TorchScript) need; 0.5-0.8 s on a 2-core CPU, more on a
#: loaded one. Not paid where something imported it already (torch.export.load does).
#: What every call pays (the Taylor engine's recording, torch.func's vmap set-up: 5-15 ms
#: each for a small MLP) is alike and left out.
TORCH_FUNC_START = 0.6
#: floating-point operations per second of a forward pass, to turn the probe's count per
#: point (:func:`jaccli.engine.probe.op_flops`) into seconds: a float32 MLP of width 50
#: on one CPU thread runs 1.5-6e10 (the lower end, so that the start costs above weigh no
#: more than they should; :data:`COSTS` is fitted in this unit, so it absorbs the rest);
#: GPUs run far more
FLOPS_PER_SECOND = {"cpu": 1.5e10}
_FLOPS_PER_SECOND_ELSE = 1e12


def torch_func_started() -> bool:
    """Whether torch.func's start cost is paid in this process (torch._dynamo is loaded)."""
    return "torch._dynamo" in sys.modules


def start_seconds(engine: str) -> float:
    """What ``engine`` costs before its first point (see :data:`TORCH_FUNC_START`)."""
    return TORCH_FUNC_START if engine == "torch.func" and not torch_func_started() else 0.0


def point_seconds(flops: float, device_type: str) -> float:
    """Seconds of one forward pass of one point, from its floating-point operations."""
    return max(flops, 1.0) / FLOPS_PER_SECOND.get(device_type, _FLOPS_PER_SECOND_ELSE)


def passes_per_point(kind: str, engine: str, mode: str, n_in: int, n_out: int, probes: int = 0) -> float:
    """Forward passes one point costs ``engine`` in ``mode`` (``kind`` "hutchinson": ``probes`` products)."""
    cost = COSTS[(engine, mode)][kind]
    return cost.base + (cost.per_direction + cost.per_output * n_out) * cost.directions(n_in, n_out, probes)


def estimate_seconds(kind: str, engine: str, mode: str, *, n_in: int, n_out: int, points: int,
                     seconds_per_point: float, probes: int = 0) -> float:  # fmt: skip
    """Predicted seconds of a request on ``engine`` in ``mode`` (see :data:`COSTS`)."""
    per_point = passes_per_point(kind, engine, mode, n_in, n_out, probes)
    return start_seconds(engine) + points * per_point * seconds_per_point
