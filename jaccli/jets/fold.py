"""Folds: runs of steps that a pass computes together, because the rows between them are
cheaper to fold into a matrix than to materialise.

What it owns: the table :data:`FOLDS` of patterns, :func:`find` (which steps of a schedule
match one) and the code that runs each pattern. :mod:`.program` asks :func:`find` once per
schedule and, in a pass, calls a match's :attr:`Fold.run` where its first step is due; a
``run`` that returns None (a condition only the pass can see does not hold) leaves the steps
to their rules.

**The first layer** (``"first-layer"``): ``seed → x @ W₁ (+ b₁) → f → · @ W₂ (+ b₂)`` with
``W₁``, ``W₂`` constant and every first-order seed row one-hot (a Jacobian, Hessian or
Laplacian pass). The first product's rows are then constants, ``cᵣ = W₁[colᵣ]``, and the
chain rule makes ``f``'s rows ``f′ ⊙ cᵣ`` and ``h f″ ⊙ (c ⊗ c)ₚ`` (``c ⊗ c`` as
:meth:`~.jet._Call.square` pairs, collapses or squares them; ``h`` is :attr:`~.jet._Call.half`).
Through the second product they are

    ``f′ @ diag(cᵣ) W₂``  and  ``f″ @ diag(h (c ⊗ c)ₚ) W₂``,

one batched GEMM per order whose left factor is shared (``f′`` or ``f″`` ``[B, n₁]``,
broadcast, not copied) and whose right factors are the folded weights (``[rows, n₁, m]``,
made once and kept from pass to pass
while the weights keep their values, :class:`_Kept`). The FLOPs are those of the one GEMM
``[rows·B, n₁] @ [n₁, m]`` they replace; what goes is ``f``'s rows written out
elementwise (``f′ ⊙ cᵣ``, the pairs or the collapsed sum, ``f″ ⊙ …``) and the first
product's rows copied out: on the 2→50³→1 PINN about 0.88 of the Laplacian's and 0.95 of
the Hessian's time (``docs/performance.md``).

The result is an ordinary contiguous jet, so whatever reads the second product reads it
as before. Tried and dropped: one wide GEMM per order (``[B, n₁] @ [n₁, rows·m]``) into a
point-major buffer whose transpose is the jet; the strided rows made every elementwise
rule after it slower than the wide GEMM saved. Orders past 2 (series of ``partials``,
which have no one-hot seed) are the next pattern's.

**The first layer of a series** (``"first-series"``): the same three steps in a series pass
(``partials``) whose seed directions ``vᵣ`` are the same at every point (the seed's
:attr:`~.jet.Jet.rows1`). The first product's rows are ``cᵣ = vᵣ W₁`` and nothing past order 1,
so ``f``'s coefficients are ``f⁽ᵏ⁾(a)/k! · cᵣᵏ`` and through the second product

    ``(f⁽ᵏ⁾(a)/k!) @ diag(cᵣᵏ) W₂``,

one GEMM per order (batched over the directions) whose left factor is one ``[B, n₁]`` row
for every direction. For ``f′ = g(f)`` (tanh, sigmoid, …) the coefficients come from the ODE
with a unit direction (:func:`.chain._ode_unit`: tanh to order 4 in five passes, their
constants riding on the folded weights); else from the derivative table. What goes: the
first product's copied rows and its bias pass, and the recurrence's products with ``cᵣ``
(u_xxxx's first tanh layer: 12 passes over its rows → 5).

**The first activation's rows** (``"first-rows"``, tried where ``"first-layer"`` declines: one
row per order, or folded weights past :data:`MAX_FOLDED_BYTES`): ``seed → x @ W₁ (+ b₁) → f``
with one-hot seeds computes ``f``'s jet directly, its rows ``f′ ⊙ cᵣ`` and ``f″ ⊙ h (c ⊗ c)ₚ``
each one broadcasting multiply of ``[rows, 1, n₁]`` constants by ``[B, n₁]``. The rules would
first copy the constants out to ``[rows, B, n₁]`` (the one-hot product), read them back for
``f′ ⊙ ·`` and square and sum them again for ``f″``'s term: on the 100→256³→1 Laplacian three
passes over 100 rows of every point, gone. It runs where fused kernels are on too (:mod:`.fused`):
a fold computes its activation itself, so a failed compile gives the eager result to the bit,
and ``auto`` prices only the kernels the pass will meet.

Imports: :mod:`.jet`, :mod:`.record`, :mod:`.elementwise`, :mod:`.chain`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from jaccli.jets.chain import _ode_unit
from jaccli.jets.elementwise import _ODES, _UNARY_DERIVS
from jaccli.jets.jet import Jet, Layout, _Call
from jaccli.jets.record import _Ref, _Step

_PRODUCTS = ("mm", "addmm")

#: the most bytes of folded weights a pass may make: each row's ``[n₁, m]`` matrix is read
#: once per chunk, and past cache size the batched GEMM waits on memory (the 100→256³→1
#: Laplacian's 26 MB of them took 1.07× the unfolded pass; the 2→50³→1 Hessian's are 50 kB)
MAX_FOLDED_BYTES = 2 << 20
#: a pass folds only where some order has at least this many rows: with one row per order
#: (one input) the fold saves one elementwise pass per order and splits the second product's
#: one GEMM into a GEMM per order, which cost more (the seed PINN's 1→50³→501 Hessian took
#: 1.03-1.08× the unfolded time eager, 1.08-1.14× compiled; under load)
MIN_ROWS = 2


@dataclass
class Fold:
    """One match: ``steps`` (the first is where it runs) computed by ``run``, which returns
    the last step's jet or None (then the steps run one by one)."""

    steps: tuple[int, ...]
    run: Callable


