"""Univariate Taylor series of any order through a recorded model, and mixed partials from them.

A *series* is ``x(t) = Σ_k x_k t^k`` for the points of a batch: a list of ``K + 1``
coefficient tensors, each shaped like the value (``None`` for a zero coefficient).
The model is recorded once as ATen steps (:mod:`jaccli.jets.record`), the input is
seeded with ``z + t v`` and every step maps series to series by one rule per op, the
design of ``jax.experimental.jet``: linear ops act on each coefficient, products are
Cauchy products, and the smooth elementwise ops follow the recurrences of their
differential equations (``tanh' = 1 - tanh²``, ``exp' = exp``, …), so order ``K`` costs
``O(K²)`` elementwise operations per op instead of the ``2^K`` of nested forward mode.

Mixed partials come from series along integer directions: with ``|α| = d`` over the
inputs ``S`` of a term, the order-``d`` coefficients along all integer directions ``i``
with ``|i| = d`` on ``S`` determine every ``∂^α`` of that order exactly (Griewank, Utke
and Walther, Math. Comp. 69, 2000); the interpolation weights are computed once in
exact rational arithmetic. Ops without a rule (or a program that does not verify) use
nested ``torch.func.jvp`` instead.

Imports: torch, :mod:`jaccli.jets` (the recorder), :mod:`jaccli.errors`.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from fractions import Fraction
from itertools import combinations_with_replacement

import torch
from torch import Tensor

from jaccli.jets import Unsupported
from jaccli.jets.builder import _probe_batch, _reachable
from jaccli.jets.record import PROBE_BATCHES, _INPUT, _compile, _Ref, _substitute, _trace

Coeffs = list  # list[Tensor | None], K + 1 entries


class Series:
    """Taylor coefficients ``[x_0, …, x_K]`` of one op's result (``None`` = 0)."""

    __slots__ = ("c",)

    def __init__(self, c: list) -> None:
        self.c = c

    @property
    def value(self) -> Tensor:
        return self.c[0]


# --------------------------------------------------------------------------- coefficient arithmetic


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _fma(total, a: Tensor, b: Tensor, w: float = 1.0):
    """``total + w a b``, accumulated in place where the shapes allow (a series costs
    ``O(K²)`` of these: fewer temporaries is most of its speed on CPU)."""
    if total is None:
        return a * b if w == 1.0 else (a * b).mul_(w)
    if total.shape == a.shape == b.shape and total.dtype == a.dtype == b.dtype:
        return total.addcmul_(a, b, value=w)
    return total + (a * b if w == 1.0 else w * (a * b))


