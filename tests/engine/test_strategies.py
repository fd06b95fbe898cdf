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


# ----------------------------------------------------------------- reverse-mode Hessian
# torch.func's forward over reverse: where the Taylor engine applies, a Hessian's reverse
# mode is its Hessian by adjoints (tests/jets/test_adjoint.py), so these run without it


@pytest.fixture
def torch_func_only(monkeypatch):
    monkeypatch.setattr(planner, "FAST_PATH", False)


@pytest.mark.parametrize("kind", ["hessian", "laplacian"])
def test_reverse_second_derivatives_share_each_tangent_among_the_outputs(kind, monkeypatch, torch_func_only):
    """Forward over reverse takes one direction per input (each tangent serves every output),
    not one per (output, input) pair; exact against autograd's Hessian in float64, with the
    directions split over many passes and points over several chunks."""
    from torch.autograd.functional import hessian

    net = tanh_mlp((5, 16, 16, 3))
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(planner, "working_budget", lambda device, free=None: 1)  # one direction per pass
    plan = jaccli.plan(kind, net, x, per_sample=True, mode="reverse", chunk_size=3)
    assert plan.mode == "reverse" and plan.directions == 5 and plan.directions_per_pass == 1
    got = getattr(jaccli, kind)(net, x, per_sample=True, mode="reverse", chunk_size=3)
    want = torch.stack([
        torch.stack([hessian(lambda v: net(v[None])[0, o], xi) for o in range(3)]) for xi in x
    ])  # fmt: skip
    if kind == "laplacian":
        want = want.diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reverse_hessian_memory_counts_every_output_of_a_direction(monkeypatch, torch_func_only):
    """A shared tangent holds all the outputs' products at once: the planner sizes a pass for
    ``n_out`` products per direction (8 here), not one."""
    from dataclasses import replace

    net, x = tanh_mlp((5, 16, 8)), torch.randn(4, 5, dtype=torch.float64)
    shared = jaccli.plan("hessian", net, x, per_sample=True, mode="reverse")
    key = ("hessian", "reverse")
    monkeypatch.setitem(STRATEGIES, key, replace(STRATEGIES[key], width=lambda p: 1))
    single = jaccli.plan("hessian", net, x, per_sample=True, mode="reverse")
    assert (shared.directions_per_pass, shared.points_per_chunk) == (single.directions_per_pass, single.points_per_chunk)
    assert shared.peak_bytes - shared.result_bytes > 6 * (single.peak_bytes - single.result_bytes)


def test_reverse_hessian_through_silu_stays_forward_over_reverse(torch_func_only):
    """SiLU's backward has no forward-mode formula of its own, only torch's jvp
    decomposition: the chunk loop's no_grad must not switch that off (the request would go
    to reverse over reverse, with a warning, at 2-4x the time)."""
    from torch.autograd.functional import hessian

    net = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", jaccli.JaccliWarning)
        got = jaccli.hessian(net, x, per_sample=True, mode="reverse")
    want = torch.stack([torch.stack([hessian(lambda v: net(v[None])[0, o], xi) for o in range(2)]) for xi in x])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not got.requires_grad  # the parameters' graph is not kept
