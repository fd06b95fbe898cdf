"""The ``jaccli`` command: a thin Typer layer over the public API in :mod:`jaccli`.

Every error a user can cause is a :class:`~jaccli.JaccliError`; :class:`JaccliGroup`
turns it (and Typer's own usage errors) into one red line on stderr and the exit
code of :data:`~jaccli.errors.EXIT_CODES`.
"""


import contextvars
import importlib.metadata
import json
import math
import os
import signal
import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

import jaccli

# Only torch-free modules at the top: torch (and the modules that need it) costs a second
# to import, which --help, --version and shell completion must not pay. Commands import
# what they use when they run.
from jaccli.request.choices import DEFAULT_DIGITS, ESTIMATORS, KINDS, MODES, STDIO
from jaccli.errors import CheckFailed, JaccliError, OutputClosed, UsageError
from jaccli.show.layout import axis_names, group_of
from jaccli import signals
from jaccli.cli import allocator as _allocator, partials as cli_partials
from jaccli.cli.inputs import collect_warnings, err_console, input_meta, load_model_option, load_request, model_meta
from jaccli.cli.options import (
    ModelArg,
    InputArg,
    PerSample,
    Device,
    Dtype,
    Mode,
    ChunkSize,
    Save,
    Force,
    Json,
    Quiet,
    DryRun,
    Key,
    Inputs,
    Wrt,
    Output,
    Verbose,
    Strict,
    Arch,
    Activation,
    ArchKwargs,
    MaxInputBytes,
    Show,
    Digits,
    PlotFile,
    NoBatchCheck,
    ProgressOpt,
    Resume,
    _complete,
)

try:  # Typer vendors Click from 0.25 on
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older Typer with Click as a dependency
    from click import exceptions as click_exc


def _fail(message: str, label: str, code: int) -> None:
    signals.exiting()  # a second Ctrl-C must not turn the last line into a traceback
    err_console().print(f"[bold red]{label}:[/] {escape(message)}")
    sys.exit(code)


def _silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null once its reader has gone, so that the
    interpreter's final flush of ``sys.stdout`` does not print "Exception ignored …
    BrokenPipeError" (what the Python docs on SIGPIPE recommend)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout replaced or closed: nothing left to flush there
        pass


def _fail_if_signalled() -> None:
    """Report a signal as the cause of a failure that followed it: C code (torch's writer,
    an extension module's import) turns the exception its handler raised into another one."""
    if signals.received() is not None:
        exc = signals.Interrupted(signals.received())
        _fail(f"interrupted ({exc.name})", "error", exc.exit_code)


