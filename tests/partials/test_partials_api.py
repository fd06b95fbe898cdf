"""jaccli.partials against closed forms and nested torch.func, on both engines."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacfwd, jacrev, vmap

import jaccli
from jaccli.request.names import ExpressionError
from jaccli.engine import planner
from problems import (
    heat, HEAT_KAPPA, oscillators, oscillators_derivative, save_export, save_torchscript, sin_xyz,
    sin_xyz_partials, tanh_mlp,
)  # fmt: skip

REL = 1e-10


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(want.abs().max()), 1e-300)
    err = float((got - want).abs().max())
    assert err <= rel * scale, f"max error {err:.3g} at scale {scale:.3g}"


def nested(f, x: torch.Tensor, orders: tuple[int, ...], jac=jacfwd) -> torch.Tensor:
    """∂^orders f per point by nested vmap(jacfwd) (or ``jac``): [N, n_out]."""
    g = lambda p: f(p[None])[0]  # noqa: E731
    k = sum(orders)
    for _ in range(k):
        g = jac(g)
    with torch.no_grad():
        t = vmap(g)(x)  # [N, n_out, n_in, ..., n_in]
    index = [i for i, o in enumerate(orders) for _ in range(o)]
    return t[(slice(None), slice(None), *index)]


def along(f, z: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
    """``dᵏ/dtᵏ f(z + t v)`` at 0 by nested torch.func.jvp."""
    h = f
    for _ in range(k):
        h = (lambda g: lambda zz: torch.func.jvp(g, (zz,), (v,))[1])(h)
    with torch.no_grad():
        return h(z)


def both_engines(fn):
    """Run a test with the Taylor series and with nested torch.func."""
    return pytest.mark.parametrize("fast", [True, False], ids=["taylor", "torch.func"])(fn)


def _engine(monkeypatch, fast: bool) -> str:
    monkeypatch.setattr(planner, "FAST_PATH", fast)
    return "taylor" if fast else "torch.func"


@both_engines
@pytest.mark.parametrize("n", range(1, 9))
def test_oscillators_to_order_eight(monkeypatch, fast, n):
    engine = _engine(monkeypatch, fast)
    t = torch.linspace(0.0, 3.0, 7, dtype=torch.float64)[:, None]
    term = "u_" + "t" * n
    got = jaccli.partials(oscillators, t, [term, "v_" + "t" * n], inputs="t", outputs="u,v", per_sample=True)
    assert got.engine == engine
    du, dv = oscillators_derivative(t[:, 0], n)
    assert_rel(got[term], du)
    assert_rel(got["v_" + "t" * n], dv)


@both_engines
def test_mixed_partials_of_sin_xyz_match_closed_forms(monkeypatch, fast):
    _engine(monkeypatch, fast)
    x = torch.rand(6, 3, dtype=torch.float64) + 0.5
    want = sin_xyz_partials(x)
    got = jaccli.partials(sin_xyz, x, list(want), inputs="x,y,z", per_sample=True)
    for name, value in want.items():
        assert_rel(got[name][:, 0], value)


@pytest.mark.parametrize("term, orders", [("u_yx", (1, 1, 0)), ("u_xxy", (2, 1, 0)), ("u_xyyz", (1, 2, 1)),
                                          ("u_xxyyzz", (2, 2, 2)), ("u_zzzzz", (0, 0, 5)), ("u_xyzxyzxy", (3, 3, 2))])  # fmt: skip
def test_mixed_partials_in_any_order_match_nested_torch_func(term, orders):
    x = torch.rand(4, 3, dtype=torch.float64) + 0.5
    got = jaccli.partials(sin_xyz, x, [term], inputs="x,y,z", per_sample=True)
    assert got.engine == "taylor"
    assert_rel(got[term], nested(sin_xyz, x, orders), 1e-9 if sum(orders) > 6 else REL)


@both_engines
def test_heat_equation_residual_vanishes(monkeypatch, fast):
    _engine(monkeypatch, fast)
    p = torch.rand(50, 2, dtype=torch.float64) * torch.tensor([1.0, 6.0])
    got = jaccli.partials(heat, p, [f"r = u_t - {HEAT_KAPPA}*u_xx", "u_t"], inputs="t,x", per_sample=True)
    assert float(got["r"].abs().max()) <= 1e-12 * float(got["u_t"].abs().max())


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "softplus", "silu", "gelu", "elu", "sin"])
def test_mlp_terms_match_nested_torch_func(act):
    net = tanh_mlp((2, 8, 8, 3), act=act)
    x = torch.randn(5, 2, dtype=torch.float64)
    terms = {"u_ab": (1, 1), "u_aab": (2, 1), "u_bbbb": (0, 4)}
    got = jaccli.partials(net, x, list(terms), inputs="a,b", per_sample=True)
    # SiLU's backward has no forward-mode rule: its reference is reverse over reverse
    jac = jacrev if act == "silu" else jacfwd
    for name, orders in terms.items():
        assert_rel(got[name], nested(net, x, orders, jac))


def test_ops_without_a_rule_fall_back_to_torch_func():
    f = lambda p: torch.lgamma(p + 1) * p  # noqa: E731  (lgamma has no rule)
    x = torch.rand(5, 1, dtype=torch.float64)
    got = jaccli.partials(f, x, ["u_xxx"], per_sample=True)
    assert got.engine == "torch.func" and "lgamma" in got.engine_note
    assert_rel(got["u_xxx"], nested(f, x, (3,)))


def test_a_cnn_takes_the_series_as_its_hessian_takes_the_fast_path():
    """One rule table: convolution, padding, max pooling, amax, elu, tan, atan (once rules
    of the order-2 engine only) run partials on the Taylor program too."""
    torch.manual_seed(3)
    conv = nn.Conv1d(1, 3, 3, padding=1).double()

    def f(p):  # [B, 2] -> [B, 4]
        h = torch.atan(p) * torch.tan(p / 2)
        h = F.pad(torch.cat([h, h * h], 1)[:, None], (1, 1), mode="reflect")
        h = F.max_pool1d(F.elu(conv(h) - 0.5), 2)
        return torch.cat([h.flatten(1)[:, :3], h.amax((1, 2))[:, None]], 1) * torch.sin(p.sum(1, keepdim=True))

    x = torch.rand(4, 2, dtype=torch.float64) + 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaccli.JaccliWarning)  # max pooling's kinks
        got = jaccli.partials(f, x, ["u_aab", "u_bbbb"], inputs="a,b", per_sample=True)
    assert got.engine == "taylor", got.engine_note
    assert_rel(got["u_aab"], nested(f, x, (2, 1)))
    assert_rel(got["u_bbbb"], nested(f, x, (0, 4)))


@pytest.mark.parametrize("fmt", ["pt", "pt2"])
def test_saved_models_in_float32_and_chunks(tmp_path, fmt):
    net = tanh_mlp((2, 16, 16, 4), dtype=torch.float32)
    x = torch.rand(40, 2)
    path = save_torchscript(net, tmp_path / "m.pt") if fmt == "pt" else save_export(net, (x[:4],), tmp_path / "m.pt2")
    model = jaccli.load_model(path)
    got = jaccli.partials(model, x, ["u_xxy", "u_yyyy"], inputs="x,y", per_sample=True, chunk_size=7)
    assert got.engine == "taylor"
    ref = jaccli.partials(net.double(), x.double(), ["u_xxy", "u_yyyy"], inputs="x,y", per_sample=True)
    for name in got:
        assert_rel(got[name].double(), ref[name], 1e-4)


def test_whole_input_is_one_point():
    f = lambda v: (v[0] ** 3 * v[1]).reshape(1)  # noqa: E731
    got = jaccli.partials(f, torch.tensor([2.0, 3.0], dtype=torch.float64), ["u_x0x0x1"[:0] + "u_x0_x0_x1", "u"])
    assert got["u_x0_x0_x1"].shape == (1,) and float(got["u_x0_x0_x1"]) == pytest.approx(12.0)
    assert float(got["u"]) == pytest.approx(24.0)


def test_output_names_pick_components_and_one_name_the_vector():
    x = torch.linspace(0, 1, 4, dtype=torch.float64)[:, None]
    each = jaccli.partials(oscillators, x, ["u_t", "v_t"], inputs="t", outputs="u,v", per_sample=True)
    whole = jaccli.partials(oscillators, x, ["w_t"], inputs="t", outputs="w", per_sample=True)
    assert each["u_t"].shape == (4,) and whole["w_t"].shape == (4, 2)
    assert_rel(whole["w_t"][:, 1], each["v_t"])


def test_expressions_combine_terms_numbers_and_functions():
    x = torch.linspace(0.1, 1, 5, dtype=torch.float64)[:, None]
    got = jaccli.partials(torch.sin, x, ["e = sqrt(abs(u_xx)) ** 2 + exp(0) - cos(pi) * u", "f = e - 1"], per_sample=True)
    assert list(got) == ["e", "f"]
    assert_rel(got["e"], torch.sin(x) + 1 + torch.sin(x))
    assert_rel(got["f"], 2 * torch.sin(x))


def test_relu_models_warn_about_higher_derivatives():
    net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with pytest.warns(jaccli.JaccliWarning, match="relu"):
        jaccli.partials(net, torch.rand(3, 1, dtype=torch.float64), ["u_xx"], per_sample=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaccli.partials(net, torch.rand(3, 1, dtype=torch.float64), ["u_x"], per_sample=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(want=["w_x"]), "unknown output"),
        (dict(want=["u_q"]), "unknown input"),
        (dict(want=["u_x"], inputs="x,y"), "must name every input component"),
        (dict(want=["u_x"], outputs="u,v"), "names one output vector or every output component"),
        (dict(want=["u_x"], inputs="x,x"), "duplicate input names"),
        (dict(want=["u_" + "x" * 9]), "at most order 8"),
        (dict(want=["r = u_x + s"]), "reads 's'"),
        (dict(want=["r = u_x +"]), "syntax error"),
        (dict(want=["r = __import__('os')"]), "unsupported call"),
        (dict(want=["r = u_x.real"]), "unsupported syntax"),
        (dict(want=["u_x", "u_x"]), "asked for twice"),
    ],
)
def test_bad_requests_are_one_line_usage_errors(kwargs, message):
    with pytest.raises(jaccli.UsageError, match=message) as info:
        jaccli.partials(torch.sin, torch.rand(3, 1), per_sample=True, **kwargs)
    # one line; an expression's error then shows the expression and a caret under the column
    pointer = isinstance(info.value, ExpressionError)
    assert str(info.value).count("\n") == (2 if pointer else 0) and pointer == ("=" in str(kwargs["want"][0]))


class _Branchy(nn.Module):
    """Residual sums, a concatenation, a split, a product of two series and a ``where``:
    ops linear in several series, where the series program keeps the values for shapes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = nn.Linear(2, 6), nn.Linear(6, 6), nn.Linear(12, 3)

    def forward(self, p):
        h = torch.tanh(self.a(p))
        r = h + torch.sin(self.b(h))
        left, right = torch.cat([h * r, torch.where(p[:, :1] > 0, r, -r)], 1).split(6, 1)
        return self.c(torch.cat([left, right.exp()], 1)) + p.sum(1, keepdim=True)


