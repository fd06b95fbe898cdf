"""Where the milliseconds of a repeated small call go: a per-call breakdown (issue 23).

    python benchmarks/per_call.py [--only maf,realnvp,...] [--kind laplacian] [--points 512]
                                  [--calls 40] [--threads 1] [--root CHECKOUT]
    python benchmarks/per_call.py --compare CHECKOUT_A CHECKOUT_B [--rounds 3] [...]

Each model of ``tests/architectures.py`` is saved by ``torch.jit.trace`` (``.pt``) and by
``torch.export`` (``.pt2``) and loaded by ``jaccli.load_model``; then ``jaccli.<kind>(net, x,
per_sample=True)`` is called again and again (same model, same per-point shapes: the call a
training loop or a sweep makes). The engine's stages are timed by wrappers around their
functions (each wrapper is looked up by name and skipped where a checkout lacks it), and
each figure is the minimum over ``--calls`` calls (minima: the machine is shared, and a
preempted call is not the code's cost):

- *batch check*: ``probe.check_batch_independence``;
- *check_inputs*: the whole of ``check_inputs`` as the request's entry calls it (``choice``'s,
  ``planner``'s in a checkout from before ``choice.py``; the batch check included);
- *recheck*: ``jets.recheck`` (a kept program checked against the model);
- *lookup*: ``planner.program_for`` (the recheck included);
- *plan*: ``taylor_plan`` as ``choice`` calls it (``_taylor_plan`` in older checkouts, ``planner``'s
  before ``choice.py``);
- *compute*: ``execute._execute_taylor`` (the chunk loop);
- *call*: the whole public call.

Each result is compared once with a float64 torch.func answer of the eager module; a row
off by more than 1e-4 (relative to the reference's largest entry) is marked WRONG.

``--root`` imports jaccli from another checkout (the models and this script stay this
checkout's); ``--compare A B`` runs this script on checkout A, then B, then A … (``--rounds``
processes each, alternating) and prints each process's table: the two checkouts are measured
in turn on the same machine state, the fair comparison on a shared machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: (column, module, attribute) of each stage timed
STAGES = (
    ("batch check", "jaccli.engine.probe", "check_batch_independence"),
    ("check_inputs", "jaccli.engine.choice", "check_inputs"),
    ("check_inputs", "jaccli.engine.planner", "check_inputs"),  # checkouts from before choice.py
    ("recheck", "jaccli.jets", "recheck"),
    ("lookup", "jaccli.engine.planner", "program_for"),
    ("plan", "jaccli.engine.choice", "taylor_plan"),
    ("plan", "jaccli.engine.choice", "_taylor_plan"),  # checkouts from before the name was public
    ("plan", "jaccli.engine.planner", "_taylor_plan"),  # checkouts from before choice.py
    ("compute", "jaccli.engine.execute", "_execute_taylor"),
)


def _wrap(spent: dict[str, float]):
    """Wrap every stage's function so that its time adds to ``spent[column]``; returns the
    function that puts the originals back."""
    import importlib

    originals = []
    for column, modname, attr in STAGES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError:  # a checkout from before that module
            continue
        fn = getattr(mod, attr, None)
        if fn is None:
            continue

        def timed(*a, _fn=fn, _col=column, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                spent[_col] += time.perf_counter() - t0

        originals.append((mod, attr, fn))
        setattr(mod, attr, timed)

    def restore() -> None:
        for mod, attr, fn in originals:
            setattr(mod, attr, fn)

    return restore


def breakdown(names: list[str], kind: str, points: int, calls: int, out=print, tol: float = 1e-4) -> list[dict]:
    """One row per (model, format): each stage's minimum over ``calls`` repeated calls (seconds),
    and the result's largest error relative to a float64 torch.func reference (a row whose
    result is off by more than ``tol`` has ``wrong`` set and is printed as such)."""
    sys.path.insert(0, str(ROOT / "examples" / "models"))
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    import jaccli
    from zoo import reference, saved

    spent = {c: 0.0 for c, _, _ in STAGES}
    cols = [*dict.fromkeys(c for c, _, _ in STAGES), "call"]
    rows: list[dict] = []
    out(f"jaccli from {Path(jaccli.__file__).parent.parent}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); {kind}, N = {points}, min of {calls} calls (ms)")  # fmt: skip
    out(f"{'model':20s} {'fmt':4s} " + " ".join(f"{c:>12s}" for c in cols) + "   f64 err")
    restore = _wrap(spent)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for m in saved(names, points, Path(tmp)):
                name, x = m.name, m.x
                ref = reference(kind, m.module, x)
                for fmt, path in m.files.items():
                    net = jaccli.load_model(str(path))
                    fn = getattr(jaccli, kind)
                    fn(net, x, per_sample=True)  # records and keeps the program
                    got = fn(net, x, per_sample=True).double().reshape(ref.shape)
                    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                    mins = {c: float("inf") for c in cols}
                    for _ in range(calls):
                        for c in spent:
                            spent[c] = 0.0
                        t0 = time.perf_counter()
                        fn(net, x, per_sample=True)
                        whole = time.perf_counter() - t0
                        for c in spent:
                            mins[c] = min(mins[c], spent[c])
                        mins["call"] = min(mins["call"], whole)
                    row = {"model": name, "format": fmt, **mins, "err": err, "wrong": err > tol}
                    rows.append(row)
                    figures = " ".join(f"{mins[c] * 1e3:12.3f}" for c in cols)
                    out(f"{name:20s} {fmt:4s} " + figures + ("   WRONG " if row["wrong"] else "   ") + f"{err:.1e}")
    finally:
        restore()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="maf,realnvp,silu_mlp,instance_norm_pool")
    ap.add_argument("--kind", default="laplacian", choices=("laplacian", "hessian", "jacobian"))
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--root", default=None, help="import jaccli from this checkout")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None, help="two checkouts, alternately")
    ap.add_argument("--rounds", type=int, default=2, help="with --compare: processes per checkout")
    args = ap.parse_args()
    if args.compare:
        from timing import compile_checkouts

        compile_checkouts(args.compare)
        rest = ["--only", args.only, "--kind", args.kind, "--points", str(args.points), "--calls", str(args.calls),
                "--threads", str(args.threads)]  # fmt: skip
        for r in range(args.rounds):
            for root in args.compare:
                print(f"--- round {r + 1}, {root}", flush=True)
                subprocess.run([sys.executable, __file__, "--root", str(Path(root).resolve()), *rest], check=True)
        return
    if args.root:
        sys.path.insert(0, str(Path(args.root).resolve()))
    else:
        sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    breakdown([n for n in args.only.split(",") if n], args.kind, args.points, args.calls)


if __name__ == "__main__":
    main()