def _product(s: _Step) -> tuple[object, object, object] | None:
    """``(bias, left, right)`` of an ``mm`` / ``addmm`` step with a constant 2-D right operand
    and a constant (or no) bias, unscaled; else None."""
    if s.kind != "jet" or s.name not in _PRODUCTS or s.kwargs:
        return None
    bias, left, right = (None, *s.args) if s.name == "mm" else s.args
    if not isinstance(left, _Ref) or not isinstance(right, Tensor) or right.dim() != 2 or isinstance(bias, _Ref):
        return None
    return bias, left, right


def _readers(steps: list[_Step], live: list[bool]) -> dict[int, list[int]]:
    readers: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        if live[i]:
            for r in (*s.jet_refs, *s.value_refs):
                readers.setdefault(r, []).append(i)
    return readers


def _activated(steps: list[_Step], live: list[bool], readers: dict[int, list[int]]) -> Iterator[tuple[int, int]]:
    """``(a, u)``: a live product ``a`` (:func:`_product`) read by one step ``u`` alone, a
    unary elementwise jet rule of ``a`` (:data:`.elementwise._UNARY_DERIVS`) whose other
    parameters are constants: the start both patterns share."""
    for a, s in enumerate(steps):
        if _product(s) is None or not live[a] or len(readers.get(a, ())) != 1:
            continue
        u = readers[a][0]
        su = steps[u]
        if su.kind != "jet" or su.name not in _UNARY_DERIVS or su.args[:1] != (_Ref(a),):
            continue
        if any(isinstance(p, _Ref) for p in (*su.args[1:], *su.kwargs.values())):
            continue
        yield a, u


def _first_product(seed_ref: _Ref, bias1, w1: Tensor, cx: _Call, env: list,
                   fits: Callable[[_Call], bool] | None = None) -> tuple[Jet, Tensor] | None:  # fmt: skip
    """``(seed, a1)``: the pass's seed jet (one-hot first-order rows, orders ≤ 2) and the first
    product's values ``a1 = z W₁ (+ b₁)``; None where the pass has no such seed or ``fits``
    (asked after the seed's checks, before the product is made) says no."""
    seed = env[seed_ref.index]  # one-hot rows only where it is the seed (through identity views)
    if not isinstance(seed, Jet) or seed.onehot is None or seed.lay.top != 1 or cx.order > 2:
        return None
    if fits is not None and not fits(cx):
        return None
    z = seed.block(0)[0]
    return seed, torch.mm(z, w1) if bias1 is None else torch.addmm(bias1, z, w1)


