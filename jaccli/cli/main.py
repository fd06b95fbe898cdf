"""The ``jaccli`` command: a thin Typer layer over the public API in :mod:`jaccli`.

Every error a user can cause is a :class:`~jaccli.JaccliError`; :class:`JaccliGroup`
turns it (and Typer's own usage errors) into one red line on stderr and the exit
code of :data:`~jaccli.errors.EXIT_CODES`.
"""


import contextvars
import importlib.metadata
import json
import os
import re
import signal
import sys
from dataclasses import replace
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

import jaccli

# Only torch-free modules at the top: torch (and the modules that need it) costs a second
# to import, which --help, --version and shell completion must not pay. Commands import
# what they use when they run.
from jaccli.request.choices import DEFAULT_DIGITS, ESTIMATORS
from jaccli.request.kinds import Kind, kinds
from jaccli.request.spec import Derivative, Request, Selection, Source
from jaccli.request.spec import Output as OutputOptions
from jaccli.errors import CheckFailed, JaccliError, OutputClosed, UsageError
from jaccli import signals
from jaccli.cli import allocator as _allocator
from jaccli.cli import coerce as _coerce
from jaccli.cli.inputs import collect_warnings, err_console, load_model_option, load_request
from jaccli.cli.run import check_early, parse_show
from jaccli.cli.options import (
    ModelArg,
    InputArg,
    PerSample,
    Device,
    Dtype,
    Mode,
    CompileOpt,
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
    Select,
    Summary,
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


def _choice_message(text: str) -> str:
    """Typer's refusal of a choice ("Value error, 'fwd' is not one of 'auto', 'forward'.") as
    "'fwd' is not one of auto, forward": the values as they are typed."""
    m = re.search(r"Value error, (.*) is not one of (.*?)\.?$", text)
    return text if m is None else f"{text[: m.start()]}{m[1]} is not one of {m[2].replace(chr(39), '')}"


class JaccliGroup(TyperGroup):
    """Runs a command and reports any failure as one line and an exit code."""

    # the group's options and then the command's get their values converted without pydantic
    # (:mod:`jaccli.cli.coerce`), installed before either is parsed
    def parse_args(self, ctx, args):
        _coerce.install(self, ctx)
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None:
            _coerce.install(cmd, ctx)
        return name, cmd, rest

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
            _fail(exc.cli_message(), exc.label, exc.exit_code)
        except JaccliError as exc:
            _fail_if_signalled()
            _fail(exc.cli_message(), exc.label, exc.exit_code)
        except click_exc.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click_exc.ClickException as exc:
            cmd = f" {exc.ctx.info_name}" if getattr(exc, "ctx", None) and exc.ctx.parent else ""
            _fail(f"{_choice_message(exc.format_message())} (see 'jaccli{cmd} --help')", "usage error", exc.exit_code)
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
        "Derivatives of a saved PyTorch model, on CPU or GPU: with respect to its input (Jacobian, "
        "Hessian, divergence, Laplacian and named partials of any order, per sample or of the whole "
        "input) and with respect to its parameters (gradients, per-sample gradients and the curvature "
        "of a loss).\n\n"
        "MODEL is a TorchScript archive, a torch.export program (.pt2), a safetensors MLP written "
        "by jaccli.save_mlp, or weights with --arch. Archives contain code that runs when the model "
        "runs and --arch factories are imported: use only files you trust. INPUT is a .npy, .npz, "
        ".pt, .safetensors, .csv or .txt file, or - for .npy bytes on stdin.\n\n"
        "Quick start: jaccli example all demo && cd demo && jaccli jacobian pinn.pt pinn_x.npy --per-sample "
        "--summary; every command's --help ends with examples that run in that folder."
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


def _derivative(req: Request) -> None:
    """Under torchrun, join the process group around :func:`jaccli.cli.run.derivative`."""
    from jaccli.cli import run

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and not run._streams(req) and not req.output.dry_run:  # before joining: the other ranks fail alike
        raise UsageError(
            f"under torchrun ({world} processes) jaccli splits per-sample results streamed to a file",
            expected="--per-sample --save FILE.npy or FILE.safetensors",
            hint="run other requests in one process",
        )
    with run.process_group(req.source.device) as (device, world, rank):
        run.derivative(replace(req, source=replace(req.source, device=device)), world=world, rank=rank)


def help_text(k: Kind) -> str:
    """A command's --help: its description and its examples, which run as written in the
    folder ``jaccli example all`` fills (a test runs every one)."""
    lines = "\n\n".join(f"  {e}" for e in k.examples)
    return f"{k.help}\n\nExamples (after jaccli example all):\n\n{lines}"


def _make_command(k: Kind):
    """The Typer command of a derivative kind: its options become one :class:`Request`."""
    div, flat = "estimator" in k.options, k.flattens

    def command(
        model: ModelArg,
        input: InputArg = None,
        per_sample: PerSample = False,
        device: Device = "cpu",
        dtype: Dtype = None,
        mode: Mode = "auto",
        chunk_size: ChunkSize = None,
        compile_: CompileOpt = "auto",
        save: Save = None,
        force: Force = False,
        json_: Json = False,
        quiet: Quiet = False,
        dry_run: DryRun = False,
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
        flatten: Annotated[
            bool, typer.Option("--flatten", hidden=not flat, help="Give the matrix view [N, out, in] of tensor-shaped inputs and outputs.")
        ] = False,
        estimator: Annotated[
            Literal[ESTIMATORS], typer.Option(hidden=not div, help="exact, or hutchinson for a stochastic estimate.")
        ] = "exact",
        probes: Annotated[int, typer.Option(hidden=not div, help="Rademacher probes for hutchinson.")] = 16,
        seed: Annotated[int, typer.Option(hidden=not div, help="Seed of the hutchinson probes.")] = 0,
        show: Show = "1",
        digits: Digits = DEFAULT_DIGITS,
        summary: Summary = False,
        plot: PlotFile = None,
        progress: ProgressOpt = None,
        resume: Resume = False,
    ) -> None:
        req = Request(
            Source(model, input, tuple(inputs or ()), key, device, dtype, arch, activation, arch_kwargs),
            Derivative(
                k, per_sample=per_sample, wrt=tuple(wrt) if wrt else None, output=output, select=Selection.parse(select),
                mode=mode, chunk_size=chunk_size, check_batch=not no_batch_check, strict=strict, estimator=estimator,
                probes=probes, seed=seed, compile=compile_,
            ),
            OutputOptions(
                save=save, force=force, json=json_, quiet=quiet, dry_run=dry_run, verbose=verbose, show=parse_show(show),
                digits=digits, summary=summary, plot=plot, progress=progress, resume=resume, flatten=flatten,
            ),
        )  # fmt: skip
        check_early(req)
        _derivative(req)

    command.__doc__ = help_text(k)
    return command


# every kind's command, in registration order: the shared one built from its record, or the
# kind's own (partials, curvature, grads), named by its record and imported here
for _kind in kinds():
    app.command(_kind.name, help=help_text(_kind))(_kind.typer_command() or _make_command(_kind))


def _example_line(name: str) -> str:
    return f"\n\nExample (after jaccli example all):\n\n  {COMMAND_EXAMPLES[name]}"


#: examples of the commands that are not kinds (info, check); a kind's are in its record
COMMAND_EXAMPLES = {
    "info": "jaccli info pinn.pt pinn_x.npy",
    "check": "jaccli check pinn.pt pinn_x.npy --hessian",
}


@app.command("info", help="What was loaded: format, parameters, dtype, shapes on INPUT, smoothness, batch independence." + _example_line("info"))
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
    select: Select = None,
    arch: Arch = None,
    activation: Activation = None,
    arch_kwargs: ArchKwargs = None,
    max_input_bytes: MaxInputBytes = None,
    json_: Json = False,
) -> None:
    """What was loaded: format, parameters, dtype, shapes on INPUT, smoothness, batch independence."""
    from jaccli.show import render
    from jaccli.load.loaders import resolve_device

    source = Source(model, input, tuple(inputs or ()), key, device, dtype, arch, activation, arch_kwargs)
    messages: list[str] = []
    with collect_warnings(messages):
        if input is None and not inputs:
            net, args = load_model_option(source, resolve_device(device), dtype), None
        else:
            net, args, _sources, _ = load_request(source)
        facts = jaccli.describe(net, args, per_sample=per_sample, output=output, select=Selection.parse(select))
    facts = {"model": model, **facts}
    if json_:
        typer.echo(json.dumps({"schema": "jaccli.info", "version": render.JSON_SCHEMA_VERSION, **facts, "warnings": messages}))
    else:
        render.show_info(Console(highlight=False), facts)


