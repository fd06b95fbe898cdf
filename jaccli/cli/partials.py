"""The ``jaccli partials`` command: named partial derivatives and residual gates for CI.

A Typer command over :func:`jaccli.partials`; registered by :mod:`jaccli.cli.main`. Torch-free
at import like the rest of the CLI.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import typer
from rich.console import Console

import jaccli

from jaccli.request.choices import DEFAULT_DIGITS, STDIO
from jaccli.cli.inputs import collect_warnings, err_console, input_meta, load_request, model_meta
from jaccli.cli.options import (
    Activation, Arch, ArchKwargs, ChunkSize, Device, Digits, Dtype, Force, InputArg, Inputs, Json, Key, MaxInputBytes,
    ModelArg, NoBatchCheck, Output, PerSample, Quiet, Save, Strict, Verbose, Wrt,
)  # fmt: skip
from jaccli.errors import GateFailed, UsageError
from jaccli.request.names import parse_limits, requested_names

EXAMPLE = 'jaccli partials examples/models/heat.pt examples/models/heat_x.npy -p --in t,x --want "r = u_t - 0.1*u_xx" --fail-above r=1e-4'

HELP = (
    "Named partial derivatives of any order (u_x, u_txx, v_xxxx) and expressions over them, "
    "with --fail-above gates for CI.\n\n"
    "--in names the input components of one point, --out the output components (one name for "
    "the whole output vector). A term is OUT_ then input names (u_txx = ∂³u/∂t∂x²; "
    "'_'-separated when an input name is longer than one letter: u_x0_x1). --want also takes "
    "NAME = EXPR over terms, numbers, pi, + - * / ** and sin cos tan exp log sqrt tanh abs. "
    f"--fail-above NAME=TOL exits with code 9 when max |NAME| over the points exceeds TOL.\n\nExample: {EXAMPLE}"
)


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
    save: Save = None,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    key: Key = None,
    inputs: Inputs = None,
    wrt: Wrt = None,
    output: Output = None,
    strict: Strict = False,
    no_batch_check: NoBatchCheck = False,
    verbose: Verbose = False,
    arch: Arch = None,
    activation: Activation = None,
    arch_kwargs: ArchKwargs = None,
    max_input_bytes: MaxInputBytes = None,
    show: Annotated[int, typer.Option(help="Points whose values the table shows.")] = 3,
    digits: Digits = DEFAULT_DIGITS,
) -> None:
    from jaccli.show import render
    from jaccli.io import check_output

    if not want:
        raise UsageError("nothing to compute", expected="--want with terms like u_x or NAME = EXPR")
    if save == STDIO:
        raise UsageError("partials writes several tensors", expected="--save FILE.npz, .safetensors or .pt")
    limits = parse_limits(fail_above or (), requested_names(want))
    if save is not None:
        check_output(save, force=force)
    o = dict(model=model, input=input, inputs=inputs, key=key, device=device, dtype=dtype, arch=arch,
             activation=activation, arch_kwargs=arch_kwargs)  # fmt: skip
    messages: list[str] = []
    with collect_warnings(messages):
        net, args, sources, wrt_names = load_request(o, wrt)
        start = time.perf_counter()
        result = jaccli.partials(
            net, args, want, inputs=in_, outputs=out, per_sample=per_sample,
            wrt=None if wrt_names is None else (wrt_names if len(wrt_names) > 1 else wrt_names[0]),
            output=output, chunk_size=chunk_size, check_batch=not no_batch_check, strict=strict,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    if verbose:
        why = f"; {result.engine_note}" if result.engine_note else ""
        err_console().print(f"note: partials on the {result.engine} engine{why}")
    gates = [render.gate(name, result[name], tol, per_sample) for name, tol in limits.items()]
    if save is not None:
        meta = {"jaccli_version": jaccli.__version__, "command": "partials", "model": model,
                "inputs": result.inputs, "outputs": result.outputs, "per_sample": per_sample}  # fmt: skip
        jaccli.save_tensors(save, dict(result), metadata=meta, force=force)
    if json_ or not quiet:
        doc = render.partials_json(result, model_meta(net, model), input_meta(args, sources), per_sample, gates,
                                   messages, seconds, save)  # fmt: skip
        if json_:
            typer.echo(json.dumps(doc))
        else:
            render.show_partials(Console(highlight=False), doc, result, show=show, digits=digits)
    failed = [g for g in gates if not g["passed"]]
    if failed:
        g = failed[0]
        where = f" at point {g['worst_point']}" if g["worst_point"] is not None else ""
        raise GateFailed(
            f"max |{g['name']}| = {g['max_abs']:.6g}{where} exceeds {g['tolerance']:g}", where=model
        )