def _layers(steps: list[_Step], layouts: list[Layout], live: list[bool], readers: dict, output) -> Iterator[tuple[int, int, int]]:
    """``(a, u, m)``: :func:`_activated`'s ``a → u`` whose activation ``u`` (not the output) is
    read by one product ``m`` alone, as its left operand, ``m`` with rows to make."""
    out = output.index if isinstance(output, _Ref) else None
    for a, u in _activated(steps, live, readers):
        if u == out or len(readers.get(u, ())) != 1:
            continue
        m = readers[u][0]
        pm = _product(steps[m])
        if pm is not None and pm[1] == _Ref(u) and any(layouts[m]):
            yield a, u, m


def _first_layer(steps: list[_Step], layouts: list[Layout], live: list[bool], readers: dict, output) -> list[Fold]:
    return [Fold((a, u, m), _first_layer_run(steps[a], steps[u], steps[m], layouts[m]))
            for a, u, m in _layers(steps, layouts, live, readers, output) if layouts[m].top <= 2]  # fmt: skip


def _first_layer_run(sa: _Step, su: _Step, sm: _Step, lay: Layout) -> Callable:
    derivs = _UNARY_DERIVS[su.name]
    bias1, seed_ref, w1 = _product(sa)
    bias2, _, w2 = _product(sm)

    def fits(cx: _Call) -> bool:
        return max(cx.counts[1:]) >= MIN_ROWS and sum(cx.counts[1:]) * w2.numel() * w2.element_size() <= MAX_FOLDED_BYTES

    kept = _Kept()

    def run(cx: _Call, env: list, batch: int) -> Jet | None:
        first = _first_product(seed_ref, bias1, w1, cx, env, fits)
        if first is None:
            return None
        seed, a1 = first
        dtype = torch.result_type(a1, w2)
        top = lay.top
        y, fs = derivs(a1, top, None, *su.args[1:], **su.kwargs)
        fs = [*fs, None, None]
        weights = kept.get(cx, seed.onehot, a1.dtype, (w1, w2), lambda: _folded(cx, seed.onehot, w1, w2, a1.dtype))
        m = w2.shape[1]
        out = cx.empty(lay, (batch, m), a1, dtype)
        for order in range(top + 1):
            dest = out.block(order)
            if dest is None:
                continue
            if order == 0:
                if bias2 is None:
                    torch.mm(y, w2, out=dest[0])
                else:
                    torch.addmm(bias2, y, w2, out=dest[0])
            elif fs[order - 1] is None:
                dest.zero_()
            elif dest.shape[0] == 1:
                torch.mm(fs[order - 1], weights[order - 1][0], out=dest[0])
            else:  # one batched GEMM, the left factor shared (a stride-0 batch, not copied)
                f = fs[order - 1]
                torch.bmm(f.expand(dest.shape[0], *f.shape), weights[order - 1], out=dest)
        return out

    return run


def _first_rows(steps: list[_Step], layouts: list[Layout], live: list[bool], readers: dict, output) -> list[Fold]:
    """``x @ W₁ (+ b₁) → f`` with a constant ``W₁``, the product read by ``f`` alone (its rows are
    then never needed); whether ``x`` is the one-hot seed only a pass can tell."""
    folds = []
    for a, u in _activated(steps, live, readers):
        su, lay = steps[u], layouts[u]
        if not 1 <= lay.top <= 2:
            continue
        folds.append(Fold((a, u), _first_rows_run(steps[a], su, lay)))
    return folds


def _first_rows_run(sa: _Step, su: _Step, lay: Layout) -> Callable:
    derivs = _UNARY_DERIVS[su.name]
    bias1, seed_ref, w1 = _product(sa)

    kept = _Kept()

    def run(cx: _Call, env: list, batch: int) -> Jet | None:
        first = _first_product(seed_ref, bias1, w1, cx, env)
        if first is None:
            return None
        seed, a1 = first
        out = cx.empty(lay, a1.shape, a1)
        value = out.block(0)
        y, fs = derivs(a1, lay.top, None if value is None else value[0], *su.args[1:], **su.kwargs)
        if value is not None and y.data_ptr() != value.data_ptr():
            value[0].copy_(y)
        rows = kept.get(cx, seed.onehot, a1.dtype, (w1,), lambda: _constant_rows(cx, seed.onehot, w1, a1.dtype))
        fs = [*fs, None, None]
        for order in (1, 2):
            dest = out.block(order)
            if dest is None:
                continue
            if fs[order - 1] is None:
                dest.zero_()
            else:  # [rows, 1, n₁] ⊙ [B, n₁]: each row made where it is written, none copied first
                torch.mul(rows[order - 1], fs[order - 1], out=dest)
        return out

    return run


