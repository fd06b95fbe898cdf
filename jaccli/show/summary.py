"""What people compute from a Jacobian or Hessian next: spectra, determinants, definiteness.

Per point (per point and output component for Hessians) and batched with
:mod:`torch.linalg`:

- **Jacobians** ``J`` (``rows`` outputs x ``cols`` inputs): the Frobenius norm ‖J‖_F, the
  largest and smallest singular values σ_max and σ_min (of the ``min(rows, cols)``
  singular values), the condition number σ_max / σ_min (infinite when σ_min = 0), and for
  square maps log|det J| and the sign of det J (normalising flows).
- **Hessians** ``H``: the extreme eigenvalues λ_min, λ_max of the symmetric part
  ½(H + Hᵀ) and a definiteness class. An eigenvalue counts as zero when
  ``|λ| ≤ rtol · max|λ|`` with ``rtol = 100 · n · ε`` by default (``n`` the matrix size,
  ``ε`` the machine epsilon of the result's dtype: 3.6e-5 for a 3 x 3 float32 Hessian):
  autodiff Hessians carry rounding errors of a few ε relative to their largest
  eigenvalue, and a bound without that slack would call a semidefinite Hessian
  indefinite or definite by noise. The classes are ``positive_definite`` (every λ > tol),
  ``negative_definite``, ``positive_semidefinite`` (λ ≥ -tol, some |λ| ≤ tol, some λ > tol),
  ``negative_semidefinite``, ``indefinite`` (some λ > tol and some λ < -tol) and ``zero``.

Each quantity is reported over the points as min / median / max. The work is done in
float64 on the result's device, a chunk of points at a time (:class:`Accumulator`), so
that a result arriving in pieces can be summarised as it comes; only a few numbers per
point are kept.

>>> import torch
>>> s = summarize(torch.eye(3) * 2, "jacobian")
>>> s.stats()["sigma_max"]["max"], s.stats()["logabsdet"]["max"]
(2.0, 2.0794415416798357)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from jaccli.errors import UsageError
from jaccli.request.kinds import SPECTRA, kinds
from jaccli.request.kinds import kind as kind_of

#: kinds whose summary is spectra of each point's matrix: singular values of an order-1
#: result (a Jacobian), eigenvalues of an order-2 one (a Hessian)
SUMMARY_KINDS = tuple(k.name for k in kinds() if k.summary == SPECTRA)

#: the float64 elements one chunk of matrices may hold (32 MiB)
CHUNK_ELEMENTS = 1 << 22

#: default slack of the definiteness test, in units of n · ε · max|λ| (see the module docstring)
RTOL_FACTOR = 100

#: (any λ > tol, any λ < -tol, any |λ| ≤ tol) -> class
DEFINITENESS = {
    (True, False, False): "positive_definite",
    (True, False, True): "positive_semidefinite",
    (False, True, False): "negative_definite",
    (False, True, True): "negative_semidefinite",
    (True, True, False): "indefinite",
    (True, True, True): "indefinite",
    (False, False, True): "zero",
    (False, False, False): "zero",  # an empty spectrum
}
DEFINITENESS_CLASSES = (
    "positive_definite", "positive_semidefinite", "negative_definite",
    "negative_semidefinite", "indefinite", "zero",
)  # fmt: skip

#: det J sign -> name
DET_SIGNS = {1: "positive", -1: "negative", 0: "zero"}

#: per order of the summarised kind (1: Jacobian, 2: Hessian), the per-point quantities in
#: the order they are shown, with their labels
QUANTITIES: dict[int, dict[str, str]] = {
    1: {
        "frobenius": "‖J‖_F",
        "sigma_max": "σ_max",
        "sigma_min": "σ_min",
        "condition": "condition σ_max/σ_min",
        "logabsdet": "log|det J|",
    },
    2: {
        "eigenvalue_min": "λ_min",
        "eigenvalue_max": "λ_max",
    },
}


def default_rtol(n: int, dtype: torch.dtype) -> float:
    """The definiteness slack for ``n x n`` Hessians computed in ``dtype``."""
    return RTOL_FACTOR * n * torch.finfo(dtype).eps


def _stats(values: np.ndarray) -> dict[str, float | None]:
    """min / median / max over the finite-or-infinite values; NaN (undefined) points are left out."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return {"min": None, "median": None, "max": None}
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


