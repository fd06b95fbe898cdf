"""Taylor programs through the public API: closed forms, saved models, fall-backs and planning."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaccli
from jaccli import jets as taylor
from jaccli.jets import fold
from jaccli.engine import planner
from jaccli.jets.elementwise import _nonlinear, _unary
from compare import KINDS, REL, assert_rel, mlp3, points, square, torch_func
from problems import BY_NAME, EXAMPLES, PROBLEMS, save_export, save_torchscript, tanh_mlp


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
    def f(x):
        return torch.sin(x[:, None, :, None]).squeeze(1).squeeze() * x

    x = points(3)
    assert_rel(jaccli.hessian(f, x, per_sample=True, mode="forward", chunk_size=1),
               torch_func("hessian", f, x, per_sample=True))  # fmt: skip


# ----------------------------------------------------------------- when the fast path is not used


class LogGamma(nn.Module):
    def forward(self, x):
        return torch.lgamma(2 + x * x)  # lgamma has no Taylor rule (nor a decomposition)


def test_an_op_without_a_rule_falls_back_and_names_the_op():
    net = nn.Sequential(nn.Linear(3, 4), LogGamma(), nn.Tanh()).double()
    x = points(6)
    with pytest.raises(taylor.Unsupported) as info:
        taylor.build(net, x)
    assert info.value.op == "lgamma"
    p = jaccli.plan("hessian", net, x, per_sample=True, mode="forward")
    assert p.engine == "torch.func" and "lgamma" in p.engine_note
    assert p.as_dict()["engine_note"] == p.engine_note
    assert_rel(jaccli.hessian(net, x, per_sample=True, mode="forward"), torch_func("hessian", net, x, per_sample=True, mode="forward"))


def test_data_dependent_control_flow_falls_back():
    def branchy(x):
        return torch.sin(x) if bool(x.sum() > 0) else x

    x = points()
    with pytest.raises(taylor.Unsupported, match="reads input values into Python"):
        taylor.build(branchy, x)
    p = jaccli.plan("jacobian", branchy, x, per_sample=True)
    assert p.engine == "torch.func" and "_local_scalar_dense" in p.engine_note
    assert_rel(jaccli.jacobian(branchy, x, per_sample=True), torch.diag_embed(torch.cos(x)))


def test_in_place_updates_of_fresh_tensors_replay_out_of_place():
    def fresh(x):  # as nn.RMSNorm does: mean(x²).add_(eps)
        y = torch.sin(x)
        y.mul_(2)
        return y * y.add_(1)

    x = points()
    assert jaccli.plan("hessian", fresh, x, per_sample=True).engine == "taylor"
    s, c = torch.sin(x), torch.cos(x)  # fresh(x) = (2 sin x + 1)², both factors being the updated y
    assert_rel(jaccli.jacobian(fresh, x, per_sample=True), torch.diag_embed(4 * c * (2 * s + 1)))
    assert_rel(jaccli.hessian(fresh, x, per_sample=True), torch.diag_embed(torch.diag_embed(8 * c * c - 4 * s * (2 * s + 1))))


def test_in_place_updates_of_read_tensors_replay_out_of_place():
    def read_then_updated(x):
        y = torch.sin(x)
        z = y * 3  # recorded with y before the update: the replay's z reads the old y too
        y.mul_(2)
        return y + z

    x = points()
    assert jaccli.plan("hessian", read_then_updated, x, per_sample=True).engine == "taylor"
    assert_rel(jaccli.jacobian(read_then_updated, x, per_sample=True), torch.diag_embed(5 * torch.cos(x)))
    assert_rel(jaccli.hessian(read_then_updated, x, per_sample=True), torch.diag_embed(torch.diag_embed(-5 * torch.sin(x))))


def test_in_place_updates_of_views_replay_while_nothing_reads_what_they_changed():
    def gates(x):  # as ATen's LSTM cell: chunks of one tensor activated in place, the whole never read again
        h = torch.cat([x, x * x], 1)
        a, b = h.unsafe_chunk(2, 1)
        a.sigmoid_()
        b.tanh_()
        return a * b

    x = points()
    assert jaccli.plan("hessian", gates, x, per_sample=True).engine == "taylor"
    want = lambda x: torch.tanh(x * x) * torch.sigmoid(x)  # noqa: E731
    assert_rel(jaccli.jacobian(gates, x, per_sample=True), torch_func("jacobian", want, x, per_sample=True))
    assert_rel(jaccli.hessian(gates, x, per_sample=True), torch_func("hessian", want, x, per_sample=True))


def test_in_place_and_random_ops_are_refused_by_name():
    def in_place(x):
        y = torch.sin(x)
        y[:, :1].mul_(2)  # an update through a view changes y too: the replay's y would not change
        return y

    with pytest.raises(taylor.Unsupported, match="aten.mul_ updated in place through another tensor sharing its memory") as info:
        taylor.build(in_place, points())
    assert info.value.op == "mul_"
    with pytest.raises(taylor.Unsupported, match="random op aten.rand"):
        taylor.build(lambda x: x + 1e-3 * torch.rand(3, dtype=x.dtype), points())
    x = points()
    p = jaccli.plan("jacobian", in_place, x, per_sample=True)
    assert p.engine == "torch.func" and "mul_" in p.engine_note
    scale = torch.ones(x.shape[1], dtype=x.dtype)
    scale[0] = 2
    assert_rel(jaccli.jacobian(in_place, x, per_sample=True), torch.diag_embed(scale * torch.cos(x)))


def test_batch_size_used_out_of_proportion_is_refused():
    with pytest.raises(taylor.Unsupported, match="not in proportion"):
        taylor.build(lambda x: x * (x.shape[0] + 1), points())


def test_a_traces_batch_size_arithmetic_is_replayed_at_the_batch_at_hand():
    # torch.jit.trace keeps x.shape[0] + 1 as ops on a 0-dim tensor made outside the
    # dispatcher (prim::NumToTensor): the replay makes it from the batch it runs at
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda x: torch.sin(x).reshape(x.shape[0] * 3, 1) * (x.shape[0] + 1), points(2))
    program = taylor.build(lambda z: traced(z).reshape(z.shape[0], -1), points(2))
    x = points(5)
    assert_rel(program.value(x), 6 * torch.sin(x))
    v = torch.randn(1, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    assert_rel(program.jvp(x, v)[0], 6 * torch.cos(x) * v[0])


def test_a_wrong_rule_is_caught_by_verification(monkeypatch):
    def bad_tanh(x, order, out):  # drops the square in 1 - tanh²
        y = torch.tanh(x)
        return y, [1 - y, -y][:order]

    monkeypatch.setitem(taylor.RULES, "tanh", taylor.Rule(_unary(bad_tanh), _nonlinear))
    net = mlp3()
    x = points()
    with pytest.raises(taylor.Unsupported, match="disagree with autograd"):
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
        ("hessian", 6, 1, {}, "taylor"),  # small input: Taylor's 27 streams beat 6 Hessian-vector products
        ("hessian", 32, 1, {}, "taylor"),  # wide input: the Hessian by adjoints (reverse) is cheaper
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
    assert p.engine == engine_
    if "mode" in kwargs or not kwargs["per_sample"] or engine_ == "taylor":
        assert p.engine_note is None  # the fast path was never in question
    else:  # auto mode chose reverse: the note says why, and how to get the fast path
        assert p.engine_note.startswith("reverse mode: ") and "--mode forward" in p.engine_note
    if engine_ == "taylor":
        assert_rel(getattr(jaccli, kind)(net, x, **kwargs), torch_func(kind, net, x, **kwargs))


def test_several_inputs_and_static_batches_use_torch_func(tmp_path):
    p = jaccli.plan("jacobian", lambda a, b: a * b, (torch.ones(3, 2), torch.ones(3, 2)), wrt=0, per_sample=True)
    assert p.engine == "torch.func"
    path = save_export(tanh_mlp((2, 4, 2), dtype=torch.float32), torch.zeros(4, 2), tmp_path / "s.pt2", dynamic=False)
    assert jaccli.plan("jacobian", jaccli.load_model(path), torch.zeros(10, 2), per_sample=True).engine == "torch.func"


def test_fast_path_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(planner, "FAST_PATH", False)
    assert jaccli.plan("jacobian", torch.tanh, points(), per_sample=True).engine == "torch.func"


# ----------------------------------------------------------------- planning


def test_small_budgets_split_points_and_directions(monkeypatch):
    net = tanh_mlp((20, 32, 32, 1), seed=2)
    x = torch.randn(50, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = torch_func("laplacian", net, x, per_sample=True)
    monkeypatch.setattr(planner, "working_budget", lambda device, free=None: 64 * 2**10)
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
        jaccli.plan("jacobian", torch.tanh, points(), per_sample=True, chunk_size=0)


def test_a_model_answering_in_another_dtype_writes_into_the_callers_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)  # float32 inside a float64 request
    f = lambda x: torch.tanh(lin(x.float()))  # noqa: E731
    x = torch.rand(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    program = taylor.build(f, x)
    for kind in ("jacobian", "hessian"):
        shape = (x.shape[0], 3, 4) if kind == "jacobian" else (x.shape[0], 3, 4, 4)
        got = getattr(program, kind)(x, directions=2, out=torch.empty(shape, dtype=torch.float64))
        want = getattr(program, kind)(x)  # float32, in one pass
        assert got.dtype == torch.float64 and torch.equal(got.float(), want)
    h = jaccli.hessian(f, x, per_sample=True, mode="forward")
    assert h.dtype == torch.float64
    assert_rel(h.float(), torch_func("hessian", f, x, per_sample=True, mode="forward").float(), torch.float32)


def test_indices_of_max_pooling_are_values_not_streams():
    def f(x):
        y, i = F.max_pool2d(torch.sin(x.reshape(-1, 2, 4, 4)), 2, 2, return_indices=True)
        m = torch.min(y.flatten(2), 2)
        return torch.tanh(y * y + i.to(x.dtype) * 0.01).flatten(1) + m.indices.to(x.dtype).sum(1, keepdim=True)

    x = torch.rand(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaccli.JaccliWarning)  # max pooling's kinks
        assert jaccli.plan("hessian", f, x, per_sample=True, mode="forward").engine == "taylor"
        got = jaccli.hessian(f, x, per_sample=True, mode="forward")
    assert_rel(got, torch_func("hessian", f, x, per_sample=True, mode="reverse"))


def test_kept_seeds_are_bounded_by_what_they_hold():
    # a Hessian's passes keep [columns, n_in] one-hot rows each: a wide input's set-up is made
    # per call, however small n_in² looks, and a sweep of request shapes keeps a few at most
    from types import SimpleNamespace

    from jaccli.jets.program import TaylorProgram
    from jaccli.jets.seeds import _KEEP_SEEDS

    holder = SimpleNamespace(_seed_cache={})
    small = lambda: [(torch.arange(4), torch.eye(4))]  # noqa: E731
    wide = lambda: [(torch.arange(256), torch.zeros(256, 256))] * 2  # noqa: E731
    assert TaylorProgram._seeds(holder, ("small",), small) is TaylorProgram._seeds(holder, ("small",), small)
    assert 2 * 256 * 256 > _KEEP_SEEDS
    TaylorProgram._seeds(holder, ("wide",), wide)
    assert ("wide",) not in holder._seed_cache
    for k in range(20):
        TaylorProgram._seeds(holder, ("small", k), small)
    assert len(holder._seed_cache) <= 8


@pytest.mark.parametrize("pattern", ["first-layer", "first-rows"])
@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian"])
def test_results_do_not_move_a_bit_with_the_chunk_size(kind, pattern, monkeypatch, fresh_programs, runs):
    # a resumed stream must equal a whole run, so no rule may choose its formula by the
    # size of a block (which is the chunk's): 300-point chunks against one pass, float32;
    # with no folded weights allowed the first layer is made by the "first-rows" fold instead
    if pattern == "first-rows":
        monkeypatch.setattr(fold, "MAX_FOLDED_BYTES", 0)
    net = tanh_mlp((3, 16, 16, 4), dtype=torch.float32, seed=3)
    x = torch.randn(3000, 3, generator=torch.Generator().manual_seed(3))
    fn = getattr(jaccli, kind)
    assert torch.equal(fn(net, x, per_sample=True, chunk_size=300), fn(net, x, per_sample=True))
    assert runs[pattern] > 0 and not runs["first-layer" if pattern == "first-rows" else "first-rows"]


class _FirstConv(nn.Module):
    """A convolution of the input itself (its points reshaped to images), then tanh and a head."""

    def __init__(self, dims: int, pad: bool = False) -> None:
        super().__init__()
        torch.manual_seed(30 + dims)
        conv = nn.Conv1d(2, 3, 3, padding=1, stride=2) if dims == 1 else nn.Conv2d(2, 4, 2, padding=1, groups=2)
        self.conv = conv.double()
        self.head = nn.LazyLinear(2).double()
        self.pad = pad

    def forward(self, x):  # [B, 2, 5] or [B, 2, 2, 3]
        if self.pad:  # a causal convolution's left padding (the value's constant: 0.5)
            x = F.pad(x, (2, 0), value=0.5)
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("dims", [1, 2, "1-padded"])
def test_the_first_convolution_of_the_seed_convolves_its_rows_once(monkeypatch, dims):
    # the seed's first-order rows are the same at every point, through the reshape to images:
    # the convolution takes them once beside the value's images, not once per point
    from jaccli.jets import spatial

    seeded = []
    original = spatial._seeded_convolution
    monkeypatch.setattr(spatial, "_seeded_convolution", lambda *a: seeded.append(1) or original(*a))
    padded = dims == "1-padded"
    dims = 1 if padded else dims
    f = _FirstConv(dims, padded)
    x = torch.randn(7, 2, *((5,) if dims == 1 else (2, 3)), dtype=torch.float64, generator=torch.Generator().manual_seed(dims))
    f(x)  # the lazy head takes its size
    for kind in ("jacobian", "hessian", "laplacian"):
        got = getattr(jaccli, kind)(f, x, per_sample=True, mode="forward", chunk_size=3)
        assert_rel(got, torch_func(kind, f, x, per_sample=True, mode="forward"))
    assert len(seeded) >= 3 * 3  # every chunk of every kind
