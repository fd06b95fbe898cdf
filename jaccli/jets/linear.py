"""Rules for sums and products: add/sub (and cat, stack, where), the bilinear
products mul/div/matmul/bmm/einsum-style contractions, and addmm/linear layers.

Sums combine each row block separately (constants enter the value only). A product
with one input-dependent factor is linear (one matrix product for all rows); with two
it is their Cauchy product (the Leibniz rule, at every order).

Imports: :mod:`.jet`, :mod:`.elementwise` (reciprocal for division).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from jaccli.jets.jet import (
    Jet,
    Layout,
    Rule,
    Unsupported,
    _Call,
    _always,
    _b_div,
    _b_mm,
    _b_mul,
    _lift,
    _norm,
    _one_factor,
    _rank,
    _rows1,
    _shift,
    _take,
    _take_view,
    bmm_into,
    broadcast_shapes,
    small_bmm,
)
from jaccli.jets.elementwise import _UNARY_RULES, _r_pow as _pow_one_jet


# ---- sums of terms: each row block is combined separately (constants enter the value only)


def _blocks(cx: _Call, lay: Layout, args: Sequence, combine: Callable, like: Tensor) -> Jet:
    """Apply ``combine(parts, rows)`` block by block and stack the blocks into one jet.

    ``args`` mixes Jets and constants: a constant is itself in the value block and
    zero (the number 0) in the derivative blocks, as is a Jet's absent block.
    """
    results = []
    for order in range(len(lay)):
        if not lay[order]:
            continue
        rows = cx.counts[order]
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
    shape = broadcast_shapes(*(r.shape[1:] for r in tensors)) if tensors else like.shape[1:]
    t = cx.tensor((lay.rows(cx.counts), *shape), like, dtype)
    start = 0
    for rows, r in results:
        t[start : start + rows] = r
        start += rows
    return cx.jet(t, lay)


def _is_zero(p) -> bool:
    return not isinstance(p, Tensor) and p == 0


def _add_rule(sign: float, reverse: bool = False) -> Rule:
    """``a + sign·alpha·b`` (``reverse``: ``b + sign·alpha·a``, i.e. rsub)."""

    def rule(cx, lay, a, b, alpha=1):
        if reverse:
            a, b = b, a
        s = sign * alpha
        if isinstance(a, Jet) and isinstance(b, Jet) and a.lay == b.lay == lay:
            r = max(len(a.shape), len(b.shape))
            return cx.jet(torch.add(_lift(a.t, r), _lift(b.t, r), alpha=s), lay)
        return _sum_into(cx, lay, a, b, s)

    return Rule(rule, _always)


def _sum_into(cx: _Call, lay: Layout, a, b, s: float) -> Jet:
    """``a + s·b`` block by block, each block written into the result (the general
    :func:`_blocks` makes each block a new tensor and copies it in: 20 ATen calls for a
    flow's ``x - μ`` where ``x`` is affine and ``μ`` is not, now 6)."""
    ta, tb = (a.t if isinstance(a, Jet) else a), (b.t if isinstance(b, Jet) else b)
    shapes = [x.shape if isinstance(x, Jet) else x.shape if isinstance(x, Tensor) else () for x in (a, b)]
    like = ta if isinstance(a, Jet) else tb
    out = cx.empty(lay, broadcast_shapes(*shapes), like, torch.result_type(ta, tb))
    for k in range(len(lay)):
        if not lay[k]:
            continue
        dst = out.block(k)
        pa = a.block(k) if isinstance(a, Jet) else (_rows1(a) if k == 0 else None)
        pb = b.block(k) if isinstance(b, Jet) else (_rows1(b) if k == 0 else None)
        if pa is not None and pb is not None:
            if isinstance(pa, Tensor):
                r = max(_rank(pa), _rank(pb))
                torch.add(_lift(pa, r), _lift(pb, r), alpha=s, out=dst)
            else:  # a number plus a tensor
                torch.mul(pb, s, out=dst).add_(pa)
        elif pa is not None:
            dst.copy_(pa)
        elif pb is not None:
            torch.mul(pb, s, out=dst) if s != 1 else dst.copy_(pb)
        else:
            dst.zero_()
    return out


def _zero_parts(parts, rows: int, sources) -> list[Tensor]:
    """``parts`` with each number-0 placeholder replaced by a broadcast zero of its source's shape."""
    ref = next(p for p in parts if isinstance(p, Tensor))
    return [
        p if isinstance(p, Tensor) else ref.new_zeros(()).expand(rows, *src.shape)
        for p, src in zip(parts, sources)
    ]


def _cat_into(cx: _Call, lay: Layout, tensors, dim: int) -> Jet | None:
    """``cat`` written into the result: each operand's rows copied to its place along ``dim``
    (one copy for a jet with every block of the result, a copy or a zero fill per block
    otherwise); None where an operand is no tensor or shapes differ in rank (legacy empty
    operands), for :func:`_blocks`. The general path concatenated each block apart and copied
    it in: 17 ATen calls for a coupling layer's ``cat``, now 7."""
    shapes = [a.shape if isinstance(a, (Jet, Tensor)) else None for a in tensors]
    if any(sh is None or len(sh) != len(shapes[0]) or not len(sh) for sh in shapes):
        return None
    d = _norm(dim, len(shapes[0]))
    size = list(shapes[0])
    size[d] = sum(sh[d] for sh in shapes)
    dtype = tensors[0].t.dtype if isinstance(tensors[0], Jet) else tensors[0].dtype
    for a in tensors[1:]:
        dtype = torch.promote_types(dtype, a.t.dtype if isinstance(a, Jet) else a.dtype)
    like = next(a.t for a in tensors if isinstance(a, Jet))
    out = cx.empty(lay, size, like, dtype)
    rows = [_take_view(a, lay) if isinstance(a, Jet) else None for a in tensors]
    if all(r is not None for r in rows):  # every block of every operand at hand: one call
        torch.cat(rows, d + 1, out=out.t)
        return out
    offset = 0
    for a, sh, r in zip(tensors, shapes, rows):
        part = out.t.narrow(d + 1, offset, sh[d])
        offset += sh[d]
        if r is not None:
            part.copy_(r)
            continue
        start = 0
        for k in range(len(lay)):
            if not lay[k]:
                continue
            dst = part[start : start + cx.counts[k]]
            start += cx.counts[k]
            src = a.block(k) if isinstance(a, Jet) else (a[None] if k == 0 else None)
            dst.copy_(src) if src is not None else dst.zero_()
    return out


def _r_cat(cx, lay, tensors, dim=0):
    fast = _cat_into(cx, lay, tensors, dim)
    if fast is not None:
        return fast

    def combine(parts, rows):
        return torch.cat(_zero_parts(parts, rows, tensors), _shift(dim))

    return _blocks(cx, lay, tensors, combine, next(a.t for a in tensors if isinstance(a, Jet)))


def _r_stack(cx, lay, tensors, dim=0):
    r = len(next(a for a in tensors if isinstance(a, Jet)).shape)

    def combine(parts, rows):
        return torch.stack(_zero_parts(parts, rows, tensors), _norm(dim, r + 1) + 1)

    return _blocks(cx, lay, tensors, combine, next(a.t for a in tensors if isinstance(a, Jet)))


def _r_where(cx, lay, cond, a, b):
    side = _one_side(lay, cond, a, b)
    if side is not None:
        return side

    def combine(parts, rows):
        pa, pb = parts
        r = max(_rank(pa), _rank(pb), cond.dim())
        c = cond[(None,) * (r + 1 - cond.dim())]
        return torch.where(c, _lift(pa, r), _lift(pb, r))

    like = a.t if isinstance(a, Jet) else b.t
    return _blocks(cx, lay, [a, b], combine, like)


def _one_side(lay: Layout, cond, a, b) -> Jet | None:
    """The jet ``where(cond, a, b)`` is, where ``cond`` picks that side everywhere: a safe
    softmax's guard against rows that are all masked (``where(all_masked, 0, p)``) is a pass
    over every row of ``p`` (two attention layers: 0.7 ms a Hessian at 512 points) that keeps
    them as they are when no row is. Asked of a CPU mask only (a GPU's would wait for the
    device) and outside dispatch modes (fake tensors have no values)."""
    if not isinstance(cond, Tensor) or cond.device.type != "cpu" or torch._C._len_torch_dispatch_stack() != 0:
        return None
    for side, other, want in ((b, a, False), (a, b, True)):
        if not (isinstance(side, Jet) and side.lay == lay):
            continue
        ot = other.t if isinstance(other, Jet) else other
        same = (broadcast_shapes(cond.shape, side.shape, other.shape if isinstance(other, (Jet, Tensor)) else ()) == side.shape
                and torch.result_type(side.t, ot) == side.t.dtype)  # fmt: skip
        if same and bool(cond.all() if want else not cond.any()):
            return side
    return None


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
    """``β(a, b)`` and its Taylor rows for a bilinear ``β``: the Cauchy product of the factors,
    rows of order ≥ 1 of both combined by :meth:`~.jet._Call.cross`."""
    ja, jb = isinstance(a, Jet), isinstance(b, Jet)
    if ja and not jb and a.onehot is not None and beta is _b_mm and isinstance(b, Tensor) and b.dim() == 2:
        if lay.top == 1:  # the first layer, fed the seed directly
            return _onehot_mm(cx, lay, a, b)
    if not (ja and jb):
        # linear in the one input-dependent factor: every row in one call (one GEMM for mm)
        if ja:
            if beta is _b_mm and isinstance(b, Tensor) and b.dim() == 2 and a.t.dim() == 3:
                # x @ W for every row in one GEMM, into the workspace (a fresh tensor each chunk page-faults)
                x = _take(a, lay)
                out = cx.tensor((*x.shape[:-1], b.shape[-1]), x, torch.result_type(x, b))
                return cx.jet(torch.matmul(x, b, out=out), lay)
            return cx.jet(beta(_take(a, lay), _rows1(b)), lay)
        return cx.jet(beta(_rows1(a), _take(b, lay)), lay)
    if beta is _b_mul:
        return _leibniz_mul(cx, lay, a, b)
    if beta is _b_mm:
        return _leibniz_mm(cx, lay, a, b)
    parts: list[Tensor | None] = []
    for k in range(len(lay)):
        if not lay[k]:
            continue
        term = None
        for i in range(k + 1):
            ai, bj = a.block(i), b.block(k - i)
            if ai is None or bj is None:
                continue
            t = beta(ai, bj) if i in (0, k) else cx.cross(ai, bj, beta)
            term = t if term is None else term + t
        parts.append(term)
    known = [p for p in parts if p is not None]
    shape = broadcast_shapes(*(p.shape[1:] for p in known)) if known else beta(a.block(0), b.block(0)).shape[1:]
    like = known[0] if known else a.t
    rows = [cx.counts[k] for k in range(len(lay)) if lay[k]]
    parts = [like.new_zeros((r, *shape)) if p is None else p.expand(p.shape[0], *shape) for p, r in zip(parts, rows)]
    return cx.jet(torch.cat(parts) if len(parts) > 1 else parts[0], lay)


def _leibniz_into(cx: _Call, lay: Layout, a: Jet, b: Jet, out: Jet, direct: Callable, cross: Callable) -> Jet:
    """The Leibniz rule block by block into ``out``: each block's terms ``aᵢ ⊗ b_{k−i}`` written
    or added in place, by ``direct(aᵢ, bⱼ, dst, first)`` where a factor is a value row (and
    every term of a series, row by row), by ``cross`` for the products of rows of order ≥ 1
    (pairs or the collapsed row); ``first``: ``dst`` is uninitialised."""
    for k in range(len(lay)):
        if not lay[k]:
            continue
        dst, first = out.block(k), True
        for i in range(k + 1):
            ai, bj = a.block(i), b.block(k - i)
            if ai is None or bj is None:
                continue
            (direct if i in (0, k) or cx.series else cross)(ai, bj, dst, first)
            first = False
        if first:
            dst.zero_()
    return out


def _leibniz_mul(cx: _Call, lay: Layout, a: Jet, b: Jet) -> Jet:
    """``a * b`` of two jets, each block of the product written in place: its first term by
    ``mul(out=)``, the others by ``addcmul_`` (a cross term of pairs or of the collapsed row
    through :meth:`~.jet._Call.cross_into`). The general path built every term as a new tensor,
    summed them and concatenated the blocks: 27 ATen calls for a flow's ``x · exp(s)``."""
    r = max(len(a.shape), len(b.shape))
    out = cx.empty(lay, broadcast_shapes(a.shape, b.shape), a.t, torch.result_type(a.t, b.t))

    def direct(ai, bj, dst, first):
        torch.mul(_lift(ai, r), _lift(bj, r), out=dst) if first else dst.addcmul_(_lift(ai, r), _lift(bj, r))

    return _leibniz_into(cx, lay, a, b, out, direct, lambda ai, bj, dst, first: cx.cross_into(ai, bj, dst, first, r))


def _leibniz_mm(cx: _Call, lay: Layout, a: Jet, b: Jet) -> Jet:
    """``a @ b`` of two jets (``mm``, ``bmm``), each block written in place: its first term a
    product into it, the others added by the product itself where the factors are batches of
    matrices (``baddbmm_``). The general path made every term a tensor, summed them and
    concatenated the blocks: three more passes over the first-order rows of attention's scores."""
    shape = (*broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    dtype = torch.result_type(a.t, b.t)
    if small_bmm(a.t, b.t):  # the batch innermost (bmm_into), the shape as bmm's
        rows = lay.rows(cx.counts)
        out = cx.jet(cx.tensor((rows, shape[1], shape[2], shape[0]), a.t, dtype).permute(0, 3, 1, 2), lay)
    else:
        out = cx.empty(lay, shape, a.t, dtype)

    def cross(ai, bj, dst, first):
        term = cx.cross(ai, bj, _b_mm)
        dst.copy_(term) if first else dst.add_(term)

    return _leibniz_into(cx, lay, a, b, out, _mm_into, cross)


def _mm_into(x: Tensor, y: Tensor, dst: Tensor, first: bool) -> None:
    """``dst = x @ y`` (``first``) or ``dst += x @ y`` for stacked rows, a one-row factor
    broadcast to ``dst``'s rows."""
    if small_bmm(x, y):
        bmm_into(x, y, dst.permute(0, 2, 3, 1), first)
        return
    if x.dim() == 4 and dst.is_contiguous():  # bmm: one batched product over rows × batch
        rows = dst.shape[0]
        xs = x.expand(rows, *x.shape[1:]).reshape(-1, *x.shape[-2:])
        ys = y.expand(rows, *y.shape[1:]).reshape(-1, *y.shape[-2:])
        d = dst.view(-1, *dst.shape[-2:])
        torch.bmm(xs, ys, out=d) if first else d.baddbmm_(xs, ys)
        return
    if first and x.dim() == 3 and y.shape[0] == 1 and x.shape[0] == dst.shape[0] and dst.is_contiguous():
        torch.mm(x.reshape(-1, x.shape[-1]), y[0], out=dst.view(-1, dst.shape[-1]))  # the rows folded: one GEMM
        return
    p = _b_mm(x, y)
    dst.copy_(p) if first else dst.add_(p)


def _bilinear(beta: Callable) -> Rule:
    def rule(cx, lay, a, b):
        return _product(cx, lay, a, b, beta)

    return Rule(rule, _one_factor)


def _r_div(cx, lay, a, b, rounding_mode=None):
    if rounding_mode is not None:
        raise Unsupported("div", f"rounding_mode={rounding_mode!r} has no derivative rule")
    if not isinstance(b, Jet):
        return _product(cx, lay, a, b, _b_div)
    inner = Layout(*(k <= lay.top for k in range(len(lay))))  # every order up to the top
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
            prod.block(0).add_(bias, alpha=bias_scale)  # broadcast from the right: no row axis needed
        return prod

    def linear(pos):
        return not (1 in pos and 2 in pos)

    return Rule(rule, linear)


_ADD = _add_rule(1.0)


def _r_pow(cx, lay, x, p):
    """``x ** p``; with both input-dependent, ``exp(p log x)`` (its value as torch computes it)."""
    if not (isinstance(x, Jet) and isinstance(p, Jet)):
        return _pow_one_jet(cx, lay, x, p)
    full = Layout(*(k <= lay.top for k in range(len(lay))))
    log = _UNARY_RULES["log"](cx, full, x)
    out = _UNARY_RULES["exp"](cx, lay, _product(cx, full, p, log, _b_mul))
    if lay.value:
        torch.pow(x.block(0), p.block(0), out=out.block(0))
    return out