@app.command(
    "check",
    help="Compare jaccli's Jacobian (and Hessian) with float64 finite differences on a few points.\n\n"
    "Also verifies that the model does not mix batch elements and reports non-smooth activations. "
    "Exit code 0 when every check passes, 8 when one fails." + _example_line("check"),
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
    select: Select = None,
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

    source = Source(model, input, tuple(inputs or ()), key, "cpu", "float64", arch, activation, arch_kwargs)
    messages: list[str] = []
    with collect_warnings(messages):
        net, args, _sources, _ = load_request(source)
        if isinstance(args, dict):
            raise UsageError("check takes a model with one input")
        report = jaccli.check(net, args, points=points, hessian_too=hessian, tolerance=tolerance, output=output,
                              select=Selection.parse(select))  # fmt: skip
    if json_:
        typer.echo(json.dumps({"schema": "jaccli.check", "version": render.JSON_SCHEMA_VERSION, "model": model, **report.as_dict(), "warnings": messages}))
    else:
        render.show_check(Console(highlight=False), report)
    if not report.passed:
        raise CheckFailed(report.failures[0], where=model)


#: the example models ``jaccli example`` writes (:mod:`jaccli.cli.example_models`), torch-free here
EXAMPLE_NAMES = ("pinn", "ode", "field", "potential", "decay", "heat", "cnn", "transformer")


@app.command(
    "example",
    help="Write an example model and its input (as TorchScript NAME.pt and torch.export NAME.pt2, with NAME_x.npy "
    "or NAME_inputs.npz) into DIR, or all of them: the files every --help example uses.\n\n"
    "pinn: 1→50→50→50→501 tanh MLP (also pinn.safetensors and pinn_state.pt); ode: a damped oscillator; field: a "
    "vector field R³→R³; potential: a scalar potential R³→R; decay: two arguments t, x; heat: an exact solution of "
    "the heat equation; cnn: an image classifier; transformer: a causal transformer encoder.\n\n"
    "Examples:\n\n  jaccli example all\n\n  jaccli example heat demo/",
)
def example(
    name: Annotated[Literal[("all", *EXAMPLE_NAMES)], typer.Argument(help="An example, or all of them.", show_default=False)],
    directory: Annotated[str, typer.Argument(metavar="DIR", help="Where to write the files (made if missing).")] = ".",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    from pathlib import Path

    from jaccli.errors import OutputError
    from jaccli.cli import collector, example_models

    collector.resume()  # torch is imported: building and exporting the models makes real garbage

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise OutputError("is not a directory", where=directory, expected="a folder for the example files")
    chosen = EXAMPLE_NAMES if name == "all" else (name,)
    made = example_models.examples()
    files = [out / f for n in chosen for f in example_models.file_names(n, len(made[n][1]))]
    taken = [str(f) for f in files if f.exists()]
    if taken and not force:
        raise OutputError("already exists", where=taken[0], hint="pass --force to overwrite the example files")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot make the folder: {exc.strerror or exc}", where=directory) from None
    for n in chosen:
        module, inputs = made[n]
        for path in example_models.write(n, module, inputs, out):
            if not quiet:
                typer.echo(f"wrote {path}")

def main() -> None:
    """Run the command line with SIGINT, SIGTERM and SIGHUP handled (:mod:`jaccli.signals`);
    the console script and ``python -m jaccli`` (``jaccli.__main__``) install them earlier,
    before this module is imported."""
    signals.run(app)
