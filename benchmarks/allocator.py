"""Does the engine still need glibc's thresholds raised? Subprocesses with and without, alternating.

    OMP_NUM_THREADS=1 python benchmarks/allocator.py [--base DIR] [--points N] [--rounds R] [--calls C]

The Python API is timed (this process's CPU time, page faults included) on the seed
PINN's per-sample Jacobian, Hessian and ``u_xxxx``, one model object called ``C`` times
in each subprocess (the median is kept); subprocesses with glibc's defaults and with the
thresholds the CLI sets (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``) alternate
for ``R`` rounds, so that a drift of a shared machine hits both alike. Reported per job:
the median over rounds of each, and defaults / tuned — 1.0 means no allocator setting is
needed. ``--base DIR`` runs the same for another checkout (its ``jaccli/``), for the
figure before an engine change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUNED = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824"}

_CHILD = r"""
import json, statistics, sys, time, warnings
sys.path.insert(0, sys.argv[1])
import torch
warnings.simplefilter("ignore")
import jaccli
n, calls = int(sys.argv[2]), int(sys.argv[3])
m = jaccli.load_model(sys.argv[4])
x = torch.linspace(0, 1, n)[:, None]
jobs = {
    "jacobian": lambda: jaccli.jacobian(m, x, per_sample=True),
    "hessian": lambda: jaccli.hessian(m, x, per_sample=True),
    "u_xxxx": lambda: jaccli.partials(m, x, ["u_xxxx"], inputs=["x"], outputs=["u"], per_sample=True),
}
out = {}
for name, job in jobs.items():
    job()
    times = []
    for _ in range(calls):
        t = time.process_time()
        job()
        times.append(time.process_time() - t)
    out[name] = statistics.median(times)
print(json.dumps(out))
"""


def run(root: Path, tuned: bool, points: int, calls: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if tuned:
        env.update(TUNED)
    cmd = [sys.executable, "-c", _CHILD, str(root), str(points), str(calls), str(ROOT / "examples/models/pinn.pt")]
    return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="another checkout to measure the same way")
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    sides = {"new": ROOT} | ({"base": args.base.resolve()} if args.base else {})
    got: dict[tuple[str, bool], list[dict]] = {(s, t): [] for s in sides for t in (False, True)}
    for _ in range(args.rounds):
        for s, root in sides.items():
            for tuned in (False, True):
                got[(s, tuned)].append(run(root, tuned, args.points, args.calls))
    report = {}
    for s in sides:
        for job in got[(s, False)][0]:
            plain = statistics.median(r[job] for r in got[(s, False)])
            tuned = statistics.median(r[job] for r in got[(s, True)])
            report[f"{s} {job}"] = {"defaults": plain, "tuned": tuned, "ratio": plain / tuned}
            print(f"{s:4s} {job:9s} glibc defaults {plain * 1e3:8.1f} ms  CLI thresholds {tuned * 1e3:8.1f} ms"
                  f"  defaults/tuned {plain / tuned:.2f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
