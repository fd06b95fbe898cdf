"""Self-checks against finite differences: they pass on sound models and fail on broken ones."""

from __future__ import annotations

import pytest
import torch

import jaccli
from problems import BY_NAME, tanh_mlp


class _WrongSlope(torch.autograd.Function):
    """y = 2x whose derivative rules claim 3: what a buggy custom op looks like."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 3 * g

    @staticmethod
    def jvp(ctx, t):
        return 3 * t

    @staticmethod
    def vmap(info, in_dims, x):
        return _WrongSlope.apply(x), in_dims[0]


@pytest.mark.parametrize("problem", ["field", "potential", "polar", "oscillator"])
def test_sound_models_pass(problem):
    p = BY_NAME[problem]
    report = jaccli.check(p.f, p.points(20), points=5, hessian_too=True)
    assert report.passed, report.failures
    assert report.jacobian_error < 1e-8 and report.hessian_error < 1e-7
    assert report.points == [0, 5, 10, 14, 19]


def test_float32_modules_are_checked_in_float64():
    net = tanh_mlp((3, 8, 2), dtype=torch.float32)
    report = jaccli.check(net, torch.randn(6, 3), hessian_too=True)
    assert report.passed and report.jacobian_error < 1e-8
    assert next(net.parameters()).dtype == torch.float32  # the user's module is untouched


def test_a_wrong_derivative_fails():
    report = jaccli.check(lambda x: _WrongSlope.apply(x) + x**2, torch.rand(5, 2, dtype=torch.float64))
    assert not report.passed
    assert report.jacobian_error == pytest.approx(1 / 3, rel=0.2)  # |3 - 2| / max|J_fd| with J_fd ≈ 2 + 2x
    assert "differs from finite differences" in report.failures[0]


def test_batch_mixing_fails_the_check():
    report = jaccli.check(lambda x: x - x.mean(0), torch.rand(5, 2, dtype=torch.float64))
    assert not report.passed and "mixes batch elements" in report.failures[0]


def test_relu_is_reported_not_failed():
    net = tanh_mlp((2, 8, 1), act="relu")
    with pytest.warns(jaccli.JaccliWarning, match="relu"):
        x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
        report = jaccli.check(net, x, hessian_too=True)
    assert report.nonsmooth_ops == ["relu"]
    assert report.jacobian_error < 1e-6  # away from the kinks the first derivative is right


def test_check_needs_points():
    with pytest.raises(jaccli.UsageError, match="points along axis 0"):
        jaccli.check(torch.sin, torch.tensor(1.0, dtype=torch.float64))
