"""Forward (Taylor-mode) derivatives of a traced flat batch function.

torch.func builds a per-sample Jacobian from ``vmap(jvp)``: the model runs under a
batching interpreter, every op pays for a tangent of its own, and a Hessian nests
two such transforms. Here the flat batch function ``g: [B, n_in] -> [B, n_out]`` of
the engine is recorded once as a list of ATen ops (by a dispatch mode, which sees
through eager modules, TorchScript and ``torch.export`` programs alike; two records
at different batch sizes tell batch-sized shape arguments apart) and each op's result
carries a *jet*:

- its value (one row),
- one first-order stream per input direction (``k1`` rows),
- second-order streams (``k2`` rows): one per Hessian entry ``(i, j)``, or a single
  *collapsed* stream holding ``Σᵢ ∂²/∂xᵢ²`` (the forward Laplacian of Li et al. 2023,
  collapsed Taylor mode of Dangel et al. 2025), whose propagation needs the
  first-order streams but never forms them pairwise.

The rows of a jet are stacked along a leading axis, so a linear layer costs ONE
matrix product for value and streams together, and a backward *need* analysis keeps
only the rows the requested result uses (no value through the last layer of a
Jacobian, no first-order rows at the output of a Laplacian, no second-order rows
while a node is still affine in the input).

Every op has a rule in :data:`RULES` (or is a non-differentiable op in
:data:`VALUE_OPS`); a graph with an op that has neither raises :class:`Unsupported`
naming the op, and the engine falls back to torch.func. :func:`build` also checks the
program against the model on a probe batch before it is used.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

__all__ = ["Layout", "TaylorProgram", "Unsupported", "build"]

#: batch sizes of the two probe traces; two distinct sizes tell batch-sized shape
#: entries from fixed ones (1 is avoided: ops special-case singleton dimensions)
PROBE_BATCHES = (2, 3)


class Unsupported(Exception):
    """The model cannot use the Taylor path; ``op`` names the ATen op (or ``trace``/``verify``)."""

    def __init__(self, op: str, detail: str = "") -> None:
        super().__init__(detail or f"aten.{op} has no Taylor rule")
        self.op = op
        self.detail = detail


# --------------------------------------------------------------------------- jets


class Layout(NamedTuple):
    """Which row blocks a jet holds: value (1 row), first order (k1 rows), second order (k2 rows)."""

    value: bool
    first: bool
    second: bool

    def rows(self, k1: int, k2: int) -> int:
        return int(self.value) + k1 * int(self.first) + k2 * int(self.second)


EMPTY = Layout(False, False, False)


class Jet:
    """A node's value and derivative streams, stacked along axis 0 as ``[rows, *shape]``.

    A missing second-order block means zero (the node is affine in the input);
    missing value or first-order blocks are never read (the need analysis says so).
    """

    __slots__ = ("t", "lay", "k1", "k2", "onehot")

    def __init__(self, t: Tensor, lay: Layout, k1: int, k2: int) -> None:
        self.t, self.lay, self.k1, self.k2 = t, lay, k1, k2
        #: first-order row r is e_onehot[r] at every point (the seed, through identity views)
        self.onehot: Tensor | None = None

    def span(self, order: int) -> tuple[int, int]:
        sizes = (int(self.lay.value), self.k1 * self.lay.first, self.k2 * self.lay.second)
        start = sum(sizes[:order])
        return start, start + sizes[order]

    def block(self, order: int) -> Tensor | None:
        if not self.lay[order]:
            return None
        start, stop = self.span(order)
        return self.t[start:stop]

    @property
    def shape(self) -> torch.Size:
        return self.t.shape[1:]


@dataclass
class _Call:
    """What one evaluation propagates: stream counts and how second-order rows pair up."""

    k1: int
    k2: int
    pairs: tuple[Tensor, Tensor] | None  # local (i, j) per second-order row; None: collapsed
    batch: int

    def empty(self, lay: Layout, shape: Sequence[int], like: Tensor, dtype=None) -> Jet:
        t = like.new_empty((lay.rows(self.k1, self.k2), *shape), dtype=dtype or like.dtype)
        return Jet(t, lay, self.k1, self.k2)

    def jet(self, t: Tensor, lay: Layout) -> Jet:
        return Jet(t, lay, self.k1, self.k2)

    def square(self, d1: Tensor, out: Tensor) -> Tensor:
        """The second-order term of a unary op before ``f''``: ``d1_i d1_j`` per pair, or ``Σ d1_k²``."""
        if self.pairs is None:
            return torch.sum(d1 * d1, 0, keepdim=True, out=out)
        if self.k1 == 1:  # one direction, one pair (0, 0)
            return torch.mul(d1, d1, out=out)
        i, j = self.pairs
        torch.index_select(d1, 0, i, out=out)
        return out.mul_(d1.index_select(0, j))

    def cross(self, a1: Tensor, b1: Tensor, beta: Callable) -> Tensor:
        """The second-order term of a bilinear ``β(a, b)``: ``β(a_i, b_j) + β(a_j, b_i)``, or ``2 Σ β(a_k, b_k)``."""
        if self.pairs is None:
            return 2 * beta(a1, b1).sum(0, keepdim=True)
        i, j = self.pairs
        return beta(a1.index_select(0, i), b1.index_select(0, j)) + beta(
            a1.index_select(0, j), b1.index_select(0, i)
        )


def _take(jet: Jet, lay: Layout) -> Tensor:
    """The rows of ``jet`` for ``lay``: a slice when adjacent, else a copy (absent second order: zeros)."""
    if jet.lay == lay:
        return jet.t
    wanted = [o for o in range(3) if lay[o]]
    present = [o for o in range(3) if jet.lay[o]]
    if set(wanted) <= set(present):
        lo, hi = present.index(wanted[0]), present.index(wanted[-1])
        if present[lo : hi + 1] == wanted:
            return jet.t[jet.span(wanted[0])[0] : jet.span(wanted[-1])[1]]
    parts = []
    for o in wanted:
        block = jet.block(o)
        parts.append(block if block is not None else jet.t.new_zeros((jet.k2, *jet.shape)))
    return torch.cat(parts)


def _lift(x, rank: int):
    """``[rows, *S]`` -> ``[rows, 1, …, 1, *S]`` with ``rank`` per-row dimensions (numbers pass)."""
    if not isinstance(x, Tensor) or x.dim() - 1 >= rank:
        return x
    return x[(slice(None),) + (None,) * (rank - x.dim() + 1)]


def _rows1(x):
    """A constant as a one-row operand (numbers pass)."""
    return x[None] if isinstance(x, Tensor) else x


def _rank(x) -> int:
    return x.dim() - 1 if isinstance(x, Tensor) else 0


def _shift(d: int) -> int:
    # a leading row axis moves non-negative dims by one; negative dims count from the end
    return d + 1 if d >= 0 else d


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# --------------------------------------------------------------------------- bilinear maps on stacked rows
# β(x, y) for operands that both carry a leading row axis (1 row or many, broadcast).


def _b_mul(x, y):
    r = max(_rank(x), _rank(y))
    return _lift(x, r) * _lift(y, r)


def _b_div(x, y):
    r = max(_rank(x), _rank(y))
    return _lift(x, r) / _lift(y, r)


def _b_mm(x: Tensor, y: Tensor) -> Tensor:
    # one GEMM over all rows: a one-row operand is folded instead of being expanded per row
    if y.shape[0] == 1 and y.dim() == 3:
        return torch.matmul(x, y[0])
    if x.shape[0] == 1 and x.dim() == 3:
        return torch.matmul(y.transpose(-1, -2), x[0].transpose(-1, -2)).transpose(-1, -2)
    return torch.matmul(x, y)


def _b_mv(x: Tensor, y: Tensor) -> Tensor:
    return _b_mm(x, y.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------- rules
# A rule is fn(cx, lay, *args, **kwargs) -> Jet | list[Jet]; input-dependent arguments
# arrive as Jets, everything else as plain values. ``lay`` is the layout to produce.


@dataclass(frozen=True)
class Rule:
    fn: Callable
    #: whether the op is (jointly) linear in the input-dependent arguments at these positions
    linear: Callable[[frozenset[int]], bool]
    #: the output is a view of an input (costs no memory of its own)
    view: bool = False


def _always(pos) -> bool:
    return True


def _one_factor(pos) -> bool:
    return len(pos) <= 1


def _rowwise(fn: Callable, view: bool = False, identity: bool = False) -> Rule:
    """An op that acts on every row alike (views, reductions, casts): ``fn(t, rank, *args)``.

    ``identity`` ops (reshapes, aliases) that leave the shape as it was keep a seed's
    one-hot mark, so the first linear layer can skip its product with the identity.
    """

    def rule(cx, lay, x, *args, **kwargs):
        out = cx.jet(fn(_take(x, lay), len(x.shape), *args, **kwargs), lay)
        if identity and x.onehot is not None and out.shape == x.shape:
            out.onehot = x.onehot
        return out

    return Rule(rule, _always, view)


def _r_view(t, r, shape):
    return t.reshape(t.shape[0], *shape)


def _r_t(t, r):
    return t.transpose(1, 2) if r == 2 else t


def _r_transpose(t, r, a, b):
    return t.transpose(_shift(a), _shift(b))


def _r_permute(t, r, dims):
    return t.permute(0, *(_norm(d, r) + 1 for d in dims))


def _r_unsqueeze(t, r, d):
    return t.unsqueeze(_norm(d, r + 1) + 1)


def _r_squeeze(t, r, dims=None):
    if dims is None:  # squeeze.default, resolved at build time (see _fix_squeeze)
        raise AssertionError("squeeze.default reaches no rule")
    dims = [dims] if isinstance(dims, int) else dims
    return t.squeeze(tuple(_norm(d, r) + 1 for d in dims))


def _r_expand(t, r, size, implicit=False):
    t = _lift(t, len(size))
    return t.expand(t.shape[0], *size)


def _r_slice(t, r, dim=0, start=None, end=None, step=1):
    return aten.slice.Tensor(t, _shift(dim), start, end, step)


def _r_select(t, r, dim, index):
    return t.select(_shift(dim), index)


def _dims_all(dims, r):
    return list(range(1, r + 1)) if not dims else [_norm(d, r) + 1 for d in dims]


def _r_sum(t, r, dims=None, keepdim=False, dtype=None):
    return t.sum(_dims_all(dims, r), keepdim=keepdim, dtype=dtype)


def _r_mean(t, r, dims=None, keepdim=False, dtype=None):
    return t.mean(_dims_all(dims, r), keepdim=keepdim, dtype=dtype)


def _r_same(t, r, *args, **kwargs):
    # clone/alias/contiguous: jets are never written in place, so sharing is safe
    return t


def _r_to_copy(t, r, dtype=None, **kwargs):
    if dtype is not None and not dtype.is_floating_point:
        raise Unsupported("_to_copy", f"cast of an input-dependent tensor to {dtype}")
    return t.to(dtype=dtype) if dtype is not None else t


def _r_neg(t, r):
    return -t


def _r_index_select(t, r, dim, index):
    return t.index_select(_shift(dim), index)


def _r_index(t, r, indices):
    return aten.index.Tensor(t, [None, *indices])


def _r_flip(t, r, dims):
    return t.flip([_norm(d, r) + 1 for d in dims])


def _r_roll(t, r, shifts, dims=()):
    if not dims:
        raise Unsupported("roll", "roll without dims mixes the points")
    return t.roll(shifts, [_norm(d, r) + 1 for d in dims])


def _r_repeat(t, r, repeats):
    t = _lift(t, len(repeats))
    return t.repeat(1, *repeats)


def _r_diagonal(t, r, offset=0, dim1=0, dim2=1):
    return t.diagonal(offset, _norm(dim1, r) + 1, _norm(dim2, r) + 1)


def _split_rule(method: str) -> Rule:
    def rule(cx, lay, x, *args):
        t = _take(x, lay)
        r = len(x.shape)
        if method == "unbind":
            parts = t.unbind(_norm(args[0] if args else 0, r) + 1)
        else:
            size, dim = args[0], args[1] if len(args) > 1 else 0
            parts = t.split(size, _norm(dim, r) + 1)
        return [cx.jet(p, lay) for p in parts]

    return Rule(rule, _always, view=True)


def _getitem(cx, lay, seq, i):
    return seq[i]


# ---- sums of terms: each row block is combined separately (constants enter the value only)


def _blocks(cx: _Call, lay: Layout, args: Sequence, combine: Callable, like: Tensor) -> Jet:
    """Apply ``combine(parts, rows)`` block by block and stack the blocks into one jet.

    ``args`` mixes Jets and constants: a constant is itself in the value block and
    zero (the number 0) in the derivative blocks, as is a Jet's absent block.
    """
    results = []
    for order in range(3):
        if not lay[order]:
            continue
        rows = 1 if order == 0 else (cx.k1 if order == 1 else cx.k2)
        parts = []
        for a in args:
            if isinstance(a, Jet):
                b = a.block(order)
                parts.append(b if b is not None else 0)
            else:
                parts.append(_rows1(a) if order == 0 else 0)
        results.append((rows, combine(parts, rows)))
    tensors = [r for _, r in results if isinstance(r, Tensor)]
    dtype = like.dtype
    for r in tensors:
        dtype = torch.promote_types(dtype, r.dtype)
    shape = torch.broadcast_shapes(*(r.shape[1:] for r in tensors)) if tensors else like.shape[1:]
    t = like.new_empty((lay.rows(cx.k1, cx.k2), *shape), dtype=dtype)
    start = 0
    for rows, r in results:
        t[start : start + rows] = r
        start += rows
    return cx.jet(t, lay)


def _is_zero(p) -> bool:
    return not isinstance(p, Tensor) and p == 0


def _axpy(pa, pb, s: float):
    """``pa + s·pb`` for blocks that may be the number 0 (absent)."""
    if _is_zero(pb):
        return pa
    if _is_zero(pa):
        return s * pb
    r = max(_rank(pa), _rank(pb))
    return _lift(pa, r) + s * _lift(pb, r)


def _add_rule(sign: float, reverse: bool = False) -> Rule:
    """``a + sign·alpha·b`` (``reverse``: ``b + sign·alpha·a``, i.e. rsub)."""

    def rule(cx, lay, a, b, alpha=1):
        if reverse:
            a, b = b, a
        s = sign * alpha
        if isinstance(a, Jet) and isinstance(b, Jet) and a.lay == b.lay == lay:
            r = max(len(a.shape), len(b.shape))
            return cx.jet(torch.add(_lift(a.t, r), _lift(b.t, r), alpha=s), lay)
        like = a.t if isinstance(a, Jet) else b.t
        return _blocks(cx, lay, [a, b], lambda parts, rows: _axpy(parts[0], parts[1], s), like)

    return Rule(rule, _always)


def _zero_parts(parts, rows: int, sources) -> list[Tensor]:
    """``parts`` with each number-0 placeholder replaced by a broadcast zero of its source's shape."""
    ref = next(p for p in parts if isinstance(p, Tensor))
    return [
        p if isinstance(p, Tensor) else ref.new_zeros(()).expand(rows, *src.shape)
        for p, src in zip(parts, sources)
    ]


