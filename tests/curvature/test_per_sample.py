"""Per-sample gradients: linear layers' rows as δₙxₙᵀ from one batched backward (jaccli.curvature.linear),
every other parameter by vmap(grad), all checked in float64 against a loop of ``autograd.grad`` per sample."""

from __future__ import annotations

import sys
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import jaccli
from problems import FORMATS, tanh_mlp

F64 = torch.float64


def loop_rows(net: nn.Module, x, y, loss: str, reduction: str = "mean") -> torch.Tensor:
    """Each sample's own loss differentiated on its own: the independent reference."""
    params = [p for p in net.parameters()]
    rows = []
    for i in range(x.shape[0]):
        out = net(x[i : i + 1])
        if loss == "cross-entropy":
            value = nn.functional.cross_entropy(out, y[i : i + 1], reduction="sum")
        elif loss == "mse":
            value = nn.functional.mse_loss(out, y[i : i + 1], reduction=reduction)
        else:
            value = nn.functional.binary_cross_entropy_with_logits(out, y[i : i + 1], reduction=reduction)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def check(g, ref: torch.Tensor, reduction: str = "mean") -> None:
    torch.testing.assert_close(g.per_sample, ref, rtol=1e-11, atol=1e-13)
    want = ref.mean(0) if reduction == "mean" else ref.sum(0)
    torch.testing.assert_close(g.gradient, want, rtol=1e-11, atol=1e-13)
    norms = ref.norm(dim=1)
    assert g.norms["max"] == pytest.approx(float(norms.max()), rel=1e-12)
    assert g.norms["min"] == pytest.approx(float(norms.min()), rel=1e-12)
    assert g.norms["largest"][0]["sample"] == int(norms.argmax())




@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("chunk", [None, 4])
def test_every_format_takes_the_linear_path_and_gives_the_loop(saved_formats, name, chunk):
    d, net, x, y = saved_formats
    model = jaccli.load_model(d / name, **FORMATS[name])
    g = jaccli.grads(model, x, y, loss="cross-entropy", per_sample=True, chunk_size=chunk)
    assert g.path == "linear" and g.as_dict()["per_sample_path"] == "linear"
    check(g, loop_rows(net, x, y, "cross-entropy"))
    with torch.no_grad():
        loss = nn.functional.cross_entropy(net(x), y)
    assert g.loss_value == pytest.approx(float(loss), rel=1e-13)


@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_and_losses(loss, reduction):
    net = tanh_mlp((3, 6, 4, 2), seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, generator=g, dtype=F64)
    y = torch.rand(7, 2, generator=g, dtype=F64)
    r = jaccli.grads(net, x, y, loss=loss, reduction=reduction, per_sample=True, chunk_size=3)
    assert r.path == "linear"
    check(r, loop_rows(net, x, y, loss, reduction), reduction)


def test_params_restricts_the_rows():
    net = tanh_mlp((3, 6, 2), seed=3)
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (5,))
    r = jaccli.grads(net, x, y, loss="cross-entropy", per_sample=True, params="2.*,0.bias")
    ref = loop_rows(net, x, y, "cross-entropy")
    names = [n for n, _ in net.named_parameters()]
    sizes = [p.numel() for p in net.parameters()]
    offsets = np.cumsum([0, *sizes])
    keep = [i for i, n in enumerate(names) if n.startswith("2.") or n == "0.bias"]
    cols = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in keep])
    assert r.path == "linear"
    torch.testing.assert_close(r.per_sample, ref[:, cols], rtol=1e-11, atol=1e-13)


class ConvNet(nn.Module):
    """A convolution (vmap's rows) before linear layers (δxᵀ rows)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x[:, None, :])).flatten(1))


class Tied(nn.Module):
    """One weight in two layers: its gradient is not one outer product."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(nn.functional.linear(torch.tanh(self.a(x)), self.a.weight)))


class Sequence(nn.Module):
    """A linear layer over [N, T, in]: its matmul's rows are N·T, not samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], 3, 2)).sum(1)


class Shifty(nn.Module):
    """A different computation on one sample and on a batch (the same function): the batched
    pass does not meet the layer the probe found."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if x.shape[0] == 1:
            return self.fc(x)
        return (x[:, None, :] * self.fc.weight).sum(-1) + self.fc.bias


