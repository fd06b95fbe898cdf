"""Curvature in parameter space: jaccli against the libraries people use, side by side in ONE run.

    python benchmarks/curvature.py [--task eig|trace|per-sample|full|all] [--width W] [--points N]
                                   [--full-width W] [--repeats R]

Issue 20's targets, on an MLP ``IN → W → W → 10`` (tanh, softmax cross-entropy, float32,
CPU; ≈ 2W² parameters: W=256 gives 84k, W=700 about 0.5M) over N random points with
random labels:

* ``eig``: the 10 largest Hessian eigenvalues — jaccli (``eigsh`` on its operator), PyHessian
  (power iteration with deflation: the largest |λ|, checked against those), hessian-eigenthings
  (``lanczos``, reorthogonalised), curvlinops
  (``HessianLinearOperator`` + ``scipy.sparse.linalg.eigsh``), all to ``--tol``;
* ``trace``: the same number of products — jaccli (per-sample probes of the linear layers'
  outputs, jaccli/curvature/layertrace.py), jaccli's parameter-space estimator
  (``--trace-method products``: Hutch++, or Hutchinson where its first pass finds the spectrum
  flat), curvlinops (``hutchpp_trace``), hessian-eigenthings (``hutch_plus_plus``); PyHessian's
  Hutchinson; each checked against the exact trace (float64, unit probes of the layers' outputs);
* ``per-sample``: the [N, P] per-sample gradients — jaccli, ``torch.func.vmap(grad)``,
  Opacus (``GradSampleModule``), BackPACK (``BatchGrad``);
* ``full``: the full Hessian of an MLP with P ≈ 5k (``--full-width``) — jaccli against a loop
  of ``autograd.grad`` rows of the gradient (double backward, the usual code).

Each candidate runs in its own process (``--run TASK NAME``: imports, model and data built
from the same seeds, one warm-up, the median of ``--repeats`` timed calls), so that no
library's allocations or thread pools reach another's timing. A peer that is not installed
is skipped with a line saying so (``pip install 'jaccli[bench]'`` brings those that install
against this torch). Every result is cross-checked against jaccli in float64: eigenvalues
and per-sample gradients by relative error, traces against jaccli's float64 estimate
within their standard errors, the full Hessian elementwise. Ratios are the peer's time
over jaccli's (above 1: jaccli is faster).

``--interleaved`` (tasks ``full``, ``per-sample`` and ``trace``): jaccli and its peer (the
``autograd.grad`` loop; ``torch.func.vmap(grad)``; PyHessian's Hutchinson and jaccli's
parameter-space estimator) in ONE process, called alternately on the same data, the median of
``--repeats`` calls each and the ratio of the medians — the measurement to trust on a shared
machine, where load drifts between separate processes. Both results are checked against each
other (max relative difference), in float32 and again in float64 (``--dtype``). The trace is
judged at the SAME TOLERANCE (``interleaved_trace``): seed ``r`` in repeat ``r``, every estimate
against the exact float64 trace, RMS error over the seeds, and the cost of a tolerance as median
time × mean squared error; ``--samples`` is jaccli's rounds, ``--peer-samples`` the products of
PyHessian and of jaccli's parameter-space estimator (default ``--samples``).

Measured (shared 2-core CPU under load, one thread; docs/curvature.md has the tables):
``--task full --interleaved --full-width 60 --points 1024 --repeats 3 --threads 1`` gave the loop
14.8× jaccli's time (P = 6 250, the layer-wise Hessian of jaccli/curvature/structured.py; 15.4× at
``--points 2048``; issue 20 asks 10×), ``--full-width 20 --points 256 --repeats 7 --dtype float64``
11.3× with a max relative difference of 1.1e-15. Per-sample gradients
(``--width 256 --points 2048``, P = 76 810; jaccli's linear layers by δxᵀ from one batched
backward): ``--task per-sample --interleaved --repeats 5 --threads 1`` gave ``vmap(grad)`` 2.03×
jaccli's time (bitwise equal rows); ``--task per-sample --repeats 5 --threads 1`` (own processes)
``vmap(grad)`` 2.12×, Opacus 3.27×, BackPACK 2.64×. ``--task eig --repeats 3 --threads 1``:
PyHessian 8.9×, hessian-eigenthings 16×, curvlinops 1.27×. ``--task trace --repeats 3
--threads 1``: PyHessian 0.87× (jaccli slower), hessian-eigenthings 0.97×, curvlinops 1.37× at
99 products each; interleaved with PyHessian (``--task trace --interleaved --repeats 3 --threads 1``)
0.79× at 99 products each and **0.86× at equal standard error** (0.57 and 0.59), 0.91× with
``--peer-samples 106`` (0.57 both); before jaccli chose between Hutch++ and Hutchinson it was
0.23× at equal standard error (on this flat spectrum Hutch++ had 1.9× Hutchinson's standard
error). The rest of the gap was the cost of jaccli's products: strided cotangents and the
products' columns (docs/curvature.md, "Where the last ≈ 10 % went"); with those fixed, 2026-12-06,
under load (load average ≈ 5), ``--task trace --interleaved --repeats 5 --threads 1`` gave PyHessian
**1.18×** jaccli's time at 99 products each and **1.27× at equal standard error** (jaccli 4.63 s,
PyHessian 5.48 s). About 0.5M parameters (``--width 700 --points 512``, P = 520 810, same load):
trace interleaved 0.87× (0.91× at equal standard error: jaccli's probes and quadratic forms,
not its products), per-sample ``--interleaved`` ``vmap(grad)`` 1.77×, eig (``--run eig NAME``)
curvlinops 1.35×; every peer there, 2026-12-06 under load (load average 3-4.6): per-sample
``--interleaved`` ``vmap(grad)`` 2.33-2.86×, Opacus 3.83-5.70×, BackPACK 1.80-1.98× (two runs);
``--task eig --repeats 1`` PyHessian 1.92×, hessian-eigenthings 6.07×, curvlinops 1.95×.
``--process --task trace --baseline PATH`` adds a second jaccli checkout
(e.g. ``git archive main jaccli | tar -x -C PATH``) to the whole-process rounds.

The trace at the same tolerance, 2026-12-06, under load (docs/curvature.md, "The trace at the
same tolerance"): ``--task trace --interleaved --repeats 5 --threads 1 --samples 8 --peer-samples 99``
gave jaccli a 6× smaller RMS error than PyHessian's 99 products in 0.061 of its time (time ×
squared error 630×); at ``--width 700 --points 512 --repeats 3`` 2.7× smaller in 0.068 of its
time (105×). The older trace figures above are of the parameter-space estimator.

Smoke test (tiny sizes, timings meaningless): ``python benchmarks/curvature.py --width 16 --points 64 --full-width 8 --repeats 1``
(add ``--task full --interleaved`` for the in-process A/B)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import rotated  # noqa: E402

IN, CLASSES, K = 32, 10, 10

PEERS = {
    "eig": ["jaccli", "pyhessian", "hessian-eigenthings", "curvlinops"],
    "trace": ["jaccli", "jaccli-products", "pyhessian", "hessian-eigenthings", "curvlinops"],
    "per-sample": ["jaccli", "torch.func", "opacus", "backpack"],
    "full": ["jaccli", "autograd-loop"],
}
#: the module each peer needs, to tell "not installed" from a failure
NEEDS = {"pyhessian": "pyhessian", "hessian-eigenthings": "hessian_eigenthings", "curvlinops": "curvlinops",
         "opacus": "opacus", "backpack": "backpack"}  # fmt: skip


def build(width: int, points: int, dtype):
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, CLASSES))
    net = net.to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(points, IN, generator=g).to(dtype)
    y = torch.randint(0, CLASSES, (points,), generator=g)
    return net, x, y


# ------------------------------------------------------------------ candidates: () -> numbers (lists)


def jaccli_eig(net, x, y, a):
    import jaccli

    return jaccli.curvature(net, x, y, loss="cross-entropy", eig=K, tol=a.tol).eigenvalues.tolist()


def pyhessian_eig(net, x, y, a):
    from pyhessian import hessian
    from torch import nn

    vals, _ = hessian(net, nn.CrossEntropyLoss(), data=(x, y), cuda=False).eigenvalues(top_n=K, tol=a.tol, maxIter=1000)
    return sorted(vals, reverse=True)


def eigenthings_op(net, x, y):
    import hessian_eigenthings as he
    from torch import nn

    return he.HessianOperator(net, [(x, y)], he.supervised_loss(nn.CrossEntropyLoss()))


def eigenthings_eig(net, x, y, a):
    import hessian_eigenthings as he

    # its default of 2K Lanczos steps stops before the tolerance is met; it stops early once it is
    p = sum(t.numel() for t in net.parameters())
    # past 50 steps it skips reorthogonalisation unless asked, and returns ghost copies of the top eigenvalue
    r = he.lanczos(eigenthings_op(net, x, y), k=K, which="LA", tol=a.tol, seed=0, max_iter=min(p - 1, 30 * K),
                   reorthogonalize=True)
    return sorted(r.eigenvalues.tolist(), reverse=True)


def curvlinops_op(net, x, y):
    from curvlinops import HessianLinearOperator
    from torch import nn

    params = [p for p in net.parameters() if p.requires_grad]
    return HessianLinearOperator(net, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)


def curvlinops_eig(net, x, y, a):
    from scipy.sparse.linalg import eigsh

    w = eigsh(curvlinops_op(net, x, y).to_scipy(), k=K, which="LA", tol=a.tol)[0]
    return sorted(w.tolist(), reverse=True)


def jaccli_trace(net, x, y, a, method="auto", samples=None):
    import jaccli
    from jaccli.curvature import api

    api.EXACT_LIMIT = 0  # an estimator, as the peers run one, at every size
    if a.reference:  # the exact trace (unit probes of the layers' outputs), where the estimates are checked against it
        return [exact_trace(net, x, y), None]
    r = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, samples=samples or a.samples, seed=getattr(a, "seed", 0),
                         trace_method=method)  # fmt: skip
    return [r.trace, r.trace_stderr]


def jaccli_products_trace(net, x, y, a):
    """jaccli's parameter-space estimator (Hutch++ / Hutchinson), as before the layers' one, with PyHessian's products."""
    return jaccli_trace(net, x, y, a, method="products", samples=a.peer_samples or a.samples)


