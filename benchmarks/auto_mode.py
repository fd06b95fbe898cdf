"""Is ``auto`` the fastest mode? Every engine on a grid of cases, against the planner's choice, in ONE run.

    python benchmarks/auto_mode.py [--quick] [--repeats R] [--cases CASE,CASE,...] [--fit] [--threads 1]

A case is ``kind:MODEL[/wWIDTH][/dDEPTH][/nPOINTS]``: ``MODEL`` is ``N_INxN_OUT`` (a tanh MLP
``n_in -> width x depth -> n_out``, default width 50, depth 3) or a model of
``tests/architectures.py`` (``batchnorm_cnn``, ``groupnorm_residual``, ...); per sample,
float32. The default grid varies one of input dimension, output dimension, width, depth and
points at a time around a centre case per kind (``--quick``: 14 of its 39 cases, about 4
minutes on a loaded 2-core machine), plus a BatchNorm CNN where forward over reverse wins.

For each case the engines auto mode weighs (the Taylor fast path's forward mode and, for a
Hessian, its reverse mode, the Hessian by adjoints; torch.func forward and reverse mode: those
the planner would consider) run round-robin after one warm-up round, in this one process. The
table shows each engine's median seconds, the planner's prediction for it (``Plan.estimates``,
warm: torch._dynamo is loaded by the warm-up, so no start cost is counted) and measured over
predicted; ``auto/best`` is the time of auto's pick over the fastest engine's. The goal: at
most 1.1 on every case; the last line counts the cases that meet it.

``--fit`` refits :data:`jaccli.engine.costs.COSTS` from the run's MLP cases (see
:func:`fit`: the ratios between engines on each case, then one scale per kind in forward
passes as the planner counts them). Run it on a quiet machine where there is one: on a
shared CPU the medians of a few rounds still drift.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import jaccli  # noqa: E402
from jaccli.engine import costs, planner  # noqa: E402
from jaccli.load.weights import build_mlp  # noqa: E402

ENGINES = (("taylor", "forward"), ("taylor", "reverse"), ("torch.func", "forward"), ("torch.func", "reverse"))


def _sweep(kind: str, centre: dict, **axes) -> list[str]:
    """``centre`` and, for each axis, ``centre`` with that axis at each of its other values."""
    cases = [centre]
    for axis, values in axes.items():
        cases += [{**centre, axis: v} for v in values if v != centre[axis]]
    return [f"{kind}:{c['i']}x{c['o']}/w{c['w']}/d{c['d']}/n{c['n']}" for c in cases]


def default_grid(quick: bool) -> list[str]:
    """One-axis-at-a-time sweeps around a centre case per kind (points chosen so that the
    fastest engine takes 20-300 ms)."""
    if quick:
        return [
            *_sweep("jacobian", dict(i=10, o=1, w=50, d=3, n=20_000), i=[2, 100], w=[200], n=[1_000]),
            *_sweep("hessian", dict(i=5, o=1, w=50, d=3, n=10_000), i=[2], o=[8], d=[6]),
            "hessian:32x1/w50/d3/n1000",
            *_sweep("laplacian", dict(i=5, o=1, w=50, d=3, n=10_000), i=[50], w=[16]),
            "hessian:batchnorm_cnn/n64",
        ]
    return [
        *_sweep("jacobian", dict(i=10, o=1, w=50, d=3, n=20_000), i=[1, 2, 4, 30, 100], o=[10, 50], w=[16, 200],
                d=[1, 6], n=[1_000, 60_000]),  # fmt: skip
        *_sweep("hessian", dict(i=5, o=1, w=50, d=3, n=10_000), i=[1, 2, 10], o=[4, 8], w=[16, 200], d=[1, 6],
                n=[500, 40_000]),  # fmt: skip
        "hessian:20x1/w50/d3/n2000",
        "hessian:32x1/w50/d3/n1000",
        *_sweep("laplacian", dict(i=5, o=1, w=50, d=3, n=10_000), i=[2, 20, 50], o=[5], w=[16, 200], d=[6],
                n=[1_000]),  # fmt: skip
        "hessian:batchnorm_cnn/n64",
        "laplacian:batchnorm_cnn/n64",
    ]


def mlp(n_in: int, n_out: int, width: int = 50, depth: int = 3) -> nn.Module:
    """A tanh MLP ``n_in → width × depth → n_out`` from jaccli's own builder, seeded."""
    torch.manual_seed(0)
    return build_mlp([n_in, *[width] * depth, n_out], "tanh").eval()


