"""Every common architecture, saved as users save it, gives the derivatives torch.func gives
on the eager module: architectures × formats × dtypes × commands, on small shapes.

Formats: the eager module itself, TorchScript (``torch.jit.script`` where it scripts, else
``torch.jit.trace``) and ``torch.export`` with a dynamic batch. ``--dtype float64`` must
convert everything the saved model holds or creates (recurrent weights, lifted constants,
dtypes baked into traces), and second derivatives through attention must work although
the fused kernels have no double backward.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

import jaccli
from architectures import LAYERS, ZOO
from architectures import trace as trace_zoo
from problems import make_examples


class ConvMix(nn.Module):
    """1-d, transposed and 3-d convolutions, upsampling, max pooling (non-smooth)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv1d(2, 3, 3, stride=2, padding=1)
        self.ct = nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.c3 = nn.Conv3d(1, 2, 2)
        self.fc = nn.Linear(2 * 12 + 2 * 2 + 2 * 6, 2)

    def forward(self, x):  # x [B, 2, 6]
        h = torch.tanh(self.c1(x))
        h = nn.functional.interpolate(torch.tanh(self.ct(h)), scale_factor=2.0, mode="linear")  # [B, 2, 12]
        v = torch.sigmoid(self.c3(x.reshape(-1, 1, 2, 2, 3)))  # [B, 2, 1, 1, 2]
        m = nn.functional.max_pool1d(h * h, 2)  # [B, 2, 6]
        return self.fc(torch.cat([h.flatten(1), v.flatten(1), m.flatten(1)], 1))


class Flow(nn.Module):
    """A RealNVP-style normalising flow on R⁴: two affine couplings (scale by exp(tanh)),
    each conditioned on a learned embedding of its layer added to the float input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Embedding(2, 2)
        self.nets = nn.ModuleList(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4)) for _ in range(2))
        self.register_buffer("layer", torch.arange(2))

    def forward(self, x):  # x [B, 4] -> z [B, 4], square: divergence applies
        e = self.embed(self.layer)  # [2, 2], constant per layer
        for k, net in enumerate(self.nets):
            a, b = (x[:, :2], x[:, 2:]) if k == 0 else (x[:, 2:], x[:, :2])
            s, t = net(a + e[k]).chunk(2, dim=1)
            b = b * torch.exp(torch.tanh(s)) + t
            x = torch.cat([a, b], 1) if k == 0 else torch.cat([b, a], 1)
        return x


class Attention(nn.Module):
    """MultiheadAttention, RMSNorm, LayerNorm, softmax, log-softmax, einsum."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.rms = nn.RMSNorm(4)
        self.ln = nn.LayerNorm(4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):  # x [B, 3, 4]
        a, _ = self.mha(x, x, x, need_weights=False)
        h = self.ln(self.rms(x + a))
        s = torch.einsum("bti,ij,bsj->bts", h, self.w, h)
        return torch.softmax(s, -1).sum(1) + torch.log_softmax(h, -1).mean(2)


class Recurrent(nn.Module):
    """GRU into LSTM into RNN, the last step's state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.gru = nn.GRU(2, 3, batch_first=True)
        self.lstm = nn.LSTM(3, 3, batch_first=True)
        self.rnn = nn.RNN(3, 2, batch_first=True)

    def forward(self, x):  # x [B, 4, 2]
        h, _ = self.gru(x)
        h, _ = self.lstm(h)
        h, _ = self.rnn(h)
        return h[:, -1]


class RecurrentSeqFirst(nn.Module):
    """Sequence-first layers (batch_first=False) on the transposed batch: a bidirectional
    LSTM, then a GRU whose initial state is computed from the input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.lstm = nn.LSTM(2, 3, bidirectional=True)
        self.h0 = nn.Linear(2, 2)
        self.gru = nn.GRU(6, 2)

    def forward(self, x):  # x [B, 3, 2]
        h, _ = self.lstm(x.transpose(0, 1))  # [3, B, 6]
        h, last = self.gru(h, torch.tanh(self.h0(x[:, 0]))[None])
        return h.mean(0) + last[0]