def exact_trace(net, x, y) -> float:
    """The Hessian's exact trace: ``Σₙ Σₗ ‖ãₙ,ₗ‖² tr ∂²ℓₙ/∂z_l²`` by unit probes of the layers' outputs
    (``Σ d_l`` backward passes, jaccli/curvature/layertrace.py), in the net's dtype."""
    import jaccli

    r = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, samples=10**9, trace_method="layers")
    assert r.trace_stderr is None
    return r.trace


def pyhessian_trace(net, x, y, a):
    from pyhessian import hessian
    from torch import nn

    import torch

    torch.manual_seed(getattr(a, "seed", 0))  # its Rademacher probes come from torch's global generator
    est = hessian(net, nn.CrossEntropyLoss(), data=(x, y), cuda=False).trace(maxIter=a.peer_samples or a.samples, tol=0.0)
    return [statistics.fmean(est), statistics.stdev(est) / len(est) ** 0.5]


def eigenthings_trace(net, x, y, a):
    import hessian_eigenthings as he

    r = he.hutch_plus_plus(eigenthings_op(net, x, y), num_matvecs=a.samples, seed=0)
    return [float(r.estimate), None]


def curvlinops_trace(net, x, y, a):
    from curvlinops import hutchpp_trace

    return [float(hutchpp_trace(curvlinops_op(net, x, y), num_matvecs=a.samples)), None]