class JaccliGroup(TyperGroup):
    """Runs a command and reports any failure as one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # before Typer, which makes it a silent exit 1
            raise OutputClosed(
                "the reader closed the pipe before the output was complete", where="<stdout>"
            ) from None
        except KeyboardInterrupt:  # no handlers installed (CliRunner, an embedding program)
            raise signals.Interrupted() from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            # in a copy of the context: what options set there (--max-input-bytes) ends with the
            # command, and does not leak into the next call of a program that runs several
            rv = contextvars.copy_context().run(
                super().main, args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
            )
        except signals.Interrupted as exc:
            _fail(f"interrupted ({exc.name})", "error", exc.exit_code)
        except OutputClosed as exc:
            _silence_stdout()
            _fail(str(exc), exc.label, exc.exit_code)
        except JaccliError as exc:
            _fail_if_signalled()
            _fail(str(exc), exc.label, exc.exit_code)
        except click_exc.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click_exc.ClickException as exc:
            cmd = f" {exc.ctx.info_name}" if getattr(exc, "ctx", None) and exc.ctx.parent else ""
            _fail(f"{exc.format_message()} (see 'jaccli{cmd} --help')", "usage error", exc.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            _fail("interrupted (SIGINT)", "error", 128 + signal.SIGINT)
        except Exception as exc:  # a bug in jaccli or a library: still one line unless debugging
            _fail_if_signalled()
            if os.environ.get("JACCLI_DEBUG"):
                raise
            _fail(
                f"{type(exc).__name__}: {exc} (a bug; rerun with JACCLI_DEBUG=1 for the traceback and report it)",
                "internal error",
                1,
            )
        signals.exiting()  # the work is done: a late signal must not print a traceback at exit
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=JaccliGroup,
    name="jaccli",
    help=(
        "Derivatives of a saved PyTorch model with respect to its input: Jacobian, Hessian, "
        "divergence and Laplacian, per sample or of the whole input, on CPU or GPU.\n\n"
        "MODEL is a TorchScript archive, a torch.export program (.pt2), a safetensors MLP written "
        "by jaccli.save_mlp, or weights with --arch. Archives contain code that runs when the model "
        "runs and --arch factories are imported: use only files you trust. INPUT is a .npy, .npz, "
        ".pt, .safetensors, .csv or .txt file, or - for .npy bytes on stdin."
    ),
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"jaccli {jaccli.__version__} (torch {importlib.metadata.version('torch')})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _allocator.tune()


#: per kind, how many differentiated arguments a result's trailing axes belong to
_DIFF_ORDER = {"jacobian": 1, "hessian": 2, "divergence": 0, "laplacian": 0}


def _name_results(kind: str, value, wrt: list[str], in_ndims: list[int], per_sample: bool, several: bool):
    """``{name: tensor}``, ``{name: axes}`` and ``{name: differentiated arguments}`` of an
    API result (a tensor, or nested tuples with ``several`` arguments)."""
    if kind == "divergence" and isinstance(value, jaccli.DivergenceEstimate):
        value = value.value
    order = _DIFF_ORDER[kind]
    if not several:
        nd = tuple(in_ndims[:1] * order)
        return (
            {kind: value},
            {kind: axis_names(per_sample, value.dim(), nd)},
            {kind: tuple(wrt[:1] * order)},
        )
    results, axes, args = {}, {}, {}
    for a, (wa, na) in enumerate(zip(wrt, in_ndims)):
        if kind == "jacobian":
            results[f"{kind}_{wa}"] = value[a]
            axes[f"{kind}_{wa}"] = axis_names(per_sample, value[a].dim(), (na,))
            args[f"{kind}_{wa}"] = (wa,)
        else:
            for b, (wb, nb) in enumerate(zip(wrt, in_ndims)):
                results[f"{kind}_{wa}_{wb}"] = value[a][b]
                axes[f"{kind}_{wa}_{wb}"] = axis_names(per_sample, value[a][b].dim(), (na, nb))
                args[f"{kind}_{wa}_{wb}"] = (wa, wb)
    return results, axes, args


def _derivative(kind: str, **o) -> None:
    """Under torchrun, join the process group around :func:`_derivative_once`."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _derivative_once(kind, world=1, rank=0, **o)
    if not _streams(kind, o) and not o["dry_run"]:  # before joining: the other ranks fail alike
        raise UsageError(
            f"under torchrun ({world} processes) jaccli splits per-sample results streamed to a file",
            expected="--per-sample --save FILE.npy or FILE.safetensors",
            hint="run other requests in one process",
        )
    import torch.distributed as dist

    if o["device"].startswith("cuda") and ":" not in o["device"]:
        o["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    joined = not dist.is_initialized()
    if joined:
        import torch

        nccl = o["device"].startswith("cuda") and torch.cuda.is_available()  # else loading says CUDA is missing
        if nccl:  # nccl's object collectives run on the current device: each rank's own, not cuda:0
            torch.cuda.set_device(o["device"])
        dist.init_process_group("nccl" if nccl else "gloo")
    try:
        _derivative_once(kind, world=dist.get_world_size(), rank=dist.get_rank(), **o)
    finally:
        if joined:
            dist.destroy_process_group()


def _streams(kind: str, o: dict) -> bool:
    """Whether the result goes to disk chunk by chunk: one per-sample tensor to .npy/.safetensors."""
    from jaccli.io import can_stream

    one = not o["wrt"] or len(o["wrt"]) == 1
    return bool(o["per_sample"] and one and o.get("estimator", "exact") == "exact" and can_stream(o["save"]))


def _fingerprint(kind: str, o: dict) -> dict:
    """What a resumed run must share with the interrupted one, as files and options say it."""
    from pathlib import Path

    from jaccli.io import InputSpec
    from jaccli.io.records import file_fingerprint

    facts = {
        "command": kind,
        "cli": {k: o[k] for k in ("per_sample", "device", "dtype", "mode", "chunk_size", "key", "wrt", "output",
                                   "flatten", "arch", "activation", "arch_kwargs", "estimator", "probes", "seed")},
    }  # fmt: skip
    if Path(o["model"]).is_file():
        facts["model"] = file_fingerprint(o["model"])
    files = ([] if o["input"] is None else [("", o["input"])]) + [
        (spec.name, spec.path) for spec in map(InputSpec.parse, o["inputs"] or ())
    ]
    if files and all(path != STDIO and Path(path).is_file() for _, path in files):
        facts["inputs"] = {name: file_fingerprint(path, whole=False) for name, path in files}
    return facts


def _derivative_once(kind: str, *, world: int, rank: int, **o) -> None:
    """Load, plan, compute, save and report one derivative (the four commands share it)."""
    from jaccli.show import render
    from jaccli.io import check_output
    from jaccli.errors import ResumeError

    quiet, as_json, save = o["quiet"], o["json"], o["save"]
    streams = _streams(kind, o)
    if o["resume"] and not streams:
        raise ResumeError(
            "--resume continues a per-sample result streaming to --save FILE.npy or FILE.safetensors",
            got="no --save" if save is None else f"--save {save}" if o["per_sample"] else "no --per-sample",
            hint="only one result per point (one --wrt; not hutchinson) streams",
        )
    if rank != 0:  # rank 0 alone prints
        quiet, as_json = True, False
    if save == STDIO and as_json:
        raise UsageError("--save - writes the result to stdout, which --json also needs", hint="save to a file")
    if o["mode"] not in MODES:
        raise UsageError("unknown --mode", expected="one of " + ", ".join(MODES), got=o["mode"])
    if save is not None:
        check_output(save, force=o["force"])
    show = _parse_show(o["show"])
    if not 1 <= o["digits"] <= 17:
        raise UsageError("--digits out of range", expected="1 to 17 significant digits", got=o["digits"])
    if o["plot"] is not None:
        from jaccli.show import plot

        plot.check_path(o["plot"], force=o["force"])
        plot.require_matplotlib()
    messages: list[str] = []
    out = Console(stderr=save == STDIO, highlight=False)
    with collect_warnings(messages, show=rank == 0):
        net, args, sources, wrt = load_request(o, o["wrt"])
        common = dict(
            wrt=wrt if wrt is None or len(wrt) > 1 else wrt[0],
            per_sample=o["per_sample"],
            mode=o["mode"],
            chunk_size=o["chunk_size"],
            output=o["output"],
            check_batch=not o["no_batch_check"],
            strict=o["strict"],
        )
        extra = {}
        if kind == "divergence":
            extra = dict(estimator=o["estimator"], probes=o["probes"])
        plan = jaccli.plan(kind, net, args, **common, **extra)
        if o["verbose"]:
            why = f"; {plan.engine_note}" if plan.engine_note else ""
            err_console().print(f"[bold]note:[/] {plan.mode} mode on the {plan.engine} engine{escape(why)}")
        if o["dry_run"]:
            if as_json:
                typer.echo(json.dumps({"schema": "jaccli.plan", "version": render.JSON_SCHEMA_VERSION, **plan.as_dict()}))
            elif not quiet:
                render.show_plan(out, plan)
            return
        if show is None:
            show = plan.points if plan.per_sample else 1
            if show > SHOW_ALL_MAX:
                raise UsageError(
                    f"--show all would print {show:,} tables",
                    expected=f"at most {SHOW_ALL_MAX} points",
                    hint="pass --show N for the first N points, or --save/--plot for all of them",
                )
        if kind == "divergence":
            extra["seed"] = o["seed"]
        in_tensors = args if isinstance(args, dict) else {next(iter(sources)): args}
        diff = wrt or list(in_tensors)[:1]
        in_ndims = [in_tensors[w].dim() - (1 if o["per_sample"] else 0) for w in diff]
        stream = None
        if streams:
            stream = _stream_spec(kind, o, plan, net, args, sources, in_ndims)
            extra["save"] = stream
        show_bar = o["progress"] if o["progress"] is not None else err_console().is_terminal
        from jaccli.show.progress import ProgressBar

        label = kind if world == 1 else f"{kind} (rank 0, 1/{world} of the points)"
        with ProgressBar(label, force=bool(o["progress"])) as bar:
            if show_bar and not quiet and not as_json:
                extra["progress"] = bar
            start = time.perf_counter()
            try:
                value = getattr(jaccli, kind)(net, args, plan=plan, **common, **extra)
            except KeyboardInterrupt:
                if stream is not None and rank == 0:
                    err_console().print(
                        f"[bold]note:[/] the rows written so far are kept beside {escape(save)}; "
                        "the same command with --resume continues from there"
                    )
                raise
            seconds = time.perf_counter() - start
        if stream is not None:
            from dataclasses import replace

            plan = replace(plan, world_size=stream.world_size)
    results, axes, arg_names = _name_results(kind, value, diff, in_ndims, o["per_sample"], bool(wrt and len(wrt) > 1))
    stderr = value.stderr if isinstance(value, jaccli.DivergenceEstimate) else None
    if o["flatten"]:
        flat = {k: _flatten(v, axes[k], kind) for k, v in results.items()}
        results = {k: v for k, (v, _) in flat.items()}
        axes = {k: a for k, (_, a) in flat.items()}
    report = render.Report(
        command=kind,
        model=model_meta(net, o["model"]),
        inputs=input_meta(args, sources),
        wrt=diff,
        per_sample=o["per_sample"],
        plan=plan,
        results=results,
        axes=axes,
        stderr=stderr,
        warnings=messages,
        seconds=seconds,
        saved_to=save,
        estimator=o.get("estimator", "exact"),
        probes=o.get("probes") if kind == "divergence" else None,
        args=arg_names,
        arguments=in_tensors,
        show=show,
        digits=o["digits"],
    )
    if o["summary"]:
        report.summaries = _summaries(report)
    if stream is not None:
        report.stats = {kind: stream.stats}
        report.resumed_points = stream.resumed_points
    elif save is not None:
        to_save = dict(results)
        if stderr is not None:
            to_save["stderr"] = stderr
        jaccli.save_tensors(save, to_save, metadata=_save_metadata(report), force=o["force"])
    if o["plot"] is not None:
        from jaccli.show import plot

        plot.plot_results(
            o["plot"], report.results, kind=kind, title=_plot_title(report), axes=report.axes, args=report.args,
            per_sample=report.per_sample, coords=report.arguments, summaries=report.summaries, force=o["force"],
        )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(render.result_json(report)))
    elif not quiet:
        render.show_result(out, report)


