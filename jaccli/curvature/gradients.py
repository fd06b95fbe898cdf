"""The public function :func:`grads`: the gradient of the reduced loss and per-sample gradients.

Per-sample gradients are computed chunk by chunk (linear layers' parameters as δxᵀ by
:mod:`.linear`, the rest by ``vmap(grad)``); in memory, the loss, the gradient and the rows'
norms come from the same batched backward (or, without linear layers, the norms from the rows
and the loss and gradient from one backward per chunk). Saved to ``.npy`` or ``.safetensors``
they stream into a :class:`jaccli.Stream` file through :class:`jaccli.io.stream.FileSink`
(resume, torchrun ranks); the gradient of the reduced loss and the summary of per-sample norms
are then read back from the rows themselves (a file-backed tensor, in chunks), so an
interrupted and resumed run reports the whole data set.

Imports: torch, :mod:`.linear`, :mod:`.objective`, :mod:`.params`, :mod:`.runtime`, :mod:`jaccli.io`, :mod:`jaccli.engine.memory`
(memory), :mod:`jaccli.errors`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from jaccli.curvature.linear import NotLinear
from jaccli.curvature.objective import Objective, build_objective
from jaccli.curvature.runtime import all_reduce, dist_info
from jaccli.curvature.params import ParamInfo
from jaccli.engine.memory import memory_available
from jaccli.errors import format_bytes, NumericalError, ResourceError, ResumeError, UsageError

#: the JSON schema of ``jaccli grads --json``
SCHEMA = "jaccli.grads/1"


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
    #: how the per-sample rows were computed: ``linear`` (δxᵀ of linear layers), ``linear+vmap``, ``vmap`` or ``jacrev``
    path: str | None = None

    def as_dict(self) -> dict:
        doc = {
            "schema": SCHEMA,
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
            doc["per_sample_path"] = self.path
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
    obj = build_objective(model, inputs, target, loss=loss, reduction=reduction, params=params,
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
        resumed = 0
        rows = None if n <= obj.chunk else torch.empty(n, p, dtype=space.dtype, device=space.device)
        norms = torch.empty(n, dtype=torch.float64, device=space.device)
        # linear layers' rows come with their norms, the chunk's loss and its gradient (one backward)
        fast = obj.linear_rows()
        total = torch.zeros(p + 1, dtype=space.dtype, device=space.device)
        for a in range(0, n, obj.chunk):
            b = min(a + obj.chunk, n)
            into = None if rows is None else rows[a:b]
            piece = None
            if fast is not None:
                try:
                    piece = fast.chunk(a, b, into)
                except NotLinear:
                    fast, obj._linear = None, False
            if piece is not None:
                block = piece.rows
                norms[a:b] = piece.sq_norms.sqrt()
                total[0] += piece.loss
                total[1:] += piece.gradient
            else:  # several chunks: each written straight into its rows (no copy of a chunk's block)
                block = obj.per_sample_grads(a, b, out=into)
                # the norms as the rows come, in the rows' dtype (a float64 reduction of float32
                # rows is several times slower than computing them)
                norms[a:b] = torch.linalg.vector_norm(block, dim=1)
            rows = block if rows is None else rows  # one chunk: its rows are the result
            if progress is not None:
                progress(b, n)
        if fast is not None:
            value, gradient = _finite(float(total[0]), obj), total[1:]
        else:
            # the loss and the gradient by one batched backward per chunk: cheaper than another
            # pass over the [N, P] rows (their sum), which memory bandwidth bounds
            value, gradient = obj.value_and_grad()
        if spec is not None:
            save_tensors(spec.path, {spec.name if spec.name != "result" else "grads": rows.cpu()},
                         metadata=spec.metadata, force=spec.force)  # fmt: skip
    if streams:  # the gradient and the norms from the file (rows an interrupted run wrote too), in chunks
        total = torch.zeros(p, dtype=torch.float64)
        norms = torch.empty(n, dtype=torch.float64)
        for a in range(0, n, max(obj.chunk, 1)):
            block = rows[a : a + obj.chunk]
            total += block.sum(0).cpu()
            norms[a : a + block.shape[0]] = torch.linalg.vector_norm(block, dim=1).cpu()
        gradient = (total * obj.weight).to(device=space.device, dtype=space.dtype)
    result = GradsResult(loss, obj.reduction, n, value, gradient, list(space.infos), per_sample=rows,
                         norms=_norm_summary(norms.cpu()), resumed_samples=resumed, path=obj.per_sample_path)  # fmt: skip
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
