"""jaccli's pydantic-free option coercion (jaccli/cli/coerce.py) gives what Typer's own gives:
the same value for every input Typer accepts, and Typer's own error for every one it refuses."""

# no `from __future__ import annotations`: the test apps' annotations must be objects for Typer
from typing import Literal, Optional

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st

from jaccli.cli import coerce
from jaccli.cli.main import app

pytest.importorskip("typer._coercion")  # the Typer whose coercion coerce.py stands in for


def _params():
    """Every Typer parameter of every jaccli command (fresh objects: nothing coerced yet)."""
    group = typer.main.get_command(app)
    with group.make_context("jaccli", ["--help"], resilient_parsing=True) as ctx:
        yield group, ctx
        for cmd in group.commands.values():
            yield cmd, ctx


def test_every_jaccli_option_gets_the_direct_coercion():
    missing = []
    for command, ctx in _params():
        coerce.install(command, ctx)
        for p in command.get_params(ctx):
            if not isinstance(p._runtime_param, coerce._Direct):
                missing.append(f"{command.name} {p.name}: {p.type_descriptor.annotation}")
    assert not missing, missing


def typer_says(annotation, value):
    """What Typer's own (pydantic) coercion makes of ``value``: the value, or the error text."""
    from typer._click import Context
    from typer._click.exceptions import BadParameter

    cmd = typer.main.get_command(_one_option_app(annotation))
    with Context(cmd) as ctx:
        param = next(p for p in cmd.params if p.name == "v")
        try:
            return "ok", param.get_runtime_param().coerce(value, param=param, ctx=ctx)
        except BadParameter as exc:
            return "error", exc.format_message()


def ours(annotation, value):
    from typer._click import Context
    from typer._click.exceptions import BadParameter

    cmd = typer.main.get_command(_one_option_app(annotation))
    with Context(cmd) as ctx:
        coerce.install(cmd, ctx)
        param = next(p for p in cmd.params if p.name == "v")
        assert isinstance(param._runtime_param, coerce._Direct)
        try:
            return "ok", param.get_runtime_param().coerce(value, param=param, ctx=ctx)
        except BadParameter as exc:
            return "error", exc.format_message()


def _one_option_app(annotation):
    one = typer.Typer()

    @one.command()
    def main(v: annotation = None):  # noqa: ARG001
        pass

    return one


NUMBERS = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, width=64).map(repr),
    st.sampled_from(["+5", "-0", "007", " 5", "1_000", "5.0", "1.", ".5", "1e-6", "-2E+3", "inf", "nan", "", "abc", "1e", "0x10"]),
    st.text(alphabet="0123456789+-.eE_ x", max_size=8),
)
TYPES = [int, float, str, Optional[int], Optional[float], Optional[str], Literal["auto", "forward", "reverse"]]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TYPES), st.one_of(NUMBERS, st.sampled_from(["auto", "Auto", "forward ", "reverse"])))
def test_same_value_or_same_error_as_typer(annotation, value):
    want, got = typer_says(annotation, value), ours(annotation, value)
    assert repr(got) == repr(want)  # repr: exact for floats, and nan equals nan
    if want[0] == "ok":
        assert type(got[1]) is type(want[1])


@settings(max_examples=100, deadline=None)
@given(st.lists(NUMBERS, max_size=3).map(tuple), st.sampled_from([Optional[list[str]], list[int], list[float]]))
def test_lists_the_same_as_typer(values, annotation):
    assert repr(ours(annotation, values)) == repr(typer_says(annotation, values))


def test_a_type_it_does_not_know_is_left_to_typer():
    from pathlib import Path

    assert coerce.converter(Path) is None and coerce.converter(list[Path]) is None
    assert coerce.converter(Literal[1, 2]) is None