def _r_cat(cx, lay, tensors, dim=0):
    def combine(parts, rows):
        return torch.cat(_zero_parts(parts, rows, tensors), _shift(dim))

    return _blocks(cx, lay, tensors, combine, next(a.t for a in tensors if isinstance(a, Jet)))


def _r_stack(cx, lay, tensors, dim=0):
    r = len(next(a for a in tensors if isinstance(a, Jet)).shape)

    def combine(parts, rows):
        return torch.stack(_zero_parts(parts, rows, tensors), _norm(dim, r + 1) + 1)

    return _blocks(cx, lay, tensors, combine, next(a.t for a in tensors if isinstance(a, Jet)))


def _r_where(cx, lay, cond, a, b):
    def combine(parts, rows):
        pa, pb = parts
        r = max(_rank(pa), _rank(pb), cond.dim())
        c = cond[(None,) * (r + 1 - cond.dim())]
        return torch.where(c, _lift(pa, r), _lift(pb, r))

    like = a.t if isinstance(a, Jet) else b.t
    return _blocks(cx, lay, [a, b], combine, like)


# ---- products: bilinear maps (one input-dependent factor: linear; two: Leibniz rule)


def _onehot_mm(cx: _Call, lay: Layout, x: Jet, w: Tensor) -> Jet:
    """``x @ w`` where ``x``'s first-order rows are one-hot: they select rows of ``w``, no product needed."""
    shape = (*x.shape[:-1], w.shape[-1])
    out = cx.empty(lay, shape, x.t, dtype=torch.result_type(x.t, w))
    if lay.value:
        torch.matmul(x.block(0), w, out=out.block(0))
    picked = w.index_select(0, x.onehot)  # [k1, m]
    out.block(1).copy_(picked.view(picked.shape[0], *(1,) * (len(shape) - 1), picked.shape[1]))
    return out


