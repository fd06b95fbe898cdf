"""The Hessian's trace by per-sample probes of the linear layers' outputs
(:mod:`jaccli.curvature.layertrace`): exact with unit probes, against the trace of
``torch.autograd.functional.hessian`` over the flattened parameters in float64; the estimate
within its standard error over seeds, the same whatever the chunks; models it does not apply to
take the parameter-space estimators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from problems import tanh_mlp, trace_se_bound
from test_per_sample import InPlace
from test_structured import _data, BatchCentred, HandWritten, LogSoftmaxMLP, mlp, reference, Residual, SmallCNN
from torch import nn

import jaccli
from jaccli.curvature import api, layertrace
from jaccli.curvature.objective import build_objective
from jaccli.errors import UsageError
from jaccli.request.choices import TRACE_METHODS

F64 = torch.float64


@pytest.fixture(autouse=True)
def _estimated(monkeypatch):
    monkeypatch.setattr(api, "EXACT_LIMIT", 0)  # these small models past the exact limit: the estimators run


def _exact(net, x, y, loss="cross-entropy", **kw):
    """The layers' trace with enough rounds for unit probes (exact)."""
    r = jaccli.curvature(net, x, y, loss=loss, trace=True, samples=10_000, trace_method="layers", **kw)
    assert r.trace_stderr is None and r.trace_estimator is None
    assert r.notes == ["the trace is exact: the linear layers' output Hessians by unit probes"]
    return r.trace


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.GELU])
@pytest.mark.parametrize("bias", [True, False])
def test_exact_on_mlps(act, bias):
    net = mlp(act, bias)
    x, y = _data("cross-entropy")
    assert _exact(net, x, y) == pytest.approx(np.trace(reference(net, x, y, "cross-entropy", "mean")), rel=1e-10)


@pytest.mark.parametrize("loss", ["cross-entropy", "mse", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_for_each_loss_and_reduction(loss, reduction):
    net = mlp(nn.GELU)
    x, y = _data(loss, seed=3)
    want = np.trace(reference(net, x, y, loss, reduction))
    assert _exact(net, x, y, loss, reduction=reduction) == pytest.approx(want, rel=1e-10)


def test_exact_for_nll_on_log_probabilities():
    net = LogSoftmaxMLP(nn.Tanh, True).double()
    x, y = _data("nll", seed=4)
    assert _exact(net, x, y, "nll") == pytest.approx(np.trace(reference(net, x, y, "nll", "mean")), rel=1e-10)


@pytest.mark.parametrize("params", ["0.*", "2.weight", "*.bias", "0.weight,4.bias"])
def test_exact_for_parameter_subsets(params):
    net = mlp()
    x, y = _data("cross-entropy", seed=5)
    want = np.trace(reference(net, x, y, "cross-entropy", "mean", params))
    assert _exact(net, x, y, params=params) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize(("make", "params"), [(Residual, None), (HandWritten, None), (HandWritten, "V"),
                                              (HandWritten, "W,b")])  # fmt: skip
def test_exact_for_residual_and_hand_written_layers(make, params):
    net = make().double()
    x, y = _data("cross-entropy", seed=6)
    want = np.trace(reference(net, x, y, "cross-entropy", "mean", params))
    assert _exact(net, x, y, params=params) == pytest.approx(want, rel=1e-10)


def test_the_estimate_is_calibrated_over_seeds():
    """40 seeds of 6 rounds each: every estimate within 4 standard errors of the exact trace, and
    the squared z-scores average about 1 (the standard error is neither too small nor too large)."""
    net = tanh_mlp((4, 16, 16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 4, generator=g, dtype=F64), torch.randint(0, 3, (200,), generator=g)
    want = np.trace(reference(net, x, y, "cross-entropy", "mean"))
    z = []
    for seed in range(40):
        r = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, samples=6, seed=seed)
        assert r.trace_estimator == "per-sample Hutchinson" and r.products == 6
        z.append((r.trace - want) / r.trace_stderr)
    z = np.array(z)
    assert np.all(np.abs(z) < 4), z
    assert 0.5 < np.mean(z**2) < 1.8, z


def test_more_accurate_than_parameter_probes_from_the_same_products():
    """The point of it: on this MLP one round has a fraction of a parameter probe's variance."""
    net = tanh_mlp((4, 32, 32, 3))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 4, generator=g, dtype=F64), torch.randint(0, 3, (300,), generator=g)
    layers = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, samples=20)
    products = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, samples=20, trace_method="products")
    assert layers.trace_estimator == "per-sample Hutchinson" and products.trace_estimator in ("Hutch++", "Hutchinson")
    assert layers.trace_stderr < products.trace_stderr / 3


