"""Curvature products against dense float64 references: ``torch.autograd.functional.hessian``
of the loss over the flattened parameters, ``Jᵀ H_L J``, a loop of ``autograd.grad``; the
spectral tools against ``numpy.linalg.eigh`` and exact moments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from problems import diagonal_se, tanh_mlp, trace_se_bound
from test_structured import reference, SmallCNN
from torch import nn

import jaccli
from jaccli.curvature import api, assembled, spectral
from jaccli.curvature.objective import build_objective as _objective

F64 = torch.float64


def mlp():
    return tanh_mlp((3, 6, 4))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=F64)
    y = torch.randint(0, 4, (30,), generator=g)
    return x, y


def _flat_params(net):
    """The parameters as one flat vector, and the function back to the named tensors."""
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def unflat(v):
        out, o = {}, 0
        for k, s in zip(names, shapes):
            n = int(np.prod(s))
            out[k] = v[o : o + n].reshape(s)
            o += n
        return out

    return flat0, unflat


@pytest.mark.parametrize("case", ["mlp-ce", "cnn-mse"])
def test_hessian_ggn_and_ef_match_dense_references(case):
    if case == "mlp-ce":
        net, (x, y) = mlp(), _data()
        lossfn = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731
        loss, tgt = "cross-entropy", y
    else:
        net = SmallCNN(outputs=2).double()
        g = torch.Generator().manual_seed(2)
        x = torch.randn(12, 1, 5, 5, generator=g, dtype=F64)
        tgt = torch.randn(12, 2, generator=g, dtype=F64)
        lossfn = lambda out: nn.functional.mse_loss(out, tgt)  # noqa: E731
        loss = "mse"
    flat0, unflat = _flat_params(net)
    H = reference(net, x, tgt, loss, "mean")
    r = jaccli.curvature(net, x, tgt, loss=loss, full=True, chunk_size=7)
    np.testing.assert_allclose(r.full, H, rtol=1e-9, atol=1e-11)
    # GGN: Jᵀ H_L J with J the Jacobian of all outputs and H_L the loss's Hessian in them
    outf = lambda v: torch.func.functional_call(net, unflat(v), (x,)).reshape(-1)  # noqa: E731
    J = torch.autograd.functional.jacobian(outf, flat0)
    out0 = outf(flat0).detach()
    HL = torch.autograd.functional.hessian(lambda o: lossfn(o.reshape(x.shape[0], -1)), out0)
    G = (J.T @ HL @ J).numpy()
    r = jaccli.curvature(net, x, tgt, loss=loss, matrix="ggn", full=True, diag=True, chunk_size=7)
    np.testing.assert_allclose(r.full, G, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(r.diag, np.diag(G), rtol=1e-9, atol=1e-12)  # the exact factor-based diagonal
    # EF: per-sample gradients of each sample's own loss, a loop of autograd.grad
    rows = []
    for i in range(x.shape[0]):
        ps = dict(net.named_parameters())
        out = net(x[i : i + 1])
        li = nn.functional.cross_entropy(out, tgt[i : i + 1]) if loss == "cross-entropy" else \
            nn.functional.mse_loss(out, tgt[i : i + 1])  # fmt: skip
        rows.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(li, list(ps.values()))]))
    Gs = torch.stack(rows)
    g = jaccli.grads(net, x, tgt, loss=loss, per_sample=True, chunk_size=7)
    np.testing.assert_allclose(g.per_sample.numpy(), Gs.numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g.gradient.numpy(), Gs.mean(0).numpy(), rtol=1e-10, atol=1e-13)
    assert g.norms["max"] == pytest.approx(float(Gs.norm(dim=1).max()), rel=1e-12)
    r = jaccli.curvature(net, x, tgt, loss=loss, matrix="ef", full=True, diag=True)
    E = (Gs.T @ Gs / x.shape[0]).numpy()
    np.testing.assert_allclose(r.full, E, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(r.diag, np.diag(E), rtol=1e-10, atol=1e-13)


def test_eigenvalues_match_eigh_for_each_which():
    net, (x, y) = mlp(), _data()
    H = jaccli.curvature(net, x, y, loss="cross-entropy", full=True).full
    w = np.linalg.eigh(H)[0]
    for which, want in (("largest", np.sort(w)[::-1][:3]), ("smallest", np.sort(w)[:3][::-1]),
                        ("magnitude", np.sort(w[np.argsort(np.abs(w))[::-1][:3]])[::-1])):  # fmt: skip
        r = jaccli.curvature(net, x, y, loss="cross-entropy", eig=3, which=which, tol=1e-10)
        np.testing.assert_allclose(r.eigenvalues, want, rtol=1e-7, atol=1e-9)
        assert list(r.eigenvalues) == sorted(r.eigenvalues, reverse=True)
    # eigenvectors: H v = λ v
    r = jaccli.curvature(net, x, y, loss="cross-entropy", eig=2, tol=1e-10)
    np.testing.assert_allclose(H @ r.eigenvectors, r.eigenvectors * r.eigenvalues, atol=1e-7)


def test_a_zero_hessian_has_zero_eigenvalues_not_an_eigensolver_failure():
    """A loss linear in its parameters (here the output of a linear model) has the zero Hessian,
    on which ARPACK's Lanczos cannot start ("starting vector is zero"): the eigenvalues are the
    assembled matrix's, all zero, and the eigenvectors orthonormal."""
    torch.manual_seed(0)
    net = nn.Linear(6, 1).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    r = jaccli.curvature(net, x, loss="output", eig=3, trace=True)
    np.testing.assert_array_equal(r.eigenvalues, np.zeros(3))
    np.testing.assert_allclose(r.eigenvectors.T @ r.eigenvectors, np.eye(3), atol=1e-12)
    assert r.trace == 0.0


