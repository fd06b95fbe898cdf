"""What the CLI's MODEL, INPUT and loading options become: a model and its arguments.

Imports the core lazily (inside the functions) so that the CLI's start-up stays torch-free.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape

import jaccli

from jaccli.cli import collector
from jaccli.errors import UsageError
from jaccli.request.spec import Source


def err_console() -> Console:
    """Rich output on stderr, where warnings, notes and errors go."""
    return Console(stderr=True, soft_wrap=True, highlight=False)


@contextmanager
def collect_warnings(collected: list[str], *, show: bool = True):
    """Show warnings as yellow lines on stderr (unless ``show`` is false: the other ranks
    of a torchrun job) and keep their text for --json."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            err = err_console()
            seen = set()
            for w in caught:
                text = str(w.message)
                if text in seen:
                    continue
                seen.add(text)
                collected.append(text)
                if show:
                    err.print(f"[bold yellow]warning:[/] {escape(text)}")


def arch_kwargs(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError("--arch-kwargs is not JSON", expected='an object like {"width": 64}', got=f"{text[:200]} ({exc.msg})") from None
    except RecursionError:
        raise UsageError("--arch-kwargs is nested too deeply", expected='an object like {"width": 64}', got=f"{len(text)} characters") from None
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object", got=text)
    return value


def load_model_option(source: Source, dev, dtype=None):
    load_model = jaccli.load_model  # a lazy attribute: imports torch and the loaders, start-up's objects
    collector.resume()  # before the load, whose garbage (a .pt2's graphs) must not be frozen
    return load_model(
        source.model, device=dev, dtype=dtype, arch=source.arch, activation=source.activation,
        arch_kwargs=arch_kwargs(source.arch_kwargs),
    )  # fmt: skip


def load_request(source: Source, wrt=None):
    """Model and inputs on one device and dtype; returns (model, args, sources, wrt)."""
    from jaccli.io import DTYPES, as_float, gather_inputs, resolve_dtype
    from jaccli.load.cast import cast_model
    from jaccli.load.loaders import resolve_device
    from jaccli.load.models import info_of

    input, inputs, key, device, dtype = source.input, source.inputs, source.key, source.device, source.dtype
    dev = resolve_device(device)
    want = resolve_dtype(dtype)
    net = load_model_option(source, dev)
    names = info_of(net).arg_names
    tensors, sources, positional = gather_inputs(input, inputs or (), key=key, arg_names=names)
    wrt_names = list(wrt) if wrt else None
    diff = wrt_names or list(tensors)[:1]
    if want is None:
        first = tensors.get(diff[0])
        want = first.dtype if first is not None and first.dtype in DTYPES.values() else DTYPES["float32"]
    cast = {}
    for name, t in tensors.items():
        if name in diff or t.is_floating_point() or t.is_complex():
            t = as_float(t, where=sources[name]).to(want)  # warns when the data were not float
        cast[name] = t.to(dev)
    cast_model(net, want, info_of(net).path)
    args = next(iter(cast.values())) if positional else cast
    return net, args, sources, wrt_names


def model_meta(net, path: str) -> dict:
    from jaccli.load.models import count_parameters, info_of

    info = info_of(net)
    return {"path": path, "format": info.format, "parameters": count_parameters(net)}


def input_meta(args, sources: dict[str, str]) -> dict[str, dict]:
    tensors = args if isinstance(args, dict) else {next(iter(sources)): args}
    return {
        name: {
            "path": sources[name],
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
        }
        for name, t in tensors.items()
    }
