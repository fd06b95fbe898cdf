"""Weights-only model files (safetensors, ``torch.save`` state dicts) and the module built
for them: ``--arch mlp`` / jaccli's own metadata (the built-in MLP family, :func:`save_mlp`)
or a user's ``file.py:factory``; rows ``safetensors`` and ``torch`` of :data:`~.loaders.LOADERS`.

Imports: torch, safetensors (on use), :mod:`.models` (the wrapper), :mod:`jaccli.io`,
:mod:`jaccli.errors`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from jaccli.errors import first_line, InputError, ModelError, shape_str, UsageError
from jaccli.io import Source, read_torch_object, safetensors_metadata
from jaccli.load.models import LoadedModel, ModelInfo


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


def save_mlp(model: nn.Sequential, path: str | os.PathLike, *, force: bool = False) -> None:
    """Save an ``nn.Sequential`` of ``Linear`` and activation layers as a self-describing safetensors file.

    The file needs no code to load: :func:`~.loaders.load_model` rebuilds the network from
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