class InPlace(nn.Module):
    """ReLU(inplace=True) overwrites the first layer's output: its δ is not that tensor's gradient."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.relu_(self.a(x)))


class Centred(nn.Module):
    """Samples mix (each is centred on the batch's mean): one sample's gradient is not its
    share of the batched backward, and vmap's per-sample calls are the reference."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.tanh(x - x.mean(0, keepdim=True) + 0.5 * x))


class HandWritten(nn.Module):
    """Layers written as products, as jaccli.curvature.layers recognises them for the layer-wise
    Hessian too: ``x @ W.T + b`` (a bias added to the product) and ``x @ V + c`` (``V`` stored
    ``[in, out]``: its rows are ``x δᵀ``)."""

    def __init__(self):
        super().__init__()
        self.W, self.b = nn.Parameter(torch.randn(5, 6)), nn.Parameter(torch.randn(5))
        self.V, self.c = nn.Parameter(torch.randn(5, 3) / 2), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.tanh(x @ self.W.T + self.b) @ self.V + self.c


class Broadcast(nn.Module):
    """A one-element bias broadcast over a layer's outputs: its gradient is not ``δ``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3, bias=False)
        self.b = nn.Parameter(torch.randn(1))

    def forward(self, x):
        return torch.addmm(self.b, x, self.fc.weight.T)


@pytest.mark.parametrize(
    "make, path",
    [(ConvNet, "linear+vmap"), (Tied, "linear+vmap"), (Sequence, "vmap"), (Shifty, "vmap"), (InPlace, "linear+vmap"),
     (HandWritten, "linear"), (Broadcast, "linear+vmap")],
)
def test_other_structures_take_their_path(make, path):
    torch.manual_seed(0)
    net = make().double()
    x = torch.randn(7, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(2))
    r = jaccli.grads(net, x, y, loss="cross-entropy", per_sample=True, chunk_size=3)
    assert r.path == path
    check(r, loop_rows(net, x, y, "cross-entropy"))


def test_samples_that_mix_keep_vmap():
    net = Centred().double()
    x = torch.randn(7, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(2))
    r = jaccli.grads(net, x, y, loss="cross-entropy", per_sample=True)
    assert r.path == "vmap"
    # each row is the sample's loss through the model called on that sample alone
    torch.testing.assert_close(r.per_sample, loop_rows(net, x, y, "cross-entropy"), rtol=1e-11, atol=1e-13)


def test_tied_weight_is_not_taken_as_linear():
    from jaccli.curvature.objective import build_objective

    net = Tied().double()
    x = torch.randn(3, 6, dtype=F64)
    obj = build_objective(net, x, torch.zeros(3, dtype=torch.long), loss="cross-entropy", reduction=None,
                          params=None, chunk_size=None, output=None)  # fmt: skip
    fast = obj.linear_rows()
    names = obj.space.names
    assert {names[i] for i in fast.weights} == {"b.weight"}
    assert {names[i] for i in fast.biases} == {"a.bias", "b.bias"}
    assert fast.path == "linear+vmap"
    assert fast.note == "per-sample gradients of 3 of 4 parameter tensors as δxᵀ of their linear layers, of the other 1 by vmap(grad)"


def test_streamed_rows_and_the_empirical_fisher_take_the_same_path(tmp_path):
    net = tanh_mlp((3, 5, 2), seed=4)
    x = torch.randn(10, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (10,))
    ref = loop_rows(net, x, y, "cross-entropy")
    g = jaccli.grads(net, x, y, loss="cross-entropy", per_sample=True, chunk_size=4, save=tmp_path / "g.npy")
    assert g.path == "linear"
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), ref.numpy(), rtol=1e-11, atol=1e-13)
    ef = jaccli.curvature(net, x, y, loss="cross-entropy", matrix="ef", full=True)
    np.testing.assert_allclose(ef.full, (ref.T @ ref / 10).numpy(), rtol=1e-10, atol=1e-13)


def test_float32_rows_match_vmap():
    net = tanh_mlp((4, 16, 3), dtype=torch.float32, seed=5)
    x = torch.randn(33, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (33,))
    r = jaccli.grads(net, x, y, loss="cross-entropy", per_sample=True)
    assert r.path == "linear" and r.per_sample.dtype == torch.float32
    torch.testing.assert_close(r.per_sample, loop_rows(net, x, y, "cross-entropy"), rtol=1e-5, atol=1e-6)


def test_the_dispatch_mode_leaves_dynamo_unimported():
    code = ("import sys, torch, jaccli; from problems import tanh_mlp; net = tanh_mlp((2, 3, 2)); "
            "x = torch.randn(4, 2, dtype=torch.float64); "
            "r = jaccli.grads(net, x, torch.zeros(4, dtype=torch.long), loss='cross-entropy', per_sample=True); "
            "assert r.path == 'linear'; print('torch._dynamo' in sys.modules)")  # fmt: skip
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"