def test_chunks_do_not_change_the_estimate():
    """A sample's probe depends on the seed, the round and its index alone (as on torchrun's ranks)."""
    net = mlp()
    x, y = _data("cross-entropy", n=41, seed=7)
    kw = dict(loss="cross-entropy", reduction=None, params=None, output=None)
    whole = layertrace.layer_trace(build_objective(net, x, y, chunk_size=None, **kw), 5, seed=3)
    chunked = layertrace.layer_trace(build_objective(net, x, y, chunk_size=6, **kw), 5, seed=3)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-12) and chunked[1] == pytest.approx(whole[1], rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_the_models_dtype_against_the_float64_trace(dtype):
    net = mlp()
    x, y = _data("cross-entropy", n=64, seed=8)
    want = np.trace(reference(net, x, y, "cross-entropy", "mean"))
    r = jaccli.curvature(net.to(dtype), x.to(dtype), y, loss="cross-entropy", trace=True, samples=8)
    assert r.trace_estimator == "per-sample Hutchinson" and abs(r.trace - want) < 4 * r.trace_stderr
    assert r.as_dict()["trace_estimator"] == "per-sample Hutchinson"
    assert _exact(net.to(dtype), x.to(dtype), y) == pytest.approx(want, rel=1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize(("make", "shape"), [(SmallCNN, (9, 1, 5, 5)), (BatchCentred, (9, 3))])
def test_other_models_take_the_parameter_space_estimators(make, shape):
    """A convolution, samples that mix: ``auto`` takes Hutch++/Hutchinson, ``layers`` is refused."""
    net = make().double()
    x = torch.randn(*shape, dtype=F64)
    y = torch.randint(0, 4, (9,))
    r = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, samples=30)
    assert r.trace_estimator in ("Hutch++", "Hutchinson")
    H = reference(net, x, y, "cross-entropy", "mean")
    assert abs(r.trace - np.trace(H)) < 4 * r.trace_stderr <= 8 * trace_se_bound(H, 30)
    with pytest.raises(UsageError, match="--trace-method layers needs"):
        jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, trace_method="layers")


def test_a_layer_changed_in_place_takes_the_parameter_space_estimators_where_its_parameters_are_selected():
    """``relu_`` overwrites the first layer's output (its δ is not that tensor's gradient): with
    every parameter selected the layers' trace does not apply and ``auto`` takes Hutch++ or
    Hutchinson; with the second layer's alone (the overwritten tensor only its input, the first
    layer's parameters constants) the layers' trace applies and is exact."""
    torch.manual_seed(0)
    net = InPlace().double()
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(12, 6, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)
    r = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, samples=30)
    assert r.trace_estimator in ("Hutch++", "Hutchinson")
    H = reference(net, x, y, "cross-entropy", "mean")
    assert abs(r.trace - np.trace(H)) < 4 * r.trace_stderr <= 8 * trace_se_bound(H, 30)
    with pytest.raises(UsageError, match="--trace-method layers needs"):
        jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, trace_method="layers")
    want = np.trace(reference(net, x, y, "cross-entropy", "mean", "b.*"))
    assert _exact(net, x, y, params="b.*") == pytest.approx(want, rel=1e-10)


def test_the_methods_the_cli_offers_are_the_ones_the_library_knows():
    assert tuple(api.TRACE_METHODS) == TRACE_METHODS
    with pytest.raises(UsageError, match="unknown --trace-method"):
        jaccli.curvature(mlp(), *_data("cross-entropy"), loss="cross-entropy", trace=True, trace_method="nope")


