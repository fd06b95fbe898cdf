"""The public function :func:`curvature`, exported by :mod:`jaccli`.

It takes a model (a :func:`jaccli.load_model` result or any ``nn.Module``), its inputs (a
tensor, or a dict of named tensors, samples along axis 0) and a target, builds an
:class:`~.objective.Objective` and asks the operators of :mod:`.spectral` what was
requested, sharing the work: one assembled matrix serves ``full``, ``diag``, ``trace``,
``eig`` and standard errors alike; an exact diagonal gives the trace and the per-layer traces.

Imports: torch, numpy, :mod:`.assembled`, :mod:`.layertrace`, :mod:`.objective`, :mod:`.params`, :mod:`.spectral`,
:mod:`jaccli.engine.memory` (memory), :mod:`jaccli.errors`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from jaccli.curvature import assembled, layertrace, spectral
from jaccli.curvature.losses import get_loss
from jaccli.curvature.objective import Objective, build_objective
from jaccli.curvature.params import ParamInfo, ParamSpace
from jaccli.engine.memory import memory_available
from jaccli.errors import format_bytes, ResourceError, UsageError

#: up to this many parameters a Hessian's diagonal and trace are exact (P products); beyond, estimated
EXACT_LIMIT = 2048
#: ``trace_method`` -> what a Hessian's estimated trace may use: ``layers`` (per-sample probes of the
#: linear layers' outputs, :mod:`.layertrace`), ``products`` (Hutch++/Hutchinson in parameter space)
TRACE_METHODS = {"auto": ("layers", "products"), "layers": ("layers",), "products": ("products",)}
#: ``trace_estimator`` of :mod:`.layertrace`'s estimate
LAYER_ESTIMATOR = "per-sample Hutchinson"
#: the JSON schema of ``jaccli curvature --json``
SCHEMA = "jaccli.curvature/1"


@dataclass
class CurvatureResult:
    """What :func:`curvature` computed; ``None`` for what was not asked.

    ``eigenvalues`` are descending, ``eigenvectors`` ``[P, K]`` their columns; ``density``
    holds the SLQ ``nodes`` and ``weights`` ``[probes, steps]``; ``trace_stderr`` and
    ``diag_stderr`` are ``None`` when the figure is exact, ``trace_estimator`` names the estimator
    (``"per-sample Hutchinson"``, ``"Hutch++"`` or ``"Hutchinson"``, ``None`` when exact); ``by_layer`` one dict per
    parameter tensor (its diagonal block of the matrix).
    """

    loss: str
    reduction: str
    matrix: str
    samples: int
    loss_value: float
    gradient_norm: float
    params: list[ParamInfo]
    full: np.ndarray | None = None
    diag: np.ndarray | None = None
    diag_stderr: np.ndarray | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    trace_estimator: str | None = None
    eigenvalues: np.ndarray | None = None
    eigenvectors: np.ndarray | None = None
    which: str = "largest"
    density: dict[str, np.ndarray] | None = None
    by_layer: list[dict] | None = None
    standard_errors: np.ndarray | None = None
    products: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.params)

    def tensors(self) -> dict[str, np.ndarray]:
        """What ``--save`` writes, by name."""
        names = ("full", "diag", "diag_stderr", "eigenvalues", "eigenvectors", "standard_errors")
        out = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.density is not None:
            out.update({f"density_{k}": v for k, v in self.density.items()})
        return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}

    def as_dict(self) -> dict:
        """The ``--json`` document (keys in :data:`SCHEMA`'s version)."""
        doc = {
            "schema": SCHEMA,
            "loss": self.loss,
            "reduction": self.reduction,
            "loss_value": self.loss_value,
            "gradient_norm": self.gradient_norm,
            "matrix": self.matrix,
            "samples": self.samples,
            "parameters": self.size,
            "params": [p.as_dict() for p in self.params],
            "products": self.products,
            "seconds": self.seconds,
            "notes": self.notes,
        }
        if self.trace is not None:
            doc["trace"] = self.trace
            doc["trace_stderr"] = self.trace_stderr
            doc["trace_estimator"] = self.trace_estimator
        if self.eigenvalues is not None:
            doc["eigenvalues"] = self.eigenvalues.tolist()
            doc["which"] = self.which
        if self.diag is not None:
            doc["diag"] = {"min": float(self.diag.min()), "max": float(self.diag.max()),
                           "sum": float(self.diag.sum()), "estimated": self.diag_stderr is not None}  # fmt: skip
        if self.density is not None:
            doc["density"] = {k: v.tolist() for k, v in self.density.items()}
        if self.by_layer is not None:
            doc["by_layer"] = self.by_layer
        if self.standard_errors is not None:
            doc["standard_errors"] = [
                {"name": p.name, "shape": list(p.shape), "values": self.standard_errors[p.offset : p.offset + p.size].tolist()}
                for p in self.params
            ]
        return doc


def check_dense_fits(p: int, device: torch.device | None = None, *, what: str = "the full matrix") -> None:
    """Refuse, before allocating, a ``P×P`` float64 matrix (and its working copy) that does not fit."""
    need = 2 * p * p * 8
    free = memory_available(torch.device("cpu"))
    if need > free // 2:
        raise ResourceError(
            f"{what} of {p:,} parameters needs {format_bytes(need)}",
            expected=f"at most {format_bytes(free // 2)} (half the free memory)",
            hint="ask for --diag, --trace, --eig K or --density (products only), or restrict --params",
        )


def curvature(
    model,
    inputs,
    target: torch.Tensor | None = None,
    *,
    loss: str,
    matrix: str = "hessian",
    full: bool = False,
    diag: bool = False,
    trace: bool = False,
    eig: int | None = None,
    which: str = "largest",
    density: bool = False,
    by_layer: bool = False,
    standard_errors: bool = False,
    params: str | None = None,
    reduction: str | None = None,
    samples: int = 100,
    trace_method: str = "auto",
    probes: int = 8,
    steps: int = 64,
    tol: float = 1e-6,
    seed: int = 0,
    chunk_size: int | None = None,
    output=None,
    target_name: str | None = None,
) -> CurvatureResult:
    """Curvature of a model's loss over a data set with respect to its parameters.

    ``matrix`` is ``"hessian"`` (∇²L), ``"ggn"`` (the generalised Gauss-Newton ``Jᵀ H_L J``,
    the Fisher for these losses) or ``"ef"`` (the empirical Fisher ``Σ gᵢgᵢᵀ / N``). The
    loss (``mse``, ``cross-entropy``, ``bce``, ``nll``, ``output``, ``log-likelihood``) is
    reduced as ``torch.nn.functional`` does (``reduction="mean"``, ``log-likelihood``
    sums). Parameters are the model's named parameters in state-dict order, each flattened
    row-major; ``params`` (comma-separated globs) restricts them.

    ``full``: the ``P×P`` matrix (refused before allocating when it does not fit);
    ``diag``; ``trace`` (exact up to :data:`EXACT_LIMIT` parameters for the Hessian and
    always for ``ggn``/``ef``, else estimated from ``samples`` products with a standard
    error: where every selected parameter is a linear layer's, by per-sample probes of the layers'
    outputs (exact where their widths add up to at most ``samples``), else Hutch++, or Hutchinson
    where the spectrum is flat; ``trace_method`` ``"layers"`` or ``"products"`` insists on one); ``eig=K`` the K eigenvalues ``which`` picks (``largest``, ``smallest``,
    ``magnitude``) by Lanczos (``eigsh``, tolerance ``tol``); ``density``: stochastic
    Lanczos quadrature with ``probes`` vectors of ``steps`` steps; ``by_layer``: trace and
    largest eigenvalue of each parameter tensor's diagonal block; ``standard_errors``
    (``log-likelihood``): ``√diag(I⁻¹)`` of the observed information.

    >>> import torch, jaccli
    >>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    >>> y = 2 * x + 1
    >>> net = torch.nn.Linear(1, 1).double()
    >>> r = jaccli.curvature(net, x, y, loss="mse", full=True, trace=True)
    >>> r.full.round(6).tolist()  # (2/N) X̃ᵀX̃ with X̃ = [x, 1]
    [[7.0, 3.0], [3.0, 2.0]]
    >>> r.trace, r.trace_stderr
    (9.0, None)
    """
    start = time.perf_counter()
    lossrow = get_loss(loss)
    if matrix not in spectral_matrices():
        raise UsageError("unknown matrix", expected=", ".join(spectral_matrices()), got=matrix)
    if matrix == "ggn" and lossrow.sqrt is None:
        raise UsageError(f"--matrix ggn is not defined for --loss {loss}: its output is the loss itself",
                         expected="--matrix hessian or ef")  # fmt: skip
    if standard_errors and loss != "log-likelihood":
        raise UsageError("--standard-errors needs --loss log-likelihood (the model's output is log f(x|θ))", got=loss)
    if standard_errors and matrix == "ggn":
        raise UsageError("--standard-errors takes the observed information (hessian) or the outer product of "
                         "scores (ef)", got="ggn")  # fmt: skip
    if trace_method not in TRACE_METHODS:
        raise UsageError("unknown --trace-method", expected=", ".join(TRACE_METHODS), got=trace_method)
    if which not in spectral.WHICH_ARPACK:
        raise UsageError("unknown --which", expected=", ".join(spectral.WHICH_ARPACK), got=which)
    if eig is not None and eig < 1:
        raise UsageError("--eig K needs K ≥ 1", got=eig)
    for name, v in (("samples", samples), ("probes", probes), ("steps", steps)):
        if v < 1:
            raise UsageError(f"--{name} must be positive", got=v)
    if not (full or diag or trace or eig or density or by_layer or standard_errors):
        trace = True  # a bare request still says something about the matrix
    obj = build_objective(model, inputs, target, loss=loss, reduction=reduction, params=params,
                     chunk_size=chunk_size, output=output, names=target_name)  # fmt: skip
    p = obj.space.size
    dense_needed = full or standard_errors or (eig is not None and eig >= p - 1)
    if dense_needed:
        check_dense_fits(p, what="the full matrix" if full else "the information matrix" if standard_errors else
                         "the eigen-decomposition")  # fmt: skip
    # a trace alone runs on torch alone: scipy's operator (0.1-0.2 s to import) only where a scipy routine needs it
    trace_only = not (full or diag or eig is not None or density or by_layer or standard_errors)
    # an estimated Hessian trace by the linear layers' outputs (None: not asked, or the model has other parameters)
    layered = (trace and matrix == "hessian" and not dense_needed and p > EXACT_LIMIT
               and "layers" in TRACE_METHODS[trace_method] and layertrace.applies(obj))  # fmt: skip
    # the Hessian's products through kept graphs follow: the gradient's pass builds them (not for the layers' trace alone)
    keep = matrix == "hessian" and not dense_needed and not (trace_only and layered)
    value, gradient = obj.value_and_grad(keep_hessian_graphs=keep)
    result = CurvatureResult(loss, obj.reduction, matrix, obj.n, value, float(gradient.norm()), list(obj.space.infos),
                             which=which)  # fmt: skip
    op = spectral.Products(obj, matrix) if trace_only else spectral.operator(obj, matrix)
    M = spectral.dense(op) if dense_needed else None
    if full:
        result.full = M
    exact_diag = None
    if M is not None:
        exact_diag = np.diag(M).astype(np.float64)
    elif (diag or trace or by_layer) and (matrix != "hessian" or p <= EXACT_LIMIT):
        if matrix != "hessian":
            exact_diag = assembled.diagonal(obj, matrix).detach().cpu().double().numpy()
        else:  # a small problem by products through the kept graph: no layer-wise trace, no torch._dynamo
            H = assembled.small_hessian(obj)
            H = spectral.dense(spectral.operator(obj, matrix)) if H is None else H.detach().cpu().double().numpy()
            exact_diag = np.diag(H).astype(np.float64)
    if diag:
        if exact_diag is not None:
            result.diag = exact_diag
        else:
            result.diag, result.diag_stderr = spectral.hutchinson_diagonal(op, samples, seed=seed)
            result.notes.append(f"the diagonal is a Hutchinson estimate from {samples} products (diag_stderr)")
    if trace:
        if exact_diag is not None:
            result.trace = float(exact_diag.sum())
        else:
            got = layertrace.layer_trace(obj, samples, seed=seed) if layered else None
            if got is not None:
                result.trace, result.trace_stderr = got
                result.trace_estimator = None if got[1] is None else LAYER_ESTIMATOR
                result.notes.append("the trace is exact: the linear layers' output Hessians by unit probes"
                                    if got[1] is None else
                                    f"the trace is a {LAYER_ESTIMATOR} estimate (probes of the linear layers' outputs, "
                                    f"one per sample) from {max(2, samples)} rounds ± its standard error")  # fmt: skip
            elif "products" not in TRACE_METHODS[trace_method]:
                raise UsageError("--trace-method layers needs every selected parameter in a linear layer of a model "
                                 "whose samples do not mix", hint="--trace-method products (Hutch++), or restrict --params")
            else:
                result.trace, result.trace_stderr, method = spectral.trace_estimate(op, samples, seed=seed)
                result.trace_estimator = method
                result.notes.append(f"the trace is a {method} estimate from {samples} products ± its standard error")
    if eig is not None:
        result.eigenvalues, result.eigenvectors = spectral.eigenvalues(op, eig, which, tol=tol, seed=seed,
                                                                       dense_matrix=M)  # fmt: skip
    if density:
        nodes, weights = spectral.slq(op, probes, steps, seed=seed)
        result.density = {"nodes": nodes, "weights": weights}
    if by_layer:
        result.by_layer = _by_layer(model, inputs, target, obj, matrix, exact_diag, M, loss=loss, reduction=reduction,
                                    chunk_size=chunk_size, output=output, eig=eig or 1, which=which, samples=samples,
                                    trace_method=trace_method,
                                    tol=tol, seed=seed)  # fmt: skip
    if standard_errors:
        # the information of the summed log-likelihood: a mean divides it by N, the EF too
        scale = obj.n if (matrix == "ef" or obj.reduction == "mean") else 1
        result.standard_errors = spectral.standard_errors(M * scale)
    if obj.dense_note and dense_needed:  # asked for the matrix: say why it took the slower path
        result.notes.append(obj.dense_note)
    result.products = obj.products
    result.seconds = time.perf_counter() - start
    return result


def spectral_matrices() -> tuple[str, ...]:
    from jaccli.curvature.objective import PRODUCTS

    return tuple(PRODUCTS)


def _by_layer(model, inputs, target, obj, matrix, exact_diag, M, *, eig, which, samples, tol, seed, **kw) -> list[dict]:
    """Trace and extreme eigenvalues of each parameter tensor's diagonal block."""
    rows = []
    for info in obj.space.infos:
        sl = slice(info.offset, info.offset + info.size)
        sub = Objective(ParamSpace(model, None, output=kw["output"]), obj.loss, inputs, target,
                        reduction=kw["reduction"], chunk_size=kw["chunk_size"])  # fmt: skip
        sub.space = _restricted(sub.space, info.name)
        op = spectral.operator(sub, matrix)
        block = None if M is None else M[sl, sl]
        row: dict = {"name": info.name, "shape": list(info.shape), "size": info.size}
        if exact_diag is not None:
            row["trace"], row["trace_stderr"] = float(exact_diag[sl].sum()), None
        elif info.size <= EXACT_LIMIT:
            row["trace"], row["trace_stderr"] = float(np.trace(spectral.dense(op))), None
        else:  # the layers' per-sample probes where the tensor is a linear layer's (its block's trace alone)
            got = layertrace.layer_trace(sub, samples, seed=seed) \
                if matrix == "hessian" and "layers" in TRACE_METHODS[kw["trace_method"]] else None
            row["trace"], row["trace_stderr"] = got or spectral.trace_estimate(op, samples, seed=seed)[:2]
        k = min(eig, info.size)
        w, _ = spectral.eigenvalues(op, k, which, tol=tol, seed=seed, dense_matrix=block)
        row["eigenvalues"] = w.tolist()
        obj.products += sub.products
        rows.append(row)
    return rows


def _restricted(space: ParamSpace, name: str) -> ParamSpace:
    """``space`` cut down to one parameter tensor (its diagonal block)."""
    import copy

    i = space.names.index(name)
    out = copy.copy(space)
    out.names, out.values = (name,), (space.values[i],)
    out.fixed = {**space.fixed, **{k: v for k, v in zip(space.names, space.values) if k != name}}
    out.infos = (ParamInfo(name, space.infos[i].shape, 0),)
    out.size = space.infos[i].size
    return out
