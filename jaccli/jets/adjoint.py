"""Per-sample Hessians by adjoints: each step's second-order rows contracted where they are made.

A pass that carries the ``n(n+1)/2`` second-order rows of a Hessian pushes every one of them
through every later step, a matrix product per linear layer. But those rows are linear in
what each nonlinear step *adds* to them. Call that addition the step's source ``T`` (its
second-order rows when its inputs carry none: ``f″(x) x₁⊗x₁`` for a unary op,
``a₁⊗b₁ + b₁⊗a₁`` for a product). Then the Hessian of output ``o`` is
``Σ_steps ⟨ḡ_o, T⟩``, where ``ḡ_o`` is the step's adjoint ``∂out_o/∂step``. So a pass needs:

- the first-order rows (``n`` of them, as a Jacobian's pass);
- the adjoints by one reverse sweep, vmapped over the outputs (autograd on the program's values);
- at each nonlinear step, ``T`` contracted with its adjoint and dropped.

For a unary op and a product, the contraction is one batched matrix product per step:
``J_xᵀ diag(ḡ f″) J_x`` and ``J_aᵀ diag(ḡ) J_b`` plus its transpose. Any other op makes its
pair rows with its own rule (in the Hessian's *pairs* mode) and contracts them.
Piecewise-linear ops (max pooling, maxima) add nothing.

Against forward over reverse (torch.func's ``vmap(hessian)``, ``n`` tangents through forward and
backward per output) this needs no tangent of the backward pass. Against the forward Hessian,
no second-order row ever reaches a linear layer. The planner offers it as the Taylor engine's
*reverse* mode (:data:`jaccli.engine.costs.COSTS`); ``docs/performance.md`` has the figures.

Which point an element belongs to comes from the step's recorded shape: the one entry that
is a multiple of the batch (:class:`~.record._BatchDim`), points outermost in it (as views
of a batch-first tensor are). :func:`applies` refuses a program with a nonlinear step whose
shape has no such single entry. The planner also checks a program's first use against the
forward Hessian on the probe rows.

Imports: :mod:`.jet`, :mod:`.record`, :mod:`.seeds`, :mod:`.elementwise`, :mod:`.program`, :mod:`.workspace`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from jaccli.jets.elementwise import _UNARY_DERIVS
from jaccli.jets.jet import FEW, Jet, Layout, Unsupported, _Call, broadcast_shapes, sum_few
from jaccli.jets.program import WANT, TaylorProgram
from jaccli.jets.record import _INPUT, _BatchDim, _Ref, _substitute
from jaccli.jets.seeds import _broadcast, _onehot_rows, _seed, _zero_jet
from jaccli.jets.workspace import empty, empty_like, mul

#: ops whose second derivative is zero wherever it exists: no source to contract
PIECEWISE_LINEAR = frozenset({
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices", "amax", "amin", "max", "min",
    "maximum", "minimum", "relu", "hardtanh", "clamp", "clamp_min", "clamp_max", "leaky_relu", "abs",
})  # fmt: skip


def sources(program: TaylorProgram) -> list[int]:
    """The steps whose second-order rows are a source: nonlinear in an input-dependent argument
    and live in a Jacobian's pass (a step still affine in the input adds nothing)."""
    sched = program.schedule(WANT["jacobian"])
    return [i for i, s in enumerate(program.steps)
            if s.kind == "jet" and not s.linear and not s.affine and sched.live[i] and s.name not in PIECEWISE_LINEAR]  # fmt: skip


def _batch_axis(shape) -> int | None:
    """The axis of a recorded shape that is a multiple of the batch, if exactly one is."""
    if not isinstance(shape, tuple):
        return None
    axes = [k for k, d in enumerate(shape) if isinstance(d, _BatchDim)]
    return axes[0] if len(axes) == 1 else None


