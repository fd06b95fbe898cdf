"""The ``jaccli partials`` command: named partial derivatives and residual gates for CI.

A Typer command whose options become one :class:`~jaccli.request.spec.Request`, run by
:func:`jaccli.cli.run.partials` (the path every command shares); registered by
:mod:`jaccli.cli.main`. Torch-free at import like the rest of the CLI.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from jaccli.cli.options import (
    Activation, Arch, ArchKwargs, ChunkSize, CompileOpt, Device, Digits, Dtype, Force, InputArg, Inputs, Json, Key, MaxInputBytes,
    ModelArg, NoBatchCheck, Output, PerSample, PlotFile, Quiet, Save, Select, Strict, Summary, Verbose, Wrt,
)  # fmt: skip
from jaccli.cli.run import check_early
from jaccli.request.choices import DEFAULT_DIGITS
from jaccli.request.kinds import kind
from jaccli.request.names import parse_limits, requested_names
from jaccli.request.spec import Derivative, Request, Selection, Source
from jaccli.request.spec import Output as OutputOptions


def partials_command(
    model: ModelArg,
    input: InputArg = None,
    want: Annotated[
        Optional[list[str]],
        typer.Option("--want", "-w", help="Terms (u_x,u_xx) and NAME = EXPR; repeat or separate terms by commas.", show_default=False),
    ] = None,
    in_: Annotated[
        Optional[str], typer.Option("--in", help="Names of the input components of one point, e.g. t,x \\[default: x or x0,x1,…]", show_default=False)
    ] = None,
    out: Annotated[
        Optional[str], typer.Option("--out", help="Names of the output components, or one name for the whole output \\[default: u]", show_default=False)
    ] = None,
    fail_above: Annotated[
        Optional[list[str]],
        typer.Option("--fail-above", help="NAME=TOL: exit 9 when max |NAME| exceeds TOL (repeatable).", show_default=False),
    ] = None,
    per_sample: PerSample = False,
    device: Device = "cpu",
    dtype: Dtype = None,
    chunk_size: ChunkSize = None,
    compile_: CompileOpt = "auto",
    save: Save = None,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    key: Key = None,
    inputs: Inputs = None,
    wrt: Wrt = None,
    output: Output = None,
    select: Select = None,
    strict: Strict = False,
    no_batch_check: NoBatchCheck = False,
    verbose: Verbose = False,
    arch: Arch = None,
    activation: Activation = None,
    arch_kwargs: ArchKwargs = None,
    max_input_bytes: MaxInputBytes = None,
    show: Annotated[int, typer.Option(help="Points whose values the table shows.")] = 3,
    digits: Digits = DEFAULT_DIGITS,
    summary: Summary = False,
    plot: PlotFile = None,
) -> None:
    from jaccli.errors import UsageError

    if not want:
        raise UsageError("nothing to compute", expected="--want with terms like u_x or NAME = EXPR")
    limits = parse_limits(fail_above or (), requested_names(want))
    req = Request(
        Source(model, input, tuple(inputs or ()), key, device, dtype, arch, activation, arch_kwargs),
        Derivative(
            kind("partials"), per_sample=per_sample, wrt=tuple(wrt) if wrt else None, output=output,
            select=Selection.parse(select), chunk_size=chunk_size, check_batch=not no_batch_check, strict=strict,
            want=tuple(want), in_names=in_, out_names=out, limits=tuple(limits.items()), compile=compile_,
        ),
        OutputOptions(save=save, force=force, json=json_, quiet=quiet, verbose=verbose, show=show, digits=digits,
                      summary=summary, plot=plot),
    )  # fmt: skip
    check_early(req)
    from jaccli.cli import run

    run.partials(req)