def jaccli_per_sample(net, x, y, a):
    import jaccli

    return jaccli.grads(net, x, y, loss="cross-entropy", per_sample=True).per_sample


def func_per_sample(net, x, y, a):
    import torch
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([t.reshape(x.shape[0], -1) for t in g.values()], 1)


def opacus_per_sample(net, x, y, a):
    import torch
    from opacus import GradSampleModule

    m = GradSampleModule(net, loss_reduction="sum")
    m.zero_grad(set_to_none=True)
    # sum reduction: each sample's gradient is its own loss's, as jaccli's per-sample rows
    torch.nn.functional.cross_entropy(m(x), y, reduction="sum").backward()
    out = torch.cat([p.grad_sample.reshape(x.shape[0], -1) for p in m.parameters()], 1)
    m._close()
    return out


def backpack_per_sample(net, x, y, a):
    import torch
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    m, lossf = extend(net), extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    m.zero_grad()
    with backpack(BatchGrad()):
        lossf(m(x), y).backward()
    return torch.cat([p.grad_batch.reshape(x.shape[0], -1) for p in m.parameters()], 1)


def jaccli_full(net, x, y, a):
    import jaccli

    return jaccli.curvature(net, x, y, loss="cross-entropy", full=True).full


def loop_full(net, x, y, a):
    import torch

    params = list(net.parameters())
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), params, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in g])
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], params, retain_graph=True)]) for i in range(len(g))]
    return torch.stack(rows)