def _stream_spec(kind: str, o: dict, plan, net, args, sources, in_ndims):
    """The :class:`jaccli.Stream` of a streamed ``--save``: the file's shape (``--flatten``'s
    view), its metadata (known before any work: the header is written first), resume."""
    import torch

    shape = tuple(plan.result_shape)
    axes = axis_names(True, len(shape), tuple(in_ndims[:1] * _DIFF_ORDER[kind]))
    if o["flatten"]:
        view, axes = _flatten(torch.empty(shape, device="meta"), axes, kind)
        shape = tuple(view.shape)
    meta = {
        "jaccli_version": jaccli.__version__,
        "command": kind,
        "model": o["model"],
        "inputs": {k: v["shape"] for k, v in input_meta(args, sources).items()},
        "per_sample": True,
        "axes": {kind: axes},
    }
    return jaccli.Stream(o["save"], name=kind, metadata=meta, shape=shape, force=o["force"], resume=o["resume"],
                         fingerprint=_fingerprint(kind, o))  # fmt: skip


#: the most points ``--show all`` prints
SHOW_ALL_MAX = 100


def _parse_show(text: str) -> int | None:
    """``--show``: a count of points, or None for all of them."""
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError("bad --show", expected="a number of points (0 for none) or all", got=text)
    return n