def _product(cx: _Call, lay: Layout, a, b, beta: Callable) -> Jet:
    """``β(a, b)`` with its first and second derivatives for a bilinear ``β``."""
    ja, jb = isinstance(a, Jet), isinstance(b, Jet)
    if ja and not jb and a.onehot is not None and beta is _b_mm and isinstance(b, Tensor) and b.dim() == 2:
        if lay.first and not lay.second:  # the first layer, fed the seed directly
            return _onehot_mm(cx, lay, a, b)
    if not (ja and jb):
        # linear in the one input-dependent factor: every row in one call (one GEMM for mm)
        if ja:
            return cx.jet(beta(_take(a, lay), _rows1(b)), lay)
        return cx.jet(beta(_rows1(a), _take(b, lay)), lay)
    a0, b0 = a.block(0), b.block(0)
    parts = []
    if lay.value:
        parts.append(beta(a0, b0))
    if lay.first:
        parts.append(beta(a.block(1), b0) + beta(a0, b.block(1)))
    if lay.second:
        d2 = cx.cross(a.block(1), b.block(1), beta)
        if a.block(2) is not None:
            d2 = d2 + beta(a.block(2), b0)
        if b.block(2) is not None:
            d2 = d2 + beta(a0, b.block(2))
        parts.append(d2)
    shape = torch.broadcast_shapes(*(p.shape[1:] for p in parts))
    parts = [p.expand(p.shape[0], *shape) for p in parts]
    return cx.jet(torch.cat(parts) if len(parts) > 1 else parts[0], lay)


def _bilinear(beta: Callable) -> Rule:
    def rule(cx, lay, a, b):
        return _product(cx, lay, a, b, beta)

    return Rule(rule, _one_factor)


def _r_div(cx, lay, a, b, rounding_mode=None):
    if rounding_mode is not None:
        raise Unsupported("div", f"rounding_mode={rounding_mode!r} has no derivative rule")
    if not isinstance(b, Jet):
        return _product(cx, lay, a, b, _b_div)
    inner = Layout(True, lay.first or lay.second, lay.second)
    recip = _UNARY_RULES["reciprocal"](cx, inner, b)
    return _product(cx, lay, a, recip, _b_mul)


def _addmm_like(beta: Callable) -> Rule:
    """``beta_·bias + alpha·β(a, b)`` (addmm, addmv, baddbmm)."""

    def rule(cx, lay, bias, a, b, **scales):
        bias_scale, alpha = scales.get("beta", 1), scales.get("alpha", 1)
        prod = _product(cx, lay, a, b, beta)
        if alpha != 1:
            prod = cx.jet(prod.t * alpha, lay)
        if isinstance(bias, Jet):
            return _ADD.fn(cx, lay, prod, bias, alpha=bias_scale)
        if lay.value:
            # the product is a fresh tensor: the bias joins its value row in place
            prod.block(0).add_(_rows1(bias), alpha=bias_scale)
        return prod

    def linear(pos):
        return not (1 in pos and 2 in pos)

    return Rule(rule, linear)


# ---- unary smooth (and piecewise-linear) ops: value, f′ and f″ from the value


def _unary(derivs: Callable) -> Callable:
    """A rule from ``derivs(x, order, out, *params) -> (y, f1, f2)``; ``f2 = None`` means zero."""

    def rule(cx, lay, x, *params, **options):
        order = 2 if lay.second else (1 if lay.first else 0)
        v = x.block(0)
        out = cx.empty(lay, v.shape[1:], v)
        y, f1, f2 = derivs(v, order, out.block(0), *params, **options)
        if lay.value and y.data_ptr() != out.block(0).data_ptr():
            out.block(0).copy_(y)
        if lay.first:
            torch.mul(x.block(1), f1, out=out.block(1))
        if lay.second:
            d2 = out.block(2)
            if f2 is None:
                d2.zero_()
            else:
                cx.square(x.block(1), d2).mul_(f2)
            if x.block(2) is not None:
                d2.addcmul_(x.block(2), f1)
        return out

    return rule


def _d_tanh(x, order, out):
    y = torch.tanh(x, out=out)
    if order == 0:
        return y, None, None
    f1 = 1 - y * y
    return y, f1, (-2 * y * f1 if order == 2 else None)


def _d_sigmoid(x, order, out):
    y = torch.sigmoid(x, out=out)
    if order == 0:
        return y, None, None
    f1 = y * (1 - y)
    return y, f1, (f1 * (1 - 2 * y) if order == 2 else None)


def _d_sin(x, order, out):
    y = torch.sin(x, out=out)
    return y, (torch.cos(x) if order else None), (-y if order == 2 else None)


def _d_cos(x, order, out):
    y = torch.cos(x, out=out)
    return y, (-torch.sin(x) if order else None), (-y if order == 2 else None)


def _d_tan(x, order, out):
    y = torch.tan(x, out=out)
    f1 = 1 + y * y if order else None
    return y, f1, (2 * y * f1 if order == 2 else None)


def _d_sinh(x, order, out):
    y = torch.sinh(x, out=out)
    return y, (torch.cosh(x) if order else None), (y if order == 2 else None)


def _d_cosh(x, order, out):
    y = torch.cosh(x, out=out)
    return y, (torch.sinh(x) if order else None), (y if order == 2 else None)


def _d_exp(x, order, out):
    y = torch.exp(x, out=out)
    return y, (y if order else None), (y if order == 2 else None)


def _d_expm1(x, order, out):
    y = torch.expm1(x, out=out)
    e = y + 1 if order else None
    return y, e, e


def _d_log(x, order, out):
    y = torch.log(x, out=out)
    f1 = x.reciprocal() if order else None
    return y, f1, (-f1 * f1 if order == 2 else None)


