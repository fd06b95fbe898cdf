"""The chain rule at any order: a unary op's jet from its input's jet and its derivatives.

:func:`_unary` makes a rule of a derivative-table entry (:mod:`.elementwise`):

- orders 1 and 2, in every mode of :class:`~.jet._Call`: ``y₁ = f′ x₁`` and ``y₂ = f′ x₂ +
  h f″ x₁⊗x₁`` (one product per block, written into the result); for ``f′ = g(f)``
  (:func:`_ode_low`) as ``y₂ = f′ (x₂ + h g′(y) x₁⊗x₁)``, ``f″`` never built;
- past order 2 (series): Faà di Bruno, ``y_k = Σ_j f⁽ʲ⁾/j! · [tᵏ](x - x₀)ʲ``, the powers
  by Cauchy products of the blocks (:func:`_faa_di_bruno`), or, for a function with
  ``f′ = g(f)`` and ``g`` a quadratic (tanh, sigmoid, exp, …), the ODE's recurrence
  ``y_k = (1/k) Σ j x_j h_{k-j}`` (:func:`_ode_chain`): ``O(K²)`` products, not ``O(K³)``.

Imports: :mod:`.jet`, :mod:`.workspace`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from jaccli.jets import workspace
from jaccli.jets.jet import Jet, Layout, _Call, _scalar


def _unary(derivs: Callable, ode: tuple[float, ...] | None = None) -> Callable:
    """A rule from ``derivs(x, order, out, *params) -> (y, [f1 … f_order])``; ``fk = None`` means zero.

    ``ode``: for a function with ``f′ = g(f)``, ``g`` a polynomial of degree ≤ 2 (its
    coefficients, low to high): past order 2 the series then follow the ODE's recurrence
    (:func:`_ode_chain`), ``O(K²)`` products instead of Faà di Bruno's ``O(K³)``.
    """

    def rule(cx, lay, x, *params, **options):
        v = x.block(0)
        out = cx.empty(lay, v.shape[1:], v)
        recurrence = ode is not None and lay.top > 2
        y, fs = derivs(v, 0 if ode is not None and not recurrence else 1 if recurrence else lay.top,
                       out.block(0), *params, **options)  # fmt: skip
        if lay.value and y.data_ptr() != out.block(0).data_ptr():
            out.block(0).copy_(y)
        if ode is not None and not recurrence:
            return _ode_low(cx, lay, x, y, ode, out)
        if recurrence:
            return _ode_chain(lay, x, y, fs[0], ode, out)
        return _chain(cx, lay, x, fs, out)

    return rule


def _horner(coeffs: tuple[float, ...], y: Tensor) -> Tensor | None:
    """The polynomial ``Σ cᵢ yⁱ`` (coefficients low to high; None where all are zero), one
    pass per degree: ``c_{d-1} + c_d y`` is one ``add``, each later ``c + r y`` one ``addcmul``
    (a tanh layer's ``f′, f″`` took 11 passes this way filled, multiplied and added one by one)."""
    if not any(coeffs):
        return None
    top = max(i for i, c in enumerate(coeffs) if c)
    if top == 1 and coeffs[0] == 0 and coeffs[1] == 1:
        return y  # read only by every caller
    r = workspace.empty_like(y)
    if top == 0:
        return r.fill_(coeffs[0])
    c = coeffs[top - 1]
    if top == 2 and c in (0.0, 1.0) and not (c and coeffs[0]):
        # c₀ + c₂ y² (tanh′, tan′) or y + c₂ y² (sigmoid′): one addcmul
        return torch.addcmul(y if c else _scalar(coeffs[0], y), y, y, value=coeffs[2], out=r)
    if c:
        torch.add(_scalar(c, y), y, alpha=coeffs[top], out=r)
    else:
        torch.mul(y, coeffs[top], out=r)
    for c in reversed(coeffs[: top - 1]):
        if c:
            torch.addcmul(_scalar(c, y), r, y, out=r)
        else:
            r.mul_(y)
    return r


def _ode_low(cx: _Call, lay: Layout, x: Jet, y: Tensor, g: tuple[float, ...], out: Jet) -> Jet:
    """Orders 1 and 2 of ``y = f(x)`` with ``f′ = g(y)``, in every mode: ``y₁ = f′ x₁`` and
    ``y₂ = f′ (x₂ + h g′(y) x₁⊗x₁)`` (``f″ = g′(y) f′``), written into ``out``. One pass per
    block past the square, ``f′`` and ``h g′`` polynomials of the value row: a tanh layer's
    Laplacian rows took 10 passes past the square (``f″`` built on its own), now 4."""
    f1 = _horner(g, y)
    if lay.first:
        torch.mul(x.block(1), f1, out=out.block(1))
    if lay.second:
        d2, x2 = out.block(2), x.block(2)
        dg = tuple(k * c * cx.half for k, c in enumerate(g))[1:]  # h g′, low to high
        w = dg[0] if not any(dg[1:]) else _horner(dg, y)
        if isinstance(w, Tensor):
            cx.square(x.block(1), d2).mul_(w) if x2 is None else torch.addcmul(x2, cx.square(x.block(1), d2), w, out=d2)
        elif w == 0:
            d2.copy_(x2) if x2 is not None else d2.zero_()
        elif x2 is None:
            cx.square(x.block(1), d2).mul_(w) if w != 1 else cx.square(x.block(1), d2)
        else:
            torch.add(x2, cx.square(x.block(1), d2), alpha=w, out=d2)
        d2.mul_(f1)
    return out


def _ode_chain(lay: Layout, x: Jet, y0: Tensor, f1: Tensor, g: tuple[float, ...], out: Jet) -> Jet:
    """Series of ``y = f(x)`` with ``y′ = h x′``, ``h = g(y)``: ``y_k = (1/k) Σ_{j=1}^{k} j x_j h_{k-j}``
    and ``h_m`` from ``y_0 … y_m`` (series mode: every block has the same rows).

    Each ``h_m`` is kept as ``(t, s)`` with ``h_m = s·t``, and every constant of a sum (its
    ``j/k``, the ``s`` of the ``h`` it reads) rides on the one pass that adds the term
    (``addcmul``'s ``value``), the first term's on one scaling at the end: one pass per
    term and per coefficient, no passes that only scale (a tanh layer of ``u_xxxx`` took
    24 passes over its rows, now 15).
    """
    top = lay.top
    xs = [x.block(k) for k in range(top + 1)]
    ys: list = [y0] + [None] * top
    hs: list = [(f1, 1.0)] + [None] * top
    for k in range(1, top + 1):
        if k > 1:
            hs[k - 1] = _poly_of_series(g, ys, k - 1)
        dst = out.block(k)
        terms = [(xs[j], hs[k - j][0], j * hs[k - j][1] / k) for j in range(1, k + 1)
                 if xs[j] is not None and hs[k - j] is not None]  # fmt: skip
        # a term of constant 1 first (x_k h_0 has one): then no scaling pass at the end
        terms.sort(key=lambda term: term[2] != 1)
        acc, first = None, 1.0
        for a, b, c in terms:
            if acc is None:  # the first term unscaled; the others relative to it
                acc = torch.mul(a, b, out=dst) if dst is not None else workspace.mul(a, b)
                first = c
            else:
                acc.addcmul_(a, b, value=c / first)
        if acc is None:
            if dst is not None:
                dst.zero_()
        elif first != 1:
            acc.mul_(first)
        ys[k] = acc
    return out


def _poly_of_series(g: tuple[float, ...], ys: list, m: int) -> tuple[Tensor, float] | None:
    """Coefficient ``m ≥ 1`` of ``g(y)`` for a polynomial ``g`` of degree ≤ 2 as ``(t, s)``,
    the coefficient being ``s·t`` (None: zero). ``t`` may be ``ys[m]`` itself (read only)."""
    g1 = g[1] if len(g) > 1 else 0.0
    g2 = g[2] if len(g) > 2 else 0.0
    lin = ys[m] if g1 else None
    if not g2:
        return None if lin is None else (lin, g1)
    # g₂ Σ_{i+j=m} y_i y_j = 2 g₂ (Σ_{i<m-i} y_i y_{m-i} + y_{m/2}²/2): each pair once
    t = None
    for i in range((m + 1) // 2):
        if ys[i] is not None and ys[m - i] is not None:
            t = workspace.mul(ys[i], ys[m - i]) if t is None else t.addcmul_(ys[i], ys[m - i])
    scale = 2 * g2
    middle = ys[m // 2] if m % 2 == 0 else None
    if middle is not None:
        if t is None:
            t, scale = workspace.mul(middle, middle), g2
        else:
            t.addcmul_(middle, middle, value=0.5)
    if t is None:
        return None if lin is None else (lin, g1)
    if lin is not None:
        t.add_(lin, alpha=g1 / scale)
    return t, scale


def _ode_unit(g: tuple[float, ...], y0: Tensor, f1: Tensor, top: int) -> list:
    """Coefficients ``y_1 … y_top`` of ``t ↦ f(a + t)`` for ``f′ = g(f)`` (the unit direction:
    ``x₁ = 1``, nothing past it), each as ``(t, s)`` with ``y_k = s·t`` (None: zero), from
    ``y₀ = f(a)`` and ``f1 = f′(a)``: ``y_k = h_{k-1} / k`` (the recurrence of
    :func:`_ode_chain` with one term), so only the ``h_m`` cost passes (tanh to order 4: five).
    The scales are the caller's to apply (the first-layer fold puts them into its weights)."""
    ys: list = [(y0, 1.0), (f1, 1.0)]
    for m in range(1, top):
        h = _poly_of_scaled(g, ys, m)
        ys.append(None if h is None else (h[0], h[1] / (m + 1)))
    return ys[1 : top + 1]


def _poly_of_scaled(g: tuple[float, ...], ys: list, m: int) -> tuple[Tensor, float] | None:
    """:func:`_poly_of_series` of scaled coefficients ``ys[i] = (t, s)`` (None: zero): each
    product's constant rides on its ``addcmul``, the first's on the returned scale."""
    g1 = g[1] if len(g) > 1 else 0.0
    g2 = g[2] if len(g) > 2 else 0.0
    lin = ys[m] if g1 else None
    # g₂ Σ_{i+j=m} y_i y_j: each pair i < m-i twice, the middle once
    pairs = [(ys[i], ys[m - i], 2.0) for i in range((m + 1) // 2)]
    if m % 2 == 0:
        pairs.append((ys[m // 2], ys[m // 2], 1.0))
    t, c0 = None, 1.0
    for p, q, w in pairs if g2 else ():
        if p is None or q is None:
            continue
        c = w * p[1] * q[1]
        if t is None:
            t, c0 = workspace.mul(p[0], q[0]), c
        else:
            t.addcmul_(p[0], q[0], value=c / c0)
    if t is None:
        return None if lin is None else (lin[0], g1 * lin[1])
    scale = g2 * c0
    if lin is not None:
        t.add_(lin[0], alpha=g1 * lin[1] / scale)
    return t, scale


def _chain(cx: _Call, lay: Layout, x: Jet, fs: list, out: Jet) -> Jet:
    """Orders ``≥ 1`` of ``out = f(x)`` from ``fs[k-1] = f⁽ᵏ⁾(x₀)``, written into ``out``.

    Orders 1 and 2 take one product per block in every mode (``y₁ = f′ x₁``, ``y₂ = f′ x₂
    + h f″ x₁⊗x₁``, ``h`` = :attr:`~.jet._Call.half`); past order 2 (series), Faà di Bruno:
    ``y_k = Σ_j f⁽ʲ⁾/j! · [tᵏ](x - x₀)ʲ``.
    """
    f1 = fs[0] if fs else None
    if lay.first:
        if f1 is None:
            out.block(1).zero_()
        else:
            torch.mul(x.block(1), f1, out=out.block(1))
    if lay.second:
        d2 = out.block(2)
        f2 = fs[1]
        if f2 is None:
            d2.zero_()
        else:
            cx.square(x.block(1), d2).mul_(f2 if cx.half == 1.0 else f2 * cx.half)
        if x.block(2) is not None and f1 is not None:
            d2.addcmul_(x.block(2), f1)
    if lay.top > 2:
        xs = [x.block(k) for k in range(lay.top + 1)]
        outs = [out.block(k) if k >= 3 else None for k in range(lay.top + 1)]
        _faa_di_bruno(fs, xs, lay.top, outs)
    return out


def _cauchy_tail(p: list, xs: list, k: int, lo: int):
    """``Σ_{i=lo}^{k-1} p_i x_{k-i}``, skipping zero (None) terms."""
    total = None
    for i in range(lo, k):
        if p[i] is not None and xs[k - i] is not None:
            total = workspace.mul(p[i], xs[k - i]) if total is None else total.addcmul_(p[i], xs[k - i])
    return total


def _faa_di_bruno(fs: list, xs: list, top: int, outs: list, lo: int = 3) -> list:
    """Normalised coefficients ``y_k``, ``lo ≤ k ≤ top``, of ``f(x)`` from ``fs[j-1] = f⁽ʲ⁾(x₀)``
    and ``x``'s coefficients ``xs`` (None: zero), into ``outs[k]`` where it is a tensor, else
    as new tensors (None where zero): powers of ``x - x₀`` by Cauchy products."""
    power = [None, *xs[1 : top + 1]]  # (x - x₀)¹
    done = [False] * (top + 1)
    for j in range(1, top + 1):
        if j > 1:
            power = [None] * j + [_cauchy_tail(power, xs, k, j - 1) for k in range(j, top + 1)]
        f = fs[j - 1] if j - 1 < len(fs) else None
        if f is None:
            continue
        c = f if j == 1 else f / math.factorial(j)
        for k in range(max(j, lo), top + 1):
            if power[k] is None:
                continue
            if done[k]:
                outs[k].addcmul_(power[k], c)
            elif outs[k] is None:
                outs[k] = workspace.mul(power[k], c)
            else:
                torch.mul(power[k], c, out=outs[k])
            done[k] = True
    for k in range(lo, top + 1):
        if not done[k] and outs[k] is not None:
            outs[k].zero_()
    return outs


def _compose(outer: list, inner: list, order: int) -> list:
    """Derivatives ``(h∘u)⁽ᵏ⁾``, ``k = 1 … order``, from ``h``'s at ``u`` and ``u``'s."""
    xs = [None] + [None if d is None else d / math.factorial(k) for k, d in enumerate(inner, 1)]
    xs += [None] * (order + 1 - len(xs))
    ys = _faa_di_bruno(outer, xs, order, [None] * (order + 1), lo=1)
    return [None if c is None else c * math.factorial(k) for k, c in enumerate(ys[1:], 1)]
