"""The Hessian by adjoints (jaccli/jets/adjoint.py, the Taylor engine's reverse mode): exact
against torch.func's float64 ``vmap(hessian)`` for every way a step's source is contracted
(unary ops, products of two jets, any other op's pair rows, piecewise-linear ops adding none),
for steps whose points share an axis with other entries (norms over a ``[1, B·C, L]`` view),
bitwise the same whatever the chunk size, and refused where its points cannot be told apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, vmap

import jaccli
from jaccli.engine import measure, planner
from jaccli.jets import adjoint
from problems import tanh_mlp


def reference(f, x):
    return vmap(hessian(lambda xi: f(xi[None])[0].reshape(-1)))(x)


class Attention(nn.Module):
    """Softmax attention over 3 tokens of 2 features: bmm of two jets, exp, a division by a
    sum of jets (pair rows), a product of jets and a tanh."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.q, self.k, self.v = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(2, 4)
        self.out = nn.Linear(12, 2)

    def forward(self, x):  # [B, 6] -> [B, 2]
        t = x.reshape(-1, 3, 2)
        a = torch.softmax(self.q(t) @ self.k(t).transpose(1, 2) / 2.0, dim=-1)
        h = a @ self.v(t)
        return torch.tanh(self.out((h * torch.sin(h)).flatten(1)))


class Norms(nn.Module):
    """InstanceNorm (its statistics over a ``[1, B·C, L]`` view), GroupNorm, ReLU, max pooling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.gnorm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, 10] -> [B, 3]
        h = self.conv(x.reshape(-1, 2, 5))
        h = torch.relu(self.inorm(h)) + nn.functional.gelu(self.gnorm(h))
        return self.head(nn.functional.max_pool1d(torch.nn.functional.softplus(h), 2).flatten(1))


class Normed(nn.Module):
    """Means over a few elements (an instance norm over 5 positions, a layer norm over 4
    features) and a softmax over 3, with no GELU or softplus (whose kernels round a block's
    last entries apart): summed slice by slice (:func:`jaccli.jets.jet.sum_few`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.inorm = nn.InstanceNorm1d(3, affine=True)
        self.mid = nn.Linear(15, 12)
        self.lnorm = nn.LayerNorm(4)
        self.head = nn.Linear(12, 2)
        with torch.no_grad():
            self.inorm.weight.uniform_(0.5, 1.5)
            self.lnorm.weight.uniform_(0.5, 1.5)

    def forward(self, x):  # [B, 10] -> [B, 2]
        h = torch.tanh(self.inorm(self.conv(x.reshape(-1, 2, 5)))).flatten(1)
        h = self.lnorm(self.mid(h).reshape(-1, 3, 4))
        return self.head(torch.tanh(torch.softmax(h, dim=1) * h).flatten(1))


def _mlp():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 3), nn.Sigmoid())


def _quotient(x):  # products and quotients of two jets, a square, a constant over a jet, a power (pair rows)
    a, b = x[:, :2], x[:, 2:]
    return torch.stack([(a * b).sum(1) / (1.5 + torch.cos(b).sum(1)), (a[:, 0] * a[:, 0]) * torch.exp(b[:, 1]),
                        torch.full_like(a[:, 0], 3.0) / (2.0 + (a * a).sum(1)), (b**3).sum(1)], 1)  # fmt: skip


MODELS = {
    "mlp": (_mlp, 5),
    "attention": (Attention, 6),
    "norms": (Norms, 10),
    "normed": (Normed, 10),
    "quotient": (lambda: _quotient, 4),
}


