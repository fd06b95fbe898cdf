"""The JAX side of ``benchmarks/partials.py`` (run by it, in a process of its own).

    python benchmarks/partials_jax.py DIR REPEATS

Reads ``DIR/in.npz`` (``x`` and the Linear layers' ``p0, p1, …`` as weight, bias pairs of a
tanh MLP), times u_xxxx by ``jax.experimental.jet`` and by ``jit(vmap(jacfwd⁴))`` (one
warm-up, which compiles, then the median of REPEATS runs each, taking turns), and writes
``DIR/times.json`` and the results to ``DIR/out.npz``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.jet import jet

from jax_twins import jax_mlp


def main(directory: str, repeats: str) -> None:
    d = Path(directory)
    data = np.load(d / "in.npz")
    ps = [data[f"p{i}"] for i in range(len(data.files) - 1)]
    mlp = jax_mlp(zip(ps[::2], ps[1::2]))
    x = jnp.asarray(data["x"])
    ones, zeros = jnp.ones_like(x), jnp.zeros_like(x)
    one = lambda q: mlp(q[None])[0]  # noqa: E731
    fns = {
        # jet's series holds derivatives along the direction: its 4th output term is u_xxxx
        "jax jet (jit)": jax.jit(lambda p: jet(mlp, (p,), ((ones, zeros, zeros, zeros),))[1][3]),
        "jax jit(vmap(jacfwd^4))": jax.jit(
            jax.vmap(lambda q: jax.jacfwd(jax.jacfwd(jax.jacfwd(jax.jacfwd(one))))(q)[:, 0, 0, 0, 0])
        ),
    }
    out = {k: np.asarray(fn(x).block_until_ready()) for k, fn in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(int(repeats)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x).block_until_ready()
            times[k].append(time.perf_counter() - t0)
    (d / "times.json").write_text(json.dumps({k: statistics.median(v) for k, v in times.items()}))
    np.savez(d / "out.npz", **out)


if __name__ == "__main__":
    main(*sys.argv[1:])
