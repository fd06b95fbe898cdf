"""The engine's public functions: :func:`plan`, :func:`jacobian`, :func:`hessian`,
:func:`laplacian`, :func:`divergence` and :func:`describe`.

Each one normalises its request (:mod:`.problem`), computes it (:mod:`.execute`),
checks and reshapes the result (:mod:`.results`). They are exported by
:mod:`jaccli` and called as they are by the CLI.

Imports: everything else in the engine; nothing imports this module but the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ..errors import ModelError, UsageError
from ..models import count_parameters, describe_expected_input, info_of, model_dtype
from .execute import compute
from .planner import Plan, prepare
from .problem import arg_names, check_batch_independence, check_inputs, normalise_args, probe_rows
from .results import NONSMOOTH_OPS, finish, lead_axes, unflatten_in


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
    return prepare(kind, f, x, dict(
        wrt=wrt, per_sample=per_sample, mode=mode, chunk_size=chunk_size, output=output,
        estimator=estimator, probes=probes, check_batch=check_batch, strict=strict,
    ))  # fmt: skip


def jacobian(
    f: Callable,
    x,
    *,
    wrt=None,
    per_sample: bool = False,
    mode: str = "auto",
    chunk_size: int | None = None,
    output=None,
    check_batch: bool = True,
    strict: bool = False,
    plan: Plan | None = None,
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

    >>> import torch, jaccli
    >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> jaccli.jacobian(lambda v: A @ v, torch.zeros(2))
    tensor([[1., 2.],
            [3., 4.],
            [5., 6.]])
    >>> x = torch.linspace(0, 1, 4)[:, None]
    >>> jaccli.jacobian(torch.sin, x, per_sample=True).squeeze(-1).squeeze(-1) - torch.cos(x[:, 0])
    tensor([0., 0., 0., 0.])
    """
    p, plan_, flat = compute("jacobian", f, x, wrt=wrt, per_sample=per_sample, mode=mode,
                          chunk_size=chunk_size, output=output, check_batch=check_batch,
                          strict=strict, plan=plan)  # fmt: skip
    value = flat if p.per_sample else flat[0]
    finish("jacobian", p, value, strict)
    return unflatten_in(p, value, lead_axes(p), 1)


def hessian(
    f: Callable,
    x,
    *,
    wrt=None,
    per_sample: bool = False,
    mode: str = "auto",
    chunk_size: int | None = None,
    output=None,
    check_batch: bool = True,
    strict: bool = False,
    plan: Plan | None = None,
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
    p, plan_, flat = compute("hessian", f, x, wrt=wrt, per_sample=per_sample, mode=mode,
                          chunk_size=chunk_size, output=output, check_batch=check_batch,
                          strict=strict, plan=plan)  # fmt: skip
    value = flat if p.per_sample else flat[0]
    finish("hessian", p, value, strict)
    return unflatten_in(p, value, lead_axes(p), 2)


def laplacian(
    f: Callable,
    x,
    *,
    wrt=None,
    per_sample: bool = False,
    mode: str = "auto",
    chunk_size: int | None = None,
    output=None,
    check_batch: bool = True,
    strict: bool = False,
    plan: Plan | None = None,
):
    """Trace of the Hessian of every output component: ``[*, *out]``.

    With several ``wrt`` inputs the trace runs over all of them together.

    >>> import torch, jaccli
    >>> jaccli.laplacian(lambda v: (v**2).sum(), torch.ones(3))   # Δ|v|² = 2·3
    tensor(6.)
    """
    p, plan_, flat = compute("laplacian", f, x, wrt=wrt, per_sample=per_sample, mode=mode,
                          chunk_size=chunk_size, output=output, check_batch=check_batch,
                          strict=strict, plan=plan)  # fmt: skip
    value = flat.reshape((*lead_axes(p), *p.out_shape))
    finish("laplacian", p, value, strict)
    return value


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
    estimator: str = "exact",
    probes: int = 16,
    seed: int = 0,
    check_batch: bool = True,
    strict: bool = False,
    plan: Plan | None = None,
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
    p, plan_, flat = compute("divergence", f, x, wrt=wrt, per_sample=per_sample, mode=mode,
                          chunk_size=chunk_size, output=output, check_batch=check_batch,
                          strict=strict, estimator=estimator, probes=probes,
                          seed=seed, plan=plan)  # fmt: skip
    if estimator == "exact":
        value = flat if p.per_sample else flat[0]
        finish("divergence", p, value, strict)
        return value
    k = int(probes)
    mean = flat[:, 0] / k
    var = ((flat[:, 1] - k * mean * mean) / (k - 1)).clamp_min(0)
    stderr = (var / k).sqrt()
    mean, stderr = mean.to(p.dtype), stderr.to(p.dtype)
    if not p.per_sample:
        mean, stderr = mean[0], stderr[0]
    finish("divergence", p, mean, strict)
    return DivergenceEstimate(mean, stderr, k)


def describe(f: Callable, x=None, *, per_sample: bool = True, output=None) -> dict:
    """What a model is, and with ``x`` what it does: the facts ``jaccli info`` shows.

    Keys: ``format``, ``parameters``, ``dtype``, ``arguments``, ``expected_input``,
    ``static_batch``, ``notes``; with ``x`` also ``input_shapes``, ``output_shape``
    (per point with ``per_sample``), ``ops`` (ATen ops the forward pass ran),
    ``smooth`` and ``nonsmooth_ops`` (ops with zero or undefined second derivatives),
    and ``batch_independent`` (``per_sample`` only; a reason string when it is not).

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
    p = check_inputs(f, x, wrt=floating[0], per_sample=per_sample, output=output, check_batch=False)
    kinks = sorted(p.ops & NONSMOOTH_OPS)
    facts.update(
        input_shapes={l: list(v.shape) for l, v in zip(p.labels, args.values)},
        output_shape=list(p.out_shape),
        per_sample=per_sample,
        ops=sorted(p.ops),
        smooth=not kinks,
        nonsmooth_ops=kinks,
    )
    if per_sample:
        try:
            check_batch_independence(p, probe_rows(p))
            facts["batch_independent"] = True
        except ModelError as exc:
            facts["batch_independent"] = exc.what
    return facts

