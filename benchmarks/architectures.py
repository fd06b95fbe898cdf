"""Per-sample derivatives of a CNN and a transformer: jaccli against torch.func's best, in ONE run;
with ``--traces``, every architecture of ``tests/architectures.py`` from its ``torch.jit.trace``
file against the same model's ``.pt2``.

    python benchmarks/architectures.py [--points N] [--repeats R]
    python benchmarks/architectures.py --traces [--points N] [--repeats R] [--cold] [--only NAME,...]
    python benchmarks/architectures.py --vs-func [--points N] [--repeats R] [--threads T] [--only NAME,...]

Issue 9's targets. The models are the shipped examples' classes
(``examples/models/make_examples.py``): ``SmallCNN`` (3×32×32 input, 4 convolutions with
BatchNorm, GroupNorm, a residual block and average pooling, 10 logits) and
``SmallTransformer`` (16 tokens × 64, 2 causal encoder layers, LayerNorm, GELU, one
output per token), float32 on the CPU. For each: the per-sample Laplacian (jaccli's plan
takes the Taylor fast path: forward Laplacian through convolutions, norms, softmax and
attention) against torch.func's forward over reverse (``jvp`` of ``jacrev``, what ``hessian``
does) vmapped over chunks of directions (``vmap(hessian)`` itself needs over 16 GB for the
CNN); the per-sample Jacobian, where jaccli's plan picks reverse mode (3 072 or 1 024
inputs, 10 or 16 outputs) and runs ``vmap(jacrev)``, against ``vmap(jacrev)`` (forward
mode, 3 072 tangents of every activation, is no contender). Each candidate runs in its own
block (one warm-up, medians; ``benchmarks/timing.py``); every result is compared with the
reference so that a fast wrong answer cannot win.

``--traces`` (issue 19): each model of ``tests/architectures.py`` (CNN with BatchNorm and
max pooling, GroupNorm residual block, causal Conv1d, depthwise-separable conv, encoders
with and without a padding mask, MultiheadAttention, MAF and RealNVP flows, BERT- and
GPT-2-like models, a SiLU MLP, an LSTM) is saved by ``torch.jit.trace`` and by
``torch.export`` (float32) and loaded by ``jaccli.load_model``; for the per-sample
Laplacian and Jacobian (auto mode) and the reverse-mode Jacobian (torch.func's
fall-back), one line per (model, command): the engine each format takes, warm medians
(one warm-up first, so that torch's one-time imports are not counted: a ``.pt2`` pays
them while loading, a trace on its first torch.func call), the ratio trace / ``.pt2``
(the target is ≤ 2), and whether the two agree. ``--cold`` adds the wall time of the
whole CLI command in a fresh process for each format (load, imports and all).

``--vs-func`` (issue 23, "Real architectures"): every model of ``tests/architectures.py``
saved as a trace and as a ``.pt2`` and loaded by ``jaccli.load_model``; for each format the
per-sample Hessian and Laplacian by jaccli's public API (auto mode) against torch.func's
``vmap(hessian)`` of the same loaded callable (one point per call, the Laplacian its trace),
interleaved call by call in one process (``--repeats`` rounds, medians), and each alone: a
block of ``--repeats`` calls per candidate, the blocks run twice in turn (jaccli, func, func,
jaccli), the lower of each candidate's two medians (``timing.blocks``). The two differ on the
small models: a call of a few milliseconds right after the other candidate's starts with its
code and data out of the caches (the SiLU MLP's Laplacian, 512 points: 0.77 ms alone, 1.5 ms
right after ``vmap(hessian)``, no page fault in either), while ``vmap(hessian)`` after jaccli
meets far less of that; the issue's peers are timed each in a process of its own
(``peers.py``), which the blocks come closer to. Both results are
compared with a float64 ``vmap(hessian)`` of the eager module in float64; a result off by
more than ``--tol`` (relative to the reference's largest entry) gets no ratio. One line per
(model, format, kind): jaccli's engine and mode, both medians and func / jaccli interleaved,
the same alone (target ≥ 5).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.func import jacrev, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "models"))
sys.path.insert(0, str(ROOT / "tests"))

import jaccli  # noqa: E402
from make_examples import SmallCNN, SmallTransformer  # noqa: E402
from timing import blocks  # noqa: E402
from zoo import func_hessian, saved  # noqa: E402


def per_point(model, shape):
    def one(xi):
        return model(xi.reshape(1, *shape)).reshape(-1)

    return one


def laplacian_by_hvp(one, n: int, chunk: int):
    """torch.func's Laplacian: forward over reverse (``jvp`` of ``jacrev``, as in ``hessian``)
    vmapped over ``chunk`` basis directions at a time, point by point — unchunked,
    ``vmap(hessian)`` holds every direction's activations at once (CNN: past 16 GB)."""

    def run(x):
        eye = torch.eye(n, dtype=x.dtype)
        rows = []
        for xi in x:
            total = 0
            for s in range(0, n, chunk):
                e = eye[s : s + chunk]
                hv = vmap(lambda d: jvp(jacrev(one), (xi,), (d,))[1])(e)  # [k, out, n]
                total = total + hv[:, :, s : s + chunk].diagonal(dim1=0, dim2=2).sum(-1)
            rows.append(total)
        return torch.stack(rows)

    return run


