"""Planning: mode choice, memory-bounded chunks, strategy reachability, and plans that carry their request."""

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


# ----------------------------------------------------------------- planning


@pytest.mark.parametrize(
    "kind,n_in,n_out,engine,mode",
    [
        ("jacobian", 1, 501, "taylor", "forward"),
        ("jacobian", 2048, 32, "torch.func", "reverse"),
        ("jacobian", 3, 3, "taylor", "forward"),
        ("hessian", 1, 501, "taylor", "forward"),
        # 14 Taylor streams beat 4 shared Hessian-vector products (they meet near n_in = 6-8)
        ("hessian", 4, 1, "taylor", "forward"),
        # 32 first-order streams and one reverse sweep (the Hessian by adjoints) beat both
        ("hessian", 32, 1, "taylor", "reverse"),
        ("laplacian", 10, 1, "taylor", "forward"),
    ],
)
def test_auto_mode_picks_the_cheaper_engine(kind, n_in, n_out, engine, mode):
    net = nn.Linear(n_in, n_out)
    plan = jaccli.plan(kind, net, torch.zeros(4, n_in), per_sample=True)
    assert (plan.engine, plan.mode) == (engine, mode)


def test_plan_bounds_chunks_by_memory(monkeypatch):
    monkeypatch.setattr(planner, "working_budget", lambda device, free=None: 4 * 2**20)
    net = tanh_mlp((1, 64, 64, 501), dtype=torch.float32)
    p = jaccli.plan("hessian", net, torch.zeros(100_000, 1), per_sample=True)
    assert p.points_per_chunk < 100_000 and p.chunks > 1
    assert p.peak_bytes - p.result_bytes <= 4 * 2**20 * 1.5
    assert p.result_shape == (100_000, 501, 1, 1)
    # and the chunked result equals the unchunked one
    x = torch.rand(300, 1)
    small = jaccli.hessian(net, x, per_sample=True)
    monkeypatch.setattr(planner, "working_budget", lambda device, free=None: 64 * 2**10)
    assert jaccli.plan("hessian", net, x, per_sample=True).chunks > 1
    torch.testing.assert_close(jaccli.hessian(net, x, per_sample=True), small)


