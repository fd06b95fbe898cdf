"""The torch.func products and the strategy table: how each (kind, mode) is computed.

A derivative is a sum of *products* (Jacobian-vector, vector-Jacobian and their
second-order compositions) over *directions*. A :class:`Strategy` row of
:data:`STRATEGIES` says which directions a (kind, mode) pair takes, which product
evaluates a chunk of them, and how the block is scattered into the ``[N, …]`` result.
Also here: the counter-based Rademacher probes of the Hutchinson estimator. What each
engine's products cost, by which auto mode chooses, is :mod:`.costs`'.

Imports: torch (``torch.func``) and :mod:`.problem` for the :class:`Problem` type.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import jvp as _torch_jvp, vjp, vmap

from jaccli.request.choices import ESTIMATORS, KINDS, MODES
from jaccli.engine.problem import Problem

__all__ = [
    "ESTIMATORS", "KINDS", "MODES", "STRATEGIES", "Strategy", "jvp", "jvp_ready", "rademacher",
]


_JVP_READY = False


def jvp_ready() -> None:
    """Load torch's forward-AD decompositions, once, before the first forward-mode product.

    torch scripts them with torch.jit.script on the first forward-mode product, which warns
    that TorchScript is deprecated: an internal warning users cannot act on, so they are
    loaded here, quietly. Not at import: loading costs 0.15-0.3 s, which a run that takes no
    forward-mode path (the Taylor engine, reverse mode) should not pay.
    """
    global _JVP_READY
    if _JVP_READY:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
        if load is not None:
            load()
    _JVP_READY = True


def jvp(func, primals, tangents, **kwargs):
    """``torch.func.jvp`` after :func:`jvp_ready`: every forward-mode product goes through here."""
    jvp_ready()
    return _torch_jvp(func, primals, tangents, **kwargs)


def _jvps(g, z, tangents):
    """``J t`` for each ``t`` in ``tangents`` ``[k, B, n_in]`` -> ``[k, B, n_out]``."""
    return vmap(lambda t: jvp(g, (z,), (t,))[1])(tangents)


def _vjps(g, z, cotangents):
    """``v J`` for each ``v`` in ``cotangents`` ``[k, B, n_out]`` -> ``[k, B, n_in]``."""
    _, pull = vjp(g, z)
    return vmap(lambda v: pull(v)[0])(cotangents)


def _jvp2s(g, z, t1, t2):
    """Second directional derivatives ``d²g[t1, t2]`` (forward over forward) -> ``[k, B, n_out]``."""

    def d2(a, b):
        return jvp(lambda zz: jvp(g, (zz,), (a,))[1], (z,), (b,))[1]

    return vmap(d2)(t1, t2)


def _hvps_shared(g, z, cotangents, tangents):
    """``d/dz (v·g)(z) t`` for every ``v`` of ``cotangents`` ``[m, B, n_out]`` and every ``t`` of
    ``tangents`` ``[k, B, n_in]`` -> ``[k, m, B, n_in]`` (forward over reverse, as ``hessian``).

    One tangent serves every cotangent: the forward pass and its tangent run once per ``t``
    and the pullback's primal part once per ``v``, where a product per (``v``, ``t``) pair
    repeats both for each pair: about a third of the work."""

    def grads(zz):
        _, pull = vjp(g, zz)
        return vmap(lambda v: pull(v)[0])(cotangents)

    # with grad mode on: under no_grad (where the chunk loop runs) forward AD does not use
    # torch's jvp decompositions, and backward ops without a forward formula of their own
    # (silu_backward: SiLU, GroupNorm blocks) fail, sending the request to reverse over
    # reverse, 2-4x slower (GroupNorm residual block, N = 512: 2.2 s against 0.95 s)
    with torch.enable_grad():
        return vmap(lambda t: jvp(grads, (z,), (t,))[1])(tangents).detach()


def _vvps(g, z, v, u):
    """``u·d/dz (v·g)(z)`` (reverse over reverse, for ops without forward AD) -> ``[k, B, n_in]``."""

    def vv(vv_, uu):
        return vjp(lambda zz: vjp(g, zz)[1](vv_)[0], z)[1](uu)[0]

    return vmap(vv)(v, u)


def _onehot(idx: torch.Tensor, n: int, b: int, like: torch.Tensor) -> torch.Tensor:
    """``[k, B, n]`` with row ``e_idx[k]`` for every point (a broadcast view)."""
    e = torch.zeros(idx.numel(), n, dtype=like.dtype, device=like.device)
    e[torch.arange(idx.numel(), device=idx.device), idx] = 1
    return e[:, None, :].expand(idx.numel(), b, n)


_U32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """``x * m mod 2**32`` for 32-bit ``x`` without leaving int64's range."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * m + (((hi * m) & 0xFFFF) << 16)) & _U32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash (C. Wellons), on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rademacher(seed: int, probes: torch.Tensor, points: torch.Tensor, n: int, like: torch.Tensor):
    """±1 probes ``[k, B, n]`` that depend only on (seed, probe, point, coordinate).

    A counter-based hash rather than a generator stream, so that an estimate does
    not change with the chunking the planner picks or the device it runs on.
    """
    dev = like.device
    coord = torch.arange(n, device=dev, dtype=torch.int64)[None, None, :]
    point = points.to(dev, torch.int64)[None, :, None] & _U32
    probe = probes.to(dev, torch.int64)[:, None, None] & _U32
    h = _hash32(coord ^ _hash32(point ^ _hash32(probe ^ _hash32(torch.tensor(int(seed) & _U32, device=dev)))))
    return ((h >> 31) & 1).to(like.dtype) * 2 - 1


