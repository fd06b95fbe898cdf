"""Whole matrices and exact diagonals assembled from an :class:`~.objective.Objective`.

- :func:`dense_hessian`: the Hessian ``[P, P]`` (``--full``, a dense spectrum): layer by
  layer by :mod:`.structured` where the parameters sit in linear layers, else
  forward-over-reverse with unit vectors, one parameter tensor at a time, one triangle;
- :func:`small_hessian`: the same from the objective's own Hessian products through its kept
  graph, where the problem is small (no ``torch._dynamo`` to import);
- :func:`diagonal`: the exact GGN or empirical-Fisher diagonal, one pass of per-sample factors.

The objective itself (the loss over the data, its products with a block of vectors) is
:mod:`.objective`'s; this module only assembles what those products and its per-sample
rows give.

Imports: torch, :mod:`.runtime`, :mod:`.structured`, :mod:`jaccli.engine.strategies` (``jvp``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.func import grad, vmap

from jaccli.curvature.runtime import all_reduce
from jaccli.curvature.structured import NotStructured, structured_hessian
from jaccli.engine.strategies import jvp

if TYPE_CHECKING:
    from jaccli.curvature.objective import Objective

#: the work (parameters × samples × activation bytes per sample) up to which the assembled
#: Hessian comes from products with unit vectors through the kept graph rather than
#: :mod:`.structured`, whose trace (``make_fx``) and ``jacfwd(grad)`` import ``torch._dynamo``
#: (~1.4 s of CPU in a fresh process); the products cost about 1 s per GB of that work
#: (measured on one core, TorchScript tanh MLPs: P 353 × 500 points 0.12 s against 0.05 s
#: layer by layer once imported; P 1217 × 1000 points 1.4 s against 0.12 s)
SMALL_DENSE_WORK = 256 << 20


def dense_hessian(obj: Objective) -> torch.Tensor:
    """The Hessian ``[P, P]``: by :mod:`.structured` where every selected parameter sits in a
    linear layer, else (the reason in ``obj.dense_note``) from products with unit vectors, one
    parameter tensor at a time.

    For the unit vectors of tensor ``t`` only the rows of tensors ``t, t+1, …`` are
    computed (forward-over-reverse: the ``jvp`` in ``θ_t`` of the gradient in
    ``θ_t, θ_{t+1}, …`` with the earlier tensors held constant); the rows above come from
    symmetry (and each diagonal block is averaged with its transpose). The tangent's forward
    pass and the backward pass then stop at the tensors the block involves, so the later a
    tensor acts in the model the cheaper its columns; no
    graph is kept between passes. Raises ``RuntimeError`` where ``vmap`` cannot batch the
    model (the caller then assembles from :meth:`~.objective.Objective.matmat`).
    """
    try:  # linear layers: the layer-wise form, GEMMs instead of a pass per column
        return structured_hessian(obj)
    except NotStructured as why:
        obj.dense_note = f"full Hessian by products with unit vectors, not layer by layer: {why}"
    space, values = obj.space, obj.space.values
    out = torch.zeros(space.size, space.size, dtype=space.dtype, device=space.device)
    for t, info in enumerate(space.infos):
        lo = info.offset
        for a, b in obj.chunks():

            def grad_later(w, a=a, b=b, t=t):
                # the gradient in θ_t, θ_{t+1}, … as a function of θ_t, earlier tensors constant
                later = grad(lambda th: obj.chunk_loss(values[:t] + th, a, b))((w, *values[t + 1 :]))
                return obj.space.flat(later)

            col = lambda v, t=t, f=grad_later: jvp(f, (values[t],), (v.reshape(values[t].shape),))[1]  # noqa: E731
            for j in range(0, info.size, obj.dense_columns):
                k = min(obj.dense_columns, info.size - j)
                E = torch.zeros(info.size, k, dtype=space.dtype, device=space.device)
                E[torch.arange(j, j + k), torch.arange(k)] = 1
                out[lo:, lo + j : lo + j + k] += vmap(col, in_dims=1, out_dims=1)(E) if k > 1 else col(E[:, 0])[:, None]
        hi = lo + info.size
        out[lo:hi, lo:hi] = (out[lo:hi, lo:hi] + out[lo:hi, lo:hi].T) / 2  # symmetric up to rounding
        out[lo:hi, hi:] = out[hi:, lo:hi].T
    obj.products += space.size
    return all_reduce(out)


def small_hessian(obj: Objective) -> torch.Tensor | None:
    """The Hessian ``[P, P]`` from :meth:`~.objective.Objective.matmat` with unit vectors where
    the problem is small (:data:`SMALL_DENSE_WORK`), else ``None`` (the caller assembles it by
    :func:`dense_hessian`). Every rank decides alike: the whole data set, not its shard."""
    if obj.space.size * obj.n * obj.act_bytes > SMALL_DENSE_WORK:
        return None
    H = obj.matmat("hessian", torch.eye(obj.space.size, dtype=obj.space.dtype, device=obj.space.device))
    return (H + H.T) / 2  # symmetric up to rounding


def diagonal(obj: Objective, matrix: str) -> torch.Tensor:
    """The exact diagonal of ``ggn`` or ``ef`` ``[P]`` (one pass of per-sample factors)."""
    d = torch.zeros(obj.space.size, dtype=obj.space.dtype, device=obj.space.device)
    for a, b in obj.chunks():
        if matrix == "ef":
            d += obj.kept_grads(a, b).pow(2).sum(0) / obj.n
            continue
        step = max(1, obj.chunk // max(1, math.prod(obj.out_shape)))  # [b, C, P] in the budget of [b, P]
        for a2 in range(a, b, step):
            b2 = min(a2 + step, b)
            J = obj.per_sample_jacobians(a2, b2)  # [b, C, P]
            S = obj.loss_sqrt(a2, b2).reshape(b2 - a2, J.shape[1], -1)  # [b, C, K]
            d += torch.einsum("bck,bcp->bkp", S, J).pow(2).sum((0, 1)) * (obj.norm * obj.weight)
    return all_reduce(d)