def _plot_title(report) -> str:
    """The command, the model and N, e.g. ``jaccli jacobian --per-sample: pinn.pt, N = 1,000``."""
    flags = " --per-sample" if report.per_sample else ""
    what = f"N = {report.plan.points:,}" if report.per_sample else "whole input as one point"
    return f"jaccli {report.command}{flags}: {os.path.basename(report.model['path'])}, {what}"


def _summaries(report) -> dict:
    """``--summary``: a :class:`jaccli.Summary` per result; Hessian blocks of two different
    arguments (not square per output) have none."""
    found = {}
    for name, t in report.results.items():
        args = report.args.get(name, ())
        if report.command == "hessian" and len(set(args)) > 1:
            continue
        in_ndim = sum(group_of(a) == "in" for a in report.axes[name])
        found[name] = jaccli.summarize(t, report.command, per_sample=report.per_sample, in_ndim=in_ndim)
    return found


def _flatten(t, axes: list[str], kind: str):
    """The matrix view ``[N, out, in(, in')]``: each group of axes collapsed to one."""
    groups = [a.rstrip("0123456789") for a in axes]
    want = (["sample"] if "sample" in groups else []) + ["out", "in"] + (["in'"] if kind == "hessian" else [])
    shape = [math.prod(s for s, g in zip(t.shape, groups) if g == w) for w in want]
    return t.reshape(shape), want


