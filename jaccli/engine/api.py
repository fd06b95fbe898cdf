"""The engine's public functions: :func:`plan`, :func:`jacobian`, :func:`hessian`,
:func:`laplacian`, :func:`divergence` and :func:`describe`.

Each one normalises its request (:mod:`.problem`), computes it (:mod:`.execute`),
checks and reshapes the result (:mod:`.results`). They are exported by
:mod:`jaccli` and called as they are by the CLI.

Imports: everything else in the engine; nothing imports this module but the package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import torch

from jaccli.errors import ModelError, ResumeError, UsageError
from jaccli.request.kinds import kind as kind_of
from jaccli.request.choices import compile_choice
from jaccli.request.spec import Derivative, Selection
from jaccli.load.models import count_parameters, describe_expected_input, info_of, model_dtype
from jaccli.engine.execute import MemorySink, compute
from jaccli.engine.choice import prepare
from jaccli.engine.planner import Plan
from jaccli.engine.probe import check_batch_independence, probe_rows
from jaccli.engine.problem import arg_names, check_inputs, normalise_args
from jaccli.engine.results import NONSMOOTH_OPS, finish, lead_axes, unflatten_in


def _run(d: Derivative, f, x, *, plan, save, progress):
    """Compute the request ``d`` into memory, or stream a per-sample result into ``save``
    chunk by chunk: the one path of :func:`jacobian`, :func:`hessian`, :func:`laplacian`
    and :func:`divergence`.

    Returns ``(problem, flat result or None, streamed tensor or None)``. A streamed request
    returns the finished file as a tensor backed by it; anything else is computed in
    memory (and, with ``save``, written by :func:`jaccli.io.save_tensors` afterwards).
    """
    from jaccli.io import stream as st

    kind = d.kind.name
    if save is None:
        p, _plan, flat = compute(d, f, x, plan=plan, sink=MemorySink(progress))
        return p, flat, None
    spec = save if isinstance(save, st.Stream) else st.Stream(save, name=kind)
    opened: list = []

    def make_sink(p, plan_):
        streams = p.per_sample and p.single and plan_.estimator != "hutchinson"
        if not (streams and st.can_stream(spec.path)):
            if spec.resume:
                why = "a multi-tensor result" if streams or not p.per_sample else "this format"
                raise ResumeError(
                    "cannot resume: only per-sample results of one tensor saved to .npy or "
                    ".safetensors stream to disk",
                    where=os.fspath(spec.path),
                    got=why if p.per_sample else "a whole-input result",
                    hint="rerun without resume",
                    cli_hint="rerun without --resume",
                )
            return MemorySink(progress)
        sink = st.FileSink(spec, plan_.result_shape, fingerprint=fingerprint(d, p, plan_, spec), progress=progress)
        opened.append(sink)
        return sink

    try:
        p, _plan, flat = compute(d, f, x, plan=plan, sink=make_sink)
        if not opened:
            return p, flat, None
        sink = opened[0]
        facts = sink.gather()
        finish(kind, p, None, d.strict, facts=facts)
        value = sink.finalise()
    except BaseException as exc:
        if opened:
            opened[0].abort(exc)
        raise
    return p, None, value


def _saved(d: Derivative, p, value, save):
    """``value`` after writing it to ``save`` (a result that did not stream), by name:
    ``kind``, ``kind_ARG`` for several arguments, ``stderr`` of a Hutchinson estimate."""
    if save is None:
        return value
    from jaccli.io import save_tensors
    from jaccli.io.stream import Stream

    kind = d.kind.name
    spec = save if isinstance(save, Stream) else Stream(save, name=kind)
    if isinstance(value, DivergenceEstimate):
        tensors = {kind: value.value, "stderr": value.stderr}
    elif isinstance(value, torch.Tensor):
        tensors = {spec.name: value}
    else:
        names = d.kind.result_names([p.labels[i] for i in p.wrt])
        parts = [part for row in value for part in (row if isinstance(row, (tuple, list)) else (row,))]
        tensors = {name: part for (name, _), part in zip(names, parts)}
    save_tensors(spec.path, tensors, metadata=spec.metadata, force=spec.force)
    return value


def fingerprint(d: Derivative, p, plan_, spec) -> dict:
    """The engine's facts of a streamed request — its options and the plan's chunking —
    with what the caller knows of its files (``Stream.fingerprint``), made into the one
    fingerprint of a streamed result by :func:`jaccli.io.records.fingerprint` (which adds
    digests of the parameters and input tensors where the caller named no files)."""
    from jaccli.io.records import fingerprint as whole

    facts = {
        "request": d.fingerprint(),
        "engine": plan_.engine,
        "mode": plan_.mode,
        "directions_per_pass": plan_.directions_per_pass,
        "points": plan_.points,
        **dict(spec.fingerprint or {}),
    }
    return whole(facts, module=p.module, tensors=dict(zip(p.labels, p.args.values)))


def plan(
    kind: str,
    f: Callable,
    x,
    *,
    wrt=None,
    per_sample: bool = False,
    mode: str = "auto",
    chunk_size: int | None = None,
    output=None,
    select=None,
    estimator: str = "exact",
    probes: int = 16,
    check_batch: bool = True,
    strict: bool = False,
) -> Plan:
    """What :func:`jacobian` (or ``kind``) would do, without computing it.

    The model runs once on a few points (to learn output shapes and memory use);
    where the Taylor fast path applies it is also traced and checked on a few
    points. No derivative of the input is computed.

    Pass the plan on (``jaccli.jacobian(f, x, plan=p)``) to compute it without probing
    and tracing the model again; it must be for the same ``f`` and tensors ``x``.

    >>> import torch, jaccli
    >>> p = jaccli.plan("jacobian", torch.nn.Linear(1, 501), torch.zeros(1000, 1), per_sample=True)
    >>> p.mode, p.result_shape
    ('forward', (1000, 501, 1))
    """
    d = _request(kind, wrt=wrt, per_sample=per_sample, mode=mode, chunk_size=chunk_size, output=output,
                 select=select, check_batch=check_batch, strict=strict, estimator=estimator, probes=probes)  # fmt: skip
    return prepare(d, f, x)


def _request(name: str, *, wrt, per_sample, mode, chunk_size, output, select, check_batch, strict,
             estimator="exact", probes=16, seed=0, compile="auto") -> Derivative:  # fmt: skip
    """The typed request of a Python call (the CLI builds the same record from its options)."""
    return Derivative(
        kind_of(name), per_sample=per_sample, wrt=wrt, output=output, select=Selection.parse(select), mode=mode,
        chunk_size=chunk_size, check_batch=check_batch, strict=strict, estimator=estimator, probes=probes, seed=seed,
        compile=compile_choice(compile),
    )  # fmt: skip


def jacobian(
    f: Callable,
    x,
    *,
    wrt=None,
    per_sample: bool = False,
    mode: str = "auto",
    chunk_size: int | None = None,
    output=None,
    select=None,
    check_batch: bool = True,
    strict: bool = False,
    plan: Plan | None = None,
    save=None,
    compile: str | bool = "auto",
    progress: Callable[[int, int], None] | None = None,
):
    """Jacobian of ``f`` at ``x``.

    Without ``per_sample`` the whole of ``x`` is one point and the result has shape
    ``out.shape + x.shape`` (as :func:`torch.autograd.functional.jacobian`). With
    ``per_sample=True`` axis 0 of ``x`` holds independent points, ``f`` is called on
    batches of them as it was written, and the result is ``[N, *out_i, *in_i]``.

    ``x`` may be a tuple or dict of tensors for models with several inputs; ``wrt``
    then names (or indexes) the input(s) to differentiate, and a sequence ``wrt``
    gives a tuple of Jacobians. ``mode`` is ``"forward"``, ``"reverse"`` or ``"auto"``
    (forward when there are no more inputs than outputs per point). ``chunk_size``
    is the number of points per pass with ``per_sample``, the number of directions
    per pass otherwise; by default it is chosen to keep memory bounded.

    ``select`` differentiates only part of each point's output: an index as of one
    point's output (``2``, ``(slice(None), 3)``, or the text ``":, 3"``), or ``"argmax"``
    (``"argmin"``) for each point's largest (smallest) element, such as the predicted
    class. The other elements' derivatives are never computed (same keyword on every
    derivative function).

    ``save`` (a path or a :class:`jaccli.Stream`) writes the result to a file. A per-sample
    result of one tensor saved to ``.npy`` or ``.safetensors`` *streams*: each chunk goes to
    its rows of the file as soon as it is computed, memory stays bounded whatever N, and
    the return value is a tensor backed by the finished file; ``Stream(path, resume=True)``
    continues an interrupted run. Under ``torch.distributed`` (``torchrun``) the ranks
    share the chunks of a streamed result and write into the same file. Other results are
    computed in memory and then saved. ``progress(done, total)`` is called with the points
    done after each chunk (the same two arguments apply to every derivative function).

    ``compile`` (every derivative function): whether the Taylor fast path runs the chain rule
    of elementwise ops (tanh, sigmoid, exp, …) as fused kernels compiled by ``torch.compile``
    (cached on disk): ``"auto"`` once the time this program has already cost in this process
    pays for the compile (repeated calls, long runs), ``"on"`` (True) at once, ``"off"`` (False)
    never. A compile that fails runs eager. See docs/performance.md, "Fused Taylor kernels".

    >>> import torch, jaccli
    >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> jaccli.jacobian(lambda v: A @ v, torch.zeros(2))
    tensor([[1., 2.],
            [3., 4.],
            [5., 6.]])
    >>> x = torch.linspace(0, 1, 4)[:, None]
    >>> jaccli.jacobian(torch.sin, x, per_sample=True).squeeze(-1).squeeze(-1) - torch.cos(x[:, 0])
    tensor([0., 0., 0., 0.])
    >>> jaccli.jacobian(lambda v: A @ v, torch.zeros(2), select=1)
    tensor([3., 4.])
    """
    d = _request("jacobian", wrt=wrt, per_sample=per_sample, mode=mode, chunk_size=chunk_size, output=output,
                 select=select, check_batch=check_batch, strict=strict, compile=compile)  # fmt: skip
    p, flat, streamed = _run(d, f, x, plan=plan, save=save, progress=progress)
    if streamed is not None:
        return streamed
    value = flat if p.per_sample else flat[0]
    finish("jacobian", p, value, strict)
    return _saved(d, p, unflatten_in(p, value, lead_axes(p), 1), save)


def hessian(
    f: Callable,
    x,
    *,
    wrt=None,
    per_sample: bool = False,
    mode: str = "auto",
    chunk_size: int | None = None,
    output=None,
    select=None,
    check_batch: bool = True,
    strict: bool = False,
    plan: Plan | None = None,
    save=None,
    compile: str | bool = "auto",
    progress: Callable[[int, int], None] | None = None,
):
    """Second derivatives of ``f`` at ``x``: one Hessian per output component.

    A scalar output per point gives ``[*, *in, *in]``; an output of shape ``out``
    gives ``[*, *out, *in, *in]`` (``*`` is ``N`` with ``per_sample``, nothing
    otherwise). ``mode="forward"`` is forward-over-forward (cheap for few inputs),
    ``"reverse"`` is forward-over-reverse (cheap for few outputs); ``"auto"`` picks
    the one with fewer products. With several ``wrt`` inputs the result is the
    nested tuple of blocks ``H[a][b]``. A warning says when the model is piecewise
    linear (ReLU), whose second derivatives vanish almost everywhere.

    >>> import torch, jaccli
    >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    >>> jaccli.hessian(lambda v: v @ A @ v, torch.ones(2))   # A + Aᵀ
    tensor([[4., 1.],
            [1., 6.]])
    """
    d = _request("hessian", wrt=wrt, per_sample=per_sample, mode=mode, chunk_size=chunk_size, output=output,
                 select=select, check_batch=check_batch, strict=strict, compile=compile)  # fmt: skip
    p, flat, streamed = _run(d, f, x, plan=plan, save=save, progress=progress)
    if streamed is not None:
        return streamed
    value = flat if p.per_sample else flat[0]
    finish("hessian", p, value, strict)
    return _saved(d, p, unflatten_in(p, value, lead_axes(p), 2), save)


def laplacian(
    f: Callable,
    x,
    *,
    wrt=None,
    per_sample: bool = False,
    mode: str = "auto",
    chunk_size: int | None = None,
    output=None,
    select=None,
    check_batch: bool = True,
    strict: bool = False,
    plan: Plan | None = None,
    save=None,
    compile: str | bool = "auto",
    progress: Callable[[int, int], None] | None = None,
):
    """Trace of the Hessian of every output component: ``[*, *out]``.

    With several ``wrt`` inputs the trace runs over all of them together.

    >>> import torch, jaccli
    >>> jaccli.laplacian(lambda v: (v**2).sum(), torch.ones(3))   # Δ|v|² = 2·3
    tensor(6.)
    """
    d = _request("laplacian", wrt=wrt, per_sample=per_sample, mode=mode, chunk_size=chunk_size, output=output,
                 select=select, check_batch=check_batch, strict=strict, compile=compile)  # fmt: skip
    p, flat, streamed = _run(d, f, x, plan=plan, save=save, progress=progress)
    if streamed is not None:
        return streamed
    value = flat.reshape((*lead_axes(p), *p.out_shape))
    finish("laplacian", p, value, strict)
    return _saved(d, p, value, save)


class DivergenceEstimate(NamedTuple):
    """A Hutchinson estimate of the divergence with its standard error."""

    value: torch.Tensor
    stderr: torch.Tensor
    probes: int


def divergence(
    f: Callable,
    x,
    *,
    wrt=None,
    per_sample: bool = False,
    mode: str = "auto",
    chunk_size: int | None = None,
    output=None,
    select=None,
    estimator: str = "exact",
    probes: int = 16,
    seed: int = 0,
    check_batch: bool = True,
    strict: bool = False,
    plan: Plan | None = None,
    save=None,
    compile: str | bool = "auto",
    progress: Callable[[int, int], None] | None = None,
):
    """Divergence (trace of the Jacobian) of a map whose output shape equals its input's.

    ``estimator="exact"`` (default) costs one Jacobian-vector product per input
    dimension and returns a tensor ``[N]`` (``per_sample``) or a scalar.
    ``estimator="hutchinson"`` averages ``vᵀJv`` over ``probes`` Rademacher vectors
    (deterministic given ``seed``) and returns a :class:`DivergenceEstimate` with the
    estimate and its standard error (sample standard deviation / √probes).

    >>> import torch, jaccli
    >>> jaccli.divergence(lambda v: v * torch.tensor([1.0, 2.0, 3.0]), torch.ones(3))
    tensor(6.)
    >>> est = jaccli.divergence(lambda v: 2 * v, torch.ones(50), estimator="hutchinson", probes=8)
    >>> round(float(est.value), 4), float(est.stderr)
    (100.0, 0.0)
    """
    d = _request("divergence", wrt=wrt, per_sample=per_sample, mode=mode, chunk_size=chunk_size, output=output,
                 select=select, check_batch=check_batch, strict=strict, estimator=estimator, probes=probes,
                 seed=seed, compile=compile)  # fmt: skip
    p, flat, streamed = _run(d, f, x, plan=plan, save=save, progress=progress)
    if streamed is not None:
        return streamed
    if estimator == "exact":
        value = flat if p.per_sample else flat[0]
        finish("divergence", p, value, strict)
        return _saved(d, p, value, save)
    k = int(probes)
    mean = flat[:, 0] / k
    var = ((flat[:, 1] - k * mean * mean) / (k - 1)).clamp_min(0)
    stderr = (var / k).sqrt()
    mean, stderr = mean.to(p.dtype), stderr.to(p.dtype)
    if not p.per_sample:
        mean, stderr = mean[0], stderr[0]
    finish("divergence", p, mean, strict)
    return _saved(d, p, DivergenceEstimate(mean, stderr, k), save)


def describe(f: Callable, x=None, *, per_sample: bool = True, output=None, select=None) -> dict:
    """What a model is, and with ``x`` what it does: the facts ``jaccli info`` shows.

    Keys: ``format``, ``parameters``, ``dtype``, ``arguments``, ``expected_input``,
    ``static_batch``, ``notes``; with ``x`` also ``input_shapes``, ``output_shape``
    (per point with ``per_sample``), ``ops`` (ATen ops the forward pass ran),
    ``smooth`` and ``nonsmooth_ops`` (ops with zero or undefined second derivatives),
    ``differentiable`` (True, or why no derivative with respect to the first floating-point
    input reaches the output) and ``batch_independent`` (``per_sample`` only; a reason
    string when it is not, None when it cannot be told since no derivative gets through).

    >>> import torch, jaccli
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    >>> facts = jaccli.describe(net, torch.zeros(5, 2))
    >>> facts["output_shape"], facts["smooth"], facts["nonsmooth_ops"]
    ([3], False, ['relu'])
    """
    info = info_of(f)
    dtype = model_dtype(f)
    facts: dict = {
        "format": info.format,
        "parameters": count_parameters(f),
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "arguments": list(arg_names(f)),
        "expected_input": describe_expected_input(f),
        "static_batch": info.static_batch,
        "notes": list(info.notes),
    }
    if x is None:
        return facts
    args = normalise_args(x, arg_names(f))
    floating = [i for i, v in enumerate(args.values) if v.is_floating_point()]
    if not floating:
        raise UsageError("no floating-point input to describe", got=", ".join(str(v.dtype) for v in args.values))
    p = check_inputs(f, x, wrt=floating[0], per_sample=per_sample, output=output, check_batch=False,
                     refuse_blocked=False, select=select)  # fmt: skip
    kinks = sorted(p.ops & NONSMOOTH_OPS)
    facts.update(
        input_shapes={l: list(v.shape) for l, v in zip(p.labels, args.values)},
        output_shape=list(p.out_shape),
        per_sample=per_sample,
        ops=sorted(p.ops),
        smooth=not kinks,
        nonsmooth_ops=kinks,
        differentiable=True if p.blocked is None else f"{p.blocked.what}; {p.blocked.hint}",
    )
    if per_sample and p.blocked is not None:
        facts["batch_independent"] = None  # the check follows gradients, which do not get through
    elif per_sample:
        try:
            check_batch_independence(p, probe_rows(p))
            facts["batch_independent"] = True
        except ModelError as exc:
            facts["batch_independent"] = exc.what
    return facts

