"""Self-checks: jaccli's derivatives against float64 central finite differences.

``jaccli check`` and :func:`check` answer "can I trust the numbers for this model?"
on a few points of the user's own input, the way CI pipelines want it: a report and
a pass/fail verdict.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from jaccli.engine import select_output
from jaccli.engine.probe import select_part
from jaccli.request.spec import Selection
from jaccli.engine import describe, hessian, jacobian
from jaccli.errors import ModelError, UsageError
from jaccli.load.models import info_of, model_dtype

#: relative step of central differences: eps^(1/3) balances truncation and rounding in float64
_STEP = float(torch.finfo(torch.float64).eps) ** (1 / 3)


@dataclass
class CheckReport:
    """Worst relative errors against finite differences, and what the probe saw."""

    points: list[int]
    tolerance: float
    jacobian_error: float
    hessian_error: float | None = None
    worst_point: int | None = None
    batch_independent: bool | str = True
    nonsmooth_ops: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _as_float64(f: Callable) -> Callable:
    if model_dtype(f) in (None, torch.float64):
        return f
    if isinstance(f, nn.Module):
        return copy.deepcopy(f).to(torch.float64)
    raise UsageError("check needs a model that accepts float64", got=str(model_dtype(f)))


def _central_differences(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``d fn / d x`` per point by central differences: ``[K, *out, *in]`` for ``x`` ``[K, *in]``."""
    k, in_shape = x.shape[0], x.shape[1:]
    flat = x.reshape(k, -1)
    cols = []
    for j in range(flat.shape[1]):
        h = _STEP * flat[:, j].abs().clamp_min(1.0)
        step = torch.zeros_like(flat)
        step[:, j] = h
        plus, minus = fn((flat + step).reshape(x.shape)), fn((flat - step).reshape(x.shape))
        cols.append((plus - minus) / (2 * h.reshape(k, *[1] * (plus.dim() - 1))))
    return torch.stack(cols, dim=-1).reshape(*cols[0].shape, *in_shape)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, int]:
    """max |got - want| / max |want| over each point; the worst value and its point."""
    k = got.shape[0]
    diff = (got - want).reshape(k, -1).abs().amax(dim=1)
    scale = want.reshape(k, -1).abs().amax(dim=1).clamp_min(1e-12)
    rel = diff / scale
    worst = int(rel.argmax())
    return float(rel[worst]), worst


def check(
    f: Callable,
    x: torch.Tensor,
    *,
    points: int = 4,
    hessian_too: bool = False,
    tolerance: float = 1e-6,
    output=None,
    select=None,
) -> CheckReport:
    """Compare jaccli's per-sample Jacobian (and Hessian) with float64 central differences.

    ``points`` evenly spaced points of ``x`` (axis 0 holds the points) are used; the
    model runs in float64 (a copy is converted if needed). The check fails when a
    relative error exceeds ``tolerance`` (ten times it for the Hessian, whose
    reference is a difference of Jacobians) or when the model mixes batch elements.

    >>> import torch, jaccli
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> report = jaccli.check(net, torch.randn(10, 2), hessian_too=True)
    >>> report.passed, report.jacobian_error < 1e-6
    (True, True)
    """
    if x.dim() == 0 or x.shape[0] == 0:
        raise UsageError("check needs points along axis 0 of the input", got=str(tuple(x.shape)))
    f64 = _as_float64(f)
    n = x.shape[0]
    idx = sorted({round(i * (n - 1) / max(points - 1, 1)) for i in range(min(points, n))})
    xs = x[idx].to(torch.float64)
    select = Selection.parse(select)
    facts = describe(f64, xs if len(idx) > 1 else xs.repeat(2, *[1] * (xs.dim() - 1)), output=output, select=select)
    if facts["differentiable"] is not True:  # nothing to compare: the derivative commands refuse it too
        raise ModelError(facts["differentiable"], where=info_of(f).path)
    report = CheckReport(
        points=idx,
        tolerance=tolerance,
        jacobian_error=math.nan,
        batch_independent=facts["batch_independent"],
        nonsmooth_ops=facts["nonsmooth_ops"],
    )
    if report.batch_independent is not True:
        report.failures.append(str(report.batch_independent))
        return report

    def model_out(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return select_part(select_output(f64(v), output, "model"), select, True, "model")

    J = jacobian(f64, xs, per_sample=True, output=output, select=select, check_batch=False)
    report.jacobian_error, report.worst_point = _relative_error(J, _central_differences(model_out, xs))
    if report.jacobian_error > tolerance:
        report.failures.append(
            f"the Jacobian differs from finite differences by {report.jacobian_error:.3g} (relative) "
            f"at point {idx[report.worst_point]}, above the tolerance {tolerance:g}"
        )
    if hessian_too:

        def jac(v: torch.Tensor) -> torch.Tensor:
            return jacobian(f64, v, per_sample=True, output=output, select=select, check_batch=False)

        H = hessian(f64, xs, per_sample=True, output=output, select=select, check_batch=False)
        report.hessian_error, worst = _relative_error(H, _central_differences(jac, xs))
        if report.hessian_error > 10 * tolerance:
            report.failures.append(
                f"the Hessian differs from differences of the Jacobian by {report.hessian_error:.3g} "
                f"(relative) at point {idx[worst]}, above the tolerance {10 * tolerance:g}"
            )
    return report
