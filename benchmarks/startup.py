"""How fast the ``jaccli`` process answers, against what a plain script pays, in ONE run.

    python benchmarks/startup.py [--repeats R] [--points N] [--only CMD] [--baseline PATH]

Three figures (issues 8 and 23's goals):

* ``jaccli --help``, ``--version``, ``jacobian --help`` and a shell-completion query:
  wall time of the whole process (goal: at most 0.3 s each).
* ``jaccli jacobian pinn.pt x.npy --per-sample --save J.npy`` on the seed PINN at
  ``--points`` points (default 1000) against the ten-line torch.func script below doing
  the same (load the TorchScript model and the .npy, ``vmap(jacfwd)``, save): the ratio of
  their process wall times (goal: at most 1.0).

* the fixed cost of every command on a small model (issue 23: at most 0.3 s), split into
  the interpreter, ``import torch``, ``import jaccli.cli.main``, the compute and the rest.
  The compute is the same command run again in the process that ran it once (the median of
  the warm runs): what a run costs once every import, trace and cache is paid. The fixed
  cost is the whole process less ``python -c "import torch"`` less the compute: jaccli's
  own imports and whatever it loads lazily (torch submodules, scipy, pydantic, …). It is
  negative where the jaccli process imports torch for less than a plain ``import torch``
  costs (it holds Python's garbage collector off while it starts, :mod:`jaccli.cli.collector`):
  ``own`` is the whole process less ``import torch`` with the collector disabled and torch's
  objects frozen too (which also spares the collections at exit), less the compute — what
  jaccli adds to the cheapest torch import.
  ``--only CMD`` measures that command alone (and skips the other two figures);
  ``--baseline PATH`` measures another checkout of jaccli (``git archive main | tar -x -C
  PATH``) in the same rounds, with the same interpreter and packages, and prints both.

Every candidate is a fresh process, so imports count as a user sees them. Candidates
take turns (round-robin, one warm-up round first) and the figures are medians, so that
the drift of a shared machine hits both terms of a ratio alike. Every process runs with
one thread (``OMP_NUM_THREADS=1``): the two figures of a difference then see the same
machine. The fixed-cost figures are CPU seconds (user + system) by default: on a machine
shared with other work a process's wall time grows with the load (``import torch`` went from
1.3 s to 2.7 s here), its CPU time far less; ``--clock wall`` measures wall time instead.

Every checkout's ``jaccli`` is byte-compiled first (``compileall``), as ``pip install`` leaves
it: with ``PYTHONDONTWRITEBYTECODE=1`` set (as on the project's shared machines) an editable
checkout would otherwise compile its ~60 modules again in every process, 0.1-0.2 s that no
installed copy pays (``--no-compile`` keeps that cost, to see it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from timing import child_seconds, compile_checkouts

ROOT = Path(__file__).resolve().parent.parent
PINN = ROOT / "examples" / "models" / "pinn.pt"

#: what a user would write by hand for the same result (the baseline)
SCRIPT = """
import sys, numpy as np, torch
from torch.func import jacfwd, vmap
model = torch.jit.load(sys.argv[1], map_location="cpu").eval()
x = torch.from_numpy(np.load(sys.argv[2], allow_pickle=False))
with torch.no_grad():
    J = vmap(jacfwd(lambda p: model(p[None])[0]))(x)
np.save(sys.argv[3], J.numpy())
"""


#: the commands whose fixed cost is measured: small models of ``examples/models``, one run each
COMMANDS = {
    "jacobian": ["jacobian", "pinn.pt", "pinn_x.npy", "-p", "--save", "out.npy", "--force", "-q"],
    "hessian": ["hessian", "pinn.pt", "pinn_x.npy", "-p", "--save", "out.npy", "--force", "-q"],
    "laplacian": ["laplacian", "pinn.pt", "pinn_x.npy", "-p", "--save", "out.npy", "--force", "-q"],
    "divergence": ["divergence", "field.pt", "field_x.npy", "-p", "--save", "out.npy", "--force", "-q"],
    "partials": ["partials", "heat.pt", "heat_x.npy", "-p", "--in", "t,x", "--want", "u_t,u_xx", "-q"],
    "grads": ["grads", "potential.pt", "potential_x.npy", "--loss", "output", "-q"],
    "curvature": ["curvature", "potential.pt", "potential_x.npy", "--loss", "output", "--trace", "--diag"],
    "info": ["info", "pinn.pt", "pinn_x.npy"],
}

#: runs the CLI in one process ``reps + 1`` times and prints each run's seconds (the first is cold)
WARM = """
import json, sys, time
import typer
from jaccli.cli.main import app
command = typer.main.get_command(app)
args, reps, times = json.loads(sys.argv[1]), int(sys.argv[2]), []
clock = time.process_time if sys.argv[3] == "cpu" else time.perf_counter
for _ in range(reps + 1):
    t0 = clock()
    try:
        command.main(args, prog_name="jaccli")
    except SystemExit as exc:
        if exc.code:
            raise
    times.append(clock() - t0)
