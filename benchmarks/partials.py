"""``jaccli.partials`` against nested torch.func, in ONE run (issue 11's targets).

    python benchmarks/partials.py [--points N] [--repeats R]

u_xxxx of the seed PINN (examples/models/pinn.pt, 1→50→50→50→501 tanh, float32, CPU)
through ``jaccli.partials(model, x, ["u_xxxx"], inputs=["x"], outputs=["u"],
per_sample=True)`` against ``vmap(jacfwd(jacfwd(jacfwd(jacfwd(f)))))`` and, when JAX is
installed (``pip install jax``; not a dependency), against ``jax.experimental.jet`` and
``jit(vmap(jacfwd⁴))`` on the same weights; and a mixed
term of a 2-input network against nested ``jacfwd``. Each candidate runs in its own block
(one warm-up, medians; see ``benchmarks/timing.py`` for why not round-robin).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.func import jacfwd, vmap

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaccli  # noqa: E402
from jaccli.load.weights import build_mlp  # noqa: E402
from timing import blocks  # noqa: E402


def nested(f, order: int, index: tuple[int, ...]):
    g = f
    for _ in range(order):
        g = jacfwd(g)

    def run(x):
        with torch.no_grad():
            return vmap(g)(x)[(slice(None), slice(None), *index)]

    return run


def jax_candidates(model, x, repeats: int) -> dict:
    """u_xxxx of the tanh MLP ``model`` in JAX (``benchmarks/partials_jax.py``), run in a
    process of its own: XLA's and PyTorch's thread pools both spin while they wait, and on
    a small machine whichever runs second in a shared process pays for the other's.
    Returns ``{label: (seconds, result)}``; empty when JAX is not installed."""
    if importlib.util.find_spec("jax") is None:
        print("  (JAX not installed: pip install jax to add jax.experimental.jet and jit(vmap(jacfwd^4)))")
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        ps = [p.detach().numpy() for p in model.parameters()]
        np.savez(Path(tmp) / "in.npz", x=x.numpy(), **{f"p{i}": p for i, p in enumerate(ps)})
        subprocess.run([sys.executable, str(ROOT / "benchmarks/partials_jax.py"), tmp, str(repeats)], check=True)
        timed = json.loads((Path(tmp) / "times.json").read_text())
        got = np.load(Path(tmp) / "out.npz")
        return {label: (seconds, torch.from_numpy(got[label])) for label, seconds in timed.items()}


def case(name: str, model, x, term: str, inputs, ref, repeats: int, others: dict | None = None) -> None:
    ours = lambda: jaccli.partials(model, x, [term], inputs=inputs, outputs=["u"], per_sample=True)[term]  # noqa: E731
    order = len(term.split("_")[1])
    fns = {"jaccli.partials": ours, f"nested vmap(jacfwd^{order})": lambda: ref(x)}
    m, got = blocks(fns, repeats)
    for label, (seconds, result) in (others or {}).items():
        m[label], got[label] = seconds, result
    want = got[f"nested vmap(jacfwd^{order})"]
    engine = jaccli.partials(model, x[:8], [term], inputs=inputs, per_sample=True).engine
    print(f"\n[{name}: {term}, N={x.shape[0]:,}, {str(x.dtype).removeprefix('torch.')}]")
    for label in m:
        err = float((got[label] - want).abs().max() / want.abs().max())
        note = f"engine: {engine}" if label == "jaccli.partials" else f"{m[label] / m['jaccli.partials']:5.1f}x jaccli's time"
        print(f"  {label:26s} {m[label]:8.3f} s   max rel. difference {err:.1e}   ({note})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's allocator as it is (the jaccli command tunes it; see jaccli/_allocator.py)")
    args = ap.parse_args(argv)
    from jaccli.cli import allocator as _allocator

    tuned = not args.default_malloc and _allocator.tune()
    print(f"glibc malloc thresholds {'raised as the jaccli command does' if tuned else 'left at their defaults'}"
          " (every candidate in this process alike; JAX has its own allocator)")
    torch.set_grad_enabled(False)
    pinn = jaccli.load_model(ROOT / "examples/models/pinn.pt")
    x = torch.linspace(0, 1, args.points)[:, None]
    f = lambda p: pinn(p[None])[0]  # noqa: E731
    jax_fns = jax_candidates(pinn, x, args.repeats)
    case("seed PINN 1→50→50→50→501 tanh, TorchScript", pinn, x, "u_xxxx", ["x"], nested(f, 4, (0, 0, 0, 0)), args.repeats, jax_fns)

    torch.manual_seed(0)
    net = build_mlp([2, 64, 64, 64, 1], "tanh").eval()
    p = torch.rand(args.points // 10, 2)
    g = lambda q: net(q[None])[0]  # noqa: E731
    case("2→64→64→64→1 tanh MLP", net, p, "u_ttxx", ["t", "x"], nested(g, 4, (0, 0, 1, 1)), args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