class NeuralODE(nn.Module):
    """dy/dt = tanh(W y + b) by classical Runge–Kutta, 4 fixed steps of 0.25."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.f = nn.Linear(3, 3)

    def forward(self, y):  # y [B, 3]
        h = 0.25
        for _ in range(4):
            k1 = torch.tanh(self.f(y))
            k2 = torch.tanh(self.f(y + h / 2 * k1))
            k3 = torch.tanh(self.f(y + h / 2 * k2))
            k4 = torch.tanh(self.f(y + h * k3))
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y


#: name -> (module factory, shape of one point)
ARCHITECTURES = {
    "cnn": (lambda: make_examples.SmallCNN(channels=2, width=4, classes=3), (2, 6, 6)),
    "transformer": (lambda: make_examples.SmallTransformer(tokens=3, dim=8, heads=2, layers=1), (3, 8)),
    "convolutions": (ConvMix, (2, 6)),
    "attention": (Attention, (3, 4)),
    "recurrent": (Recurrent, (4, 2)),
    "recurrent_seq_first": (RecurrentSeqFirst, (3, 2)),
    "ode": (NeuralODE, (3,)),
    "flow": (Flow, (4,)),
}
#: architectures that torch.jit.script cannot compile are traced (as their users do)
_TRACED = {"attention", "recurrent", "recurrent_seq_first"}
FORMATS = ["eager", "pt", "pt2"]
DTYPES = {"float32": (torch.float32, 1e-5), "float64": (torch.float64, 1e-10)}


def _save(name: str, fmt: str, tmp) -> str | nn.Module:
    factory, shape = ARCHITECTURES[name]
    module = factory().eval()
    if fmt == "eager":
        return module
    example = torch.randn(2, *shape)
    path = tmp / f"{name}.{fmt}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations of TorchScript, export's notes on RNN weights
        if fmt == "pt2":
            try:
                make_examples.save_export(module, (example,), path)
            except Exception:  # MultiheadAttention specialises the batch: export it static, as users must
                make_examples.save_export(module, (example,), path, dynamic=False)
        elif name in _TRACED:
            torch.jit.save(torch.jit.trace(module, example, check_trace=False), path)
        else:
            torch.jit.save(torch.jit.script(module), path)
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache: dict = {}

    def get(name: str, fmt: str):
        if (name, fmt) not in cache:
            cache[name, fmt] = _save(name, fmt, tmp_path_factory.mktemp(f"{name}-{fmt}"))
        return cache[name, fmt]

    return get


@contextmanager
def _differentiable_kernels():
    """Attention on its math kernel and recurrent layers on ATen's cell loop: the fused
    kernels have no double backward, and oneDNN's LSTM no vmap rule."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mkldnn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mkldnn.enabled = mkldnn


def _reference(name: str, kind: str, x: torch.Tensor) -> torch.Tensor:
    """torch.func on the eager module, point by point, in x's dtype.

    A loop over the points rather than vmap: a recurrent layer's cell loop adds its
    input gates in place into those of its initial state, which vmap over the points
    cannot batch (the state is created unbatched inside the module).
    """
    module = ARCHITECTURES[name][0]().eval().to(x.dtype)
    for p in module.parameters():
        p.requires_grad_(False)
    one = lambda xi: module(xi[None])[0]  # noqa: E731
    with _differentiable_kernels():
        if kind == "jacobian":
            return torch.stack([jacrev(one)(xi) for xi in x])
        h = torch.stack([hessian(one)(xi) for xi in x])
        if kind == "hessian":
            return h
        n = math.prod(x.shape[1:])
        return h.reshape(*h.shape[: h.dim() - 2 * (x.dim() - 1)], n, n).diagonal(dim1=-2, dim2=-1).sum(-1)