def test_cpu_passes_of_the_adjoint_hessian_may_hold_more_than_a_forward_pass():
    # the adjoints pay a fixed cost per pass (their vmapped reverse sweep): their passes are
    # kept under _ADJOINT_CACHE_BYTES, a forward pass's under _CACHE_BYTES
    net = tanh_mlp((12, 64, 64, 4), dtype=torch.float32)
    x = torch.zeros(20_000, 12)
    plans = {mode: jaccli.plan("hessian", net, x, per_sample=True, mode=mode) for mode in ("forward", "reverse")}
    for mode, cap in (("forward", planner._CACHE_BYTES), ("reverse", planner._ADJOINT_CACHE_BYTES)):
        p = plans[mode]
        per_point = (p.peak_bytes - p.result_bytes) / p.points_per_chunk
        assert p.points_per_chunk == max(planner._MIN_POINTS, int(cap // per_point)), mode
    reverse = plans["reverse"]
    assert reverse.points_per_chunk < x.shape[0] and reverse.peak_bytes - reverse.result_bytes > planner._CACHE_BYTES


def test_the_hosts_free_memory_is_read_at_most_every_so_often(monkeypatch):
    from jaccli.engine import memory

    reads = []
    monkeypatch.setattr(memory, "_read_host_free", lambda: reads.append(1) or 1000 * len(reads))
    monkeypatch.setattr(memory, "_HOST_FREE", [(-math.inf, 0)])
    clock = [100.0]
    monkeypatch.setattr(memory, "_clock", lambda: clock[0])
    cpu = torch.device("cpu")
    assert memory.memory_available(cpu) == 1000
    clock[0] += memory.MEMINFO_EVERY / 2
    assert memory.memory_available(cpu) == 1000 and len(reads) == 1  # the reading is reused
    clock[0] += memory.MEMINFO_EVERY
    assert memory.memory_available(cpu) == 2000 and len(reads) == 2  # and read again once old


def test_a_kept_plan_follows_the_memory_it_was_made_for(monkeypatch):
    # the plan of a kept program is reused only for the same memory figures: less memory
    # free (read anew) plans smaller chunks at once
    net = tanh_mlp((2, 16, 1), dtype=torch.float32)
    x = torch.rand(5000, 2)
    free = [64 * 2**30]
    monkeypatch.setattr(planner, "memory_available", lambda device: free[0])
    first = jaccli.plan("laplacian", net, x, per_sample=True)
    assert jaccli.plan("laplacian", net, x, per_sample=True) == first
    free[0] = 300 * 2**20  # a budget of 75 MiB: still one chunk under the cache bound
    assert jaccli.plan("laplacian", net, x, per_sample=True).available_bytes == 300 * 2**20
    monkeypatch.setattr(planner, "working_budget", lambda device, free=None: 64 * 2**10)
    small = jaccli.plan("laplacian", net, x, per_sample=True)
    assert small.engine == "taylor" and small.points_per_chunk < first.points_per_chunk


def test_a_kept_plan_is_recalled_for_the_same_chunk_size(monkeypatch):
    # 64, numpy's 64 and 64.0 ask for the same plan: planned once, then recalled from the
    # program's one slot; another chunk size plans anew
    import numpy as np

    made = []
    make = planner._make_taylor_plan
    monkeypatch.setattr(planner, "_make_taylor_plan", lambda *a, **k: made.append(1) or make(*a, **k))
    net = tanh_mlp((2, 8, 1), dtype=torch.float32)
    x = torch.rand(300, 2)
    plans = [jaccli.plan("laplacian", net, x, per_sample=True, chunk_size=c) for c in (64, np.int64(64), 64.0)]
    assert plans[0].engine == "taylor" and plans[0].points_per_chunk == 64
    assert plans[1] == plans[0] and plans[2] == plans[0] and len(made) == 1
    assert jaccli.plan("laplacian", net, x, per_sample=True, chunk_size=32).points_per_chunk == 32
    assert len(made) == 2


def test_every_strategy_is_reachable():
    kinds = {k for k, _ in STRATEGIES}
    assert kinds == {"jacobian", "hessian", "divergence", "laplacian", "hutchinson"}


# ----------------------------------------------------------------- a plan carries its request


class Counting(nn.Module):
    """Counts forward calls, to see how often a command runs the model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian", "divergence"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_computing_a_plan_does_not_probe_the_model_again(kind, mode):
    net = Counting(tanh_mlp((3, 8, 3)))
    x = torch.randn(20, 3, dtype=torch.float64)
    fresh = getattr(jaccli, kind)(net, x, per_sample=True, mode=mode)
    net.calls = 0
    getattr(jaccli, kind)(net, x, per_sample=True, mode=mode)
    calls_alone = net.calls
    net.calls = 0
    p = jaccli.plan(kind, net, x, per_sample=True, mode=mode)
    planning = net.calls
    net.calls = 0
    planned = getattr(jaccli, kind)(net, x, per_sample=True, mode=mode, plan=p)
    assert planning > 0 and net.calls == calls_alone - planning
    torch.testing.assert_close(planned, fresh, **TOL)


def test_options_left_at_their_defaults_come_from_the_plan():
    net = tanh_mlp((2, 5, 2))
    x = torch.randn(7, 2, dtype=torch.float64)
    p = jaccli.plan("hessian", net, x, per_sample=True, mode="reverse", chunk_size=3)
    got = jaccli.hessian(net, x, plan=p)
    assert got.shape == (7, 2, 2, 2)
    torch.testing.assert_close(got, jaccli.hessian(net, x, per_sample=True), **TOL)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda net, x: ("jacobian", net, x, {}), "the plan is for a hessian, not a jacobian"),
        (lambda net, x: ("hessian", tanh_mlp((2, 5, 2)), x, {}), "another model or other input tensors"),
        (lambda net, x: ("hessian", net, x.clone(), {}), "another model or other input tensors"),
        (lambda net, x: ("hessian", net, x, {"mode": "forward"}), "mode='forward' differs from the plan's mode='reverse'"),
        (lambda net, x: ("hessian", net, x, {"chunk_size": 2}), "chunk_size=2 differs from the plan's chunk_size=3"),
    ],
)
def test_a_plan_for_another_request_is_refused(change, message):
    net = tanh_mlp((2, 5, 2))
    x = torch.randn(7, 2, dtype=torch.float64)
    p = jaccli.plan("hessian", net, x, per_sample=True, mode="reverse", chunk_size=3)
    kind, f, xx, options = change(net, x)
    with pytest.raises(jaccli.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        getattr(jaccli, kind)(f, xx, plan=p, **options)


def test_plan_argument_must_be_a_plan():
    with pytest.raises(jaccli.UsageError, match="plan= takes a Plan made by jaccli.plan"):
        jaccli.jacobian(torch.sin, torch.zeros(3), plan="forward")


@pytest.mark.parametrize("kind", ["plan", "jacobian", "hessian", "laplacian", "divergence"])
def test_request_defaults_are_the_public_functions_defaults(kind):
    import inspect

    from jaccli.request.kinds import kind as kind_of
    from jaccli.request.spec import Derivative

    params = inspect.signature(getattr(jaccli, kind)).parameters
    defaults = Derivative(kind_of("jacobian"))
    for name in planner.PLANNED_FIELDS + ("seed",):
        if name in params:
            assert params[name].default == getattr(defaults, name), (kind, name)


def test_a_million_input_hessian_is_refused_before_anything_is_allocated():
    """The n² direction pairs of a whole-input Hessian are counted, not made: 1 024 000 inputs
    mean 5·10¹¹ pairs (8 TB of indices) and a 3.8 PiB result, refused up front."""
    f = lambda x: (x**2).sum(1, keepdim=True)  # noqa: E731
    with pytest.raises(jaccli.ResourceError, match="would not fit in memory"):
        jaccli.hessian(f, torch.zeros(1000, 1024))
