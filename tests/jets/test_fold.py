"""Folds (jets/fold.py): the first layer's constant rows folded into the second layer's GEMM.

Every derivative is compared with torch.func in float64 (the fast path off); each test also
says whether the fold ran, so that a pattern that silently stops matching fails here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jaccli
from jaccli.jets import fold
from compare import assert_rel, torch_func
from problems import tanh_mlp

KINDS3 = ("jacobian", "hessian", "laplacian")


@pytest.fixture
def runs(monkeypatch):
    """How many passes each fold pattern computed (its ``run`` returned a jet)."""
    counts = {"first-layer": 0, "first-rows": 0}

    def counting(pattern: str, finder):
        def made(*args):
            run = finder(*args)

            def wrapped(*a):
                jet = run(*a)
                counts[pattern] += jet is not None
                return jet

            return wrapped

        return made

    monkeypatch.setattr(fold, "_first_layer_run", counting("first-layer", fold._first_layer_run))
    monkeypatch.setattr(fold, "_first_rows_run", counting("first-rows", fold._first_rows_run))
    return counts


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
        from jaccli.engine import planner

        real = planner._taylor_plan

        def split(*a, **k):
            from dataclasses import replace

            return replace(real(*a, **k), directions_per_pass=directions)

        mp.setattr(planner, "_taylor_plan", split)
        for kind in KINDS3:
            assert_rel(getattr(jaccli, kind)(net, x, per_sample=True), torch_func(kind, net, x, per_sample=True))
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


def test_series_passes_run_unfolded(fresh_programs, runs):
    # no one-hot seed rows (the series of partials): the steps run one by one
    from torch.func import jacfwd, vmap

    net = tanh_mlp((1, 7, 6, 1), seed=4).requires_grad_(False)
    x = _x(1)
    got = jaccli.partials(net, x, ["u_xxxx", "u_xx"], inputs=["x"], outputs=["u"], per_sample=True)

    def u(p):
        return net(p.reshape(1, 1))[0, 0]

    d2 = jacfwd(jacfwd(u))
    want = {"u_xx": vmap(d2)(x[:, 0]), "u_xxxx": vmap(jacfwd(jacfwd(d2)))(x[:, 0])}
    for name in ("u_xxxx", "u_xx"):
        assert_rel(torch.as_tensor(got[name]).reshape(-1), want[name].reshape(-1))
    assert runs["first-layer"] == 0 and runs["first-rows"] == 0


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