@pytest.mark.parametrize("model", [lambda: tanh_mlp((2, 8, 8, 5)), _Branchy], ids=["mlp", "branchy"])
def test_series_computes_only_the_coefficients_asked_for(model):
    from jaccli import jets

    net = model().double()
    z = torch.randn(6, 2, dtype=torch.float64)
    v = torch.randn(2, 6, 2, dtype=torch.float64)  # two directions per point
    program = jets.build(net, z[:1], orders=4)
    full = program.series(z, v, 4)
    for k in range(1, 5):  # each direction's coefficient is that of its own series
        for i in range(2):
            assert_rel(full[k][i], along(net, z, v[i], k) / math.factorial(k))
    for keep in ({4}, {2, 4}, {0, 3}):
        got = program.series(z, v, 4, frozenset(keep))
        assert all(got[k] is None for k in range(5) if k not in keep)
        for k in keep:
            assert_rel(got[k], full[k])
    if model is not _Branchy:  # the last layer is linear in one series: only the 4th coefficient reaches it
        last = program.schedule(frozenset({4})).layouts[program.output.index]
        assert tuple(last) == (False, False, False, False, True)


@both_engines
def test_values_and_shared_directions_of_several_orders(monkeypatch, fast):
    engine = _engine(monkeypatch, fast)
    net = _Branchy().double()
    x = torch.randn(7, 2, dtype=torch.float64)
    got = jaccli.partials(net, x, "u,u_tt,u_tttt,u_tx,u_txxx", inputs="t,x", per_sample=True)
    assert got.engine == engine
    with torch.no_grad():
        assert_rel(got["u"], net(x))
    for name, orders in {"u_tt": (2, 0), "u_tttt": (4, 0), "u_tx": (1, 1), "u_txxx": (1, 3)}.items():
        assert_rel(got[name], nested(net, x, orders))


