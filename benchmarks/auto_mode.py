"""Is ``auto`` the fastest mode? Every engine on every case, against the planner's choice, in ONE run.

    python benchmarks/auto_mode.py [--points N] [--repeats R] [--cases jacobian:2x1,hessian:10x1,...]

For each case (a derivative of a tanh MLP ``n_in -> 50 -> 50 -> 50 -> n_out``, per sample,
float32) the three engines auto mode weighs (the Taylor fast path, torch.func forward
mode, torch.func reverse mode) run in turns, round-robin after one warm-up round, in
this one process, and the table shows each one's median seconds, what the planner
predicted for it (``Plan.estimates``, warm: torch._dynamo is loaded by the warm-up, so
no start cost is counted) and which one auto mode picks. ``auto/best`` is the time of
auto's pick over the fastest engine's: the goal is at most 1.1 on every case.

The figures in :data:`jaccli.engine.strategies.COSTS` come from this benchmark's
``passes`` column (seconds over one forward pass of the same points). Run it on a quiet
machine: on a shared CPU the medians of a few rounds still drift.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import jaccli
from jaccli.engine import planner

DEFAULT_CASES = (
    "jacobian:1x1,jacobian:2x1,jacobian:3x1,jacobian:10x1,jacobian:50x1,jacobian:2x5,jacobian:1x50,"
    "jacobian:10x10,hessian:1x1,hessian:2x1,hessian:3x1,hessian:5x1,hessian:10x1,hessian:20x1,"
    "hessian:2x5,hessian:4x4,laplacian:2x1,laplacian:10x1,laplacian:2x5,laplacian:1x20"
)
ENGINES = (("taylor", "forward"), ("torch.func", "forward"), ("torch.func", "reverse"))


def mlp(n_in: int, n_out: int, width: int = 50) -> nn.Module:
    torch.manual_seed(0)
    sizes = [n_in, width, width, width, n_out]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).eval()


def run(kind: str, net: nn.Module, x: torch.Tensor, engine: str, mode: str) -> float:
    planner.FAST_PATH = engine == "taylor"
    try:
        start = time.perf_counter()
        getattr(jaccli, kind)(net, x, per_sample=True, mode=mode)
        return time.perf_counter() - start
    finally:
        planner.FAST_PATH = True


def forward_seconds(net: nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=40_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'case':16s} {'engine':20s} {'median s':>9s} {'predicted':>9s} {'passes':>7s}")
    worst = 0.0
    for case in args.cases.split(","):
        kind, dims = case.split(":")
        n_in, n_out = map(int, dims.split("x"))
        net, x = mlp(n_in, n_out), torch.rand(args.points, n_in)
        times: dict[tuple[str, str], list[float]] = {e: [] for e in ENGINES}
        for e in ENGINES:  # warm-up: traces, torch._dynamo, caches
            run(kind, net, x, *e)
        for _ in range(args.repeats):
            for e in ENGINES:
                times[e].append(run(kind, net, x, *e))
        plan = jaccli.plan(kind, net, x, per_sample=True)
        predicted = dict(plan.estimates)
        fwd = forward_seconds(net, x, args.repeats)
        medians = {e: statistics.median(t) for e, t in times.items()}
        best = min(medians.values())
        for e in ENGINES:
            name = f"{e[0]} {e[1]}"
            print(f"{case:16s} {name:20s} {medians[e]:9.4f} {predicted.get(name, float('nan')):9.4f} "
                  f"{medians[e] / fwd:7.1f}")  # fmt: skip
        pick = (plan.engine, plan.mode)
        ratio = medians[pick] / best
        worst = max(worst, ratio)
        print(f"{case:16s} auto -> {plan.engine} {plan.mode}: auto/best = {ratio:.2f}\n")
    print(f"worst auto/best: {worst:.2f} (goal <= 1.1)")


if __name__ == "__main__":
    main()