def applies(program: TaylorProgram) -> bool:
    """Whether :func:`hessian` can take ``program``: its output is a step, and each source's
    shape tells its points apart (one batch-sized axis)."""
    if not isinstance(program.output, _Ref):
        return False
    return all(_batch_axis(program.steps[i].shape) is not None for i in sources(program))


#: the most input columns whose Hessian entries :func:`agrees` compares (all pairs among them)
CHECK_COLUMNS = 16


def agrees(program: TaylorProgram, z: Tensor) -> bool:
    """Whether :func:`hessian` applies to ``program`` and agrees with the forward Hessian at the
    points ``z`` (to the program's tolerance); asked once per program, the answer kept on it.

    Where the inputs are many, on two points and the entries among :data:`CHECK_COLUMNS`
    columns spread over the inputs, both sides from those columns' rows alone: the whole
    forward Hessian of a 1,024-input transformer is half a million pair rows, and the whole
    adjoint Hessian of a 3,072-input CNN ten outputs of 3,072² entries a point."""
    if program.adjoint is None:
        ok = applies(program)
        if ok:
            n, cols = program.n_in, None
            if n > CHECK_COLUMNS:
                z = z[:2]
                cols = torch.linspace(0, n - 1, CHECK_COLUMNS, device=z.device).round().long().unique()
            with torch.no_grad():
                got, want = hessian(program, z, columns=cols).double(), program.hessian(z, columns=cols).double()
            scale = want.abs().max().clamp_min(1e-30)
            ok = bool(torch.isfinite(got).all()) and float((got - want).abs().max() / scale) <= program.tol
        program.adjoint = ok
    return program.adjoint


def bytes_per_point(program: TaylorProgram) -> int:
    """Peak bytes one point needs in :func:`hessian` (an estimate): the Jacobian's pass, the
    values autograd keeps, each output's adjoints of the sources, and the largest step's
    contraction (its factors weighted per output, or its pair rows)."""
    n, m, size = program.n_in, program.n_out, program.itemsize
    src = sources(program)
    tape = sum(s.numel for s in program.steps)
    adj = m * sum(program.steps[i].numel for i in src)
    pairs = n * (n + 1) // 2
    widest = max(((pairs if program.steps[i].name not in CONTRACTIONS else (m + 2) * n)
                  * program.steps[i].numel for i in src), default=0)  # fmt: skip
    return program.bytes_per_point("jacobian", n) + int((tape + adj + widest + m * n * n) * size)


def contraction_flops(program: TaylorProgram) -> float:
    """Multiply-adds one point's contractions take in :func:`hessian`: each source's entries
    times ``n²`` per output (its pair rows and their contraction where it has no entry in
    :data:`CONTRACTIONS`). The cost record (:data:`jaccli.engine.costs.COSTS`, fitted on
    inputs in the tens) leaves this term out; past a few hundred inputs it is most of the
    time: a 3,072-input CNN's activations make it ~10¹³ a point, where forward over reverse
    takes thousands of times less."""
    n, m = program.n_in, program.n_out
    pairs = n * (n + 1) // 2
    return float(sum((m * n * n if program.steps[i].name in CONTRACTIONS else pairs * (m + 1))
                     * program.steps[i].numel for i in sources(program)))  # fmt: skip


# The contractions' temporaries come from the computation's workspace (``empty``, ``empty_like``, ``mul``):
# they are megabytes a step, and fresh ones page-fault every pass (multi-head attention's
# Hessian: 40 ms a call against 30 with glibc's thresholds raised).


def _dense(view: Tensor) -> Tensor:
    """``view`` copied into a contiguous workspace buffer of its shape."""
    return empty_like(view).copy_(view)


