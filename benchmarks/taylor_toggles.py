"""Before → after of the Taylor-pass changes of issue 23, in one process, alternately.

    python benchmarks/taylor_toggles.py --jobs u_xxxx,hessian --rounds 11

Runs a job of ``benchmarks/peers.py`` (same model, weights and inputs, jaccli's Python API
call) with the earlier behaviour and the current one toggled call by call: ``torch.tanh``
against ``elementwise._tanh``, gathered Hessian squares against ``_Call.runs``, and series
passes of 768 MiB against ``partials._PASS_BYTES``, and the ODE series recurrence of
``--base`` (``jets/chain.py`` read from git) against the current one. On a shared machine the two sides see
the same load, which separate runs do not; it prints medians of wall and CPU seconds
(CPU time is the steadier figure under load). One thread (``--threads``).

``--compile`` compares today's eager passes with fused Taylor kernels forced on
(``compile="on"``, :mod:`jaccli.jets.fused`; compiled in the warm-up call, not timed).

``--eager`` runs both sides with ``compile="off"`` (under ``auto`` the sides share one
program and its ledger, which may compile mid-run). ``--set fold`` toggles the later changes
instead: the first layer folded into the second layer's GEMM (:mod:`jaccli.jets.fold`, off as
``fold.MIN_ROWS`` past any pass) and ``f′``, ``f″`` of tanh, sigmoid and tan by ``addcmul``
(``elementwise._low_derivs``, off: Horner). ``--set tanh-series`` toggles NumPy's float32 tanh
(``elementwise.NUMPY_TANH``, off: the five ``expm1`` passes) and the first layer of a series
folded (``fold``'s ``first-series``, off: its run declines).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def _base_module(path: str, rev: str, name: str):
    """The module at ``path`` as of git revision ``rev`` (None where git cannot show it)."""
    import subprocess
    import types

    r = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{rev}:{path}"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    module = types.ModuleType(name)
    exec(compile(r.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="u_xxxx,hessian,pinn-jacobian,pinn-hessian,laplacian-mlp,laplacian-pinn")
    ap.add_argument("--rounds", type=int, default=11, help="calls per side (median)")
    ap.add_argument("--points", type=int, help="N (default: the job's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true",
                    help="instead: eager (before) against fused Taylor kernels forced on (after, compile='on')")
    ap.add_argument("--base", default="main", help="git revision whose ODE recurrence is 'before' (default main)")
    ap.add_argument("--eager", action="store_true",
                    help="compile='off' on both sides: auto's ledger, shared by the sides, may compile mid-run")
    ap.add_argument("--set", default="earlier", choices=("earlier", "fold", "tanh-series"),
                    help="which changes to toggle: the earlier ones (default), the first-layer fold and addcmul "
                         "derivatives, or NumPy's tanh and the series fold")
    a = ap.parse_args(argv)
    if a.eager and a.compile:
        ap.error("--eager and --compile contradict each other (--compile's after side is compile='on')")

    import torch

    import peers
    import jaccli.engine.partials as partials
    import jaccli.jets.elementwise as elementwise
    import jaccli.jets.jet as jet

    torch.set_num_threads(a.threads)
    import jaccli.jets.chain as chain

    now = (elementwise._tanh, jet._Call.runs, partials._PASS_BYTES, chain._ode_chain)
    old_chain = _base_module("jaccli/jets/chain.py", a.base, "chain_before")
    if old_chain is None:
        print(f"(the ODE recurrence is not toggled: jaccli/jets/chain.py of {a.base} could not be read from git)")

    import jaccli.jets.fold as fold

    later = (fold.MIN_ROWS, elementwise._low_derivs)
    numpy_tanh, series_run = elementwise.NUMPY_TANH, fold._first_series_run
    series_on = [True]

    def series_toggled(*args):  # made where a schedule is (the first call): asks the switch at each pass
        run = series_run(*args)
        return lambda cx, env, batch: run(cx, env, batch) if series_on[0] else None

    if a.set == "tanh-series":
        fold._first_series_run = series_toggled

    def before():
        if a.set == "fold":
            fold.MIN_ROWS, elementwise._low_derivs = 2**62, lambda *args: None
            return
        if a.set == "tanh-series":
            elementwise.NUMPY_TANH, series_on[0] = False, False
            return
        elementwise._tanh = lambda x, out: torch.tanh(x, out=out)
        jet._Call.runs = property(lambda self: None)
        partials._PASS_BYTES = 768 * 2**20
        if old_chain is not None:
            chain._ode_chain = old_chain._ode_chain

    def after():
        elementwise._tanh, jet._Call.runs, partials._PASS_BYTES, chain._ode_chain = now
        fold.MIN_ROWS, elementwise._low_derivs = later
        elementwise.NUMPY_TANH, series_on[0] = numpy_tanh, True

    with tempfile.TemporaryDirectory(prefix="taylor-toggles-") as tmp:
        for name in a.jobs.split(","):
            job = peers.JOBS[name]
            d = Path(tmp) / name
            d.mkdir()
            peers.build(job, a.points or job.points, d)
            thunks = {}
            for side, cand in (("before", "jaccli"), ("after", peers.COMPILED if a.compile else "jaccli")):
                scope: dict = {"__name__": "candidate"}
                src = peers.source(job, cand)
                if a.eager:
                    src = src.replace("per_sample=True)", 'per_sample=True, compile="off")')
                exec(compile(src, name, "exec"), scope)
                thunks[side] = scope["make"](d, "float32", "cpu")
            wall: dict = {"before": [], "after": []}
            cpu: dict = {"before": [], "after": []}
            # --compile: both sides today's code, eager against fused kernels forced on
            sides = (("before", after if a.compile else before), ("after", after))
            for side, switch in sides:  # warm-up (the compiled side compiles here)
                switch()
                thunks[side]()
            for r in range(a.rounds):
                for side, switch in sides if r % 2 == 0 else sides[::-1]:  # each side goes first in turn
                    switch()
                    c0, t0 = time.process_time(), time.perf_counter()
                    thunks[side]()
                    wall[side].append(time.perf_counter() - t0)
                    cpu[side].append(time.process_time() - c0)
            after()
            m = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in wall}
            print(f"{name:<14} CPU s {m['before'][1]:.4f} -> {m['after'][1]:.4f} ({m['after'][1] / m['before'][1]:.3f})"
                  f"   wall s {m['before'][0]:.4f} -> {m['after'][0]:.4f} ({m['after'][0] / m['before'][0]:.3f})",
                  flush=True)  # fmt: skip
    fold._first_series_run = series_run
    return 0


if __name__ == "__main__":
    sys.exit(main())