def case(name: str, model, shape, x: torch.Tensor, xj: torch.Tensor, repeats: int, chunk: int) -> None:
    for p in model.parameters():  # with them, torch.func's Laplacian takes 2x the time and 10x the memory
        p.requires_grad_(False)
    one = per_point(model, shape)
    n = x[0].numel()
    flat = x.reshape(x.shape[0], -1)
    lines: list[str] = []
    plan = jaccli.plan("laplacian", model, x, per_sample=True)
    fns = {
        "jaccli": lambda: jaccli.laplacian(model, x, per_sample=True).reshape(x.shape[0], -1),
        f"hvp (jvp∘jacrev) x{chunk}": lambda: laplacian_by_hvp(one, n, chunk)(flat),
    }
    times, res = blocks(fns, repeats)
    lines += _report(name, "laplacian", plan, times, res, x.shape[0])
    print("\n".join(lines), flush=True)
    plan = jaccli.plan("jacobian", model, xj, per_sample=True)
    fns = {
        "jaccli": lambda: jaccli.jacobian(model, xj, per_sample=True).reshape(xj.shape[0], -1, n),
        "vmap(jacrev)": lambda: vmap(jacrev(one))(xj.reshape(xj.shape[0], -1)),
    }
    times, res = blocks(fns, max(repeats, 3))
    lines = _report(name, "jacobian", plan, times, res, xj.shape[0])
    print("\n".join(lines), flush=True)


def _report(name, kind, plan, times, res, points) -> list[str]:
    ref = res[list(res)[1]]
    best = min(v for k, v in times.items() if k != "jaccli")
    lines = [f"{name} per-sample {kind}, N={points}: jaccli plan = {plan.mode} mode, {plan.engine} engine"]
    for k, t in times.items():
        err = float((res[k] - ref).abs().max() / ref.abs().max())
        lines.append(f"  {k:22s} {t:8.3f} s   rel. diff {err:.1e}")
    lines.append(f"  torch.func best / jaccli = {best / times['jaccli']:.2f}x")
    return lines


#: (command, mode) pairs of the trace comparison: the fast path's two, and torch.func's reverse mode
TRACE_CASES = (("laplacian", "auto"), ("jacobian", "auto"), ("jacobian", "forward"), ("jacobian", "reverse"))