@dataclass
class Summary:
    """The per-point quantities of a Jacobian or Hessian and their spread over the points.

    ``per_point`` maps a quantity of :data:`QUANTITIES` to one float64 value per matrix
    (NaN where the matrix held NaN or Inf, counted in ``non_finite``); ``spectra`` holds every matrix's singular
    values (descending) or eigenvalues (ascending), ``[matrices, k]``; ``counts`` the
    determinant signs or definiteness classes.
    """

    kind: str
    points: int
    components: int
    matrix: tuple[int, int]
    per_point: dict[str, torch.Tensor]
    spectra: torch.Tensor
    counts: dict[str, int] = field(default_factory=dict)
    non_finite: int = 0
    rtol: float | None = None

    @property
    def order(self) -> int:
        """The order of the summarised kind: 1 for a Jacobian's, 2 for a Hessian's."""
        return kind_of(self.kind).order

    def stats(self) -> dict[str, dict[str, float | None]]:
        """``{quantity: {"min", "median", "max"}}`` (None where no point has a value)."""
        return {k: _stats(v.numpy()) for k, v in self.per_point.items()}

    def as_dict(self) -> dict:
        """JSON-able: infinite values (a singular Jacobian's condition number) become None."""

        def num(x):
            return None if x is None or not math.isfinite(x) else x

        doc = {
            "kind": self.kind,
            "points": self.points,
            "components": self.components,
            "matrix": list(self.matrix),
            **{k: {s: num(v) for s, v in d.items()} for k, d in self.stats().items()},
            "non_finite": self.non_finite,
        }
        if self.order == 1 and "logabsdet" in self.per_point:
            doc["det_sign"] = dict(self.counts)
        if self.order == 2:
            doc["definiteness"] = dict(self.counts)
            doc["rtol"] = self.rtol
        return doc


