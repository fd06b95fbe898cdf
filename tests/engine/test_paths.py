"""Derivatives that cannot reach the output are refused, naming the op, instead of coming out as
zeros; piecewise-constant parts beside a differentiable path pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jaccli
from problems import BLOCKED, fd_jacobian


@pytest.mark.parametrize("kind", ["jacobian", "hessian"])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("name", list(BLOCKED))
def test_a_path_without_derivatives_is_refused_naming_its_op(name, per_sample, kind):
    factory, op = BLOCKED[name]
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(jaccli.ModelError, match=op) as err:
        getattr(jaccli, kind)(factory().double(), x, per_sample=per_sample)
    assert "'x'" in str(err.value)
    facts = jaccli.describe(factory().double(), x)
    assert op.replace("\\", "") in facts["differentiable"] and facts["batch_independent"] is None


class _Beside(nn.Module):
    """Kinks and integer masks beside a differentiable path: tanh(x) + trunc(x), a leaky step,
    a value written in place into a mask, max pooling (whose indices are integers)."""

    def forward(self, x):  # x [N, 4]
        mask = (x > 0).to(x.dtype)
        mask[:, 0] += x[:, 0]
        pooled = nn.functional.max_pool1d(x[:, None], 2)[:, 0]  # [N, 2]
        return torch.cat([torch.tanh(x) + x.long().to(x.dtype), torch.where(x > 0, x, 0.1 * x) * mask, pooled], 1)


def test_piecewise_constant_parts_beside_a_differentiable_path_pass():
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.05
    torch.testing.assert_close(jaccli.jacobian(_Beside(), x), fd_jacobian(_Beside(), x))
    assert jaccli.describe(_Beside(), x)["differentiable"] is True


class _TwoInputs(nn.Module):
    def forward(self, t, x):
        return torch.tanh(t) * x.long().to(t.dtype)


def test_the_refusal_points_to_an_input_that_works():
    t, x = torch.rand(4, 1, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64) * 3
    with pytest.raises(jaccli.ModelError, match=r"input 'x' only through .*--wrt t"):
        jaccli.jacobian(_TwoInputs(), {"t": t, "x": x}, wrt="x", per_sample=True)
    got = jaccli.jacobian(_TwoInputs(), {"t": t, "x": x}, wrt="t", per_sample=True)
    torch.testing.assert_close(got, (1 - torch.tanh(t) ** 2)[:, :, None] * x.long()[:, :, None])


class _CDist(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))

    def forward(self, x):
        return torch.cdist(x, self.c, compute_mode="donot_use_mm_for_euclid_dist")  # no double backward


def test_an_op_without_a_second_derivative_names_it_and_the_first_derivatives_that_work():
    x = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(jaccli.ModelError, match=r"no derivative of aten\._cdist_backward.*jaccli jacobian"):
        jaccli.hessian(_CDist(), x, per_sample=True)
