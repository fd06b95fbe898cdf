"""Typer's option coercion for plain values, without pydantic.

Typer (0.26 on) coerces every option value through a pydantic ``TypeAdapter``, built when
the value is first processed: importing pydantic and building the adapters costs 0.05-0.12 s
of every command's start. jaccli's options are strings, ints, floats, choices and lists of
strings, whose well-formed values need no pydantic: :func:`install` gives each such
parameter a coercion that converts them directly and hands anything else (a malformed
number, a choice in other case, a type it does not know) to Typer's own, so that what is
accepted and every error message stay Typer's.

It sets Typer's per-parameter cache (``_TyperParameter._runtime_param``), a private name:
against a Typer without it, :func:`install` does nothing and Typer coerces as it always did.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

try:
    from typer._coercion import RuntimeParam, build_runtime_param
except ImportError:  # pragma: no cover - a Typer before 0.26 (Click's types) or after a rename
    RuntimeParam = build_runtime_param = None

#: values Python's int() and float() read exactly as pydantic's lax mode does
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


class _Unsure(Exception):
    """A value the direct conversion leaves to Typer's coercion."""


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _Unsure


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    raise _Unsure


def _float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        return float(value)
    raise _Unsure


def _choice(choices: tuple) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, str) and value in choices:
            return value
        raise _Unsure

    return convert


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Unsure


def _optional_arg(annotation: Any) -> Any:
    """``X`` of ``Optional[X]`` (``X | None``); ``annotation`` itself otherwise."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def converter(annotation: Any) -> Callable[[Any], Any] | None:
    """A direct conversion for values of ``annotation``, or None where Typer must coerce."""
    annotation = _optional_arg(annotation)
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (None,)
        one = converter(item) if item is not None else None
        if one is None:
            return None

        def many(value: Any) -> list:
            if not isinstance(value, (list, tuple)):
                raise _Unsure
            return [one(v) for v in value]

        return many
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return _choice(choices) if all(isinstance(c, str) for c in choices) else None
    return {str: _str, int: _int, float: _float, bool: _bool}.get(annotation)


if RuntimeParam is not None:

    @dataclass(frozen=True)
    class _Direct(RuntimeParam):
        """Coercion by :func:`converter`, and by Typer's own for what it leaves."""

        convert: Callable[[Any], Any] = _str

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                return self.convert(value)
            except _Unsure:
                return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)


def install(command: Any, ctx: Any) -> None:
    """Give every parameter of ``command`` whose values :func:`converter` knows the direct coercion
    (its help option too, which ``get_params`` makes and caches on first use)."""
    if RuntimeParam is None:
        return
    for param in command.get_params(ctx):
        desc = getattr(param, "type_descriptor", None)
        if desc is None or getattr(param, "_runtime_param", ...) is not None:
            continue  # not a Typer parameter of this Typer, or already coerced
        info = desc.parameter_info
        if desc.is_file or desc.is_ranged or desc.is_datetime or desc.is_path or info.parser is not None:
            continue
        if getattr(info, "click_type", None) is not None:
            continue
        convert = converter(desc.annotation)
        if convert is not None:
            param._runtime_param = _Direct(parameter_info=info, annotation=desc.annotation, convert=convert)