def _save_metadata(report) -> dict:
    return {
        "jaccli_version": jaccli.__version__,
        "command": report.command,
        "model": report.model["path"],
        "inputs": {k: v["shape"] for k, v in report.inputs.items()},
        "per_sample": report.per_sample,
        "axes": report.axes,
    }


_COMMAND_HELP = {
    "jacobian": (
        "Jacobian of the model's output with respect to its input.\n\n"
        "Shape out.shape + in.shape for the whole input as one point; "
        "[N, *out, *in] with --per-sample."
    ),
    "hessian": (
        "Second derivatives, one Hessian per output component.\n\n"
        "[*, *in, *in] for a scalar output per point, [*, *out, *in, *in] otherwise. "
        "Warns when the model is piecewise linear (ReLU), whose second derivatives vanish."
    ),
    "divergence": (
        "Divergence (trace of the Jacobian) of a map whose output shape equals its input's.\n\n"
        "Exact by default (one forward product per input dimension); --estimator hutchinson "
        "gives an unbiased estimate from --probes Rademacher vectors and reports its standard error."
    ),
    "laplacian": (
        "Laplacian (trace of the Hessian) of every output component: [*, *out]."
    ),
}


#: one runnable example per command, shown at the end of its --help (the tests run each one)
COMMAND_EXAMPLES = {
    "jacobian": "jaccli jacobian examples/models/field.pt examples/models/field_x.npy --per-sample --summary",
    "hessian": "jaccli hessian examples/models/potential.pt examples/models/potential_x.npy --per-sample --show 2",
    "divergence": "jaccli divergence examples/models/field.pt2 examples/models/field_x.npy --per-sample --estimator hutchinson",
    "laplacian": "jaccli laplacian examples/models/pinn.pt examples/models/pinn_x.npy --per-sample --plot laplacian.png",
    "info": "jaccli info examples/models/pinn.pt examples/models/pinn_x.npy",
    "check": "jaccli check examples/models/pinn.pt examples/models/pinn_x.npy --hessian",
    "partials": cli_partials.EXAMPLE,
}


