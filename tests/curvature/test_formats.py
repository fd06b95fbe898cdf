"""Every model format jaccli loads gives the eager model's curvature and gradients; bad input
gets one error of the documented class and exit code."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

import jaccli
from problems import FORMATS, tanh_mlp

F64 = torch.float64




@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_gives_the_eager_curvature_and_gradients(saved_formats, name):
    d, net, x, y = saved_formats
    ref = jaccli.curvature(net, x, y, loss="cross-entropy", full=True, chunk_size=4)
    ref_g = jaccli.grads(net, x, y, loss="cross-entropy", per_sample=True)
    model = jaccli.load_model(d / name, **FORMATS[name])
    r = jaccli.curvature(model, x, y, loss="cross-entropy", full=True, chunk_size=4)
    assert [(p.name, p.shape, p.offset) for p in r.params] == [(p.name, p.shape, p.offset) for p in ref.params]
    np.testing.assert_allclose(r.full, ref.full, rtol=1e-10, atol=1e-12)
    for matrix in ("ggn", "ef"):
        a = jaccli.curvature(model, x, y, loss="cross-entropy", matrix=matrix, diag=True, chunk_size=4)
        b = jaccli.curvature(net, x, y, loss="cross-entropy", matrix=matrix, diag=True, chunk_size=4)
        np.testing.assert_allclose(a.diag, b.diag, rtol=1e-10, atol=1e-13)
    g = jaccli.grads(model, x, y, loss="cross-entropy", per_sample=True)
    torch.testing.assert_close(g.per_sample, ref_g.per_sample, rtol=1e-10, atol=1e-12)
    # the loaded model's own parameters are left as they were
    for (k, p), (_, q) in zip(net.state_dict().items(), model.state_dict().items()):
        assert torch.equal(p, q), k


class Total(nn.Module):
    """Sums over the batch: one number for all samples."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return (x * self.w).sum()


class NoParams(nn.Module):
    def forward(self, x):
        return x.sum(1)


def _mlp_case():
    net = tanh_mlp((2, 4, 3))
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    return net, x


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda net, x: jaccli.curvature(NoParams(), x, loss="output"), jaccli.ModelError, "no parameters"),
        (lambda net, x: jaccli.curvature(net, x, torch.zeros(6, 3), loss="mse", params="nothing*"), jaccli.UsageError,
         "no parameter matches"),
        (lambda net, x: jaccli.curvature(net, x, torch.zeros(6, 2), loss="mse"), jaccli.InputError, "shape"),
        (lambda net, x: jaccli.curvature(net, x, torch.zeros(5, 3), loss="mse"), jaccli.InputError, "number of samples"),
        (lambda net, x: jaccli.curvature(net, x, torch.full((6,), 0.5), loss="cross-entropy"), jaccli.InputError,
         "whole numbers"),
        (lambda net, x: jaccli.curvature(net, x, torch.full((6,), 3), loss="nll"), jaccli.InputError, "out of range"),
        (lambda net, x: jaccli.curvature(net, x, torch.full((6, 3), 2.0), loss="bce"), jaccli.InputError, r"\[0, 1\]"),
        (lambda net, x: jaccli.curvature(net, x, loss="log-likelihood"), jaccli.ModelError, "one value per sample"),
        (lambda net, x: jaccli.curvature(net, x, loss="mse"), jaccli.UsageError, "needs a target"),
        (lambda net, x: jaccli.curvature(net, x, torch.full((6, 3), np.inf), loss="mse"), jaccli.NumericalError,
         "not finite"),
        (lambda net, x: jaccli.curvature(NoParams().double(), x, loss="output", matrix="ggn"), jaccli.UsageError,
         "not defined"),
        (lambda net, x: jaccli.curvature(net, x, torch.zeros(6, 3), loss="mse", standard_errors=True),
         jaccli.UsageError, "log-likelihood"),
        (lambda net, x: jaccli.curvature(net, x, torch.zeros(6, 3), loss="huber"), jaccli.UsageError, "unknown loss"),
        (lambda net, x: jaccli.curvature(Total().double(), x, loss="output"), jaccli.ModelError, "axis 0"),
    ],
)
def test_bad_input_gets_one_error_of_its_class(call, error, match):
    net, x = _mlp_case()
    with pytest.raises(error, match=match) as e:
        call(net, x)
    assert "\n" not in str(e.value)


def test_a_full_matrix_that_does_not_fit_is_refused_before_allocating(monkeypatch):
    from jaccli.curvature import api

    net, x = _mlp_case()
    monkeypatch.setattr(api, "memory_available", lambda device: 1000)
    with pytest.raises(jaccli.ResourceError, match=r"needs .*--params") as e:
        jaccli.curvature(net, x, torch.zeros(6, 3, dtype=F64), loss="mse", full=True)
    assert e.value.exit_code == 6 and "27 parameters needs 11.4 KiB" in str(e.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_results(saved_formats):
    d, net, x, y = saved_formats
    model = jaccli.load_model(d / "dynamic.pt2", device="cuda")
    r = jaccli.curvature(model, x.cuda(), y.cuda(), loss="cross-entropy", full=True, eig=2, matrix="ggn", diag=True)
    ref = jaccli.curvature(net, x, y, loss="cross-entropy", full=True, eig=2, matrix="ggn", diag=True)
    np.testing.assert_allclose(r.full, ref.full, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r.eigenvalues, ref.eigenvalues, rtol=1e-6)
    for samples in (2, 10_000):  # the layers' trace (its probes drawn on the host)
        kw = dict(loss="cross-entropy", trace=True, samples=samples, trace_method="layers")
        t, t_ref = jaccli.curvature(model, x.cuda(), y.cuda(), **kw), jaccli.curvature(net, x, y, **kw)
        assert t.trace == pytest.approx(t_ref.trace, rel=1e-9)
        assert t.trace_stderr == (None if t_ref.trace_stderr is None else pytest.approx(t_ref.trace_stderr, rel=1e-6))
    g = jaccli.grads(model, x.cuda(), y.cuda(), loss="cross-entropy", per_sample=True)
    torch.testing.assert_close(g.per_sample.cpu(), jaccli.grads(net, x, y, loss="cross-entropy", per_sample=True).per_sample)