def _d_log1p(x, order, out):
    y = torch.log1p(x, out=out)
    f1 = (1 + x).reciprocal() if order else None
    return y, f1, (-f1 * f1 if order == 2 else None)


def _d_sqrt(x, order, out):
    y = torch.sqrt(x, out=out)
    f1 = 0.5 / y if order else None
    return y, f1, (-f1 * f1 / y if order == 2 else None)


def _d_rsqrt(x, order, out):
    y = torch.rsqrt(x, out=out)
    y3 = y * y * y if order else None
    return y, (-0.5 * y3 if order else None), (0.75 * y3 * y * y if order == 2 else None)


def _d_reciprocal(x, order, out):
    y = torch.reciprocal(x, out=out)
    y2 = y * y if order else None
    return y, (-y2 if order else None), (2 * y2 * y if order == 2 else None)


def _d_atan(x, order, out):
    y = torch.atan(x, out=out)
    f1 = (1 + x * x).reciprocal() if order else None
    return y, f1, (-2 * x * f1 * f1 if order == 2 else None)


def _d_erf(x, order, out):
    y = torch.erf(x, out=out)
    f1 = (2 / math.sqrt(math.pi)) * torch.exp(-x * x) if order else None
    return y, f1, (-2 * x * f1 if order == 2 else None)


def _d_pow(x, order, out, p):
    # pow's own derivative convention: exponent 0 has derivative 0 everywhere
    y = torch.pow(x, p, out=out)
    if order == 0:
        return y, None, None
    if isinstance(p, Tensor):
        f1 = torch.where(p == 0, 0.0, p * torch.pow(x, p - 1))
        f2 = torch.where((p == 0) | (p == 1), 0.0, p * (p - 1) * torch.pow(x, p - 2))
        return y, f1, (f2 if order == 2 else None)
    f1 = torch.zeros_like(x) if p == 0 else p * torch.pow(x, p - 1)
    f2 = None if p in (0, 1) else p * (p - 1) * torch.pow(x, p - 2)
    return y, f1, (f2 if order == 2 else None)


def _d_pow_base(x, order, out, base):
    # base ** x for a constant base
    y = torch.pow(base, x, out=out) if out is not None else torch.pow(base, x)
    if order == 0:
        return y, None, None
    ln = math.log(base) if not isinstance(base, Tensor) else torch.log(base)
    f1 = y * ln
    return y, f1, (f1 * ln if order == 2 else None)


def _d_softplus(x, order, out, beta=1.0, threshold=20.0):
    y = torch.nn.functional.softplus(x, beta, threshold)
    if order == 0:
        return y, None, None
    linear = x * beta > threshold
    s = torch.sigmoid(x * beta)
    f1 = torch.where(linear, 1.0, s).to(x.dtype)
    f2 = torch.where(linear, 0.0, beta * s * (1 - s)).to(x.dtype) if order == 2 else None
    return y, f1, f2


def _d_silu(x, order, out):
    s = torch.sigmoid(x)
    y = torch.mul(x, s, out=out)
    if order == 0:
        return y, None, None
    f1 = s * (1 + x * (1 - s))
    f2 = s * (1 - s) * (2 + x * (1 - 2 * s)) if order == 2 else None
    return y, f1, f2


_SQRT1_2PI = 1 / math.sqrt(2 * math.pi)
_TANH_K = math.sqrt(2 / math.pi)
_TANH_C = 0.044715


def _d_gelu(x, order, out, approximate="none"):
    y = torch.nn.functional.gelu(x, approximate=approximate)
    if order == 0:
        return y, None, None
    if approximate == "tanh":
        u1 = _TANH_K * (1 + 3 * _TANH_C * x * x)
        t = torch.tanh(_TANH_K * (x + _TANH_C * x * x * x))
        sech2 = 1 - t * t
        f1 = 0.5 * (1 + t) + 0.5 * x * sech2 * u1
        f2 = sech2 * (u1 + 0.5 * x * (6 * _TANH_K * _TANH_C * x - 2 * t * u1 * u1)) if order == 2 else None
        return y, f1, f2
    cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
    pdf = torch.exp(-0.5 * x * x) * _SQRT1_2PI
    f1 = cdf + x * pdf
    return y, f1, (pdf * (2 - x * x) if order == 2 else None)


def _d_elu(x, order, out, alpha=1.0, scale=1.0, input_scale=1.0):
    y = torch.ops.aten.elu(x, alpha, scale, input_scale)
    if order == 0:
        return y, None, None
    pos = x > 0
    neg = scale * alpha * input_scale * torch.exp(x * input_scale)
    f1 = torch.where(pos, scale, neg).to(x.dtype)
    f2 = torch.where(pos, 0.0, neg * input_scale).to(x.dtype) if order == 2 else None
    return y, f1, f2


def _mask_derivs(value: Callable, mask: Callable) -> Callable:
    """A piecewise-linear op: derivative 1 where ``mask`` holds (torch's convention at kinks), no curvature."""

    def derivs(x, order, out, *params):
        y = value(x, *params)
        return y, (mask(x, *params).to(x.dtype) if order else None), None

    return derivs


def _d_leaky_relu(x, order, out, slope=0.01):
    y = torch.nn.functional.leaky_relu(x, slope)
    # built in x's dtype: torch.where on two Python numbers would round the slope to float32
    f1 = torch.ones_like(x).masked_fill_(x <= 0, slope) if order else None
    return y, f1, None


def _d_abs(x, order, out):
    return torch.abs(x), (torch.sgn(x) if order else None), None


def _clamp_mask(x, lo=None, hi=None):
    m = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        m = m & (x >= lo)
    if hi is not None:
        m = m & (x <= hi)
    return m


_UNARY_DERIVS: dict[str, Callable] = {
    "tanh": _d_tanh,
    "sigmoid": _d_sigmoid,
    "sin": _d_sin,
    "cos": _d_cos,
    "tan": _d_tan,
    "sinh": _d_sinh,
    "cosh": _d_cosh,
    "exp": _d_exp,
    "expm1": _d_expm1,
    "log": _d_log,
    "log1p": _d_log1p,
    "sqrt": _d_sqrt,
    "rsqrt": _d_rsqrt,
    "reciprocal": _d_reciprocal,
    "atan": _d_atan,
    "erf": _d_erf,
    "softplus": _d_softplus,
    "silu": _d_silu,
    "gelu": _d_gelu,
    "elu": _d_elu,
    "leaky_relu": _d_leaky_relu,
    "abs": _d_abs,
    "relu": _mask_derivs(torch.relu, lambda x: x > 0),
    "hardtanh": _mask_derivs(
        lambda x, lo=-1.0, hi=1.0: torch.nn.functional.hardtanh(x, lo, hi),
        lambda x, lo=-1.0, hi=1.0: (x > lo) & (x < hi),
    ),
    "clamp": _mask_derivs(lambda x, lo=None, hi=None: torch.clamp(x, lo, hi), _clamp_mask),
    "clamp_min": _mask_derivs(lambda x, lo: torch.clamp_min(x, lo), lambda x, lo: x >= lo),
    "clamp_max": _mask_derivs(lambda x, hi: torch.clamp_max(x, hi), lambda x, hi: x <= hi),
}
_UNARY_RULES = {name: _unary(d) for name, d in _UNARY_DERIVS.items()}


_POWER = _unary(_d_pow)  # x ** p, p constant
_EXPONENTIAL = _unary(_d_pow_base)  # base ** x, base constant


