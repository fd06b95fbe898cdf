"""Normalising a request: preconditions, batch independence, model failures and result diagnostics."""

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


# ----------------------------------------------------------------- preconditions and diagnostics


def test_divergence_needs_a_square_jacobian():
    with pytest.raises(jaccli.ModelError, match="square Jacobian"):
        jaccli.divergence(BY_NAME["linear"].f, torch.rand(3, 3, dtype=torch.float64), per_sample=True)


def test_relu_hessian_warns_that_it_is_identically_zero():
    net = tanh_mlp((2, 8, 1), act="relu")
    x = torch.randn(5, 2, dtype=torch.float64)
    with pytest.warns(jaccli.JaccliWarning, match="identically zero .*relu"):
        H = jaccli.hessian(net, x, per_sample=True)
    assert not H.any()
    with pytest.warns(jaccli.JaccliWarning, match="identically zero"):
        jaccli.laplacian(net, x, per_sample=True)


def test_relu_before_a_smooth_layer_warns_about_kinks():
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1), nn.Softplus()).double()
    with pytest.warns(jaccli.JaccliWarning, match="uses relu"):
        H = jaccli.hessian(net, torch.randn(5, 2, dtype=torch.float64), per_sample=True)
    assert H.any()


def test_smooth_model_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaccli.hessian(tanh_mlp(), torch.randn(3, 3, dtype=torch.float64), per_sample=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double().train(),
        lambda: (lambda x: x - x.mean(0)),
        lambda: (lambda x: x - x.mean(0).detach()),
        lambda: (lambda x: x.flip(0)),
    ],
    ids=["batchnorm-train", "centering", "detached-centering", "flip"],
)
def test_models_that_mix_batch_elements_are_refused(make):
    model = make()
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(jaccli.ModelError, match="mixes batch elements"):
        jaccli.jacobian(model, x, per_sample=True)
    if isinstance(model, nn.Module):  # running statistics change under the transform: never differentiable
        with pytest.raises(jaccli.ModelError, match="in-place"):
            jaccli.jacobian(model, x, per_sample=True, check_batch=False)
    else:  # the user may insist
        assert jaccli.jacobian(model, x, per_sample=True, check_batch=False).shape == (6, 3, 3)


def test_batchnorm_in_eval_mode_is_accepted():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double().eval()
    jaccli.jacobian(net, torch.randn(6, 3, dtype=torch.float64), per_sample=True)


def test_single_point_still_checks_batch_mixing():
    with pytest.raises(jaccli.ModelError, match="mixes batch"):
        jaccli.jacobian(lambda x: x - x.mean(0), torch.randn(1, 3, dtype=torch.float64), per_sample=True)


def test_output_must_keep_the_batch_axis():
    with pytest.raises(jaccli.ModelError, match="axis 0 of the output"):
        jaccli.jacobian(lambda x: x.sum(0), torch.randn(4, 3), per_sample=True)


def test_model_failure_names_the_shapes():
    net = nn.Linear(3, 2)
    with pytest.raises(jaccli.ModelError, match=r"failed on input \[.*, 5\]"):
        jaccli.jacobian(net, torch.randn(4, 5), per_sample=True)


def test_dtype_mismatch_is_explained():
    with pytest.raises(jaccli.UsageError, match="differ in dtype"):
        jaccli.jacobian(nn.Linear(3, 2), torch.randn(4, 3, dtype=torch.float64), per_sample=True)


def test_integer_input_is_refused_by_the_api():
    with pytest.raises(jaccli.UsageError, match="float32 or float64"):
        jaccli.jacobian(lambda x: x * 2, torch.arange(3))


def test_non_finite_results_warn_or_fail_when_strict():
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    with pytest.warns(jaccli.JaccliWarning, match="NaN or Inf"):
        jaccli.jacobian(torch.sqrt, x, per_sample=True)
    with pytest.raises(jaccli.NumericalError):
        jaccli.jacobian(torch.sqrt, x, per_sample=True, strict=True)


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([3e38, 3e38, 1.0], True),  # finite, but the float32 sum overflows: checked entry by entry
        ([1.0, float("inf"), -float("inf")], False),  # the infinities cancel into a NaN sum
        ([1.0, float("nan")], False),
        ([-float("inf"), 2.0], False),
    ],
)
def test_the_inputs_finiteness_check(values, finite):
    import warnings

    x = torch.tensor(values, dtype=torch.float32)[:, None]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        jaccli.jacobian(lambda v: v * 2, x, per_sample=True)
    said = any("input" in str(w.message) and "NaN or Inf" in str(w.message) for w in seen)
    assert said == (not finite)
    if not finite:
        with pytest.raises(jaccli.NumericalError, match="holds NaN or Inf"):
            jaccli.jacobian(lambda v: v * 2, x, per_sample=True, strict=True)


def test_result_too_large_is_refused_before_any_derivative():
    calls = []

    def f(x):
        calls.append(1)
        return x * 2

    x = torch.zeros(100_000)
    with pytest.raises(jaccli.ResourceError, match="would not fit in memory") as info:
        jaccli.jacobian(f, x)
    assert "GiB" in str(info.value) and "--per-sample" in str(info.value) or "per_sample" in str(info.value)
    assert len(calls) == 1  # the probe only


def test_unknown_mode_and_kind():
    with pytest.raises(jaccli.UsageError, match="unknown mode"):
        jaccli.jacobian(torch.sin, torch.zeros(2), mode="sideways")
    with pytest.raises(jaccli.UsageError, match="unknown derivative"):
        jaccli.plan("curl", torch.sin, torch.zeros(2))


def test_batch_check_allows_the_rounding_of_a_float32_model_fed_float64():
    # a float32 layer gives point 0 alone and in a batch outputs that differ by float32's
    # rounding (other BLAS kernels), not by float64's: that is no coupling of the points
    for seed in range(5):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(12, 3)
        x = torch.randn(64, 12, dtype=torch.float64)
        assert jaccli.jacobian(lambda x: lin(x.float()), x, per_sample=True).shape == (64, 3, 12)
