"""JAX twins of jaccli's benchmark models (imports JAX only, so that a JAX-only process can use it).

Shared by ``benchmarks/bench.py`` and ``benchmarks/partials_jax.py``.
"""

from __future__ import annotations

import jax.numpy as jnp


def jax_mlp(weights):
    """The tanh MLP of ``weights`` (an iterable of ``(W, b)`` numpy arrays) in JAX; it maps
    one point ``[n_in]`` or a batch ``[B, n_in]`` as ``nn.Linear`` layers do."""
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in weights]

    def f(x):
        for i, (w, b) in enumerate(params):
            x = x @ w.T + b
            if i < len(params) - 1:
                x = jnp.tanh(x)
        return x

    return f
