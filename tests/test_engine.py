"""The derivative engine against closed forms, finite differences and torch.autograd."""

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


# ----------------------------------------------------------------- planning


@pytest.mark.parametrize(
    "kind,n_in,n_out,mode",
    [
        ("jacobian", 1, 501, "forward"),
        ("jacobian", 2048, 32, "reverse"),
        ("jacobian", 3, 3, "forward"),
        ("hessian", 1, 501, "forward"),
        ("hessian", 10, 1, "reverse"),
        ("laplacian", 10, 1, "forward"),
    ],
)
def test_auto_mode_picks_fewer_products(kind, n_in, n_out, mode):
    net = nn.Linear(n_in, n_out)
    assert jaccli.plan(kind, net, torch.zeros(4, n_in), per_sample=True).mode == mode


def test_plan_bounds_chunks_by_memory(monkeypatch):
    monkeypatch.setattr(planner, "working_budget", lambda device: 4 * 2**20)
    net = tanh_mlp((1, 64, 64, 501), dtype=torch.float32)
    p = jaccli.plan("hessian", net, torch.zeros(100_000, 1), per_sample=True)
    assert p.points_per_chunk < 100_000 and p.chunks > 1
    assert p.peak_bytes - p.result_bytes <= 4 * 2**20 * 1.5
    assert p.result_shape == (100_000, 501, 1, 1)
    # and the chunked result equals the unchunked one
    x = torch.rand(300, 1)
    small = jaccli.hessian(net, x, per_sample=True)
    monkeypatch.setattr(planner, "working_budget", lambda device: 64 * 2**10)
    assert jaccli.plan("hessian", net, x, per_sample=True).chunks > 1
    torch.testing.assert_close(jaccli.hessian(net, x, per_sample=True), small)


def test_every_strategy_is_reachable():
    kinds = {k for k, _ in STRATEGIES}
    assert kinds == {"jacobian", "hessian", "divergence", "laplacian", "hutchinson"}


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
