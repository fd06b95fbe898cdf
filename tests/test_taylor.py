"""The Taylor fast path (jaccli.taylor) against torch.func, closed forms, and the engine with it off.

"torch.func" below always means the engine's own strategies with the fast path switched
off, so every comparison is between the two engines on the same request. Tolerances are
relative to the largest entry of the reference: 1e-12 in float64, 1e-6 in float32.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaccli
from jaccli.engine import planner
from jaccli import taylor
from problems import BY_NAME, EXAMPLES, PROBLEMS, save_export, save_torchscript, tanh_mlp

REL = {torch.float32: 1e-6, torch.float64: 1e-12}
KINDS = ("jacobian", "hessian", "laplacian", "divergence")


def assert_rel(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= REL[dtype] * max(scale, torch.finfo(dtype).tiny), f"max error {err:.3g} at scale {scale:.3g}"


def torch_func(kind: str, f, x, **kwargs):
    """The same request with the fast path off (advice about kinks in the model silenced)."""
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", jaccli.JaccliWarning)
        mp.setattr(planner, "FAST_PATH", False)
        assert jaccli.plan(kind, f, x, **{k: v for k, v in kwargs.items() if k != "seed"}).engine == "torch.func"
        return getattr(jaccli, kind)(f, x, **kwargs)


def square(f, x) -> bool:
    with torch.no_grad():
        return f(x[:2]).shape[1:] == x.shape[1:]


# ----------------------------------------------------------------- one case per supported op

_g = torch.Generator().manual_seed(7)
C = torch.randn(3, 3, generator=_g, dtype=torch.float64)
c = torch.randn(3, generator=_g, dtype=torch.float64)
EXPO = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
BASE = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)


def _b(x):
    return x.shape[0]


def _mlp3():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


# name -> (f: [B, 3] -> [B, m] for points in (0.5, 1.5), ATen ops its trace must contain)
OP_CASES = {
    "tanh": (torch.tanh, {"tanh"}),
    "sigmoid": (torch.sigmoid, {"sigmoid"}),
    "sin-cos": (lambda x: torch.sin(x) * torch.cos(2 * x), {"sin", "cos"}),
    "tan": (lambda x: torch.tan(x - 1), {"tan"}),
    "sinh-cosh": (lambda x: torch.sinh(x) + torch.cosh(x * x), {"sinh", "cosh"}),
    "exp-expm1": (lambda x: torch.exp(-x) + torch.expm1(x), {"exp", "expm1"}),
    "log-log1p": (lambda x: torch.log(x) * torch.log1p(x), {"log", "log1p"}),
    "sqrt-rsqrt": (lambda x: torch.sqrt(x) + torch.rsqrt(x + 1), {"sqrt", "rsqrt"}),
    "reciprocal": (torch.reciprocal, {"reciprocal"}),
    "atan-erf": (lambda x: torch.atan(x) + torch.erf(x - 1), {"atan", "erf"}),
    "softplus": (lambda x: F.softplus(4 * x - 4, beta=2.0, threshold=1.5), {"softplus"}),  # both branches
    "silu": (lambda x: F.silu(2 * x - 2), {"silu"}),
    "gelu": (lambda x: F.gelu(2 * x - 2), {"gelu"}),
    "gelu-tanh": (lambda x: F.gelu(2 * x - 2, approximate="tanh"), {"gelu"}),
    "elu": (lambda x: F.elu(2 * x - 2, alpha=0.7), {"elu"}),
    "selu": (lambda x: torch.selu(2 * x - 2), {"elu"}),
    "leaky_relu": (lambda x: F.leaky_relu(x - 1, 0.1) * x, {"leaky_relu"}),
    "abs": (lambda x: torch.abs(x - 1) * x, {"abs"}),
    "relu": (lambda x: torch.relu(x - 1) * x, {"relu"}),
    "hardtanh": (lambda x: F.hardtanh(4 * x - 4) * x, {"hardtanh"}),
    "clamp": (lambda x: torch.clamp(x - 1, -0.2, 0.3) * x, {"clamp"}),
    "clamp-min-max": (lambda x: torch.clamp_min(x, 1.0) * torch.clamp_max(x, 1.0), {"clamp_min", "clamp_max"}),
    "pow": (lambda x: x**3 + x**0.5 + x**0 + x**1 + torch.square(x), {"pow"}),
    "pow-base": (lambda x: 2.0**x + BASE**x, {"pow"}),
    "pow-tensor": (lambda x: x**EXPO, {"pow"}),
    "view": (lambda x: (x.reshape(_b(x), 3, 1) * x.reshape(_b(x), 1, 3)).reshape(_b(x), -1), {"view", "mul"}),
    "flatten-batch": (lambda x: torch.tanh(x.reshape(-1)).reshape(_b(x), 3), {"view"}),
    "t-transpose": (lambda x: torch.tanh(x.t()).t() + x[:, :, None].transpose(1, 2)[:, 0], {"t", "transpose"}),
    "permute": (lambda x: (x[:, :, None] * x[:, None, :]).permute(0, 2, 1).reshape(_b(x), 9), {"permute"}),
    "squeeze": (lambda x: torch.sin(x[:, None, :, None]).squeeze(1).squeeze() * x, {"squeeze", "unsqueeze"}),
    "expand": (lambda x: x[:, :1].expand(-1, 3) * x, {"expand"}),
    "slice-select": (lambda x: torch.cat([x[:, 1:] * x[:, :2], x[:, 0:1] * x[:, 2, None]], 1), {"slice", "select"}),
    "diagonal": (lambda x: (x[:, :, None] * x[:, None, :]).diagonal(dim1=1, dim2=2), {"diagonal"}),
    "clone-alias": (lambda x: torch.ops.aten.alias(x.clone()) * x, {"clone", "alias"}),
    "to-copy": (lambda x: x.float().double() * x, {"_to_copy"}),
    "split": (lambda x: (lambda a, b, cc: a * b + cc)(*torch.tanh(x).split(1, dim=1)), {"split", "getitem"}),
    "split-sizes": (lambda x: (lambda a, b: a * b[:, :1] + b[:, 1:])(*x.split([1, 2], dim=1)), {"split_with_sizes"}),
    "unbind-stack": (lambda x: (lambda a, b, cc: torch.stack([a * b, cc], 1))(*x.unbind(1)), {"unbind", "stack"}),
    "neg": (lambda x: -(x * x), {"neg"}),
    "sum-mean": (lambda x: (x * x).sum(1, keepdim=True) + torch.sin(x).mean(-1, keepdim=True) * x, {"sum", "mean"}),
    "index": (lambda x: x.index_select(1, torch.tensor([2, 0])) * x[:, [1, 2]], {"index_select", "index"}),
    "flip-roll": (lambda x: x.flip(1) * x.roll(1, 1), {"flip", "roll"}),
    "repeat": (lambda x: x.repeat(1, 2) * torch.cat([x, x * x], 1), {"repeat"}),
    "cat-const": (lambda x: torch.cat([x, torch.ones(_b(x), 1, dtype=x.dtype), torch.sin(x)], 1) * 2, {"cat"}),
    "where": (lambda x: torch.where(x > 1, x**2, 3 * x), {"where", "gt"}),
    "add-sub": (lambda x: x + torch.sin(x) + 1.5 + c - 2 * torch.exp(x) - c, {"add", "sub"}),
    "affine-plus-curved": (lambda x: x @ C + torch.tanh(x), {"add"}),  # a sum with a zero second-order term
    "rsub": (lambda x: (1 - x) * x, {"rsub"}),
    "div": (lambda x: x / c + c / x + torch.sin(x) / torch.exp(x) + x / 2, {"div"}),
    "mm": (lambda x: torch.tanh(x @ C) @ C.T + (C @ x.T).T, {"mm"}),
    "bmm": (lambda x: (x[:, :, None] @ torch.tanh(x)[:, None, :]).reshape(_b(x), 9), {"bmm", "_unsafe_view"}),
    "bmm-const": (lambda x: (x[:, None, :] @ C.expand(_b(x), 3, 3)).reshape(_b(x), 3), {"bmm"}),
    "mv": (lambda x: (x @ c)[:, None] * x, {"mv"}),
    "addmm": (_mlp3(), {"addmm"}),
    "baddbmm": (lambda x: torch.baddbmm(x[:, :, None], x[:, :, None], x[:, None, :]).reshape(_b(x), 9), {"baddbmm"}),
    "addmv": (lambda x: torch.addmv(x[:, 0], x, c, beta=0.5, alpha=2.0)[:, None] * x, {"addmv"}),
    "detach": (lambda x: x * torch.sin(x).detach(), {"detach"}),
    "sign-floor": (lambda x: x * torch.sign(x - 1) + x * torch.floor(3 * x), {"sign", "floor"}),
}


def _points(n: int = 5, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) + 0.5).to(dtype)


@functools.cache
def _program(name: str) -> taylor.TaylorProgram:
    return taylor.build(OP_CASES[name][0], _points())


@pytest.mark.parametrize("name", list(OP_CASES))
def test_each_op_matches_torch_func_in_float64(name):
    f, ops = OP_CASES[name]
    program = _program(name)
    assert ops <= program.ops()
    x = _points()
    assert_rel(program.jacobian(x), torch_func("jacobian", f, x, per_sample=True).reshape(5, -1, 3))
    want_h = torch_func("hessian", f, x, per_sample=True).reshape(5, -1, 3, 3)
    assert_rel(program.hessian(x), want_h)
    assert_rel(program.hessian(x, directions=2), want_h)  # pairs split over passes
    want_l = torch_func("laplacian", f, x, per_sample=True).reshape(5, -1)
    assert_rel(program.laplacian(x), want_l)
    assert_rel(program.laplacian(x, directions=2), want_l)
    if square(f, x):
        assert_rel(program.divergence(x, directions=2), torch_func("divergence", f, x, per_sample=True))


def test_every_rule_is_exercised_by_an_op_case():
    seen = set().union(*(_program(name).ops() for name in OP_CASES))
    assert set(taylor.RULES) <= seen


def test_values_and_arbitrary_tangents_match_the_model_and_torch_func():
    f = OP_CASES["div"][0]
    x = _points()
    v = torch.randn(4, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    program = _program("div")
    assert_rel(program.value(x), f(x))
    want = torch.stack([torch.func.jvp(f, (x,), (vi,))[1] for vi in v])
    assert_rel(program.jvp(x, v), want)


# ----------------------------------------------------------------- the public API


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_closed_forms_through_the_fast_path(problem, chunk_size):
    x = problem.points(5)
    kw = dict(per_sample=True, mode="forward", chunk_size=chunk_size)
    assert jaccli.plan("hessian", problem.f, x, **kw).engine == "taylor"
    assert_rel(jaccli.jacobian(problem.f, x, **kw), problem.per_point(problem.jacobian, x))
    assert_rel(jaccli.laplacian(problem.f, x, **kw), problem.per_point(problem.laplacian, x))
    assert_rel(jaccli.hessian(problem.f, x, **kw), problem.per_point(problem.hessian, x))
    if problem.square:
        assert_rel(jaccli.divergence(problem.f, x, **kw), problem.per_point(problem.divergence, x))


def _saved(tmp_path, fmt: str, dtype: torch.dtype, sizes=(2, 16, 16, 2)):
    net = tanh_mlp(sizes, dtype=dtype, seed=11)
    path = tmp_path / f"net.{fmt}"
    if fmt == "pt":
        save_torchscript(net, path)
    else:
        save_export(net, torch.zeros(4, sizes[0], dtype=dtype), path)
    return jaccli.load_model(path)


@pytest.mark.parametrize("fmt", ["pt", "pt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saved_models_match_torch_func_over_many_chunks(tmp_path, fmt, dtype):
    model = _saved(tmp_path, fmt, dtype)
    x = torch.randn(11, 2, dtype=dtype, generator=torch.Generator().manual_seed(2))
    for kind in KINDS:
        p = jaccli.plan(kind, model, x, per_sample=True, chunk_size=3)
        assert (p.engine, p.mode, p.chunks) == ("taylor", "forward", 4)
        got = getattr(jaccli, kind)(model, x, per_sample=True, chunk_size=3)
        assert_rel(got, torch_func(kind, model, x, per_sample=True), dtype)


@pytest.mark.parametrize("path", ["pinn.pt", "pinn.pt2", "ode.pt2", "field.pt", "potential.pt2"])
def test_shipped_examples_match_torch_func_in_float32(path):
    model = jaccli.load_model(EXAMPLES / path)
    x = torch.rand(40, 1 if path.startswith(("pinn", "ode")) else 3, generator=torch.Generator().manual_seed(3))
    for kind in ("jacobian", "hessian", "laplacian") + (("divergence",) if path.startswith("field") else ()):
        kw = dict(per_sample=True, mode="forward")
        assert jaccli.plan(kind, model, x, **kw).engine == "taylor"
        got = getattr(jaccli, kind)(model, x, chunk_size=16, **kw)
        assert_rel(got, torch_func(kind, model, x, **kw), torch.float32)


def test_fast_path_on_equals_off_for_every_kind_and_hutchinson():
    field = BY_NAME["field"]
    x = field.points(9)
    for kind in KINDS:
        assert_rel(getattr(jaccli, kind)(field.f, x, per_sample=True), torch_func(kind, field.f, x, per_sample=True))
    kw = dict(per_sample=True, estimator="hutchinson", probes=6, seed=3)
    assert jaccli.plan("divergence", field.f, x, **{k: v for k, v in kw.items() if k != "seed"}).engine == "taylor"
    fast, slow = jaccli.divergence(field.f, x, **kw), torch_func("divergence", field.f, x, **kw)
    assert_rel(fast.value, slow.value)
    assert_rel(fast.stderr, slow.stderr)


def test_a_single_point_per_chunk_keeps_the_batch_axis():
    f = OP_CASES["squeeze"][0]
    x = _points(3)
    assert_rel(jaccli.hessian(f, x, per_sample=True, mode="forward", chunk_size=1),
               torch_func("hessian", f, x, per_sample=True))  # fmt: skip


# ----------------------------------------------------------------- when the fast path is not used


def test_an_op_without_a_rule_falls_back_and_names_the_op():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh()).double()
    x = _points(6)
    with pytest.raises(taylor.Unsupported) as info:
        taylor.build(net, x)
    assert info.value.op == "native_layer_norm"
    p = jaccli.plan("hessian", net, x, per_sample=True, mode="forward")
    assert p.engine == "torch.func" and "native_layer_norm" in p.engine_note
    assert p.as_dict()["engine_note"] == p.engine_note
    assert_rel(jaccli.hessian(net, x, per_sample=True, mode="forward"), torch_func("hessian", net, x, per_sample=True, mode="forward"))


def test_data_dependent_control_flow_falls_back():
    def branchy(x):
        return torch.sin(x) if bool(x.sum() > 0) else x

    x = _points()
    with pytest.raises(taylor.Unsupported, match="reads input values into Python"):
        taylor.build(branchy, x)
    p = jaccli.plan("jacobian", branchy, x, per_sample=True)
    assert p.engine == "torch.func" and "_local_scalar_dense" in p.engine_note
    assert_rel(jaccli.jacobian(branchy, x, per_sample=True), torch.diag_embed(torch.cos(x)))


def test_in_place_and_random_ops_are_refused_by_name():
    def in_place(x):
        y = torch.sin(x)
        y.mul_(2)
        return y

    with pytest.raises(taylor.Unsupported, match="in-place op aten.mul_") as info:
        taylor.build(in_place, _points())
    assert info.value.op == "mul_"
    with pytest.raises(taylor.Unsupported, match="random op aten.rand"):
        taylor.build(lambda x: x + 1e-3 * torch.rand(3, dtype=x.dtype), _points())
    x = _points()
    p = jaccli.plan("jacobian", in_place, x, per_sample=True)
    assert p.engine == "torch.func" and "mul_" in p.engine_note
    assert_rel(jaccli.jacobian(in_place, x, per_sample=True), torch.diag_embed(2 * torch.cos(x)))


def test_batch_size_used_out_of_proportion_is_refused():
    with pytest.raises(taylor.Unsupported, match="not in proportion"):
        taylor.build(lambda x: x * (x.shape[0] + 1), _points())


def test_a_wrong_rule_is_caught_by_verification(monkeypatch):
    def bad_tanh(x, order, out):  # drops the square in 1 - tanh²
        y = torch.tanh(x)
        return y, 1 - y, (-y if order == 2 else None)

    monkeypatch.setitem(taylor.RULES, "tanh", taylor.Rule(taylor._unary(bad_tanh), taylor._nonlinear))
    net = _mlp3()
    x = _points()
    with pytest.raises(taylor.Unsupported, match="disagree with torch.func"):
        taylor.build(net, x)
    p = jaccli.plan("jacobian", net, x, per_sample=True)
    assert p.engine == "torch.func" and "disagree" in p.engine_note
    assert_rel(jaccli.jacobian(net, x, per_sample=True), torch_func("jacobian", net, x, per_sample=True))


@pytest.mark.parametrize(
    "kind,n_in,n_out,kwargs,engine_",
    [
        ("jacobian", 32, 64, {}, "taylor"),  # tall: forward mode
        ("jacobian", 64, 4, {}, "torch.func"),  # wide: auto picks reverse, which the fast path is not
        ("jacobian", 3, 3, {"mode": "reverse"}, "torch.func"),
        ("hessian", 6, 1, {}, "torch.func"),  # auto: forward-over-reverse has fewer products
        ("hessian", 6, 1, {"mode": "forward"}, "taylor"),
        ("laplacian", 6, 1, {}, "taylor"),
        ("jacobian", 3, 3, {"per_sample": False}, "torch.func"),
    ],
)
def test_the_fast_path_replaces_forward_mode_only(kind, n_in, n_out, kwargs, engine_):
    net = tanh_mlp((n_in, 8, n_out), seed=1)
    x = torch.randn(4, n_in, dtype=torch.float64)
    kwargs = {"per_sample": True, **kwargs}
    p = jaccli.plan(kind, net, x, **kwargs)
    assert p.engine == engine_ and p.engine_note is None
    if engine_ == "taylor":
        assert_rel(getattr(jaccli, kind)(net, x, **kwargs), torch_func(kind, net, x, **kwargs))


def test_several_inputs_and_static_batches_use_torch_func(tmp_path):
    p = jaccli.plan("jacobian", lambda a, b: a * b, (torch.ones(3, 2), torch.ones(3, 2)), wrt=0, per_sample=True)
    assert p.engine == "torch.func"
    path = save_export(tanh_mlp((2, 4, 2), dtype=torch.float32), torch.zeros(4, 2), tmp_path / "s.pt2", dynamic=False)
    assert jaccli.plan("jacobian", jaccli.load_model(path), torch.zeros(10, 2), per_sample=True).engine == "torch.func"


def test_fast_path_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(planner, "FAST_PATH", False)
    assert jaccli.plan("jacobian", torch.tanh, _points(), per_sample=True).engine == "torch.func"


# ----------------------------------------------------------------- planning


def test_small_budgets_split_points_and_directions(monkeypatch):
    net = tanh_mlp((20, 32, 32, 1), seed=2)
    x = torch.randn(50, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = torch_func("laplacian", net, x, per_sample=True)
    monkeypatch.setattr(planner, "working_budget", lambda device: 64 * 2**10)
    p = jaccli.plan("laplacian", net, x, per_sample=True)
    assert p.engine == "taylor" and p.directions == 20
    assert p.directions_per_pass < 20 and p.points_per_chunk < 50
    assert p.peak_bytes - p.result_bytes <= 64 * 2**10 * 1.5
    assert_rel(jaccli.laplacian(net, x, per_sample=True), want)


def test_memory_estimate_follows_the_rows_each_kind_keeps():
    program = taylor.build(tanh_mlp((20, 32, 1), seed=2), torch.randn(4, 20, dtype=torch.float64))
    one, many = program.bytes_per_point("laplacian", 1), program.bytes_per_point("laplacian", 20)
    # 19 more first-order rows of width 32 in float64, in at least one live layer
    assert many - one >= 19 * 32 * 8
    # after the last tanh a Laplacian keeps one collapsed row, a Jacobian one row per direction
    lap = program.schedule(taylor.WANT["laplacian"]).layouts
    jac = program.schedule(taylor.WANT["jacobian"]).layouts
    tanh = next(i for i, s in enumerate(program.steps) if s.name == "tanh")
    assert lap[tanh] == taylor.Layout(False, False, True) and jac[tanh] == taylor.Layout(False, True, False)
    assert program.bytes_per_point("laplacian", 20) < program.bytes_per_point("jacobian", 20)


def test_chunk_size_sets_points_per_pass():
    p = jaccli.plan("hessian", tanh_mlp((2, 8, 3), seed=0), torch.zeros(10, 2, dtype=torch.float64),
                    per_sample=True, mode="forward", chunk_size=4)  # fmt: skip
    assert (p.engine, p.points_per_chunk, p.chunks) == ("taylor", 4, 3)
    with pytest.raises(jaccli.UsageError, match="chunk size must be positive"):
        jaccli.plan("jacobian", torch.tanh, _points(), per_sample=True, chunk_size=0)
