"""The ``jaccli curvature`` and ``jaccli grads`` commands: curvature in parameter space.

Thin Typer commands over :func:`jaccli.curvature` and :func:`jaccli.grads`; registered by
:mod:`jaccli.cli.main`. Torch-free at import like the rest of the CLI. Under ``torchrun``
the ranks join a process group (gloo on CPU, nccl on CUDA), each takes a shard of the
samples, and rank 0 alone prints and saves.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from rich.console import Console

import jaccli

from jaccli.cli.inputs import collect_warnings, err_console, load_request
from jaccli.request.spec import Source
from jaccli.cli.options import (
    Activation, Arch, ArchKwargs, ChunkSize, Device, Digits, Dtype, Force, InputArg, Inputs, Json, Key, MaxInputBytes,
    ModelArg, Output, ProgressOpt, Quiet, Resume, _complete,
)  # fmt: skip
from jaccli.errors import UsageError
from jaccli.request.choices import LOSS_NAMES, MATRICES, REDUCTIONS, STDIO, WHICH

CURVATURE_EXAMPLE = (
    "jaccli curvature examples/models/potential.pt examples/models/potential_x.npy --loss output --matrix ef "
    "--eig 3 --trace --by-layer"
)
GRADS_EXAMPLE = "jaccli grads examples/models/potential.pt2 examples/models/potential_x.npy --loss output --per-sample --save g.npy"

CURVATURE_HELP = (
    "Curvature of the loss over a data set with respect to the model's parameters: the Hessian, the "
    "Gauss-Newton matrix (ggn, the Fisher for these losses) or the empirical Fisher (ef).\n\n"
    "Parameters are the named parameters in state-dict order, each flattened row-major (--params "
    "restricts them by glob). --full the P×P matrix, --diag, --trace (exact when affordable, else "
    "Hutch++ ± its standard error), --eig K eigenvalues by Lanczos, --density the spectral density by "
    "stochastic Lanczos quadrature (--plot draws it), --by-layer the figures of each tensor's diagonal "
    "block, --standard-errors √diag(I⁻¹) of the observed information of a log-likelihood. Without any "
    f"of these: the loss, the gradient norm and the trace.\n\nExample: {CURVATURE_EXAMPLE}"
)
GRADS_HELP = (
    "The gradient of the reduced loss with respect to the model's parameters; --per-sample the [N, P] "
    "gradients of each sample's own loss (their mean is the gradient of the mean loss), streamed to "
    "--save FILE.npy or .safetensors chunk by chunk (--resume continues), with a summary of their norms."
    f"\n\nExample: {GRADS_EXAMPLE}"
)

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


def _check_plot(path: str | None, force: bool) -> None:
    if path is not None:
        from jaccli.show import plot

        plot.check_path(path, force=force)
        plot.require_matplotlib()


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


@contextmanager
def _process_group(device: str):
    """Under torchrun (``WORLD_SIZE`` > 1), join a process group for the command's duration."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield device
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    joined = not dist.is_initialized()
    if joined:
        nccl = device.startswith("cuda") and torch.cuda.is_available()
        if nccl:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if nccl else "gloo")
    try:
        yield device
    finally:
        if joined:
            dist.destroy_process_group()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def curvature_command(
    model: ModelArg,
    input: InputArg = None,
    loss: Loss = "mse",
    target: Target = None,
    matrix: Annotated[str, typer.Option(help="hessian, ggn (Gauss-Newton / Fisher) or ef (empirical Fisher).",
                                        autocompletion=_complete(MATRICES))] = "hessian",  # fmt: skip
    full: Annotated[bool, typer.Option("--full", help="The P×P matrix (refused, exit 6, when it does not fit).")] = False,
    diag: Annotated[bool, typer.Option("--diag", help="The diagonal.")] = False,
    trace: Annotated[bool, typer.Option("--trace", help="The trace: exact when affordable, else Hutch++ with --samples.")] = False,
    eig: Annotated[Optional[int], typer.Option("--eig", metavar="K", help="The K eigenvalues --which picks (Lanczos, eigsh); eigenvectors go to --save.", show_default=False)] = None,
    which: Annotated[str, typer.Option(help="largest, smallest or magnitude.", autocompletion=_complete(WHICH))] = "largest",
    density: Annotated[bool, typer.Option("--density", help="The spectral density by stochastic Lanczos quadrature (--probes, --steps).")] = False,
    by_layer: Annotated[bool, typer.Option("--by-layer", help="Trace and eigenvalues of each parameter tensor's diagonal block.")] = False,
    standard_errors: Annotated[bool, typer.Option("--standard-errors", help="√diag(I⁻¹) per parameter (--loss log-likelihood).")] = False,
    params: Params = None,
    reduction: Reduction = None,
    samples: Annotated[int, typer.Option(help="Products of a Hutch++ trace or Hutchinson diagonal estimate.")] = 100,
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
    from jaccli.io import check_output

    if loss not in LOSS_NAMES:
        raise UsageError("unknown --loss", expected="one of " + ", ".join(LOSS_NAMES), got=loss)
    if save == STDIO:
        raise UsageError("curvature writes several tensors", expected="--save FILE.npz, .safetensors or .pt")
    if plot is not None and not density:
        raise UsageError("--plot draws the spectral density", expected="--density with --plot")
    if save is not None:
        check_output(save, force=force)
    _check_plot(plot, force)
    with _process_group(device) as device:
        rank = _rank()
        source = Source(model=model, input=input, inputs=tuple(inputs or ()), key=key, device=device, dtype=dtype,
                        arch=arch, activation=activation, arch_kwargs=arch_kwargs)  # fmt: skip
        messages: list[str] = []
        with collect_warnings(messages, show=rank == 0):
            net, args, _sources, _ = load_request(source)
            y, tname = _target(target, device)
            result = jaccli.curvature(
                net, args, y, loss=loss, matrix=matrix, full=full, diag=diag, trace=trace, eig=eig, which=which,
                density=density, by_layer=by_layer, standard_errors=standard_errors, params=params,
                reduction=reduction, samples=samples, probes=probes, steps=steps, tol=tol, seed=seed,
                chunk_size=chunk_size, output=output, target_name=tname,
            )  # fmt: skip
        if rank != 0:
            return
        if save is not None:
            meta = {"jaccli_version": jaccli.__version__, "command": "curvature", "model": model, "loss": loss,
                    "matrix": matrix, "params": [p.as_dict() for p in result.params]}  # fmt: skip
            import torch

            tensors = {k: torch.from_numpy(v) for k, v in result.tensors().items()}
            jaccli.save_tensors(save, tensors, metadata=meta, force=force)
        if plot is not None:
            from jaccli.show.curvature import plot_density

            plot_density(plot, result, title=f"{matrix} spectral density: {os.path.basename(model)}", force=force)
        if json_:
            doc = result.as_dict()
            doc.update(model=model, warnings=messages, saved_to=save, plot=plot)
            typer.echo(json.dumps(doc))
        elif not quiet:
            from jaccli.show.curvature import show_curvature

            show_curvature(Console(highlight=False), result, model=model, digits=digits, saved_to=save)


def _fingerprint(model: str, input: str | None, inputs, target: str | None) -> dict:
    """The files a resumed ``grads`` run must share with the interrupted one."""
    from pathlib import Path

    from jaccli.io import InputSpec
    from jaccli.io.records import file_fingerprint

    facts: dict = {}
    if Path(model).is_file():
        facts["model_file"] = file_fingerprint(model)
    files = ([] if input is None else [("", input)]) + [(s.name, s.path) for s in map(InputSpec.parse, inputs or ())]
    if target is not None and Path(target.rpartition(":")[0] or target).is_file():
        files.append(("target", target if Path(target).is_file() else target.rpartition(":")[0]))
    if files and all(p != STDIO and Path(p).is_file() for _, p in files):
        facts["inputs"] = {name: file_fingerprint(p, whole=False) for name, p in files}
    return facts


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
    from jaccli.io import can_stream, check_output
    from jaccli.errors import ResumeError

    if loss not in LOSS_NAMES:
        raise UsageError("unknown --loss", expected="one of " + ", ".join(LOSS_NAMES), got=loss)
    if save == STDIO:
        raise UsageError("grads writes to a file", expected="--save FILE.npy, .safetensors, .npz or .pt")
    streams = per_sample and save is not None and can_stream(save)
    if resume and not streams:
        raise ResumeError("--resume continues per-sample gradients streaming to --save FILE.npy or FILE.safetensors",
                          got="no --save" if save is None else f"--save {save}" if per_sample else "no --per-sample")  # fmt: skip
    if save is not None and not resume:
        check_output(save, force=force)
    with _process_group(device) as device:
        rank = _rank()
        source = Source(model=model, input=input, inputs=tuple(inputs or ()), key=key, device=device, dtype=dtype,
                        arch=arch, activation=activation, arch_kwargs=arch_kwargs)  # fmt: skip
        messages: list[str] = []
        with collect_warnings(messages, show=rank == 0):
            net, args, _sources, _ = load_request(source)
            y, tname = _target(target, device)
            spec = None
            if save is not None:
                meta = {"jaccli_version": jaccli.__version__, "command": "grads", "model": model, "loss": loss,
                        "reduction": reduction, "params": params, "per_sample": per_sample}  # fmt: skip
                spec = jaccli.Stream(save, name="grads", metadata=meta, force=force, resume=resume,
                                     fingerprint=_fingerprint(model, input, inputs, target) if streams else None)  # fmt: skip
            from jaccli.show.progress import ProgressBar

            show_bar = progress if progress is not None else err_console().is_terminal
            with ProgressBar("per-sample gradients", force=bool(progress)) as bar:
                use_bar = per_sample and show_bar and not quiet and not json_ and rank == 0
                try:
                    result = jaccli.grads(net, args, y, loss=loss, reduction=reduction, per_sample=per_sample,
                                          params=params, chunk_size=chunk_size, output=output, save=spec,
                                          progress=bar if use_bar else None, target_name=tname)  # fmt: skip
                except KeyboardInterrupt:
                    if streams and rank == 0:
                        err_console().print(f"[bold]note:[/] the rows written so far are kept beside {save}; "
                                            "the same command with --resume continues from there")  # fmt: skip
                    raise
        if rank != 0:
            return
        if json_:
            doc = result.as_dict()
            doc.update(model=model, warnings=messages)
            typer.echo(json.dumps(doc))
        elif not quiet:
            from jaccli.show.curvature import show_grads

            show_grads(Console(highlight=False), result, model=model, digits=digits)
