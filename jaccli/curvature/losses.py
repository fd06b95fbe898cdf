"""The losses of ``--loss``, one row of :data:`LOSSES` each.

A row says, for a batch of model outputs ``out`` ``[B, …]`` and targets ``y``:

* ``raw(out, y)``: each sample's loss summed over its elements, ``[B]``;
* ``per_element``: whether ``reduction="mean"`` also averages over a sample's elements
  (``mse`` and ``bce`` do, as ``torch.nn.functional`` does: ``mean`` is over every element);
* ``sqrt(out, y)``: a factor ``S`` ``[B, C, K]`` of the Hessian of ``raw`` with respect to
  the (flattened) outputs, ``H_L = S Sᵀ``; it makes the Gauss-Newton matrix ``Jᵀ H_L J``
  (``None``: the GGN is not defined for the loss, its output is the loss itself);
* ``hvp(out, y, u)``: ``H_L u`` per sample without forming ``S`` (the GGN's products);
* ``check(out, y, where)``: the target fits the output (shape, dtype, values), raising
  :class:`~jaccli.errors.InputError` or :class:`~jaccli.errors.ModelError` otherwise; it
  returns the target as the loss uses it (classes as int64, probabilities as floats).

For ``nll`` (log-probability outputs) the loss is linear in the outputs, so its
Gauss-Newton split is taken before the (idempotent) ``log_softmax``: ``H_L = diag(p) - ppᵀ``
with ``p = softmax(out)``, the Fisher of the categorical distribution the model states, as
for ``cross-entropy``. ``log-likelihood`` is ``raw = -out``: its Hessian is the observed
information ``-∇² Σ log f(xᵢ|θ)``.

Imports: torch, :mod:`jaccli.errors`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jaccli.errors import InputError, ModelError, shape_str, UsageError


@dataclass(frozen=True)
class Loss:
    """One loss: see the module's docstring for what each field computes."""

    name: str
    summary: str
    raw: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    check: Callable[[torch.Tensor, torch.Tensor | None, str], torch.Tensor | None]
    sqrt: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None
    hvp: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor] | None
    per_element: bool = False
    needs_target: bool = True
    default_reduction: str = "mean"