def _cauchy(a: Coeffs, b: Coeffs, k: int, prod: Callable = operator.mul, lo: int = 0, hi: int | None = None):
    """``Σ_{j=lo}^{hi} prod(a_j, b_{k-j})`` (``hi`` defaults to ``k``), skipping zeros."""
    total = None
    if a is b and prod is operator.mul and lo == 0 and hi is None:  # a square: each pair once
        for j in range((k + 1) // 2):
            if a[j] is not None and a[k - j] is not None:
                total = _fma(total, a[j], a[k - j], 2.0)
        if k % 2 == 0 and a[k // 2] is not None:
            total = _fma(total, a[k // 2], a[k // 2])
        return total
    for j in range(lo, (k if hi is None else hi) + 1):
        if a[j] is not None and b[k - j] is not None:
            total = _fma(total, a[j], b[k - j]) if prod is operator.mul else _add(total, prod(a[j], b[k - j]))
    return total


def _weighted(x: Coeffs, h: Coeffs, k: int):
    """``(1/k) Σ_{j=1}^{k} j x_j h_{k-j}``: the k-th coefficient of ``y`` with ``y' = h x'``."""
    total = None
    for j in range(1, k + 1):
        if x[j] is not None and h[k - j] is not None:
            total = _fma(total, x[j], h[k - j], j / k)
    return total


def _mul(a: Coeffs, b: Coeffs) -> Coeffs:
    return [_cauchy(a, b, k) for k in range(len(a))]


def _scale(a: Coeffs, s) -> Coeffs:
    return [None if c is None else c * s for c in a]


def _plus(a: Coeffs, b: Coeffs) -> Coeffs:
    return [_add(x, y) for x, y in zip(a, b)]


def _from_derivative(x: Coeffs, y0: Tensor, h_of: Callable[[Coeffs, int], Tensor | None]) -> Coeffs:
    """Series of ``y`` with ``y(0) = y0`` and ``y' = h x'``, where ``h_of(y, m)`` gives ``h_m``
    from ``y_0 … y_m`` (so the recurrence runs one order at a time)."""
    y: Coeffs = [y0] + [None] * (len(x) - 1)
    h: Coeffs = [None] * len(x)
    for k in range(1, len(x)):
        h[k - 1] = h_of(y, k - 1)
        y[k] = _weighted(x, h, k)
    return y


def _exp(x: Coeffs) -> Coeffs:
    return _from_derivative(x, torch.exp(x[0]), lambda y, m: y[m])


def _tanh(x: Coeffs) -> Coeffs:
    def h(y, m):  # 1 - y²
        sq = _cauchy(y, y, m)
        return (1 - sq) if m == 0 else (None if sq is None else -sq)

    return _from_derivative(x, torch.tanh(x[0]), h)


def _sigmoid(x: Coeffs) -> Coeffs:
    def h(y, m):  # y - y²
        sq = _cauchy(y, y, m)
        return y[m] - sq if sq is not None and y[m] is not None else (y[m] if sq is None else -sq)

    return _from_derivative(x, torch.sigmoid(x[0]), h)


def _sin_cos(x: Coeffs, hyperbolic: bool = False) -> tuple[Coeffs, Coeffs]:
    s0, c0 = (torch.sinh(x[0]), torch.cosh(x[0])) if hyperbolic else (torch.sin(x[0]), torch.cos(x[0]))
    s: Coeffs = [s0] + [None] * (len(x) - 1)
    c: Coeffs = [c0] + [None] * (len(x) - 1)
    sign = 1.0 if hyperbolic else -1.0
    for k in range(1, len(x)):
        s[k] = _weighted(x, c, k)
        ck = _weighted(x, s, k)
        c[k] = None if ck is None else sign * ck
    return s, c


def _div(a: Coeffs, b: Coeffs) -> Coeffs:
    """``a / b`` with ``y_k = (a_k - Σ_{j=1}^{k} b_j y_{k-j}) / b_0``."""
    y: Coeffs = [a[0] / b[0]] + [None] * (len(a) - 1)
    for k in range(1, len(a)):
        rest = _cauchy(b, y, k, lo=1)
        num = a[k] if rest is None else (-rest if a[k] is None else a[k] - rest)
        y[k] = None if num is None else num / b[0]
    return y


def _log(x: Coeffs) -> Coeffs:
    y: Coeffs = [torch.log(x[0])] + [None] * (len(x) - 1)
    for k in range(1, len(x)):
        acc = None
        for j in range(1, k):
            if y[j] is not None and x[k - j] is not None:
                acc = _add(acc, (j / k) * (y[j] * x[k - j]))
        num = x[k] if acc is None else (-acc if x[k] is None else x[k] - acc)
        y[k] = None if num is None else num / x[0]
    return y


def _pow(x: Coeffs, p: float) -> Coeffs:
    """``x ** p`` for a constant ``p``: ``y_k = Σ_{j=1}^{k} (p j - (k - j)) x_j y_{k-j} / (k x_0)``."""
    y: Coeffs = [torch.pow(x[0], p)] + [None] * (len(x) - 1)
    for k in range(1, len(x)):
        acc = None
        for j in range(1, k + 1):
            w = p * j - (k - j)
            if w and x[j] is not None and y[k - j] is not None:
                acc = _add(acc, w * (x[j] * y[k - j]))
        y[k] = None if acc is None else acc / (k * x[0])
    return y


def _erf(x: Coeffs) -> Coeffs:
    e = _exp(_scale(_mul(x, x), -1.0))  # erf' = 2/√π e^{-x²}
    return _from_derivative(x, torch.erf(x[0]), lambda y, m: None if e[m] is None else (2 / math.sqrt(math.pi)) * e[m])


def _softplus(x: Coeffs, beta: float = 1.0, threshold: float = 20.0) -> Coeffs:
    s = _sigmoid(_scale(x, beta))  # softplus' = sigmoid(βx)
    return _from_derivative(x, torch.nn.functional.softplus(x[0], beta, threshold), lambda y, m: s[m])


def _gelu(x: Coeffs, approximate: str = "none") -> Coeffs:
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        inner = _scale(_plus(x, _scale(_mul(_mul(x, x), x), 0.044715)), k)
        half = _scale(_plus(_tanh(inner), [torch.ones_like(x[0])] + [None] * (len(x) - 1)), 0.5)
    else:
        half = _scale(_plus(_erf(_scale(x, 1 / math.sqrt(2))), [torch.ones_like(x[0])] + [None] * (len(x) - 1)), 0.5)
    out = _mul(x, half)
    out[0] = torch.nn.functional.gelu(x[0], approximate=approximate)
    return out


def _masked(x: Coeffs, value: Tensor, slope: Tensor) -> Coeffs:
    """Piecewise-linear ops: the value, then ``slope · x_k`` (exact away from the kinks)."""
    return [value] + [None if c is None else slope * c for c in x[1:]]


# --------------------------------------------------------------------------- rules


def _coeff(obj, k: int):
    """Argument ``obj`` for coefficient ``k`` of an op linear in its series: a series'
    ``x_k`` (zeros for ``None``), anything else as it is, lists element-wise."""
    if isinstance(obj, Series):
        c = obj.c[k]
        return torch.zeros_like(obj.c[0]) if c is None else c
    if isinstance(obj, (list, tuple)):
        return type(obj)(_coeff(o, k) for o in obj)
    return obj


def _values(obj):
    if isinstance(obj, Series):
        return obj.c[0]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_values(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _values(v) for k, v in obj.items()}
    return obj


def _has_series(obj, k: int) -> bool:
    if isinstance(obj, Series):
        return obj.c[k] is not None
    if isinstance(obj, (list, tuple)):
        return any(_has_series(o, k) for o in obj)
    return False


def _regroup(per_k: list):
    """Per-coefficient results of a multi-output op → one series per output."""
    first = next((p for p in per_k if p is not None), None)
    if isinstance(first, (list, tuple)):
        return [Series([None if p is None else p[i] for p in per_k]) for i in range(len(first))]
    return Series(per_k)


def _wanted(need, k: int) -> bool:
    """Whether coefficient ``k`` of a result is read downstream (``need`` None: all are)."""
    return need is None or k in need


def _linear(op, K, args, kwargs, need=None):
    """An op linear in its series arguments (views, reductions, casts, sums): coefficient-wise."""
    per_k = [op(*_values(args), **_values(kwargs)) if _wanted(need, 0) else None]
    for k in range(1, K + 1):
        if not _wanted(need, k) or not (_has_series(args, k) or _has_series(kwargs, k)):
            per_k.append(None)
            continue
        per_k.append(op(*_coeff(args, k), **_coeff(kwargs, k)))
    return _regroup(per_k)


def _summand(x, k: int):
    """Coefficient ``k`` of a summand: a series' ``x_k``, zero for a constant."""
    if isinstance(x, Series):
        return torch.zeros_like(x.c[0]) if x.c[k] is None else x.c[k]
    return torch.zeros_like(x) if isinstance(x, Tensor) else 0


def _sum_rule(op, K, args, kwargs, need=None):
    """add, sub, rsub (summands at positions 0 and 1) and cat, stack (a list of summands):
    constants enter the value only."""
    per_k = [op(*_values(args), **_values(kwargs)) if _wanted(need, 0) else None]
    for k in range(1, K + 1):
        if not _wanted(need, k) or not _has_series(args, k):
            per_k.append(None)
        elif isinstance(args[0], (list, tuple)):
            per_k.append(op([_summand(x, k) for x in args[0]], *args[1:], **kwargs))
        else:
            per_k.append(op(_summand(args[0], k), _summand(args[1], k), *args[2:], **kwargs))
    return Series(per_k)


def _as_coeffs(x, K) -> Coeffs:
    return x.c if isinstance(x, Series) else [x] + [None] * K


def _bilinear(op, K, args, kwargs, need=None, bias: Callable | None = None):
    """Products ``op(a, b)`` (mul, mm, bmm, mv, matmul) — and ``c + α bias(a, b)`` for the
    addmm family, ``bias`` being its product — by the Cauchy product of the factors' series."""
    if bias is not None:
        c, a, b = args[0], args[1], args[2]
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        prod = bias
    else:
        a, b = args[0], args[1]
        prod = functools.partial(op, **kwargs) if kwargs else op
    ca, cb = _as_coeffs(a, K), _as_coeffs(b, K)
    out = [op(*_values(args), **_values(kwargs)) if _wanted(need, 0) else None]
    for k in range(1, K + 1):
        if not _wanted(need, k):
            out.append(None)
            continue
        term = _cauchy(ca, cb, k, prod)
        if bias is not None:
            term = None if term is None else (term * alpha if alpha != 1 else term)
            if isinstance(c, Series) and c.c[k] is not None:
                term = _add(term, c.c[k] * beta if beta != 1 else c.c[k])
        out.append(term)
    return Series(out)


def _div_rule(op, K, args, kwargs, need=None):
    a, b = args[0], args[1]
    if not isinstance(b, Series):  # a series over a constant: linear
        return _linear(op, K, args, kwargs, need)
    if kwargs.get("rounding_mode") is not None:
        raise Unsupported("div", "rounding division")
    out = _div(_as_coeffs(a, K), b.c)
    out[0] = op(*_values(args), **_values(kwargs))
    return Series(out)


def _pow_rule(op, K, args, kwargs, need=None):
    base, p = args[0], args[1]
    if isinstance(base, Series) and not isinstance(p, Series):
        exponent = float(p) if not isinstance(p, Tensor) else (float(p) if p.numel() == 1 else None)
        if exponent is None:
            raise Unsupported("pow", "a tensor of exponents")
        out = _pow(base.c, exponent)
    else:  # base ** x = exp(x log base)
        log_base = _log(_as_coeffs(base, K)) if isinstance(base, Series) else [torch.log(torch.as_tensor(base))] + [None] * K
        out = _exp(_mul(log_base, _as_coeffs(p, K)))
    out[0] = op(*_values(args), **_values(kwargs))
    return Series(out)


def _unary(series_fn: Callable) -> Callable:
    def rule(op, K, args, kwargs, need=None):
        x = args[0]
        out = series_fn(x.c, *args[1:], **kwargs)
        out[0] = op(*_values(args), **_values(kwargs))  # the value exactly as the model computes it
        return Series(out)

    return rule


def _piecewise(slope: Callable[[Tensor, tuple, dict], Tensor]) -> Callable:
    def rule(op, K, args, kwargs, need=None):
        x = args[0]
        return Series(_masked(x.c, op(*_values(args), **_values(kwargs)), slope(x.c[0], args[1:], kwargs)))

    return rule


def _where(op, K, args, kwargs, need=None):
    """``where(cond, a, b)``: the condition is a value; constants enter the value only."""
    cond = _values(args[0])
    out = [op(*_values(args), **_values(kwargs)) if _wanted(need, 0) else None]
    for k in range(1, K + 1):
        wanted = _wanted(need, k) and _has_series(args[1:3], k)
        out.append(op(cond, _summand(args[1], k), _summand(args[2], k)) if wanted else None)
    return Series(out)


def _silu(x: Coeffs) -> Coeffs:
    return _mul(x, _sigmoid(x))


def _clamp_slope(v: Tensor, rest: tuple, kwargs: dict) -> Tensor:
    lo = rest[0] if len(rest) > 0 else kwargs.get("min")
    hi = rest[1] if len(rest) > 1 else kwargs.get("max")
    inside = torch.ones_like(v, dtype=torch.bool)
    if lo is not None:
        inside = inside & (v > lo)
    if hi is not None:
        inside = inside & (v < hi)
    return inside.to(v.dtype)


_LINEAR_OPS = (
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand",
    "slice", "select", "diagonal", "alias", "clone", "_to_copy", "contiguous", "neg", "sum", "mean",
    "index_select", "index", "flip", "roll", "repeat", "split", "split_with_sizes", "unbind", "getitem",
    "narrow", "unflatten", "flatten", "movedim",
)  # fmt: skip

#: ATen op name (overload packet) -> rule(op, K, args, kwargs, need) -> Series, ``need``
#: the coefficients read downstream (None: all); only rules of ops linear in their
#: series are given a set, and may leave the others out (None)
RULES: dict[str, Callable] = {
    **{name: _linear for name in _LINEAR_OPS},
    "add": _sum_rule, "sub": _sum_rule, "rsub": _sum_rule, "cat": _sum_rule, "stack": _sum_rule,
    "mul": _bilinear, "mm": _bilinear, "bmm": _bilinear, "mv": _bilinear, "matmul": _bilinear,
    "addmm": functools.partial(_bilinear, bias=torch.mm), "baddbmm": functools.partial(_bilinear, bias=torch.bmm),
    "addmv": functools.partial(_bilinear, bias=torch.mv),
    "div": _div_rule, "pow": _pow_rule, "where": _where,
    "tanh": _unary(_tanh), "sigmoid": _unary(_sigmoid), "exp": _unary(_exp), "log": _unary(_log),
    "sin": _unary(lambda x: _sin_cos(x)[0]), "cos": _unary(lambda x: _sin_cos(x)[1]),
    "sinh": _unary(lambda x: _sin_cos(x, True)[0]), "cosh": _unary(lambda x: _sin_cos(x, True)[1]),
    "sqrt": _unary(lambda x: _pow(x, 0.5)), "rsqrt": _unary(lambda x: _pow(x, -0.5)),
    "reciprocal": _unary(lambda x: _pow(x, -1.0)), "erf": _unary(_erf),
    "expm1": _unary(_exp), "log1p": _unary(lambda x: _log([1 + x[0], *x[1:]])),
    "softplus": _unary(_softplus), "silu": _unary(_silu), "gelu": _unary(_gelu),
    "relu": _piecewise(lambda v, r, kw: (v > 0).to(v.dtype)),
    "leaky_relu": _piecewise(lambda v, r, kw: torch.where(v > 0, 1.0, r[0] if r else 0.01).to(v.dtype)),
    "abs": _piecewise(lambda v, r, kw: torch.sign(v)),
    "clamp": _piecewise(_clamp_slope), "hardtanh": _piecewise(
        lambda v, r, kw: _clamp_slope(v, (r[0] if r else -1.0, r[1] if len(r) > 1 else 1.0), {})),
}  # fmt: skip


# --------------------------------------------------------------------------- programs


class SeriesProgram:
    """A recorded flat batch function ``g: [B, n_in] -> [B, n_out]`` run on series.

    Only the coefficients that reach the output are computed: an op linear in one series
    needs of it just the coefficients asked of its result, so a network's last layers
    run on the orders the terms read (the 4th coefficient alone for ``u_xxxx``), which
    for a wide output layer is most of the work.
    """

    def __init__(self, steps, output) -> None:
        self.steps, self.output = steps, output
        self._needs: dict[tuple[frozenset[int], int], list] = {}
        live = _reachable(steps, output)
        self.live = [i in live for i in range(len(steps))]
        last: dict[int, int] = {}
        for i, s in enumerate(steps):
            if self.live[i]:
                for r in (*s.jet_refs, *s.value_refs):
                    last[r] = i
        self.frees: list[list[int]] = [[] for _ in steps]
        out_index = output.index if isinstance(output, _Ref) else -1
        for r, i in last.items():
            if r != out_index:
                self.frees[i].append(r)

    def needs(self, keep: frozenset[int], order: int) -> list[frozenset[int] | None]:
        """Per step, the coefficients read downstream when the output's ``keep`` are asked
        for (None: all, for steps whose rule computes every coefficient anyway)."""
        if not isinstance(self.output, _Ref):
            return [None] * len(self.steps)
        need: list[set[int]] = [set() for _ in self.steps]
        need[self.output.index] = set(keep)
        every = set(range(order + 1))
        for i in reversed(range(len(self.steps))):
            s, n = self.steps[i], need[i]
            if not self.live[i] or s.kind == _INPUT:
                continue
            for r in s.value_refs:
                need[r].add(0)
            if s.kind != "jet":
                for r in s.jet_refs:
                    need[r].add(0)
            elif s.linear and len(s.jet_refs) == 1:
                need[s.jet_refs[0]] |= n
            elif s.linear:  # several series: their values give the shape of a zero summand
                for r in s.jet_refs:
                    need[r] |= n | {0}
            else:  # coefficient k of a nonlinear op reads coefficients 0 … k
                for r in s.jet_refs:
                    need[r] |= set(range(max(n) + 1)) if n else every
        return [frozenset(n) if s.kind == "jet" and s.linear else None for s, n in zip(self.steps, need)]

    def run(self, z: Tensor, v: Tensor, order: int, keep: frozenset[int] | None = None) -> Coeffs:
        """Coefficients ``[g(z), …]`` of ``t ↦ g(z + t v)`` to ``order`` (rows of ``v`` per
        point); with ``keep``, only those are sure to be computed (the others may be None)."""
        env = self._steps(z, v, order, keep, [None] * len(self.steps), 0, len(self.steps))
        out = _substitute(self.output, env, z.shape[0])
        return out.c if isinstance(out, Series) else [out] + [None] * order

    def run_into(self, z: Tensor, v: Tensor, order: int, out: Tensor, factor: float) -> None:
        """``factor`` times coefficient ``order`` of ``t ↦ g(z + t v)`` written into ``out``
        ``[B, n_out]``. Where the output is a product with a constant matrix (a last linear
        layer, perhaps reshaped), the factor scales its narrow input and the product lands
        in ``out`` itself: no pass over the wide result but the one that writes it."""
        last = self._last_product()
        stop = len(self.steps) if last is None else last
        keep = frozenset({order})
        env = self._steps(z, v, order, keep, [None] * len(self.steps), 0, stop)
        if last is not None:
            s = self.steps[last]
            args = _substitute(s.args, env, z.shape[0])
            a, b = (args[1], args[2]) if s.name == "addmm" else (args[0], args[1])
            alpha = s.kwargs.get("alpha", 1)
            if isinstance(a, Series) and isinstance(b, Tensor) and a.c[order] is not None:
                c = a.c[order]
                if out.is_contiguous() and c.shape[0] * b.shape[-1] == out.numel():
                    with torch.no_grad():
                        torch.mm(c * (factor * alpha), b, out=out.view(c.shape[0], b.shape[-1]))
                    return
            env = self._steps(z, v, order, keep, env, last, len(self.steps))  # the rest, as usual
        res = _substitute(self.output, env, z.shape[0])
        c = res.c[order] if isinstance(res, Series) else None
        with torch.no_grad():
            if c is None:
                out.zero_()
            else:
                torch.mul(c.reshape(out.shape), factor, out=out)

    def _last_product(self) -> int | None:
        """The step of ``x @ W`` (``mm``, or ``addmm`` whose bias only the value gets) the
        output is, through reshapes: its coefficients ≥ 1 are ``x_k @ W``."""
        i = self.output.index if isinstance(self.output, _Ref) else None
        while i is not None and self.steps[i].name in _RESHAPES and self.steps[i].kind == "jet":
            ref = self.steps[i].args[0]
            i = ref.index if isinstance(ref, _Ref) else None
        if i is None or self.steps[i].kind != "jet" or self.steps[i].name not in ("mm", "addmm"):
            return None
        s = self.steps[i]
        operands = s.args[1:3] if s.name == "addmm" else s.args[:2]
        if not isinstance(operands[0], _Ref) or isinstance(operands[1], _Ref) or len(s.jet_refs) != 1:
            return None  # the product must be linear in its left operand, the right a constant
        return i

    def _steps(self, z: Tensor, v: Tensor, order: int, keep: frozenset[int] | None, env: list,
               start: int, stop: int) -> list:  # fmt: skip
        """``env`` after the steps ``start`` to ``stop`` (exclusive) have run."""
        batch = z.shape[0]
        if keep is None:
            needs = [None] * len(self.steps)
        else:  # the same for every chunk of a request: worked out once
            key = (frozenset(keep), order)
            if key not in self._needs:
                self._needs[key] = self.needs(*key)
            needs = self._needs[key]
        with torch.no_grad():
            for i in range(start, stop):
                s = self.steps[i]
                if not self.live[i]:
                    continue
                if s.kind == _INPUT:
                    env[i] = Series([z, v] + [None] * (order - 1))
                elif s.kind == "value":
                    args = _values(_substitute(s.args, env, batch))
                    env[i] = s.op(*args, **_values(_substitute(s.kwargs, env, batch)))
                else:
                    args = _substitute(s.args, env, batch)
                    env[i] = RULES[s.name](s.op, order, args, _substitute(s.kwargs, env, batch), need=needs[i])
                for r in self.frees[i]:
                    env[r] = None
        return env


#: ops that only reshape one series (walked through to find the output's last product)
_RESHAPES = frozenset({"view", "_unsafe_view", "reshape", "alias", "clone", "squeeze", "unsqueeze"})


def build(g: Callable[[Tensor], Tensor], z_probe: Tensor, order: int) -> SeriesProgram:
    """Record ``g`` and check its series against nested forward mode; raises :class:`Unsupported`."""
    b1, b2 = PROBE_BATCHES
    trace1, trace2 = _trace(g, _probe_batch(z_probe, b1)), _trace(g, _probe_batch(z_probe, b2))
    steps, output = _compile(trace1, trace2, (b1, b2))
    program = SeriesProgram(steps, output)
    for i, s in enumerate(steps):
        if program.live[i] and s.kind == "jet" and s.name not in RULES:
            raise Unsupported(s.name)
    _verify(program, g, z_probe, order)
    return program


def _verify(program: SeriesProgram, g: Callable, z_probe: Tensor, order: int) -> None:
    """The top coefficient on a perturbed probe against nested reverse mode, projected on a
    random output direction (see :func:`_reference`)."""
    z = _probe_batch(z_probe, 2)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
    z = z + 1e-3 * v
    try:
        got = program.run(z, v, order)[order]
    except Unsupported:
        raise
    except Exception as exc:  # a rule that does not fit this use of its op
        raise Unsupported("verify", f"{type(exc).__name__}: {exc}") from None
    try:
        with torch.no_grad():
            y = g(z)
        u = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
        want = _reference(g, z, v, u, order) / math.factorial(order)
    except Exception:  # no (higher) backward in autograd either: nothing to compare with
        return
    got = torch.zeros_like(want) if got is None else (u * got.reshape(u.shape)).sum(-1)
    # float64 at 1e-7, not tighter: some float64 backward kernels use float32 constants
    tol = 1e-4 if z.dtype == torch.float32 else 1e-7
    scale = max(float(want.abs().max()), 1.0) if want.numel() else 1.0
    if not torch.isfinite(got).all() or (want.numel() and float((got - want).abs().max()) > tol * scale):
        raise Unsupported("verify", "the series disagree with autograd")


def _reference(g: Callable, z: Tensor, v: Tensor, u: Tensor, order: int) -> Tensor:
    """``uᵀ d^order/dt^order g(z + t v)`` per point, by ``order`` nested reverse passes of the
    scalar ``uᵀ g`` (``s ↦ ∇s · v``): gradients of gradients, never a JVP by double backward
    (which PyTorch gets wrong through ``native_layer_norm`` at second order) nor forward mode
    (wrong there too); not torch.func either (its jvp imports torch._dynamo, a second per command)."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        s = (u * g(zz)).sum(-1)
        for k in range(order):
            if not s.requires_grad:  # polynomial of lower degree: the rest is zero
                return torch.zeros_like(s).detach()
            (w,) = torch.autograd.grad(s.sum(), zz, create_graph=k < order - 1, allow_unused=True)
            if w is None:
                return torch.zeros_like(s).detach()
            s = (w * v).sum(-1)
    return s.detach()


def nested_derivative(g: Callable, z: Tensor, v: Tensor, order: int) -> Tensor:
    """``d^order/dt^order g(z + t v)`` at 0 by nested ``torch.func.jvp`` (the fall-back)."""
    from torch.func import jvp

    h = g
    for _ in range(order):
        h = (lambda f: lambda zz: jvp(f, (zz,), (v,))[1])(h)
    with torch.no_grad():
        return h(z)


# --------------------------------------------------------------------------- interpolation


def compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """All tuples of ``parts`` non-negative integers summing to ``total``, in a fixed order."""
    out = []
    for combo in combinations_with_replacement(range(parts), total):
        t = [0] * parts
        for c in combo:
            t[c] += 1
        out.append(tuple(t))
    return sorted(set(out), reverse=True)


@functools.cache
def interpolation(parts: int, order: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[Fraction, ...], ...]]:
    """Directions ``i`` (``|i| = order`` over ``parts`` inputs) and the exact weights ``W``
    with ``∂^α g / α! = Σ_i W[α][i] c_i``, ``c_i`` the order-``order`` coefficient of
    ``t ↦ g(z + t i)``; rows of ``W`` in the order of :func:`compositions`."""
    idx = compositions(order, parts)
    n = len(idx)
    # c_i = Σ_α (∂^α g/α!) i^α: the matrix M[i][α] = i^α; W = M⁻¹ by Gauss–Jordan in ℚ
    m = [[Fraction(math.prod(b**a for a, b in zip(alpha, i))) for alpha in idx] + [Fraction(int(r == c)) for c in range(n)]
         for r, i in enumerate(idx)]  # fmt: skip
    for col in range(n):
        piv = next(r for r in range(col, n) if m[r][col] != 0)
        m[col], m[piv] = m[piv], m[col]
        p = m[col][col]
        m[col] = [x / p for x in m[col]]
        for r in range(n):
            if r != col and m[r][col] != 0:
                f = m[r][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return tuple(idx), tuple(tuple(row[n:]) for row in m)
