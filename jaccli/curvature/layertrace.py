"""The Hessian's trace of a model whose parameters all sit in linear layers, by per-sample probes
of the layers' outputs.

For a layer ``z_l = W_l a_l + b_l`` the Hessian's diagonal block in ``(W_l, b_l)`` is, summed
over the samples, ``Σₙ (ãₙ ãₙᵀ) ⊗ Sₙ,ₗₗ`` (:mod:`.structured`'s form with ``p = q``, where its
``T`` term vanishes): ``ãₙ`` the layer's input row (with a 1 for the bias; only the parts whose
parameters are selected) and ``Sₙ,ₗₗ = ∂²ℓₙ/∂z_l²`` the second derivative of sample ``n``'s loss
in the layer's output, everything downstream included. The trace needs only those blocks:

    tr H = w Σₙ Σₗ ‖ãₙ,ₗ‖² tr Sₙ,ₗₗ

Hutchinson on this form draws a probe ``uₙ,ₗ`` (random signs) **per sample and per layer**,
scaled by ``‖ãₙ,ₗ‖``: ``qₙ = vₙᵀ Sₙ vₙ`` with ``vₙ = (‖ãₙ,ₗ‖ uₙ,ₗ)ₗ`` has mean
``Σₗ ‖ãₙ,ₗ‖² tr Sₙ,ₗₗ`` (the cross-layer terms ``vₙ,ₗᵀ Sₙ,ₗₘ vₙ,ₘ`` have mean zero). The
samples' ``qₙ`` are independent, so one round's variance is ``Σₙ Var qₙ`` — the
parameter-space Hutchinson instead shares one probe over all samples and carries their
covariances ``2 tr(Hₙ Hₘ)`` too, and a probe of ``P`` signs where these have ``d_l``: on the
benchmark MLP (P = 76 810, N = 2 048) a round has ≈ 1/250 of a parameter probe's variance.
The standard error is honest and stable: ``√(Σₙ s²ₙ / R)`` with ``s²ₙ`` the sample variance of
``qₙ`` over the ``R`` rounds (``N`` estimates pooled, not one from ``R`` totals).

A round is one backward pass: ``Sₙ vₙ`` for every sample at once is the gradient, in the layer
outputs ``z`` (the recorded output tensors of one batched pass, as :mod:`.linear` reads them),
of ``Σₙ δₙ · vₙ`` with ``δ = ∂(Σ ℓ)/∂z`` taken with its graph — the same double backward as a
Hessian-vector product, without the parameters' gradient GEMMs (nothing asks for them), and
from the scalar ``δ · v``, not tensor ``grad_outputs`` (which would import sympy). Where the
layers' output widths add up to no more than the rounds asked for, unit probes (one layer, one
output, every sample at once: ``Σ d_l`` rounds) give the **exact** trace instead.

Assumes what :mod:`.linear` assumes and checks (:meth:`.linear.LinearRows.detect`): samples do
not mix. Applies where every selected parameter is a recognised linear layer's weight or bias;
elsewhere :func:`layer_trace` returns ``None`` and the caller takes the parameter-space
estimators of :mod:`.spectral`.

Imports: numpy, torch, :mod:`.layers`, :mod:`.runtime` (and :mod:`.linear`'s recorded pass, through ``obj``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from jaccli.curvature.layers import value
from jaccli.curvature.runtime import all_reduce


def layer_trace(obj, rounds: int, *, seed: int = 0, exact: bool | None = None) -> tuple[float, float | None] | None:
    """``(trace, standard error)`` of ``obj``'s Hessian by per-sample probes of its linear layers'
    outputs (``standard error`` ``None`` when exact), or ``None`` where the model's selected
    parameters are not all linear layers' (or its samples mix). Adds the rounds to ``obj.products``.

    ``rounds``: the probe rounds (each one backward pass over the data, as a Hessian-vector
    product; at least 2, for the standard error); ``exact``: unit probes (``Σ d_l`` passes) —
    by default where they take no more than ``rounds``. The probes depend on ``seed``, the
    round and the sample's index alone, so chunks and ranks do not change the estimate.
    """
    if not applies(obj):
        return None
    rows = obj.linear_rows()
    space = obj.space
    rounds = max(2, int(rounds))
    # this rank's [Σₙ mean qₙ, Σₙ s²ₙ / R, exact?, passes], all-reduced at the end
    total = torch.zeros(4, dtype=torch.float64, device=space.device)
    for a, b in obj.chunks():
        got = _chunk_pass(obj, rows, a, b)
        if got is None:
            return None
        zs, deltas, norms = got
        dims = [z.shape[1] for z in zs]
        if exact is None:
            exact = sum(dims) <= rounds
        # a δ constant in z (the last layer's, for a loss linear in the output) has S's rows zero,
        # and by symmetry its columns: its layer adds nothing, and it cannot be differentiated
        # (one that reaches z only through the weights, δ₀ = δ₁W₁ after a linear layer, gives zeros)
        live = [k for k, d in enumerate(deltas) if d.requires_grad]
        if exact:
            for k in live:
                z, d, c = zs[k], deltas[k], norms[k]
                for i in range(z.shape[1]):
                    # e_i of this layer at every sample, scaled by ‖ã‖: the i-th diagonal of each Sₙ,ₗₗ, weighted
                    g = torch.autograd.grad((d[:, i] * c).sum(), z, retain_graph=True, allow_unused=True,
                                            materialize_grads=True)[0]  # fmt: skip
                    total[0] += (g[:, i] * c).double().sum()
            total[2], total[3] = 1, sum(dims)  # per rank with samples: the passes over its data
            continue
        q = torch.zeros(rounds, b - a, dtype=torch.float64, device=space.device)
        for r in range(rounds if live else 0):
            u = _signs(seed, r, a, b, sum(dims)).to(dtype=space.dtype, device=space.device)
            vs = [v.mul_(c[:, None]) for v, c in zip(u.split(dims, dim=1), norms)]
            s = sum((deltas[k] * vs[k]).sum() for k in live)
            sv = torch.autograd.grad(s, zs, retain_graph=True, allow_unused=True, materialize_grads=True)
            q[r] = sum((v * g).sum(1).double() for v, g in zip(vs, sv))
        total[0] += q.mean(0).sum()
        total[1] += q.var(0).sum() / rounds
    all_reduce(total)
    exact = bool(total[2] > 0)
    obj.products += round(float(total[3] / total[2])) if exact else rounds
    return float(total[0]), (None if exact else math.sqrt(max(float(total[1]), 0.0)))


def applies(obj) -> bool:
    """Whether every selected parameter of ``obj`` is a recognised linear layer's weight or bias,
    its samples do not mix, and it runs at any batch size (checked on one probe call)."""
    if obj.space.static_batch is not None:
        return False
    rows = obj.linear_rows()
    return rows is not None and not rows.rest


def _chunk_pass(obj, rows, a: int, b: int):
    """One batched forward of chunk ``[a, b)`` and the backward of its loss to the layer outputs,
    with its graph: ``(z per layer, δ per layer, √(w‖ãₙ‖²) per layer [n])``, or ``None`` where the
    pass does not meet the layers the probe found, or one of them was changed in place
    (:meth:`.linear.LinearRows.recorded_pass`)."""
    space = obj.space
    got = rows.recorded_pass(a, b, obj.norm * obj.weight)
    if got is None:
        return None
    zs, norms = [], []
    for layer in got.layers:  # a layer whose parameters are held constant is not there: its block is not in the trace
        sq = torch.zeros(got.called, dtype=space.dtype, device=space.device)
        if layer.weight in got.where:
            sq = sq + value(layer.input).detach().pow(2).sum(1)
        if layer.bias in got.where:
            sq = sq + 1
        zs.append(value(layer.node))
        norms.append(sq.sqrt())
    with torch.enable_grad():
        deltas = torch.autograd.grad(got.loss, zs, create_graph=True)
    return zs, deltas, norms


def _signs(seed: int, r: int, a: int, b: int, d: int) -> torch.Tensor:
    """``[b - a, d]`` random signs for samples ``a … b-1`` in round ``r``: bits of Philox blocks
    at counter ``(sample · blocks, r)`` (``blocks`` of 256 bits per sample), so that a sample's
    probe depends on ``seed``, ``r`` and its index alone, whichever chunk or rank draws it."""
    blocks = (d + 255) // 256
    raw = np.random.Philox(key=seed, counter=[a * blocks, r, 0, 0]).random_raw((b - a) * blocks * 4)
    bits = np.unpackbits(raw.view(np.uint8).reshape(b - a, blocks * 32), axis=1, count=d)
    return torch.from_numpy(bits).to(torch.int8).mul_(2).sub_(1)