def _with_example(name: str, text: str) -> str:
    return f"{text}\n\nExample: {COMMAND_EXAMPLES[name]}"


def _make_command(kind: str):
    div = kind == "divergence"
    flat_help = kind in ("jacobian", "hessian")

    def command(
        model: ModelArg,
        input: InputArg = None,
        per_sample: PerSample = False,
        device: Device = "cpu",
        dtype: Dtype = None,
        mode: Mode = "auto",
        chunk_size: ChunkSize = None,
        save: Save = None,
        force: Force = False,
        json_: Json = False,
        quiet: Quiet = False,
        dry_run: DryRun = False,
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
        flatten: Annotated[
            bool, typer.Option("--flatten", hidden=not flat_help, help="Give the matrix view [N, out, in] of tensor-shaped inputs and outputs.")
        ] = False,
        estimator: Annotated[
            str, typer.Option(hidden=not div, help="exact, or hutchinson for a stochastic estimate.", autocompletion=_complete(ESTIMATORS))
        ] = "exact",
        probes: Annotated[int, typer.Option(hidden=not div, help="Rademacher probes for hutchinson.")] = 16,
        seed: Annotated[int, typer.Option(hidden=not div, help="Seed of the hutchinson probes.")] = 0,
        show: Show = "1",
        digits: Digits = DEFAULT_DIGITS,
        summary: Annotated[
            bool,
            typer.Option(
                "--summary",
                hidden=not flat_help,
                help="Per point ‖J‖_F, σ_max, σ_min, condition number and log|det J| (square maps), or the "
                "Hessian's extreme eigenvalues and definiteness; min / median / max over the points.",
            ),
        ] = False,
        plot: PlotFile = None,
        progress: ProgressOpt = None,
        resume: Resume = False,
    ) -> None:
        if not div and (estimator != "exact" or probes != 16 or seed != 0):
            raise UsageError(f"--estimator, --probes and --seed are options of divergence, not {kind}")
        if div and estimator not in ESTIMATORS:
            raise UsageError("unknown --estimator", expected="one of " + ", ".join(ESTIMATORS), got=estimator)
        if flatten and not flat_help:
            raise UsageError(f"--flatten applies to jacobian and hessian, not {kind}")
        if summary and not flat_help:
            raise UsageError(f"--summary applies to jacobian and hessian, not {kind}")
        _derivative(
            kind,
            model=model, input=input, per_sample=per_sample, device=device, dtype=dtype,
            mode=mode, chunk_size=chunk_size, save=save, force=force, json=json_, quiet=quiet,
            dry_run=dry_run, key=key, inputs=inputs, wrt=wrt, output=output, strict=strict,
            no_batch_check=no_batch_check, flatten=flatten, estimator=estimator, probes=probes,
            seed=seed, arch=arch, activation=activation, arch_kwargs=arch_kwargs, verbose=verbose,
            show=show, digits=digits, summary=summary, plot=plot, progress=progress, resume=resume,
        )  # fmt: skip

    command.__doc__ = _with_example(kind, _COMMAND_HELP[kind])
    return command


for _kind in KINDS:
    app.command(_kind)(_make_command(_kind))


