"""What a finished result is checked for and how it is shaped for the caller.

Owns the NaN/Inf warning (the check itself is :func:`.problem.all_finite`), the warnings
about non-smooth models (ReLU networks, whose second derivatives vanish almost everywhere),
and the reshaping of the flat ``[N, out, in]`` result into per-argument shapes (nested
tuples for several ``wrt``).

Imports: torch and :mod:`.problem`.
"""

from __future__ import annotations

import math
import warnings

import torch

from jaccli.errors import JaccliWarning, NumericalError
from jaccli.engine.problem import Problem, all_finite
from jaccli.request.kinds import kind as kind_of

#: ops whose second derivative is zero almost everywhere (or undefined at a kink)
NONSMOOTH_OPS = frozenset(
    {
        "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "_prelu_kernel",
        "rrelu", "rrelu_with_noise", "hardtanh", "hardtanh_", "threshold", "abs", "sign",
        "clamp", "clamp_", "clamp_min", "clamp_max", "maximum", "minimum", "max", "min",
        "floor", "ceil", "round", "trunc", "hardsigmoid", "hardswish", "hardshrink",
        "softshrink", "max_pool1d", "max_pool2d", "max_pool3d",
        "max_pool2d_with_indices", "max_pool3d_with_indices", "heaviside", "amax", "amin",
    }
)  # fmt: skip


def finish(kind: str, p: Problem, value: torch.Tensor | None, strict: bool, *, facts: dict | None = None) -> None:
    """Warn (or with ``strict`` fail) about NaN/Inf and non-smooth models. ``facts``
    (``all_finite``, ``nonzero``) stand in for ``value`` when the result was streamed to disk
    and its statistics were gathered chunk by chunk."""
    finite = facts["all_finite"] if facts is not None else all_finite(value)
    if not finite:
        msg = f"the {kind} holds NaN or Inf values"
        if strict:
            raise NumericalError(msg, where=p.where)
        warnings.warn(f"{p.where}: {msg}", JaccliWarning, stacklevel=3)
    if kind_of(kind).taylor_order == 2:  # second derivatives
        kinks = sorted(p.ops & NONSMOOTH_OPS)
        if kinks:
            if not (facts["nonzero"] if facts is not None else bool(value.any())):
                msg = (
                    f"the {kind} is identically zero because the model is piecewise linear "
                    f"({', '.join(kinks)}): its second derivatives vanish almost everywhere; "
                    "use a smooth activation (tanh, softplus, SiLU, GELU) for meaningful curvature"
                )
            else:
                msg = (
                    f"the model uses {', '.join(kinks)}: second derivatives through those "
                    "units are zero almost everywhere and ignore their kinks"
                )
            warnings.warn(f"{p.where}: {msg}", JaccliWarning, stacklevel=3)


def unflatten_in(p: Problem, t: torch.Tensor, lead: tuple[int, ...], axes: int):
    """Split the last ``axes`` flat input axes per differentiated argument and reshape."""
    sizes = [math.prod(s) for s in p.in_shapes]
    if axes == 1:
        parts = t.split(sizes, dim=-1)
        outs = tuple(part.reshape((*lead, *p.out_shape, *s)) for part, s in zip(parts, p.in_shapes))
        return outs[0] if p.single else outs
    rows = t.split(sizes, dim=-2)
    blocks = tuple(
        tuple(
            blk.reshape((*lead, *p.out_shape, *si, *sj))
            for blk, sj in zip(r.split(sizes, dim=-1), p.in_shapes)
        )
        for r, si in zip(rows, p.in_shapes)
    )
    return blocks[0][0] if p.single else blocks


def lead_axes(p: Problem) -> tuple[int, ...]:
    return (p.n,) if p.per_sample else ()
