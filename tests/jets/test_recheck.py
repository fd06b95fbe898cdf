"""The recheck of a kept program (``jets.recheck``): the program's recorded ops replayed on
values, against the model, on the probe points of a new call.

The replay (``builder._replay``) is a generated straight-line function of the recorded ops;
it must give the model's own values on every architecture (batch-sized shapes, a trace's
shape arithmetic, ops with several results, keyword arguments), at batch sizes other than
the traced ones, and a model that now computes another function must be refused.
"""

from __future__ import annotations

import pytest
import torch

import jaccli
from jaccli import jets
from jaccli.engine import probe, programs
from jaccli.jets import builder
from architectures import ZOO
from architectures import trace as trace_zoo
from compare import assert_rel
from problems import tanh_mlp


pytestmark = pytest.mark.usefixtures("fresh_programs")


def _program(f, x):
    plan = jaccli.plan("laplacian", f, x, per_sample=True, mode="forward")
    p, program, _ = plan._request
    assert plan.engine == "taylor", plan.engine_note
    return p, program


@pytest.mark.parametrize("name", list(ZOO))
def test_the_replay_gives_the_models_values_on_every_architecture(name):
    """Traced in float64 (a trace's shape arithmetic on the batch size included), at the
    probe's batch and at two others the program was not traced at."""
    traced, _module = trace_zoo(name, dtype=torch.float64)
    x = torch.randn(9, *ZOO[name][1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p, program = _program(traced, x)
    replay = builder._replay(program)
    for b in (8, 1, 9):
        rows = torch.arange(b)
        z = p.z(rows)
        with torch.no_grad():
            want, got = p.fn(rows)(z), replay(z)
        assert got.shape == want.shape
        assert_rel(got, want)
        assert_rel(got, program.value(z).detach())
    assert builder._replay(program) is replay  # generated once per program


class _Scaled(torch.nn.Module):
    """A Python number the program bakes in and the cache key cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 8).double()
        self.scale = 1.0

    def forward(self, x):
        return (torch.tanh(self.lin(x)) * self.scale).sum(1, keepdim=True)


def test_the_recheck_refuses_another_function_and_passes_the_same():
    f = _Scaled()
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p, program = _program(f, x)
    rows = probe.probe_rows(p)
    g, z = p.fn(rows), p.z(rows)
    with torch.no_grad():
        jets.recheck(program, g, z, 2)  # the model's own forward, off the traced points
        jets.recheck(program, g, z, 2, value=g(z))  # the value the batch check saw
        with pytest.raises(jets.Unsupported, match="disagrees"):
            jets.recheck(program, g, z, 2, value=g(z) * (1 + 1e-3))
        f.scale = 1.001  # another function behind the same program
        for value in (None, g(z)):
            with pytest.raises(jets.Unsupported, match="disagrees"):
                jets.recheck(program, g, z, 2, value=value)


def test_the_recheck_uses_the_probes_forward(monkeypatch):
    """A repeated call runs the model once (a plain forward of the probe rows: the recalled
    probe's shape, and the recheck's model side), not four times as it did (batch check,
    point 0 alone, the recheck's own forward); the batch check of a kept program's model
    is vouched for (tests/engine/test_reuse.py). The first call runs the batch check."""
    f = tanh_mlp((2, 8, 1))
    calls = []
    forward = f.forward
    monkeypatch.setattr(f, "forward", lambda *a: calls.append(a[0].shape[0]) or forward(*a))
    x = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    jaccli.laplacian(f, x, per_sample=True)
    assert calls[:3] == [8, 8, 1]  # the probe, the batch check's two (then the traces)
    for hits, check_batch in ((1, True), (2, False)):
        calls.clear()
        jaccli.laplacian(f, x, per_sample=True, check_batch=check_batch)
        assert programs.STATS["hits"] == hits
        assert calls == [8]  # the computation runs the program, not the model
