"""This checkout against another one (a base), interleaved in ONE process: gross regressions only.

    git -C . archive layout | tar -x -C /tmp/base      # or any checkout of the base
    python benchmarks/ab.py --base /tmp/base [--points N] [--repeats R] [--json FILE] [--only TEXT] [--clock cpu|wall] [--both-allocators]

Both versions of the ``jaccli`` package are imported into this process (each under its
own set of ``sys.modules`` entries, swapped in around every call), and each job runs
base, new, base, new, … after one warm-up each, so that a drift of a shared machine hits
both sides of a ratio alike. Reported: the median seconds of each side and new / base.
The jobs are those of ``benchmarks/bench.py`` and ``benchmarks/partials.py`` at reduced
sizes: the seed PINN's Jacobian, Hessian and ``u_xxxx`` (TorchScript), a Laplacian, a
divergence and a mixed partial of MLPs, and a mixed partial of a small CNN; and two of
``benchmarks/curvature.py``'s (``--only curvature``): per-sample gradients of an MLP
32→256→256→10 over ``--points`` points, and the full Hessian of a 32→60→60→10 over half of them. A ratio near 1 says nothing on a noisy machine;
one far above it is a regression worth a real benchmark.

The "(same model)" jobs call one model object again and again, as a user's loop does:
they show what keeping recorded programs saves. ``--both-allocators`` runs the whole
comparison twice, each in its own subprocess: with glibc's defaults and with the
thresholds the CLI sets (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``), so that
an engine change that removes the need for them shows as equal ratios in both.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent


def _ours() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "jaccli" or k.startswith("jaccli.")}


def load(root: Path) -> SimpleNamespace:
    """The public functions of the ``jaccli`` under ``root``, and its modules."""
    for k in list(_ours()):
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        import jaccli

        # every module now, while this side's path is first: a lazy import during a call
        # would otherwise pick the other side's (older bases have another layout)
        for info in pkgutil.walk_packages(jaccli.__path__, "jaccli."):
            if not info.name.startswith(("jaccli.cli", "jaccli.__main__")):
                try:
                    importlib.import_module(info.name)
                except ImportError:  # an optional extra (plotting) that is not installed
                    pass

        api = SimpleNamespace(**{n: getattr(jaccli, n) for n in ("jacobian", "hessian", "laplacian", "divergence", "partials", "load_model", "grads", "curvature")})
    finally:
        sys.path.remove(str(root))
    api.modules = _ours()
    return api


def call(api: SimpleNamespace, fn):
    for k in list(_ours()):
        del sys.modules[k]
    sys.modules.update(api.modules)
    return fn(api)


#: what a repeat is timed by: this process's CPU time (user + system, page faults
#: included) drifts far less than wall time on a machine shared with other work; with
#: several threads it adds theirs up, so run with OMP_NUM_THREADS=1 (--clock wall otherwise)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
CLOCK = CLOCKS["cpu"]


def race(sides: dict, job, repeats: int) -> dict[str, float]:
    """Median seconds of ``job(api)`` for each side, interleaved after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    for k, api in sides.items():
        call(api, job)
    for _ in range(repeats):
        for k, api in sides.items():
            start = CLOCK()
            call(api, job)
            times[k].append(CLOCK() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def mlp(sizes, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).eval()


class SmallCNN(torch.nn.Module):
    """2 inputs → 16 → a Conv1d(1→4) with tanh and max pooling → 1: partials of a CNN."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a, self.conv, self.b = torch.nn.Linear(2, 16), torch.nn.Conv1d(1, 4, 3, padding=1), torch.nn.Linear(32, 1)

    def forward(self, p):
        h = torch.tanh(self.conv(torch.tanh(self.a(p))[:, None]))
        return self.b(torch.nn.functional.max_pool1d(h, 2).flatten(1))


def jobs(n: int) -> dict:
    x1 = torch.linspace(0, 1, n)[:, None]
    lap_net, lap_x = mlp((100, 256, 256, 256, 1), 1), torch.randn(max(n // 10, 8), 100)
    div_net, div_x = mlp((16, 256, 256, 16), 2), torch.randn(n, 16)
    mix_net, mix_x = mlp((2, 64, 64, 1), 3).double(), torch.rand(n, 2, dtype=torch.float64)
    cnn = SmallCNN().double().eval()
    pinn = ROOT / "examples/models/pinn.pt"
    # curvature in parameter space (benchmarks/curvature.py's MLPs): per-sample rows by δxᵀ, the layer-wise Hessian
    g = torch.Generator().manual_seed(5)
    cls_net, cls_x, cls_y = mlp((32, 256, 256, 10), 5), torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    full_net, full_x, full_y = mlp((32, 60, 60, 10), 6), cls_x[: n // 2], cls_y[: n // 2]

    def model(api):
        return api.load_model(pinn)

    kept: dict = {}

    def same(api):  # one model object per side, called again and again
        return kept.setdefault(id(api), api.load_model(pinn))

    return {
        "pinn jacobian": lambda api: api.jacobian(model(api), x1, per_sample=True),
        "pinn hessian": lambda api: api.hessian(model(api), x1, per_sample=True),
        "pinn u_xxxx": lambda api: api.partials(model(api), x1, ["u_xxxx"], inputs=["x"], outputs=["u"], per_sample=True),
        "pinn jacobian (same model)": lambda api: api.jacobian(same(api), x1, per_sample=True),
        "pinn hessian (same model)": lambda api: api.hessian(same(api), x1, per_sample=True),
        "pinn u_xxxx (same model)": lambda api: api.partials(same(api), x1, ["u_xxxx"], inputs=["x"], outputs=["u"], per_sample=True),
        "laplacian 100-256³-1": lambda api: api.laplacian(lap_net, lap_x, per_sample=True),
        "divergence 16-256²-16": lambda api: api.divergence(div_net, div_x, per_sample=True),
        "u_txx, u_tt 2-64²-1": lambda api: api.partials(mix_net, mix_x, ["u_txx", "u_tt"], inputs="t,x", per_sample=True),
        "u_txx CNN (conv, pool)": lambda api: api.partials(cnn, mix_x[: max(n // 10, 8)], ["u_txx"], inputs="t,x", per_sample=True),
        "curvature: grads per-sample 32-256²-10": lambda api: api.grads(cls_net, cls_x, cls_y, loss="cross-entropy", per_sample=True).per_sample,
        "curvature: full Hessian 32-60²-10": lambda api: torch.as_tensor(api.curvature(full_net, full_x, full_y, loss="cross-entropy", full=True).full),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="a checkout of the base (its jaccli/ package)")
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="CPU time of this process (default) or wall time")
    ap.add_argument("--only", default="", help="run the jobs whose name contains this text")
    ap.add_argument("--both-allocators", action="store_true",
                    help="run twice, each in a subprocess: glibc's defaults, then the CLI's thresholds")
    args = ap.parse_args(argv)
    if args.both_allocators:
        return _both(args)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    warnings.simplefilter("ignore")
    sides = {"base": load(args.base.resolve()), "new": load(ROOT)}
    rows = {}
    for name, job in jobs(args.points).items():
        if args.only not in name:
            continue
        a, b = (call(api, job) for api in sides.values())
        got = [b[k] for k in b] if isinstance(b, dict) else [b]
        want = [a[k] for k in a] if isinstance(a, dict) else [a]
        agree = all(torch.allclose(g.double(), w.double(), rtol=1e-4, atol=1e-6 * float(w.abs().max())) for g, w in zip(got, want))
        m = race(sides, job, args.repeats)
        rows[name] = {**m, "ratio": m["new"] / m["base"], "agree": agree}
        print(f"{name:24s} base {m['base'] * 1e3:8.1f} ms  new {m['new'] * 1e3:8.1f} ms  new/base {m['new'] / m['base']:.2f}"
              f"{'' if agree else '  RESULTS DIFFER'}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


_TUNED = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def _both(args) -> int:
    """The comparison under each allocator setting, each in a fresh process."""
    base = [sys.executable, __file__, "--base", str(args.base), "--points", str(args.points), "--repeats", str(args.repeats),
            "--only", args.only, "--clock", args.clock]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    results = {}
    for label, extra in (("glibc defaults", {}), ("CLI thresholds", _TUNED)):
        print(f"== {label}", flush=True)
        out = Path(f"{args.json}.{label.split()[0]}.json") if args.json else None
        cmd = base + (["--json", str(out)] if out else [])
        rc = subprocess.call(cmd, env={**env, **extra})
        if rc:
            return rc
        if out:
            results[label] = json.loads(out.read_text())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
