"""Rules for unary smooth (and piecewise-linear) elementwise ops, at any order.

Each op has a *derivative table* entry ``_d_<op>(x, order, out) -> (y, [f′, f″, …])``
giving the value and its first ``order`` derivatives at the input's value (``None`` for a
zero derivative); :func:`~.chain._unary` turns it into a rule by the chain rule
(:mod:`.chain`), in each mode of :class:`~.jet._Call`. Derivatives of any order come
from closed forms: polynomials in the value for the functions an ODE defines (``tanh′ =
1 - tanh²``, ``σ′ = σ - σ²``, ``exp′ = exp``), Hermite polynomials for ``erf`` and the
Gaussian CDF, falling factorials for powers. The derivatives are of the value row only
(one row): the cost that grows with the streams is the chain rule's products.

To add an elementwise op, add its table entry to ``_UNARY_DERIVS`` and its name to the
rule table.

Imports: :mod:`.jet`, :mod:`.chain`, :mod:`.workspace`; NumPy (its float32 ``tanh`` loop).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from jaccli.jets.chain import _compose, _horner, _unary
from jaccli.jets import workspace
from jaccli.jets.jet import Jet, Unsupported, _scalar


# ---- derivatives of every order, from closed forms


@functools.cache
def _ode_polys(g: tuple[float, ...], order: int) -> tuple[tuple[float, ...], ...]:
    """Coefficients (low to high) of ``P_k`` with ``f⁽ᵏ⁾ = P_k(f)`` when ``f′ = g(f)``:
    ``P₁ = g``, ``P_{k+1} = P_k′ · g``."""
    polys = [tuple(g)]
    for _ in range(1, order):
        p = polys[-1]
        dp = [i * p[i] for i in range(1, len(p))] or [0.0]
        prod = [0.0] * (len(dp) + len(g) - 1)
        for i, a in enumerate(dp):
            for j, b in enumerate(g):
                prod[i + j] += a * b
        polys.append(tuple(prod))
    return tuple(polys)


def _ode_derivs(y: Tensor, order: int, g: tuple[float, ...]) -> list:
    if order in (1, 2):
        low = _low_derivs(y, order, g)
        if low is not None:
            return low
    return [_horner(p, y) for p in _ode_polys(g, order)] if order else []


def _low_derivs(y: Tensor, order: int, g: tuple[float, ...]) -> list | None:
    """``f′ = g(y)`` and ``f″ = g′(y) f′`` for a quadratic ``g`` in one ``addcmul`` pass each
    (``g₀ + y·(g₁ + g₂ y)`` as ``base + g₂ y²``, ``base`` a constant or ``y`` itself: the form
    :func:`.chain._horner` takes in one pass); None where ``g`` has no such form (Horner then).
    Why: Horner took four and five passes over the value's row (a tanh layer of the 2→50³→1
    Hessian: 71 µs against 22 µs a chunk)."""
    g0, g1, g2 = (*g, 0.0, 0.0)[:3]
    if not g2 or len(g) > 3 or g1 not in (0.0, 1.0) or (g1 and g0):
        return None
    f1 = _horner(g, y)
    if order == 1:
        return [f1]
    # g′(y) f′ = g₁ f′ + 2 g₂ y f′
    return [f1, torch.addcmul(f1 if g1 else _scalar(0.0, y), y, f1, value=2 * g2, out=workspace.empty_like(y))]


_TANH, _SIGMOID, _TAN = (1.0, 0.0, -1.0), (0.0, 1.0, -1.0), (1.0, 0.0, 1.0)


def _numpy_tanh_is_vector512() -> bool:
    """Whether NumPy's float32 ``tanh`` loop runs an AVX-512 build on this CPU (NumPy ≥ 2.0 says so
    through ``numpy.lib.introspect``; an older NumPy, or any other target: False)."""
    try:
        from numpy.lib.introspect import opt_func_info

        info = opt_func_info(func_name="^tanh$", signature="float32")["tanh"]
        current = next(iter(info.values()))["current"]
    except Exception:  # no introspection (NumPy < 2.0) or another layout of its answer
        return False
    return current.startswith(("X86_V4", "AVX512"))


#: float32 CPU tanh by NumPy's ufunc (None: decided at the first call, by :func:`_numpy_tanh_is_vector512`)
NUMPY_TANH: bool | None = None
#: NumPy's loop runs on one thread: taken only while torch runs on at most this many (at two,
#: it still took 57 µs against the five passes' 134 µs on a [2979, 50] block; more threads
#: share the passes out, and were not measured on this 2-core machine)
NUMPY_TANH_THREADS = 2


def _tanh(x: Tensor, out: Tensor | None) -> Tensor:
    """``tanh x``; on a float32 CPU tensor by NumPy's AVX-512 ``tanh`` where NumPy has one (one
    pass, about 0.4 ns an element here, relative error ≤ 1.1e-7 at every ``x``), else as
    ``e / (e + 2)`` with ``e = expm1(2x)``, five passes that take about 60 % of ``torch.tanh``'s
    time (its float32 CPU kernel costs 2.5-6 ns an element).

    Why: tanh was 15-22 % of the Taylor passes of the PINN jobs (``benchmarks/peers.py``), and the
    five passes still 12-14 % of u_xxxx's (``expm1`` alone 1.2 ns an element). NumPy's own AVX2
    loop costs as much as the five passes, so elsewhere they stay.
    Why not the quicker ``2σ(2x) - 1`` (a quarter of tanh's time): that one
    subtracts 1 from σ's rounding near ½, an absolute error of ~2e-7 that is a relative 2.5 %
    at ``|x| = 1e-5`` (``tanh 1e-8`` came out 0), and the Hessian of ``tanh(w·x)`` near 0 is
    about ``-2 tanh(w·x) wwᵀ``: it carried that error. ``expm1`` keeps relative accuracy at
    every ``x`` (1.7e-7, as torch's kernel), and ``e + 2 ≥ 1`` cancels nothing; the clamp keeps
    ``e`` finite (``tanh ±9`` rounds to ±1 in float32). float64 and other devices keep torch's kernel.

    Not by size: below ~8k elements torch's kernel costs less than the five calls (11 against
    17 µs at 4096), but a choice by the block's size is a choice by the chunk's, and a result
    must not change in its last bits with the chunk size (a resumed stream equals a whole run).
    NumPy's loop gives every element the same bits wherever it sits in the array (checked at
    every offset and length in ``tests/jets/test_rules.py``).
    """
    global NUMPY_TANH
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.tanh(x, out=out)
    y = workspace.empty_like(x) if out is None else out
    if NUMPY_TANH is None:
        NUMPY_TANH = _numpy_tanh_is_vector512()
    if (NUMPY_TANH and y.dtype == torch.float32 and torch._C._len_torch_dispatch_stack() == 0
            and torch.get_num_threads() <= NUMPY_TANH_THREADS):  # fmt: skip
        try:  # plain tensors only: no autograd, fake or functorch tensors (.numpy() refuses them)
            np.tanh(x.numpy(), out=y.numpy())
            return y
        except (RuntimeError, TypeError):
            pass
    torch.clamp(x, -9.0, 9.0, out=y).mul_(2.0).expm1_()
    return y.div_(y + 2.0)


def _d_tanh(x, order, out):
    y = _tanh(x, out)
    return y, _ode_derivs(y, order, _TANH)


def _d_sigmoid(x, order, out):
    y = torch.sigmoid(x, out=out)
    return y, _ode_derivs(y, order, _SIGMOID)


def _d_tan(x, order, out):
    y = torch.tan(x, out=out)
    return y, _ode_derivs(y, order, _TAN)


def _cycle(values: list, order: int) -> list:
    return [values[k % len(values)] for k in range(order)]


def _d_sin(x, order, out):
    y = torch.sin(x, out=out)
    if not order:
        return y, []
    c = torch.cos(x)
    return y, _cycle([c, -y, -c, y], order)


def _d_cos(x, order, out):
    y = torch.cos(x, out=out)
    if not order:
        return y, []
    s = torch.sin(x)
    return y, _cycle([-s, -y, s, y], order)


def _d_sinh(x, order, out):
    y = torch.sinh(x, out=out)
    return y, (_cycle([torch.cosh(x), y], order) if order else [])


def _d_cosh(x, order, out):
    y = torch.cosh(x, out=out)
    return y, (_cycle([torch.sinh(x), y], order) if order else [])


def _d_exp(x, order, out):
    y = torch.exp(x, out=out)
    return y, [y] * order


def _d_expm1(x, order, out):
    y = torch.expm1(x, out=out)
    return y, ([y + 1] * order if order else [])


def _log_derivs(r: Tensor, order: int) -> list:
    """``(-1)^{k-1} (k-1)! rᵏ`` for ``r = 1/x``: the derivatives of ``log``."""
    fs, rk = [], r
    for k in range(1, order + 1):
        fs.append(rk if k == 1 else rk * ((-1) ** (k - 1) * math.factorial(k - 1)))
        if k < order:
            rk = rk * r
    return fs


def _d_log(x, order, out):
    y = torch.log(x, out=out)
    return y, (_log_derivs(x.reciprocal(), order) if order else [])


def _d_log1p(x, order, out):
    y = torch.log1p(x, out=out)
    return y, (_log_derivs((1 + x).reciprocal(), order) if order else [])


def _power_chain(f1: Tensor, p: float, r: Tensor, order: int) -> list:
    """Derivatives of ``xᵖ`` from ``f′`` and ``r = 1/x``: ``f⁽ᵏ⁺¹⁾ = f⁽ᵏ⁾ (p - k) r``."""
    fs = [f1]
    for k in range(1, order):
        fs.append(fs[-1] * r * (p - k))
    return fs


def _d_sqrt(x, order, out):
    y = torch.sqrt(x, out=out)
    return y, (_power_chain(0.5 / y, 0.5, x.reciprocal(), order) if order else [])


def _d_rsqrt(x, order, out):
    y = torch.rsqrt(x, out=out)
    if not order:
        return y, []
    y2 = y * y
    return y, _power_chain(-0.5 * y2 * y, -0.5, y2, order)


def _d_reciprocal(x, order, out):
    y = torch.reciprocal(x, out=out)
    return y, (_power_chain(-y * y, -1.0, y, order) if order else [])


def _d_atan(x, order, out):
    # atan⁽ⁿ⁾ = (n-1)! cosⁿθ sin(n(θ + π/2)), θ = atan x (cos θ = 1/√(1+x²))
    y = torch.atan(x, out=out)
    if not order:
        return y, []
    f1 = (1 + x * x).reciprocal()
    fs = [f1, -2 * x * f1 * f1][:order]
    if order > 2:
        c = f1.sqrt()
        fs += [math.factorial(n - 1) * c**n * torch.sin(n * (y + math.pi / 2)) for n in range(3, order + 1)]
    return y, fs


def _hermite(x: Tensor, count: int, scale: float) -> list:
    """``He_m(x/…)``-style polynomials ``H₀ … H_{count-1}`` with ``H_{m+1} = s(x H_m - m H_{m-1})``:
    physicists' Hermite for ``s = 2``, probabilists' for ``s = 1``."""
    hs = [torch.ones_like(x)]
    if count > 1:
        hs.append(scale * x)
    for m in range(1, count - 1):
        hs.append(scale * (x * hs[m] - m * hs[m - 1]))
    return hs


def _d_erf(x, order, out):
    # erf⁽ⁿ⁾ = 2/√π (-1)ⁿ⁻¹ Hₙ₋₁(x) e^{-x²}
    y = torch.erf(x, out=out)
    if not order:
        return y, []
    e = (2 / math.sqrt(math.pi)) * torch.exp(-x * x)
    return y, [e if n == 1 else (-1) ** (n - 1) * h * e for n, h in enumerate(_hermite(x, order, 2.0), 1)]


def _d_pow(x, order, out, p):
    # pow's own derivative convention: exponent 0 has derivative 0 everywhere
    y = torch.pow(x, p, out=out)
    fs, ff = [], 1.0
    for k in range(1, order + 1):
        ff = ff * (p - (k - 1))  # p (p-1) … (p-k+1)
        if isinstance(p, Tensor):
            fs.append(torch.where(ff == 0, 0.0, ff * torch.pow(x, p - k)))
        else:
            fs.append(None if ff == 0 else ff * torch.pow(x, p - k))
    return y, fs


def _d_pow_base(x, order, out, base):
    # base ** x for a constant base: derivatives y lnᵏ(base)
    y = torch.pow(base, x, out=out) if out is not None else torch.pow(base, x)
    ln = math.log(base) if not isinstance(base, Tensor) else torch.log(base)
    return y, [y * ln**k for k in range(1, order + 1)]


def _sigmoid_derivs(s: Tensor, order: int) -> list:
    """``σ, σ′, …, σ⁽ᵒʳᵈᵉʳ⁾`` as functions of ``s = σ(x)``."""
    return [s, *_ode_derivs(s, order, _SIGMOID)]


def _d_softplus(x, order, out, beta=1.0, threshold=20.0):
    y = torch.nn.functional.softplus(x, beta, threshold)
    if not order:
        return y, []
    linear = x * beta > threshold
    sig = _sigmoid_derivs(torch.sigmoid(x * beta), order - 1)
    fs = [torch.where(linear, 1.0, sig[0]).to(x.dtype)]
    fs += [torch.where(linear, 0.0, beta ** (n - 1) * sig[n - 1]).to(x.dtype) for n in range(2, order + 1)]
    return y, fs


def _d_silu(x, order, out):
    # silu⁽ⁿ⁾ = x σ⁽ⁿ⁾ + n σ⁽ⁿ⁻¹⁾
    sig = _sigmoid_derivs(torch.sigmoid(x), order)
    y = torch.mul(x, sig[0], out=out)
    return y, [torch.addcmul(sig[n - 1] if n == 1 else sig[n - 1] * n, x, sig[n]) for n in range(1, order + 1)]


_SQRT1_2PI = 1 / math.sqrt(2 * math.pi)
_TANH_K = math.sqrt(2 / math.pi)
_TANH_C = 0.044715


def _d_gelu(x, order, out, approximate="none"):
    y = torch.nn.functional.gelu(x, approximate=approximate)
    if not order:
        return y, []
    if approximate == "tanh":
        # ½ x (1 + tanh u), u = k (x + c x³): tanh's derivatives composed with u's
        t = torch.tanh(_TANH_K * (x + _TANH_C * x * x * x))
        du = [_TANH_K * (1 + 3 * _TANH_C * x * x), 6 * _TANH_K * _TANH_C * x, torch.full_like(x, 6 * _TANH_K * _TANH_C)]
        dt = _compose(_ode_derivs(t, order, _TANH), du[:order], order)
        return y, [0.5 * (x * dt[n - 1] + (n * (dt[n - 2] if n > 1 else 1 + t))) for n in range(1, order + 1)]
    # x Φ(x): gelu⁽ⁿ⁾ = x φ⁽ⁿ⁻¹⁾ + n φ⁽ⁿ⁻²⁾ (Φ for n = 1), φ⁽ᵐ⁾ = (-1)ᵐ Heₘ(x) φ
    pdf = torch.exp(-0.5 * x * x) * _SQRT1_2PI
    dphi = [(-1) ** m * h * pdf for m, h in enumerate(_hermite(x, order, 1.0))]
    cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
    return y, [x * dphi[n - 1] + n * (dphi[n - 2] if n > 1 else cdf) for n in range(1, order + 1)]


def _d_elu(x, order, out, alpha=1.0, scale=1.0, input_scale=1.0):
    y = torch.ops.aten.elu(x, alpha, scale, input_scale)
    if not order:
        return y, []
    pos = x > 0
    neg = scale * alpha * torch.exp(x * input_scale)
    fs = [torch.where(pos, scale, neg * input_scale).to(x.dtype)]
    fs += [torch.where(pos, 0.0, neg * input_scale**n).to(x.dtype) for n in range(2, order + 1)]
    return y, fs


def _mask_derivs(value: Callable, mask: Callable) -> Callable:
    """A piecewise-linear op: derivative 1 where ``mask`` holds (torch's convention at kinks), no curvature."""

    def derivs(x, order, out, *params):
        y = value(x, *params)
        return y, ([mask(x, *params).to(x.dtype)] + [None] * (order - 1) if order else [])

    return derivs


def _d_leaky_relu(x, order, out, slope=0.01):
    y = torch.nn.functional.leaky_relu(x, slope)
    # built in x's dtype: torch.where on two Python numbers would round the slope to float32
    return y, ([torch.ones_like(x).masked_fill_(x <= 0, slope)] + [None] * (order - 1) if order else [])


def _d_abs(x, order, out):
    return torch.abs(x), ([torch.sgn(x)] + [None] * (order - 1) if order else [])


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
#: ``f′ = g(f)`` with ``g`` a polynomial (coefficients low to high): series past order 2 by the ODE
_ODES: dict[str, tuple[float, ...]] = {"tanh": _TANH, "sigmoid": _SIGMOID, "tan": _TAN, "exp": (0.0, 1.0), "expm1": (1.0, 1.0)}
_UNARY_RULES = {name: _unary(d, _ODES.get(name)) for name, d in _UNARY_DERIVS.items()}


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
