"""The engine's public functions against closed forms, finite differences and torch.autograd."""

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

TOL = dict(rtol=1e-10, atol=1e-10)
MODES = ["forward", "reverse", "auto"]


def _exact_hessian_problems():
    return [p for p in PROBLEMS if p.hessian is not None]


# ----------------------------------------------------------------- closed forms


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_per_sample_jacobian_matches_closed_form(problem, mode, chunk_size):
    x = problem.points(5)
    got = jaccli.jacobian(problem.f, x, per_sample=True, mode=mode, chunk_size=chunk_size)
    want = problem.per_point(problem.jacobian, x)
    assert got.shape == (5, *problem.out_shape, *problem.point_shape)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("problem", _exact_hessian_problems(), ids=lambda p: p.name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_per_sample_hessian_matches_closed_form(problem, mode, chunk_size):
    x = problem.points(4)
    got = jaccli.hessian(problem.f, x, per_sample=True, mode=mode, chunk_size=chunk_size)
    want = problem.per_point(problem.hessian, x)
    assert got.shape == (4, *problem.out_shape, *problem.point_shape, *problem.point_shape)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("problem", _exact_hessian_problems(), ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_per_sample_laplacian_matches_closed_form(problem, mode):
    x = problem.points(4)
    got = jaccli.laplacian(problem.f, x, per_sample=True, mode=mode, chunk_size=3)
    want = problem.per_point(problem.laplacian, x)
    assert got.shape == (4, *problem.out_shape)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("problem", [p for p in PROBLEMS if p.square], ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_per_sample_divergence_matches_closed_form(problem, mode):
    x = problem.points(6)
    got = jaccli.divergence(problem.f, x, per_sample=True, mode=mode, chunk_size=4)
    want = problem.per_point(problem.divergence, x)
    assert got.shape == (6,)
    torch.testing.assert_close(got, want, **TOL)


def test_polar_coordinates_in_closed_form():
    r, th = 2.0, math.pi / 6
    x = torch.tensor([[r, th]], dtype=torch.float64)
    polar = BY_NAME["polar"].f
    J = jaccli.jacobian(polar, x, per_sample=True)[0]
    c, s = math.cos(th), math.sin(th)
    torch.testing.assert_close(J, torch.tensor([[c, -r * s], [s, r * c]], dtype=torch.float64), **TOL)
    assert float(torch.linalg.det(J)) == pytest.approx(r, rel=1e-12)  # the area element r
    div = jaccli.divergence(polar, x, per_sample=True)
    assert float(div[0]) == pytest.approx(c + r * c, rel=1e-12)
    lap = jaccli.laplacian(polar, x, per_sample=True)[0]
    torch.testing.assert_close(lap, torch.tensor([-r * c, -r * s], dtype=torch.float64), **TOL)


# ----------------------------------------------------------------- whole-input semantics


def test_linear_map_whole_input_is_the_matrix():
    A = torch.randn(5, 3, dtype=torch.float64)
    for mode in MODES:
        torch.testing.assert_close(jaccli.jacobian(lambda v: A @ v, torch.zeros(3, dtype=torch.float64), mode=mode), A)


def test_quadratic_form_hessian_is_a_plus_a_transpose():
    A = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64)
    for mode in MODES:
        torch.testing.assert_close(jaccli.hessian(lambda v: v @ A @ v, x, mode=mode), A + A.T, **TOL)
    assert float(jaccli.laplacian(lambda v: v @ A @ v, x)) == pytest.approx(float(2 * A.trace()), rel=1e-12)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 2, 2)])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_whole_input_matches_autograd_functional(shape, mode):
    torch.manual_seed(0)
    W = torch.randn(4, math.prod(shape), dtype=torch.float64)

    def f(x):
        return torch.tanh(W @ x.reshape(-1)).reshape(2, 2) * x.sum()

    x = torch.randn(shape, dtype=torch.float64)
    want_j = torch.autograd.functional.jacobian(f, x)
    got_j = jaccli.jacobian(f, x, mode=mode, chunk_size=2)
    assert got_j.shape == (2, 2, *shape)
    torch.testing.assert_close(got_j, want_j, **TOL)

    def scalar(x):
        return f(x).sum()

    want_h = torch.autograd.functional.hessian(scalar, x)
    got_h = jaccli.hessian(scalar, x, mode=mode, chunk_size=3)
    assert got_h.shape == (*shape, *shape)
    torch.testing.assert_close(got_h, want_h, **TOL)


