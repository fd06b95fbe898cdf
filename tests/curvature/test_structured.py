"""The layer-wise full Hessian (:mod:`jaccli.curvature.structured`) against
``torch.autograd.functional.hessian`` over the flattened parameters, in float64; models it does
not recognise fall back to the generic path with a note saying why."""

from __future__ import annotations

import fnmatch

import numpy as np
import pytest
import torch
from torch import nn

import jaccli
from jaccli.curvature import structured
from jaccli.curvature.objective import build_objective

F64 = torch.float64

LOSSES = {
    "cross-entropy": lambda out, y, r: nn.functional.cross_entropy(out, y, reduction=r),
    "mse": lambda out, y, r: nn.functional.mse_loss(out, y, reduction=r),
    "bce": lambda out, y, r: nn.functional.binary_cross_entropy_with_logits(out, y, reduction=r),
    "nll": lambda out, y, r: nn.functional.nll_loss(torch.log_softmax(out, 1), y, reduction=r),
}


def _target(loss, n, g):
    if loss in ("cross-entropy", "nll"):
        return torch.randint(0, 4, (n,), generator=g)
    if loss == "bce":
        return torch.rand(n, 4, generator=g, dtype=F64)
    return torch.randn(n, 4, generator=g, dtype=F64)


class LogSoftmaxMLP(nn.Module):
    """An MLP whose output is log-probabilities (``--loss nll``)."""

    def __init__(self, act, bias):
        super().__init__()
        self.net = mlp(act, bias)

    def forward(self, x):
        return torch.log_softmax(self.net(x), 1)


def mlp(act=nn.Tanh, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6, bias=bias), act(), nn.Linear(6, 5, bias=bias), act(),
                         nn.Linear(5, 4, bias=bias)).double()  # fmt: skip


class Residual(nn.Module):
    """A skip connection and a squared activation: the input of a later layer depends on
    several earlier outputs (the T term through more than one path)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 4, bias=False)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + torch.relu(self.b(h)) ** 2
        return self.c(h * torch.sigmoid(h))


def reference(net, x, y, loss, reduction, params=None):
    """The Hessian over the flattened selected parameters by ``autograd.functional.hessian``."""
    named = dict(net.named_parameters())
    names = [k for k in named if params is None or any(fnmatch.fnmatchcase(k, g) for g in params.split(","))]
    shapes = [named[k].shape for k in names]
    flat = torch.cat([named[k].detach().reshape(-1) for k in names])
    fixed = {k: v.detach() for k, v in named.items() if k not in names}

    def f(v):
        state, o = dict(fixed), 0
        for k, s in zip(names, shapes):
            state[k] = v[o : o + s.numel()].reshape(s)
            o += s.numel()
        out = torch.func.functional_call(net, state, (x,))
        if loss == "nll" and isinstance(net, LogSoftmaxMLP):
            return nn.functional.nll_loss(out, y, reduction=reduction)
        return LOSSES[loss](out, y, reduction)

    return torch.autograd.functional.hessian(f, flat).numpy()


def _data(loss, n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), _target(loss, n, g)


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.GELU])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_activations_against_autograd(act, bias):
    net = mlp(act, bias)
    x, y = _data("cross-entropy")
    r = jaccli.curvature(net, x, y, loss="cross-entropy", full=True)
    assert r.notes == []  # the layer-wise path, no fallback
    np.testing.assert_allclose(r.full, reference(net, x, y, "cross-entropy", "mean"), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross-entropy", "mse", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_losses_and_reductions(loss, reduction):
    net = mlp(nn.GELU)
    x, y = _data(loss, seed=3)
    r = jaccli.curvature(net, x, y, loss=loss, reduction=reduction, full=True)
    assert r.notes == []
    np.testing.assert_allclose(r.full, reference(net, x, y, loss, reduction), rtol=1e-9, atol=1e-12)


def test_nll_on_log_probabilities():
    net = LogSoftmaxMLP(nn.Tanh, True).double()
    x, y = _data("nll", seed=4)
    r = jaccli.curvature(net, x, y, loss="nll", full=True)
    assert r.notes == []
    np.testing.assert_allclose(r.full, reference(net, x, y, "nll", "mean"), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("params", ["0.*", "2.weight", "*.bias", "0.weight,4.bias", "2.bias,4.weight"])
def test_parameter_subsets(params):
    net = mlp()
    x, y = _data("cross-entropy", seed=5)
    r = jaccli.curvature(net, x, y, loss="cross-entropy", params=params, full=True)
    assert r.notes == []
    np.testing.assert_allclose(r.full, reference(net, x, y, "cross-entropy", "mean", params), rtol=1e-9, atol=1e-12)


def test_residual_model_with_later_inputs_depending_on_earlier_layers():
    net = Residual().double()
    x, y = _data("cross-entropy", seed=6)
    r = jaccli.curvature(net, x, y, loss="cross-entropy", full=True)
    assert r.notes == []
    np.testing.assert_allclose(r.full, reference(net, x, y, "cross-entropy", "mean"), rtol=1e-9, atol=1e-12)


class HandWritten(nn.Module):
    """Layers written as products: ``x @ W.T + b`` and ``x @ V + c`` (``V`` stored ``[in, out]``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.W, self.b = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5))
        self.V, self.c = nn.Parameter(torch.randn(5, 4) / 2), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.tanh(x @ self.W.T + self.b) @ self.V + self.c


