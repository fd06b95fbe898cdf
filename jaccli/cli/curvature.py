"""The ``jaccli curvature`` and ``jaccli grads`` commands: curvature in parameter space.

Typer commands over :func:`jaccli.curvature` and :func:`jaccli.grads`, named by the
``curvature`` and ``grads`` records of :mod:`jaccli.request.kinds` (which
:mod:`jaccli.cli.main` registers). Their options become one
:class:`~jaccli.request.spec.Request` (the parameter-space options one
:class:`~jaccli.request.spec.Parameters`); :func:`check` refuses what it can before torch,
and the results are saved and plotted by :func:`jaccli.cli.run.deliver` and streamed with
the resume facts of :func:`jaccli.cli.run.file_facts`, as for every command. Torch-free
at import like the rest of the CLI. Under ``torchrun`` the ranks join a process group
(:func:`jaccli.cli.run.process_group`), each takes a shard of the samples, and rank 0
alone prints and saves.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Annotated, Optional

import typer
from rich.console import Console

import jaccli

from jaccli.cli.inputs import collect_warnings, err_console, load_request
from jaccli.cli.run import Outcome, _check_outputs, _streams, check_early, deliver, file_facts, process_group
from jaccli.request.kinds import kind
from jaccli.request.spec import Derivative, Parameters, Request, Source
from jaccli.request.spec import Output as OutputOptions
from jaccli.cli.options import (
    Activation, Arch, ArchKwargs, ChunkSize, Device, Digits, Dtype, Force, InputArg, Inputs, Json, Key, MaxInputBytes,
    ModelArg, Output, ProgressOpt, Quiet, Resume, _complete,
)  # fmt: skip
from jaccli.errors import ResumeError, UsageError
from jaccli.request.choices import LOSS_NAMES, MATRICES, REDUCTIONS, STDIO, TRACE_METHODS, WHICH

Loss = Annotated[
    str, typer.Option(help="Loss: " + ", ".join(LOSS_NAMES) + ".", autocompletion=_complete(LOSS_NAMES), show_default=False)
]
Target = Annotated[
    Optional[str],
    typer.Option(metavar="FILE[:KEY]", help="Targets, one row per sample (class indices, probabilities or values).",
                 show_default=False),
]  # fmt: skip
Reduction = Annotated[
    Optional[str],
    typer.Option(help="mean or sum over samples, as torch.nn.functional means them \\[default: mean; sum for "
                 "log-likelihood]", show_default=False, autocompletion=_complete(REDUCTIONS)),
]  # fmt: skip
Params = Annotated[
    Optional[str],
    typer.Option(metavar="PATTERN", help="Only the parameters whose names match these comma-separated globs "
                 "(e.g. '2.*,4.weight').", show_default=False),
]  # fmt: skip
SaveMany = Annotated[
    Optional[str],
    typer.Option(metavar="FILE", help="Write the results (.npz, .safetensors or .pt): full, diag, eigenvalues, "
                 "eigenvectors, standard_errors, density_nodes, density_weights.", show_default=False),
]  # fmt: skip


def _target(spec: str | None, device, where_default="target"):
    """The target tensor of ``--target FILE[:KEY]`` as stored (integer classes stay integers)."""
    if spec is None:
        return None, None
    from pathlib import Path

    from jaccli.io import load_tensors

    path, key = spec, None
    if not Path(spec).exists() and ":" in spec:
        path, _, key = spec.rpartition(":")
    tensors = load_tensors(path)
    if key is None and len(tensors) != 1:
        raise UsageError("the target file holds several tensors; choose one", where=path,
                         expected="--target FILE:KEY with KEY one of " + ", ".join(sorted(tensors)))  # fmt: skip
    if key is not None and key not in tensors:
        raise UsageError("no such tensor in the target file", where=path, expected=", ".join(sorted(tensors)), got=key)
    t = tensors[key] if key is not None else next(iter(tensors.values()))
    return t.to(device), path


def curvature_command(
    model: ModelArg,
    input: InputArg = None,
    loss: Loss = "mse",
    target: Target = None,
    matrix: Annotated[str, typer.Option(help="hessian, ggn (Gauss-Newton / Fisher) or ef (empirical Fisher).",
                                        autocompletion=_complete(MATRICES))] = "hessian",  # fmt: skip
    full: Annotated[bool, typer.Option("--full", help="The P×P matrix (refused, exit 6, when it does not fit).")] = False,
    diag: Annotated[bool, typer.Option("--diag", help="The diagonal.")] = False,
    trace: Annotated[bool, typer.Option("--trace", help="The trace: exact when affordable, else estimated from --samples products (where every selected parameter is a linear layer's: per-sample probes of the layers' outputs; else Hutch++, or Hutchinson on a flat spectrum).")] = False,
    eig: Annotated[Optional[int], typer.Option("--eig", metavar="K", help="The K eigenvalues --which picks (Lanczos, eigsh); eigenvectors go to --save.", show_default=False)] = None,
    which: Annotated[str, typer.Option(help="largest, smallest or magnitude.", autocompletion=_complete(WHICH))] = "largest",
    density: Annotated[bool, typer.Option("--density", help="The spectral density by stochastic Lanczos quadrature (--probes, --steps).")] = False,
    by_layer: Annotated[bool, typer.Option("--by-layer", help="Trace and eigenvalues of each parameter tensor's diagonal block.")] = False,
    standard_errors: Annotated[bool, typer.Option("--standard-errors", help="√diag(I⁻¹) per parameter (--loss log-likelihood).")] = False,
    params: Params = None,
    reduction: Reduction = None,
    samples: Annotated[int, typer.Option(help="Products of a trace or diagonal estimate (rounds of the per-sample one).")] = 100,
    trace_method: Annotated[str, typer.Option(help="An estimated Hessian trace by: auto (layers where every selected parameter is a linear layer's, else products), layers (per-sample probes of the linear layers' outputs) or products (Hutch++ / Hutchinson in parameter space).", autocompletion=_complete(TRACE_METHODS))] = "auto",
    probes: Annotated[int, typer.Option(help="Random vectors of --density.")] = 8,
    steps: Annotated[int, typer.Option(help="Lanczos steps per --density vector.")] = 64,
    tol: Annotated[float, typer.Option(help="Relative accuracy of --eig (ARPACK's tol).")] = 1e-6,
    seed: Annotated[int, typer.Option(help="Seed of the random vectors (estimates, Lanczos start).")] = 0,
    device: Device = "cpu",
    dtype: Dtype = None,
    chunk_size: ChunkSize = None,
    save: SaveMany = None,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    plot: Annotated[Optional[str], typer.Option(metavar="FILE", help="Draw the --density into FILE (.png, .svg or .pdf); needs pip install 'jaccli\\[plot]'.", show_default=False)] = None,
    key: Key = None,
    inputs: Inputs = None,
    output: Output = None,
    arch: Arch = None,
    activation: Activation = None,
    arch_kwargs: ArchKwargs = None,
    max_input_bytes: MaxInputBytes = None,
    digits: Digits = 6,
) -> None:  # fmt: skip
    req = Request(
        _source(model, input, inputs, key, device, dtype, arch, activation, arch_kwargs),
        Derivative(kind("curvature"), chunk_size=chunk_size, output=output, parameters=Parameters(
            loss=loss, target=target, reduction=reduction, params=params, matrix=matrix, full=full, diag=diag,
            trace=trace, eig=eig, which=which, density=density, by_layer=by_layer, standard_errors=standard_errors,
            samples=samples, trace_method=trace_method, probes=probes, steps=steps, tol=tol, seed=seed)),
        OutputOptions(save=save, force=force, json=json_, quiet=quiet, digits=digits, plot=plot),
    )  # fmt: skip
    check(req)
    curvature(req)


def _source(model, input, inputs, key, device, dtype, arch, activation, arch_kwargs) -> Source:
    return Source(model, input, tuple(inputs or ()), key, device, dtype, arch, activation, arch_kwargs)


def check(req: Request) -> None:
    """The early checks of a parameter-space request (before torch), then those every command shares."""
    k, o, q = req.kind, req.output, req.derivative.parameters
    if q.loss not in LOSS_NAMES:
        raise UsageError("unknown --loss", expected="one of " + ", ".join(LOSS_NAMES), got=q.loss)
    if o.save == STDIO:  # a streaming kind writes one tensor, row by row, into a file it can seek
        raise UsageError(f"{k.name} writes to a file", expected="--save FILE.npy, .safetensors, .npz or .pt") \
            if k.streams else UsageError(f"{k.name} writes several tensors", expected="--save FILE.npz, .safetensors or .pt")
    if o.plot is not None and not q.density:
        raise UsageError("--plot draws the spectral density", expected="--density with --plot")
    check_early(req)


def curvature(req: Request) -> None:
    """Load, compute, deliver (save, plot) and show ``jaccli curvature``."""
    d, o, q, k = req.derivative, req.output, req.derivative.parameters, req.kind
    _check_outputs(req)
    with process_group(req.source.device) as (device, _world, rank):
        source = replace(req.source, device=device)
        messages: list[str] = []
        with collect_warnings(messages, show=rank == 0):
            net, args, _sources, _ = load_request(source)
            y, tname = _target(q.target, device)
            result = k.engine()(
                net, args, y, loss=q.loss, matrix=q.matrix, full=q.full, diag=q.diag, trace=q.trace, eig=q.eig,
                which=q.which, density=q.density, by_layer=q.by_layer, standard_errors=q.standard_errors,
                params=q.params, reduction=q.reduction, samples=q.samples, trace_method=q.trace_method, probes=q.probes, steps=q.steps,
                tol=q.tol, seed=q.seed, chunk_size=d.chunk_size, output=d.output, target_name=tname,
            )  # fmt: skip
        if rank != 0:
            return
        model = req.source.model
        meta = {"jaccli_version": jaccli.__version__, "command": k.name, "model": model, "loss": q.loss,
                "matrix": q.matrix, "params": [p.as_dict() for p in result.params]}  # fmt: skip
        import torch

        tensors = {n: torch.from_numpy(v) for n, v in result.tensors().items()}
        deliver(req, Outcome(tensors, {}, {}, {}, meta, f"{q.matrix} spectral density: {os.path.basename(model)}",
                             value=result))  # fmt: skip
        if o.json:
            doc = result.as_dict()
            doc.update(model=model, warnings=messages, saved_to=o.save, plot=o.plot)
            typer.echo(json.dumps(doc))
        elif not o.quiet:
            from jaccli.show.curvature import show_curvature

            show_curvature(Console(highlight=False), result, model=model, digits=o.digits, saved_to=o.save)


def grads_command(
    model: ModelArg,
    input: InputArg = None,
    loss: Loss = "mse",
    target: Target = None,
    per_sample: Annotated[bool, typer.Option("--per-sample", "-p", help="The [N, P] gradients of each sample's own loss.")] = False,
    params: Params = None,
    reduction: Reduction = None,
    device: Device = "cpu",
    dtype: Dtype = None,
    chunk_size: ChunkSize = None,
    save: Annotated[Optional[str], typer.Option(metavar="FILE", help="Write the gradients: .npy or .safetensors stream per-sample rows chunk by chunk; .npz and .pt too.", show_default=False)] = None,
    resume: Resume = False,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    progress: ProgressOpt = None,
    key: Key = None,
    inputs: Inputs = None,
    output: Output = None,
    arch: Arch = None,
    activation: Activation = None,
    arch_kwargs: ArchKwargs = None,
    max_input_bytes: MaxInputBytes = None,
    digits: Digits = 6,
) -> None:  # fmt: skip
    req = Request(
        _source(model, input, inputs, key, device, dtype, arch, activation, arch_kwargs),
        Derivative(kind("grads"), per_sample=per_sample, chunk_size=chunk_size, output=output,
                   parameters=Parameters(loss=loss, target=target, reduction=reduction, params=params)),
        OutputOptions(save=save, force=force, json=json_, quiet=quiet, digits=digits, progress=progress, resume=resume),
    )  # fmt: skip
    check(req)
    grads(req)


def grads(req: Request) -> None:
    """Load, compute (streaming per-sample rows to ``--save``) and show ``jaccli grads``."""
    d, o, q, k = req.derivative, req.output, req.derivative.parameters, req.kind
    streams = _streams(req)
    if o.resume and not streams:
        raise ResumeError("--resume continues per-sample gradients streaming to --save FILE.npy or FILE.safetensors",
                          got="no --save" if o.save is None else f"--save {o.save}" if d.per_sample else "no --per-sample")  # fmt: skip
    if not o.resume:
        _check_outputs(req)
    with process_group(req.source.device) as (device, _world, rank):
        source = replace(req.source, device=device)
        messages: list[str] = []
        with collect_warnings(messages, show=rank == 0):
            net, args, _sources, _ = load_request(source)
            y, tname = _target(q.target, device)
            spec = None
            if o.save is not None:
                meta = {"jaccli_version": jaccli.__version__, "command": k.name, "model": req.source.model,
                        "loss": q.loss, "reduction": q.reduction, "params": q.params, "per_sample": d.per_sample}  # fmt: skip
                spec = jaccli.Stream(o.save, name=k.name, metadata=meta, force=o.force, resume=o.resume,
                                     fingerprint=file_facts(req) if streams else None)  # fmt: skip
            from jaccli.show.progress import ProgressBar

            show_bar = o.progress if o.progress is not None else err_console().is_terminal
            with ProgressBar("per-sample gradients", force=bool(o.progress)) as bar:
                use_bar = d.per_sample and show_bar and not o.quiet and not o.json and rank == 0
                try:
                    result = k.engine()(net, args, y, loss=q.loss, reduction=q.reduction, per_sample=d.per_sample,
                                        params=q.params, chunk_size=d.chunk_size, output=d.output, save=spec,
                                        progress=bar if use_bar else None, target_name=tname)  # fmt: skip
                except KeyboardInterrupt:
                    if streams and rank == 0:
                        err_console().print(f"[bold]note:[/] the rows written so far are kept beside {o.save}; "
                                            "the same command with --resume continues from there")  # fmt: skip
                    raise
        if rank != 0:
            return
        if o.json:
            doc = result.as_dict()
            doc.update(model=req.source.model, warnings=messages)
            typer.echo(json.dumps(doc))
        elif not o.quiet:
            from jaccli.show.curvature import show_grads

            show_grads(Console(highlight=False), result, model=req.source.model, digits=o.digits)
