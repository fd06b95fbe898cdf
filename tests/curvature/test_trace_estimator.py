"""The trace estimator of :func:`jaccli.curvature.spectral.trace_estimate` on synthetic symmetric
matrices of known trace, against the exact variance of Hutchinson's estimator from as many
Rademacher products, ``Var(zᵀAz) = 2(‖A‖²_F − Σ Aᵢᵢ²)`` (float64, fixed seeds)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import nn

import jaccli
from problems import diagonal_se, hutchinson_se, trace_se_bound
from jaccli.curvature import api, spectral

P, PRODUCTS, SEEDS = 300, 60, range(80)


def _matrix(eigenvalues: np.ndarray, seed: int = 7) -> np.ndarray:
    # a random rotation: a diagonal matrix would make Rademacher Hutchinson exact
    u, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues), len(eigenvalues))))
    return (u * eigenvalues) @ u.T


@functools.cache
def _runs(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The matrix of spectrum ``name``, the estimates' errors and their standard errors (shared by the tests)."""
    a = _matrix(SPECTRA[name])
    return (a, *_errors(a))


def _errors(a: np.ndarray, products: int = PRODUCTS) -> tuple[np.ndarray, np.ndarray]:
    op, exact = aslinearoperator(a), float(np.trace(a))
    runs = [spectral.trace_estimate(op, products, seed=s)[:2] for s in SEEDS]
    return np.array([t - exact for t, _ in runs]), np.array([se for _, se in runs])


SPECTRA = {
    "flat positive": np.random.default_rng(0).uniform(0.5, 1.5, P),
    "flat indefinite": np.random.default_rng(1).standard_normal(P),
    "power decay 1/i^0.75": 1.0 / np.arange(1, P + 1) ** 0.75,
    "power decay 1/i": 1.0 / np.arange(1, P + 1),
    "power decay 1/i²": 1.0 / np.arange(1, P + 1) ** 2,
    "geometric decay 0.9^i": 0.9 ** np.arange(P),
    "geometric decay 0.8^i": 0.8 ** np.arange(P),
}


@pytest.mark.parametrize("name", ["flat positive", "flat indefinite"])
def test_on_a_flat_spectrum_about_as_accurate_as_hutchinson_per_product(name):
    """Plain Hutch++ spends two thirds of its products on a sketch that captures nothing here
    (about 1.7× Hutchinson's standard error); the estimator must not."""
    a, err, _ = _runs(name)
    rms = math.sqrt(np.mean(err**2))
    assert rms <= 1.3 * hutchinson_se(a, PRODUCTS)


@pytest.mark.parametrize(("name", "factor"), [("power decay 1/i^0.75", 0.8), ("power decay 1/i", 0.5), ("geometric decay 0.9^i", 0.5),
                                              ("power decay 1/i²", 0.05), ("geometric decay 0.8^i", 0.1)])  # fmt: skip
def test_on_a_decaying_spectrum_better_than_hutchinson(name, factor):
    """The sketch's share grows with the decay: 0.6× Hutchinson's error at 1/i^0.75 (where a
    cruder choice took Hutchinson), 0.29× at 1/i, 0.016× at 1/i²."""
    a, err, _ = _runs(name)
    assert math.sqrt(np.mean(err**2)) <= factor * hutchinson_se(a, PRODUCTS)


@pytest.mark.parametrize("rank", [1, 5])
def test_exact_for_a_matrix_of_rank_below_the_sketch(rank):
    lam = np.r_[np.random.default_rng(2).uniform(1, 2, rank), np.zeros(P - rank)]
    a = _matrix(lam)
    err, se = _errors(a)
    assert np.max(np.abs(err)) <= 1e-10 * lam.sum() and np.max(se) <= 1e-10 * lam.sum()


@pytest.mark.parametrize("name", list(SPECTRA))
def test_the_standard_error_is_calibrated(name):
    """Each estimate within 4 of its own standard errors, and the standard errors on average
    within a factor 1.5 of the errors' root mean square."""
    _, err, se = _runs(name)
    assert np.all(np.abs(err) < 4 * se)
    assert 1 / 1.5 <= math.sqrt(np.mean(se**2)) / math.sqrt(np.mean(err**2)) <= 1.5


def test_with_the_whole_space_in_the_sketch_the_trace_is_exact():
    a = _matrix(SPECTRA["flat indefinite"][:20])
    t, se = spectral.trace_estimate(aslinearoperator(a), 3 * 20, seed=0)[:2]
    assert t == pytest.approx(np.trace(a), rel=1e-12, abs=1e-12) and se < 1e-10


@pytest.mark.parametrize(("name", "method"), [("flat positive", "Hutchinson"), ("geometric decay 0.8^i", "Hutch++")])
def test_the_estimate_names_the_estimator_it_chose(name, method):
    a = _matrix(SPECTRA[name])
    assert spectral.trace_estimate(aslinearoperator(a), PRODUCTS, seed=0)[2] == method


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_on_a_model_in_its_own_dtype_against_the_float64_trace(monkeypatch, dtype):
    """The products, probes and QR in the model's dtype; the trace against the float64 matrix's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 3), torch.randint(0, 3, (64,))
    full = jaccli.curvature(net.double(), x.double(), y, loss="cross-entropy", full=True).full
    exact = float(np.trace(full))
    monkeypatch.setattr(api, "EXACT_LIMIT", 0)
    for seed in range(5):
        r = jaccli.curvature(net.to(dtype), x.to(dtype), y, loss="cross-entropy", trace=True, samples=30, seed=seed,
                             trace_method="products")  # the parameter-space estimators (an MLP would take its layers')
        # within its own standard errors, and that error no larger than the estimators allow
        assert abs(r.trace - exact) < 4 * r.trace_stderr <= 8 * trace_se_bound(full, 30)
        assert r.trace_estimator in ("Hutch++", "Hutchinson")
        assert any(n.startswith(f"the trace is a {r.trace_estimator} estimate") for n in r.notes)
        assert r.as_dict()["trace_estimator"] == r.trace_estimator


@pytest.mark.parametrize("name", ["flat indefinite", "power decay 1/i"])
def test_the_diagonal_and_its_standard_errors_are_calibrated(name):
    """:func:`spectral.hutchinson_diagonal` over 40 seeds: the errors of every entry about the
    exact standard error (``Σⱼ≠ᵢ Aᵢⱼ²`` per probe), and the reported ones about it too."""
    a = _matrix(SPECTRA[name][:120])
    op, sigma = aslinearoperator(a), diagonal_se(a, PRODUCTS).numpy()
    runs = [spectral.hutchinson_diagonal(op, PRODUCTS, seed=s) for s in range(40)]
    err = np.stack([d for d, _ in runs]) - np.diag(a)  # [seeds, entries]
    se = np.stack([s for _, s in runs])
    z = err / sigma
    assert 0.8 <= math.sqrt(np.mean(z**2)) <= 1.25 and np.mean(np.abs(z) < 2) >= 0.93
    assert 0.9 <= math.sqrt(np.mean(se**2)) / math.sqrt(np.mean(sigma**2)) <= 1.1
    assert np.all(se <= 1.6 * sigma) and np.all(se >= 0.5 * sigma)