CANDIDATES = {
    ("eig", "jaccli"): jaccli_eig, ("eig", "pyhessian"): pyhessian_eig,
    ("eig", "hessian-eigenthings"): eigenthings_eig, ("eig", "curvlinops"): curvlinops_eig,
    ("trace", "jaccli"): jaccli_trace, ("trace", "pyhessian"): pyhessian_trace,
    ("trace", "hessian-eigenthings"): eigenthings_trace, ("trace", "curvlinops"): curvlinops_trace,
    ("trace", "jaccli-products"): jaccli_products_trace,
    ("per-sample", "jaccli"): jaccli_per_sample, ("per-sample", "torch.func"): func_per_sample,
    ("per-sample", "opacus"): opacus_per_sample, ("per-sample", "backpack"): backpack_per_sample,
    ("full", "jaccli"): jaccli_full, ("full", "autograd-loop"): loop_full,
}  # fmt: skip


def _summary(task: str, value):
    """What goes back to the parent: numbers for eig/trace, a digest of large arrays."""
    import numpy as np

    if task in ("eig", "trace"):
        return value
    arr = np.asarray(value.detach().double() if hasattr(value, "detach") else value, dtype=np.float64)
    path = os.environ["CURV_BENCH_OUT"]
    np.save(path, arr)
    return path


def run_one(task: str, name: str, a) -> None:
    """The child process: one candidate, timed."""
    import importlib.util

    import torch

    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        print(json.dumps({"skipped": f"{name} is not installed"}))
        return
    torch.set_num_threads(a.threads)
    dtype = torch.float64 if a.reference else torch.float32
    width = a.full_width if task == "full" else a.width
    net, x, y = build(width, a.points, dtype)
    fn = CANDIDATES[(task, name)]
    value = fn(net, x, y, a)  # warm-up (and the result)
    if a.reference and task == "eig":  # PyHessian's power iteration finds the largest |λ|: its own reference
        import jaccli

        r = jaccli.curvature(net, x, y, loss="cross-entropy", eig=K, which="magnitude", tol=a.tol)
        value = {"largest": value, "magnitude": sorted(r.eigenvalues.tolist(), reverse=True)}
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        fn(net, x, y, a)
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in net.parameters())
    print(json.dumps({"seconds": statistics.median(times) if times else None, "params": params, "result": _summary(task, value)}))