@pytest.mark.filterwarnings("ignore:.*second derivatives through those units:jaccli.JaccliWarning")
@pytest.mark.parametrize("name", MODELS)
def test_the_hessian_by_adjoints_is_exact(name):
    make, n = MODELS[name]
    f = make()
    if isinstance(f, nn.Module):
        f = f.double().eval().requires_grad_(False)
    x = torch.randn(7, n, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    plan = jaccli.plan("hessian", f, x, per_sample=True, mode="reverse")
    assert (plan.engine, plan.mode) == ("taylor", "reverse"), (plan.estimates, plan.engine_note)
    got = jaccli.hessian(f, x, per_sample=True, mode="reverse")
    torch.testing.assert_close(got.reshape(7, -1, n, n), reference(f, x).reshape(7, -1, n, n), rtol=1e-10, atol=1e-12)


def test_piecewise_linear_steps_add_nothing_and_a_linear_model_has_a_zero_hessian():
    relu = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    p, program, _ = jaccli.plan("hessian", relu, x, per_sample=True, mode="reverse")._request
    assert adjoint.sources(program) == []  # relu is a source of nothing
    with pytest.warns(jaccli.JaccliWarning, match="piecewise linear"):
        assert jaccli.hessian(relu, x, per_sample=True, mode="reverse").abs().max() == 0


@pytest.mark.parametrize("make,n", [(lambda: tanh_mlp((3, 16, 16, 4), dtype=torch.float32, seed=3), 3), (Attention, 6),
                                    (Normed, 10)])  # fmt: skip
def test_results_do_not_move_a_bit_with_the_chunk_size(make, n):
    # as the forward passes' (tests/jets/test_program.py): a resumed stream must equal a
    # whole run; every batched product runs on operands laid out points first (a layout that
    # follows the batch size rounds differently). Not promised where torch's own elementwise
    # kernels round a block's last entries apart (GELU, softplus, float32 sigmoid: docs/jets.md)
    f = make().requires_grad_(False)
    x = torch.randn(3000, n, generator=torch.Generator().manual_seed(3))
    whole = jaccli.hessian(f, x, per_sample=True, mode="reverse")
    for chunk in (300, 1001):
        assert torch.equal(jaccli.hessian(f, x, per_sample=True, mode="reverse", chunk_size=chunk), whole)


@pytest.mark.filterwarnings("ignore:.*second derivatives through those units:jaccli.JaccliWarning")
@pytest.mark.parametrize("name", ["attention", "norms", "quotient"])
def test_one_sweep_vmapped_over_the_outputs_gives_the_bits_of_a_sweep_per_output(name, monkeypatch):
    make, n = MODELS[name]
    f = make()
    if isinstance(f, nn.Module):
        f = f.eval().requires_grad_(False)
    x = torch.randn(9, n, generator=torch.Generator().manual_seed(10))
    swept = []
    real = adjoint._batched_sweep
    monkeypatch.setattr(adjoint, "_batched_sweep", lambda *a: swept.append(1) or real(*a))
    batched = jaccli.hessian(f, x, per_sample=True, mode="reverse")
    assert swept  # several outputs: the vmapped sweep ran (and returned, or the loop below ran)
    monkeypatch.setattr(adjoint, "_batched_sweep", lambda *a: None)  # as where an op does not batch
    assert torch.equal(jaccli.hessian(f, x, per_sample=True, mode="reverse"), batched)


@pytest.mark.filterwarnings("ignore:.*second derivatives through those units:jaccli.JaccliWarning")
def test_float32_agrees_with_float64():
    f = Norms().eval().requires_grad_(False)
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(8))
    got = jaccli.hessian(f, x, per_sample=True, mode="reverse").double()
    want = reference(f.double(), x.double())
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_points_inside_an_axis_are_refused_and_the_answer_stays_right():
    # the tanh runs on a [n·B] view with the points innermost (a transpose first): its
    # recorded shape cannot say whose entry is whose, and the check against the forward
    # Hessian on the probe rows finds the contraction wrong: reverse mode is torch.func's
    def f(x):
        inner = torch.tanh(x.t().reshape(-1) * 0.7)
        return inner.reshape(x.shape[1], x.shape[0]).t() * x[:, :1]

    x = torch.randn(6, 3, dtype=torch.float64)
    plan = jaccli.plan("hessian", f, x, per_sample=True, mode="reverse")
    assert plan.engine == "torch.func"
    p, program, _ = jaccli.plan("hessian", f, x, per_sample=True, mode="forward")._request
    assert adjoint.applies(program) and not adjoint.agrees(program, x[:3])
    torch.testing.assert_close(jaccli.hessian(f, x, per_sample=True, mode="reverse"), reference(f, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [3, 20])
def test_auto_goes_on_to_the_next_cheapest_engine_where_the_adjoints_do_not_serve(n):
    # the model above with n inputs and one output: the records put the adjoints first at 20
    # inputs; their check fails, and auto takes the engine predicted next (with a note)
    def f(x):
        inner = torch.tanh(x.t().reshape(-1) * 0.7)
        return (inner.reshape(x.shape[1], x.shape[0]).t() * x[:, :1]).sum(1, keepdim=True)

    x = torch.randn(6, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plan = jaccli.plan("hessian", f, x, per_sample=True)
    assert (plan.engine, plan.mode) != ("taylor", "reverse")
    if n == 20:
        assert "does not serve this model" in plan.engine_note
    torch.testing.assert_close(jaccli.hessian(f, x, per_sample=True), reference(f, x), rtol=1e-10, atol=1e-12)


def test_not_under_inference_mode():
    f = _mlp().double().requires_grad_(False)
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.inference_mode():
        plan = jaccli.plan("hessian", f, x, per_sample=True, mode="reverse")
    assert plan.engine == "torch.func"


def test_a_tight_memory_budget_splits_the_points_not_the_rows(monkeypatch):
    f = _mlp().double().requires_grad_(False)
    x = torch.randn(40, 5, dtype=torch.float64)
    monkeypatch.setattr(planner, "working_budget", lambda device, free=None: 20_000)
    plan = jaccli.plan("hessian", f, x, per_sample=True, mode="reverse")
    assert plan.directions_per_pass == plan.directions == 5 and 1 <= plan.points_per_chunk < 40
    torch.testing.assert_close(jaccli.hessian(f, x, per_sample=True, mode="reverse"), reference(f, x), rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:.*second derivatives through those units:jaccli.JaccliWarning")
def test_every_contraction_serves_a_model_above(monkeypatch):
    # the closed-form contractions, each spied on, and the pair rows of any other op (the
    # norms' reductions): every one is exercised by test_the_hessian_by_adjoints_is_exact
    used = set()

    def spy(how):
        def run(*args):
            used.add(how.__name__)
            return how(*args)
        return run

    table = {name: (spy(how), fits) for name, (how, fits) in adjoint.CONTRACTIONS.items()}
    monkeypatch.setattr(adjoint, "CONTRACTIONS", table)
    monkeypatch.setattr(adjoint, "_pairs", spy(adjoint._pairs))
    for make, n in MODELS.values():
        f = make()
        f = f.double().eval().requires_grad_(False) if isinstance(f, nn.Module) else f
        jaccli.hessian(f, torch.randn(3, n, dtype=torch.float64), per_sample=True, mode="reverse")
    assert used == {"_unary", "_product", "_quotient", "_batched_product", "_pairs"}


def test_an_input_made_under_inference_mode():
    # a chunk is a view of the input, and a view of an inference tensor cannot require grad
    f = tanh_mlp((3, 8, 2), seed=4).requires_grad_(False)
    with torch.inference_mode():
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = jaccli.hessian(f, x, per_sample=True, mode="reverse")
    torch.testing.assert_close(got, reference(f, x.clone()), rtol=1e-10, atol=1e-12)


def test_many_inputs_are_checked_on_pairs_of_a_few_columns_not_the_whole_forward_hessian(monkeypatch):
    # 40 inputs: the check compares the pairs among 16 columns (one pass of their pair rows),
    # never the 820 pair rows of the whole forward Hessian; a wrong layout is still caught
    from jaccli.jets.program import TaylorProgram

    real = TaylorProgram.hessian

    def whole(self, z, **kwargs):
        if kwargs.get("columns") is None:
            raise AssertionError("the whole forward Hessian was run by the check")
        return real(self, z, **kwargs)

    net = tanh_mlp((40, 12, 3), seed=7).requires_grad_(False)
    x = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(TaylorProgram, "hessian", whole)
    plan = jaccli.plan("hessian", net, x, per_sample=True, mode="reverse")
    assert (plan.engine, plan.mode) == ("taylor", "reverse"), (plan.estimates, plan.engine_note)
    torch.testing.assert_close(jaccli.hessian(net, x, per_sample=True, mode="reverse"), reference(net, x),
                               rtol=1e-10, atol=1e-12)  # fmt: skip

    def f(x):  # the points innermost in the tanh's view (as in the test above), 40 inputs
        inner = torch.tanh(x.t().reshape(-1) * 0.7)
        return inner.reshape(x.shape[1], x.shape[0]).t() * x[:, :1]

    p, program, _ = jaccli.plan("hessian", f, x, per_sample=True, mode="forward")._request
    assert adjoint.applies(program) and not adjoint.agrees(program, x[:3])


@pytest.mark.parametrize("directions", [None, 4])
def test_both_hessians_of_a_few_columns_are_the_block_among_them(directions):
    net = tanh_mlp((20, 12, 3), seed=8).requires_grad_(False)
    x = torch.randn(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    _, program, _ = jaccli.plan("hessian", net, x, per_sample=True, mode="forward")._request
    cols = torch.tensor([0, 3, 7, 19])
    block = reference(net, x).reshape(5, 3, 20, 20)[:, :, cols][:, :, :, cols]
    torch.testing.assert_close(program.hessian(x, columns=cols, directions=directions), block, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(adjoint.hessian(program, x, columns=cols), block, rtol=1e-10, atol=1e-12)
    one = torch.tensor([7])
    torch.testing.assert_close(program.hessian(x, columns=one), block[:, :, 2:3, 2:3], rtol=1e-10, atol=1e-12)


class _WideConv(nn.Module):
    """256 inputs (a 16x16 image), 16 tanh channels of 16x16, 10 outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.conv, self.head = nn.Conv2d(1, 16, 3, padding=1), nn.Linear(16 * 256, 10)

    def forward(self, x):  # [B, 256] -> [B, 10]
        return self.head(torch.tanh(self.conv(x.reshape(-1, 1, 16, 16))).flatten(1))


def test_auto_weighs_the_contractions_n_squared_term(monkeypatch):
    # the records alone put the adjoints first; their contractions (10 outputs x 256² x 4,096
    # activations a point) cost thousands of forward passes, and torch.func's reverse mode wins
    net = _WideConv().eval().requires_grad_(False)
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(5))
    plan = jaccli.plan("hessian", net, x, per_sample=True)
    assert (plan.engine, plan.mode) == ("torch.func", "reverse")
    reverse = jaccli.plan("hessian", net, x, per_sample=True, mode="reverse")  # reverse mode too, saying why
    assert reverse.engine == "torch.func"
    assert reverse.engine_note.startswith("Taylor reverse mode not used: the Hessian by adjoints' contractions (256 inputs")
    # predicted close to the forward Hessian or not, the term is weighed before any timing
    with monkeypatch.context() as mp:  # undone alone: the suite's own patches (no clock) stay
        mp.setattr(measure, "WITHIN", 1e30)
        mp.setattr(measure, "hessian_mode", lambda *a, **k: pytest.fail("timed"))
        assert jaccli.plan("hessian", net, x, per_sample=True).engine == "torch.func"
    p, program, _ = jaccli.plan("hessian", net, x, per_sample=True, mode="forward")._request
    assert adjoint.contraction_flops(program) >= 10 * 256 * 256 * 4096
    monkeypatch.setattr(adjoint, "contraction_flops", lambda program: 0.0)
    assert jaccli.plan("hessian", net, x, per_sample=True).mode == "reverse"
    assert jaccli.plan("hessian", net, x, per_sample=True).engine == "taylor"


def test_a_factor_constant_along_axes_is_contracted_over_its_own_elements(monkeypatch):
    # (x − μ)·σ⁻¹ and a softmax's e / Σe: the other factor, weighted, is summed over the axes
    # the broadcast one is constant along first; the products run over its elements only
    asked = []
    first = adjoint._first
    monkeypatch.setattr(adjoint, "_first", lambda x, shape, *a: asked.append((tuple(x.shape), tuple(shape))) or first(x, shape, *a))

    def f(x):  # [B, 6] -> [B, 2]: a normalisation over groups of 3, then a softmax over them
        g = torch.tanh(x).view(-1, 2, 3)
        c = g - g.mean(-1, keepdim=True)
        y = c * torch.rsqrt((c * c).mean(-1, keepdim=True) + 0.5)
        e = torch.exp(y)
        return (e / e.sum(-1, keepdim=True) * y).sum(-1)

    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = jaccli.hessian(f, x, per_sample=True, mode="reverse")
    torch.testing.assert_close(got, reference(f, x), rtol=1e-10, atol=1e-12)
    # σ⁻¹ and Σe (one entry per group) taken at their own shape, never broadcast to the product's
    assert ((5, 2, 1), (5, 2, 1)) in asked and ((5, 2, 1), (5, 2, 3)) not in asked
