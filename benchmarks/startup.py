"""How fast the ``jaccli`` process answers, against what a plain script pays, in ONE run.

    python benchmarks/startup.py [--repeats R] [--points N]

Two figures (issue 8's goals):

* ``jaccli --help``, ``--version``, ``jacobian --help`` and a shell-completion query:
  wall time of the whole process (goal: at most 0.3 s each).
* ``jaccli jacobian pinn.pt x.npy --per-sample --save J.npy`` on the seed PINN at
  ``--points`` points (default 1000) against the ten-line torch.func script below doing
  the same (load the TorchScript model and the .npy, ``vmap(jacfwd)``, save): the ratio of
  their process wall times (goal: at most 1.0).

Every candidate is a fresh process, so imports count as a user sees them. Candidates
take turns (round-robin, one warm-up round first) and the figures are medians, so that
the drift of a shared machine hits both terms of a ratio alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def jaccli_exe() -> list[str]:
    found = shutil.which("jaccli", path=str(Path(sys.executable).parent)) or shutil.which("jaccli")
    return [found] if found else [sys.executable, "-m", "jaccli"]


def race(cmds: dict[str, list[str]], repeats: int, env: dict[str, str]) -> dict[str, float]:
    """Median wall seconds of each command, run in turns after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for round_ in range(repeats + 1):
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            if round_:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--points", type=int, default=1000)
    args = ap.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