def _flat(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(out.shape[0], -1)


# ------------------------------------------------------------------ target checks


def _same_shape(out, y, where):
    if y is None:
        raise InputError("this loss needs a target", hint="pass --target FILE")
    if tuple(y.shape) != tuple(out.shape):
        raise InputError("the target's shape does not fit the model's output", where=where,
                         expected=shape_str(out.shape), got=shape_str(y.shape))  # fmt: skip
    if not y.is_floating_point():
        y = y.to(out.dtype)
    return y.to(out.dtype)


def _probabilities(out, y, where):
    y = _same_shape(out, y, where)
    if bool(((y < 0) | (y > 1)).any()):
        raise InputError("bce targets must lie in [0, 1]", where=where,
                         got=f"values from {float(y.min()):.4g} to {float(y.max()):.4g}")  # fmt: skip
    return y


def _logits_2d(out, where, what):
    if out.dim() != 2:
        raise ModelError(f"{what} needs outputs of shape [N, classes]", where=where, got=shape_str(out.shape))


def _classes(out, y, where, *, soft: bool):
    """Integer classes [B] (float holding whole numbers accepted), or with ``soft`` [B, C] probabilities."""
    if y is None:
        raise InputError("this loss needs a target", hint="pass --target FILE")
    n, c = out.shape
    if soft and y.dim() == 2 and y.is_floating_point():
        if tuple(y.shape) != (n, c):
            raise InputError("probability targets must have the output's shape", where=where,
                             expected=shape_str(out.shape), got=shape_str(y.shape))  # fmt: skip
        if bool((y < 0).any()):
            raise InputError("probability targets must not be negative", where=where)
        return y.to(out.dtype)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or y.shape[0] != n:
        expected = f"[{n}] class indices" + (f" or [{n}, {c}] probabilities" if soft else "")
        raise InputError("the target does not fit the loss", where=where, expected=expected, got=shape_str(y.shape))
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise InputError("class targets must be whole numbers", where=where, expected="integer classes",
                             got=f"{y.dtype} with fractional values")  # fmt: skip
    elif y.dtype == torch.bool or y.is_complex():
        raise InputError("class targets must be integers", where=where, got=str(y.dtype))
    y = y.to(torch.int64)
    if bool(((y < 0) | (y >= c)).any()):
        raise InputError("class targets out of range", where=where, expected=f"0 … {c - 1}",
                         got=f"{int(y.min())} … {int(y.max())}")  # fmt: skip
    return y


def _ce_check(out, y, where):
    _logits_2d(out, where, "cross-entropy")
    return _classes(out, y, where, soft=True)


def _nll_check(out, y, where):
    _logits_2d(out, where, "nll")
    return _classes(out, y, where, soft=False)


def _scalar_check(out, y, where):
    if y is not None:
        raise UsageError("this loss takes no --target: the model's output is the loss (or log-likelihood)")
    if out.dim() > 2 or (out.dim() == 2 and out.shape[1] != 1):
        raise ModelError("the model's output must be one value per sample", where=where,
                         expected=f"[{out.shape[0]}] or [{out.shape[0]}, 1]", got=shape_str(out.shape))  # fmt: skip
    return None


# ------------------------------------------------------------------ per-sample losses and output Hessians


def _mse_raw(out, y):
    return _flat((out - y) ** 2).sum(1)


def _mse_sqrt(out, y):
    b, c = _flat(out).shape
    eye = torch.eye(c, dtype=out.dtype, device=out.device) * (2.0**0.5)
    return eye.expand(b, c, c)


def _ce_raw(out, y):
    logp = torch.log_softmax(out, dim=1)
    if y.is_floating_point():
        return -(y * logp).sum(1)
    return -logp.gather(1, y[:, None])[:, 0]


def _softmax_sqrt(out, y):
    """``S = (diag(√p) - p √pᵀ)·√m`` with ``S Sᵀ = m (diag(p) - ppᵀ)``, ``m`` the target's mass."""
    p = torch.softmax(out, dim=1)
    r = p.sqrt()
    s = torch.diag_embed(r) - p[:, :, None] * r[:, None, :]
    if y is not None and y.is_floating_point():
        s = s * y.sum(1).sqrt()[:, None, None]
    return s


def _softmax_hvp(out, y, u):
    p = torch.softmax(out, dim=1)
    w = p * u - p * (p * u).sum(1, keepdim=True)
    if y is not None and y.is_floating_point():
        w = w * y.sum(1, keepdim=True)
    return w


def _bce_raw(out, y):
    return _flat(F.binary_cross_entropy_with_logits(out, y, reduction="none")).sum(1)


def _bce_sqrt(out, y):
    s = torch.sigmoid(_flat(out))
    return torch.diag_embed((s * (1 - s)).sqrt())


def _bce_hvp(out, y, u):
    s = torch.sigmoid(out)
    return s * (1 - s) * u


def _nll_raw(out, y):
    return -out.gather(1, y[:, None])[:, 0]


#: ``--loss`` name -> :class:`Loss`
LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("mse", "squared error Σ(f - y)², mean over every element", _mse_raw, _same_shape, _mse_sqrt,
             lambda out, y, u: 2 * u, per_element=True),
        Loss("cross-entropy", "softmax cross-entropy of logits [N, C]; integer classes [N] or probabilities [N, C]",
             _ce_raw, _ce_check, _softmax_sqrt, _softmax_hvp),
        Loss("bce", "binary cross-entropy on logits, targets in [0, 1] of the output's shape, mean over every element",
             _bce_raw, _probabilities, _bce_sqrt, _bce_hvp, per_element=True),
        Loss("nll", "negative log-likelihood of log-probability outputs [N, C], integer classes [N]",
             _nll_raw, _nll_check, _softmax_sqrt, _softmax_hvp),
        Loss("output", "the model's output [N] is each sample's loss", lambda out, y: out.reshape(-1),
             _scalar_check, None, None, needs_target=False),
        Loss("log-likelihood", "the model's output [N] is log f(xᵢ|θ); the matrix is the observed information",
             lambda out, y: -out.reshape(-1), _scalar_check, None, None, needs_target=False,
             default_reduction="sum"),
    )  # fmt: skip
}


def get_loss(name: str) -> Loss:
    """The row of ``name``, or a usage error listing the losses."""
    loss = LOSSES.get(name)
    if loss is None:
        raise UsageError("unknown loss", expected="one of " + ", ".join(LOSSES), got=name)
    return loss


def output_hvp(loss: Loss, out: torch.Tensor, y: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """``H_L u`` for ``u`` of the output's shape (the Gauss-Newton matrix's middle factor)."""
    return loss.hvp(out, y, u)
