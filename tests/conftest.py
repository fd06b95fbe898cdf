"""Shared set-up for every test.

auto mode counts torch.func's one-time start (importing torch._dynamo) only while it is
unpaid in the process (:func:`jaccli.engine.costs.torch_func_started`), so its
choice for a small request depends on what ran before. Tests see it as paid, the state
of any process that ran torch.func once, so that their choices do not depend on their
order; tests of the cold choice patch it back (tests/engine/test_auto_choice.py), and
tests that run the command in a fresh process see the real state. Likewise auto mode's
timed choice between the Taylor engine's two Hessians is off (:mod:`jaccli.engine.measure`).

jaccli loads torch's forward-AD decompositions only before its first forward-mode product
(:func:`jaccli.engine.strategies.jvp_ready`); tests load them once up front, so that a test
calling ``torch.func.jvp`` for its reference never meets torch's TorchScript deprecation
warning (an error under ``filterwarnings = error``) depending on which tests ran before.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _torch_func_started(monkeypatch):
    from jaccli.engine import costs

    monkeypatch.setattr(costs, "torch_func_started", lambda: True)


@pytest.fixture(autouse=True)
def _no_measured_choice(monkeypatch):
    # auto mode times the Taylor engine's two Hessians, and its pick against torch.func's
    # reverse mode, where their predictions are close (jaccli.engine.measure): a choice by
    # the clock is not a test's to depend on. Tests see
    # the cost records' choice; tests/engine/test_measure.py sets a clock of its own
    from jaccli.engine import measure

    monkeypatch.setattr(measure, "WITHIN", 0.0)
    monkeypatch.setattr(measure, "FUNC_WITHIN", 0.0)


@pytest.fixture(autouse=True, scope="session")
def _jvp_ready():
    from jaccli.engine.strategies import jvp_ready

    jvp_ready()


@pytest.fixture
def fresh_programs():
    """Kept programs and recalled probes cleared before and after the test (reuse is per process)."""
    from jaccli.engine import memo, programs

    programs.clear()
    memo.clear()
    yield
    programs.clear()
    memo.clear()


@pytest.fixture
def failing_compile(monkeypatch):
    """Every fused kernel's compile fails (as without a C++ compiler); nothing compiled is kept."""
    from jaccli.jets import fused

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler here\nmore")

    monkeypatch.setattr(fused, "_KERNELS", {})
    monkeypatch.setattr(fused, "_WHY", {})
    monkeypatch.setattr(fused, "_inductor", broken)
