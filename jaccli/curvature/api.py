"""The public functions :func:`curvature` and :func:`grads`, exported by :mod:`jaccli`.

Both take a model (a :func:`jaccli.load_model` result or any ``nn.Module``), its inputs
(a tensor, or a dict of named tensors, samples along axis 0) and a target, and build an
:class:`~.objective.Objective`; :func:`curvature` then asks the operators of
:mod:`.spectral` what was requested, sharing the work (one assembled matrix serves
``full``, ``diag``, ``trace``, ``eig`` and standard errors alike; an exact diagonal gives
the trace and the per-layer traces). :func:`grads` streams per-sample gradients into a
:class:`jaccli.Stream` file chunk by chunk when asked to save to ``.npy``/``.safetensors``.

Imports: torch, numpy, :mod:`.objective`, :mod:`.params`, :mod:`.losses`, :mod:`.spectral`,
:mod:`jaccli.io`, :mod:`jaccli.engine.planner` (memory), :mod:`jaccli.errors`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from jaccli.curvature import spectral
from jaccli.curvature.losses import get_loss
from jaccli.curvature.objective import Objective, all_reduce, dist_info
from jaccli.curvature.params import ParamInfo, ParamSpace
from jaccli.engine.planner import memory_available
from jaccli.errors import format_bytes, ResourceError, ResumeError, UsageError

#: up to this many parameters a Hessian's diagonal and trace are exact (P products); beyond, estimated
EXACT_LIMIT = 2048
#: the JSON schema of ``jaccli curvature --json`` and ``jaccli grads --json``
SCHEMA = {"curvature": "jaccli.curvature/1", "grads": "jaccli.grads/1"}


@dataclass
class CurvatureResult:
    """What :func:`curvature` computed; ``None`` for what was not asked.

    ``eigenvalues`` are descending, ``eigenvectors`` ``[P, K]`` their columns; ``density``
    holds the SLQ ``nodes`` and ``weights`` ``[probes, steps]``; ``trace_stderr`` and
    ``diag_stderr`` are ``None`` when the figure is exact; ``by_layer`` one dict per
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
            "schema": SCHEMA["curvature"],
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