def test_layer_norm_models_refuse_partials_past_second_order_instead_of_wrong_numbers():
    """PyTorch's forward over forward mode through layer_norm is wrong, and so are its
    third derivatives by autograd: the series (LayerNorm decomposed as it is recorded)
    gives first and second derivatives, checked against a double backward; past that,
    where nothing in autograd could check it, a partial is refused in one line."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(2, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1)).double().eval()
    x = torch.randn(4, 2, dtype=torch.float64)
    got = jaccli.partials(net, x, ["u_a", "u_aa", "u_ab"], inputs="a,b", per_sample=True)
    assert got.engine == "taylor"
    assert_rel(got["u_a"], nested(net, x, (1, 0), jacrev))
    assert_rel(got["u_aa"], nested(net, x, (2, 0), jacrev))  # reverse over reverse: right
    assert_rel(got["u_ab"], nested(net, x, (1, 1), jacrev))
    with pytest.raises(jaccli.ModelError, match="order 3 through aten.native_layer_norm"):
        jaccli.partials(net, x, "u_aab", inputs="a,b", per_sample=True)


def test_a_single_series_written_into_the_result_equals_the_coefficient():
    """series_into: the last layer's product lands in the result (contiguous rows), or the
    program finishes as usual and the coefficient is scaled into it (any other layout)."""
    from jaccli import jets
    from jaccli.load.weights import build_mlp

    torch.manual_seed(0)
    net = build_mlp([1, 8, 8, 3], "tanh").double().eval()
    x = torch.rand(5, 1, dtype=torch.float64)
    v = torch.ones_like(x)
    program = jets.build(net, x, orders=4)
    assert program._last_product() is not None
    want = program.series(x, v[None], 4)[4][0] * 24
    assert_rel(want, nested(net, x, (4,)))
    direct = torch.empty(5, 3, dtype=torch.float64)
    program.series_into(x, v, 4, direct, 24.0)
    strided = torch.empty(3, 5, dtype=torch.float64).t()
    program.series_into(x, v, 4, strided, 24.0)
    assert_rel(direct, want)
    assert_rel(strided, want)
