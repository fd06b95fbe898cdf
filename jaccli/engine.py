"""The derivative engine: Jacobians, Hessians, divergences and Laplacians of a callable.

Everything here is a function of a callable and tensors; nothing imports the CLI.

Internally every request becomes one *flat batch function* ``g: [B, n_in] -> [B, n_out]``
(:class:`Problem`): the points are rows, the differentiated arguments are flattened
and concatenated into columns. With ``per_sample=True`` axis 0 of the input holds
independent points and the model is called on batches of them exactly as it was
saved; the per-point derivatives come from products with one-hot directions that are
the same for every row, which never forms the cross-point blocks of the full Jacobian.
Without it the whole input is one point (``B = 1``).

Each derivative is a sum of *products* (Jacobian-vector, vector-Jacobian and their
second-order compositions, from :mod:`torch.func`) over *directions*; a
:class:`Strategy` row says which products a (kind, mode) pair uses and where their
values go. The planner picks the mode and how many points and directions are done at
once so that memory stays inside a budget. Forward-mode requests on one per-sample
input take the Taylor fast path of :mod:`jaccli.taylor` instead (see "Taylor fast
path" below); the plan's ``engine`` says which ran.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.func import jvp, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from . import taylor
from .errors import (
    JaccliError,
    JaccliWarning,
    ModelError,
    NumericalError,
    ResourceError,
    UsageError,
    shape_str,
)
from .models import count_parameters, describe_expected_input, first_line, info_of, model_dtype

KINDS = ("jacobian", "hessian", "divergence", "laplacian")
MODES = ("auto", "forward", "reverse")
ESTIMATORS = ("exact", "hutchinson")

#: ops whose second derivative is zero almost everywhere (or undefined at a kink)
NONSMOOTH_OPS = frozenset(
    {
        "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "_prelu_kernel",
        "rrelu", "rrelu_with_noise", "hardtanh", "hardtanh_", "threshold", "abs", "sign",
        "clamp", "clamp_", "clamp_min", "clamp_max", "maximum", "minimum", "max", "min",
        "floor", "ceil", "round", "trunc", "hardsigmoid", "hardswish", "hardshrink",
        "softshrink", "max_pool1d", "max_pool2d", "max_pool3d",
        "max_pool2d_with_indices", "max_pool3d_with_indices", "heaviside",
    }
)  # fmt: skip

#: working-memory multiple of one forward pass, per point and direction (empirical)
_MEMORY_FACTOR = {
    ("jacobian", "forward"): 2.0,
    ("jacobian", "reverse"): 3.0,
    ("divergence", "forward"): 2.0,
    ("divergence", "reverse"): 3.0,
    ("hessian", "forward"): 4.0,
    ("hessian", "reverse"): 6.0,
    ("laplacian", "forward"): 4.0,
    ("laplacian", "reverse"): 6.0,
    ("hessian", "reverse-only"): 8.0,
    ("laplacian", "reverse-only"): 8.0,
}

#: where a strategy goes when an op of the model has no forward-mode derivative
_FALLBACK = {
    ("jacobian", "forward"): "reverse",
    ("divergence", "forward"): "reverse",
    ("hutchinson", "forward"): "reverse",
    ("hessian", "forward"): "reverse-only",
    ("hessian", "reverse"): "reverse-only",
    ("laplacian", "forward"): "reverse-only",
    ("laplacian", "reverse"): "reverse-only",
}
_PROBE_POINTS = 8
_MIB = 2**20


def _preload_jvp_decompositions() -> None:
    # torch scripts its forward-AD decompositions with torch.jit.script on the first
    # forward-mode product, which warns that TorchScript is deprecated: an internal
    # warning users cannot act on. Load them once, quietly, before any product runs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
        if load is not None:
            load()


_preload_jvp_decompositions()


# --------------------------------------------------------------------------- normalisation


class _Args(NamedTuple):
    keys: tuple[int | str, ...]  # position or keyword of each model argument
    values: tuple[torch.Tensor, ...]


def _normalise_args(x, names: Sequence[str] = ()) -> _Args:
    if isinstance(x, torch.Tensor):
        return _Args((0,), (x,))
    if isinstance(x, Mapping):
        keys = [str(k) for k in x]
        if keys and set(keys) == set(names[: len(keys)]):
            # positional in the model's order: exported programs accept only the call
            # form they were traced with, and that is positional for most
            return _Args(tuple(range(len(keys))), tuple(x[n] for n in names[: len(keys)]))
        return _Args(tuple(keys), tuple(x.values()))
    if isinstance(x, Sequence) and x and not isinstance(x, (str, bytes)):
        return _Args(tuple(range(len(x))), tuple(x))
    raise UsageError(
        "unsupported input", expected="a tensor, a sequence or a mapping of tensors", got=type(x).__name__
    )


def _arg_label(key: int | str, names: Sequence[str]) -> str:
    if isinstance(key, str):
        return key
    return names[key] if key < len(names) else f"arg{key}"


def _normalise_wrt(wrt, args: _Args, names: Sequence[str]) -> tuple[tuple[int, ...], bool]:
    """Indices of the differentiated arguments, and whether one tensor (not a tuple) is returned."""
    labels = [_arg_label(k, names) for k in args.keys]
    if wrt is None:
        if len(args.values) == 1:
            return (0,), True
        raise UsageError(
            f"the model takes {len(labels)} inputs; say which to differentiate",
            expected="wrt= (--wrt) naming one or more of " + ", ".join(labels),
        )
    single = isinstance(wrt, (int, str))
    wanted = [wrt] if single else list(wrt)
    out = []
    for w in wanted:
        if isinstance(w, int) and 0 <= w < len(labels):
            out.append(w)
        elif isinstance(w, str) and w in labels:
            out.append(labels.index(w))
        else:
            raise UsageError(
                "unknown input to differentiate", expected="one of " + ", ".join(labels), got=str(w)
            )
    if len(set(out)) != len(out) or not out:
        raise UsageError("wrt must name distinct inputs", got=", ".join(map(str, wanted)))
    return tuple(out), single


def select_output(y, output, where: str):
    """One tensor from a model's return value (a tensor, a sequence or a mapping)."""
    if isinstance(y, torch.Tensor):
        if output not in (None, 0):
            raise ModelError("the model returns a single tensor", where=where, got=f"--output {output}")
        return y
    if isinstance(y, Mapping):
        names = [str(k) for k in y]
        if output is None and len(y) == 1:
            output = names[0]
        if output is None or str(output) not in names:
            raise ModelError(
                f"the model returns {len(y)} outputs; choose one",
                where=where,
                expected="--output with one of " + ", ".join(names),
                got=None if output is None else str(output),
            )
        y = y[str(output)] if str(output) in y else dict(zip(names, y.values()))[str(output)]
    elif isinstance(y, (tuple, list)):
        fields = getattr(y, "_fields", None)
        if output is None and len(y) == 1:
            output = 0
        if isinstance(output, str) and output.isdigit():
            output = int(output)
        if isinstance(output, str) and fields and output in fields:
            output = fields.index(output)
        if not isinstance(output, int) or not 0 <= output < len(y):
            choices = ", ".join(fields) if fields else f"0..{len(y) - 1}"
            raise ModelError(
                f"the model returns {len(y)} outputs; choose one",
                where=where,
                expected=f"--output with one of {choices}",
                got=None if output is None else str(output),
            )
        y = y[output]
    else:
        raise ModelError("the model returns no tensor", where=where, got=type(y).__name__)
    if not isinstance(y, torch.Tensor):
        raise ModelError("the selected output is not a tensor", where=where, got=type(y).__name__)
    return y