def _points_first(t: Tensor, axis: int, b: int, times: Tensor | None = None) -> Tensor:
    """``[R, *shape]`` (``R`` rows before the shape's ``axis``, a multiple of the batch ``b``,
    points outermost) as a contiguous ``[B, R, K]``: each point's rows of its elements, in one copy;
    ``times`` (broadcast to ``t``) multiplied in by that pass, where a product made first took a
    pass of its own."""

    def view(u: Tensor) -> Tensor:  # [B, R, D/B, rest…]
        u = u.movedim(axis + 1, 1)
        return u.unflatten(1, (b, u.shape[1] // b)).transpose(0, 1)

    v = view(t)
    dense = _dense(v) if times is None else torch.mul(v, view(times.expand(t.shape)), out=empty(v.shape, t))
    return dense.view(b, t.shape[0], -1)


def _first(x, shape: torch.Size, axis: int, n: int, b: int) -> Tensor | None:
    """A factor's first-order rows broadcast to ``shape`` (a step's, batch included) as ``[B, n, K]``."""
    if not isinstance(x, Jet) or x.block(1) is None:
        return None
    x1 = x.block(1)
    lead = len(shape) - (x1.dim() - 1)
    x1 = x1.reshape(n, *(1,) * lead, *x1.shape[1:]).expand(n, *shape)
    # points outermost in memory: a batched product over strides that follow the batch size
    # rounds differently as the size changes, and results must not move with the chunk size
    return _points_first(x1, axis, b)


def _adjoints(program: TaylorProgram, z: Tensor, keys: list[int]) -> dict[tuple[int, int | None], Tensor]:
    """``(step, result index) -> [n_out, *shape]``: each output's adjoint of each of ``keys``' results
    (None where no output depends on it), by reverse sweeps over the values: one vmapped over
    the outputs where its ops batch, else one per output."""
    b, m = z.shape[0], program.n_out
    env: list = [None] * len(program.steps)
    with torch.enable_grad():
        for i, s in enumerate(program.steps):
            if s.kind == _INPUT:
                env[i] = z.detach().clone().requires_grad_(True)  # a view of an inference tensor cannot
                continue
            args, kwargs = program.arguments(i, env, b, values=True)
            env[i] = s.op(*args, **kwargs)
        out = env[program.output.index].reshape(b, m)
        where, nodes = [], []
        for i in keys:
            v = env[i]
            for e, t in enumerate(v) if isinstance(v, (list, tuple)) else [(None, v)]:
                if isinstance(t, Tensor) and t.requires_grad:
                    where.append((i, e))
                    nodes.append(t)
        if not nodes or not out.requires_grad:
            return {}
        if m > 1:
            grads = _batched_sweep(out, nodes)
            if grads is not None:
                return {k: g for k, g in zip(where, grads) if g is not None}
        got: dict = {}
        for o in range(m):
            grads = torch.autograd.grad(out[:, o].sum(), nodes, retain_graph=o < m - 1, allow_unused=True)
            for key, g in zip(where, grads):
                got.setdefault(key, [None] * m)[o] = g
    return {k: torch.stack([g if g is not None else torch.zeros_like(next(x for x in gs if x is not None)) for g in gs])
            for k, gs in got.items() if any(g is not None for g in gs)}  # fmt: skip


def _batched_sweep(out: Tensor, nodes: list[Tensor]) -> tuple | None:
    """Every output's sweep as one: the backward pass vmapped over the ``m`` unit cotangents,
    ``[m, *shape]`` per node (None where a backward op cannot be batched; the caller sweeps
    output by output). One sweep's ops serve all outputs: 5-14 % off the whole Hessian of the
    architecture tests' transformers and CNNs and of 4- and 8-output MLPs, the same bits."""
    m = out.shape[1]
    cot = torch.eye(m, dtype=out.dtype, device=out.device)[:, None, :].expand(m, *out.shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # vmap's note on ops it runs one by one
            return torch.autograd.grad(out, nodes, cot, retain_graph=True, is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        return None


class _Sums:
    """Where the contractions add up, per point and output: ``whole``, terms symmetric in
    themselves (``xᵀ D x``); ``half``, made on first use, terms ``S`` whose Hessian term is
    ``S + Sᵀ`` (``aᵀ D c``, the batched products, the pair rows' upper triangle), so that each
    is added once, in place, and transposed once for all at the end (:meth:`into`)."""

    def __init__(self, whole: Tensor) -> None:
        self.whole, self._half = whole, None

    def half(self) -> Tensor:
        if self._half is None:
            self._half = empty_like(self.whole).zero_()
        return self._half

    def into(self, out: Tensor) -> Tensor:
        if self._half is not None:
            self.whole += self._half
            self.whole += self._half.transpose(-1, -2)
        if out is not self.whole:
            out.copy_(self.whole)
        return out


def _bilinear_into(out: Tensor, fa: Tensor, fb: Tensor, weight: Tensor, axis: int, b: int,
                   times: Tensor | None = None) -> None:  # fmt: skip
    """``out[p, o] += Σ_k weight[o, k] fa[p, :, k] ⊗ fb[p, :, k]`` over each point's entries ``k``.
    ``fa``, ``fb`` ``[B, n, K]`` (:func:`_first`), ``weight`` the step's ``[m, *shape]``; one
    batched product for every output, accumulated in place (``baddbmm``: no product tensor,
    no separate sum); ``times``, where given, a factor of the weight (:func:`_points_first`)."""
    weight = _points_first(weight, axis, b, times)  # [B, m, K]
    left = mul(fa[:, None], weight[:, :, None]).view(b, -1, fa.shape[-1])  # [B, m·n, K]
    out.view(b, -1, out.shape[-1]).baddbmm_(left, fb.transpose(1, 2))


def _has_rows(x) -> bool:
    return isinstance(x, Jet) and x.block(1) is not None


def _cross(out: Tensor, x: Jet, y: Jet, weight: Tensor, shape, axis: int, b: int, n: int, swap: bool) -> None:
    """``out[p, o] += Σ_k weight[o, k] x₁[p, :, k] ⊗ y₁[p, :, k]`` over the elements ``k`` of
    ``shape`` (``x``, ``y`` broadcast to it), first summed over the axes a factor is constant
    along: ``weight`` alone where both are; ``weight ⊙ x₁`` where only ``y`` is (a norm's
    ``(x − μ)·σ⁻¹``, a softmax's division by its sum), so that the batched product runs over
    ``y``'s elements, not the product's (the GroupNorm block's 64 elements a point against its
    groups'). ``swap``: where only ``x`` is constant, the roles swap (``out`` a half sum, whose
    transpose counts too)."""
    rank = len(shape)
    xs = (1,) * (rank - len(x.shape)) + tuple(x.shape)
    ys = (1,) * (rank - len(y.shape)) + tuple(y.shape)
    both = tuple(d for d in range(rank) if shape[d] > 1 and xs[d] == 1 and ys[d] == 1 and d != axis)
    if both:
        weight = sum_few(weight, tuple(d + 1 for d in both), keepdim=True)
        shape = tuple(1 if d in both else size for d, size in enumerate(shape))
    only_y = tuple(d for d in range(rank) if shape[d] > 1 and ys[d] == 1 and xs[d] > 1)
    only_x = tuple(d for d in range(rank) if shape[d] > 1 and xs[d] == 1 and ys[d] > 1)
    if swap and only_x and not only_y:
        x, y, only_y = y, x, only_x
    if x is y or not only_y or axis in only_y:
        fx = _first(x, shape, axis, n, b)
        _bilinear_into(out, fx, fx if x is y else _first(y, shape, axis, n, b), weight, axis, b)
        return
    m, x1 = weight.shape[0], x.block(1)
    x1 = x1.reshape(n, *(1,) * (rank - (x1.dim() - 1)), *x1.shape[1:])
    wx = _summed_product(weight[:, None], x1[None], tuple(d + 2 for d in only_y))  # [m, n, *kept]
    kept = tuple(size for d, size in enumerate(shape) if d not in only_y)  # y's own elements
    at = axis - sum(d < axis for d in only_y)
    left = _points_first(wx.view(m * n, *kept), at, b)  # [B, m·n, K_y]
    fy = _first(y, tuple(1 if d in only_y else size for d, size in enumerate(shape)), axis, n, b)  # [B, n, K_y]
    out.view(b, -1, out.shape[-1]).baddbmm_(left, fy.transpose(1, 2))


def _summed_product(a: Tensor, b: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``(a * b).sum(dims)``. Where ``dims`` hold at most :data:`~.jet.FEW` elements, the
    product is written with them outermost, so that the sum adds whole contiguous slices: ATen
    sums a small innermost axis entry by entry (:func:`~.jet.sum_few`; a softmax row of 3 under
    multi-head attention's weights, ``[12, 12, 512, 2, 3, 3]``: 1.35 ms against 0.63; a norm's 4
    features 0.70 against 0.41; 5 elements 1.67 against 1.04; past 8 ATen's sum is the faster,
    5x at 32)."""
    front = tuple(range(len(dims)))
    af, bf = a.movedim(dims, front), b.movedim(dims, front)
    shape = broadcast_shapes(af.shape, bf.shape)  # the summed axes first
    if math.prod(shape[: len(dims)]) > FEW or a.dtype != b.dtype:
        return mul(a, b).sum(dim=dims)
    prod = torch.mul(af, bf, out=empty(shape, a))
    # slice by slice, not ATen's sum over the outer axis: that rounds the last entries of a
    # block apart from the rest, which would move the bits with the chunk of points
    return sum_few(prod.flatten(0, len(dims) - 1), (0,))


def _unary(cx, lay, s, args, kwargs, w, axis, sums, n, b):
    """``f(x)``: ``Σ_k f″(x_k) ḡ_k x₁ₖ x₁ₖᵀ`` per point."""
    x = args[0]
    _, fs = _UNARY_DERIVS[s.name](x.block(0), 2, None, *args[1:], **kwargs)
    f2 = fs[1] if len(fs) > 1 else None
    if f2 is not None:
        a = _first(x, x.shape, axis, n, b)
        _bilinear_into(sums.whole, a, a, w, axis, b, times=f2)
    return s.rule.fn(cx, lay, *args, **kwargs)


def _product(cx, lay, s, args, kwargs, w, axis, sums, n, b):
    """``a · c`` of two jets: ``Σ_k ḡ_k (a₁ₖ c₁ₖᵀ + c₁ₖ a₁ₖᵀ)`` per point."""
    res = s.rule.fn(cx, lay, *args, **kwargs)
    if _has_rows(args[0]) and _has_rows(args[1]):
        _cross(sums.half(), args[0], args[1], w, res.shape, axis, b, n, swap=True)
    return res


def _quotient(cx, lay, s, args, kwargs, w, axis, sums, n, b):
    """``a / d`` with ``d`` a jet: ``Σ_k ḡ_k (2a d₁ₖ d₁ₖᵀ / d³ - (a₁ₖ d₁ₖᵀ + d₁ₖ a₁ₖᵀ) / d²)`` per point
    (``a`` a jet or a constant)."""
    res = s.rule.fn(cx, lay, *args, **kwargs)
    a, d = args
    av, dv = (a.block(0) if isinstance(a, Jet) else a), d.block(0)
    if not _has_rows(d):
        return res
    inv = dv.reciprocal()
    inv2 = inv * inv
    # the factors multiplied first: a step's elements, not the m outputs' times as many
    _cross(sums.whole, d, d, w * (2 * av * inv2 * inv), res.shape, axis, b, n, swap=False)
    if _has_rows(a):
        _cross(sums.half(), a, d, w * -inv2, res.shape, axis, b, n, swap=True)
    return res


def _batched_product(cx, lay, s, args, kwargs, w, axis, sums, n, b):
    """``A @ C`` of two jets ``[B·H, r, t] @ [B·H, t, c]``: ``Σ ḡ ⊙ (A₁ᵢ C₁ⱼ + A₁ⱼ C₁ᵢ)`` per point
    as ``⟨A₁ᵢ, ḡ C₁ⱼᵀ⟩``: the ``ḡ C₁ⱼᵀ`` of every output and row first, then one product per
    point into the half sums."""
    res = s.rule.fn(cx, lay, *args, **kwargs)
    a1, c1 = args[0].block(1), args[1].block(1)
    if a1 is None or c1 is None:
        return res
    m = w.shape[0]
    bh, r, t = a1.shape[1:]
    c, h = c1.shape[-1], bh // b
    g = torch.bmm(_dense(w.permute(1, 0, 2, 3)).view(bh, m * r, c), _dense(c1.permute(1, 3, 0, 2)).view(bh, c, n * t),
                  out=empty((bh, m * r, n * t), a1))  # [B·H, m·r, n·t]  # fmt: skip
    g = _dense(g.view(b, h, m, r, n, t).permute(0, 1, 3, 5, 2, 4)).view(b, h * r * t, m * n)
    a = _dense(a1.unflatten(1, (b, h)).transpose(0, 1)).view(b, n, h * r * t)  # one copy: a reshape of a strided a1 made two
    # the term's transpose, [B, m·j, i], accumulated by the product itself: a half sum counts
    # S + Sᵀ either way, and its rows are the half sum's own (the term as it comes, [B, i, m·j],
    # took a product into a buffer and a transposing add, ~0.5 ms a step at 512 points)
    sums.half().view(b, m * n, n).baddbmm_(g.transpose(1, 2), a.transpose(1, 2))
    return res


def _pairs(cx, lay, s, args, kwargs, w, axis, sums, n, b):
    """Any other op: its rule makes the pair rows ``(i ≤ j)``, contracted with the adjoint here."""
    res = s.rule.fn(cx, Layout(lay.value, lay.first, True), *args, **kwargs)
    many = isinstance(res, (list, tuple))
    kept = []
    for e, jet in enumerate(res) if many else [(None, res)]:
        if not isinstance(jet, Jet):
            kept.append(jet)
            continue
        t2, we = jet.block(2), w.get(e) if isinstance(w, dict) else w
        if t2 is not None and we is not None:
            i, j = cx.pairs
            # each pair (i ≤ j) to the upper triangle, half on the diagonal: the transpose of
            # the half sums fills the lower one (no mask to index by, which would wait for a GPU)
            rows = _points_first(t2, axis, b)  # [B, P, K]
            weight = _points_first(we.to(t2.dtype), axis, b)  # [B, m, K]
            h = torch.bmm(weight, rows.transpose(1, 2), out=empty((b, weight.shape[1], rows.shape[1]), rows))  # [B, m, P]
            h.mul_(torch.where(i == j, 0.5, 1.0).to(h.dtype))
            half = sums.half()
            half[:, :, i, j] += h
        kept.append(Jet(jet.t[: jet.span(1)[1] if lay.first else jet.span(0)[1]], lay, cx.counts))
    return type(res)(kept) if many else kept[0]


def _fits_unary(args, kwargs, axis) -> bool:
    return isinstance(args[0], Jet) and not any(isinstance(v, Jet) for v in (*args[1:], *kwargs.values()))


def _fits_product(args, kwargs, axis) -> bool:
    return len(args) == 2 and not kwargs and all(isinstance(a, Jet) for a in args)


def _fits_quotient(args, kwargs, axis) -> bool:
    return len(args) == 2 and not kwargs and isinstance(args[1], Jet)


def _fits_batched(args, kwargs, axis) -> bool:
    return _fits_product(args, kwargs, axis) and axis == 0 and all(a.block(1) is not None and a.block(1).dim() == 4 for a in args)


#: op name -> how its source is contracted, and when that way fits its arguments (any other
#: op, or arguments that do not fit: :func:`_pairs`)
CONTRACTIONS = {
    **dict.fromkeys(_UNARY_DERIVS, (_unary, _fits_unary)),
    "mul": (_product, _fits_product),
    "div": (_quotient, _fits_quotient),
    "bmm": (_batched_product, _fits_batched),
}


def _contraction(s, args, kwargs, axis):
    how, fits = CONTRACTIONS.get(s.name, (_pairs, None))
    return how if fits is None or fits(args, kwargs, axis) else _pairs


def hessian(program: TaylorProgram, z: Tensor, *, directions: int | None = None, out: Tensor | None = None,
            columns: Tensor | None = None) -> Tensor:  # fmt: skip
    """Per-point Hessian ``[B, n_out, n_in, n_in]`` of ``program`` at ``z`` ``[B, n_in]`` (see the
    module docstring); ``directions`` is accepted for the engine's call and not used (every
    first-order row is needed at once). ``columns`` (``k`` input indices): only the entries
    among them, ``[B, n_out, k, k]``, from their ``k`` first-order rows.

    >>> import torch; from jaccli.jets import build
    >>> f = lambda x: torch.tanh(x @ torch.ones(2, 1))
    >>> p = build(f, torch.zeros(3, 2), orders=2)
    >>> hessian(p, torch.zeros(2, 2)).abs().max().item()
    0.0
    """
    if not applies(program):
        raise Unsupported("adjoint", "a nonlinear step's points cannot be told apart by its shape")
    b, n_in, m = z.shape[0], program.n_in, program.n_out

    def setup():  # every chunk's columns, pairs and one-hot rows: kept on the program
        cols = torch.arange(n_in, device=z.device) if columns is None else columns
        k = cols.numel()
        return [(cols, torch.triu_indices(k, k, device=z.device), _onehot_rows(cols, n_in, z))]

    if columns is None:
        ((cols, pairs, rows),) = program._seeds(("adjoint", z.dtype, z.device), setup)
    else:
        ((cols, pairs, rows),) = setup()
    n = cols.numel()  # first-order rows
    out = z.new_empty((b, m, n, n), dtype=program.dtype) if out is None else out
    sums = _Sums((out if out.dtype == z.dtype and out.is_contiguous() else empty(out.shape, z)).zero_())
    steps = program.steps
    src = sources(program)
    adj = _adjoints(program, z, src)
    sched = program.schedule(WANT["jacobian"])
    cx = _Call((1, n, pairs.shape[1]), (pairs[0], pairs[1]), b)
    env: list = [None] * len(steps)
    at = set(src)
    with torch.no_grad():
        for i, s in enumerate(steps):
            if not sched.live[i]:
                if sched.zero[i]:
                    env[i] = _zero_jet(cx, _substitute(s.shape, env, b), z)
                continue
            if s.kind == _INPUT:
                env[i] = _seed(cx, sched.layouts[i], z, _broadcast(rows, b), cols)
                continue
            values = s.kind == "value"
            args, kwargs = program.arguments(i, env, b, values)
            if values:
                env[i] = s.op(*args, **kwargs)
            elif i not in at:
                env[i] = s.rule.fn(cx, sched.layouts[i], *args, **kwargs)
            else:
                axis = _batch_axis(s.shape)
                how = _contraction(s, args, kwargs, axis)
                w = ({e: g for (k, e), g in adj.items() if k == i} if how is _pairs else adj.get((i, None)))
                if w is None or (how is _pairs and not w):
                    env[i] = s.rule.fn(cx, sched.layouts[i], *args, **kwargs)
                else:
                    env[i] = how(cx, sched.layouts[i], s, args, kwargs, w, axis, sums, n, b)
            for r in sched.frees[i]:
                env[r] = None
    return sums.into(out)