@app.command("info", help=_with_example("info", "What was loaded: format, parameters, dtype, shapes on INPUT, smoothness, batch independence."))
def info(
    model: ModelArg,
    input: InputArg = None,
    per_sample: Annotated[
        bool, typer.Option("--per-sample/--whole", help="Treat axis 0 of INPUT as independent points.")
    ] = True,
    device: Device = "cpu",
    dtype: Dtype = None,
    key: Key = None,
    inputs: Inputs = None,
    output: Output = None,
    arch: Arch = None,
    activation: Activation = None,
    arch_kwargs: ArchKwargs = None,
    max_input_bytes: MaxInputBytes = None,
    json_: Json = False,
) -> None:
    """What was loaded: format, parameters, dtype, shapes on INPUT, smoothness, batch independence."""
    from jaccli.show import render
    from jaccli.load.models import resolve_device

    o = dict(model=model, input=input, inputs=inputs, key=key, device=device, dtype=dtype, arch=arch,
             activation=activation, arch_kwargs=arch_kwargs)  # fmt: skip
    messages: list[str] = []
    with collect_warnings(messages):
        if input is None and not inputs:
            net, args = load_model_option(o, resolve_device(device), dtype), None
        else:
            net, args, _sources, _ = load_request(o)
        facts = jaccli.describe(net, args, per_sample=per_sample, output=output)
    facts = {"model": model, **facts}
    if json_:
        typer.echo(json.dumps({"schema": "jaccli.info", "version": render.JSON_SCHEMA_VERSION, **facts, "warnings": messages}))
    else:
        render.show_info(Console(highlight=False), facts)


@app.command(
    "check",
    help=_with_example(
        "check",
        "Compare jaccli's Jacobian (and Hessian) with float64 finite differences on a few points.\n\n"
        "Also verifies that the model does not mix batch elements and reports non-smooth activations. "
        "Exit code 0 when every check passes, 8 when one fails.",
    ),
)
def check(
    model: ModelArg,
    input: InputArg = None,
    hessian: Annotated[bool, typer.Option("--hessian", help="Check the Hessian too.")] = False,
    points: Annotated[int, typer.Option(help="How many points of INPUT (axis 0) to check, evenly spaced.")] = 4,
    tolerance: Annotated[float, typer.Option(help="Largest relative error that passes (the Hessian gets 10×).")] = 1e-6,
    key: Key = None,
    inputs: Inputs = None,
    output: Output = None,
    arch: Arch = None,
    activation: Activation = None,
    arch_kwargs: ArchKwargs = None,
    max_input_bytes: MaxInputBytes = None,
    json_: Json = False,
) -> None:
    """Compare jaccli's Jacobian (and Hessian) with float64 finite differences on a few points.

    Also verifies that the model does not mix batch elements and reports non-smooth activations. Exit code 0 when every check passes, 8 when one fails.
    """
    from jaccli.show import render

    o = dict(model=model, input=input, inputs=inputs, key=key, device="cpu", dtype="float64", arch=arch,
             activation=activation, arch_kwargs=arch_kwargs)  # fmt: skip
    messages: list[str] = []
    with collect_warnings(messages):
        net, args, _sources, _ = load_request(o)
        if isinstance(args, dict):
            raise UsageError("check takes a model with one input")
        report = jaccli.check(net, args, points=points, hessian_too=hessian, tolerance=tolerance, output=output)
    if json_:
        typer.echo(json.dumps({"schema": "jaccli.check", "version": render.JSON_SCHEMA_VERSION, "model": model, **report.as_dict(), "warnings": messages}))
    else:
        render.show_check(Console(highlight=False), report)
    if not report.passed:
        raise CheckFailed(report.failures[0], where=model)


app.command("partials", help=cli_partials.HELP)(cli_partials.partials_command)

from jaccli.cli import curvature as cli_curvature  # noqa: E402  (parameter space: jaccli.curvature, jaccli.grads)

COMMAND_EXAMPLES.update(curvature=cli_curvature.CURVATURE_EXAMPLE, grads=cli_curvature.GRADS_EXAMPLE)
app.command("curvature", help=cli_curvature.CURVATURE_HELP)(cli_curvature.curvature_command)
app.command("grads", help=cli_curvature.GRADS_HELP)(cli_curvature.grads_command)


def main() -> None:
    """Run the command line with SIGINT, SIGTERM and SIGHUP handled (:mod:`jaccli.signals`);
    the console script and ``python -m jaccli`` (``jaccli.__main__``) install them earlier,
    before this module is imported."""
    signals.run(app)