def _first_series(steps: list[_Step], layouts: list[Layout], live: list[bool], readers: dict, output) -> list[Fold]:
    """The first layer of a series pass: whether the seed's directions are constant only a pass can tell."""
    return [Fold((a, u, m), _first_series_run(steps[a], steps[u], steps[m], layouts[m]))
            for a, u, m in _layers(steps, layouts, live, readers, output)]  # fmt: skip


def _first_series_run(sa: _Step, su: _Step, sm: _Step, lay: Layout) -> Callable:
    derivs, ode = _UNARY_DERIVS[su.name], _ODES.get(su.name)
    params, options = su.args[1:], su.kwargs
    bias1, seed_ref, w1 = _product(sa)
    bias2, _, w2 = _product(sm)

    def run(cx: _Call, env: list, batch: int) -> Jet | None:
        seed = env[seed_ref.index]
        if not (cx.series and isinstance(seed, Jet) and seed.rows1 is not None and seed.onehot is None
                and seed.lay.value and seed.lay.top == 1 and seed.rows1.dim() == 2):  # fmt: skip
            return None
        top = lay.top
        k = seed.rows1.shape[0]
        if k * top * w2.numel() * w2.element_size() > MAX_FOLDED_BYTES:
            return None
        z = seed.block(0)[0]
        a1 = torch.mm(z, w1) if bias1 is None else torch.addmm(bias1, z, w1)
        w = w2 if w2.dtype == a1.dtype else w2.to(torch.result_type(a1, w2))
        if ode is not None:  # f′ only from the table; the rest by the ODE, scales left to the weights
            y, fs = derivs(a1, 1 if top else 0, None, *params, **options)
            coeffs = _ode_unit(ode, y, fs[0], top) if top else []
        else:
            y, fs = derivs(a1, top, None, *params, **options)
            coeffs = [None if f is None else (f, 1 / math.factorial(j)) for j, f in enumerate(fs, 1)]
        out = cx.empty(lay, (batch, w.shape[1]), a1, w.dtype)
        dests = [out.block(o) for o in range(top + 1)]
        if dests[0] is not None:
            torch.mm(y, w, out=dests[0][0]) if bias2 is None else torch.addmm(bias2, y, w, out=dests[0][0])
        orders, scales = [], []
        for o in range(1, top + 1):
            if dests[o] is None:
                continue
            if coeffs[o - 1] is None:
                dests[o].zero_()
            else:
                orders.append(o)
                scales.append(coeffs[o - 1][1])
        if not orders:
            return out
        # every order's diag(s cᵣᵏ) W₂ in three small ops: [orders, k, n₁, m]
        c = seed.rows1.to(w1.dtype) @ w1  # [k, n₁]: the first product's rows
        if c.dtype != w.dtype:
            c = c.to(w.dtype)
        exps, scale = _constants((tuple(orders), tuple(scales)), c)
        folded = torch.pow(c, exps).mul_(scale)[..., None] * w
        if k == 1:
            folded = folded[:, 0]
        for i, o in enumerate(orders):
            t, dest = coeffs[o - 1][0], dests[o]
            if k == 1:
                torch.mm(t, folded[i], out=dest[0])
            else:  # the left factor shared (a stride-0 batch, not copied)
                torch.bmm(t.expand(k, *t.shape), folded[i], out=dest)
        return out

    return run


_CONSTANTS: dict = {}


def _constants(values: tuple[tuple[float, ...], ...], like: Tensor) -> list[Tensor]:
    """Each tuple of numbers as a ``[len, 1, 1]`` tensor like ``like`` (made once per value:
    ``torch.tensor`` from a list costs more than the product it serves)."""
    if torch._C._len_torch_dispatch_stack() != 0:  # under a trace or fake tensors: made, not kept
        return [torch.tensor(v, dtype=like.dtype, device=like.device)[:, None, None] for v in values]
    key = (values, like.dtype, like.device)
    got = _CONSTANTS.get(key)
    if got is None:
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        got = _CONSTANTS[key] = [torch.tensor(v, dtype=like.dtype, device=like.device)[:, None, None] for v in values]
    return got