def _unoptimised(f: Callable) -> Callable:
    """TorchScript run outside its optimising executor (see :class:`~jaccli.models.LoadedModel`)."""

    def call(*args, **kwargs):
        with torch.jit.optimized_execution(False):
            return f(*args, **kwargs)

    return call


def _arg_names(f: Callable) -> tuple[str, ...]:
    info_names = info_of(f).arg_names
    if info_names:
        return info_names
    target = f.forward if isinstance(f, nn.Module) else f
    schema = getattr(target, "schema", None)
    if schema is not None:  # TorchScript
        return tuple(a.name for a in schema.arguments if a.name != "self")
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(
        p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def static_batch_of(f: Callable) -> int | None:
    """The only batch size ``f`` accepts, for models exported with a static batch dimension."""
    return info_of(f).static_batch


class _Recorder(TorchDispatchMode):
    """Counts the bytes each op produces and remembers which ops ran."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


@dataclass
class Problem:
    """A request normalised once: the flat batch function and everything the planner needs."""

    f: Callable  # what is called (TorchScript wrapped, see _unoptimised)
    module: Callable  # what the user passed, for names and messages
    args: _Args
    wrt: tuple[int, ...]
    single: bool
    per_sample: bool
    output: int | str | None
    where: str
    labels: tuple[str, ...]
    n: int  # points
    in_shapes: tuple[tuple[int, ...], ...]  # per point, of each differentiated argument
    out_shape: tuple[int, ...]  # per point
    dtype: torch.dtype
    device: torch.device
    static_batch: int | None
    act_bytes: float = 0.0  # forward bytes per point
    ops: frozenset[str] = field(default_factory=frozenset)

    @property
    def n_in(self) -> int:
        return sum(math.prod(s) for s in self.in_shapes)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    def z(self, rows: torch.Tensor) -> torch.Tensor:
        """The differentiated arguments of ``rows`` as one ``[B, n_in]`` matrix."""
        parts = []
        for i in self.wrt:
            v = self.args.values[i]
            v = v.index_select(0, rows) if self.per_sample else v[None]
            parts.append(v.reshape(v.shape[0], -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def fn(self, rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The flat batch function ``g(z) -> [B, n_out]`` of ``rows`` (constants bound)."""
        consts = {
            i: (v.index_select(0, rows) if self.per_sample else v)
            for i, v in enumerate(self.args.values)
            if i not in self.wrt
        }
        sizes = [math.prod(s) for s in self.in_shapes]
        keys, f, per_sample = self.args.keys, self.f, self.per_sample

        def g(z: torch.Tensor) -> torch.Tensor:
            b = z.shape[0]
            pieces = z.split(sizes, dim=1) if len(sizes) > 1 else (z,)
            values = dict(consts)
            for i, piece, shape in zip(self.wrt, pieces, self.in_shapes):
                values[i] = piece.reshape((b, *shape) if per_sample else shape)
            pos = [values[i] for i, k in enumerate(keys) if isinstance(k, int)]
            kw = {k: values[i] for i, k in enumerate(keys) if isinstance(k, str)}
            y = select_output(f(*pos, **kw), self.output, self.where)
            return y.reshape(b, -1)

        return g


def _check_inputs(
    f: Callable,
    x,
    *,
    wrt=None,
    per_sample: bool,
    output=None,
    check_batch: bool = True,
    strict: bool = False,
) -> Problem:
    """Validate and normalise a request once; probe the model on a few points."""
    if not callable(f):
        raise UsageError("the model is not callable", got=type(f).__name__)
    module = f
    where = info_of(f).path
    if isinstance(f, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        f = _unoptimised(f)
    names = _arg_names(module)
    args = _normalise_args(x, names)
    labels = tuple(_arg_label(k, names) for k in args.keys)
    wrt_idx, single = _normalise_wrt(wrt, args, names)
    for label, v in zip(labels, args.values):
        if not isinstance(v, torch.Tensor):
            raise UsageError(f"input {label!r} is not a tensor", got=type(v).__name__)
    diff = [args.values[i] for i in wrt_idx]
    for i in wrt_idx:
        v = args.values[i]
        if not v.is_floating_point() or v.dtype not in (torch.float32, torch.float64):
            raise UsageError(
                f"input {labels[i]!r} must be float32 or float64 to differentiate",
                got=str(v.dtype).removeprefix("torch."),
                hint="cast it (jaccli.load_tensor casts integer data to float32)",
            )
    dtype, device = diff[0].dtype, diff[0].device
    if any(v.dtype != dtype for v in diff) or any(v.device != device for v in args.values):
        raise UsageError(
            "inputs differ in dtype or device",
            got=", ".join(f"{l}: {v.dtype}/{v.device}" for l, v in zip(labels, args.values)),
        )
    mdtype = model_dtype(module)
    if mdtype is not None and mdtype != dtype:
        raise UsageError(
            "the model's parameters and the input differ in dtype",
            where=where,
            expected=str(mdtype).removeprefix("torch."),
            got=str(dtype).removeprefix("torch."),
            hint="convert one of them (load_model(..., dtype=...) or --dtype)",
        )
    if per_sample:
        ns = {v.shape[0] if v.dim() else None for v in args.values}
        if len(ns) != 1 or None in ns:
            raise UsageError(
                "per_sample needs every input to share axis 0 (the points)",
                got=", ".join(f"{l}: {shape_str(v.shape)}" for l, v in zip(labels, args.values)),
            )
        (n,) = ns
        if n == 0:
            raise UsageError("the input holds no points", got=shape_str(args.values[0].shape))
        in_shapes = tuple(tuple(args.values[i].shape[1:]) for i in wrt_idx)
    else:
        n = 1
        in_shapes = tuple(tuple(args.values[i].shape) for i in wrt_idx)
    for label, v in zip(labels, args.values):
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            if strict:
                raise NumericalError(f"input {label!r} holds NaN or Inf values", where=where)
            warnings.warn(f"input {label!r} holds NaN or Inf values", JaccliWarning, stacklevel=3)
    problem = Problem(
        f=f,
        module=module,
        args=args,
        wrt=wrt_idx,
        single=single,
        per_sample=per_sample,
        output=output,
        where=where,
        labels=labels,
        n=n,
        in_shapes=in_shapes,
        out_shape=(),
        dtype=dtype,
        device=device,
        static_batch=static_batch_of(module) if per_sample else None,
    )
    _probe(problem, check_batch=check_batch and per_sample)
    return problem


def _probe_rows(problem: Problem) -> torch.Tensor:
    """Rows of a small probe batch; at least two points so batch mixing shows."""
    if not problem.per_sample:
        return torch.zeros(1, dtype=torch.long, device=problem.device)
    want = problem.static_batch or min(max(problem.n, 2), _PROBE_POINTS)
    return torch.arange(want, device=problem.device) % problem.n


def _call(problem: Problem, values: list[torch.Tensor]) -> torch.Tensor:
    """The model's selected output on argument ``values``, shaped as the model returns it."""
    keys = problem.args.keys
    pos = [v for k, v in zip(keys, values) if isinstance(k, int)]
    kw = {k: v for k, v in zip(keys, values) if isinstance(k, str)}
    return select_output(problem.f(*pos, **kw), problem.output, problem.where)


def _call_shapes(problem: Problem, rows: torch.Tensor) -> str:
    return ", ".join(
        shape_str(v.index_select(0, rows).shape if problem.per_sample else v.shape)
        for v in problem.args.values
    )


def _model_failed(problem: Problem, exc: BaseException, rows: torch.Tensor):
    raise ModelError(
        f"the model failed on input {_call_shapes(problem, rows)}: {first_line(exc)}",
        where=problem.where,
        expected=describe_expected_input(problem.module),
    ) from None


def _probe(problem: Problem, *, check_batch: bool) -> None:
    """Run the model once on a few points: output shape, memory per point, ops used."""
    rows = _probe_rows(problem)
    values = [v.index_select(0, rows) if problem.per_sample else v for v in problem.args.values]
    recorder = _Recorder()
    try:
        with torch.no_grad(), recorder:
            y = _call(problem, values)
    except ModelError:
        raise
    except Exception as exc:
        _model_failed(problem, exc, rows)
    if problem.per_sample and (y.dim() == 0 or y.shape[0] != rows.numel()):
        raise ModelError(
            "with per_sample, axis 0 of the output must match the points",
            where=problem.where,
            expected=f"{rows.numel()} rows for input {_call_shapes(problem, rows)}",
            got=f"output {shape_str(y.shape)}",
        )
    if not y.is_floating_point():
        raise ModelError("the model's output is not floating point", where=problem.where, got=str(y.dtype))
    problem.out_shape = tuple(y.shape[1:]) if problem.per_sample else tuple(y.shape)
    problem.act_bytes = recorder.bytes / rows.numel()
    problem.ops = frozenset(recorder.ops)
    if check_batch:
        _check_batch_independence(problem, rows)


def _check_batch_independence(problem: Problem, rows: torch.Tensor) -> None:
    """Refuse models whose output for one point depends on other points of the batch.

    Two tests on the probe batch: the gradient of point 0's output reaches no other
    point (catches batch norm in training mode, attention across the batch, …), and
    where the model accepts a batch of one, point 0 alone gives the same output
    (catches batch statistics computed without gradient).
    """
    g, z = problem.fn(rows), problem.z(rows)
    eps = torch.finfo(problem.dtype).eps
    hint = (
        "per-sample derivatives assume independent points; put the model in eval mode, "
        "or skip this check (check_batch=False, --no-batch-check) if the coupling is intended"
    )
    with torch.no_grad():
        try:
            y, pull = vjp(g, z)
        except RuntimeError as exc:
            if "mutate" not in str(exc):
                raise
            raise ModelError(
                "the model mixes batch elements or updates its own state as it runs "
                "(batch norm in training mode?)",
                where=problem.where,
                hint=hint,
            ) from None
        v = torch.zeros_like(y)
        v[0] = torch.linspace(1.0, 2.0, v.shape[1], dtype=v.dtype, device=v.device)
        grad = pull(v)[0]
        own = float(grad[0].abs().max())
        leak = float(grad[1:].abs().max())
        if leak > 1e3 * eps * max(own, 1.0):
            raise ModelError(
                "the model mixes batch elements: point 0's output depends on other points",
                where=problem.where,
                got=f"d out[0] / d in[1:] up to {leak:.3g}",
                hint=hint,
            )
        if problem.static_batch is None:
            alone = problem.fn(rows[:1])(z[:1])
            scale = max(float(y[0].abs().max()), 1.0)
            if float((alone[0] - y[0]).abs().max()) > 1e3 * eps * scale:
                raise ModelError(
                    "the model mixes batch elements: point 0 alone gives another output than in a batch",
                    where=problem.where,
                    hint=hint,
                )


# --------------------------------------------------------------------------- products


def _jvps(g, z, tangents):
    """``J t`` for each ``t`` in ``tangents`` ``[k, B, n_in]`` -> ``[k, B, n_out]``."""
    return vmap(lambda t: jvp(g, (z,), (t,))[1])(tangents)


def _vjps(g, z, cotangents):
    """``v J`` for each ``v`` in ``cotangents`` ``[k, B, n_out]`` -> ``[k, B, n_in]``."""
    _, pull = vjp(g, z)
    return vmap(lambda v: pull(v)[0])(cotangents)


def _jvp2s(g, z, t1, t2):
    """Second directional derivatives ``d²g[t1, t2]`` (forward over forward) -> ``[k, B, n_out]``."""

    def d2(a, b):
        return jvp(lambda zz: jvp(g, (zz,), (a,))[1], (z,), (b,))[1]

    return vmap(d2)(t1, t2)


def _hvps(g, z, v, t):
    """``d/dz (v·g)(z) t`` (forward over reverse) -> ``[k, B, n_in]``."""

    def hv(vv, tt):
        return jvp(lambda zz: vjp(g, zz)[1](vv)[0], (z,), (tt,))[1]

    return vmap(hv)(v, t)


def _vvps(g, z, v, u):
    """``u·d/dz (v·g)(z)`` (reverse over reverse, for ops without forward AD) -> ``[k, B, n_in]``."""

    def vv(vv_, uu):
        return vjp(lambda zz: vjp(g, zz)[1](vv_)[0], z)[1](uu)[0]

    return vmap(vv)(v, u)


def _onehot(idx: torch.Tensor, n: int, b: int, like: torch.Tensor) -> torch.Tensor:
    """``[k, B, n]`` with row ``e_idx[k]`` for every point (a broadcast view)."""
    e = torch.zeros(idx.numel(), n, dtype=like.dtype, device=like.device)
    e[torch.arange(idx.numel(), device=idx.device), idx] = 1
    return e[:, None, :].expand(idx.numel(), b, n)


_U32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """``x * m mod 2**32`` for 32-bit ``x`` without leaving int64's range."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * m + (((hi * m) & 0xFFFF) << 16)) & _U32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash (C. Wellons), on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rademacher(seed: int, probes: torch.Tensor, points: torch.Tensor, n: int, like: torch.Tensor):
    """±1 probes ``[k, B, n]`` that depend only on (seed, probe, point, coordinate).

    A counter-based hash rather than a generator stream, so that an estimate does
    not change with the chunking the planner picks or the device it runs on.
    """
    dev = like.device
    coord = torch.arange(n, device=dev, dtype=torch.int64)[None, None, :]
    point = points.to(dev, torch.int64)[None, :, None] & _U32
    probe = probes.to(dev, torch.int64)[:, None, None] & _U32
    h = _hash32(coord ^ _hash32(point ^ _hash32(probe ^ _hash32(torch.tensor(int(seed) & _U32, device=dev)))))
    return ((h >> 31) & 1).to(like.dtype) * 2 - 1


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Strategy:
    """How one (kind, mode) pair turns directions into a result.

    ``directions(problem)`` lists index tuples; ``product`` evaluates a chunk of them
    on a chunk of points; ``scatter`` adds the block into the ``[N, …]`` result.
    """

    directions: Callable[[Problem, int, int], torch.Tensor]
    product: Callable
    scatter: Callable
    result_shape: Callable[[Problem], tuple[int, ...]]


def _dirs_in(p: Problem, seed: int, probes: int) -> torch.Tensor:
    return torch.arange(p.n_in)[:, None]


def _dirs_out(p: Problem, seed: int, probes: int) -> torch.Tensor:
    return torch.arange(p.n_out)[:, None]


def _dirs_pairs_upper(p: Problem, seed: int, probes: int) -> torch.Tensor:
    return torch.triu_indices(p.n_in, p.n_in).T.contiguous()


def _dirs_out_in(p: Problem, seed: int, probes: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(p.n_out), torch.arange(p.n_in)).reshape(-1, 2)


def _dirs_probes(p: Problem, seed: int, probes: int) -> torch.Tensor:
    return torch.arange(probes)[:, None]


def _shape_jac(p):
    return (p.n_out, p.n_in)


def _shape_hess(p):
    return (p.n_out, p.n_in, p.n_in)


def _shape_lap(p):
    return (p.n_out,)


def _shape_div(p):
    return ()


def _shape_hutch(p):
    return (2,)  # running sum and sum of squares of the probe estimates


# products: (g, z, idx [k, m], ctx) -> block; ctx carries seed and the point indices


def _p_jac_fwd(g, z, idx, ctx):
    return _jvps(g, z, _onehot(idx[:, 0], z.shape[1], z.shape[0], z))


def _p_jac_rev(g, z, idx, ctx):
    return _vjps(g, z, _onehot(idx[:, 0], ctx["n_out"], z.shape[0], z))


def _p_hess_fwd(g, z, idx, ctx):
    n, b = z.shape[1], z.shape[0]
    return _jvp2s(g, z, _onehot(idx[:, 0], n, b, z), _onehot(idx[:, 1], n, b, z))


def _p_hess_rev(g, z, idx, ctx):
    b = z.shape[0]
    return _hvps(g, z, _onehot(idx[:, 0], ctx["n_out"], b, z), _onehot(idx[:, 1], z.shape[1], b, z))


def _p_hess_rr(g, z, idx, ctx):
    b = z.shape[0]
    return _vvps(g, z, _onehot(idx[:, 0], ctx["n_out"], b, z), _onehot(idx[:, 1], z.shape[1], b, z))


def _p_lap_fwd(g, z, idx, ctx):
    e = _onehot(idx[:, 0], z.shape[1], z.shape[0], z)
    return _jvp2s(g, z, e, e)


def _diag_take(block, idx):
    """``block[k, :, idx[k]]`` for ``block`` ``[k, B, n]`` -> ``[k, B]``."""
    return block.gather(2, idx.to(block.device)[:, None, None].expand(-1, block.shape[1], 1))[..., 0]


def _p_div_fwd(g, z, idx, ctx):
    return _diag_take(_p_jac_fwd(g, z, idx, ctx), idx[:, 0])


def _p_div_rev(g, z, idx, ctx):
    return _diag_take(_p_jac_rev(g, z, idx, ctx), idx[:, 0])


def _p_lap_rev(g, z, idx, ctx):
    return _diag_take(_p_hess_rev(g, z, idx, ctx), idx[:, 1])


def _p_lap_rr(g, z, idx, ctx):
    return _diag_take(_p_hess_rr(g, z, idx, ctx), idx[:, 1])


def _p_hutch(product):
    def run(g, z, idx, ctx):
        v = rademacher(ctx["seed"], idx[:, 0], ctx["points"], z.shape[1], z)
        # [k, B]: one estimate per probe and point, summed in float64 so that the
        # variance from sum and sum of squares keeps its digits
        s = (v * product(g, z, v)).sum(-1).double()
        return torch.stack([s.sum(0), (s * s).sum(0)], dim=-1)

    return run


# scatters: (result [B, ...] view of the chunk's rows, idx [k, m], block)


def _span(col: torch.Tensor):
    """``col`` as a slice when it is a run of consecutive indices (it always is for
    one-hot directions): a slice assignment is a plain strided copy, where an index
    tensor goes through index_put, several times slower on a 100 MB block."""
    first, n = int(col[0]), col.numel()
    if int(col[-1]) - first == n - 1 and (n < 3 or bool((col.diff() == 1).all())):
        return slice(first, first + n)
    return col


def _s_jac_fwd(res, idx, block):
    res[:, :, _span(idx[:, 0])] = block.permute(1, 2, 0)


def _s_jac_rev(res, idx, block):
    res[:, _span(idx[:, 0]), :] = block.permute(1, 0, 2)


def _s_hess_fwd(res, idx, block):
    values = block.permute(1, 2, 0)
    res[:, :, idx[:, 0], idx[:, 1]] = values
    res[:, :, idx[:, 1], idx[:, 0]] = values


def _s_hess_rev(res, idx, block):
    # advanced indices split by a slice put their axis first: the view is [k, B, n_in]
    res[:, idx[:, 0], :, idx[:, 1]] = block


def _s_sum(res, idx, block):
    res += block.sum(0)


def _s_add(res, idx, block):
    res += block


def _s_lap_rev(res, idx, block):
    res.index_add_(1, idx[:, 0].to(res.device), block.T)


#: scatters that together write every entry of a chunk's rows (the others add into them)
_ASSIGNING_SCATTERS = frozenset({_s_jac_fwd, _s_jac_rev, _s_hess_fwd, _s_hess_rev})

STRATEGIES: dict[tuple[str, str], Strategy] = {
    ("jacobian", "forward"): Strategy(_dirs_in, _p_jac_fwd, _s_jac_fwd, _shape_jac),
    ("jacobian", "reverse"): Strategy(_dirs_out, _p_jac_rev, _s_jac_rev, _shape_jac),
    ("hessian", "forward"): Strategy(_dirs_pairs_upper, _p_hess_fwd, _s_hess_fwd, _shape_hess),
    ("hessian", "reverse"): Strategy(_dirs_out_in, _p_hess_rev, _s_hess_rev, _shape_hess),
    ("laplacian", "forward"): Strategy(_dirs_in, _p_lap_fwd, _s_sum, _shape_lap),
    ("laplacian", "reverse"): Strategy(_dirs_out_in, _p_lap_rev, _s_lap_rev, _shape_lap),
    # pure reverse mode, for models with ops that have no forward-mode rule (silu_backward, …)
    ("hessian", "reverse-only"): Strategy(_dirs_out_in, _p_hess_rr, _s_hess_rev, _shape_hess),
    ("laplacian", "reverse-only"): Strategy(_dirs_out_in, _p_lap_rr, _s_lap_rev, _shape_lap),
    ("divergence", "forward"): Strategy(_dirs_in, _p_div_fwd, _s_sum, _shape_div),
    ("divergence", "reverse"): Strategy(_dirs_out, _p_div_rev, _s_sum, _shape_div),
    ("hutchinson", "forward"): Strategy(
        _dirs_probes, _p_hutch(lambda g, z, v: _jvps(g, z, v)), _s_add, _shape_hutch
    ),
    ("hutchinson", "reverse"): Strategy(
        _dirs_probes, _p_hutch(lambda g, z, v: _vjps(g, z, v)), _s_add, _shape_hutch
    ),
}


def _auto_mode(kind: str, n_in: int, n_out: int) -> str:
    """Fewest products wins; forward breaks ties since it keeps no tape."""
    cost = {
        "jacobian": (n_in, n_out),
        "hessian": (n_in * (n_in + 1) / 2, n_out * n_in),
        "laplacian": (n_in, n_out * n_in),
        "divergence": (n_in, n_out),
    }[kind]
    return "forward" if cost[0] <= cost[1] else "reverse"


# --------------------------------------------------------------------------- planning


def memory_available(device: torch.device) -> int:
    """Bytes the machine (or GPU) can still hand out."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def working_budget(device: torch.device) -> int:
    """Bytes one pass may use: a quarter of what is free, at most 2 GiB on CPU.

    Larger passes gain nothing on CPU (the products are already long matrix
    multiplications) and leave the machine unusable; GPUs want big passes.
    """
    free = memory_available(device)
    cap = free // 2 if device.type == "cuda" else 2 * 2**30
    return max(64 * _MIB, min(free // 4, cap))


@dataclass(frozen=True)
class Plan:
    """What a request will do: mode, chunking, result size and memory estimate."""

    kind: str
    mode: str
    estimator: str
    per_sample: bool
    points: int
    directions: int
    points_per_chunk: int
    directions_per_pass: int
    result_shape: tuple[int, ...]
    result_bytes: int
    peak_bytes: int
    available_bytes: int
    dtype: torch.dtype
    device: torch.device
    #: "taylor" (traced forward streams, see jaccli.taylor) or "torch.func"
    engine: str = "torch.func"
    #: why the Taylor path was tried and not taken (the op without a rule, ...)
    engine_note: str | None = None

    @property
    def chunks(self) -> int:
        return math.ceil(self.points / self.points_per_chunk) * math.ceil(
            self.directions / self.directions_per_pass
        )

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "mode": self.mode,
            "estimator": self.estimator,
            "per_sample": self.per_sample,
            "points": self.points,
            "directions_per_point": self.directions,
            "points_per_chunk": self.points_per_chunk,
            "directions_per_pass": self.directions_per_pass,
            "passes": self.chunks,
            "result_shape": list(self.result_shape),
            "result_bytes": self.result_bytes,
            "peak_bytes_estimate": self.peak_bytes,
            "available_bytes": self.available_bytes,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "engine": self.engine,
            "engine_note": self.engine_note,
        }


def _result_shape(kind: str, p: Problem, estimator: str) -> tuple[int, ...]:
    """The user-facing shape of the whole result (all differentiated inputs together)."""
    lead = (p.n,) if p.per_sample else ()
    flat_in = (p.n_in,) if len(p.in_shapes) > 1 else p.in_shapes[0]
    return {
        "jacobian": lead + p.out_shape + flat_in,
        "hessian": lead + p.out_shape + flat_in + flat_in,
        "laplacian": lead + p.out_shape,
        "divergence": lead,
    }[kind]


def _strategy_key(kind: str, estimator: str, mode: str) -> tuple[str, str]:
    return ("hutchinson" if estimator == "hutchinson" else kind, mode)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UsageError("unknown mode", expected="one of " + ", ".join(MODES), got=str(mode))


def _make_plan(kind: str, p: Problem, mode: str, estimator: str, probes: int, chunk_size) -> Plan:
    resolved = _auto_mode(kind, p.n_in, p.n_out) if mode == "auto" else mode
    key = _strategy_key(kind, estimator, resolved)
    strategy = STRATEGIES[key]
    n_dirs = len(strategy.directions(p, 0, probes))
    shape = _result_shape(kind, p, estimator)
    itemsize = torch.empty((), dtype=p.dtype).element_size()
    result_bytes = math.prod(shape) * itemsize
    available = memory_available(p.device)
    budget = working_budget(p.device)
    per_point_dir = max(p.act_bytes, 1.0) * _MEMORY_FACTOR[(kind, resolved)]
    row_bytes = math.prod(strategy.result_shape(p)) * itemsize
    if p.per_sample:
        if chunk_size is not None:
            ppc = int(chunk_size)
            dpp = max(1, min(n_dirs, int(budget // max(per_point_dir * ppc, 1))))
        else:
            dpp = max(1, min(n_dirs, int(budget // (per_point_dir * min(p.n, 64)))))
            ppc = int(budget // (per_point_dir * dpp + p.act_bytes + row_bytes))
        ppc = max(1, min(ppc, p.n))
        if p.static_batch is not None:
            ppc = p.static_batch
    else:
        ppc = 1
        dpp = int(chunk_size) if chunk_size is not None else int(budget // per_point_dir)
        dpp = max(1, min(dpp, n_dirs))
    if chunk_size is not None and int(chunk_size) < 1:
        raise UsageError("chunk size must be positive", got=str(chunk_size))
    working = per_point_dir * dpp * ppc + p.act_bytes * ppc + row_bytes * ppc
    return Plan(
        kind=kind,
        mode=resolved,
        estimator=estimator,
        per_sample=p.per_sample,
        points=p.n,
        directions=n_dirs,
        points_per_chunk=ppc,
        directions_per_pass=dpp,
        result_shape=shape,
        result_bytes=int(result_bytes),
        peak_bytes=int(result_bytes + working),
        available_bytes=int(available),
        dtype=p.dtype,
        device=p.device,
    )


def _check_preconditions(kind: str, p: Problem, estimator: str, probes: int) -> None:
    if estimator not in ESTIMATORS:
        raise UsageError("unknown estimator", expected="one of " + ", ".join(ESTIMATORS), got=estimator)
    if estimator == "hutchinson":
        if kind != "divergence":
            raise UsageError("the hutchinson estimator is for divergence only", got=kind)
        if int(probes) < 2:
            raise UsageError("hutchinson needs at least 2 probes for a standard error", got=str(probes))
    if kind == "divergence":
        if len(p.wrt) != 1:
            raise UsageError("divergence is taken with respect to one input", got=str(len(p.wrt)))
        if p.out_shape != p.in_shapes[0]:
            raise ModelError(
                "divergence needs a square Jacobian: output and input shapes per point must match",
                where=p.where,
                expected=f"output {shape_str(p.in_shapes[0])} per point",
                got=shape_str(p.out_shape),
            )


def format_bytes(n: float) -> str:
    """``1.5 GiB`` style sizes for messages and summaries."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _check_fits(plan: Plan, p: Problem) -> None:
    if plan.result_bytes > 0.9 * plan.available_bytes:
        hint = (
            "pass per_sample=True (--per-sample) if axis 0 holds independent points"
            if not p.per_sample and p.n_in > 1
            else "use a smaller input or a divergence/laplacian instead of the full matrix"
        )
        raise ResourceError(
            f"the result would not fit in memory ({str(p.dtype).removeprefix('torch.')} "
            f"{shape_str(plan.result_shape)})",
            expected=f"at most {format_bytes(0.9 * plan.available_bytes)} available on {p.device}",
            got=format_bytes(plan.result_bytes),
            hint=hint,
        )


# --------------------------------------------------------------------------- execution


def _empty_result(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised result; on CPU backed by numpy, whose allocator asks the kernel for
    transparent huge pages: first-touch page faults of a 200 MB result drop from about
    60 ms to 15 ms, as much as the whole Jacobian of a small network costs beyond its
    forward pass. The tensor keeps the array alive; nothing else refers to it."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype))


def _execute(kind: str, p: Problem, plan: Plan, strategy: Strategy, *, seed: int, probes: int):
    """Loop over chunks of points and directions; returns the flat ``[N, …]`` result."""
    dirs = strategy.directions(p, seed, probes).to(p.device)
    row_shape = strategy.result_shape(p)
    acc_dtype = torch.float64 if kind == "divergence" and plan.estimator == "hutchinson" else p.dtype
    # Scatters that assign every entry (Jacobian, Hessian) need no zero fill, and a chunk
    # writes straight into its rows of the result (a padded static-batch chunk excepted):
    # filling and copying a 260 MB Jacobian cost half as much again as computing it.
    assigns = strategy.scatter in _ASSIGNING_SCATTERS
    shape = (p.n, *row_shape)
    if assigns:
        result = _empty_result(shape, acc_dtype, p.device)
    else:
        result = torch.zeros(shape, dtype=acc_dtype, device=p.device)
    ctx = {"n_out": p.n_out, "seed": seed}
    ppc, dpp = plan.points_per_chunk, plan.directions_per_pass
    with torch.no_grad():
        for start in range(0, p.n, ppc):
            stop = min(start + ppc, p.n)
            rows = torch.arange(start, stop, device=p.device)
            if p.static_batch is not None and rows.numel() < p.static_batch:
                rows = torch.cat([rows, rows[-1:].expand(p.static_batch - rows.numel())])
            g, z = p.fn(rows), p.z(rows)
            ctx["points"] = rows
            padded = rows.numel() != stop - start
            if padded:
                block_rows = torch.zeros((rows.numel(), *row_shape), dtype=acc_dtype, device=p.device)
            else:
                block_rows = result[start:stop]
            for d0 in range(0, dirs.shape[0], dpp):
                idx = dirs[d0 : d0 + dpp]
                block = strategy.product(g, z, idx, ctx)
                strategy.scatter(block_rows, idx, block.to(acc_dtype))
            if padded:
                result[start:stop] = block_rows[: stop - start]
    return result


# --------------------------------------------------------------------------- Taylor fast path
# Forward-mode requests on one per-sample input run through jaccli.taylor: the model is
# traced once and its value, first- and second-order streams go through it together
# (one matrix product per layer for all of them) instead of torch.func's vmap over jvp.
# Everything else (several inputs, reverse mode, an op without a Taylor rule) runs the
# torch.func strategies above, unchanged; the plan says which engine ran and why.

#: JACCLI_FAST_PATH=0 in the environment turns the Taylor path off (to compare or rule it out)
FAST_PATH = os.environ.get("JACCLI_FAST_PATH", "1") != "0"

#: on CPU a pass's working set is kept near cache size: more points per pass only
#: stream the same matrices through memory again (GPUs want big passes instead)
_CACHE_BYTES = 8 * _MIB
_MIN_POINTS = 64


def _taylor_kind(kind: str, estimator: str) -> str:
    return "jvp" if estimator == "hutchinson" else kind


def _taylor_program(kind: str, p: Problem, mode: str) -> tuple[taylor.TaylorProgram | None, str | None]:
    """The traced program where the fast path applies; else None and why (None if never tried).

    The fast path is forward mode (forward-over-forward for second derivatives), so it
    is tried only where that mode was asked for or auto mode picks it, on one
    per-sample input without a static batch size.
    """
    resolved = _auto_mode(kind, p.n_in, p.n_out) if mode == "auto" else mode
    eligible = p.per_sample and resolved == "forward" and len(p.args.values) == 1
    if not (FAST_PATH and eligible and p.static_batch is None):
        return None, None
    rows = _probe_rows(p)
    try:
        return taylor.build(p.fn(rows), p.z(rows), orders=2 if kind in ("hessian", "laplacian") else 1), None
    except taylor.Unsupported as exc:
        return None, f"Taylor path not used: {exc}"


def _taylor_plan(kind: str, p: Problem, program: taylor.TaylorProgram, estimator: str, probes: int,
                 chunk_size) -> Plan:  # fmt: skip
    """Points per pass and directions per pass from the program's own memory estimate."""
    if chunk_size is not None and int(chunk_size) < 1:
        raise UsageError("chunk size must be positive", got=str(chunk_size))
    tkind = _taylor_kind(kind, estimator)
    n_dirs = {"jvp": int(probes), "hessian": p.n_in * (p.n_in + 1) // 2}.get(tkind, p.n_in)
    shape = _result_shape(kind, p, estimator)
    itemsize = torch.empty((), dtype=p.dtype).element_size()
    result_bytes = math.prod(shape) * itemsize
    row_bytes = 16 if tkind == "jvp" else math.prod(shape[1:]) * itemsize
    budget = working_budget(p.device)

    def per_point(directions: int) -> int:
        return program.bytes_per_point(tkind, directions) + row_bytes

    lead = int(chunk_size) if chunk_size is not None else min(p.n, _MIN_POINTS)
    dpp = n_dirs
    while dpp > 1 and per_point(dpp) * lead > budget:
        dpp = math.ceil(dpp / 2)
    if chunk_size is not None:
        ppc = int(chunk_size)
    else:
        ppc = budget // per_point(dpp)
        if p.device.type == "cpu":
            ppc = min(ppc, max(_MIN_POINTS, _CACHE_BYTES // per_point(dpp)))
    ppc = max(1, min(ppc, p.n))
    return Plan(
        kind=kind,
        mode="forward",
        estimator=estimator,
        per_sample=True,
        points=p.n,
        directions=n_dirs,
        points_per_chunk=ppc,
        directions_per_pass=dpp,
        result_shape=shape,
        result_bytes=int(result_bytes),
        peak_bytes=int(result_bytes + ppc * per_point(dpp)),
        available_bytes=int(memory_available(p.device)),
        dtype=p.dtype,
        device=p.device,
        engine="taylor",
    )


def _choose_plan(kind: str, p: Problem, mode: str, estimator: str, probes: int,
                 chunk_size) -> tuple[Plan, taylor.TaylorProgram | None]:  # fmt: skip
    """The Taylor plan and program where the fast path applies, else the torch.func plan."""
    program, why_not = _taylor_program(kind, p, mode)
    if program is not None:
        return _taylor_plan(kind, p, program, estimator, probes, chunk_size), program
    plan = _make_plan(kind, p, mode, estimator, probes, chunk_size)
    return (replace(plan, engine_note=why_not) if why_not else plan), None


def _execute_taylor(kind: str, p: Problem, plan: Plan, program: taylor.TaylorProgram, *,
                    seed: int, probes: int) -> torch.Tensor:  # fmt: skip
    """The fast path's loop over chunks of points: each pass writes its rows of the result in place."""
    ppc, dpp = plan.points_per_chunk, plan.directions_per_pass
    hutchinson = plan.estimator == "hutchinson"
    if hutchinson:
        result = torch.zeros((p.n, 2), dtype=torch.float64, device=p.device)
        estimate = _p_hutch(lambda g, z, v: program.jvp(z, v))
    else:
        # every entry is written by its pass: no zero fill of what may be gigabytes
        row_shape = STRATEGIES[(kind, "forward")].result_shape(p)
        result = _empty_result((p.n, *row_shape), p.dtype, p.device)
        compute = getattr(program, kind)
    with torch.no_grad():
        for start in range(0, p.n, ppc):
            rows = torch.arange(start, min(start + ppc, p.n), device=p.device)
            z, out = p.z(rows), result[start : start + rows.numel()]
            if not hutchinson:
                compute(z, directions=dpp, out=out)
                continue
            ctx = {"seed": seed, "points": rows}
            for d0 in range(0, int(probes), dpp):
                idx = torch.arange(d0, min(d0 + dpp, int(probes)))[:, None]
                out += estimate(None, z, idx, ctx)
    return result


def _run(kind, f, x, *, wrt, per_sample, mode, chunk_size, output, check_batch, strict,
         estimator="exact", probes=0, seed=0):  # fmt: skip
    _check_mode(mode)
    p = _check_inputs(
        f, x, wrt=wrt, per_sample=per_sample, output=output, check_batch=check_batch, strict=strict
    )
    _check_preconditions(kind, p, estimator, probes)
    plan, program = _choose_plan(kind, p, mode, estimator, probes, chunk_size)
    _check_fits(plan, p)
    try:
        return p, plan, _guarded(kind, p, plan, seed, probes, program)
    except NotImplementedError as exc:
        fallback = _FALLBACK.get(_strategy_key(kind, estimator, plan.mode))
        if fallback is None or "forward AD" not in str(exc):
            _model_failed(p, exc, _probe_rows(p))
        if mode != "auto":
            warnings.warn(
                f"{p.where}: {first_line(exc)}; used {fallback} mode instead of {mode}",
                JaccliWarning,
                stacklevel=3,
            )
        plan = _make_plan(kind, p, fallback, estimator, probes, chunk_size)
        try:
            return p, plan, _guarded(kind, p, plan, seed, probes)
        except NotImplementedError as exc2:
            _model_failed(p, exc2, _probe_rows(p))


def _guarded(kind: str, p: Problem, plan: Plan, seed: int, probes: int,
             program: taylor.TaylorProgram | None = None) -> torch.Tensor:  # fmt: skip
    """Execute ``plan``, turning failures into jaccli errors (NotImplementedError passes)."""
    strategy = STRATEGIES[_strategy_key(kind, plan.estimator, plan.mode)]
    try:
        if program is not None:
            return _execute_taylor(kind, p, plan, program, seed=seed, probes=probes)
        return _execute(kind, p, plan, strategy, seed=seed, probes=probes)
    except (JaccliError, NotImplementedError):
        raise
    except torch.OutOfMemoryError:
        raise ResourceError(
            "out of memory while computing",
            where=str(p.device),
            hint=f"pass a smaller chunk size than {plan.points_per_chunk if p.per_sample else plan.directions_per_pass}",
        ) from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
            raise ResourceError("out of memory while computing", where=str(p.device)) from None
        _model_failed(p, exc, _probe_rows(p))


def _all_finite(value: torch.Tensor) -> bool:
    # the extremes say it all (NaN propagates into both, ±Inf is one of them) and cost one
    # read of the result, where isfinite().all() writes a mask as large as the result:
    # on a 200 MB Jacobian that scan took as long as computing it
    if value.numel() == 0:
        return True
    lo, hi = torch.aminmax(value)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _finish(kind: str, p: Problem, value: torch.Tensor, strict: bool) -> None:
    if not _all_finite(value):
        msg = f"the {kind} holds NaN or Inf values"
        if strict:
            raise NumericalError(msg, where=p.where)
        warnings.warn(f"{p.where}: {msg}", JaccliWarning, stacklevel=3)
    if kind in ("hessian", "laplacian"):
        kinks = sorted(p.ops & NONSMOOTH_OPS)
        if kinks:
            if not bool(value.any()):
                msg = (
                    f"the {kind} is identically zero because the model is piecewise linear "
                    f"({', '.join(kinks)}): its second derivatives vanish almost everywhere; "
                    "use a smooth activation (tanh, softplus, SiLU, GELU) for meaningful curvature"
                )
            else:
                msg = (
                    f"the model uses {', '.join(kinks)}: second derivatives through those "
                    "units are zero almost everywhere and ignore their kinks"
                )
            warnings.warn(f"{p.where}: {msg}", JaccliWarning, stacklevel=3)


def _unflatten_in(p: Problem, t: torch.Tensor, lead: tuple[int, ...], axes: int):
    """Split the last ``axes`` flat input axes per differentiated argument and reshape."""
    sizes = [math.prod(s) for s in p.in_shapes]
    if axes == 1:
        parts = t.split(sizes, dim=-1)
        outs = tuple(part.reshape((*lead, *p.out_shape, *s)) for part, s in zip(parts, p.in_shapes))
        return outs[0] if p.single else outs
    rows = t.split(sizes, dim=-2)
    blocks = tuple(
        tuple(
            blk.reshape((*lead, *p.out_shape, *si, *sj))
            for blk, sj in zip(r.split(sizes, dim=-1), p.in_shapes)
        )
        for r, si in zip(rows, p.in_shapes)
    )
    return blocks[0][0] if p.single else blocks


def _lead(p: Problem) -> tuple[int, ...]:
    return (p.n,) if p.per_sample else ()


# --------------------------------------------------------------------------- public API


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

    >>> import torch, jaccli
    >>> p = jaccli.plan("jacobian", torch.nn.Linear(1, 501), torch.zeros(1000, 1), per_sample=True)
    >>> p.mode, p.result_shape
    ('forward', (1000, 501, 1))
    """
    if kind not in KINDS:
        raise UsageError("unknown derivative", expected="one of " + ", ".join(KINDS), got=kind)
    _check_mode(mode)
    p = _check_inputs(
        f, x, wrt=wrt, per_sample=per_sample, output=output, check_batch=check_batch, strict=strict
    )
    _check_preconditions(kind, p, estimator, probes)
    return _choose_plan(kind, p, mode, estimator, probes, chunk_size)[0]


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
    p, plan_, flat = _run("jacobian", f, x, wrt=wrt, per_sample=per_sample, mode=mode,
                          chunk_size=chunk_size, output=output, check_batch=check_batch,
                          strict=strict)  # fmt: skip
    value = flat if p.per_sample else flat[0]
    _finish("jacobian", p, value, strict)
    return _unflatten_in(p, value, _lead(p), 1)


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
    p, plan_, flat = _run("hessian", f, x, wrt=wrt, per_sample=per_sample, mode=mode,
                          chunk_size=chunk_size, output=output, check_batch=check_batch,
                          strict=strict)  # fmt: skip
    value = flat if p.per_sample else flat[0]
    _finish("hessian", p, value, strict)
    return _unflatten_in(p, value, _lead(p), 2)


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
):
    """Trace of the Hessian of every output component: ``[*, *out]``.

    With several ``wrt`` inputs the trace runs over all of them together.

    >>> import torch, jaccli
    >>> jaccli.laplacian(lambda v: (v**2).sum(), torch.ones(3))   # Δ|v|² = 2·3
    tensor(6.)
    """
    p, plan_, flat = _run("laplacian", f, x, wrt=wrt, per_sample=per_sample, mode=mode,
                          chunk_size=chunk_size, output=output, check_batch=check_batch,
                          strict=strict)  # fmt: skip
    value = flat.reshape((*_lead(p), *p.out_shape))
    _finish("laplacian", p, value, strict)
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
    p, plan_, flat = _run("divergence", f, x, wrt=wrt, per_sample=per_sample, mode=mode,
                          chunk_size=chunk_size, output=output, check_batch=check_batch,
                          strict=strict, estimator=estimator, probes=probes,
                          seed=seed)  # fmt: skip
    if estimator == "exact":
        value = flat if p.per_sample else flat[0]
        _finish("divergence", p, value, strict)
        return value
    k = int(probes)
    mean = flat[:, 0] / k
    var = ((flat[:, 1] - k * mean * mean) / (k - 1)).clamp_min(0)
    stderr = (var / k).sqrt()
    mean, stderr = mean.to(p.dtype), stderr.to(p.dtype)
    if not p.per_sample:
        mean, stderr = mean[0], stderr[0]
    _finish("divergence", p, mean, strict)
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
        "arguments": list(_arg_names(f)),
        "expected_input": describe_expected_input(f),
        "static_batch": info.static_batch,
        "notes": list(info.notes),
    }
    if x is None:
        return facts
    args = _normalise_args(x, _arg_names(f))
    floating = [i for i, v in enumerate(args.values) if v.is_floating_point()]
    if not floating:
        raise UsageError("no floating-point input to describe", got=", ".join(str(v.dtype) for v in args.values))
    p = _check_inputs(f, x, wrt=floating[0], per_sample=per_sample, output=output, check_batch=False)
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
            _check_batch_independence(p, _probe_rows(p))
            facts["batch_independent"] = True
        except ModelError as exc:
            facts["batch_independent"] = exc.what
    return facts