def _assert_close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(want.abs().max()), 1e-30)
    err = float((got - want).abs().max())
    assert err <= rel * scale, f"max error {err:.3g} at scale {scale:.3g} (rel {err / scale:.2g} > {rel})"


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_matches_torch_func(saved, name, fmt, dtype, kind):
    torch_dtype, rel = DTYPES[dtype]
    model = saved(name, fmt)
    net = jaccli.load_model(model, dtype=dtype) if isinstance(model, str) else model.to(torch_dtype)
    x = torch.randn(3, *ARCHITECTURES[name][1], generator=torch.Generator().manual_seed(7)).to(torch_dtype)
    if kind == "laplacian":
        out = ARCHITECTURES[name][0]()(x[:1].float()).shape[1:]
        if len(out) != 1:
            pytest.skip("the Laplacian is of a vector output per point")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaccli.JaccliWarning)  # max pooling's and ReLU's kinks
        got = getattr(jaccli, kind)(net, x, per_sample=True)
    _assert_close(got, _reference(name, kind, x), rel)


@pytest.mark.parametrize("fmt", ["pt", "pt2"])
@pytest.mark.parametrize("name", ["recurrent", "transformer", "cnn"])
def test_float64_converts_everything_the_saved_model_holds(saved, name, fmt):
    """Recurrent weights, lifted constants and dtypes baked into traces all follow --dtype:
    the saved model in float64 computes what the eager module computes in float64."""
    net = jaccli.load_model(saved(name, fmt), dtype="float64")
    x = torch.randn(2, *ARCHITECTURES[name][1], dtype=torch.float64)
    eager = ARCHITECTURES[name][0]().eval().double()
    with torch.no_grad():
        got, want = net(x), eager(x)
    assert got.dtype == torch.float64
    _assert_close(got, want, 1e-12)


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian"])
@pytest.mark.parametrize("fmt", ["eager", "pt"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_forward_mode_takes_the_fast_path_on_every_architecture(saved, name, fmt, kind):
    """Convolutions, norms, softmax, attention, pooling and ATen's recurrent cell loops all
    have Taylor rules (or are decomposed into ops that do, or updated in place where the
    replay can follow): forward mode runs the fast path and agrees in float64."""
    model = saved(name, fmt)
    net = jaccli.load_model(model, dtype="float64") if isinstance(model, str) else model.double()
    x = torch.randn(3, *ARCHITECTURES[name][1], generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    if kind == "laplacian" and len(net(x[:1]).shape) != 2:
        pytest.skip("the Laplacian is of a vector output per point")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaccli.JaccliWarning)
        plan = jaccli.plan(kind, net, x, per_sample=True, mode="forward")
        # "attention" as .pt is a trace: MultiheadAttention's shape arithmetic on 0-dim
        # tensors made outside the dispatcher is replayed at the batch at hand
        assert plan.engine == "taylor", plan.engine_note
        got = getattr(jaccli, kind)(net, x, per_sample=True, mode="forward")
    _assert_close(got, _reference(name, kind, x), 1e-10)


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_recurrent_whole_input_matches_torch_func(saved, fmt, kind):
    """Without --per-sample the whole batch is one point. float32, where the LSTM would
    run on oneDNN's kernel (float64 has no oneDNN kernel: the matrix above covers it)."""
    torch_dtype, rel = DTYPES["float32"]
    model = saved("recurrent", fmt)
    net = jaccli.load_model(model) if isinstance(model, str) else model.to(torch_dtype)
    x = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(8)).to(torch_dtype)
    module = Recurrent().eval().to(torch_dtype)
    for p in module.parameters():
        p.requires_grad_(False)
    got = getattr(jaccli, kind)(net, x)  # first: it loads torch's forward-AD decompositions quietly
    with _differentiable_kernels():
        want = jacrev(module)(x) if kind == "jacobian" else hessian(module)(x)
    if kind == "laplacian":
        want = want.reshape(2, 2, x.numel(), x.numel()).diagonal(dim1=-2, dim2=-1).sum(-1)
    _assert_close(got, want, rel)


def test_recurrent_derivatives_match_finite_differences(saved):
    """The references above are torch.func too: jaccli's float64 Jacobian and Hessian of a
    saved recurrent net against central differences of the model (of the Jacobian)."""
    net = jaccli.load_model(saved("recurrent", "pt2"), dtype="float64")
    x = torch.randn(2, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    report = jaccli.check(net, x, points=2, hessian_too=True, tolerance=1e-7)
    assert report.passed, report.failures


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["flow", "ode"])
def test_divergence_of_square_maps(saved, name, fmt, dtype):
    """The divergence of a flow's transform and of an ODE's flow map, on both engines."""
    torch_dtype, rel = DTYPES[dtype]
    model = saved(name, fmt)
    net = jaccli.load_model(model, dtype=dtype) if isinstance(model, str) else model.to(torch_dtype)
    x = torch.randn(3, *ARCHITECTURES[name][1], generator=torch.Generator().manual_seed(9)).to(torch_dtype)
    want = _reference(name, "jacobian", x).diagonal(dim1=1, dim2=2).sum(-1)
    for mode in ("forward", "reverse"):
        _assert_close(jaccli.divergence(net, x, per_sample=True, mode=mode), want, rel)


@pytest.mark.parametrize("kind", ["jacobian", "hessian"])
@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if not n.startswith("recurrent")])
def test_whole_input_matches_torch_func(saved, name, kind):
    """Without --per-sample the whole batch is one point (.pt2, float64): the cross-point
    blocks come out as torch.func gives them (zeros, for these batch-independent models)."""
    model = saved(name, "pt2")
    net = jaccli.load_model(model, dtype="float64")
    x = torch.randn(2, *ARCHITECTURES[name][1], generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    module = ARCHITECTURES[name][0]().eval().double()
    for p in module.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaccli.JaccliWarning)
        got = getattr(jaccli, kind)(net, x)
    with _differentiable_kernels():
        want = jacrev(module)(x) if kind == "jacobian" else hessian(module)(x)
    _assert_close(got, want, 1e-10)