def _objective(model, inputs, target, *, loss, reduction, params, chunk_size, output, names=None) -> Objective:
    space = ParamSpace(model, params, output=output)
    return Objective(space, get_loss(loss), inputs, target, reduction=reduction, chunk_size=chunk_size,
                     target_name=names or "target")  # fmt: skip


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
    always for ``ggn``/``ef``, else Hutch++ from ``samples`` products with a standard
    error); ``eig=K`` the K eigenvalues ``which`` picks (``largest``, ``smallest``,
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
    if which not in spectral.WHICH_ARPACK:
        raise UsageError("unknown --which", expected=", ".join(spectral.WHICH_ARPACK), got=which)
    if eig is not None and eig < 1:
        raise UsageError("--eig K needs K ≥ 1", got=eig)
    for name, v in (("samples", samples), ("probes", probes), ("steps", steps)):
        if v < 1:
            raise UsageError(f"--{name} must be positive", got=v)
    if not (full or diag or trace or eig or density or by_layer or standard_errors):
        trace = True  # a bare request still says something about the matrix
    obj = _objective(model, inputs, target, loss=loss, reduction=reduction, params=params,
                     chunk_size=chunk_size, output=output, names=target_name)  # fmt: skip
    p = obj.space.size
    dense_needed = full or standard_errors or (eig is not None and eig >= p - 1)
    if dense_needed:
        check_dense_fits(p, what="the full matrix" if full else "the information matrix" if standard_errors else
                         "the eigen-decomposition")  # fmt: skip
    value, gradient = obj.value_and_grad()
    result = CurvatureResult(loss, obj.reduction, matrix, obj.n, value, float(gradient.norm()), list(obj.space.infos),
                             which=which)  # fmt: skip
    op = spectral.operator(obj, matrix)
    M = spectral.dense(op) if dense_needed else None
    if full:
        result.full = M
    exact_diag = None
    if M is not None:
        exact_diag = np.diag(M).copy()
    elif (diag or trace or by_layer) and (matrix != "hessian" or p <= EXACT_LIMIT):
        exact_diag = obj.diagonal(matrix).detach().cpu().double().numpy() if matrix != "hessian" else \
            np.diag(spectral.dense(op))  # fmt: skip
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
            result.trace, result.trace_stderr = spectral.hutchpp(op, samples, seed=seed)
            result.notes.append(f"the trace is a Hutch++ estimate from {samples} products ± its standard error")
    if eig is not None:
        result.eigenvalues, result.eigenvectors = spectral.eigenvalues(op, eig, which, tol=tol, seed=seed,
                                                                       dense_matrix=M)  # fmt: skip
    if density:
        nodes, weights = spectral.slq(op, probes, steps, seed=seed)
        result.density = {"nodes": nodes, "weights": weights}
    if by_layer:
        result.by_layer = _by_layer(model, inputs, target, obj, matrix, exact_diag, M, loss=loss, reduction=reduction,
                                    chunk_size=chunk_size, output=output, eig=eig or 1, which=which, samples=samples,
                                    tol=tol, seed=seed)  # fmt: skip
    if standard_errors:
        # the information of the summed log-likelihood: a mean divides it by N, the EF too
        scale = obj.n if (matrix == "ef" or obj.reduction == "mean") else 1
        result.standard_errors = spectral.standard_errors(M * scale)
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
        else:
            row["trace"], row["trace_stderr"] = spectral.hutchpp(op, samples, seed=seed)
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


# ------------------------------------------------------------------ gradients


@dataclass
class GradsResult:
    """What :func:`grads` computed: the loss, the gradient of the reduced loss ``[P]`` and,
    with ``per_sample``, the ``[N, P]`` gradients of each sample's own loss (a tensor backed
    by the file when it streamed) and a summary of their norms."""

    loss: str
    reduction: str
    samples: int
    loss_value: float
    gradient: torch.Tensor
    params: list[ParamInfo]
    per_sample: torch.Tensor | None = None
    norms: dict | None = None
    saved_to: str | None = None
    resumed_samples: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        doc = {
            "schema": SCHEMA["grads"],
            "loss": self.loss,
            "reduction": self.reduction,
            "loss_value": self.loss_value,
            "samples": self.samples,
            "parameters": int(self.gradient.numel()),
            "params": [p.as_dict() for p in self.params],
            "gradient_norm": float(self.gradient.norm()),
            "seconds": self.seconds,
            "saved_to": self.saved_to,
        }
        if self.norms is not None:
            doc["per_sample_norms"] = self.norms
            doc["resumed_samples"] = self.resumed_samples
        return doc


def _norm_summary(norms: torch.Tensor, top: int = 5) -> dict:
    n = norms.double()
    order = torch.argsort(n, descending=True)[:top]
    return {
        "min": float(n.min()), "mean": float(n.mean()), "median": float(n.median()), "max": float(n.max()),
        "rms": float(n.pow(2).mean().sqrt()),
        "largest": [{"sample": int(i), "norm": float(n[i])} for i in order],
    }  # fmt: skip


def grads(
    model,
    inputs,
    target: torch.Tensor | None = None,
    *,
    loss: str,
    reduction: str | None = None,
    per_sample: bool = False,
    params: str | None = None,
    chunk_size: int | None = None,
    output=None,
    save=None,
    progress: Callable[[int, int], None] | None = None,
    target_name: str | None = None,
) -> GradsResult:
    """The gradient of the reduced loss with respect to the parameters, and per-sample gradients.

    ``per_sample=True`` also gives the ``[N, P]`` gradients of each sample's own loss,
    unscaled (their mean is the gradient of the mean loss, their sum that of the summed
    loss), with a summary of their norms (the largest name their samples: influence,
    clipping). ``save`` (a path or a :class:`jaccli.Stream`) writes them; ``.npy`` and
    ``.safetensors`` stream chunk by chunk (``Stream(path, resume=True)`` continues an
    interrupted run; under ``torchrun`` each rank writes its chunks of the same file).
    Without ``per_sample`` ``save`` writes the gradient ``[P]``.

    >>> import torch, jaccli
    >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    >>> net = torch.nn.Linear(1, 1, bias=False).double()
    >>> _ = torch.nn.init.zeros_(net.weight)
    >>> g = jaccli.grads(net, x, 3 * x, loss="mse", per_sample=True)
    >>> g.per_sample[:, 0].tolist(), g.gradient.tolist()   # d(w·x - 3x)²/dw = -6x² at w = 0
    ([-6.0, -24.0], [-15.0])
    """
    from jaccli.io import save_tensors
    from jaccli.io import stream as st

    start = time.perf_counter()
    obj = _objective(model, inputs, target, loss=loss, reduction=reduction, params=params,
                     chunk_size=chunk_size, output=output, names=target_name)  # fmt: skip
    space, n, p = obj.space, obj.n, obj.space.size
    spec = None if save is None else save if isinstance(save, st.Stream) else st.Stream(save, name="grads")
    streams = per_sample and spec is not None and st.can_stream(spec.path)
    if spec is not None and spec.resume and not streams:
        raise ResumeError("cannot resume: only per-sample gradients saved to .npy or .safetensors stream to disk",
                          where=os.fspath(spec.path), hint="rerun without --resume")  # fmt: skip
    if not per_sample:
        value, gradient = obj.value_and_grad()
        result = GradsResult(loss, obj.reduction, n, value, gradient.detach(), list(space.infos))
        if spec is not None and dist_info()[1] == 0:
            save_tensors(spec.path, {spec.name if spec.name != "result" else "grads": gradient.detach().cpu()},
                         metadata=spec.metadata, force=spec.force)  # fmt: skip
        result.saved_to = None if spec is None else os.fspath(spec.path)
        result.seconds = time.perf_counter() - start
        return result
    if streams:
        value = _loss_value(obj)  # over every sample, those an interrupted run wrote too
        rows, resumed = _stream_rows(obj, spec, progress, model)
    else:
        if dist_info()[0] > 1:
            raise UsageError("under torchrun, per-sample gradients are split between the ranks only when they "
                             "stream to a file", expected="--save FILE.npy or FILE.safetensors")  # fmt: skip
        need = n * p * space.values[0].element_size()
        if need > memory_available(space.device) // 2:
            raise ResourceError(f"the per-sample gradients [{n}, {p}] need {format_bytes(need)}",
                                hint="stream them to disk with --save FILE.npy (or .safetensors)")  # fmt: skip
        rows, resumed = torch.empty(n, p, dtype=space.dtype, device=space.device), 0
        loss_sum = torch.zeros((), dtype=torch.float64)
        for a in range(0, n, obj.chunk):
            b = min(a + obj.chunk, n)
            block, losses = obj.per_sample_grads(a, b, losses=True)
            rows[a:b] = block.detach()
            loss_sum += losses.double().sum().cpu()
            if progress is not None:
                progress(b, n)
        value = _finite(float(loss_sum) * obj.weight, obj)
        if spec is not None:
            save_tensors(spec.path, {spec.name if spec.name != "result" else "grads": rows.cpu()},
                         metadata=spec.metadata, force=spec.force)  # fmt: skip
    # the gradient and the norms from the rows themselves (a file-backed tensor read in chunks)
    total = torch.zeros(p, dtype=torch.float64)
    norms = torch.empty(n, dtype=torch.float64)
    for a in range(0, n, max(obj.chunk, 1)):
        block = rows[a : a + obj.chunk].to(torch.float64)
        total += block.sum(0).cpu()
        norms[a : a + block.shape[0]] = block.norm(dim=1).cpu()
    gradient = (total * obj.weight).to(space.dtype)
    result = GradsResult(loss, obj.reduction, n, value, gradient, list(space.infos), per_sample=rows,
                         norms=_norm_summary(norms), resumed_samples=resumed)  # fmt: skip
    result.saved_to = None if spec is None else os.fspath(spec.path)
    result.seconds = time.perf_counter() - start
    return result


def _loss_value(obj: Objective) -> float:
    """``L(θ)`` by forward passes only (all ranks' sum)."""
    total = torch.zeros(1, dtype=torch.float64, device=obj.space.device)
    with torch.no_grad():
        for a, b in obj.chunks():
            total += obj.chunk_loss(obj.space.values, a, b).double()
    return _finite(float(all_reduce(total)[0]), obj)


def _finite(value: float, obj: Objective) -> float:
    from jaccli.errors import NumericalError

    if not math.isfinite(value):
        raise NumericalError("the loss is not finite", where=obj.space.where, got=value,
                             hint="check the model, the input and the target for NaN, Inf or extreme values")  # fmt: skip
    return value


def _stream_rows(obj: Objective, spec, progress, model) -> tuple[torch.Tensor, int]:
    """Per-sample gradients written chunk by chunk into ``spec``'s file; the finished file as a tensor."""
    import importlib.metadata

    from jaccli.io import stream as st
    from jaccli.io.records import parameters_fingerprint

    n, p = obj.n, obj.space.size
    facts = {
        "command": "grads",
        "loss": obj.loss.name,
        "reduction": obj.reduction,
        "params": list(obj.space.names),
        "samples": n,
        "parameters": p,
        "model": parameters_fingerprint(obj.space.module),
        "versions": {"jaccli": importlib.metadata.version("jaccli"), "torch": torch.__version__},
    }
    sink = st.FileSink(spec, (n, p), fingerprint={**facts, **dict(spec.fingerprint or {})}, progress=progress)
    try:
        sink.open((n, p), obj.space.dtype, obj.space.device, zero=False, ppc=obj.chunk)
        for a, b in sink.chunks(n):
            sink.rows(a, b)[:] = obj.per_sample_grads(a, b).detach()
            sink.commit(a, b)
        sink.flush()
        sink.gather()
        rows = sink.finalise()
    except BaseException as exc:
        sink.abort(exc)
        raise
    return rows, spec.resumed_points