class Accumulator:
    """Summarise matrices a chunk at a time: :meth:`add` ``[points, components, rows, cols]``
    blocks as they arrive, then :meth:`finish`.

    >>> acc = Accumulator("hessian")
    >>> acc.add(torch.diag(torch.tensor([1.0, 2.0]))[None, None])
    >>> acc.add(-torch.eye(2)[None, None])
    >>> acc.finish().counts["positive_definite"], acc.finish().counts["negative_definite"]
    (1, 1)
    """

    def __init__(self, kind: str, *, rtol: float | None = None) -> None:
        _check_kind(kind)
        self.kind = kind
        self.order = kind_of(kind).order
        self.rtol = rtol
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._spectra: list[torch.Tensor] = []
        self._counts: dict[str, int] = {}
        self._points = 0
        self._shape: tuple[int, int, int] | None = None
        self._non_finite = 0
        self._dtype: torch.dtype | None = None

    def add(self, blocks: torch.Tensor) -> None:
        """Add ``[points, components, rows, cols]`` matrices (one chunk of points)."""
        p, k, r, c = blocks.shape
        if self._shape is None:
            self._shape, self._dtype = (k, r, c), blocks.dtype
        elif self._shape != (k, r, c):
            raise ValueError(f"chunk of blocks {tuple(blocks.shape)} after blocks of {self._shape}")
        if self.order == 2 and r != c:
            raise UsageError("a Hessian summary needs square blocks", got=f"{r} x {c}")
        if r == 0 or c == 0:
            raise UsageError("nothing to summarise: the matrices are empty", got=f"{r} x {c}")
        m = blocks.detach().reshape(p * k, r, c).to(torch.float64)
        finite = torch.isfinite(m).flatten(1).all(1)
        self._non_finite += int((~finite).sum())
        m = torch.where(finite[:, None, None], m, torch.zeros((), dtype=m.dtype, device=m.device))
        values = _JOBS[self.order](self, m)
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
        for name, v in values.items():
            if name == "spectrum":
                self._spectra.append(torch.where(finite[:, None], v, nan).cpu())
            elif name == "classes":
                for cls, ok in zip(v, finite.cpu().tolist()):
                    if ok:
                        self._counts[cls] = self._counts.get(cls, 0) + 1
            else:
                self._parts.setdefault(name, []).append(torch.where(finite, v, nan).cpu())
        self._points += p

    def _jacobian(self, m: torch.Tensor) -> dict:
        s = torch.linalg.svdvals(m)
        smax, smin = s[:, 0], s[:, -1]
        inf = torch.tensor(math.inf, dtype=s.dtype, device=s.device)
        out = {
            "frobenius": torch.linalg.matrix_norm(m),
            "sigma_max": smax,
            "sigma_min": smin,
            "condition": torch.where(smin > 0, smax / smin.clamp_min(torch.finfo(s.dtype).tiny), inf),
            "spectrum": s,
        }
        if m.shape[-1] == m.shape[-2]:
            sign, logabsdet = torch.linalg.slogdet(m)
            out["logabsdet"] = logabsdet
            out["classes"] = [DET_SIGNS[int(v)] for v in sign.round().cpu().tolist()]
        return out

    def _hessian(self, m: torch.Tensor) -> dict:
        lam = torch.linalg.eigvalsh((m + m.mT) / 2)
        n = m.shape[-1]
        rtol = self.rtol if self.rtol is not None else default_rtol(n, self._dtype)
        tol = rtol * lam.abs().amax(1, keepdim=True)
        pos = (lam > tol).any(1).cpu().tolist()
        neg = (lam < -tol).any(1).cpu().tolist()
        zero = (lam.abs() <= tol).any(1).cpu().tolist()
        self.rtol = rtol
        return {
            "eigenvalue_min": lam[:, 0],
            "eigenvalue_max": lam[:, -1],
            "spectrum": lam,
            "classes": [DEFINITENESS[key] for key in zip(pos, neg, zero)],
        }

    def finish(self) -> Summary:
        """The summary of everything added so far."""
        if self._shape is None:
            raise UsageError("nothing to summarise: no points")
        k, r, c = self._shape
        names = DET_SIGNS.values() if self.order == 1 else DEFINITENESS_CLASSES
        counted = self.order == 2 or r == c  # det J signs of square Jacobians
        counts = {n: self._counts.get(n, 0) for n in names} if counted else {}
        return Summary(
            kind=self.kind,
            points=self._points,
            components=k,
            matrix=(r, c),
            per_point={
                q: torch.cat(self._parts[q]) for q in QUANTITIES[self.order] if q in self._parts
            },
            spectra=torch.cat(self._spectra),
            counts=counts,
            non_finite=self._non_finite,
            rtol=self.rtol if self.order == 2 else None,
        )


#: per order of the summarised kind, what one chunk of its matrices gives
_JOBS = {1: Accumulator._jacobian, 2: Accumulator._hessian}


def _check_kind(kind: str) -> None:
    if kind not in SUMMARY_KINDS:
        raise UsageError("a summary needs a Jacobian or a Hessian", expected=" or ".join(SUMMARY_KINDS), got=kind)