def _r_pow(cx, lay, x, p):
    if isinstance(p, Jet):
        if isinstance(x, Jet):
            raise Unsupported("pow", "input-dependent base and exponent")
        return _EXPONENTIAL(cx, lay, p, x)
    return _POWER(cx, lay, x, p)


def _nonlinear(pos) -> bool:
    return False


def _r_clamp_tensor(cx, lay, x, lo=None, hi=None):
    if isinstance(lo, Jet) or isinstance(hi, Jet):
        raise Unsupported("clamp", "input-dependent bounds")
    return _UNARY_RULES["clamp"](cx, lay, x, lo, hi)


_ADD = _add_rule(1.0)

#: ATen op name (overload packet) -> rule
RULES: dict[str, Rule] = {
    # views and reshapes
    "view": _rowwise(_r_view, view=True, identity=True),
    "_unsafe_view": _rowwise(_r_view, view=True, identity=True),
    "t": _rowwise(_r_t, view=True),
    "transpose": _rowwise(_r_transpose, view=True),
    "permute": _rowwise(_r_permute, view=True),
    "unsqueeze": _rowwise(_r_unsqueeze, view=True),
    "squeeze": _rowwise(_r_squeeze, view=True),
    "expand": _rowwise(_r_expand, view=True),
    "slice": _rowwise(_r_slice, view=True),
    "select": _rowwise(_r_select, view=True),
    "diagonal": _rowwise(_r_diagonal, view=True),
    "alias": _rowwise(_r_same, view=True, identity=True),
    "clone": _rowwise(_r_same, view=True, identity=True),
    "_to_copy": _rowwise(_r_to_copy),
    "split": _split_rule("split"),
    "split_with_sizes": _split_rule("split"),
    "unbind": _split_rule("unbind"),
    "getitem": Rule(_getitem, _always, view=True),
    # other linear maps of one tensor
    "neg": _rowwise(_r_neg),
    "sum": _rowwise(_r_sum),
    "mean": _rowwise(_r_mean),
    "index_select": _rowwise(_r_index_select),
    "index": _rowwise(_r_index),
    "flip": _rowwise(_r_flip),
    "roll": _rowwise(_r_roll),
    "repeat": _rowwise(_r_repeat),
    # sums of terms
    "add": _ADD,
    "sub": _add_rule(-1.0),
    "rsub": _add_rule(-1.0, reverse=True),
    "cat": Rule(_r_cat, _always),
    "stack": Rule(_r_stack, _always),
    "where": Rule(_r_where, _always),
    # products
    "mul": _bilinear(_b_mul),
    "div": Rule(_r_div, lambda pos: 1 not in pos),
    "mm": _bilinear(_b_mm),
    "bmm": _bilinear(_b_mm),
    "mv": _bilinear(_b_mv),
    "addmm": _addmm_like(_b_mm),
    "baddbmm": _addmm_like(_b_mm),
    "addmv": _addmm_like(_b_mv),
    # elementwise nonlinear
    **{name: Rule(rule, _nonlinear) for name, rule in _UNARY_RULES.items() if name != "clamp"},
    "clamp": Rule(_r_clamp_tensor, _nonlinear),
    "pow": Rule(_r_pow, _nonlinear),
}

#: ops whose result carries no derivative (comparisons, rounding, detach): evaluated on values only
VALUE_OPS = frozenset(
    {
        "detach", "sign", "floor", "ceil", "round", "trunc", "gt", "ge", "lt", "le", "eq", "ne",
        "logical_and", "logical_or", "logical_not", "logical_xor", "isnan", "isinf", "isfinite",
        "argmax", "argmin", "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros",
        "new_ones", "new_full", "new_empty", "bitwise_and", "bitwise_or", "bitwise_not",
    }
)  # fmt: skip


def _rule_for(op) -> Rule | None:
    return RULES.get(_op_name(op))


