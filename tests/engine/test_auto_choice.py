"""auto mode picks the engine predicted fastest: Taylor for small inputs, reverse mode for
wide inputs and few outputs, torch.func's start counted only while it is unpaid.

The choice is pinned by the plan (``engine``, ``mode``, ``estimated_seconds``), never by
the clock; ``benchmarks/auto_mode.py`` measures that it is the fast one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import jaccli
from jaccli.engine import costs as cost_model, planner
from problems import make_examples, save_torchscript, tanh_mlp


@pytest.fixture
def cold(monkeypatch):
    """A fresh process, as a newcomer's command runs: torch.func's start is still to pay."""
    monkeypatch.setattr(cost_model, "torch_func_started", lambda: False)


def pinn(n_in: int = 2, n_out: int = 1, dtype=torch.float32) -> nn.Module:
    """The PINN of the report: n_in -> 50 -> 50 -> 50 -> n_out, tanh."""
    return tanh_mlp((n_in, 50, 50, 50, n_out), dtype=dtype, seed=3)


def engine_of(kind: str, net, x, **kw) -> tuple[str, str]:
    plan = jaccli.plan(kind, net, x, per_sample=True, **kw)
    return plan.engine, plan.mode


# ----------------------------------------------------------------- the commonest case: u(t, x)


@pytest.mark.parametrize("state", ["cold", "warm"])
@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian"])
def test_a_two_input_pinn_takes_the_taylor_engine(request, tmp_path, state, kind):
    if state == "cold":
        request.getfixturevalue("cold")
    path = save_torchscript(pinn(), tmp_path / "u.pt")
    model, x = jaccli.load_model(path), torch.rand(2000, 2)
    plan = jaccli.plan(kind, model, x, per_sample=True)
    assert (plan.engine, plan.mode) == ("taylor", "forward")
    assert plan.engine_note is None
    costs = plan.as_dict()["estimated_seconds"]
    # the Taylor engine's reverse mode (Hessians by adjoints) is weighed for Hessians only
    taylor = {"taylor forward", "taylor reverse"} if kind == "hessian" else {"taylor forward"}
    assert set(costs) == taylor | {"torch.func forward", "torch.func reverse"}
    assert costs["taylor forward"] == min(costs.values())
    if state == "cold":  # the start of torch.func alone outweighs the whole Taylor computation
        assert costs["torch.func reverse"] >= cost_model.TORCH_FUNC_START > 10 * costs["taylor forward"]


@pytest.mark.parametrize("n_in", [1, 2, 3, 5])
def test_per_sample_hessians_of_small_inputs_take_taylor_even_when_torch_func_is_warm(n_in):
    # issue 23: auto took torch.func forward-over-reverse (n_in + 1) / 2 times fewer
    # products, yet about twice slower than the Taylor engine's streams. Since the reverse
    # Hessian shares each tangent among outputs the two meet near n_in = 6-8 (scalar
    # output, width 50: benchmarks/auto_mode.py, docs/auto-mode.md)
    # (from about 4 inputs on, the Taylor engine's reverse mode, the Hessian by adjoints, is
    # predicted cheaper still: 0.72 of the forward Hessian's time at 4 inputs, 0.11 at 32)
    engine, mode = engine_of("hessian", pinn(n_in), torch.rand(100_000, n_in))
    assert engine == "taylor" and (mode == "forward" or n_in > 3)


@pytest.mark.parametrize("n_in", [1, 2, 3, 5, 10, 50])
def test_per_sample_laplacians_take_taylor_even_when_torch_func_is_warm(n_in):
    # n_in second-order streams against n_in Hessian-vector products of ~4 passes each
    assert engine_of("laplacian", pinn(n_in), torch.rand(100_000, n_in)) == ("taylor", "forward")


def test_what_auto_chose_is_right_against_the_closed_form():
    heat = make_examples.Heat().double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 2, dtype=torch.float64, generator=g) * torch.tensor([1.0, 2 * math.pi], dtype=torch.float64)
    assert engine_of("hessian", heat, x) == ("taylor", "forward")
    t, s = x[:, 0], x[:, 1]
    k = heat.kappa
    a, b = torch.exp(-k * t) * torch.sin(s), 0.5 * torch.exp(-4 * k * t) * torch.cos(2 * s)
    u_tt, u_xx = k * k * a + 16 * k * k * b, -a - 4 * b
    u_tx = -k * torch.exp(-k * t) * torch.cos(s) + 4 * k * torch.exp(-4 * k * t) * torch.sin(2 * s)
    want = torch.stack([torch.stack([u_tt, u_tx], -1), torch.stack([u_tx, u_xx], -1)], -2)[:, None]
    torch.testing.assert_close(jaccli.hessian(heat, x, per_sample=True), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jaccli.laplacian(heat, x, per_sample=True), (u_tt + u_xx)[:, None], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- wide inputs, few outputs


def test_wide_inputs_and_a_scalar_output_take_reverse_mode():
    net, x = tanh_mlp((256, 50, 1), dtype=torch.float32), torch.zeros(20, 256)
    plan = jaccli.plan("jacobian", net, x, per_sample=True)
    assert (plan.engine, plan.mode) == ("torch.func", "reverse")
    # the note says what was weighed and how to get the other engine
    assert plan.engine_note.startswith("reverse mode: ") and "Taylor fast path" in plan.engine_note
    assert "256 inputs, 1 output, 20 points" in plan.engine_note and "--mode forward" in plan.engine_note
    # a Hessian's reverse mode is the Taylor engine's: by adjoints (tests/jets/test_adjoint.py)
    assert engine_of("hessian", tanh_mlp((64, 16, 1), dtype=torch.float32), torch.zeros(20, 64)) == ("taylor", "reverse")


def test_torch_func_start_counts_only_while_unpaid(cold):
    # cold: a few points are done by the Taylor engine before torch.func would have started;
    # many points repay the start, and reverse mode wins again
    net = tanh_mlp((256, 50, 1), dtype=torch.float32)
    assert engine_of("jacobian", net, torch.zeros(20, 256)) == ("taylor", "forward")
    assert engine_of("jacobian", net, torch.zeros(50_000, 256)) == ("torch.func", "reverse")


def test_many_outputs_few_inputs_take_forward_mode():
    assert engine_of("jacobian", tanh_mlp((1, 16, 501), dtype=torch.float32), torch.zeros(10, 1)) == ("taylor", "forward")
    # without the fast path, torch.func's own forward mode
    net = tanh_mlp((3, 16, 40), dtype=torch.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planner, "FAST_PATH", False)
        plan = jaccli.plan("jacobian", net, torch.zeros(10, 3), per_sample=True)
    assert (plan.engine, plan.mode) == ("torch.func", "forward")
    assert set(plan.as_dict()["estimated_seconds"]) == {"torch.func forward", "torch.func reverse"}


# ----------------------------------------------------------------- where the Taylor engine cannot run


def test_two_arguments_choose_between_torch_func_modes_by_cost():
    wide = lambda a, b: (a * b).sum(1, keepdim=True).tanh()  # noqa: E731
    x = (torch.rand(10, 64), torch.rand(10, 64))
    plan = jaccli.plan("jacobian", wide, x, wrt=0, per_sample=True)
    assert (plan.engine, plan.mode) == ("torch.func", "reverse") and plan.engine_note is None
    tall = lambda a, b: (a * b).repeat(1, 32)  # noqa: E731
    x = (torch.rand(10, 2), torch.rand(10, 2))
    assert jaccli.plan("jacobian", tall, x, wrt=0, per_sample=True).mode == "forward"


def test_layer_norm_never_takes_torch_func_forward_over_forward(monkeypatch):
    # PyTorch's jvp(jvp) through layer_norm is wrong: that candidate is not weighed
    monkeypatch.setattr(planner, "FAST_PATH", False)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 30)).double().eval()
    plan = jaccli.plan("laplacian", net, torch.rand(10, 2, dtype=torch.float64), per_sample=True)
    assert (plan.engine, plan.mode) == ("torch.func", "reverse")
    assert set(plan.as_dict()["estimated_seconds"]) == {"torch.func reverse"}


def test_a_forced_mode_is_kept():
    net, x = pinn(), torch.rand(100, 2)
    assert engine_of("jacobian", net, x, mode="reverse") == ("torch.func", "reverse")
    assert engine_of("hessian", net, x, mode="forward") == ("taylor", "forward")


def test_the_hutchinson_estimate_is_planned_by_its_probes():
    net, x = tanh_mlp((64, 16, 64), dtype=torch.float32), torch.zeros(10, 64)
    plan = jaccli.plan("divergence", net, x, per_sample=True, estimator="hutchinson", probes=8)
    assert (plan.engine, plan.mode) == ("taylor", "forward")
    cost = cost_model.COSTS[("taylor", "forward")]["hutchinson"]
    assert cost_model.passes_per_point("hutchinson", "taylor", "forward", 64, 64, probes=8) == cost.base + 8 * cost.per_direction
    assert cost_model.passes_per_point("hutchinson", "taylor", "forward", 64, 64, probes=80) > 64 * cost.per_direction


# ----------------------------------------------------------------- the cost model itself


def test_every_engine_has_one_cost_record_per_kind():
    kinds = {"jacobian", "hessian", "laplacian", "divergence", "hutchinson"}
    for engine_mode in planner._CANDIDATES:
        # the Taylor engine's reverse mode makes Hessians only (by adjoints)
        want = {"hessian"} if engine_mode == ("taylor", "reverse") else kinds
        assert set(cost_model.COSTS[engine_mode]) == want


@pytest.mark.parametrize("kind", ["hessian", "laplacian"])
def test_the_reverse_second_order_cost_shares_each_tangent_among_outputs(kind):
    # forward over reverse runs one direction per input (a forward pass and its tangent)
    # and, inside it, one pullback per output: linear in n_in for a fixed n_out and in
    # n_out for a fixed n_in, never a product per (output, input) pair at full price
    cost = cost_model.COSTS[("torch.func", "reverse")][kind]
    passes = lambda i, o: cost_model.passes_per_point(kind, "torch.func", "reverse", i, o)  # noqa: E731
    assert passes(64, 3) == pytest.approx(cost.base + 64 * (cost.per_direction + 3 * cost.per_output))
    assert passes(64, 1) - passes(32, 1) == pytest.approx(passes(32, 1) - passes(0, 1))
    assert passes(16, 8) - passes(16, 4) == pytest.approx(passes(16, 4) - passes(16, 0))
    # a direction serving 8 outputs costs less than 8 directions serving one each
    assert passes(16, 8) - cost.base < 8 * (passes(16, 1) - cost.base)


def test_predictions_scale_with_the_models_operations_per_point():
    # width and depth enter through the probe's operation count: the same request on a
    # model with more operations per point is predicted slower by every engine, by the
    # same factor once torch.func's start is left out (the adjoints' contraction term, which
    # counts activations, not operations, is none at 4 inputs: their record absorbs it)
    x = torch.rand(1000, 4)
    small = jaccli.plan("hessian", tanh_mlp((4, 16, 16, 1), dtype=torch.float32), x, per_sample=True)
    big = jaccli.plan("hessian", tanh_mlp((4, 64, 64, 64, 1), dtype=torch.float32), x, per_sample=True)
    flops = small._request.problem.flops, big._request.problem.flops
    assert flops[1] > 4 * flops[0]
    a, b = dict(small.estimates), dict(big.estimates)
    start = {name: cost_model.start_seconds(name.split()[0]) for name in a}
    for name in a:
        assert (b[name] - start[name]) / (a[name] - start[name]) == pytest.approx(flops[1] / flops[0], rel=1e-6)


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian", "divergence"])
def test_every_planned_kind_shows_what_auto_weighed(kind):
    # what --json (and --dry-run --json) prints as plan.estimated_seconds: every candidate,
    # in seconds, and the engine auto ran is the cheapest of them
    net, x = tanh_mlp((3, 16, 3), dtype=torch.float32), torch.rand(50, 3)
    doc = jaccli.plan(kind, net, x, per_sample=True).as_dict()
    costs = doc["estimated_seconds"]
    taylor = {"taylor forward", "taylor reverse"} if kind == "hessian" else {"taylor forward"}
    assert set(costs) == taylor | {"torch.func forward", "torch.func reverse"}
    assert all(isinstance(s, float) and s > 0 for s in costs.values())
    assert min(costs, key=costs.get) == f"{doc['engine']} {doc['mode']}"
    forced = jaccli.plan(kind, net, x, per_sample=True, mode="reverse").as_dict()
    assert forced["estimated_seconds"] == costs  # a forced mode still shows what auto would have weighed


@pytest.mark.parametrize("n_in", [16, 32, 64])
def test_wide_input_scalar_hessians_take_the_hessian_by_adjoints(n_in):
    # n_in(n_in+1)/2 second-order streams against n_in shared Hessian-vector products, and
    # against n_in first-order streams, one reverse sweep and the sources contracted in place
    net = tanh_mlp((n_in, 50, 50, 50, 1), dtype=torch.float32)
    plan = jaccli.plan("hessian", net, torch.rand(1000, n_in), per_sample=True)
    assert (plan.engine, plan.mode) == ("taylor", "reverse")
    costs = dict(plan.estimates)
    assert costs["taylor reverse"] < costs["torch.func reverse"] < costs["taylor forward"] < costs["torch.func forward"]


def test_small_input_jacobians_and_hessians_with_several_outputs_take_taylor():
    net, x = tanh_mlp((2, 50, 50, 50, 8), dtype=torch.float32), torch.rand(10_000, 2)
    for kind in ("jacobian", "hessian", "laplacian"):
        assert engine_of(kind, net, x) == ("taylor", "forward")


@pytest.fixture(scope="module")
def auto_mode_benchmark():
    """``benchmarks/auto_mode.py`` as a module, loaded once (its ``fit`` is where COSTS comes from)."""
    from problems import benchmark

    return benchmark("auto_mode")


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian"])
def test_the_cost_fit_recovers_the_table_from_times_it_predicts(kind, auto_mode_benchmark):
    # times made by the table itself, each case slowed by its own factor (the planner's unit
    # is off by one per model, alike for every engine): the fit gives back the table up to
    # one scale for the kind, and the within-case spread it leaves is nil
    g = torch.Generator().manual_seed(5)
    rows = []
    for c, (n_in, n_out) in enumerate([(1, 1), (2, 1), (5, 1), (10, 1), (30, 1), (5, 4), (10, 8), (3, 20)]):
        factor = float(torch.empty(()).uniform_(0.3, 5.0, generator=g))
        for engine, mode in planner._CANDIDATES:
            if kind not in cost_model.COSTS[(engine, mode)]:
                continue
            passes = cost_model.passes_per_point(kind, engine, mode, n_in, n_out)
            rows.append((f"case {c}", kind, engine, mode, n_in, n_out, passes * factor))
    figures, sd = auto_mode_benchmark.fit(rows)[kind]
    assert sd < 1e-6
    got, want = [], []
    for (engine, mode), values in figures.items():
        cost = cost_model.COSTS[(engine, mode)][kind]
        for name, value in values.items():
            got.append(value)
            want.append(getattr(cost, name))
    scale = got[0] / want[0]
    assert got == pytest.approx([w * scale for w in want], rel=1e-3, abs=1e-3 * scale)
