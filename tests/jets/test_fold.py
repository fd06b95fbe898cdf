"""Folds (jets/fold.py): the first layer's constant rows folded into the second layer's GEMM.

Every derivative is compared with torch.func in float64 (the fast path off); each test also
says whether the fold ran, so that a pattern that silently stops matching fails here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import jaccli
from jaccli.jets import fold
from compare import assert_rel, torch_func
from problems import tanh_mlp

KINDS3 = ("jacobian", "hessian", "laplacian")


def _x(n_in: int, dtype=torch.float64, n: int = 7) -> torch.Tensor:
    return torch.randn(n, n_in, dtype=dtype, generator=torch.Generator().manual_seed(n_in))


@pytest.mark.parametrize("n_in", [1, 2, 3])
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "softplus"])
def test_first_layer_fold_is_exact_in_float64(fresh_programs, runs, monkeypatch, n_in, act):
    monkeypatch.setattr(fold, "MIN_ROWS", 1)  # one input folds too (the planner's choice aside)
    net = tanh_mlp((n_in, 9, 8, 7, 2), seed=n_in, act=act)
    x = _x(n_in)
    for kind in KINDS3:
        got = getattr(jaccli, kind)(net, x, per_sample=True, chunk_size=3)
        assert_rel(got, torch_func(kind, net, x, per_sample=True))
    assert runs["first-layer"] >= 3 * len(KINDS3)  # every chunk of every kind


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_fold_with_fewer_directions_per_pass(fresh_programs, runs, directions):
    # a pass over some columns (and some Hessian pairs) folds only its own rows
    net = tanh_mlp((3, 6, 5, 1), seed=3)
    x = _x(3)
    with pytest.MonkeyPatch.context() as mp:
        from jaccli.engine import choice

        real = choice.taylor_plan

        def split(*a, **k):
            from dataclasses import replace

            return replace(real(*a, **k), directions_per_pass=directions)

        # where the planner's function is looked up (patching planner's own name changed nothing)
        mp.setattr(choice, "taylor_plan", split)
        for kind in KINDS3:
            plan = jaccli.plan(kind, net, x, per_sample=True, mode="forward")
            assert plan.engine == "taylor" and plan.directions_per_pass == directions, kind
            assert_rel(getattr(jaccli, kind)(net, x, per_sample=True, plan=plan),
                       torch_func(kind, net, x, per_sample=True))  # fmt: skip
    assert runs["first-layer"] > 0


def test_float32_fold_against_float64(fresh_programs, runs):
    net64 = tanh_mlp((2, 50, 50, 50, 1), seed=5)
    net32 = tanh_mlp((2, 50, 50, 50, 1), seed=5, dtype=torch.float32)
    x = _x(2, n=300)
    for kind in KINDS3:
        got = getattr(jaccli, kind)(net32, x.float(), per_sample=True)
        want = torch_func(kind, net64, x, per_sample=True)
        err = float((got.double() - want).abs().max() / want.abs().max())
        assert err < 2e-5, (kind, err)
    assert runs["first-layer"] == len(KINDS3)


class _Skip(nn.Module):
    """The first layer's activation read twice (a skip connection): its rows must exist."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(2, 6), nn.Linear(6, 6), nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(h)) + h)


class _Sum(nn.Module):
    """The second product read by a sum (not only by an activation): folded, read as any jet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = nn.Linear(2, 6), nn.Linear(6, 6), nn.Linear(6, 1)

    def forward(self, x):
        u = self.b(torch.tanh(self.a(x)))
        return self.c(torch.tanh(u) + u)


class _Squared(nn.Module):
    """The first product fed ``x²``: its rows are not one-hot, the pass sees it and runs unfolded."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Linear(2, 6), nn.Linear(6, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x * x)))