def _constant_rows(cx: _Call, cols: Tensor, w1: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """The first product's rows ``cᵣ = W₁[colᵣ]`` and ``h (c ⊗ c)ₚ`` (``[rows, 1, n₁]`` each; the
    second only for a pass of order 2), made where a pass runs the fold (once a pass)."""
    c = w1.index_select(0, cols.to(w1.device)).to(dtype)[:, None, :]  # [k1, 1, n1]
    rows = [c]
    if cx.order >= 2:
        sq = c.new_empty((cx.counts[2], 1, c.shape[2]))
        rows.append(cx.square(c, sq).mul_(cx.half))
    return rows


def _folded(cx: _Call, cols: Tensor, w1: Tensor, w2: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """``[diag(cᵣ) W₂]ᵣ`` and ``[diag(h (c ⊗ c)ₚ) W₂]ₚ`` (``[rows, n₁, m]`` each), made where a
    pass runs the fold and kept for the next pass by :class:`_Kept`."""
    return [r[:, 0, :, None] * w2.to(dtype)[None] for r in _constant_rows(cx, cols, w1, dtype)]


#: the most bytes a fold keeps from one pass to the next (what it made and the copies of the
#: weights, :class:`_Kept`): past it, making them is small beside the pass that reads them
KEEP_BYTES = 256 << 10


class _Kept:
    """What a fold made from the weights for its last pass (folded weights, constant rows),
    with what it was made from: the pass's counts and mode, its one-hot columns and pairs,
    the dtype, and a copy of each weight's values. A pass that matches every one takes them
    (a chunk after the first, a model called again: the ~10 small ops that make them, a
    tenth of a small model's pass, are gone); any other makes them anew.

    The weights are compared by value (``torch.equal`` with the copy), not by version or
    address: a weight changed through ``.data`` or a NumPy view keeps both, and the recheck
    (values, from the live weights) cannot see stale folded weights. Each entry replaces
    the last one whole, so two threads running one program read one consistent entry.
    Nothing is kept or taken while a dispatch mode is on (fake tensors would be kept), nor off
    the CPU (``torch.equal`` there is a device sync per weight and pass)."""

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry: tuple | None = None

    def get(self, cx: _Call, cols: Tensor, dtype: torch.dtype, weights: tuple[Tensor, ...],
            make: Callable[[], list[Tensor]]) -> list[Tensor]:  # fmt: skip
        # on a GPU, comparing the weights would wait for the device every pass: made anew there
        quiet = torch._C._len_torch_dispatch_stack() == 0 and cols.device.type == "cpu"
        key = (cx.counts, cx.collapsed, dtype)
        entry = self.entry
        if quiet and entry is not None and _matches(entry, key, cols, cx.pairs, weights):
            return entry[-1]
        made = make()
        if quiet and sum(t.numel() * t.element_size() for t in (*made, *weights)) <= KEEP_BYTES:
            self.entry = (key, cols, cx.pairs, tuple(w.clone() for w in weights), made)
        return made


def _matches(entry: tuple, key: tuple, cols: Tensor, pairs, weights: tuple[Tensor, ...]) -> bool:
    k, c, p, copies, _ = entry
    if k != key or not _same(c, cols) or (p is None) != (pairs is None):
        return False
    if pairs is not None and not (_same(p[0], pairs[0]) and _same(p[1], pairs[1])):
        return False
    return all(_same(copy, w) for copy, w in zip(copies, weights))


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))


#: pattern name -> finder ``(steps, layouts, live, readers, output) -> [Fold]``; where two start at one
#: step, a pass tries them in this order (``first-rows`` where ``first-layer`` declines; a series
#: pass, with no one-hot seed, declines both and takes ``first-series``)
FOLDS: dict[str, Callable] = {"first-layer": _first_layer, "first-rows": _first_rows, "first-series": _first_series}


def find(steps: list[_Step], layouts: list[Layout], live: list[bool], output) -> dict[int, list[Fold]]:
    """The folds of one schedule, by the step they start at (in :data:`FOLDS`' order)."""
    found: dict[int, list[Fold]] = {}
    readers = _readers(steps, live)  # step -> the live steps that read it
    for finder in FOLDS.values():
        for f in finder(steps, layouts, live, readers, output):
            found.setdefault(f.steps[0], []).append(f)
    return found