def test_estimated_trace_and_diagonal_beyond_the_exact_limit(monkeypatch):
    net, (x, y) = mlp(), _data()
    H = jaccli.curvature(net, x, y, loss="cross-entropy", full=True).full
    monkeypatch.setattr(api, "EXACT_LIMIT", 0)
    p = H.shape[0]
    r = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, diag=True, samples=3 * p + 3, trace_method="products")
    # with 3P products Hutch++'s sketch spans the whole space: the trace is exact, the remainder zero
    assert r.trace == pytest.approx(np.trace(H), rel=1e-9) and r.trace_stderr < 1e-8
    assert r.diag_stderr is not None and r.notes
    # the errors against the exact standard errors, and the reported ones about those (never
    # "within k of its own standard errors" alone: a large one would pass)
    sigma = diagonal_se(H, 3 * p + 3).numpy()
    assert np.all(np.abs(r.diag - np.diag(H)) <= 5 * sigma + 1e-12)
    assert 0.8 <= np.sqrt(np.mean(r.diag_stderr**2) / np.mean(sigma**2)) <= 1.25
    r = jaccli.curvature(net, x, y, loss="cross-entropy", trace=True, samples=30, trace_method="products")
    assert abs(r.trace - np.trace(H)) <= 5 * r.trace_stderr <= 10 * trace_se_bound(H, 30)


def test_slq_quadrature_is_exact_for_its_probes_and_matches_the_spectrum_moments():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 40))
    A = (A + A.T) / 2
    op = spectral.LinearOperator((40, 40), matvec=lambda v: A @ v, matmat=lambda V: A @ V, dtype=np.float64)
    nodes, weights = spectral.slq(op, probes=4, steps=10, seed=3)
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-12)
    probes = np.random.default_rng(3)
    for i in range(4):  # the same Rademacher probes slq drew: Gauss quadrature exact to degree 2·steps - 1
        v = spectral._rademacher(probes, 40, 1)[:, 0]
        for k in range(1, 6):
            want = v @ np.linalg.matrix_power(A, k) @ v / (v @ v)
            assert (weights[i] * nodes[i] ** k).sum() == pytest.approx(want, rel=1e-9, abs=1e-9)
    nodes, weights = spectral.slq(op, probes=200, steps=12, seed=0)
    w = np.linalg.eigvalsh(A)
    for k in (1, 2, 3, 4):  # each probe's quadrature is a Hutchinson sample of tr(Aᵏ)/P
        per_probe = (weights * nodes**k).sum(1)
        err = per_probe.std(ddof=1) / np.sqrt(len(per_probe))
        assert abs(per_probe.mean() - (w**k).mean()) <= 4 * err
    dens = spectral.smooth_density(nodes, weights, np.linspace(-20, 20, 4001), 0.2)
    assert np.trapezoid(dens, dx=0.01) == pytest.approx(1.0, rel=1e-3)


