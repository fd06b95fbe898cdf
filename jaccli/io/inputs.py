"""The model's arguments from files: ``INPUT``, ``--key`` and ``--input NAME=FILE[:KEY]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from jaccli.request.choices import STDIO
from jaccli.errors import InputError, UsageError
from jaccli.io.read import _pick, load_tensors


@dataclass(frozen=True)
class InputSpec:
    """``NAME=FILE[:KEY]`` from ``--input``."""

    name: str
    path: str
    key: str | None = None

    @classmethod
    def parse(cls, spec: str) -> InputSpec:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise UsageError("bad --input", expected="NAME=FILE or NAME=FILE:KEY", got=spec)
        path, key = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and head and "/" not in tail and not os.path.exists(rest):  # False for a name too long, too
            path, key = head, tail
        return cls(name, path, key)


def gather_inputs(
    path: str | None,
    specs: list[str] | tuple[str, ...] = (),
    *,
    key: str | None = None,
    arg_names: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:
    """Collect the model's inputs from the positional INPUT file and ``--input`` specs.

    Returns the tensors by argument name, the file each came from, and whether the
    model is to be called positionally (one unnamed tensor) or by keyword. A file
    with several tensors maps them to the model's arguments by name.
    """
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    positional = False
    if path is not None:
        found = load_tensors(path)
        shown = "<stdin>" if os.fspath(path) == STDIO else os.fspath(path)
        if key is not None or len(found) == 1:
            label = arg_names[0] if arg_names else "input"
            tensors[label] = _pick(found, key, shown)
            sources[label] = shown if key is None else f"{shown}:{key}"
            positional = True
        else:
            names = sorted(found)
            if len(arg_names) <= 1 or not set(arg_names) <= set(found):
                want = "--key with one of " if len(arg_names) <= 1 else "tensors named "
                raise InputError(
                    "holds several tensors; cannot tell which the model takes",
                    where=shown,
                    expected=want + ", ".join(arg_names if len(arg_names) > 1 else names),
                    got=", ".join(names),
                )
            for name in arg_names:
                tensors[name] = found[name]
                sources[name] = f"{shown}:{name}"
    for raw in specs:
        spec = InputSpec.parse(raw)
        if spec.name in tensors:
            raise UsageError("input given twice", got=spec.name)
        if arg_names and spec.name not in arg_names:
            raise UsageError(
                "the model has no such argument", expected="one of " + ", ".join(arg_names), got=spec.name
            )
        tensors[spec.name] = _pick(load_tensors(spec.path), spec.key, spec.path)
        sources[spec.name] = spec.path if spec.key is None else f"{spec.path}:{spec.key}"
        positional = False
    if not tensors:
        raise UsageError("no input given", expected="an INPUT file or --input NAME=FILE")
    if len(tensors) > 1 and positional:
        positional = False
    return tensors, sources, positional