def is_mlp(model: str) -> bool:
    """Whether a case's model is an MLP ``N_INxN_OUT`` (else a name of ``tests/architectures.py``)."""
    return model[:1].isdigit()


def build(model: str, opts: dict[str, int]) -> tuple[nn.Module, torch.Tensor]:
    """The model of a case and its points."""
    points = opts.get("n", 20_000)
    g = torch.Generator().manual_seed(0)
    if is_mlp(model):
        n_in, n_out = map(int, model.split("x"))
        return mlp(n_in, n_out, opts.get("w", 50), opts.get("d", 3)), torch.rand(points, n_in, generator=g)
    from architectures import ZOO  # tests/architectures.py

    factory, shape, _ = ZOO[model]
    return factory().eval(), torch.randn(points, *shape, generator=g)


def parse(case: str) -> tuple[str, str, dict[str, int]]:
    kind, rest = case.split(":")
    model, *opts = rest.split("/")
    return kind, model, {o[0]: int(o[1:]) for o in opts}


def run(kind: str, net: nn.Module, x: torch.Tensor, engine: str, mode: str) -> float:
    planner.FAST_PATH = engine == "taylor"
    try:
        start = time.perf_counter()
        getattr(jaccli, kind)(net, x, per_sample=True, mode=mode)
        return time.perf_counter() - start
    finally:
        planner.FAST_PATH = True


def runnable(kind: str, net: nn.Module, x: torch.Tensor, estimates: dict) -> list[tuple[str, str]]:
    """The engines the planner weighs for the case, the Taylor one only where it traces the model."""
    out = []
    for engine, mode in ENGINES:
        if f"{engine} {mode}" not in estimates:
            continue
        if engine == "taylor":
            forced = jaccli.plan(kind, net, x, per_sample=True, mode=mode)
            if (forced.engine, forced.mode) != (engine, mode):  # not traced, or the adjoints do not serve it
                continue
        out.append((engine, mode))
    return out