def traces_vs_pt2(names: list[str], points: int, repeats: int, cold: bool) -> None:
    """One line per (model, command): engines, warm medians, trace / .pt2, agreement."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        for m in saved(names, points, Path(tmp)):
            name, files, x = m.name, m.files, m.x
            xfile = Path(tmp) / f"{name}_x.npy"
            np.save(xfile, x.numpy())
            nets = {fmt: jaccli.load_model(str(path)) for fmt, path in files.items()}
            for kind, mode in TRACE_CASES:
                engines = {fmt: jaccli.plan(kind, net, x, per_sample=True, mode=mode).engine for fmt, net in nets.items()}
                fns = {fmt: (lambda net=net: getattr(jaccli, kind)(net, x, per_sample=True, mode=mode)) for fmt, net in nets.items()}
                times, res = blocks(fns, repeats)
                ref = res["pt2"]
                err = float((res["pt"] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                line = (f"{name:22s} {kind:9s} {mode:7s} engines pt {engines['pt']:10s} pt2 {engines['pt2']:10s} "
                        f"pt {times['pt']:8.4f} s  pt2 {times['pt2']:8.4f} s  pt/pt2 {times['pt'] / times['pt2']:5.2f}  "
                        f"rel. diff {err:.1e}")  # fmt: skip
                if cold:
                    line += "  cold CLI " + "  ".join(f"{fmt} {_cli_wall(kind, mode, path, xfile):.2f} s" for fmt, path in files.items())
                print(line, flush=True)


#: what ``--vs-func`` compares: jaccli's public functions, and the reduction of torch.func's Hessian to each
VS_FUNC_KINDS = {"hessian": lambda h: h, "laplacian": lambda h: h.diagonal(dim1=-2, dim2=-1).sum(-1)}


def vs_func(names: list[str], points: int, repeats: int, tol: float, formats=("pt", "pt2"), out=print) -> list[dict]:
    """jaccli's per-sample Hessian and Laplacian against ``vmap(hessian)`` on the same loaded
    model, each format, interleaved and each alone; both checked against float64. Returns one
    row per (model, format, kind) with ``jaccli``/``func`` medians interleaved and
    ``jaccli_alone``/``func_alone`` in blocks (None where a result is wrong)."""
    import statistics

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in saved(names, points, Path(tmp), formats):
            name, shape, module, files, static, x = m.name, m.shape, m.module, m.files, m.static, m.x
            module.requires_grad_(False)  # as load_model leaves the parameters: derivatives of the input only
            ref64 = func_hessian(module.double(), shape, None)(x.double())
            module.float()
            for fmt, path in files.items():
                net = jaccli.load_model(str(path))
                h_func = func_hessian(net, shape, static if fmt == "pt2" else None)
                for kind, reduce in VS_FUNC_KINDS.items():
                    pl = jaccli.plan(kind, net, x, per_sample=True)
                    fns = {
                        "jaccli": lambda kind=kind, net=net: getattr(jaccli, kind)(net, x, per_sample=True),
                        "func": lambda reduce=reduce, h_func=h_func: reduce(h_func(x)),
                    }
                    ref = reduce(ref64)
                    errs, runs = {}, {k: [] for k in fns}
                    for k, fn in fns.items():  # warm-up, and the result checked
                        got = fn().double().reshape(ref.shape)
                        errs[k] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                    for _ in range(max(1, repeats)):
                        for k, fn in fns.items():
                            t0 = time.perf_counter()
                            fn()
                            runs[k].append(time.perf_counter() - t0)
                    # each alone: a block of calls per candidate, the blocks run twice in turn
                    # (jaccli, func, func, jaccli) and the lower median of each kept
                    first, _ = blocks(fns, repeats)
                    second, _ = blocks(dict(reversed(fns.items())), repeats)
                    med = {k: (statistics.median(v) if errs[k] <= tol else None) for k, v in runs.items()}
                    alone = {k: (min(first[k], second[k]) if errs[k] <= tol else None) for k in fns}
                    ratio = med["func"] / med["jaccli"] if None not in med.values() else None
                    ratio_alone = alone["func"] / alone["jaccli"] if None not in alone.values() else None
                    row = {"model": name, "format": fmt, "kind": kind, "engine": pl.engine, "mode": pl.mode,
                           **med, "err_jaccli": errs["jaccli"], "err_func": errs["func"], "ratio": ratio,
                           "jaccli_alone": alone["jaccli"], "func_alone": alone["func"],
                           "ratio_alone": ratio_alone}  # fmt: skip
                    rows.append(row)
                    out(_vs_func_line(row))
    return rows


def _vs_func_line(r: dict) -> str:
    def sec(v):
        return "   wrong  " if v is None else f"{v:8.4f} s"

    def times(v) -> str:
        return "    -" if v is None else f"{v:5.2f}x"

    return (f"{r['model']:22s} {r['format']:3s} {r['kind']:9s} {r['engine']:8s} {r['mode']:8s} "
            f"jaccli {sec(r['jaccli'])}  func {sec(r['func'])}  func/jaccli {times(r['ratio'])}  "
            f"alone: jaccli {sec(r['jaccli_alone'])}  func {sec(r['func_alone'])}  {times(r['ratio_alone'])}  "
            f"f64 err jaccli {r['err_jaccli']:.1e} func {r['err_func']:.1e}")  # fmt: skip


def _cli_wall(kind: str, mode: str, model: Path, x: Path) -> float:
    """Wall seconds of ``jaccli KIND MODEL X -p`` in a fresh process (result saved, not printed)."""
    out = x.with_suffix(".out.npy")
    cmd = [sys.executable, "-m", "jaccli", kind, str(model), str(x), "-p", "--mode", mode, "--quiet",
           "--save", str(out), "--force"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=2, help="points of the Laplacians")
    ap.add_argument("--jacobian-points", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=128, help="directions per vmap of the torch.func Laplacian")
    ap.add_argument("--traces", action="store_true", help="every architecture: torch.jit.trace file against .pt2")
    ap.add_argument("--only", default="", help="with --traces or --vs-func: comma-separated model names (default: all)")
    ap.add_argument("--cold", action="store_true", help="with --traces: also the CLI's wall time in a fresh process")
    ap.add_argument("--vs-func", action="store_true",
                    help="every architecture, trace and .pt2: per-sample Hessian and Laplacian against vmap(hessian)")
    ap.add_argument("--tol", type=float, default=1e-4, help="with --vs-func: largest relative error from float64")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU", flush=True)
    if args.vs_func:
        from architectures import ZOO

        # torch.func's vmap(hessian) cannot batch nn.LSTM's fused kernel: the recurrent models are left out
        names = [n for n in args.only.split(",") if n] or [n for n, (_, _, recurrent) in ZOO.items() if not recurrent]
        with sdpa_kernel([SDPBackend.MATH]):  # torch.func's second derivatives need the math kernel
            vs_func(names, args.points, args.repeats, args.tol)
        return
    if args.traces:
        from architectures import ZOO

        names = [n for n in args.only.split(",") if n] or list(ZOO)
        traces_vs_pt2(names, args.points, args.repeats, args.cold)
        return
    with sdpa_kernel([SDPBackend.MATH]):  # torch.func's second derivatives need the math kernel
        cnn = SmallCNN().eval()
        case("SmallCNN 3x32x32 -> 10", cnn, (3, 32, 32), torch.randn(args.points, 3, 32, 32),
             torch.randn(args.jacobian_points, 3, 32, 32), args.repeats, args.chunk)
        tr = SmallTransformer().eval()
        case("SmallTransformer 16x64 -> 16", tr, (16, 64), torch.randn(args.points, 16, 64),
             torch.randn(args.jacobian_points, 16, 64), args.repeats, args.chunk)


if __name__ == "__main__":
    main()