@pytest.mark.parametrize("name", ["script.pt", "trace.pt", "dynamic.pt2", "mlp.safetensors", "state.pt", "static.pt2"])
def test_every_format_gives_the_eager_models_estimate(saved_formats, name):
    """The same probes, the same layers: TorchScript, a dynamic-batch ``.pt2`` program, a
    safetensors MLP and a state dict give the ``nn.Module``'s estimate; a program exported for
    one batch size takes the parameter-space estimators (its chunks are padded)."""
    from problems import FORMATS

    d, net, x, y = saved_formats
    H = reference(net, x, y, "cross-entropy", "mean")
    want = np.trace(H)
    ref = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, samples=5, seed=2)
    r = jaccli.curvature(jaccli.load_model(d / name, **FORMATS[name]), x, y, loss="cross-entropy", trace=True, samples=5,
                         seed=2)  # fmt: skip
    if name == "static.pt2":
        assert r.trace_estimator in ("Hutch++", "Hutchinson") and r.trace_stderr <= trace_se_bound(H, 5)
    else:
        assert r.trace_estimator == "per-sample Hutchinson"
        assert r.trace == pytest.approx(ref.trace, rel=1e-10) and r.trace_stderr == pytest.approx(ref.trace_stderr, rel=1e-8)
    assert abs(r.trace - want) < 4 * r.trace_stderr


@pytest.mark.parametrize("loss", ["output", "log-likelihood"])
def test_exact_when_the_output_is_the_loss_or_the_log_likelihood(loss):
    """``output``: the mean of the outputs; ``log-likelihood``: the observed information, −∇² of the summed output."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 1)).double()
    x, _ = _data("mse", seed=9)
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def f(v):
        state, o = {}, 0
        for k, s in zip(names, shapes):
            state[k] = v[o : o + s.numel()].reshape(s)
            o += s.numel()
        out = torch.func.functional_call(net, state, (x,))
        return out.mean() if loss == "output" else -out.sum()

    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    want = float(torch.trace(torch.autograd.functional.hessian(f, flat)))
    assert _exact(net, x, None, loss) == pytest.approx(want, rel=1e-10)


def test_a_loss_linear_in_each_layers_output_has_trace_zero():
    """Two linear layers and the output as the loss: every δ is constant, the blocks are zero."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 1)).double()
    x = torch.randn(40, 6, dtype=F64)
    r = jaccli.curvature(net, x, loss="output", trace=True, samples=3)  # Σ d_l = 5 > 3: estimated
    assert r.trace == 0.0 and r.trace_stderr == 0.0 and r.trace_estimator == "per-sample Hutchinson"
    assert _exact(net, x, None, "output") == 0.0


def test_by_layer_traces_of_linear_tensors_by_their_layers_probes():
    """Each tensor's diagonal-block trace: exact where the layer's width fits ``samples``, else
    estimated within 4 of its standard errors; a model's other tensors keep Hutch++/Hutchinson."""
    net = mlp()
    x, y = _data("cross-entropy", n=31, seed=12)
    H = reference(net, x, y, "cross-entropy", "mean")
    offsets = np.cumsum([0] + [p.numel() for p in net.parameters()])
    blocks = [float(np.trace(H[a:b, a:b])) for a, b in zip(offsets[:-1], offsets[1:])]
    exact = jaccli.curvature(net, x, y, loss="cross-entropy", by_layer=True, samples=10)  # widths 6, 5, 4 ≤ 10
    names = [name for name, _ in net.named_parameters()]
    assert [row["name"] for row in exact.by_layer] == names  # a row per tensor: none left out
    for row, want in zip(exact.by_layer, blocks, strict=True):
        assert row["trace_stderr"] is None and row["trace"] == pytest.approx(want, rel=1e-10), row["name"]
    est = jaccli.curvature(net, x, y, loss="cross-entropy", by_layer=True, samples=3)  # 6 and 5 > 3: estimated
    assert [row["name"] for row in est.by_layer] == names
    for row, want in zip(est.by_layer, blocks, strict=True):
        assert abs(row["trace"] - want) <= 4 * (row["trace_stderr"] or 1e-12 * abs(want)), row["name"]
