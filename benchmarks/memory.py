"""Peak resident memory of a streamed per-sample Jacobian against the number of points.

    python benchmarks/memory.py [--points 250000 2500000] [--in-memory]

For each N: writes an N × 2 float32 input, runs

    jaccli jacobian MLP.safetensors X.npy --per-sample --save J.npy --quiet

in a fresh process under ``/usr/bin/time -f %M`` and prints its peak RSS, the result's
size and the ratio to the first N (issue 10's goal: at most 1.3 from 250 k to 2.5 M
points, and at most 0.6 GB). The model is a 2→64→64→64→64 tanh MLP written with
``jaccli.save_mlp`` (fixed seed). ``--in-memory`` also measures the same request saved
to ``.npz``, which cannot stream and holds the whole result in memory (what ``.npy``
cost before streaming).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def jaccli_exe() -> list[str]:
    found = shutil.which("jaccli", path=str(Path(sys.executable).parent)) or shutil.which("jaccli")
    return [found] if found else [sys.executable, "-m", "jaccli"]


def make_model(path: Path) -> None:
    import torch

    import jaccli

    torch.manual_seed(0)
    widths = [2, 64, 64, 64, 64]
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    jaccli.save_mlp(torch.nn.Sequential(*layers[:-1]), path)


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """Peak resident bytes and wall seconds of one process."""
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr}")
    return int(done.stderr.strip().splitlines()[-1]) * 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[250_000, 2_500_000])
    parser.add_argument("--in-memory", action="store_true", help="also measure .npz (no streaming)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        d = Path(tmp)
        model = d / "mlp.safetensors"
        make_model(model)
        rows = []
        suffixes = ["npy", "npz"] if args.in_memory else ["npy"]
        for n in args.points:
            x = d / f"x{n}.npy"
            np.save(x, np.random.default_rng(0).standard_normal((n, 2)).astype(np.float32))
            for suffix in suffixes:
                out = d / f"J{n}.{suffix}"
                rss, seconds = peak_rss([*jaccli_exe(), "jacobian", str(model), str(x), "--per-sample",
                                         "--save", str(out), "--quiet", "--force"])  # fmt: skip
                rows.append((n, suffix, rss, n * 64 * 2 * 4, seconds))
                out.unlink()
            x.unlink()
    print(f"{'N':>10}  {'save':>5}  {'result':>9}  {'peak RSS':>9}  {'ratio':>6}  {'seconds':>7}")
    first = {}
    for n, suffix, rss, result, seconds in rows:
        base = first.setdefault(suffix, rss)
        print(f"{n:>10,}  {suffix:>5}  {result / 1e9:>7.3f}GB  {rss / 1e9:>7.3f}GB  {rss / base:>6.2f}  {seconds:>7.1f}")


if __name__ == "__main__":
    main()
