"""Normalise a request once: arguments, ``wrt``, outputs → one flat batch function.

Owns :class:`Problem` (the flat batch function ``g: [B, n_in] -> [B, n_out]`` with
everything the planner needs) and :func:`check_inputs` (validation, in the spirit of
torchdiffeq's ``_check_inputs``: every later stage trusts what it returns), which ends by
running :mod:`.probe` on the model (output shape, memory per point, ops, batch independence).

Imports: torch, :mod:`jaccli.errors`, :mod:`jaccli.request.spec`, :mod:`jaccli.load.models`,
:mod:`.kernels`, :mod:`.memo` (the model's state) and :mod:`.probe`; nothing else of the engine.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from jaccli.errors import ModelError, NumericalError, UsageError, shape_str, JaccliWarning
from jaccli.request.spec import Selection
from jaccli.load.models import info_of
from jaccli.engine import memo
from jaccli.engine.kernels import differentiable
from jaccli.engine.probe import run_probe, select_output, select_part


class _Args(NamedTuple):
    keys: tuple[int | str, ...]  # position or keyword of each model argument
    values: tuple[torch.Tensor, ...]


def normalise_args(x, names: Sequence[str] = ()) -> _Args:
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
            hint="pass wrt= naming one or more of " + ", ".join(labels),
            cli_hint="pass --wrt NAME (repeatable) with one or more of " + ", ".join(labels),
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



def arg_names(f: Callable) -> tuple[str, ...]:
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



@dataclass
class Problem:
    """A request normalised once: the flat batch function and everything the planner needs."""

    f: Callable  # what is called (wrapped, see kernels.differentiable)
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
    flops: float = 0.0  # forward operations per point (see op_flops), for the planner's time estimates
    ops: frozenset[str] = field(default_factory=frozenset)
    blocked: ModelError | None = None  # why no derivative reaches the output, if none can
    select: Selection | None = None  # the elements of each point's output differentiated
    #: (rows, g(z(rows))) of the probe's last forward on its rows (per sample): the kept
    #: program's recheck compares with it instead of running the model once more
    probe_output: tuple[torch.Tensor, torch.Tensor] | None = None
    #: the model's :func:`.memo.state` when the call began (the probe and program caches' key)
    state: tuple | None = None
    #: whether the batch-independence check passed on this call's model (it vouches for a
    #: program recorded in this call), and the probe rows of a check left pending (see
    #: :func:`.probe.settle_batch_check`)
    batch_checked: bool = False
    batch_pending: torch.Tensor | None = None

    @property
    def n_in(self) -> int:
        return sum(math.prod(s) for s in self.in_shapes)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    def z(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The differentiated arguments of ``rows`` as one ``[B, n_in]`` matrix; a ``slice`` of
        points (a chunk) is a view where one argument is differentiated (no copy, no index)."""
        parts = []
        for i in self.wrt:
            v = self.args.values[i]
            if not self.per_sample:
                v = v[None]
            else:
                v = v[rows] if isinstance(rows, slice) else v.index_select(0, rows)
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
            y = select_part(select_output(f(*pos, **kw), self.output, self.where), self.select, per_sample, self.where)
            return y.reshape(b, -1)

        return g


def check_inputs(
    f: Callable,
    x,
    *,
    wrt=None,
    per_sample: bool,
    output=None,
    check_batch: bool = True,
    strict: bool = False,
    refuse_blocked: bool = True,
    select=None,
    defer_batch: bool = False,
) -> Problem:
    """Validate and normalise a request once; probe the model on a few points.

    A model whose output the differentiated inputs reach only through ops without a
    derivative is refused (``refuse_blocked``) rather than answered with zeros; with
    ``refuse_blocked=False`` the reason is left in ``Problem.blocked``. With ``defer_batch``
    a recalled model's batch check may be left pending: the caller must run
    :func:`.probe.settle_batch_check` before computing.
    """
    if not callable(f):
        raise UsageError("the model is not callable", got=type(f).__name__)
    module = f
    where = info_of(f).path
    f = differentiable(f)
    names = arg_names(module)
    args = normalise_args(x, names)
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
    # the model's state (the probe and program caches' key), taken once per call before the
    # model runs, and its dtype: one walk of the module tree for both
    now, mdtype = memo.state_and_dtype(module) if isinstance(module, nn.Module) else (None, None)
    if mdtype is not None and mdtype != dtype:
        raise UsageError(
            "the model's parameters and the input differ in dtype",
            where=where,
            expected=str(mdtype).removeprefix("torch."),
            got=str(dtype).removeprefix("torch."),
            hint="convert one of them (load_model(..., dtype=...))",
            cli_hint="pass --dtype " + str(mdtype).removeprefix("torch."),
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
        if v.is_floating_point() and not all_finite(v):
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
        select=Selection.parse(select),
        state=now,
    )
    _check_exported_shapes(problem, names)
    run_probe(problem, check_batch=check_batch and per_sample, refuse_blocked=refuse_blocked, defer_batch=defer_batch)
    return problem


def all_finite(v: torch.Tensor) -> bool:
    """Whether every entry of ``v`` is finite (inputs, results, partials: the one check). A
    finite sum says so in one read without a mask (a NaN or an Inf makes the sum NaN or Inf;
    6-15 µs on a small input against 15-35, 33 µs against 0.7 ms on 200,000 values); only a
    non-finite sum, which finite values can give by overflow, is checked entry by entry."""
    return v.numel() == 0 or bool(v.sum().isfinite()) or bool(torch.isfinite(v).all())


def _check_exported_shapes(problem: Problem, names: Sequence[str]) -> None:
    """Refuse, before any call, inputs an exported program's fixed sizes do not accept:
    its own error reads "Guard failed: x.size()[1] == 4"."""
    wanted = info_of(problem.module).arg_shapes
    for key, label, v in zip(problem.args.keys, problem.labels, problem.args.values):
        i = key if isinstance(key, int) else (names.index(key) if key in names else len(wanted))
        want = wanted[i] if i < len(wanted) else None
        if want is None:
            continue
        # per sample, axis 0 is a chunk of points (padded to a static batch where there is one)
        skip = 1 if problem.per_sample else 0
        fixed = [a for a, w in enumerate(want) if a >= skip and w is not None]
        if len(want) != v.dim() or any(v.shape[a] != want[a] for a in fixed):
            axes = [a for a in fixed if v.shape[a] != want[a]] if len(want) == v.dim() else []
            raise ModelError(
                f"input {label!r} does not have the shape the model was exported for",
                where=problem.where,
                expected=shape_str(["*" if w is None else w for w in want]),
                got=shape_str(v.shape),
                hint=(f"axis {axes[0]} was fixed at {want[axes[0]]} by torch.export: " if axes else "")
                + "feed inputs of that shape, or export the model again with the axis dynamic "
                "(dynamic_shapes with torch.export.Dim)",
            )

