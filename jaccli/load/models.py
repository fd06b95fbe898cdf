"""The model wrapper: what was loaded (:class:`ModelInfo`, :class:`LoadedModel`), and what a
model — loaded or a plain module or function — has and takes: parameters, dtype, expected input.

Loading itself is :mod:`.loaders`' (the format table, :func:`~.loaders.load_model`) and
:mod:`.weights`' (weights-only files and the built-in MLP family).

Imports: torch only (nothing else of jaccli: the engine reads models through this module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for ``jaccli info`` and for error messages."""

    path: str
    format: str
    arg_names: tuple[str, ...] = ()
    #: per argument: expected shape with ``None`` where any size is accepted (None: unknown)
    arg_shapes: tuple[tuple[int | None, ...] | None, ...] = ()
    #: the one batch size an exported model was specialised to, if it was
    static_batch: int | None = None
    runs_code: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)


class LoadedModel(nn.Module):
    """A model loaded by :func:`~.loaders.load_model`: call it like the original.

    TorchScript modules are run with the JIT's optimising executor switched off:
    its profiling passes break ``torch.func`` transforms from the third call on
    (pytorch/pytorch#170680), and plain interpretation gives the same numbers.
    """

    def __init__(self, module: nn.Module, info: ModelInfo) -> None:
        super().__init__()
        self.module = module
        self.info = info

    def forward(self, *args, **kwargs):
        with torch.jit.optimized_execution(False):
            return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"format={self.info.format}, path={self.info.path!r}"


def count_parameters(model: Callable) -> int:
    """Number of parameter elements (0 for a plain function)."""
    if isinstance(model, nn.Module):
        return sum(p.numel() for p in model.parameters())
    return 0


def model_dtype(model: Callable) -> torch.dtype | None:
    """The floating dtype of the model's parameters, if it has any."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def info_of(model: Callable) -> ModelInfo:
    """The :class:`ModelInfo` of a loaded model; a minimal one for other callables."""
    info = getattr(model, "info", None)
    if isinstance(info, ModelInfo):
        return info
    return ModelInfo(path=type(model).__name__, format="python", runs_code=True)


def _channels(module, weight: torch.Tensor) -> int | None:
    """A convolution's input channels (None where its groups are unknown: a trace keeps no ``groups``)."""
    groups = getattr(module, "groups", None)
    return None if groups is None else int(weight.shape[1]) * int(groups)


#: the input a first layer takes, from the layer and its weight: ``None`` for any size
_FIRST_LAYERS: dict[str, Callable[[Any, torch.Tensor], list[int | None]]] = {
    "Linear": lambda m, w: [None, int(w.shape[1])],
    "Bilinear": lambda m, w: [None, int(w.shape[1])],
    "Conv1d": lambda m, w: [None, _channels(m, w), None],
    "Conv2d": lambda m, w: [None, _channels(m, w), None, None],
    "Conv3d": lambda m, w: [None, _channels(m, w), None, None, None],
    "LayerNorm": lambda m, w: [None, *map(int, w.shape)],
}


class ExpectedInput(NamedTuple):
    """What a model takes as its first argument, and how that is known."""

    shape: tuple[int | None, ...]  #: None where any size is accepted (the batch axis, …)
    source: str  #: "its export signature" or "its first layer, Linear with weight [50, 2]"

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(w is None or w == s for w, s in zip(self.shape, shape))

    def __str__(self) -> str:
        return "[" + ", ".join("*" if s is None else str(s) for s in self.shape) + "]"


def _first_layer(model: Callable) -> ExpectedInput | None:
    """The input the first module with a weight takes, where its kind says (Linear, Conv, LayerNorm).

    Modules are taken in the order they were registered, which is the order they run in
    a Sequential and in most hand-written models: a guess to be stated as such.
    """
    if not isinstance(model, nn.Module):
        return None
    for _name, module in model.named_modules():
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is None:
            continue
        kind = getattr(module, "original_name", None) or type(module).__name__
        rule = _FIRST_LAYERS.get(kind)
        if rule is None:
            return None
        shape = "[" + ", ".join(map(str, weight.shape)) + "]"
        return ExpectedInput(tuple(rule(module, weight)), f"its first layer, {kind} with weight {shape}")
    return None


def expected_input(model: Callable) -> ExpectedInput | None:
    """What ``model`` takes as its first argument: from an exported signature (exact), else
    from its first layer's weight (TorchScript, safetensors, state dicts, modules), if known."""
    shapes = info_of(model).arg_shapes
    if shapes and shapes[0] is not None:
        return ExpectedInput(tuple(shapes[0]), "its export signature")
    return _first_layer(model)


def describe_expected_input(model: Callable) -> str | None:
    """``[*, 3]`` (``*`` for any size) from an exported signature, or ``[*, 2] (its first
    layer, Linear with weight [50, 2])`` from the first layer; None if neither tells."""
    found = expected_input(model)
    if found is None:
        return None
    return str(found) if found.source == "its export signature" else f"{found} ({found.source})"
