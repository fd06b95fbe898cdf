"""The torch.func strategies: the Hutchinson estimator and its counter-based Rademacher probes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import jaccli
from jaccli.engine import planner
from jaccli.engine.strategies import STRATEGIES, rademacher
from problems import BY_NAME, PROBLEMS, fd_jacobian, tanh_mlp


# ----------------------------------------------------------------- Hutchinson


def _symmetric_field(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A + A.T
    return A, (lambda x: x @ A)


def test_hutchinson_is_unbiased_with_honest_standard_errors():
    A, f = _symmetric_field()
    x = torch.randn(400, 6, dtype=torch.float64)
    est = jaccli.divergence(f, x, per_sample=True, estimator="hutchinson", probes=40, seed=7)
    z = (est.value - A.trace()) / est.stderr
    assert abs(float(z.mean())) < 0.25  # 400 points: the mean z-score has sd 0.05
    assert 0.85 < float(z.std()) < 1.2


def test_hutchinson_variance_matches_rademacher_theory():
    A, f = _symmetric_field(n=5, seed=2)
    k = 10
    x = torch.zeros(2000, 5, dtype=torch.float64)  # every point is an independent estimate
    est = jaccli.divergence(f, x, per_sample=True, estimator="hutchinson", probes=k, seed=11)
    theory = 2 * (float((A**2).sum()) - float((A.diagonal() ** 2).sum())) / k
    assert float(est.value.var()) == pytest.approx(theory, rel=0.15)
    assert float(est.value.mean()) == pytest.approx(float(A.trace()), abs=4 * math.sqrt(theory / 2000))


def test_hutchinson_does_not_depend_on_chunking_or_mode():
    net = tanh_mlp((4, 8, 4))
    x = torch.randn(9, 4, dtype=torch.float64)
    a = jaccli.divergence(net, x, per_sample=True, estimator="hutchinson", probes=6, seed=3)
    b = jaccli.divergence(net, x, per_sample=True, estimator="hutchinson", probes=6, seed=3, chunk_size=2)
    c = jaccli.divergence(net, x, per_sample=True, estimator="hutchinson", probes=6, seed=3, mode="reverse")
    d = jaccli.divergence(net, x, per_sample=True, estimator="hutchinson", probes=6, seed=4)
    torch.testing.assert_close(a.value, b.value)
    torch.testing.assert_close(a.value, c.value)
    assert not torch.equal(a.value, d.value)


def test_hutchinson_is_exact_for_a_scaled_identity():
    est = jaccli.divergence(lambda v: 3 * v, torch.ones(20, dtype=torch.float64), estimator="hutchinson", probes=4)
    assert float(est.value) == 60.0 and float(est.stderr) == 0.0


def test_rademacher_probes_are_balanced_and_uncorrelated():
    like = torch.zeros((), dtype=torch.float64)
    v = rademacher(5, torch.arange(4000), torch.arange(3), 4, like)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert float(v.mean(0).abs().max()) < 0.06  # 4000 draws: sd 0.016
    corr = torch.einsum("kbi,kbj->bij", v, v) / 4000
    off = corr - torch.eye(4, dtype=torch.float64)
    assert float(off.abs().max()) < 0.06


def test_hutchinson_needs_two_probes():
    with pytest.raises(jaccli.UsageError, match="at least 2 probes"):
        jaccli.divergence(lambda v: v, torch.ones(3), estimator="hutchinson", probes=1)
