"""Rules for unary smooth (and piecewise-linear) elementwise ops.

Each op has a *derivative table* entry ``_d_<op>(x, order, out)`` giving f′ and f″
from the input (and the already computed value ``out``); :func:`_unary` turns it into
a rule by the chain rule (Faà di Bruno to order 2). To add an elementwise op, add its
table entry to ``_UNARY_DERIVS`` and its name to the rule table.

Imports: :mod:`.jet`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from jaccli.jets.jet import Jet, Unsupported


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