def summarize_blocks(blocks: torch.Tensor, kind: str, *, rtol: float | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> Summary:
    """:class:`Summary` of ``[points, components, rows, cols]`` matrices, a chunk of points at a time."""
    acc = Accumulator(kind, rtol=rtol)
    per_point = max(1, math.prod(blocks.shape[1:]))
    step = max(1, chunk_elements // per_point)
    for start in range(0, blocks.shape[0], step):
        acc.add(blocks[start : start + step])
    return acc.finish()


def summarize(
    result: torch.Tensor,
    kind: str,
    *,
    per_sample: bool = False,
    in_ndim: int = 1,
    rtol: float | None = None,
) -> Summary:
    """Singular values, condition numbers and log|det| of a Jacobian, or the extreme
    eigenvalues and definiteness of a Hessian, per point and over the points.

    ``result`` is what :func:`jaccli.jacobian` or :func:`jaccli.hessian` returned with the
    same ``per_sample``; ``in_ndim`` is the number of axes of one point's input (1 for
    ``[N, n]`` inputs per sample, ``x.dim()`` for a whole input). ``rtol`` is the
    definiteness slack (see the module docstring). ``Summary.stats()`` gives
    min / median / max, ``Summary.as_dict()`` the ``--json`` form.

    >>> import torch, jaccli
    >>> c, s = torch.cos(torch.tensor(0.3)), torch.sin(torch.tensor(0.3))
    >>> J = jaccli.jacobian(lambda v: torch.stack([c * v[0] - s * v[1], s * v[0] + c * v[1]]), torch.ones(2))
    >>> st = jaccli.summarize(J, "jacobian").stats()
    >>> round(st["sigma_min"]["min"], 6), round(st["logabsdet"]["max"], 6)
    (1.0, 0.0)
    >>> H = jaccli.hessian(lambda v: (v**2 * torch.tensor([1.0, -2.0])).sum(-1), torch.ones(3, 2), per_sample=True)
    >>> jaccli.summarize(H, "hessian", per_sample=True).counts["indefinite"]
    3
    """
    _check_kind(kind)
    order = kind_of(kind).order
    lead = 1 if per_sample else 0
    n_in = in_ndim * order
    if result.dim() < lead + n_in:
        raise UsageError(
            f"a {kind} result has too few axes for in_ndim={in_ndim}",
            expected=f"at least {lead + n_in}",
            got=list(result.shape),
        )
    shape = result.shape
    points = shape[0] if per_sample else 1
    out = math.prod(shape[lead : result.dim() - n_in])
    n = math.prod(shape[result.dim() - n_in :][:in_ndim])
    if order == 2:  # one n x n matrix per output component
        blocks = result.reshape(points, out, n, n)
    else:  # one out x n matrix per point
        blocks = result.reshape(points, 1, out, n)
    return summarize_blocks(blocks, kind, rtol=rtol)


@dataclass
class ValueSummary:
    """How the values of a result with no matrix per point (a divergence, a Laplacian, a
    named partial) spread over the points: per output component, min / median / max, the
    mean, the largest |value| and the point where it is (``--summary`` of those commands)."""

    points: int
    components: list[str]
    rows: dict[str, dict[str, float | int | None]]
    non_finite: int = 0

    def as_dict(self) -> dict:
        return {"kind": "values", "points": self.points, "non_finite": self.non_finite, "components": self.rows}


def summarize_values(result: torch.Tensor, *, per_sample: bool = False) -> ValueSummary:
    """:class:`ValueSummary` of ``result`` (``[N, *out]`` per sample, else one point ``[*out]``).

    >>> s = summarize_values(torch.tensor([[1.0, -4.0], [3.0, 2.0], [2.0, 0.0]]), per_sample=True)
    >>> s.rows["out[1]"]["max_abs"], s.rows["out[1]"]["worst_point"], s.rows["out[0]"]["median"]
    (4.0, 0, 2.0)
    """
    v = result.detach().to(torch.float64).cpu()
    v = v.reshape(v.shape[0] if per_sample and v.dim() else 1, -1)
    n, k = v.shape
    finite = torch.isfinite(v)
    rows = {}
    names = ["out"] if k == 1 else [f"out[{j}]" for j in range(k)]
    for j, name in enumerate(names):
        col = v[:, j][finite[:, j]]
        if col.numel() == 0:
            rows[name] = {"min": None, "median": None, "max": None, "mean": None, "max_abs": None, "worst_point": None}
            continue
        worst = int(torch.where(finite[:, j], v[:, j].abs(), torch.tensor(-1.0, dtype=torch.float64)).argmax())
        rows[name] = {
            "min": float(col.min()), "median": float(col.median()), "max": float(col.max()), "mean": float(col.mean()),
            "max_abs": float(col.abs().max()), "worst_point": worst if per_sample else None,
        }  # fmt: skip
    return ValueSummary(points=n, components=names, rows=rows, non_finite=int((~finite).sum()))