def _op_name(op) -> str:
    if op is operator.getitem:
        return "getitem"
    packet = getattr(op, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(op, "__name__", str(op))


# --------------------------------------------------------------------------- tracing


@dataclass(frozen=True)
class _BatchDim:
    """A shape entry equal to ``factor`` times the batch size."""

    factor: int


@dataclass(frozen=True)
class _Ref:
    """The output of step ``index``."""

    index: int


_INPUT = "input"


@dataclass
class _Step:
    op: Any
    name: str
    args: tuple
    kwargs: dict
    kind: str  # "input" | "jet" | "value"
    rule: Rule | None = None
    linear: bool = True
    affine: bool = True
    jet_refs: tuple[int, ...] = ()
    value_refs: tuple[int, ...] = ()
    numel: float = 0.0  # elements per point of one row of the result
    shape: Any = None  # of the result, batch entries symbolic (a list for several results)


class _Recorder(TorchDispatchMode):
    """Records the ATen ops of one call of ``g``; every tensor is known by the record that made it.

    A dispatch mode sees what ``make_fx`` sees (eager modules, TorchScript, exported
    programs all reach the dispatcher) at a fraction of its cost: no FX graph, no
    fake-tensor metadata. Record 0 is the input; a tensor no record made is a constant
    (a parameter, a buffer, a captured tensor) and stays in the arguments as itself.
    """

    def __init__(self, z: Tensor) -> None:
        super().__init__()
        self.records: list[tuple[Any, Any, Any, Any]] = [(_INPUT, (), {}, z)]  # (op, args, kwargs, result)
        self.made: dict[int, int] = {id(z): 0}
        self.refused: tuple[str, str] | None = None  # (op, why): raised once the call is over

    def ref(self, obj):
        if isinstance(obj, Tensor):
            index = self.made.get(id(obj))
            return obj if index is None else _Ref(index)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.ref(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self.ref(v) for k, v in obj.items()}
        return obj

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.refused is None:
            name = _op_name(func)
            if func._schema.is_mutable:
                self.refused = (name, f"in-place op aten.{name} (the Taylor path replays out-of-place ops only)")
            elif torch.Tag.nondeterministic_seeded in func.tags:
                self.refused = (name, f"random op aten.{name} (a replay would repeat its numbers)")
        out = func(*args, **kwargs)
        index = len(self.records)
        self.records.append((func, self.ref(args), self.ref(kwargs), out))
        if isinstance(out, Tensor):
            self.made[id(out)] = index
        elif isinstance(out, (list, tuple)):
            # several results: one getitem record each, as consumers see them
            for j, o in enumerate(out):
                self.records.append((operator.getitem, (_Ref(index), j), {}, o))
                if isinstance(o, Tensor):
                    self.made[id(o)] = len(self.records) - 1
        return out


def _trace(g: Callable, z: Tensor) -> tuple[list, Any, Any]:
    """The records of one call of ``g`` on ``z``, its output as a reference, and the output."""
    rec = _Recorder(z)
    try:
        with torch.no_grad(), warnings.catch_warnings(), rec:
            warnings.simplefilter("ignore")
            y = g(z)
    except Exception as exc:  # untraceable code: the caller falls back
        text = str(exc).strip()
        raise Unsupported("trace", f"cannot trace the model: {text.splitlines()[0] if text else type(exc).__name__}") from None
    if rec.refused is not None:
        raise Unsupported(*rec.refused)
    return rec.records, rec.ref(y), y


_BATCH_CHANGES = "the traced graph changes with the batch size"


def _merge(a, b, batches: tuple[int, int]):
    """One argument of two traces at different batch sizes, with batch-sized ints made symbolic."""
    b1, b2 = batches
    if isinstance(a, _Ref) or isinstance(b, _Ref):
        if a != b:
            raise Unsupported("trace", _BATCH_CHANGES)
        return a
    if isinstance(a, Tensor):
        if not isinstance(b, Tensor) or (a is not b and (a.shape != b.shape or not torch.equal(a, b))):
            raise Unsupported("trace", "a constant changes with the batch size")
        return a
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            raise Unsupported("trace", _BATCH_CHANGES)
        return type(a)(_merge(x, y, batches) for x, y in zip(a, b))
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            raise Unsupported("trace", _BATCH_CHANGES)
        return {k: _merge(a[k], b[k], batches) for k in a}
    if isinstance(a, int) and not isinstance(a, bool) and isinstance(b, int) and a != b:
        if a % b1 == 0 and b % b2 == 0 and a // b1 == b // b2:
            return _BatchDim(a // b1)
        raise Unsupported("trace", f"an argument changes with the batch size, not in proportion ({a} vs {b})")
    if type(a) is not type(b) or (a != b and not (isinstance(a, float) and math.isnan(a) and math.isnan(b))):
        raise Unsupported("trace", _BATCH_CHANGES)
    return a


def _shape_of(val):
    if isinstance(val, Tensor):
        return tuple(val.shape)
    if isinstance(val, (list, tuple)):
        return [_shape_of(v) for v in val]
    return None


def _numel(val) -> int:
    if isinstance(val, Tensor):
        return val.numel()
    if isinstance(val, (list, tuple)):
        return sum(_numel(v) for v in val)
    return 0


def _walk(obj, fn):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            _walk(o, fn)
    elif isinstance(obj, dict):
        for o in obj.values():
            _walk(o, fn)
    else:
        fn(obj)


def _has_batch(obj) -> bool:
    found = []
    _walk(obj, lambda o: found.append(o) if isinstance(o, _BatchDim) else None)
    return bool(found)


def _substitute(obj, env: list, batch: int, values: bool = False):
    """Arguments for one evaluation: references replaced by their entries (``values``:
    by the values of jets), batch entries by sizes."""
    if isinstance(obj, _Ref):
        return _value_of(env[obj.index]) if values else env[obj.index]
    if isinstance(obj, _BatchDim):
        return obj.factor * batch
    if isinstance(obj, list):
        return [_substitute(o, env, batch, values) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_substitute(o, env, batch, values) for o in obj)
    if isinstance(obj, dict):
        return {k: _substitute(v, env, batch, values) for k, v in obj.items()}
    return obj


def _fold(obj, consts: dict[int, Any]):
    if isinstance(obj, _Ref) and obj.index in consts:
        return consts[obj.index]
    if isinstance(obj, list):
        return [_fold(o, consts) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_fold(o, consts) for o in obj)
    if isinstance(obj, dict):
        return {k: _fold(v, consts) for k, v in obj.items()}
    return obj


def _positions(args: tuple, kinds: dict[int, str], kind: str) -> tuple[frozenset[int], tuple[int, ...]]:
    """Positions of the top-level arguments that hold a ``kind`` reference, and those references."""
    pos, refs = set(), []
    for i, a in enumerate(args):
        found = []
        _walk(a, lambda o: found.append(o.index) if isinstance(o, _Ref) and kinds.get(o.index) == kind else None)
        if found:
            pos.add(i)
            refs.extend(found)
    return frozenset(pos), tuple(refs)


def _compile(trace1, trace2, batches: tuple[int, int]) -> tuple[list[_Step], Any]:
    """Steps of the generalised program and the output argument (refs into the steps)."""
    (recs1, out1, _), (recs2, out2, _) = trace1, trace2
    if [r[0] for r in recs1] != [r[0] for r in recs2]:
        raise Unsupported("trace", _BATCH_CHANGES)
    b1, b2 = batches
    steps: list[_Step] = []
    consts: dict[int, Any] = {}
    kinds: dict[int, str] = {}
    for index, (r1, r2) in enumerate(zip(recs1, recs2)):
        op, res1, res2 = r1[0], r1[3], r2[3]
        per_point = max((_numel(res2) - _numel(res1)) / (b2 - b1), 0.0)
        shape = _merge(_shape_of(res1), _shape_of(res2), batches)
        if op == _INPUT:
            steps.append(_Step(_INPUT, "input", (), {}, _INPUT, numel=per_point, shape=shape))
            kinds[index] = "jet"
            continue
        args = _fold(_merge(r1[1], r2[1], batches), consts)
        kwargs = _fold(_merge(r1[2], r2[2], batches), consts)
        op, args = _fix_squeeze(op, args, recs1)
        step = _classify(op, args, kwargs, kinds, per_point)
        step.shape = shape
        if step.kind == "const":
            consts[index] = res1  # computed from constants only: the same in every call
        elif not isinstance(res1, (Tensor, list, tuple)):
            # a Python number from an input-dependent tensor: control flow or shapes read from values
            raise Unsupported("trace", f"cannot trace the model: it reads input values into Python (aten.{step.name})")
        steps.append(step)
        kinds[index] = step.kind
    return steps, _fold(_merge(out1, out2, batches), consts)


def _fix_squeeze(op, args, records):
    # squeeze.default drops every size-1 dim, which at one point per chunk would include
    # the batch axis; pin the dims it dropped when traced
    if op is aten.squeeze.default and isinstance(args[0], _Ref):
        shape = records[args[0].index][3].shape
        return aten.squeeze.dims, (args[0], [i for i, s in enumerate(shape) if s == 1])
    return op, args


def _classify(op, args, kwargs, kinds: dict[int, str], per_point: float) -> _Step:
    name = _op_name(op)
    jet_pos, jet_refs = _positions(args, kinds, "jet")
    _, value_refs = _positions(args, kinds, "value")
    _, kw_jets = _positions(tuple(kwargs.values()), kinds, "jet")
    if kw_jets:
        raise Unsupported(name, "input-dependent keyword argument")
    if not jet_refs:
        batchy = bool(value_refs) or _has_batch(args) or _has_batch(kwargs)
        return _Step(op, name, args, kwargs, "value" if batchy else "const", value_refs=value_refs)
    if name in VALUE_OPS:
        return _Step(op, name, args, kwargs, "value", jet_refs=jet_refs, value_refs=value_refs)
    rule = _rule_for(op)
    step = _Step(op, name, args, kwargs, "jet", rule=rule, jet_refs=jet_refs, value_refs=value_refs,
                 numel=per_point)  # fmt: skip
    step.linear = rule.linear(jet_pos) if rule is not None else False
    return step


# --------------------------------------------------------------------------- the program


@dataclass
class _Schedule:
    """Per requested output orders: each step's layout and what to free after it."""

    layouts: list[Layout]
    live: list[bool]
    frees: list[list[int]]
    #: jets with no rows that a live step reads (a sum with an affine term): zero placeholders
    zero: list[bool]


#: what each kind needs at the output: first-order rows, or second-order rows
WANT = {
    "value": frozenset({0}),
    "jacobian": frozenset({1}),
    "divergence": frozenset({1}),
    "jvp": frozenset({1}),
    "hessian": frozenset({2}),
    "laplacian": frozenset({2}),
}


@dataclass
class TaylorProgram:
    """A traced batch function ready to push jets through; see :func:`build`."""

    steps: list[_Step]
    output: Any
    n_in: int
    n_out: int
    dtype: torch.dtype
    itemsize: int
    _schedules: dict = field(default_factory=dict, repr=False)

    # ---- analysis

    def ops(self) -> frozenset[str]:
        return frozenset(s.name for s in self.steps if s.kind in ("jet", "value"))

    def schedule(self, want: frozenset[int]) -> _Schedule:
        """Backward need analysis: which orders each step must produce for ``want`` at the output."""
        if want in self._schedules:
            return self._schedules[want]
        n = len(self.steps)
        need: list[set[int]] = [set() for _ in range(n)]
        live = [False] * n
        out = self.output
        if isinstance(out, _Ref):
            need[out.index] |= set(want)
            live[out.index] = True
        for i in reversed(range(n)):
            s = self.steps[i]
            if not live[i] or s.kind == _INPUT:
                continue
            if s.kind == "value":
                for r in s.jet_refs:
                    need[r].add(0)
                    live[r] = True
            else:
                passed = need[i] if s.linear else set(range(max(need[i], default=-1) + 1))
                for r in s.jet_refs:
                    need[r] |= passed
                    live[r] = live[r] or bool(passed)
            for r in s.value_refs:
                live[r] = True
        layouts = []
        for i, s in enumerate(self.steps):
            if s.kind in ("jet", _INPUT):
                layouts.append(Layout(0 in need[i], 1 in need[i], 2 in need[i] and not s.affine))
            else:
                layouts.append(EMPTY)
        # a jet with no rows is zero (or unused): its step need not run
        for i, s in enumerate(self.steps):
            if s.kind in ("jet", _INPUT) and layouts[i] == EMPTY:
                live[i] = False
        last: dict[int, int] = {}
        zero = [False] * n
        for i, s in enumerate(self.steps):
            if live[i]:
                for r in (*s.jet_refs, *s.value_refs):
                    last[r] = i
                    zero[r] = zero[r] or not live[r]
        frees: list[list[int]] = [[] for _ in range(n)]
        keep = out.index if isinstance(out, _Ref) else -1
        for r, i in last.items():
            if r != keep:
                frees[i].append(r)
        sched = _Schedule(layouts, live, frees, zero)
        self._schedules[want] = sched
        return sched

    def bytes_per_point(self, kind: str, directions: int) -> int:
        """Peak bytes one point needs in one pass with ``directions`` streams (an estimate).

        Simulates the live jets of a pass (rows times elements per point) and adds the
        temporaries of the rule that runs: the planner divides its budget by this.
        """
        k1, k2 = self.stream_counts(kind, directions)
        sched = self.schedule(WANT[kind])
        live_bytes, peak = 0.0, 0.0
        sizes: dict[int, float] = {}
        for i, s in enumerate(self.steps):
            if not sched.live[i]:
                continue
            lay = sched.layouts[i]
            rows = lay.rows(k1, k2) if s.kind != "value" else 1
            own = 0.0 if (s.rule is not None and s.rule.view) else rows * s.numel
            temp = 0.0
            if s.kind == "jet" and not s.linear:
                temp = (4 + k1 + 2 * k2) * s.numel
            sizes[i] = own
            live_bytes += own
            peak = max(peak, live_bytes + temp)
            for r in sched.frees[i]:
                live_bytes -= sizes.pop(r, 0.0)
        return int(peak * self.itemsize) + 64

    def stream_counts(self, kind: str, directions: int) -> tuple[int, int]:
        """``(k1, k2)`` of one pass of ``kind`` with ``directions`` directions (pairs for a Hessian)."""
        d = max(1, int(directions))
        if kind == "hessian":
            return min(self.n_in, 2 * d), d
        if kind == "laplacian":
            return d, 1
        if kind == "value":
            return 0, 0
        return d, 0

    # ---- evaluation

    def _run(self, z: Tensor, want: frozenset[int], tangents: Tensor | None, k2: int = 0,
             pairs: tuple[Tensor, Tensor] | None = None, onehot: Tensor | None = None):  # fmt: skip
        """Push the jet of ``z`` (first-order rows ``tangents``) through; returns the output (Jet, tensor or None).

        ``onehot``: the input columns when ``tangents`` are their one-hot rows.
        """
        sched = self.schedule(want)
        batch = z.shape[0]
        k1 = 0 if tangents is None else tangents.shape[0]
        cx = _Call(k1, k2, pairs, batch)
        env: list[Any] = [None] * len(self.steps)
        with torch.no_grad():
            for i, s in enumerate(self.steps):
                if not sched.live[i]:
                    if sched.zero[i]:
                        env[i] = _zero_jet(cx, _substitute(s.shape, env, batch), z)
                    continue
                if s.kind == _INPUT:
                    env[i] = _seed(cx, sched.layouts[i], z, tangents, onehot)
                elif s.kind == "value":
                    args = _substitute(s.args, env, batch, values=True)
                    kwargs = _substitute(s.kwargs, env, batch, values=True)
                    env[i] = s.op(*args, **kwargs)
                else:
                    args = _substitute(s.args, env, batch)
                    kwargs = _substitute(s.kwargs, env, batch)
                    env[i] = s.rule.fn(cx, sched.layouts[i], *args, **kwargs)
                for r in sched.frees[i]:
                    env[r] = None
        out = self.output
        return _substitute(out, env, batch) if isinstance(out, _Ref) else out

    def _out_block(self, res, order: int, rows: int, z: Tensor) -> Tensor:
        """Rows of one order at the output as ``[rows, B, n_out]`` (zeros where the output does not depend on them)."""
        b = z.shape[0]
        if isinstance(res, Jet) and res.block(order) is not None:
            return res.block(order).reshape(rows, b, self.n_out)
        return z.new_zeros((rows, b, self.n_out), dtype=self.dtype)

    def value(self, z: Tensor) -> Tensor:
        """``g(z)`` through the program (the value rows only): ``[B, n_out]``."""
        res = self._run(z, WANT["value"], None)
        if isinstance(res, Jet):
            return res.block(0).reshape(z.shape[0], self.n_out)
        return torch.as_tensor(res).reshape(z.shape[0], self.n_out)

    def jvp(self, z: Tensor, tangents: Tensor) -> Tensor:
        """``J t`` for each ``t`` in ``tangents`` ``[k, B, n_in]`` -> ``[k, B, n_out]``."""
        return self._out_block(self._run(z, WANT["jvp"], tangents), 1, tangents.shape[0], z)

    def jacobian(self, z: Tensor, *, directions: int | None = None, out: Tensor | None = None) -> Tensor:
        """Per-point Jacobian ``[B, n_out, n_in]``, ``directions`` input columns per pass."""
        b = z.shape[0]
        out = z.new_empty((b, self.n_out, self.n_in), dtype=self.dtype) if out is None else out
        for cols in _chunks(self.n_in, directions):
            res = self._run(z, WANT["jacobian"], _onehot(cols, b, self.n_in, z), onehot=cols)
            block = self._out_block(res, 1, cols.numel(), z)  # [k, B, n_out]
            if self.n_in == 1:  # a plain copy: through the permuted view it took 6x longer
                out.view(b, self.n_out).copy_(block[0])
            elif cols.numel() == self.n_in:
                out.copy_(block.permute(1, 2, 0))
            else:
                out[:, :, cols] = block.permute(1, 2, 0)
        return out

    def divergence(self, z: Tensor, *, directions: int | None = None, out: Tensor | None = None) -> Tensor:
        """``Σᵢ ∂gᵢ/∂zᵢ`` per point ``[B]`` (needs ``n_out == n_in``), ``directions`` per pass."""
        if self.n_out != self.n_in:
            raise ValueError("divergence needs as many outputs as inputs")
        b = z.shape[0]
        out = z.new_zeros(b, dtype=self.dtype) if out is None else out.zero_()
        for cols in _chunks(self.n_in, directions):
            res = self._run(z, WANT["divergence"], _onehot(cols, b, self.n_in, z), onehot=cols)
            block = self._out_block(res, 1, cols.numel(), z)  # [k, B, n]
            out += block.gather(2, cols.to(z.device)[:, None, None].expand(-1, b, 1)).sum(0)[:, 0]
        return out

    def laplacian(self, z: Tensor, *, directions: int | None = None, out: Tensor | None = None) -> Tensor:
        """``Σᵢ ∂²g/∂zᵢ²`` per point ``[B, n_out]``: one collapsed stream, ``directions`` per pass."""
        b = z.shape[0]
        out = z.new_empty((b, self.n_out), dtype=self.dtype) if out is None else out
        for k, cols in enumerate(_chunks(self.n_in, directions)):
            res = self._run(z, WANT["laplacian"], _onehot(cols, b, self.n_in, z), k2=1, onehot=cols)
            block = self._out_block(res, 2, 1, z)
            if k == 0:  # the first pass writes, later ones add
                out.copy_(block[0])
            else:
                out += block[0]
        return out

    def hessian(self, z: Tensor, *, directions: int | None = None, out: Tensor | None = None) -> Tensor:
        """Per-point Hessian ``[B, n_out, n_in, n_in]``, ``directions`` pairs ``i ≤ j`` per pass."""
        b, n = z.shape[0], self.n_in
        out = z.new_empty((b, self.n_out, n, n), dtype=self.dtype) if out is None else out
        pairs = torch.triu_indices(n, n, device=z.device)
        total = pairs.shape[1]
        step = total if directions is None else max(1, int(directions))
        for start in range(0, total, step):
            i, j = pairs[:, start : start + step]
            cols, inverse = torch.unique(torch.cat([i, j]), return_inverse=True)
            local = (inverse[: i.numel()], inverse[i.numel() :])
            res = self._run(z, WANT["hessian"], _onehot(cols, b, n, z), k2=i.numel(), pairs=local, onehot=cols)
            block = self._out_block(res, 2, i.numel(), z)  # [P, B, n_out]
            if n == 1:
                out.view(b, self.n_out).copy_(block[0])
            else:
                out[:, :, i, j] = block.permute(1, 2, 0)
                out[:, :, j, i] = block.permute(1, 2, 0)
        return out


def _value_of(e):
    """The value of an environment entry for ops that read values only."""
    if isinstance(e, Jet):
        return e.block(0)[0]
    if isinstance(e, list):
        return [_value_of(x) for x in e]
    return e


def _zero_jet(cx: _Call, shape, like: Tensor):
    """A jet with no rows: zero wherever it is read (a list of them for several results)."""
    if isinstance(shape, list):
        return [_zero_jet(cx, s, like) for s in shape]
    return Jet(like.new_zeros(()).expand(0, *shape), EMPTY, cx.k1, cx.k2)


def _seed(cx: _Call, lay: Layout, z: Tensor, tangents: Tensor | None, onehot: Tensor | None) -> Jet:
    jet = cx.empty(lay, z.shape, z)
    if lay.value:
        jet.block(0)[0] = z
    if lay.first:
        jet.block(1).copy_(tangents)
        jet.onehot = None if onehot is None else onehot.to(z.device)
    return jet


def _onehot(cols: Tensor, b: int, n: int, like: Tensor) -> Tensor:
    """``[k, B, n]`` rows ``e_cols[k]``, the same for every point (a broadcast view)."""
    e = like.new_zeros((cols.numel(), n))
    e[torch.arange(cols.numel(), device=like.device), cols.to(like.device)] = 1
    return e[:, None, :].expand(cols.numel(), b, n)


def _chunks(n: int, size: int | None):
    size = n if size is None else max(1, int(size))
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


# --------------------------------------------------------------------------- building


def _probe_batch(z: Tensor, b: int) -> Tensor:
    return z[torch.arange(b, device=z.device) % z.shape[0]]


def build(g: Callable[[Tensor], Tensor], z_probe: Tensor, orders: int = 2) -> TaylorProgram:
    """Trace ``g: [B, n_in] -> [B, n_out]`` and check the program against it; raises :class:`Unsupported`.

    ``g`` is traced at two batch sizes (rows of ``z_probe``, cycled) so that shape
    arguments holding the batch size become symbolic. The program is then run on a
    perturbed probe batch and compared with ``g`` and with torch.func's directional
    derivatives up to ``orders`` (1 for Jacobians and divergences, 2 for Hessians and
    Laplacians: checking only what will be used keeps small requests cheap); a mismatch
    means a rule does not fit this model, and the caller should fall back.
    """
    b1, b2 = PROBE_BATCHES
    trace1, trace2 = _trace(g, _probe_batch(z_probe, b1)), _trace(g, _probe_batch(z_probe, b2))
    steps, output = _compile(trace1, trace2, (b1, b2))
    for s in steps:
        if s.kind == "jet":
            s.affine = s.linear and all(steps[r].affine for r in s.jet_refs)
    for i in sorted(_reachable(steps, output)):
        if steps[i].kind == "jet" and steps[i].rule is None:
            raise Unsupported(steps[i].name)
    y = trace2[2]
    if not isinstance(y, Tensor) or y.dim() != 2 or not y.is_floating_point():
        raise Unsupported("trace", "the batch function must return a [B, n_out] floating-point tensor")
    program = TaylorProgram(steps, output, z_probe.shape[1], y.shape[1], y.dtype, y.element_size())
    _verify(program, g, z_probe, orders)
    return program


def _reachable(steps: list[_Step], output) -> set[int]:
    """Steps the output depends on (an unsupported op elsewhere does not matter)."""
    seen: set[int] = set()
    todo = [output.index] if isinstance(output, _Ref) else []
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend((*steps[i].jet_refs, *steps[i].value_refs))
    return seen


def _verify(program: TaylorProgram, g: Callable, z_probe: Tensor, orders: int) -> None:
    """Compare value, ``J v`` and (``orders`` 2) ``d²g[v, v]`` with the model and torch.func on a few points."""
    from torch.func import jvp

    z = _probe_batch(z_probe, max(PROBE_BATCHES) + 1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
    z = z + 1e-3 * v  # off the traced points, so that baked-in branches show
    tol = 1e-4 if z.dtype == torch.float32 else 1e-9

    def close(got: Tensor, want: Tensor) -> bool:
        # non-finite entries must sit in the same places (sqrt at 0, …); the rest must agree
        finite = torch.isfinite(want)
        if not torch.equal(torch.isfinite(got), finite):
            return False
        if not finite.any():
            return True
        scale = max(float(want[finite].abs().max()), 1.0)
        return bool((got[finite] - want[finite]).abs().max() <= tol * scale)

    def second(zz: Tensor) -> Tensor:
        pair = (torch.zeros(1, dtype=torch.long, device=zz.device),) * 2
        return program._out_block(program._run(zz, WANT["hessian"], v[None], k2=1, pairs=pair), 2, 1, zz)[0]

    try:
        got = (program.value(z), program.jvp(z, v[None])[0], second(z) if orders > 1 else None)
    except Unsupported:
        raise
    except Exception as exc:  # a rule that does not fit this use of its op
        raise Unsupported("verify", f"{type(exc).__name__}: {exc}") from None
    with torch.no_grad():
        if not close(got[0], g(z)):
            raise Unsupported("verify", "the traced program disagrees with the model")
        try:
            want_t = jvp(g, (z,), (v,))[1]
            want_tt = jvp(lambda zz: jvp(g, (zz,), (v,))[1], (z,), (v,))[1] if orders > 1 else None
        except Exception:  # torch.func has no forward rule for some op: nothing to compare with
            return
    if not (close(got[1], want_t) and (orders < 2 or close(got[2], want_tt))):
        raise Unsupported("verify", "the Taylor derivatives disagree with torch.func")