def child(task: str, name: str, a, out: Path, reference: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--run", task, name, "--width", str(a.width), "--points", str(a.points),
           "--full-width", str(a.full_width), "--repeats", str(0 if reference else a.repeats), "--tol", str(a.tol),
           "--samples", str(a.samples), "--threads", str(a.threads)] + (["--reference"] if reference else []) \
        + (["--peer-samples", str(a.peer_samples)] if a.peer_samples else [])  # fmt: skip
    env = {**os.environ, "CURV_BENCH_OUT": str(out), "OMP_NUM_THREADS": str(a.threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"failed": (r.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def check(task: str, got, ref, name: str = "") -> str:
    """How far a result is from jaccli's float64 one."""
    import numpy as np

    if task == "eig":
        which = "magnitude" if name == "pyhessian" else "largest"
        want = np.array(ref[which])
        err = np.max(np.abs(np.array(got) - want) / np.maximum(np.abs(want), 1e-12))
        return f"max rel. error {err:.1e}" + (" (largest |λ|)" if which == "magnitude" else "")
    if task == "trace":  # against the exact float64 trace
        value, se = got
        diff = abs(value - ref[0])
        return f"{value:.6g} (exact {ref[0]:.6g}, rel. error {diff / abs(ref[0]):.1e}" + \
            (f", {diff / se:.1f} of its standard errors)" if se else ")")
    a, b = np.load(got), np.load(ref)
    return f"max rel. error {np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300):.1e}"


def interleaved_trace(a) -> None:
    """The trace at the SAME TOLERANCE: jaccli (``--samples`` rounds), jaccli's parameter-space
    estimator and PyHessian (``--peer-samples`` products each) alternately in this process, seed
    ``r`` in repeat ``r``, every estimate against the exact trace.

    Tolerance is judged by the error against the exact trace (unit probes of the layers' outputs
    in float64, ``exact_trace``), not by the standard error each reports: over the ``--repeats``
    seeds, each estimator's RMS error. "Time to the same tolerance" is the median time × the
    mean squared error — for an unbiased estimator the squared error falls as 1/products, so
    this is the time each would take to reach the other's error (fixed costs counted as if they
    scaled too, which favours the slower-per-product side) — and the direct reading: where jaccli's RMS
    error is at most the peer's, the ratio of the median times is a time to a tolerance at least
    as tight. Each line also gives the mean reported standard error and the largest |error| /
    standard error (honesty of the error bars).
    """
    import copy
    import math

    import torch

    torch.set_num_threads(a.threads)
    dtype = torch.float64 if a.dtype == "float64" else torch.float32
    net, x, y = build(a.width, a.points, dtype)
    t0 = time.perf_counter()
    exact = exact_trace(copy.deepcopy(net).double(), x.double(), y)  # (Module.double() converts in place)
    t_exact = time.perf_counter() - t0
    peers = a.peer_samples or a.samples
    pair = [("jaccli", jaccli_trace, a.samples), ("jaccli-products", jaccli_products_trace, peers),
            ("pyhessian", pyhessian_trace, peers)]  # fmt: skip
    for _, fn, _ in pair:
        fn(net, x, y, a)  # warm-up

    def seeded(r, fn):  # seed r in repeat r, for every estimator
        a.seed = r
        return fn(net, x, y, a)

    times, got = rotated({name: lambda r, fn=fn: seeded(r, fn) for name, fn, _ in pair}, a.repeats, keep=True)
    p = sum(t.numel() for t in net.parameters())
    print(f"trace ({a.dtype}, {a.threads} thread(s)): P = {p:,}, N = {a.points:,}, {a.repeats} seeds; exact "
          f"{exact:.6g} (float64, {t_exact:.1f} s)")  # fmt: skip
    cost = {}
    for name, _, k in pair:
        med = statistics.median(times[name])
        err = [v - exact for v, _ in got[name]]
        rms = math.sqrt(statistics.fmean(e * e for e in err))
        ses = [s for _, s in got[name] if s is not None]  # none where jaccli's rounds covered the unit probes
        bars = f"mean s.e. {statistics.fmean(ses):.3g}  max |error|/s.e. " \
               f"{max(abs(e) / s for e, (_, s) in zip(err, got[name])):.1f}" if ses else "exact"
        cost[name] = (med, rms, med * rms**2 if ses else 0.0, med * statistics.fmean(ses) ** 2 if ses else 0.0)
        print(f"  {name:<16} {k:4d} {'rounds' if name == 'jaccli' else 'products'}  median {med:8.3f} s  "
              f"RMS error {rms:.3g} ({rms / abs(exact):.1e} rel.)  {bars}")
    for name in ("jaccli-products", "pyhessian"):
        med, rms, c, c_se = cost[name]
        direct = f"; jaccli's RMS error at most {name}'s, in {cost['jaccli'][0] / med:.3f} of its time" \
            if cost["jaccli"][1] <= rms else ""
        same = f"{c / cost['jaccli'][2]:.1f}" if cost["jaccli"][2] > 0 else "∞ (jaccli exact)"
        by_se = f"{c_se / cost['jaccli'][3]:.1f}" if cost["jaccli"][3] > 0 else "∞"
        print(f"  at the same tolerance: {name} / jaccli = {same} (median time × mean squared error; {by_se} by "
              f"median time × mean s.e.²){direct}")  # fmt: skip


def interleaved(task: str, a) -> None:
    """jaccli and its peers alternately in this process: medians and their ratios (``per-sample``:
    ``vmap(grad)``, and Opacus and BackPACK where installed, each on its own copy of the net,
    since both hook into the module)."""
    import copy
    import importlib.util

    import torch

    if task == "trace":
        return interleaved_trace(a)

    torch.set_num_threads(a.threads)
    dtype = torch.float64 if a.dtype == "float64" else torch.float32
    net, x, y = build(a.full_width if task == "full" else a.width, a.points, dtype)
    names = {"full": ["jaccli", "autograd-loop"], "per-sample": PEERS["per-sample"]}[task]
    names = [n for n in names if n not in NEEDS or importlib.util.find_spec(NEEDS[n]) is not None]
    own = {n: copy.deepcopy(net) if n in ("opacus", "backpack") else net for n in names}
    cands = [(n, CANDIDATES[(task, n)]) for n in names]
    got = {n: torch.as_tensor(fn(own[n], x, y, a)) for n, fn in cands}  # warm-up and the results
    times, _ = rotated({n: lambda r, n=n, fn=fn: fn(own[n], x, y, a) for n, fn in cands}, a.repeats)
    med = {n: statistics.median(t) for n, t in times.items()}
    p = sum(t.numel() for t in net.parameters())
    print(f"{task} ({a.dtype}, {a.threads} thread(s)): P = {p:,}, N = {a.points:,}, medians of {a.repeats}")
    for n, t in med.items():
        print(f"  {n:<14} {t:9.4f} s   ({', '.join(f'{v:.3f}' for v in times[n])})")
    for n in names[1:]:
        diff = float((got["jaccli"] - got[n]).abs().max() / got[n].abs().max())
        print(f"  ratio {n} / jaccli = {med[n] / med['jaccli']:.2f}   max relative difference {diff:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="all", choices=[*PEERS, "all"])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--points", type=int, default=2048)
    ap.add_argument("--full-width", type=int, default=60, help="MLP width of the full-Hessian task (60: P = 5.9k)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=99, help="products of the trace estimates")
    ap.add_argument("--peer-samples", type=int, help="trace: PyHessian's products (default --samples)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--interleaved", action="store_true",
                    help="full / per-sample / trace: jaccli and its peer alternately in one process")  # fmt: skip
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="with --interleaved")
    ap.add_argument("--process", action="store_true",
                    help="whole processes: the jaccli command against a peer's script on the same files "
                         "(benchmarks/curvature_process.py)")  # fmt: skip
    ap.add_argument("--baseline", type=Path, help="with --process: another checkout of jaccli, measured alongside")
    ap.add_argument("--run", nargs=2, metavar=("TASK", "NAME"), help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.process:
        import curvature_process

        return curvature_process.main(a.width, a.points, a.repeats, a.tol, a.samples,
                                      None if a.task in ("all", "full") else (a.task,), a.baseline)
    if a.run:
        return run_one(*a.run, a)
    if a.interleaved:
        for task in ["full", "per-sample", "trace"] if a.task == "all" else [a.task]:
            interleaved(task, a)
        return
    import tempfile

    # the results (per-sample gradients at 0.5M parameters: gigabytes) go with the directory
    with tempfile.TemporaryDirectory(prefix="curv-bench-") as tmp:
        own_processes(a, Path(tmp))


def own_processes(a, tmp: Path) -> None:
    """Every peer of each task in its own process, results in ``tmp``, checked against jaccli's float64 run."""
    for task in PEERS if a.task == "all" else [a.task]:
        ref = child(task, "jaccli", a, tmp / f"{task}-ref.npy", reference=True)
        if "failed" in ref:
            print(f"{task}: the float64 reference failed: {ref['failed']}")
            continue
        print(f"\n{task}: {ref['params']:,} parameters, {a.points:,} points")
        base = None
        for name in PEERS[task]:
            r = child(task, name, a, tmp / f"{task}-{name}.npy")
            if "skipped" in r or "failed" in r:
                print(f"  {name:<22} {r.get('skipped') or 'failed: ' + r['failed']}")
                continue
            base = r["seconds"] if name == "jaccli" else base
            ratio = "" if base is None or name == "jaccli" else f"  {r['seconds'] / base:6.2f}× jaccli's time"
            print(f"  {name:<22} {r['seconds']:9.4f} s{ratio}   {check(task, r['result'], ref['result'], name)}")


if __name__ == "__main__":
    main()