def test_params_restricts_to_a_submatrix_and_by_layer_gives_the_diagonal_blocks():
    net, (x, y) = mlp(), _data()
    r = jaccli.curvature(net, x, y, loss="cross-entropy", full=True)
    sub = jaccli.curvature(net, x, y, loss="cross-entropy", full=True, params="2.*")
    off = 3 * 6 + 6
    np.testing.assert_allclose(sub.full, r.full[off:, off:], rtol=1e-12)
    assert [p.name for p in sub.params] == ["2.weight", "2.bias"] and sub.params[1].offset == 24
    b = jaccli.curvature(net, x, y, loss="cross-entropy", by_layer=True, eig=2)
    assert [row["name"] for row in b.by_layer] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for row, p in zip(b.by_layer, r.params):
        block = r.full[p.offset : p.offset + p.size, p.offset : p.offset + p.size]
        assert row["trace"] == pytest.approx(np.trace(block), rel=1e-10)
        np.testing.assert_allclose(row["eigenvalues"], np.sort(np.linalg.eigvalsh(block))[::-1][:2], rtol=1e-6, atol=1e-9)


def test_chunks_do_not_change_the_products():
    net, (x, y) = mlp(), _data()
    a = _objective(net, x, y, loss="cross-entropy", reduction=None, params=None, chunk_size=1, output=None)
    b = _objective(net, x, y, loss="cross-entropy", reduction=None, params=None, chunk_size=1000, output=None)
    V = torch.randn(a.space.size, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    for m in ("hessian", "ggn", "ef"):
        torch.testing.assert_close(a.matmat(m, V), b.matmat(m, V), rtol=1e-11, atol=1e-13)


class Reversed(nn.Module):
    """A head registered before the body: state-dict order is not the order of computation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.head = nn.Linear(5, 3)
        self.body = nn.Linear(4, 5)
        self.gain = nn.Parameter(torch.tensor([0.7, -1.2, 0.4, 1.5, 0.9]))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)) * self.gain)


@pytest.mark.parametrize("loss", ["mse", "cross-entropy"])
@pytest.mark.parametrize("params", [None, "head.*,gain"])
def test_assembled_hessian_by_triangles_matches_autograd_and_the_products(monkeypatch, loss, params):
    # columns in blocks narrower than a tensor, two chunks, parameters out of computation order
    monkeypatch.setitem(__import__("jaccli.curvature.objective", fromlist=["x"]).DENSE_COLUMNS, "cpu", 4)
    net = Reversed().double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(11, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (11,), generator=g) if loss == "cross-entropy" else torch.randn(11, 3, generator=g, dtype=F64)
    H = reference(net, x, y, loss, "mean", params)  # the selected parameters' block
    obj = _objective(net, x, y, loss=loss, reduction=None, params=params, chunk_size=6, output=None)
    assert obj.dense_columns == 4
    fast = spectral.dense(spectral.operator(obj, "hessian"))
    np.testing.assert_allclose(fast, H, rtol=1e-10, atol=1e-12)
    assert np.array_equal(fast, fast.T)  # one triangle computed, the other its transpose

    def unbatchable(objective):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(assembled, "dense_hessian", unbatchable)  # the products' path takes over
    slow = spectral.dense(spectral.operator(obj, "hessian"))
    np.testing.assert_allclose(slow, H, rtol=1e-10, atol=1e-12)


def test_hessian_products_keep_one_graph_per_rank_or_the_callers_chunks():
    """Where the graphs fit, the Hessian's products run through ONE kept graph over the samples
    (as PyHessian's), whatever the per-sample chunk; ``chunk_size`` keeps its chunks. Both equal
    the float64 Hessian of ``torch.autograd.functional`` times the block."""
    net = tanh_mlp((3, 6, 2))
    x = torch.randn(48, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (48,))
    H = torch.from_numpy(reference(net, x, y, "cross-entropy", "mean"))
    V = torch.randn(H.shape[0], 5, dtype=torch.float64)
    for chunk_size, graphs in ((None, 1), (16, 3)):
        obj = _objective(net, x, y, loss="cross-entropy", reduction=None, params=None, chunk_size=chunk_size,
                         output=None)  # fmt: skip
        obj.chunk = 16  # as the per-sample rows of a large model size it: the graph need not follow
        obj.value_and_grad(keep_hessian_graphs=True)
        got = obj.matmat("hessian", V)
        assert len(obj._graphs) == graphs, chunk_size
        torch.testing.assert_close(got, H @ V, rtol=1e-10, atol=1e-12)


def test_the_kept_graphs_are_sized_without_views():
    # a weight's t() is a view: counted among the bytes an op returns, not among those it allocates
    from jaccli.curvature.runtime import _Bytes

    w, a, counter = torch.ones(300, 200), torch.ones(4, 200), _Bytes()
    with counter:
        a @ w.t()
    assert counter.fresh == 4 * 300 * 4 and counter.bytes == counter.fresh + 300 * 200 * 4