def test_per_sample_equals_the_diagonal_blocks_of_the_whole_jacobian():
    net = tanh_mlp((3, 8, 2))
    x = torch.randn(5, 3, dtype=torch.float64)
    whole = jaccli.jacobian(net, x)  # [5, 2, 5, 3]
    per = jaccli.jacobian(net, x, per_sample=True)  # [5, 2, 3]
    diag = torch.stack([whole[i, :, i, :] for i in range(5)])
    torch.testing.assert_close(per, diag, **TOL)
    off = whole.clone()
    for i in range(5):
        off[i, :, i, :] = 0
    assert float(off.abs().max()) == 0.0


# ----------------------------------------------------------------- finite differences


@pytest.mark.parametrize("act", ["tanh", "silu", "softplus", "gelu", "sigmoid"])
def test_mlp_jacobian_and_hessian_match_float64_finite_differences(act):
    net = tanh_mlp((3, 12, 12, 2), act=act, seed=3)
    x = torch.randn(4, 3, dtype=torch.float64)
    J = jaccli.jacobian(net, x, per_sample=True)
    H = jaccli.hessian(net, x, per_sample=True)
    for i in range(4):
        fd_j = fd_jacobian(lambda v: net(v[None])[0], x[i])
        torch.testing.assert_close(J[i], fd_j, rtol=1e-7, atol=1e-8)
        fd_h = fd_jacobian(lambda v: jaccli.jacobian(lambda u: net(u[None])[0], v), x[i], h=1e-5)
        torch.testing.assert_close(H[i], fd_h, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------- several inputs and outputs


def g_two(t, x):
    """g(t, x) = sin(t) x² with t [k] and x [k, 2, 3]."""
    return torch.sin(t)[:, None, None] * x**2


def test_two_argument_model_with_respect_to_either_and_both():
    t = torch.rand(4, dtype=torch.float64)
    x = torch.rand(4, 2, 3, dtype=torch.float64)
    jt = jaccli.jacobian(g_two, (t, x), wrt="t", per_sample=True)
    jx = jaccli.jacobian(g_two, (t, x), wrt="x", per_sample=True)
    both = jaccli.jacobian(g_two, {"t": t, "x": x}, wrt=["t", "x"], per_sample=True)
    assert jt.shape == (4, 2, 3) and jx.shape == (4, 2, 3, 2, 3)
    torch.testing.assert_close(jt, torch.cos(t)[:, None, None] * x**2, **TOL)
    eye = torch.eye(6, dtype=torch.float64).reshape(2, 3, 2, 3)
    torch.testing.assert_close(jx, (2 * torch.sin(t)[:, None, None] * x)[..., None, None] * eye, **TOL)
    torch.testing.assert_close(both[0], jt, **TOL)
    torch.testing.assert_close(both[1], jx, **TOL)


def test_hessian_blocks_for_several_inputs():
    def f(a, b):
        return (a**2).sum(-1) * b[:, 0]

    a = torch.rand(3, 2, dtype=torch.float64)
    b = torch.rand(3, 1, dtype=torch.float64)
    (haa, hab), (hba, hbb) = jaccli.hessian(f, (a, b), wrt=(0, 1), per_sample=True)
    assert haa.shape == (3, 2, 2) and hab.shape == (3, 2, 1) and hbb.shape == (3, 1, 1)
    torch.testing.assert_close(haa, 2 * b[:, 0, None, None] * torch.eye(2, dtype=torch.float64), **TOL)
    torch.testing.assert_close(hab[..., 0], 2 * a, **TOL)
    torch.testing.assert_close(hba[:, 0, :], 2 * a, **TOL)
    torch.testing.assert_close(hbb, torch.zeros_like(hbb), **TOL)


def test_several_inputs_need_wrt():
    with pytest.raises(jaccli.UsageError, match="say which to differentiate"):
        jaccli.jacobian(g_two, (torch.rand(2), torch.rand(2, 2, 3)))


def test_output_selection_from_tuples_and_dicts():
    def tup(x):
        return x * 2, x**2

    def dct(x):
        return {"a": x * 2, "b": x**2}

    x = torch.rand(3, 2, dtype=torch.float64)
    torch.testing.assert_close(jaccli.divergence(tup, x, per_sample=True, output=1), (2 * x).sum(-1))
    torch.testing.assert_close(jaccli.divergence(dct, x, per_sample=True, output="a"), torch.full((3,), 4.0, dtype=torch.float64))
    with pytest.raises(jaccli.ModelError, match="returns 2 outputs"):
        jaccli.jacobian(tup, x, per_sample=True)
    with pytest.raises(jaccli.ModelError, match="one of a, b"):
        jaccli.jacobian(dct, x, per_sample=True, output="c")


# ----------------------------------------------------------------- properties

SMOOTH = ["tanh", "sigmoid", "softplus", "gelu", "elu"]


@st.composite
def mlps(draw, square=False):
    n_in = draw(st.integers(1, 4))
    n_out = n_in if square else draw(st.integers(1, 4))
    hidden = draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))
    act = draw(st.sampled_from(SMOOTH))
    net = tanh_mlp((n_in, *hidden, n_out), act=act, seed=draw(st.integers(0, 10_000)))
    n = draw(st.integers(1, 5))
    x = torch.randn(n, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return net, x


PROPERTY = settings(max_examples=20, deadline=None)


@PROPERTY
@given(case=mlps(), mode=st.sampled_from(["forward", "reverse"]))
def test_property_hessian_is_symmetric_and_its_trace_is_the_laplacian(case, mode):
    net, x = case
    H = jaccli.hessian(net, x, per_sample=True, mode=mode)
    torch.testing.assert_close(H, H.transpose(-1, -2), rtol=1e-12, atol=1e-12)
    L = jaccli.laplacian(net, x, per_sample=True, mode=mode)
    torch.testing.assert_close(L, H.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-10, atol=1e-12)


@PROPERTY
@given(case=mlps(square=True), mode=st.sampled_from(["forward", "reverse"]))
def test_property_divergence_is_the_trace_of_the_jacobian(case, mode):
    net, x = case
    J = jaccli.jacobian(net, x, per_sample=True, mode=mode)
    D = jaccli.divergence(net, x, per_sample=True, mode=mode)
    torch.testing.assert_close(D, J.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-10, atol=1e-12)


@PROPERTY
@given(case=mlps(), chunk=st.integers(1, 4))
def test_property_per_sample_is_the_diagonal_of_the_whole_jacobian(case, chunk):
    net, x = case
    whole = jaccli.jacobian(net, x, chunk_size=chunk)  # [N, out, N, in]
    per = jaccli.jacobian(net, x, per_sample=True, chunk_size=chunk)
    idx = torch.arange(x.shape[0])
    torch.testing.assert_close(per, whole[idx, :, idx, :], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per, jaccli.jacobian(net, x, per_sample=True, mode="reverse"), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- devices


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian", "divergence"])
def test_cuda_matches_cpu(kind):
    net = tanh_mlp((3, 16, 3))
    x = torch.randn(64, 3, dtype=torch.float64)
    cpu = getattr(jaccli, kind)(net, x, per_sample=True)
    gpu = getattr(jaccli, kind)(net.cuda(), x.cuda(), per_sample=True)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, **TOL)
