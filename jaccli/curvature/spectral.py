"""Linear algebra on a curvature matrix known only by its products.

:func:`operator` wraps an :class:`~.objective.Objective`'s products as a symmetric
:class:`scipy.sparse.linalg.LinearOperator` (float64 vectors in and out, the curvlinops
design), and the functions here take such operators:

* :func:`eigenvalues` — the ``k`` extreme eigenpairs by ARPACK's Lanczos (``eigsh``), or by
  ``numpy.linalg.eigh`` of the assembled matrix when ``k`` is close to ``P``;
* :func:`trace_estimate` — Hutch++
  (Meyer, Musco, Musco & Woodruff 2021) where the spectrum decays, Hutchinson where the first
  pass finds it flat, with the standard error of the Hutchinson part;
* :func:`hutchinson_diagonal` — diagonal estimate ``E[z ⊙ Az]`` with Rademacher ``z``;
* :func:`slq` — stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017): nodes and weights
  of the spectral density, one Gauss quadrature per probe vector;
* :func:`dense` — the ``P×P`` matrix, column block by column block;
* :func:`standard_errors` — ``√diag(I⁻¹)`` by Cholesky, refusing a singular or indefinite ``I``.

Random vectors come from a seeded generator, so every rank of a distributed job draws the
same ones (their products are all-reduced, the iterations stay in step).

scipy is imported by the functions that use it, not with this module: ``scipy.linalg`` costs
0.2-0.7 s of start-up, which ``jaccli grads`` (that imports this package) never needs.

Imports: numpy, scipy (on first use), torch, :mod:`jaccli.errors`; :mod:`.assembled` (on first use).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from jaccli.errors import NumericalError, UsageError

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

#: ``--which`` -> ARPACK's name
WHICH_ARPACK = {"largest": "LA", "smallest": "SA", "magnitude": "LM"}


@functools.cache
def _operator_class() -> type:
    """:class:`CurvatureOperator`, defined on first use (it subclasses scipy's ``LinearOperator``)."""
    from scipy.sparse.linalg import LinearOperator

    class CurvatureOperator(LinearOperator):
        """A curvature matrix of an objective as a symmetric ``LinearOperator`` (float64)."""

        def __init__(self, objective, matrix: str) -> None:
            self.objective, self.matrix = objective, matrix
            p = objective.space.size
            super().__init__(dtype=np.float64, shape=(p, p))

        def _matmat(self, X):
            V = torch.as_tensor(np.ascontiguousarray(X), device=self.objective.space.device)
            return self.objective.matmat(self.matrix, V).detach().cpu().double().numpy()

        def _matvec(self, x):
            return self._matmat(np.asarray(x).reshape(-1, 1))[:, 0]

        def _rmatvec(self, x):
            return self._matvec(x)  # symmetric

        def _adjoint(self):
            return self

    return CurvatureOperator


def __getattr__(name: str):
    # the scipy-backed names resolve on first use, like the functions below
    if name == "CurvatureOperator":
        return _operator_class()
    if name == "LinearOperator":
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def operator(objective, matrix: str) -> LinearOperator:
    """The ``matrix`` (hessian, ggn, ef) of ``objective`` as a scipy ``LinearOperator``."""
    return _operator_class()(objective, matrix)


class Products:
    """The ``matrix`` of ``objective`` by its torch products alone, for :func:`trace_estimate`:
    the same ``objective``, ``matrix`` and ``shape`` as :func:`operator`'s, without importing
    scipy (``scipy.sparse.linalg``: 0.1-0.2 s of a fresh process that a trace never uses)."""

    def __init__(self, objective, matrix: str) -> None:
        self.objective, self.matrix = objective, matrix
        self.shape = (objective.space.size, objective.space.size)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _rademacher(rng, p: int, k: int, like: torch.dtype | None = None, device=None):
    """``[p, k]`` random signs: a float64 array, or with ``like`` a tensor of that dtype on ``device``.

    Each probe is one contiguous row of ``[k, p]`` (the tensor is its transposed view), as
    :meth:`~.objective.Objective.matmat` takes its directions, drawn as the bits of uniform
    random bytes (``integers(0, 256, uint8)`` unpacked): at P = 0.5M a block of 33 probes costs
    0.04 s, against 0.14 s for one int64 draw per sign and the transpose it needed (a tenth
    of a trace of 99 products there).
    """
    bits = np.unpackbits(rng.integers(0, 256, size=(k, (p + 7) // 8), dtype=np.uint8), axis=1, count=p)
    rows = torch.from_numpy(bits).to(dtype=like or torch.float64, device=device).mul_(2).sub_(1)
    return rows.T if like is not None else rows.T.numpy()


def dense(op: LinearOperator, block: int = 256) -> np.ndarray:
    """The matrix of ``op``, assembled from products with blocks of unit vectors.

    A Hessian operator whose model ``vmap`` can batch is assembled by its objective's
    :func:`.assembled.dense_hessian` (layer by layer, or one triangle by
    forward-over-reverse, the other by symmetry), in the model's float precision; any other
    operator, and that one where ``vmap`` fails, from ``op.matmat`` (float64).
    """
    if isinstance(op, _operator_class()) and op.matrix == "hessian" and op.objective._vmap_ok:
        try:
            # the model's own precision: a float32 P×P copy to float64 costs as much as a layer's block
            from jaccli.curvature import assembled  # its torch.func and layer-wise paths: only here

            H = assembled.dense_hessian(op.objective).detach().cpu()
            return (H if H.dtype in (torch.float32, torch.float64) else H.double()).numpy()
        except (RuntimeError, NotImplementedError):
            pass  # an op without a batching rule (or forward-mode rule): the products below
    p = op.shape[0]
    out = np.empty((p, p))
    for j in range(0, p, block):
        e = np.zeros((p, min(block, p - j)))
        e[np.arange(j, j + e.shape[1]), np.arange(e.shape[1])] = 1.0
        out[:, j : j + e.shape[1]] = op.matmat(e)
    return (out + out.T) / 2  # symmetric up to rounding; the average is the closest symmetric matrix


#: parameters up to which an eigensolver that breaks down falls back to the assembled matrix (128 MiB)
DENSE_FALLBACK_MAX = 4096


def eigenvalues(op: LinearOperator, k: int, which: str = "largest", *, tol: float = 1e-6, seed: int = 0,
                dense_matrix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The ``k`` eigenvalues of ``op`` that ``which`` picks, descending, and their eigenvectors ``[P, k]``."""
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigsh

    p = op.shape[0]
    if which not in WHICH_ARPACK:
        raise UsageError("unknown --which", expected=", ".join(WHICH_ARPACK), got=which)
    if not 1 <= k <= p:
        raise UsageError("--eig K must be between 1 and the number of parameters", expected=f"1 … {p}", got=k)
    assemble = dense_matrix is not None or k >= p - 1
    if not assemble:
        v0 = _rng(seed).standard_normal(p)
        try:
            w, v = eigsh(op, k=k, which=WHICH_ARPACK[which], v0=v0, tol=tol)
            pick = np.arange(len(w))
        except ArpackNoConvergence as exc:
            raise NumericalError(f"the eigensolver did not converge ({len(exc.eigenvalues)} of {k} eigenvalues)",
                                 hint="raise --tol or ask for fewer eigenvalues") from None  # fmt: skip
        except ArpackError as exc:
            # Lanczos breaks down where the matrix maps its start vector to zero (a loss linear
            # in its parameters has the zero Hessian); the assembled matrix has no such limit
            if p > DENSE_FALLBACK_MAX:
                raise NumericalError(f"the eigensolver failed ({exc})", expected=f"a matrix ARPACK can start on",
                                     hint="the matrix may be zero or of rank below K: try --trace or --diag") from None  # fmt: skip
            assemble = True
    if assemble:
        m = dense(op) if dense_matrix is None else dense_matrix
        w, v = np.linalg.eigh(np.asarray(m, dtype=np.float64))
        pick = {"largest": np.argsort(w)[::-1][:k], "smallest": np.argsort(w)[:k],
                "magnitude": np.argsort(np.abs(w))[::-1][:k]}[which]  # fmt: skip
    w, v = w[pick], v[:, pick]
    order = np.argsort(w)[::-1]
    return w[order], v[:, order]


def trace_estimate(op: LinearOperator, products: int, *, seed: int = 0) -> tuple[float, float, str]:
    """Trace estimate of ``op`` from about ``products`` products, and its standard error:
    Hutch++ (Meyer, Musco, Musco & Woodruff 2021) where the spectrum decays, Hutchinson where
    it is flat.

    Hutch++ spends two thirds of its products on a low-rank sketch ``Q`` (``AS``, then ``AQ``)
    whose trace is exact, and only a third on Hutchinson probes of the deflated remainder; on a
    flat spectrum (a network's Hessian, often) the sketch captures little, and the estimate has
    about 1.7× the standard error of plain Hutchinson from the same products. So the first pass
    (a third of the products, ``AS`` with Rademacher ``S``) decides (:func:`_sketch_pays`): the
    norms of ``Asᵢ`` and the mean of ``sᵢᵀAsᵢ`` bound Hutchinson's variance, and the distance of
    each ``Asᵢ`` from the span of the others (``1/(YᵀY)⁻¹ᵢᵢ``, free, as in XTrace's
    leave-one-out) is an unbiased estimate of ``‖(I−QQᵀ)A‖²_F`` for a sketch of the other
    columns, which bounds the variance of the deflated remainder. The second pass is Hutch++'s ``A[Q, R]`` where that
    predicts the smaller variance, else more Hutchinson probes (``S`` counted among them). The
    standard error is the sample one of the Hutchinson part (the sketch's trace has none); the
    choice rests on the first pass only, so the second pass's samples estimate it fairly. The
    third value names the estimator: ``"Hutch++"`` or ``"Hutchinson"``.

    Two passes over the data either way. On a :class:`Products` or a ``CurvatureOperator`` the vectors stay torch
    tensors in the model's dtype and device (the QR too: a float64 numpy QR of ``[P, k]`` cost a
    tenth of the estimate at P = 77k); the traces are summed in float64.
    """
    p = op.shape[0]
    k = max(1, products // 3)
    rng = _rng(seed)
    if getattr(op, "objective", None) is not None:  # a Products or a CurvatureOperator: torch throughout
        space = op.objective.space
        mm = lambda X: op.objective.matmat(op.matrix, X).detach()  # noqa: E731
        signs = lambda k: _rademacher(rng, p, k, space.dtype, space.device)  # noqa: E731
    else:
        mm = lambda X: torch.as_tensor(op.matmat(X.numpy()))  # noqa: E731
        signs = lambda k: _rademacher(rng, p, k, torch.float64)  # noqa: E731
    S = signs(k)
    Y = mm(S)
    # the QR of the sketch only for Hutch++ (20-60 ms at P = 77k): the choice needs only YᵀY
    if k < p and not _sketch_pays(S, Y, k, products):
        # Hutchinson: the first pass's probes and as many new ones as the sketch's second pass would take
        H = signs(max(1, products - k))
        samples = torch.cat([_quadratic(S, Y), _quadratic(H, mm(H))])
        return float(samples.mean()), float(samples.std() / math.sqrt(len(samples))), "Hutchinson"
    Q = torch.linalg.qr(Y)[0]
    G = signs(max(2, products - 2 * k))  # drawn after S, as before the choice existed
    R = G - Q @ (Q.T @ G)
    Z = mm(torch.cat([Q, R], dim=1))
    q = Q.shape[1]
    top = float(_quadratic(Q, Z[:, :q]).sum())
    samples = _quadratic(R, Z[:, q:])
    return top + float(samples.mean()), float(samples.std() / math.sqrt(len(samples))), "Hutch++"


def _quadratic(V: torch.Tensor, AV: torch.Tensor) -> torch.Tensor:
    """``vᵢᵀAvᵢ`` for each column, in float64: summed in the model's dtype by torch's cascade
    (pairwise) summation, rounding error ≈ ε·log P relative to ``Σ|vᵢ(Av)ᵢ|``, far below the
    samples' spread; a float64 accumulation cost 4× as much (a twentieth of the trace at P = 0.5M)."""
    return (V * AV).sum(0).double()


def _sketch_pays(S: torch.Tensor, Y: torch.Tensor, k: int, products: int) -> bool:
    """Whether Hutch++'s second pass (``k`` sketch products, ``products − 2k`` deflated probes)
    promises a smaller variance than ``products`` Hutchinson probes, judged from ``Y = AS``.

    Both sides from Frobenius norms, which ``Y``'s columns give with little noise (a sample
    variance of ``k`` quadratic forms is too noisy to choose by): Hutchinson's variance is
    ``2(‖A‖²_F − Σ Aᵢᵢ²)`` ≤ ``2(‖A‖²_F − tr(A)²/P)``, with ``E‖Asᵢ‖² = ‖A‖²_F``; the deflated
    remainder's is at most ``2‖(I−QQᵀ)A(I−QQᵀ)‖²_F`` ≤ ``2‖(I−QQᵀ)A‖²_F``, estimated without
    bias (for a sketch of ``k − 1`` columns) by the distance of each ``Asᵢ`` from the span of
    the others, ``1/(YᵀY)⁻¹ᵢᵢ``. That one-sided bound overstates the remainder 1.5-2.7× on
    decaying spectra (synthetic ones, tests/curvature/test_trace_estimator.py), hence the
    margin ``SLACK``; on a flat spectrum Hutchinson still wins by 2× or more while the sketch
    holds under half the dimension.
    """
    g = max(2, products - 2 * k)
    if k < 3:
        return True  # too few columns to judge: Hutch++, as asked
    Yd = Y.double()
    gram = Yd.T @ Yd
    y2 = gram.diagonal()
    h = _quadratic(S, Y)
    frobenius = float(y2.mean()) - float(h.mean()) ** 2 / S.shape[0]
    if frobenius <= 0:
        return False  # A ≈ cI: Rademacher Hutchinson is exact
    # ‖(I − Π₋ᵢ) yᵢ‖² = 1 / (YᵀY)⁻¹ᵢᵢ, regularised so that exactly dependent columns give ≈ 0
    gram = gram + torch.eye(k, dtype=gram.dtype, device=gram.device) * (1e-12 * float(gram.diagonal().sum()) / k + 1e-300)
    residual = float((1.0 / torch.linalg.inv(gram).diagonal()).mean())
    return residual / g < SLACK * frobenius / products


#: how much smaller the deflated remainder's variance is taken to be than its one-sided bound
SLACK = 1.5


def hutchinson_diagonal(op: LinearOperator, products: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Estimate of ``diag(op)`` from ``products`` Rademacher products, and its standard error per entry."""
    z = _rademacher(_rng(seed), op.shape[0], max(2, products))
    s = z * op.matmat(z)
    return s.mean(1), s.std(1, ddof=1) / math.sqrt(s.shape[1])


def lanczos(op: LinearOperator, v0: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` Lanczos steps from ``v0`` with full reorthogonalisation: the tridiagonal's
    diagonal and off-diagonal (shorter where an invariant subspace is found)."""
    p = op.shape[0]
    steps = min(steps, p)
    basis = np.zeros((steps, p))
    alpha, beta = [], []
    q = v0 / np.linalg.norm(v0)
    for j in range(steps):
        basis[j] = q
        w = op.matvec(q)
        a = float(q @ w)
        alpha.append(a)
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)  # full reorthogonalisation, twice is enough
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = float(np.linalg.norm(w))
        if j == steps - 1 or b <= 1e-12 * max(1.0, abs(a)):
            break
        beta.append(b)
        q = w / b
    return np.array(alpha), np.array(beta)


def slq(op: LinearOperator, probes: int, steps: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic Lanczos quadrature: ``(nodes, weights)`` ``[probes, steps]`` each.

    For each Rademacher probe ``v`` the Lanczos tridiagonal's eigenvalues ``θⱼ`` and the
    squared first components ``τⱼ²`` of its eigenvectors make the Gauss quadrature of
    ``vᵀ f(A) v / P``; averaged over probes, ``Σ τ² f(θ)`` estimates ``tr f(A) / P``: the
    weights of one probe sum to 1 and the density is ``Σ τ² δ(λ - θ)`` averaged.
    Probes that stop early (an invariant subspace) are padded with zero weights.
    """
    p = op.shape[0]
    rng = _rng(seed)
    steps = min(steps, p)
    nodes = np.zeros((probes, steps))
    weights = np.zeros((probes, steps))
    for i in range(probes):
        alpha, beta = lanczos(op, _rademacher(rng, p, 1)[:, 0], steps)
        if len(alpha) == 1:
            theta, vecs = alpha, np.ones((1, 1))
        else:
            from scipy.linalg import eigh_tridiagonal

            theta, vecs = eigh_tridiagonal(alpha, beta)
        nodes[i, : len(theta)] = theta
        weights[i, : len(theta)] = vecs[0] ** 2
    return nodes, weights


def smooth_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """The SLQ density convolved with a Gaussian of width ``sigma`` on ``grid`` (integrates to 1)."""
    z = (grid[:, None] - nodes.reshape(-1)[None, :]) / sigma
    k = np.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    return k @ weights.reshape(-1) / nodes.shape[0]


def standard_errors(information: np.ndarray) -> np.ndarray:
    """``√diag(I⁻¹)`` of an information matrix, which must be symmetric positive definite
    (and not numerically singular: smallest eigenvalue above ``P·ε`` times the largest)."""
    information = np.asarray(information, dtype=np.float64)
    w = np.linalg.eigvalsh(information)
    tiny = information.shape[0] * np.finfo(np.float64).eps * max(abs(w[-1]), abs(w[0]), 1e-300)
    if w[0] <= tiny:
        what = "singular" if abs(w[0]) <= tiny else "not positive definite"
        raise NumericalError(
            f"the information matrix is {what}: no standard errors",
            expected="a positive definite matrix (a fitted θ at a strict maximum of the likelihood)",
            got=f"smallest eigenvalue {w[0]:.6g}, largest {w[-1]:.6g}",
            hint="check that θ is the maximum-likelihood estimate and that the parameters are identifiable "
            "(or restrict them with --params)",
        )
    from scipy.linalg import cho_factor, cho_solve

    c = cho_factor(information, lower=True)
    inv = cho_solve(c, np.eye(information.shape[0]))
    return np.sqrt(np.diag(inv))