@pytest.mark.parametrize("params", [None, "V", "W,c", "b,V"])
def test_hand_written_products_and_stored_transposed_weights(params):
    net = HandWritten().double()
    x, y = _data("cross-entropy", seed=10)
    r = jaccli.curvature(net, x, y, loss="cross-entropy", params=params, full=True)
    assert r.notes == []
    np.testing.assert_allclose(r.full, reference(net, x, y, "cross-entropy", "mean", params), rtol=1e-9, atol=1e-12)


def test_chunks_equal_one_chunk(monkeypatch):
    net = mlp()
    x, y = _data("cross-entropy", n=41, seed=7)
    obj = build_objective(net, x, y, loss="cross-entropy", reduction=None, params=None, chunk_size=None, output=None)
    whole = structured.structured_hessian(obj)
    monkeypatch.setattr(structured, "MAX_CHUNK", 6)  # 7 chunks, the last one short
    chunked = structured.structured_hessian(obj)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(whole.numpy(), reference(net, x, y, "cross-entropy", "mean"), rtol=1e-9, atol=1e-12)


def test_chunk_size_caps_the_chunks(monkeypatch):
    """``--chunk-size`` reaches the layer-wise path: its chunks are at most that many samples."""
    net = mlp()
    x, y = _data("cross-entropy", n=23, seed=3)
    seen = []
    real_take = structured.take

    def spy(args, a, b):
        seen.append(b - a)
        return real_take(args, a, b)

    monkeypatch.setattr(structured, "take", spy)
    whole = structured.structured_hessian(
        build_objective(net, x, y, loss="cross-entropy", reduction=None, params=None, chunk_size=None, output=None))
    assert max(seen) == len(x)  # one chunk where the caller says nothing (the test data fit MAX_CHUNK)
    seen.clear()
    obj = build_objective(net, x, y, loss="cross-entropy", reduction=None, params=None, chunk_size=5, output=None)
    chunked = structured.structured_hessian(obj)
    loop = seen[1:]  # the first take is the one sample the model is recorded at
    assert seen[0] == 1 and max(loop) == 5 and sum(loop) == len(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_float32_model_close_to_float64():
    net = mlp()
    x, y = _data("cross-entropy", seed=8)
    want = reference(net, x, y, "cross-entropy", "mean")
    r = jaccli.curvature(net.float(), x.float(), y, loss="cross-entropy", full=True, trace=True, eig=2)
    assert r.notes == [] and r.full.dtype == np.float32  # the model's precision: no float64 copy of P×P
    np.testing.assert_allclose(r.full, want, rtol=0, atol=2e-6 * np.abs(want).max())
    assert r.trace == pytest.approx(np.trace(want), rel=1e-5)
    np.testing.assert_allclose(r.eigenvalues, np.linalg.eigvalsh(want)[::-1][:2], rtol=1e-5)


class SmallCNN(nn.Module):
    def __init__(self, outputs=4):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 3 * 3, outputs)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Tied(nn.Module):
    """One weight used twice (an encoder and its transposed decoder)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return torch.tanh(x @ self.w.T) @ self.w


class Sequence(nn.Module):
    """A linear layer over a sequence axis: the per-sample input has several rows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x.reshape(-1, 2, 3))).sum(1)


