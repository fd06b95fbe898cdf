"""Auto mode's measured choice between the Taylor engine's two Hessians (jaccli/engine/measure.py),
on a clock the test sets: the faster pass wins, a near tie keeps the prediction, the times are
taken once per program, and a program the adjoints do not serve is never timed."""

from __future__ import annotations

import pytest
import torch

import jaccli
from jaccli.engine import measure
from jaccli.jets import adjoint
from problems import tanh_mlp


@pytest.fixture
def clock(monkeypatch):
    """Pass seconds by mode: the forward pass runs first, so ticks alternate forward, reverse."""
    monkeypatch.setattr(measure, "WITHIN", 4.0)
    ticks = {"forward": 1.0, "reverse": 1.0, "calls": 0}
    now = [0.0]

    def fake():
        ticks["calls"] += 1
        step = ticks["forward"] if (ticks["calls"] - 1) % 4 < 2 else ticks["reverse"]
        if ticks["calls"] % 2 == 0:
            now[0] += step
        return now[0]

    monkeypatch.setattr(measure, "_clock", fake)
    return ticks


def _plan(net, n_in):
    x = torch.randn(200, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return jaccli.plan("hessian", net, x, per_sample=True), x


@pytest.mark.parametrize("fwd,rev,want", [(2.0, 1.0, "reverse"), (1.0, 2.0, "forward"), (1.0, 0.95, None)])
def test_the_faster_taylor_hessian_is_taken(clock, fwd, rev, want):
    # 5 inputs, 1 output: the two predictions are within 4x (a tie keeps the prediction)
    net = tanh_mlp((5, 16, 1), seed=2)
    predicted = jaccli.plan("hessian", net, torch.zeros(200, 5, dtype=torch.float64), per_sample=True, mode="auto")
    clock.update(forward=fwd, reverse=rev)
    plan, x = _plan(tanh_mlp((5, 16, 1), seed=2), 5)
    assert plan.engine == "taylor" and plan.mode == (want or predicted.mode)
    assert plan.engine_note.startswith(f"measured on {min(200, measure.POINTS)} points: taylor forward")
    torch.testing.assert_close(jaccli.hessian(net, x, per_sample=True, plan=None), jaccli.hessian(net, x, per_sample=True, mode="forward"),
                               rtol=1e-10, atol=1e-12)  # fmt: skip


def test_the_times_are_taken_once_per_program(clock):
    net = tanh_mlp((5, 16, 1), seed=2)
    clock.update(forward=2.0, reverse=1.0)
    _plan(net, 5)
    calls = clock["calls"]
    clock.update(forward=1.0, reverse=2.0)  # a later clock is not read: the kept times decide
    plan, _ = _plan(net, 5)
    assert clock["calls"] == calls and plan.mode == "reverse"


def test_far_apart_predictions_are_not_timed(clock):
    plan, _ = _plan(tanh_mlp((1, 16, 8), seed=2), 1)  # one input: the forward Hessian, clearly
    assert clock["calls"] == 0 and plan.mode == "forward" and plan.engine_note is None


def test_a_program_the_adjoints_do_not_serve_is_not_timed(clock, monkeypatch):
    monkeypatch.setattr(adjoint, "applies", lambda program: False)
    plan, _ = _plan(tanh_mlp((5, 16, 1), seed=3), 5)
    assert clock["calls"] == 0 and (plan.engine, plan.mode) == ("taylor", "forward")


def test_a_request_with_more_points_than_the_first_had_times_them_again(clock):
    # a first call on 3 points times 3 points: a pass's fixed cost is most of that; a later
    # call with more points times again, on more, and keeps those times
    net = tanh_mlp((5, 16, 1), seed=4)
    clock.update(forward=1.0, reverse=2.0)
    few = jaccli.plan("hessian", net, torch.randn(3, 5, dtype=torch.float64), per_sample=True)
    assert few.mode == "forward" and few.engine_note.startswith("measured on 3 points")
    clock.update(forward=2.0, reverse=1.0)
    plan, _ = _plan(net, 5)
    assert plan.mode == "reverse" and plan.engine_note.startswith(f"measured on {min(200, measure.POINTS)} points")
    calls = clock["calls"]
    again = jaccli.plan("hessian", net, torch.randn(3, 5, dtype=torch.float64), per_sample=True)
    assert clock["calls"] == calls and again.mode == "reverse"  # fewer points: the kept times stand


def test_each_mode_is_timed_on_its_own_plans_pass_and_compared_per_point(clock, monkeypatch):
    # the planner hands each mode's points and directions per pass; a pass of 200 points that
    # took twice a pass of 50 is the faster per point
    net, x = tanh_mlp((5, 16, 1), seed=5), torch.randn(200, 5, dtype=torch.float64)
    real, seen = measure.hessian_mode, {}

    def spy(program, p, predicted, chunk, chunk_size):
        seen.update({m: chunk(m) for m in ("forward", "reverse")})
        return real(program, p, predicted, lambda m: (50, None) if m == "forward" else (200, None), chunk_size)

    monkeypatch.setattr(measure, "hessian_mode", spy)
    clock.update(forward=1.0, reverse=2.0)
    plan = jaccli.plan("hessian", net, x, per_sample=True)
    assert plan.mode == "reverse"
    assert plan.engine_note == ("measured on a pass of each: taylor forward 1e+03 ms on 50 points, "
                                "taylor reverse 2e+03 ms on 200 points")  # fmt: skip
    for m in ("forward", "reverse"):
        forced = jaccli.plan("hessian", net, x, per_sample=True, mode=m)
        assert seen[m] == (forced.points_per_chunk, forced.directions_per_pass)


def test_times_are_kept_per_chunk_size_and_taken_again_for_larger_passes(clock):
    # a request with 8 points per pass times passes of 8; the default plan's passes are
    # larger, so its request times again, and a later one like it does not
    net, x = tanh_mlp((5, 16, 1), seed=6), torch.randn(200, 5, dtype=torch.float64)
    clock.update(forward=1.0, reverse=2.0)
    small = jaccli.plan("hessian", net, x, per_sample=True, chunk_size=8)
    assert small.engine_note.startswith("measured on 8 points")
    calls = clock["calls"]
    jaccli.plan("hessian", net, x, per_sample=True)
    assert clock["calls"] > calls
    calls = clock["calls"]
    jaccli.plan("hessian", net, x, per_sample=True)
    jaccli.plan("hessian", net, x, per_sample=True, chunk_size=8)
    assert clock["calls"] == calls


# ---- the Taylor engine's pick against torch.func's reverse mode (measure.against_func)


@pytest.fixture
def passes(monkeypatch):
    """Each timed pass runs, and takes ``fixed + per_point * points`` seconds by engine; the
    passes timed are listed as (engine, points)."""
    from jaccli.engine import costs

    monkeypatch.setattr(measure, "FUNC_WITHIN", 8.0)
    monkeypatch.setattr(costs, "torch_func_started", lambda: True)
    cost = {"taylor": (0.0, 1.0), "torch.func": (0.0, 1.0)}
    seen: list[tuple[str, int]] = []

    def timed(p, run, size):
        run(size)
        engine = "torch.func" if "func_pass" in getattr(run, "__qualname__", "") else "taylor"
        seen.append((engine, size))
        fixed, per = cost[engine]
        return fixed + per * size

    monkeypatch.setattr(measure, "_timed", timed)
    return cost, seen


def _wide(n_in=30, points=300):
    # a one-output Jacobian of 30 inputs: the records put torch.func's reverse mode 4.8x ahead
    net = tanh_mlp((n_in, 16, 1), seed=7)
    return net, torch.randn(points, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _wide_plan(passes, func: tuple[float, float]):
    """The wide Jacobian's auto plan with torch.func's passes taking ``fixed + per_point * points``
    seconds (Taylor's 1 s a point), and the points of torch.func's timed passes."""
    cost, seen = passes
    net, x = _wide()
    cost.update(taylor=(0.0, 1.0), **{"torch.func": func})
    return jaccli.plan("jacobian", net, x, per_sample=True), [s for e, s in seen if e == "torch.func"], net, x


def test_torch_func_predicted_ahead_but_slower_loses_to_the_taylor_pick(passes):
    plan, sizes, net, x = _wide_plan(passes, (0.0, 3.0))
    assert (plan.engine, plan.mode) == ("taylor", "forward")
    assert "torch.func reverse" in plan.engine_note and plan.engine_note.startswith("measured on")
    # torch.func's passes grew from 8 points and stopped at the second: 3 s a point more from 8
    # to 16 points projects its request at 900 s, past twice the whole request by Taylor (300 s)
    assert sizes == [8, 16]
    assert plan.engine_note.endswith("(its request projected at 900 s, past the whole request by taylor forward)")
    torch.testing.assert_close(jaccli.jacobian(net, x, per_sample=True), jaccli.jacobian(net, x, per_sample=True, mode="reverse"))


def test_torch_func_faster_per_point_is_taken_saying_so(passes):
    plan, sizes, net, x = _wide_plan(passes, (0.0, 0.5))
    assert (plan.engine, plan.mode) == ("torch.func", "reverse")
    assert plan.engine_note.startswith("Taylor path not used: measured on")
    assert sizes[-2:] == [max(sizes)] * 2  # the full pass twice: the faster counts
    calls = len(passes[1])
    assert jaccli.plan("jacobian", net, x, per_sample=True).engine == "torch.func" and len(passes[1]) == calls  # kept


def test_a_near_tie_keeps_the_prediction(passes):
    plan, _, _, _ = _wide_plan(passes, (0.0, 0.95))  # 5 % apart: within the margin
    assert plan.engine == "torch.func"  # the records' pick stands


def test_torch_func_is_not_timed_before_it_has_started(passes, monkeypatch):
    from jaccli.engine import costs

    _, seen = passes
    monkeypatch.setattr(costs, "torch_func_started", lambda: False)
    net, x = _wide()
    plan = jaccli.plan("jacobian", net, x, per_sample=True)
    assert seen == [] and not (plan.engine_note or "").startswith(("measured", "Taylor path not used: measured"))


def test_torch_func_predicted_far_behind_is_not_timed(passes):
    _, seen = passes
    net = tanh_mlp((1, 16, 8), seed=2)  # one input, eight outputs: Taylor forward by far
    plan = jaccli.plan("jacobian", net, torch.randn(300, 1, dtype=torch.float64), per_sample=True)
    assert seen == [] and (plan.engine, plan.mode) == ("taylor", "forward") and plan.engine_note is None


def test_a_stop_for_a_small_request_is_not_kept_for_a_larger_one(passes):
    cost, seen = passes
    net, _ = _wide()
    cost.update(taylor=(0.0, 1.0), **{"torch.func": (40.0, 0.5)})  # a pass's fixed cost hides its per point
    few = torch.randn(20, 30, dtype=torch.float64)
    assert jaccli.plan("jacobian", net, few, per_sample=True).engine == "taylor"  # its first pass: 44 s > 20 s
    many = torch.randn(1000, 30, dtype=torch.float64)
    plan = jaccli.plan("jacobian", net, many, per_sample=True)
    assert plan.engine == "torch.func" and max(s for e, s in seen if e == "torch.func") > 8


def test_torch_func_failing_on_its_pass_leaves_the_taylor_pick(passes, monkeypatch):
    _, seen = passes

    def failing(*args, **kwargs):
        def run(size):
            raise NotImplementedError("no forward AD rule")

        return 300, run

    monkeypatch.setattr(measure, "func_pass", failing)
    net, x = _wide()
    plan = jaccli.plan("jacobian", net, x, per_sample=True)
    assert (plan.engine, plan.mode) == ("taylor", "forward")
    assert "torch.func reverse failed: NotImplementedError on a pass of 8 points" in plan.engine_note
    assert [e for e, _ in seen] == ["taylor", "taylor"]


def test_a_pass_of_torch_func_longer_than_the_whole_request_stops_it(passes):
    # a pass's fixed cost: 200 s, then 0.5 s a point; projected under twice the Taylor request
    # (300 s) at every size, but its pass of all 300 points alone takes 350 s, past the
    # request by Taylor with the margin that favours the records' pick, torch.func (333 s)
    plan, sizes, _, _ = _wide_plan(passes, (200.0, 0.5))
    assert (plan.engine, plan.mode) == ("taylor", "forward")
    assert sizes == [8, 16, 32, 64, 128, 256, 300]
    assert plan.engine_note.endswith("(more than the whole request by taylor forward)")


@pytest.mark.parametrize("func_per_point,want", [(0.8, "taylor"), (0.7, "torch.func")])
def test_torch_func_must_be_a_quarter_faster_to_displace_a_predicted_taylor_pick(passes, func_per_point, want):
    # four inputs, one output: the records put Taylor forward 16 % ahead, close enough to time
    cost, _ = passes
    net = tanh_mlp((4, 16, 1), seed=8)
    x = torch.randn(300, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cost.update(taylor=(0.0, 1.0), **{"torch.func": (0.0, func_per_point)})
    plan = jaccli.plan("jacobian", net, x, per_sample=True)
    assert plan.engine == want and "torch.func reverse" in plan.engine_note