@dataclass(frozen=True)
class Strategy:
    """How one (kind, mode) pair turns directions into a result.

    ``directions(problem)`` lists index tuples; ``product`` evaluates a chunk of them
    on a chunk of points; ``scatter`` adds the block into the ``[N, …]`` result.
    """

    directions: Callable[[Problem, int, int], torch.Tensor]
    product: Callable
    scatter: Callable
    result_shape: Callable[[Problem], tuple[int, ...]]
    #: products one direction stands for (one tangent shared by every output: ``n_out``),
    #: by which the planner sizes a pass's memory
    width: Callable[[Problem], int] = lambda p: 1


def _dirs_in(p: Problem, seed: int, probes: int) -> torch.Tensor:
    return torch.arange(p.n_in)[:, None]


def _dirs_out(p: Problem, seed: int, probes: int) -> torch.Tensor:
    return torch.arange(p.n_out)[:, None]


def _dirs_pairs_upper(p: Problem, seed: int, probes: int) -> torch.Tensor:
    return torch.triu_indices(p.n_in, p.n_in).T.contiguous()


def _dirs_out_in(p: Problem, seed: int, probes: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(p.n_out), torch.arange(p.n_in)).reshape(-1, 2)


def _dirs_probes(p: Problem, seed: int, probes: int) -> torch.Tensor:
    return torch.arange(probes)[:, None]


#: how many directions each ``_dirs_*`` makes, without making them (a plan that will be
#: refused must not first allocate the n² pairs of a million-input Hessian)
_DIRECTION_COUNTS = {
    _dirs_in: lambda p, probes: p.n_in,
    _dirs_out: lambda p, probes: p.n_out,
    _dirs_pairs_upper: lambda p, probes: p.n_in * (p.n_in + 1) // 2,
    _dirs_out_in: lambda p, probes: p.n_out * p.n_in,
    _dirs_probes: lambda p, probes: int(probes),
}


def count_directions(directions, p: Problem, probes: int) -> int:
    """``len(directions(p, 0, probes))``, computed rather than made where the count is known."""
    count = _DIRECTION_COUNTS.get(directions)
    return count(p, probes) if count is not None else len(directions(p, 0, probes))


def _n_out(p):
    return p.n_out


def _shape_jac(p):
    return (p.n_out, p.n_in)


def _shape_hess(p):
    return (p.n_out, p.n_in, p.n_in)


def _shape_lap(p):
    return (p.n_out,)


def _shape_div(p):
    return ()


def _shape_hutch(p):
    return (2,)  # running sum and sum of squares of the probe estimates


# products: (g, z, idx [k, m], ctx) -> block; ctx carries seed and the point indices


def _p_jac_fwd(g, z, idx, ctx):
    return _jvps(g, z, _onehot(idx[:, 0], z.shape[1], z.shape[0], z))


def _p_jac_rev(g, z, idx, ctx):
    return _vjps(g, z, _onehot(idx[:, 0], ctx["n_out"], z.shape[0], z))


def _p_hess_fwd(g, z, idx, ctx):
    n, b = z.shape[1], z.shape[0]
    return _jvp2s(g, z, _onehot(idx[:, 0], n, b, z), _onehot(idx[:, 1], n, b, z))


def _all_outputs(n_out: int, b: int, like: torch.Tensor) -> torch.Tensor:
    """Every output's one-hot cotangent, ``[n_out, B, n_out]`` (a broadcast view)."""
    return torch.eye(n_out, dtype=like.dtype, device=like.device)[:, None, :].expand(n_out, b, n_out)


def _p_hess_rev_shared(g, z, idx, ctx):
    """Hessian columns ``e_idx`` of every output -> ``[k, B, n_out, n_in]``."""
    b = z.shape[0]
    block = _hvps_shared(g, z, _all_outputs(ctx["n_out"], b, z), _onehot(idx[:, 0], z.shape[1], b, z))
    return block.transpose(1, 2)


def _p_lap_rev_shared(g, z, idx, ctx):
    """Diagonal entries ``idx`` of every output's Hessian -> ``[k, B, n_out]``."""
    block = _p_hess_rev_shared(g, z, idx, ctx)
    return block.gather(3, idx.to(block.device)[:, None, None, :1].expand(*block.shape[:3], 1))[..., 0]


def _p_hess_rr(g, z, idx, ctx):
    b = z.shape[0]
    return _vvps(g, z, _onehot(idx[:, 0], ctx["n_out"], b, z), _onehot(idx[:, 1], z.shape[1], b, z))