class Broadcast(nn.Module):
    """A one-element bias broadcast over the layer's outputs: not a column of the layer's input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.w, self.b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(1))

    def forward(self, x):
        return torch.addmm(self.b, x, self.w.T)


@pytest.mark.parametrize("make, x, why", [
    (SmallCNN, torch.randn(9, 1, 5, 5), "conv"),
    (Tied, torch.randn(9, 4), "used 2 times"),
    (Sequence, torch.randn(9, 6), "per sample"),
    (Broadcast, torch.randn(9, 3), "broadcast"),
])  # fmt: skip
def test_unrecognised_models_fall_back_with_a_note(make, x, why):
    net = make().double()
    x = x.double()
    y = torch.randint(0, 4, (x.shape[0],))
    r = jaccli.curvature(net, x, y, loss="cross-entropy", full=True)
    assert len(r.notes) == 1 and "not layer by layer" in r.notes[0] and why in r.notes[0]
    assert r.as_dict()["notes"] == r.notes
    np.testing.assert_allclose(r.full, reference(net, x, y, "cross-entropy", "mean"), rtol=1e-9, atol=1e-12)


def test_the_check_refuses_a_wrong_matrix():
    net = mlp()
    x, y = _data("cross-entropy", seed=9)
    obj = build_objective(net, x, y, loss="cross-entropy", reduction=None, params=None, chunk_size=None, output=None)
    H = structured.structured_hessian(obj)
    structured._check(obj, H)  # the right one passes
    H[3, 5] += 1e-3 * H.abs().max()
    with pytest.raises(structured.NotStructured, match="disagrees with a Hessian-vector product"):
        structured._check(obj, H)


# ------------------------------------------------------------------ the command line, torchrun


def _jaccli(cwd, *args, torchrun=False):
    import os
    import subprocess
    import sys

    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "jaccli"] \
        if torchrun else [sys.executable, "-m", "jaccli"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([*pre, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from problems import save_torchscript, tanh_mlp

    d = tmp_path_factory.mktemp("structured")
    net = tanh_mlp((2, 6, 5, 3))
    jaccli.save_mlp(net, d / "m.safetensors")
    save_torchscript(SmallCNN().double(), d / "cnn.pt")
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((40, 2)))
    np.save(d / "y.npy", rng.integers(0, 3, 40))
    np.save(d / "img.npy", rng.standard_normal((12, 1, 5, 5)))
    np.save(d / "yi.npy", rng.integers(0, 4, 12))
    return d, net


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="gloo")
def test_cli_and_torchrun_equal_the_float64_reference(saved, tmp_path):
    import json

    d, net = saved
    x, y = torch.from_numpy(np.load(d / "x.npy")), torch.from_numpy(np.load(d / "y.npy"))
    want = reference(net, x, y, "cross-entropy", "mean")
    common = [d / "m.safetensors", d / "x.npy", "--target", d / "y.npy", "--loss", "cross-entropy", "--full", "--json"]
    for torchrun in (False, True):  # torchrun: two ranks, a shard of the samples each, all-reduced
        name = f"h{int(torchrun)}.npz"
        r = _jaccli(tmp_path, "curvature", *common, "--chunk-size", "6", "--save", name, torchrun=torchrun)
        assert r.returncode == 0, r.stderr
        (doc,) = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]  # rank 0 alone prints
        assert doc["notes"] == []
        np.testing.assert_allclose(np.load(tmp_path / name)["full"], want, rtol=1e-9, atol=1e-12)


def test_cli_table_says_why_a_cnn_falls_back(saved, tmp_path):
    d, _ = saved
    r = _jaccli(tmp_path, "curvature", d / "cnn.pt", d / "img.npy", "--target", d / "yi.npy", "--loss", "cross-entropy",
                "--full", "--trace")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "note: full Hessian by products with unit vectors, not layer by layer" in " ".join(r.stdout.split())


def test_no_note_where_the_matrix_was_not_asked_for():
    net = SmallCNN().double()
    x = torch.randn(9, 1, 5, 5, dtype=F64)
    y = torch.randint(0, 4, (9,))
    r = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True)  # exact: the diagonal of the assembled matrix
    assert r.notes == [] and r.trace_stderr is None
    assert r.trace == pytest.approx(np.trace(reference(net, x, y, "cross-entropy", "mean")), rel=1e-10)


class BatchCentred(nn.Module):
    """Linear layers whose outputs are centred over the batch: the samples mix, which the
    per-sample layer-wise form cannot see and the checking product catches."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h - h.mean(0, keepdim=True)))


def test_samples_that_mix_are_caught_by_the_check():
    net = BatchCentred().double()
    x, y = _data("cross-entropy", seed=11)
    r = jaccli.curvature(net, x, y, loss="cross-entropy", full=True)
    assert len(r.notes) == 1 and "disagrees with a Hessian-vector product" in r.notes[0]
    np.testing.assert_allclose(r.full, reference(net, x, y, "cross-entropy", "mean"), rtol=1e-9, atol=1e-12)


def test_a_cnn_restricted_to_its_linear_head_goes_layer_by_layer():
    net = SmallCNN().double()
    x = torch.randn(9, 1, 5, 5, dtype=F64)
    y = torch.randint(0, 4, (9,))
    r = jaccli.curvature(net, x, y, loss="cross-entropy", params="head.*", full=True)
    assert r.notes == []  # the convolution's weights are constants: only the head's layer counts
    np.testing.assert_allclose(r.full, reference(net, x, y, "cross-entropy", "mean", "head.*"), rtol=1e-9, atol=1e-12)
