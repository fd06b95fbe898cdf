"""Loading saved models into callables the derivative engine can use.

A model file is recognised by its content; each format is a row of :data:`LOADERS`.
TorchScript and ``torch.export`` archives contain code that runs when the model
runs: load them only from sources you trust (safetensors weights are the safe route).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from jaccli.load.cast import cast_model
from jaccli.errors import first_line, InputError, ModelError, ResourceError, shape_str, UsageError
from jaccli.io.archives import verify_archive
from jaccli.io import (
    Source,
    archive_kind,
    is_safetensors,
    read_source,
    read_torch_object,
    resolve_dtype,
    safetensors_metadata,
)


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


# --------------------------------------------------------------------------- weights + architecture


class Sine(nn.Module):
    """sin as a layer: the activation of SIREN-style physics-informed networks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


#: activation name -> layer, for the built-in MLP family (default parameters only)
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "sin": Sine,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
}

#: keys of the safetensors metadata that describe a built-in MLP (values are strings)
MLP_METADATA = {
    "jaccli.arch": "always 'mlp'",
    "jaccli.sizes": "JSON list of layer widths, input first: [1, 50, 50, 50, 501]",
    "jaccli.activation": "one of " + ", ".join(ACTIVATIONS),
    "jaccli.bias": "'true' or 'false': whether the linear layers have biases",
}


@dataclass(frozen=True)
class Arch:
    """How to build the module for a weights-only file (safetensors or a state dict).

    ``spec`` is ``"mlp"`` (widths inferred from the weights, ``activation`` required)
    or ``"path/to/file.py:factory"`` / ``"package.module:factory"``, a function called
    with ``kwargs`` that returns the ``nn.Module`` — that imports and runs user code.
    """

    spec: str | None = None
    activation: str | None = None
    kwargs: Mapping[str, object] = field(default_factory=dict)


def build_mlp(sizes: list[int], activation: str, bias: bool = True) -> nn.Sequential:
    """``Linear, act, Linear, act, …, Linear`` with state-dict keys ``0.weight``, ``0.bias``, ``2.weight``, …"""
    if activation not in ACTIVATIONS:
        raise UsageError("unknown activation", expected="one of " + ", ".join(ACTIVATIONS), got=activation)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _mlp_sizes(state: Mapping[str, torch.Tensor], where: str) -> tuple[list[int], bool]:
    """Layer widths and whether there are biases, from ``nn.Sequential`` state-dict keys."""
    weights = sorted(
        (int(m.group(1)), t) for k, t in state.items() if (m := re.fullmatch(r"(\d+)\.weight", k))
    )
    if not weights or [i for i, _ in weights] != list(range(0, 2 * len(weights), 2)):
        raise InputError(
            "does not look like an nn.Sequential MLP",
            where=where,
            expected="keys 0.weight, 2.weight, 4.weight, … (Linear layers between activations)",
            got=", ".join(sorted(state)[:6]) + (" …" if len(state) > 6 else ""),
        )
    sizes = [weights[0][1].shape[1]] + [t.shape[0] for _, t in weights]
    return sizes, any(k.endswith(".bias") for k in state)