print(json.dumps(times), file=sys.stderr)
"""


def jaccli_exe() -> list[str]:
    found = shutil.which("jaccli", path=str(Path(sys.executable).parent)) or shutil.which("jaccli")
    return [found] if found else [sys.executable, "-m", "jaccli"]


def race(cmds: dict[str, list[str]], repeats: int, env: dict[str, str]) -> dict[str, float]:
    """Median wall seconds of each command, run in turns after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for round_ in range(repeats + 1):
        for name, cmd in cmds.items():
            wall, _ = child_seconds(cmd, env)
            if round_:
                times[name].append(wall)
    return {k: statistics.median(v) for k, v in times.items()}


def fixed_costs(names: list[str], checkouts: dict[str, Path], repeats: int, warm_runs: int, clock: str = "cpu") -> dict:
    """Per checkout and command: the medians of the parts of a whole process (seconds)."""
    base_env = {**os.environ, "COLUMNS": "100", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    envs = {who: {**base_env, "PYTHONPATH": str(root)} for who, root in checkouts.items()}
    py = sys.executable
    parts = {who: {n: {"total": [], "compute": []} for n in names} for who in checkouts}
    shared = {"interpreter": [], "import torch": [], "import torch, GC off": []}
    imports = {who: [] for who in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for name in EXAMPLE_FILES:
            shutil.copy(PINN.parent / name, tmp)

        def timed(cmd, env) -> float:
            wall, cpu = child_seconds(cmd, env, cwd=tmp)
            return cpu if clock == "cpu" else wall

        for round_ in range(repeats + 1):
            keep = round_ > 0  # the first round warms the file cache
            for key, code in (("interpreter", "pass"), ("import torch", "import torch"),
                              ("import torch, GC off", "import gc; gc.disable(); import torch; gc.freeze()")):
                t = timed([py, "-c", code], base_env)
                if keep:
                    shared[key].append(t)
            for who, env in envs.items():
                t = timed([py, "-c", "import torch, jaccli.cli.main"], env)
                if keep:
                    imports[who].append(t)
                for n in names:
                    t = timed([py, "-m", "jaccli", *COMMANDS[n]], env)
                    done = subprocess.run([py, "-c", WARM, json.dumps(COMMANDS[n]), str(warm_runs), clock], check=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)  # fmt: skip
                    if keep:
                        parts[who][n]["total"].append(t)
                        parts[who][n]["compute"].extend(json.loads(done.stderr.strip().splitlines()[-1])[1:])
    med = statistics.median
    interp, torch_s, quiet_s = med(shared["interpreter"]), med(shared["import torch"]), med(shared["import torch, GC off"])
    out = {}
    for who in checkouts:
        jaccli_s = med(imports[who]) - torch_s
        for n in names:
            total, compute = med(parts[who][n]["total"]), med(parts[who][n]["compute"])
            out[who, n] = {
                "total": total, "interpreter": interp, "import torch": torch_s - interp, "import jaccli": jaccli_s,
                "compute": compute, "rest": total - torch_s - jaccli_s - compute, "fixed": total - torch_s - compute,
                "own": total - quiet_s - compute,
            }  # fmt: skip
    return out


#: the files :data:`COMMANDS` read
EXAMPLE_FILES = sorted({a for args in COMMANDS.values() for a in args if (PINN.parent / a).is_file()})


def print_fixed_costs(names, checkouts, repeats, warm_runs, clock) -> None:
    print(f"[fixed cost per command, {clock} seconds: fresh processes, one thread, medians of {repeats} rounds "
          f"(compute: median of {warm_runs} warm runs a round); {sys.executable}]")  # fmt: skip
    got = fixed_costs(names, checkouts, repeats, warm_runs, clock)
    cols = ("total", "interpreter", "import torch", "import jaccli", "compute", "rest", "fixed", "own")
    print(f"  {'command':11s} {'checkout':9s}" + "".join(f"{c:>14s}" for c in cols) + "   goal fixed <= 0.3 s")
    for n in names:
        for who in checkouts:
            row = got[who, n]
            goal = "met" if row["fixed"] <= 0.3 else "NOT met"
            print(f"  {n:11s} {who:9s}" + "".join(f"{row[c]:14.3f}" for c in cols) + f"   {goal}")
    print("  fixed = total - (python -c 'import torch') - compute = import jaccli + rest")
    print("  own = total - (python -c 'import gc; gc.disable(); import torch; gc.freeze()') - compute: what jaccli adds\n"
          "        to a torch import that pays no garbage collection either, at start or exit (as the jaccli process)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--only", choices=sorted(COMMANDS), help="measure the fixed cost of this command alone")
    ap.add_argument("--baseline", type=Path, help="another checkout of jaccli to measure alongside this one")
    ap.add_argument("--warm-runs", type=int, default=3, help="warm runs a round that measure the compute")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="what the fixed-cost figures measure")
    ap.add_argument("--no-compile", action="store_true", help="leave the checkouts' bytecode as it is")
    args = ap.parse_args(argv)
    checkouts = {"this": ROOT}
    if args.baseline is not None:
        if not (args.baseline / "jaccli" / "__init__.py").is_file():
            ap.error(f"--baseline {args.baseline}: not a checkout of jaccli (no jaccli/__init__.py)")
        checkouts = {"baseline": args.baseline.resolve(), "this": ROOT}
    if not args.no_compile:
        compile_checkouts(checkouts.values())
    names = [args.only] if args.only else list(COMMANDS)
    if args.only:
        print_fixed_costs(names, checkouts, args.repeats, args.warm_runs, args.clock)
        return 0
    exe = jaccli_exe()
    env = {**os.environ, "COLUMNS": "100"}
    complete = {**env, "_JACCLI_COMPLETE": "complete_bash", "COMP_WORDS": "jaccli jac", "COMP_CWORD": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        x = Path(tmp) / "x.npy"
        np.save(x, np.linspace(-1, 1, args.points, dtype=np.float32)[:, None])
        script = Path(tmp) / "by_hand.py"
        script.write_text(SCRIPT)

        print(f"[start-up: fresh processes, medians of {args.repeats} rounds; {' '.join(exe)}]")
        quick = race(
            {
                "jaccli --help": [*exe, "--help"],
                "jaccli --version": [*exe, "--version"],
                "jaccli jacobian --help": [*exe, "jacobian", "--help"],
                "python -c pass": [sys.executable, "-c", "pass"],
            },
            args.repeats,
            env,
        )
        probe = subprocess.run(exe, env=complete, capture_output=True, text=True)
        completes = probe.returncode == 0 and "jacobian" in probe.stdout
        completion = race({"completion of 'jaccli jac'": exe}, args.repeats, complete) if completes else {}
        for name, secs in {**quick, **completion}.items():
            goal = "" if name == "python -c pass" else ("  <= 0.3 s: met" if secs <= 0.3 else "  <= 0.3 s: NOT met")
            print(f"  {name:32s} {secs:6.3f} s{goal}")
        if not completes:
            print("  shell completion is not enabled in this build")

        print(f"\n[per-sample Jacobian of the seed PINN, N={args.points:,}, TorchScript, float32, whole process]")
        work = race(
            {
                "jaccli": [*exe, "jacobian", str(PINN), str(x), "--per-sample", "--save", str(Path(tmp) / "J1.npy"), "--force", "-q"],
                "torch.func script": [sys.executable, str(script), str(PINN), str(x), str(Path(tmp) / "J2.npy")],
            },
            args.repeats,
            env,
        )
        a, b = np.load(Path(tmp) / "J1.npy"), np.load(Path(tmp) / "J2.npy")
        err = float(np.abs(a - b).max() / np.abs(b).max())
        ratio = work["jaccli"] / work["torch.func script"]
        print(f"  jaccli             {work['jaccli']:6.3f} s")
        print(f"  torch.func script  {work['torch.func script']:6.3f} s")
        print(f"  jaccli / script    {ratio:6.2f}   (goal <= 1.0: {'met' if ratio <= 1.0 else 'NOT met'})")
        print(f"  max rel. difference of the two results: {err:.1e}")
    print()
    print_fixed_costs(names, checkouts, args.repeats, args.warm_runs, args.clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