# ---- traces of real architectures (tests/architectures.py): the fast path, as from .pt2

_FAST = list(ZOO)  # recurrent nets included: ATen's cell loop updates views in place that the replay follows
_SMALL = [name for name in _FAST if math.prod(ZOO[name][1]) <= 16]


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    """The model traced in float32 at 2 points (as users save them), as a .pt file."""
    cache: dict = {}

    def get(name: str) -> str:
        if name not in cache:
            path = tmp_path_factory.mktemp("traces") / f"{name}.pt"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's
                torch.jit.save(trace_zoo(name)[0], path)
            cache[name] = str(path)
        return cache[name]

    return get


def _zoo_reference(name: str, kind: str, x: torch.Tensor) -> torch.Tensor:
    """torch.func on the eager module in float64, point by point."""
    module = ZOO[name][0]().eval().double()
    for p in module.parameters():
        p.requires_grad_(False)
    one = lambda xi: module(xi[None])[0]  # noqa: E731
    with _differentiable_kernels():
        if kind == "jacobian":
            return torch.stack([jacrev(one)(xi) for xi in x])
        h = torch.stack([hessian(one)(xi) for xi in x])
    if kind == "hessian":
        return h
    n = math.prod(x.shape[1:])
    return h.reshape(h.shape[0], -1, n, n).diagonal(dim1=-2, dim2=-1).sum(-1)