def forward_seconds(net: nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def terms(kind: str, engine: str, mode: str, n_in: int, n_out: int) -> list[float]:
    """The terms of a COSTS record at (n_in, n_out): 1, directions, directions x n_out."""
    cost = costs.COSTS[(engine, mode)][kind]
    k = cost.directions(n_in, n_out, 0)
    return [1.0, float(k), float(k * n_out)]


def fit(rows: list[tuple]) -> dict[str, tuple[dict[tuple[str, str], dict[str, float]], float]]:
    """Per kind, the COSTS figures that fit the measured times best, and the spread left.

    ``rows``: (case, kind, engine, mode, n_in, n_out, measured passes as the planner counts
    them). What decides auto's pick is the ratio between engines on the same case, and the
    planner's unit (operations per point at one rate, :func:`~jaccli.engine.costs.point_seconds`)
    is off by a factor that depends on the model (narrow layers run below the rate, wide ones
    above it; a small convolution far below) but alike for every engine. So the fit takes a
    free factor per case: it minimises the spread of log(measured / predicted) within each
    case, over every (engine, mode) record of the kind at once (base, per_direction and, where
    the record has one, per_output, all >= 0), then scales the kind's records together so that
    the median row is predicted right in the planner's unit. Returns ``kind -> ({(engine,
    mode): {"base": …, "per_direction": …[, "per_output": …]}}, sd of the log spread within
    cases)``.
    """
    import numpy as np
    from scipy.optimize import least_squares

    names = ("base", "per_direction", "per_output")
    out = {}
    for kind in sorted({r[1] for r in rows}):
        mine = [r for r in rows if r[1] == kind]
        records = sorted({(r[2], r[3]) for r in mine})
        used = {e: (0, 1, 2) if costs.COSTS[e][kind].per_output else (0, 1) for e in records}
        slots = [(e, j) for e in records for j in used[e]]
        x0 = np.array([costs.COSTS[e][kind][j] if j < 2 else costs.COSTS[e][kind].per_output
                       for e, j in slots]) + 0.1  # fmt: skip
        cases = sorted({r[0] for r in mine})
        a = np.array([[terms(kind, r[2], r[3], r[4], r[5])[j] if (r[2], r[3]) == e else 0.0 for e, j in slots]
                      for r in mine])  # fmt: skip
        y = np.log([r[6] for r in mine])
        member = np.array([[r[0] == c for c in cases] for r in mine], dtype=float)

        def spread(theta):
            r = np.log(a @ theta) - y
            return r - member @ ((member.T @ r) / member.sum(0))  # minus each case's mean

        theta = least_squares(spread, x0, bounds=(0, np.inf)).x
        theta *= np.exp(np.median(y - np.log(a @ theta)))
        figures = {e: {names[j]: float(theta[slots.index((e, j))]) for j in used[e]} for e in records}
        out[kind] = (figures, float(np.std(spread(theta))))
    return out


def print_fit(rows: list[tuple]) -> None:
    print("\nfit (per kind; ratios between engines within each case, then one scale for the kind):")
    for kind, (figures, sd) in fit(rows).items():
        print(f"  {kind}: log(measured/predicted) within cases sd {sd:.2f} "
              f"over {len({r[0] for r in rows if r[1] == kind})} cases")  # fmt: skip
        for (engine, mode), values in figures.items():
            print(f"    {engine} {mode:8s} " + ", ".join(f"{n}={v:.3g}" for n, v in values.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller grid (a few minutes under load)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default=None, help="comma-separated cases (see the module doc)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fit", action="store_true", help="print the COSTS records that fit this run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the CNNs' "ReLU's second derivative is zero" notes, once per call
    cases = args.cases.split(",") if args.cases else default_grid(args.quick)
    print(f"{'case':34s} {'engine':19s} {'median s':>9s} {'predicted':>9s} {'meas/pred':>9s} {'fwd passes':>10s}")
    met, rows, summary = 0, [], []
    for case in cases:
        kind, model, opts = parse(case)
        net, x = build(model, opts)
        plan = jaccli.plan(kind, net, x, per_sample=True)
        engines = runnable(kind, net, x, dict(plan.estimates))
        times: dict[tuple[str, str], list[float]] = {e: [] for e in engines}
        for e in engines:  # warm-up: traces, torch._dynamo, caches
            run(kind, net, x, *e)
        for _ in range(args.repeats):
            for e in engines:
                times[e].append(run(kind, net, x, *e))
        plan = jaccli.plan(kind, net, x, per_sample=True)  # warm: no start cost counted
        predicted = dict(plan.estimates)
        fwd = forward_seconds(net, x, args.repeats)
        unit = x.shape[0] * costs.point_seconds(plan._request.problem.flops, x.device.type)
        p = plan._request.problem
        medians = {e: statistics.median(t) for e, t in times.items()}
        best = min(medians.values())
        for e in engines:
            name = f"{e[0]} {e[1]}"
            pred = predicted.get(name, float("nan"))
            print(f"{case:34s} {name:19s} {medians[e]:9.4f} {pred:9.4f} {medians[e] / pred:9.2f} "
                  f"{medians[e] / fwd:10.1f}")  # fmt: skip
            if is_mlp(model):
                rows.append((case, kind, *e, p.n_in, p.n_out, medians[e] / unit))
        pick = (plan.engine, plan.mode)
        ratio = medians[pick] / best if pick in medians else float("nan")
        fastest = min(medians, key=medians.__getitem__)
        met += ratio <= 1.1
        summary.append((case, f"{pick[0]} {pick[1]}", f"{fastest[0]} {fastest[1]}", ratio))
        print(f"{case:34s} auto -> {pick[0]} {pick[1]}: auto/best = {ratio:.2f}"
              + (f" ({plan.engine_note})" if plan.engine_note else "") + "\n", flush=True)  # fmt: skip
    print(f"{'case':34s} {'auto':19s} {'best':19s} auto/best")
    for case, pick, fastest, ratio in summary:
        print(f"{case:34s} {pick:19s} {fastest:19s} {ratio:9.2f}{'' if ratio <= 1.1 else '  > 1.1'}")
    print(f"\nauto within 10% of best on {met} of {len(cases)} cases")
    if args.fit:
        print_fit(rows)


if __name__ == "__main__":
    main()
