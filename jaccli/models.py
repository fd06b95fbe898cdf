"""Loading saved models into callables the derivative engine can use.

A model file is recognised by its content; each format is a row of :data:`LOADERS`.
TorchScript and ``torch.export`` archives contain code that runs when the model
runs: load them only from sources you trust (safetensors weights are the safe route).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError, ResourceError, UsageError
from .io import Source, archive_kind, read_source, resolve_dtype


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
    """A model loaded by :func:`load_model`: call it like the original.

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


# --------------------------------------------------------------------------- sniffing


# --------------------------------------------------------------------------- loaders


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_torchscript(src: Source, device: torch.device) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still loads
            module = torch.jit.load(io.BytesIO(src.data), map_location=device)
    except Exception as exc:
        raise InputError(f"corrupt TorchScript archive: {first_line(exc)}", where=src.name) from None
    # inference semantics: dropout off, batch norm on running statistics
    module.eval()
    names = tuple(a.name for a in module.forward.schema.arguments[1:])
    return LoadedModel(module, ModelInfo(src.name, "torchscript", arg_names=names))


def _placeholder_shapes(ep) -> tuple[tuple[tuple[int | None, ...], ...], int | None]:
    """Expected user-input shapes of an exported program, and its static batch size."""
    user = set(ep.graph_signature.user_inputs)
    shapes, static = [], None
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            shapes.append(())
            continue
        shape = tuple(s if isinstance(s, int) else None for s in val.shape)
        shapes.append(shape)
        if shape and shape[0] is not None and static is None:
            static = shape[0]
    if any(s and s[0] is None for s in shapes):
        static = None
    return tuple(shapes), static


def _load_export(src: Source, device: torch.device) -> LoadedModel:
    try:
        ep = torch.export.load(io.BytesIO(src.data))
    except Exception as exc:
        raise InputError(f"corrupt torch.export archive: {first_line(exc)}", where=src.name) from None
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, device)
    shapes, static = _placeholder_shapes(ep)
    notes = ()
    if static is not None:
        notes = (
            f"exported for batch size {static} only; jaccli pads chunks to that size "
            "(export with dynamic_shapes={...: {0: Dim('batch')}} to lift it)",
        )
    info = ModelInfo(
        src.name,
        "export",
        arg_names=tuple(ep.graph_signature.user_inputs),
        arg_shapes=shapes,
        static_batch=static,
        notes=notes,
    )
    return LoadedModel(ep.module(), info)


def _refuse_pickle(src: Source, device: torch.device) -> LoadedModel:
    raise InputError(
        "is a torch.save file; a pickled model cannot be loaded without running arbitrary code",
        where=src.name,
        hint="save the model with torch.export (.pt2), TorchScript, or as safetensors weights",
    )


#: model format -> loader; the format comes from :func:`archive_kind`
LOADERS: dict[str, Callable[[Source, torch.device], LoadedModel]] = {
    "torchscript": _load_torchscript,
    "export": _load_export,
    "torch": _refuse_pickle,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable :class:`torch.device`, or a clear error naming what is available."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(
            "unknown device", expected="cpu, cuda, cuda:N or mps", got=str(device)
        ) from None
    checks = {
        "cpu": lambda d: True,
        "cuda": lambda d: torch.cuda.is_available()
        and (d.index is None or d.index < torch.cuda.device_count()),
        "mps": lambda d: torch.backends.mps.is_available(),
    }
    if dev.type not in checks:
        raise UsageError("unsupported device", expected="cpu, cuda, cuda:N or mps", got=str(device))
    if not checks[dev.type](dev):
        available = ["cpu"]
        if torch.cuda.is_available():
            available += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if torch.backends.mps.is_available():
            available.append("mps")
        raise ResourceError(
            "device is not available on this machine",
            expected="one of " + ", ".join(available),
            got=str(device),
        )
    return dev


def load_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load a saved model as a callable :class:`LoadedModel` (an ``nn.Module``).

    TorchScript archives (``torch.jit.save``) and ``torch.export`` programs
    (``torch.export.save``, usually ``.pt2``) are recognised by content. The model
    is put in eval mode where the format allows and its parameters stop requiring
    gradients (jaccli differentiates with respect to inputs only).

    Both formats contain code that runs when the model runs: load only trusted files.

    >>> import torch, tempfile, os, jaccli
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> p = os.path.join(tempfile.mkdtemp(), "net.pt2")
    >>> torch.export.save(torch.export.export(net, (torch.zeros(4, 3),)), p)
    >>> model = jaccli.load_model(p)
    >>> model.info.format, model.info.static_batch
    ('export', 4)
    """
    dev = resolve_device(device)
    want = resolve_dtype(dtype)
    src = read_source(path, what="model file")
    kind = archive_kind(src.data)
    if kind is None:
        raise InputError(
            "not a model archive jaccli can load",
            where=src.name,
            expected="a TorchScript archive or a torch.export .pt2 program",
        )
    model = LOADERS[kind](src, dev)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device=dev)
    if want is not None:
        model.to(dtype=want)
    return model


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


def describe_expected_input(model: Callable) -> str | None:
    """``[*, 3]`` from an exported signature (``*`` for dynamic sizes), if known."""
    shapes = info_of(model).arg_shapes
    if not shapes or shapes[0] is None:
        return None
    return "[" + ", ".join("*" if s is None else str(s) for s in shapes[0]) + "]"