class _PreTwice(nn.Module):
    """The first pre-activation read twice: its rows must exist."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Linear(2, 6), nn.Linear(6, 6)

    def forward(self, x):
        a = self.a(x)
        return (self.b(torch.tanh(a)) * a).sum(-1, keepdim=True)


@pytest.mark.parametrize("net, folds", [(_Sum(), True), (tanh_mlp((2, 6, 1), seed=2), True), (_Skip(), False),
                                        (_Squared(), False), (_PreTwice(), False)],
                         ids=["sum", "one-hidden", "skip", "squared", "pre-twice"])  # fmt: skip
def test_fold_applies_only_where_the_rows_are_not_needed(fresh_programs, runs, net, folds):
    net = net.double().eval()
    x = _x(2)
    for kind in KINDS3:
        assert_rel(getattr(jaccli, kind)(net, x, per_sample=True), torch_func(kind, net, x, per_sample=True))
    assert (runs["first-layer"] > 0) == folds


def _nested(net, x: torch.Tensor, names: list[str]) -> dict:
    """Partials of output 0 by nested ``jacfwd`` in float64, per point: ``u_x…`` and ``u_x…y…``."""
    from torch.func import jacfwd, vmap

    def u(p):
        return net(p.reshape(1, -1))[0, 0]

    out = {}
    for name in names:
        d = u
        for c in name[2:]:
            d = jacfwd(d)
        idx = [("x", "y").index(c) for c in name[2:]]
        out[name] = vmap(d)(x).reshape(x.shape[0], -1)[:, _flat(idx, x.shape[1])]
    return out


def _flat(idx: list[int], n: int) -> int:
    # nested jacfwd puts the innermost derivative last: d/dx_{i1} d/dx_{i2} … → index (i_k, …, i_1)
    f = 0
    for i in reversed(idx):
        f = f * n + i
    return f


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "softplus", "sin"])
def test_series_passes_fold_their_first_layer(fresh_programs, runs, act):
    # the seed's directions are constant (partials): the first activation's coefficients
    # f⁽ᵏ⁾(a)/k! go through the second layer's GEMM on weights diag(s cᵏ) W₂; tanh and sigmoid
    # by the ODE's unit recurrence, softplus and sin by their derivative tables
    net = tanh_mlp((1, 7, 6, 1), seed=4, act=act).requires_grad_(False)
    x = _x(1)
    names = ["u_xxxx", "u_xxx", "u_xx", "u_x"]
    got = jaccli.partials(net, x, names, inputs=["x"], outputs=["u"], per_sample=True, chunk_size=3)
    want = _nested(net, x, names)
    for name in names:
        assert_rel(torch.as_tensor(got[name]).reshape(-1), want[name].reshape(-1))
    assert runs["first-series"] == 3  # every chunk (one pass each), the one-point chunk too
    assert runs["first-layer"] == 0 and runs["first-rows"] == 0


def _no_bias_net():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(1, 6, bias=False), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 1))
    return net.double().eval().requires_grad_(False)


@pytest.mark.parametrize(
    "make,inputs,names",
    [
        # mm, not addmm, on both sides of the folded activation
        (_no_bias_net, ["x"], ["u_xxxx", "u_xx"]),
        # mixed partials of two inputs: several directions in one pass (one batched GEMM per order)
        (lambda: tanh_mlp((2, 7, 6, 1), seed=5).requires_grad_(False), ["x", "y"], ["u_xxyy", "u_xyy", "u_xy", "u_yyyy"]),
    ],
    ids=["without-biases", "several-directions"],
)
def test_series_passes_fold(fresh_programs, runs, make, inputs, names):
    net = make()
    x = _x(len(inputs))
    got = jaccli.partials(net, x, names, inputs=inputs, outputs=["u"], per_sample=True)
    want = _nested(net, x, names)
    for name in names:
        assert_rel(torch.as_tensor(got[name]).reshape(-1), want[name].reshape(-1))
    assert runs["first-series"] > 0


def test_series_of_arbitrary_tangents_run_unfolded(fresh_programs, runs):
    # directions that differ from point to point (a jvp's tangents): no constant rows to fold
    from jaccli import jets

    net = tanh_mlp((2, 7, 6, 3), seed=6).requires_grad_(False)
    x = _x(2)
    program = jets.build(net, x, orders=4)
    v = torch.randn(2, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    got = program.series(x, v, 4)
    for i in range(2):
        def line(t, i=i):
            return net(x + t * v[i])

        d = line
        for k in range(1, 5):
            d = _derivative(d)
            assert_rel(got[k][i], d(torch.zeros(())) / math.factorial(k))
    # one point's own direction is not a constant one either (a chunk of one point must
    # round as it does inside a larger chunk)
    one = program.series(x[:1], v[:, :1].clone(), 4)
    for k in range(1, 5):
        assert torch.equal(one[k], got[k][:, :1])
    assert runs["first-series"] == 0


def _derivative(f):
    from torch.func import jacfwd

    return jacfwd(f)


def test_series_fold_declines_where_the_first_product_is_not_fed_the_seed(fresh_programs, runs):
    net = _Squared().double().eval().requires_grad_(False)
    x = _x(2)
    names = ["u_xxxx", "u_xy"]
    got = jaccli.partials(net, x, names, inputs=["x", "y"], outputs=["u"], per_sample=True)
    want = _nested(net, x, names)
    for name in names:
        assert_rel(torch.as_tensor(got[name]).reshape(-1), want[name].reshape(-1))
    assert runs["first-series"] == 0


def test_series_results_do_not_move_a_bit_with_the_chunk_size(fresh_programs, runs):
    net = tanh_mlp((1, 16, 16, 1), dtype=torch.float32, seed=3).requires_grad_(False)
    x = torch.linspace(-2, 2, 3000)[:, None]
    a = jaccli.partials(net, x, ["u_xxxx"], inputs=["x"], outputs=["u"], per_sample=True, chunk_size=300)
    b = jaccli.partials(net, x, ["u_xxxx"], inputs=["x"], outputs=["u"], per_sample=True, chunk_size=3000)
    assert torch.equal(torch.as_tensor(a["u_xxxx"]), torch.as_tensor(b["u_xxxx"]))
    assert runs["first-series"] == 11


def test_one_row_per_order_runs_unfolded(fresh_programs, runs):
    # one input: each order has one row, and the fold would only split the GEMM (fold.MIN_ROWS)
    net = tanh_mlp((1, 6, 5, 3), seed=7)
    x = _x(1)
    for kind in KINDS3:
        assert_rel(getattr(jaccli, kind)(net, x, per_sample=True), torch_func(kind, net, x, per_sample=True))
    assert runs["first-layer"] == 0


def test_folded_weights_past_the_cap_run_unfolded(fresh_programs, runs, monkeypatch):
    # a wide first layer's folded weights would stream from memory: the pass keeps its rows
    monkeypatch.setattr(fold, "MAX_FOLDED_BYTES", 6 * 5 * 8 * 5 - 1)  # rows · n₁ · m · itemsize, one byte short
    net = tanh_mlp((2, 6, 5, 1), seed=6)
    x = _x(2)
    assert_rel(jaccli.hessian(net, x, per_sample=True), torch_func("hessian", net, x, per_sample=True))
    assert runs["first-layer"] == 0
    monkeypatch.setattr(fold, "MAX_FOLDED_BYTES", 6 * 5 * 8 * 5)  # a Hessian pass of 2 inputs: 5 rows
    assert_rel(jaccli.hessian(net, x, per_sample=True), torch_func("hessian", net, x, per_sample=True))
    assert runs["first-layer"] == 1


@pytest.mark.parametrize("pattern", ["first-layer", "first-rows"])
def test_weights_changed_through_data_are_folded_anew(runs, monkeypatch, pattern):
    # an edit through .data keeps the weight's _version, and the model's state key and the
    # recheck (values, from the live weights) do not see it either: folded weights or constant
    # rows kept from the first call would give the second call the old weights' derivatives
    if pattern == "first-rows":
        monkeypatch.setattr(fold, "MAX_FOLDED_BYTES", 0)  # the whole fold declines
    net = tanh_mlp((3, 16, 16, 1), seed=5)
    x = _x(3)
    assert_rel(jaccli.hessian(net, x, per_sample=True), torch_func("hessian", net, x, per_sample=True))
    with torch.no_grad():
        net[0].weight.data.mul_(2)
        net[2].weight.data.mul_(-0.5)
    assert_rel(jaccli.hessian(net, x, per_sample=True), torch_func("hessian", net, x, per_sample=True))
    assert runs[pattern] >= 2


@pytest.mark.parametrize("pattern", ["first-layer", "first-rows"])
def test_what_a_fold_makes_from_the_weights_is_kept_while_their_values_are(fresh_programs, runs, monkeypatch,
                                                                           pattern):  # fmt: skip
    # made by the first pass, taken by the next chunks and calls; made anew for other columns
    # (another kind of pass) and for weights changed in place, through .data too
    if pattern == "first-rows":
        monkeypatch.setattr(fold, "MAX_FOLDED_BYTES", 0)  # the whole fold declines
    maker = "_folded" if pattern == "first-layer" else "_constant_rows"
    made = []
    original = getattr(fold, maker)
    monkeypatch.setattr(fold, maker, lambda *a: made.append(1) or original(*a))
    net = tanh_mlp((3, 16, 16, 1), seed=5)
    x = _x(3, n=9)
    for _ in range(2):
        assert_rel(jaccli.laplacian(net, x, per_sample=True, chunk_size=3),
                   torch_func("laplacian", net, x, per_sample=True))  # fmt: skip
    assert len(made) == 1 and runs[pattern] == 6
    assert_rel(jaccli.hessian(net, x, per_sample=True), torch_func("hessian", net, x, per_sample=True))
    assert len(made) == 2
    with torch.no_grad():
        net[0].weight.data[0, 0] += 0.25
    assert_rel(jaccli.hessian(net, x, per_sample=True), torch_func("hessian", net, x, per_sample=True))
    assert len(made) == 3
    if pattern == "first-layer":
        with torch.no_grad():
            net[2].weight.data[1, 2] -= 0.5
        assert_rel(jaccli.hessian(net, x, per_sample=True), torch_func("hessian", net, x, per_sample=True))
        assert len(made) == 4


@pytest.mark.parametrize("n_in", [1, 3])
@pytest.mark.parametrize("act", ["tanh", "softplus", "sin"])
def test_first_rows_where_the_fold_declines(fresh_programs, runs, monkeypatch, n_in, act):
    # one input (fold.MIN_ROWS) or folded weights past the cap: the first activation's rows are
    # made from the constants by broadcasting, and its input's rows are never written
    monkeypatch.setattr(fold, "MAX_FOLDED_BYTES", 0)
    net = tanh_mlp((n_in, 9, 8, 2), seed=n_in, act=act)
    x = _x(n_in)
    for kind in KINDS3:
        got = getattr(jaccli, kind)(net, x, per_sample=True, chunk_size=3)
        assert_rel(got, torch_func(kind, net, x, per_sample=True))
    assert runs["first-layer"] == 0
    assert runs["first-rows"] >= 3 * len(KINDS3)  # every chunk of every kind



def test_first_rows_stay_under_compile(fresh_programs, runs, monkeypatch):
    # with kernels on, the first activation's rows are still the fold's to make (softplus: no
    # compile happens, the net has no op a kernel serves; tanh: tests/cli/test_cli_compile.py)
    monkeypatch.setattr(fold, "MAX_FOLDED_BYTES", 0)
    net = tanh_mlp((3, 9, 8, 2), seed=3, act="softplus")
    x = _x(3)
    for kind in KINDS3:
        got = getattr(jaccli, kind)(net, x, per_sample=True, chunk_size=3, compile="on")
        assert_rel(got, torch_func(kind, net, x, per_sample=True))
    assert runs["first-rows"] >= 3 * len(KINDS3)  # every chunk of every kind
