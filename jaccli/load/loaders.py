"""Loading saved models: a model file recognised by its content, one row of :data:`LOADERS` a
format, and :func:`load_model`; the TorchScript and ``torch.export`` loaders (weights-only files
are :mod:`.weights`').

TorchScript and ``torch.export`` archives contain code that runs when the model
runs: load them only from sources you trust (safetensors weights are the safe route).

Imports: torch, :mod:`.models` (the wrapper), :mod:`.weights`, :mod:`.cast`, :mod:`jaccli.io`,
:mod:`jaccli.errors`.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch

from jaccli.load.cast import cast_model
from jaccli.load.models import LoadedModel, ModelInfo
from jaccli.load.weights import Arch, _load_safetensors, _load_state_dict
from jaccli.errors import first_line, InputError, ResourceError, UsageError
from jaccli.io.archives import verify_archive
from jaccli.io import (
    Source,
    archive_kind,
    is_safetensors,
    read_source,
    resolve_dtype,
)


class _Captured(logging.Handler):
    """Keeps what a logger says instead of printing it: torch.export logs the reason a load
    failed, traceback and all, on stderr, and raises an error that only points to it."""

    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += logging.Formatter().format(record) + "\n"

    @contextmanager
    def of(self, name: str):
        logger = logging.getLogger(name)
        handlers, propagate = logger.handlers, logger.propagate
        logger.handlers, logger.propagate = [self], False
        try:
            yield
        finally:
            logger.handlers, logger.propagate = handlers, propagate


def _unregistered_op(src: Source, text: str) -> InputError | None:
    """A model that calls a custom op no library in this process has registered."""
    m = re.search(r"Unknown builtin op: (\w+)::(\w+)", text) or re.search(r"resolve torch\.ops\.(\w+)\.(\w+)", text)
    if m is None:
        return None
    return InputError(
        f"the model calls the custom op {m[1]}::{m[2]}, which no library loaded here defines",
        where=src.name,
        hint="import the library that registers it, then load the model in Python (jaccli.load_model); "
        "the command line cannot import it",
    )


def _load_torchscript(src: Source, device: torch.device, arch: Arch | None) -> LoadedModel:
    _no_arch(src, arch)
    verify_archive(src.data, src.name)  # torch checks no CRC: damaged weights would load and compute
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still loads
            module = torch.jit.load(io.BytesIO(src.data), map_location=device)
    except Exception as exc:
        raise _unregistered_op(src, str(exc)) or InputError(
            f"corrupt TorchScript archive: {first_line(exc)}", where=src.name
        ) from None
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


def _load_export(src: Source, device: torch.device, arch: Arch | None) -> LoadedModel:
    _no_arch(src, arch)
    verify_archive(src.data, src.name)
    log = _Captured()
    try:
        with log.of("torch.export"):
            ep = torch.export.load(io.BytesIO(src.data))
    except Exception as exc:
        raise _unregistered_op(src, log.text) or InputError(
            f"corrupt torch.export archive: {first_line(exc)}", where=src.name
        ) from None
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


def _no_arch(src: Source, arch: Arch | None) -> None:
    if arch is not None and arch.spec is not None:
        raise UsageError(
            "--arch applies to weights files (safetensors, state dicts), not to a saved program",
            where=src.name,
        )


def model_kind(data: bytes, name: str = "<model>") -> str | None:
    """The model format of a file's bytes, or None (a damaged zip archive: an InputError naming ``name``)."""
    kind = archive_kind(data, name)
    if kind is not None:
        return kind
    if is_safetensors(data):
        return "safetensors"
    if data[:1] == b"\x80":  # legacy (non-zip) torch.save
        return "torch"
    return None


#: model format -> loader; the format comes from :func:`model_kind`
LOADERS: dict[str, Callable[[Source, torch.device, Arch | None], LoadedModel]] = {
    "torchscript": _load_torchscript,
    "export": _load_export,
    "safetensors": _load_safetensors,
    "torch": _load_state_dict,
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
    arch: Arch | str | None = None,
    activation: str | None = None,
    arch_kwargs: Mapping[str, object] | None = None,
) -> LoadedModel:
    """Load a saved model as a callable :class:`LoadedModel` (an ``nn.Module``).

    Recognised by content: TorchScript archives (``torch.jit.save``), ``torch.export``
    programs (``torch.export.save``, usually ``.pt2``), safetensors files written by
    :func:`~.weights.save_mlp` (they describe their network), and weights only — safetensors
    or a ``torch.save`` state dict — with ``arch="mlp", activation=...`` (widths
    inferred) or ``arch="file.py:factory"`` (called with ``arch_kwargs``). The model
    is put in eval mode where the format allows and its parameters stop requiring
    gradients (jaccli differentiates with respect to inputs only).

    TorchScript and export archives and ``arch`` factories run code: load only
    trusted files. Safetensors weights with the built-in MLP run none.

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
    src = read_source(path, what="model file", binary_only=True)
    kind = model_kind(src.data, src.name)
    if kind is None:
        raise InputError(
            "not a model file jaccli can load",
            where=src.name,
            expected="a TorchScript archive, a torch.export .pt2 program, safetensors or a state dict",
        )
    if isinstance(arch, str) or activation is not None or arch_kwargs:
        spec = arch.spec if isinstance(arch, Arch) else arch
        arch = Arch(spec, activation, dict(arch_kwargs or {}))
    model = LOADERS[kind](src, dev, arch)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device=dev)
    if want is not None:
        cast_model(model, want, src.name)
    return model
