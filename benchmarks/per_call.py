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
- *check_inputs*: the whole of ``planner.check_inputs`` (the batch check included);
- *recheck*: ``jets.recheck`` (a kept program checked against the model);
- *lookup*: ``planner.program_for`` (the recheck included);
- *plan*: ``planner._taylor_plan``;
- *compute*: ``execute._execute_taylor`` (the chunk loop);
- *call*: the whole public call.

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
    ("check_inputs", "jaccli.engine.planner", "check_inputs"),
    ("recheck", "jaccli.jets", "recheck"),
    ("lookup", "jaccli.engine.planner", "program_for"),
    ("plan", "jaccli.engine.planner", "_taylor_plan"),
    ("compute", "jaccli.engine.execute", "_execute_taylor"),
)


def _wrap(spent: dict[str, float]) -> None:
    """Wrap every stage's function so that its time adds to ``spent[column]``."""
    import importlib

    for column, modname, attr in STAGES:
        mod = importlib.import_module(modname)
        fn = getattr(mod, attr, None)
        if fn is None:
            continue

        def timed(*a, _fn=fn, _col=column, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                spent[_col] += time.perf_counter() - t0

        setattr(mod, attr, timed)


def _save(name: str, shape, traced, module, tmp: Path) -> dict[str, Path]:
    """The model saved as a trace and as a ``.pt2`` (as ``benchmarks/architectures.py`` saves it)."""
    import make_examples
    import torch

    files = {"pt": tmp / f"{name}.pt", "pt2": tmp / f"{name}.pt2"}
    torch.jit.save(traced, files["pt"])
    example = (torch.randn(2, *shape),)
    try:
        make_examples.save_export(module, example, files["pt2"])
    except Exception:  # MultiheadAttention specialises the batch: static, as users must
        make_examples.save_export(module, example, files["pt2"], dynamic=False)
    return files


def breakdown(names: list[str], kind: str, points: int, calls: int) -> None:
    sys.path.insert(0, str(ROOT / "examples" / "models"))
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    import jaccli
    from architectures import ZOO, trace  # tests/architectures.py

    spent = {c: 0.0 for c, _, _ in STAGES}
    _wrap(spent)
    best: dict[tuple[str, str], dict[str, float]] = {}
    print(f"jaccli from {Path(jaccli.__file__).parent.parent}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {kind}, N = {points}, min of {calls} calls (ms)")  # fmt: skip
    cols = [c for c, _, _ in STAGES] + ["call"]
    print(f"{'model':20s} {'fmt':4s} " + " ".join(f"{c:>12s}" for c in cols), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            shape = ZOO[name][1]
            traced, module = trace(name)
            files = _save(name, shape, traced, module, Path(tmp))
            x = torch.randn(points, *shape, generator=torch.Generator().manual_seed(0))
            for fmt, path in files.items():
                net = jaccli.load_model(str(path))
                fn = getattr(jaccli, kind)
                fn(net, x, per_sample=True)  # records and keeps the program
                fn(net, x, per_sample=True)
                mins = {c: float("inf") for c in cols}
                for _ in range(calls):
                    for c in spent:
                        spent[c] = 0.0
                    t0 = time.perf_counter()
                    fn(net, x, per_sample=True)
                    spent_call = time.perf_counter() - t0
                    for c in spent:
                        mins[c] = min(mins[c], spent[c])
                    mins["call"] = min(mins["call"], spent_call)
                best[(name, fmt)] = mins
                print(f"{name:20s} {fmt:4s} " + " ".join(f"{mins[c] * 1e3:12.3f}" for c in cols), flush=True)


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
