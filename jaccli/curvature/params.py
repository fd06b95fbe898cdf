"""The parameters curvature is taken with respect to, and the model as a function of them.

:class:`ParamSpace` picks the model's named parameters in state-dict order (``--params``
globs restrict them), gives each its offset in the flat vector (each tensor flattened
row-major) and calls the model with other values for them:

* ``nn.Module`` (safetensors MLP, state dict + ``--arch``, and the ``GraphModule`` of a
  ``.pt2`` program) through :func:`torch.func.functional_call`;
* TorchScript (script and trace), which the stateless API refuses, by setting the
  attributes of the underlying C++ module for the duration of the call (``_c.setattr``)
  and restoring them after: the JIT then runs on the tensors torch.func hands in, so
  ``grad``, ``jvp`` and ``vmap`` see through it.

A ``.pt2`` program exported for one batch size gets its chunks padded to that size.

Imports: torch, :mod:`jaccli.load`, :mod:`jaccli.engine` (``select_output``), :mod:`jaccli.errors`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from jaccli.engine import select_output
from jaccli.errors import ModelError, UsageError
from jaccli.load.models import LoadedModel, info_of


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor: its state-dict name, shape and offset in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "offset": self.offset}


def _is_script(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


class ParamSpace:
    """The selected parameters of ``model`` and the model as a function ``f(θ, args)``."""

    def __init__(self, model, params: str | None = None, *, output=None) -> None:
        module = model.module if isinstance(model, LoadedModel) else model
        where = info_of(model).path
        if not isinstance(module, nn.Module):
            raise UsageError("curvature needs a model with parameters (an nn.Module or a loaded model file)",
                             got=type(model).__name__)  # fmt: skip
        self.module, self.where, self.output = module, where, output
        self.script = _is_script(module)
        self.static_batch = info_of(model).static_batch
        named = dict(module.named_parameters())
        order = [k for k in module.state_dict(keep_vars=True) if k in named]
        order += [k for k in named if k not in order]  # parameters a state dict does not list
        if not order:
            raise ModelError("the model has no parameters", where=where)
        if params:
            globs = [g.strip() for g in params.split(",") if g.strip()]
            chosen = [k for k in order if any(fnmatch.fnmatchcase(k, g) for g in globs)]
            if not chosen:
                raise UsageError("no parameter matches --params", where=where, expected=", ".join(order[:12])
                                 + (" …" if len(order) > 12 else ""), got=params)  # fmt: skip
            order = chosen
        self.names = tuple(order)
        # the parameters held constant, detached: a module's own ones would build graphs for nothing
        self.fixed = {k: t.detach() for k, t in named.items() if k not in order}
        self.values = tuple(named[k].detach() for k in order)
        infos, offset = [], 0
        for k, t in zip(order, self.values):
            infos.append(ParamInfo(k, tuple(t.shape), offset))
            offset += t.numel()
        self.infos = tuple(infos)
        self.size = offset
        floats = {t.dtype for t in self.values}
        if any(not t.is_floating_point() for t in self.values):
            raise ModelError("parameters must be floating point", where=where, got=", ".join(sorted(map(str, floats))))
        self.dtype = self.values[0].dtype
        self.device = self.values[0].device

    # ------------------------------------------------------------------ flat vectors

    def flat(self, tensors) -> torch.Tensor:
        """The tensors of the selected parameters as one flat vector (row-major each)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def split(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A flat vector ``[P]`` (or ``[P, …]`` trailing axes kept) as parameter-shaped tensors."""
        return tuple(
            vec[i.offset : i.offset + i.size].reshape((*i.shape, *vec.shape[1:])) for i in self.infos
        )

    # ------------------------------------------------------------------ the model as a function of θ

    @contextmanager
    def _swapped(self, theta):
        """TorchScript: the module's parameter attributes set to ``theta`` for one call."""
        saved = []
        try:
            for name, t in zip(self.names, theta):
                *path, leaf = name.split(".")
                sub = self.module
                for s in path:
                    sub = getattr(sub, s)
                saved.append((sub._c, leaf, sub._c.getattr(leaf)))
                sub._c.setattr(leaf, t)
            yield
        finally:
            for c, leaf, old in reversed(saved):
                c.setattr(leaf, old)

    def call(self, theta, args) -> torch.Tensor:
        """The model's (selected) output on ``args`` (a tensor or a dict of named tensors)."""
        n = _rows(args)
        padded = self.static_batch is not None and n != self.static_batch
        if padded:
            args = _pad(args, self.static_batch)
        if self.script:
            with self._swapped(theta), torch.jit.optimized_execution(False):
                out = self.module(**args) if isinstance(args, Mapping) else self.module(args)
        else:
            state = {**self.fixed, **dict(zip(self.names, theta))}
            call_args = (args,) if not isinstance(args, Mapping) else ()
            kwargs = dict(args) if isinstance(args, Mapping) else {}
            out = torch.func.functional_call(self.module, state, call_args, kwargs)
        out = select_output(out, self.output, self.where)
        return out[:n] if padded else out


def _rows(args) -> int:
    if isinstance(args, Mapping):
        return next(iter(args.values())).shape[0]
    return args.shape[0]


def _pad(args, size: int):
    """Rows repeated from the first up to ``size`` (a program exported for one batch size)."""

    def pad(t):
        extra = size - t.shape[0]
        if extra < 0:
            raise UsageError("internal: a chunk larger than the exported batch size")
        return torch.cat([t, t[:1].expand(extra, *t.shape[1:])]) if extra else t

    if isinstance(args, Mapping):
        return {k: pad(v) for k, v in args.items()}
    return pad(args)


def take(args, start: int, stop: int):
    """Rows ``start:stop`` of a tensor or of each tensor of a dict."""
    if isinstance(args, Mapping):
        return {k: v[start:stop] for k, v in args.items()}
    return args[start:stop]
