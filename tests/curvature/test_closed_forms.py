"""Curvature against closed forms, in float64: linear, logistic and softmax regression, the
Gaussian log-likelihood at its maximum; the losses' reductions mean what torch's mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import jaccli
from jaccli.curvature.losses import LOSSES
from jaccli.request.choices import LOSS_NAMES


def _data(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), g


def _tilde(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def _linear(d, k, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(d, k).double()


def test_the_loss_table_and_the_cli_names_agree():
    assert tuple(LOSSES) == LOSS_NAMES


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_linear_regression_mse_hessian_is_two_over_n_xtx(matrix):
    x, g = _data()
    y = torch.randn(40, 1, generator=g, dtype=torch.float64)
    net = _linear(3, 1)
    r = jaccli.curvature(net, x, y, loss="mse", matrix=matrix, full=True, trace=True, diag=True)
    xt = _tilde(x)
    H = (2 / 40) * (xt.T @ xt)
    np.testing.assert_allclose(r.full, H.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.diag, np.diag(H.numpy()), rtol=1e-12)
    assert r.trace == pytest.approx(float(H.trace()), rel=1e-12) and r.trace_stderr is None
    # mean over every element: k outputs divide by N·k, the Hessian is block-diagonal in the outputs
    y3 = torch.randn(40, 2, generator=g, dtype=torch.float64)
    r3 = jaccli.curvature(_linear(3, 2), x, y3, loss="mse", matrix=matrix, full=True)
    W = (2 / 80) * torch.kron(torch.eye(2), x.T @ x)
    np.testing.assert_allclose(r3.full[:6, :6], W.numpy(), rtol=1e-12, atol=1e-12)
    s = jaccli.curvature(_linear(3, 2), x, y3, loss="mse", matrix=matrix, full=True, reduction="sum")
    np.testing.assert_allclose(s.full, r3.full * 80, rtol=1e-12, atol=1e-10)


def test_the_loss_value_is_torchs():
    x, g = _data()
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    net = _linear(3, 2)
    for red in ("mean", "sum"):
        r = jaccli.grads(net, x, y, loss="mse", reduction=red)
        assert r.loss_value == pytest.approx(float(nn.functional.mse_loss(net(x).detach(), y, reduction=red)), rel=1e-13)
    labels = torch.randint(0, 2, (40,), generator=g)
    r = jaccli.grads(net, x, labels, loss="cross-entropy")
    assert r.loss_value == pytest.approx(float(nn.functional.cross_entropy(net(x).detach(), labels)), rel=1e-13)


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_logistic_regression_bce(matrix):
    x, g = _data()
    y = (torch.rand(40, 1, generator=g, dtype=torch.float64) > 0.5).double()
    net = _linear(3, 1)
    r = jaccli.curvature(net, x, y, loss="bce", matrix=matrix, full=True)
    s = torch.sigmoid(net(x)).detach()[:, 0]
    xt = _tilde(x)
    H = (xt.T * (s * (1 - s))) @ xt / 40
    np.testing.assert_allclose(r.full, H.numpy(), rtol=1e-11, atol=1e-13)


def _softmax_hessian(x, net, mass=None):
    p = torch.softmax(net(x), 1).detach()
    xt = _tilde(x)
    n, c = p.shape
    d = x.shape[1]
    P = c * d + c
    H = torch.zeros(P, P, dtype=torch.float64)
    for i in range(n):
        A = torch.diag(p[i]) - torch.outer(p[i], p[i])
        if mass is not None:
            A = A * mass[i]
        # weight [C, d] row-major, then bias [C]: index (c, j) -> c·d + j
        K = torch.kron(A, torch.outer(xt[i], xt[i]))  # (c, j∈d+1)
        idx = [cc * (d + 1) + j for cc in range(c) for j in range(d)]
        bidx = [cc * (d + 1) + d for cc in range(c)]
        order = idx + bidx
        H += K[order][:, order]
    return H / n


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_softmax_regression_cross_entropy_with_classes_and_probabilities(matrix):
    x, g = _data()
    net = _linear(3, 4)
    labels = torch.randint(0, 4, (40,), generator=g)
    r = jaccli.curvature(net, x, labels, loss="cross-entropy", matrix=matrix, full=True)
    np.testing.assert_allclose(r.full, _softmax_hessian(x, net).numpy(), rtol=1e-10, atol=1e-13)
    probs = torch.softmax(torch.randn(40, 4, generator=g, dtype=torch.float64), 1)
    r = jaccli.curvature(net, x, probs, loss="cross-entropy", matrix=matrix, full=True)
    np.testing.assert_allclose(r.full, _softmax_hessian(x, net).numpy(), rtol=1e-10, atol=1e-13)
    # nll on a log_softmax output is the same objective, and its GGN the same Fisher
    lognet = nn.Sequential()
    lognet.add_module("0", net)
    lognet.add_module("1", nn.LogSoftmax(1))
    r2 = jaccli.curvature(lognet, x, labels, loss="nll", matrix=matrix, full=True)
    np.testing.assert_allclose(r2.full, _softmax_hessian(x, net).numpy(), rtol=1e-10, atol=1e-13)


class Gaussian(nn.Module):
    """log N(x | μ, σ²) per sample, parameters μ and log σ."""

    def __init__(self, mu, log_sigma):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor([mu], dtype=torch.float64))
        self.log_sigma = nn.Parameter(torch.tensor([log_sigma], dtype=torch.float64))

    def forward(self, x):
        s = self.log_sigma.exp()
        return (-0.5 * ((x[:, 0] - self.mu) / s) ** 2 - self.log_sigma - 0.5 * math.log(2 * math.pi))


@pytest.mark.parametrize("matrix", ["hessian", "ef"])
def test_gaussian_log_likelihood_at_its_mle_information_and_standard_errors(matrix):
    x = torch.randn(500, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 1
    mu, sigma = float(x.mean()), float(x.std(unbiased=False))
    r = jaccli.curvature(Gaussian(mu, math.log(sigma)), x, loss="log-likelihood", matrix=matrix, full=True,
                         standard_errors=True)
    assert r.reduction == "sum"
    if matrix == "hessian":
        np.testing.assert_allclose(r.full, np.diag([500 / sigma**2, 2 * 500]), rtol=1e-10, atol=1e-8)
        np.testing.assert_allclose(r.standard_errors, [sigma / math.sqrt(500), 1 / math.sqrt(1000)], rtol=1e-10)
        assert r.loss_value == pytest.approx(500 * (math.log(sigma) + 0.5 * math.log(2 * math.pi) + 0.5), rel=1e-12)
    else:  # outer product of scores: the same information in expectation, here close (kurtosis of a Gaussian)
        np.testing.assert_allclose(r.standard_errors, [sigma / math.sqrt(500), 1 / math.sqrt(1000)], rtol=0.15)


def test_an_information_that_is_not_positive_definite_is_refused():
    x = torch.randn(50, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with pytest.raises(jaccli.NumericalError, match="not positive definite|singular") as e:
        jaccli.curvature(Gaussian(5.0, 3.0), x, loss="log-likelihood", standard_errors=True)  # far from the MLE
    assert e.value.exit_code == 5


class Redundant(nn.Module):
    """μ = a + b: two parameters where one is identified, a singular information."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.25], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.25], dtype=torch.float64))

    def forward(self, x):
        return -0.5 * (x[:, 0] - self.a - self.b) ** 2


def test_a_singular_information_is_refused_as_singular():
    x = torch.randn(50, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x - x.mean() + 0.5  # the MLE of a + b is 0.5
    with pytest.raises(jaccli.NumericalError, match="singular") as e:
        jaccli.curvature(Redundant(), x, loss="log-likelihood", standard_errors=True)
    assert "smallest eigenvalue" in str(e.value)


def test_the_docstring_examples_run_and_jaccli_curvature_is_callable_as_package_and_function():
    import doctest
    import importlib

    for name in ("jaccli.curvature.api", "jaccli.curvature.gradients"):
        failed, attempted = doctest.testmod(importlib.import_module(name))
        assert attempted >= 1 and failed == 0, name
    import jaccli.curvature  # binds the name to the package: it still computes

    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    r = jaccli.curvature(nn.Linear(1, 1).double(), x, x, loss="mse", full=True)
    np.testing.assert_allclose(r.full, [[1.0, 1.0], [1.0, 2.0]])
    assert "curvature" in jaccli.__all__ and "grads" in jaccli.__all__ and callable(jaccli.grads)