@pytest.mark.parametrize(
    "name,kind",
    [(n, k) for n in _FAST for k in ("jacobian", "laplacian")] + [(n, "hessian") for n in _SMALL],
)
def test_trace_takes_the_fast_path_and_matches_torch_func(trace_file, name, kind):
    """A torch.jit.trace file (convolutions as aten._convolution, shape arithmetic on
    0-dim tensors, masked_fill_ in place, cumsum) runs on the Taylor engine and agrees
    with torch.func on the eager module in float64, at a batch size it was not traced at."""
    net = jaccli.load_model(trace_file(name), dtype="float64")
    x = torch.randn(5, *ZOO[name][1], generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaccli.JaccliWarning)  # ReLU's and max pooling's kinks
        plan = jaccli.plan(kind, net, x, per_sample=True, mode="forward")
        assert plan.engine == "taylor", plan.engine_note
        got = getattr(jaccli, kind)(net, x, per_sample=True, mode="forward")
    _assert_close(got, _zoo_reference(name, kind, x), 1e-10)


@pytest.mark.parametrize("name", _FAST)
def test_json_reports_the_taylor_engine_for_a_trace(trace_file, tmp_path, name):
    """What a user sees: ``jaccli laplacian model.pt x.npy -p --json`` on the trace."""
    import numpy as np
    from typer.testing import CliRunner

    from jaccli.cli.main import app

    x = tmp_path / "x.npy"
    np.save(x, torch.randn(3, *ZOO[name][1], generator=torch.Generator().manual_seed(24)).numpy())
    result = CliRunner().invoke(app, ["laplacian", trace_file(name), str(x), "-p", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert plan["engine"] == "taylor", plan["engine_note"]


class _SortPool(nn.Module):
    """Sorted activations (as in SortPooling of graph nets): ``aten.sort`` has no Taylor rule."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(26)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):  # x [B, 4]
        return torch.tanh(self.fc(x)).sort(dim=1).values * x


def test_verbose_names_the_op_that_keeps_a_trace_off_the_fast_path(tmp_path):
    """Where a trace still falls back, --verbose says which op and why, and the answer is right."""
    import numpy as np
    from typer.testing import CliRunner

    from jaccli.cli.main import app

    module = _SortPool().eval().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(module, torch.randn(2, 4, dtype=torch.float64)), tmp_path / "sort.pt")
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    np.save(tmp_path / "x.npy", x.numpy())
    result = CliRunner().invoke(app, ["laplacian", str(tmp_path / "sort.pt"), str(tmp_path / "x.npy"), "-p", "--verbose",
                                      "--save", str(tmp_path / "out.npy")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "torch.func engine" in result.stderr and "aten.sort has no Taylor rule" in result.stderr
    for p in module.parameters():
        p.requires_grad_(False)
    h = torch.stack([hessian(lambda xi: module(xi[None])[0])(xi) for xi in x])
    _assert_close(torch.from_numpy(np.load(tmp_path / "out.npy")), h.diagonal(dim1=-2, dim2=-1).sum(-1), 1e-10)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "trace"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_single_layers_take_the_fast_path(name, traced):
    """Pooling, padding, upsampling, transposed and 3-d convolutions, norms, activations,
    a GRU cell, eager and traced: the Taylor engine, and the Laplacian of torch.func."""
    factory, shape = LAYERS[name]
    torch.manual_seed(27)
    module = factory().eval().double()
    for p in module.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(28), dtype=torch.float64)
    net = module
    if traced:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.jit.trace(module, x[:2], check_trace=False)
    flat = lambda z: net(z).flatten(1)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaccli.JaccliWarning)  # max pooling's and ReLU's kinks
        plan = jaccli.plan("laplacian", flat, x, per_sample=True)
        assert plan.engine == "taylor", plan.engine_note
        got = jaccli.laplacian(flat, x, per_sample=True)
    n = math.prod(shape)
    h = torch.stack([hessian(lambda xi: module(xi[None]).flatten())(xi) for xi in x])
    _assert_close(got, h.reshape(4, -1, n, n).diagonal(dim1=-2, dim2=-1).sum(-1), 1e-10)