def _p_lap_fwd(g, z, idx, ctx):
    e = _onehot(idx[:, 0], z.shape[1], z.shape[0], z)
    return _jvp2s(g, z, e, e)


def _diag_take(block, idx):
    """``block[k, :, idx[k]]`` for ``block`` ``[k, B, n]`` -> ``[k, B]``."""
    return block.gather(2, idx.to(block.device)[:, None, None].expand(-1, block.shape[1], 1))[..., 0]


def _p_div_fwd(g, z, idx, ctx):
    return _diag_take(_p_jac_fwd(g, z, idx, ctx), idx[:, 0])


def _p_div_rev(g, z, idx, ctx):
    return _diag_take(_p_jac_rev(g, z, idx, ctx), idx[:, 0])


def _p_lap_rr(g, z, idx, ctx):
    return _diag_take(_p_hess_rr(g, z, idx, ctx), idx[:, 1])


def hutchinson_product(product):
    def run(g, z, idx, ctx):
        v = rademacher(ctx["seed"], idx[:, 0], ctx["points"], z.shape[1], z)
        # [k, B]: one estimate per probe and point, summed in float64 so that the
        # variance from sum and sum of squares keeps its digits
        s = (v * product(g, z, v)).sum(-1).double()
        return torch.stack([s.sum(0), (s * s).sum(0)], dim=-1)

    return run


# scatters: (result [B, ...] view of the chunk's rows, idx [k, m], block)


def _span(col: torch.Tensor):
    """``col`` as a slice when it is a run of consecutive indices (it always is for
    one-hot directions): a slice assignment is a plain strided copy, where an index
    tensor goes through index_put, several times slower on a 100 MB block."""
    first, n = int(col[0]), col.numel()
    if int(col[-1]) - first == n - 1 and (n < 3 or bool((col.diff() == 1).all())):
        return slice(first, first + n)
    return col


def _s_jac_fwd(res, idx, block):
    res[:, :, _span(idx[:, 0])] = block.permute(1, 2, 0)


def _s_jac_rev(res, idx, block):
    res[:, _span(idx[:, 0]), :] = block.permute(1, 0, 2)


def _s_hess_fwd(res, idx, block):
    values = block.permute(1, 2, 0)
    res[:, :, idx[:, 0], idx[:, 1]] = values
    res[:, :, idx[:, 1], idx[:, 0]] = values


def _s_hess_rev(res, idx, block):
    # advanced indices split by a slice put their axis first: the view is [k, B, n_in]
    res[:, idx[:, 0], :, idx[:, 1]] = block


def _s_hess_cols(res, idx, block):
    # res [B, n_out, n_in, n_in]: column j of each output's Hessian (symmetric: also its row j)
    res[:, :, :, _span(idx[:, 0])] = block.permute(1, 2, 3, 0)


def _s_sum(res, idx, block):
    res += block.sum(0)


def _s_add(res, idx, block):
    res += block


def _s_lap_rev(res, idx, block):
    res.index_add_(1, idx[:, 0].to(res.device), block.T)


#: scatters that together write every entry of a chunk's rows (the others add into them)
ASSIGNING_SCATTERS = frozenset({_s_jac_fwd, _s_jac_rev, _s_hess_fwd, _s_hess_rev, _s_hess_cols})

STRATEGIES: dict[tuple[str, str], Strategy] = {
    ("jacobian", "forward"): Strategy(_dirs_in, _p_jac_fwd, _s_jac_fwd, _shape_jac),
    ("jacobian", "reverse"): Strategy(_dirs_out, _p_jac_rev, _s_jac_rev, _shape_jac),
    ("hessian", "forward"): Strategy(_dirs_pairs_upper, _p_hess_fwd, _s_hess_fwd, _shape_hess),
    ("hessian", "reverse"): Strategy(_dirs_in, _p_hess_rev_shared, _s_hess_cols, _shape_hess, _n_out),
    ("laplacian", "forward"): Strategy(_dirs_in, _p_lap_fwd, _s_sum, _shape_lap),
    ("laplacian", "reverse"): Strategy(_dirs_in, _p_lap_rev_shared, _s_sum, _shape_lap, _n_out),
    # pure reverse mode, for models with ops that have no forward-mode rule (silu_backward, …)
    ("hessian", "reverse-only"): Strategy(_dirs_out_in, _p_hess_rr, _s_hess_rev, _shape_hess),
    ("laplacian", "reverse-only"): Strategy(_dirs_out_in, _p_lap_rr, _s_lap_rev, _shape_lap),
    ("divergence", "forward"): Strategy(_dirs_in, _p_div_fwd, _s_sum, _shape_div),
    ("divergence", "reverse"): Strategy(_dirs_out, _p_div_rev, _s_sum, _shape_div),
    ("hutchinson", "forward"): Strategy(
        _dirs_probes, hutchinson_product(lambda g, z, v: _jvps(g, z, v)), _s_add, _shape_hutch
    ),
    ("hutchinson", "reverse"): Strategy(
        _dirs_probes, hutchinson_product(lambda g, z, v: _vjps(g, z, v)), _s_add, _shape_hutch
    ),
}