def _check_declared_mlp(sizes: list[int], bias: bool, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Compare the widths the metadata declares with the weights before building anything:
    metadata claiming a network of gigabytes must not allocate it to find the mismatch."""
    if len(sizes) < 2 or min(sizes) < 1:
        raise InputError("bad jaccli metadata: jaccli.sizes", where=where, expected="two or more positive widths", got=sizes[:8])
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        for key, want in ((f"{2 * i}.weight", (b, a)), (f"{2 * i}.bias", (b,) if bias else None)):
            t = state.get(key)
            got = None if t is None else tuple(t.shape)
            if got != want:
                raise ModelError(
                    "the weights do not match the network the file's metadata declares",
                    where=where,
                    expected=f"{key} {'absent' if want is None else shape_str(want)}",
                    got="none" if got is None else shape_str(got),
                )


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    """The function named by ``file.py:name`` or ``package.module:name`` (runs that code)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise UsageError("bad --arch", expected="mlp, path/to/file.py:factory or package.module:factory", got=spec)
    try:
        if target.endswith(".py") or os.sep in target:
            path = Path(target)
            if not path.is_file():
                raise InputError("no such architecture file", where=target)
            module_name = f"jaccli_arch_{abs(hash(str(path.resolve())))}"
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except (InputError, UsageError):
        raise
    except Exception as exc:
        raise ModelError(f"importing the architecture failed: {first_line(exc)}", where=target) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{target} has no function {name!r}", where=spec)
    return factory


def _build(arch: Arch, state: Mapping[str, torch.Tensor], meta: Mapping[str, str], where: str):
    """The module for ``state`` (from ``arch``, else from jaccli metadata) and its format name."""
    if arch.spec is None and meta.get("jaccli.arch") == "mlp":
        try:
            sizes = json.loads(meta["jaccli.sizes"])
            activation = meta["jaccli.activation"]
            bias = meta.get("jaccli.bias", "true") == "true"
        except (KeyError, ValueError, TypeError, RecursionError) as exc:
            raise InputError(f"bad jaccli metadata: {first_line(exc)[:200]}", where=where,
                             expected="; ".join(f"{k}: {v}" for k, v in MLP_METADATA.items())) from None  # fmt: skip
        if not isinstance(sizes, list) or not all(type(v) is int for v in sizes):  # 1e400 is a float: inf
            raise InputError("bad jaccli metadata: jaccli.sizes is not a list of whole numbers", where=where,
                             expected=MLP_METADATA["jaccli.sizes"], got=meta["jaccli.sizes"][:80])  # fmt: skip
        _check_declared_mlp(sizes, bias, state, where)
        return build_mlp(sizes, activation, bias), "safetensors-mlp", False
    if arch.spec is None:
        raise UsageError(
            "holds weights only; say how to build the model",
            where=where,
            expected="--arch mlp --activation NAME, or --arch file.py:factory",
        )
    if arch.spec == "mlp":
        if arch.activation is None:
            raise UsageError("--arch mlp needs --activation", expected="one of " + ", ".join(ACTIVATIONS))
        sizes, bias = _mlp_sizes(state, where)
        return build_mlp(sizes, arch.activation, bias), "mlp-weights", False
    module = _import_factory(arch.spec)(**dict(arch.kwargs))
    if not isinstance(module, nn.Module):
        raise ModelError("the --arch factory did not return an nn.Module", where=arch.spec, got=type(module).__name__)
    return module, "weights+arch", True


def _load_weights(src: Source, state: Mapping[str, torch.Tensor], meta, arch: Arch | None) -> LoadedModel:
    module, fmt, runs_code = _build(arch or Arch(), state, meta, src.name)
    missing, unexpected = _key_mismatch(module, state)
    if missing or unexpected:
        raise ModelError(
            "the weights do not match the architecture",
            where=src.name,
            expected="missing: " + (", ".join(missing) or "none"),
            got="unexpected: " + (", ".join(unexpected) or "none"),
        )
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # load_state_dict would round float64 weights into float32 parameters
        module.to(dtypes.pop())
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:  # same keys, other shapes
        found = re.findall(
            r"size mismatch for (\S+): copying a param with shape torch.Size\(\[(.*?)\]\) from "
            r"checkpoint, the shape in current model is torch.Size\(\[(.*?)\]\)",
            str(exc),
        )
        shown = "; ".join(f"{k} [{a}] in the file, [{b}] in the model" for k, a, b in found[:3])
        more = f" … ({len(found)} in all)" if len(found) > 3 else ""
        raise ModelError(
            "the weights do not match the architecture: " + (shown + more if found else first_line(exc)),
            where=src.name,
        ) from None
    module.eval()
    return LoadedModel(module, ModelInfo(src.name, fmt, runs_code=runs_code))


def _key_mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(module.state_dict())
    given = set(state)
    return sorted(expected - given), sorted(given - expected)


def _load_safetensors(src: Source, device: torch.device, arch: Arch | None) -> LoadedModel:
    from safetensors.torch import load as st_load

    try:
        state = st_load(src.data)
    except Exception as exc:
        raise InputError(f"corrupt .safetensors: {first_line(exc)}", where=src.name) from None
    return _load_weights(src, state, safetensors_metadata(src.data), arch)


def _load_state_dict(src: Source, device: torch.device, arch: Arch | None) -> LoadedModel:
    try:
        obj = read_torch_object(src)
    except InputError as exc:
        if "arbitrary code" in str(exc):
            raise InputError(
                "is a pickled model; loading it would run arbitrary code",
                where=src.name,
                hint="save it with torch.export (.pt2), TorchScript, or its weights as safetensors",
            ) from None
        raise
    # training checkpoints often nest the weights
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise InputError("holds no state dict", where=src.name, expected="a dict of tensors", got=type(obj).__name__)
    return _load_weights(src, obj, {}, arch)


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


def save_mlp(model: nn.Sequential, path: str | os.PathLike, *, force: bool = False) -> None:
    """Save an ``nn.Sequential`` of ``Linear`` and activation layers as a self-describing safetensors file.

    The file needs no code to load: :func:`load_model` rebuilds the network from
    the metadata keys in :data:`MLP_METADATA`.

    >>> import torch, tempfile, os, jaccli
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> p = os.path.join(tempfile.mkdtemp(), "net.safetensors")
    >>> jaccli.save_mlp(net, p)
    >>> jaccli.load_model(p).info.format
    'safetensors-mlp'
    """
    from jaccli.io import save_tensors

    layers = list(model.children()) if isinstance(model, nn.Sequential) else []
    linears, acts = layers[0::2], layers[1::2]
    names = {cls: name for name, cls in ACTIVATIONS.items()}
    ok = bool(linears) and all(isinstance(l, nn.Linear) for l in linears) and len(acts) == len(linears) - 1
    act_names = {names.get(type(a)) for a in acts}
    if not ok or None in act_names or len(act_names) > 1:
        raise UsageError(
            "save_mlp takes an nn.Sequential of Linear layers with one activation between them",
            expected="activation one of " + ", ".join(ACTIVATIONS),
            got=" -> ".join(type(m).__name__ for m in layers) or type(model).__name__,
        )
    activation = act_names.pop() if act_names else "tanh"
    if any(repr(a) != repr(ACTIVATIONS[activation]()) for a in acts):
        raise UsageError("save_mlp keeps only default activation parameters", got=repr(acts[0]))
    bias = all(l.bias is not None for l in linears)
    if not bias and any(l.bias is not None for l in linears):
        raise UsageError("save_mlp needs biases on all Linear layers or on none")
    sizes = [linears[0].in_features] + [l.out_features for l in linears]
    meta = {"jaccli.arch": "mlp", "jaccli.sizes": json.dumps(sizes), "jaccli.activation": activation, "jaccli.bias": json.dumps(bias)}
    save_tensors(path, dict(model.state_dict()), metadata=meta, force=force)


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
    :func:`save_mlp` (they describe their network), and weights only — safetensors
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
