"""One request path for every derivative command: a :class:`~jaccli.request.spec.Request`
(built once from the options) → early checks → load → plan → compute → save, plot,
summarise, show.

:func:`check_early` runs before torch is imported (a bad option value, a ``--plot``
without matplotlib or a combination of options that cannot work is refused at once);
:func:`derivative` and :func:`partials` compute; :func:`deliver` writes and shows what
any command computed, the same way for every command (``--save -`` is one ``.npy``,
or an ``.npz`` stream when there are several tensors; ``--plot``; ``--summary``).
What differs between kinds is read from their :class:`~jaccli.request.kinds.Kind`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

import jaccli
from jaccli.cli import collector
from jaccli.cli.inputs import collect_warnings, err_console, input_meta, load_request, model_meta
from jaccli.errors import DependencyError, GateFailed, ResumeError, UsageError
from jaccli.request.choices import STDIO
from jaccli.request.kinds import SPECTRA, Kind
from jaccli.request.spec import Request
from jaccli.show.layout import axis_names, group_of

#: the most points ``--show all`` prints
SHOW_ALL_MAX = 100


def parse_show(text: str) -> int | None:
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


def check_early(req: Request) -> None:
    """What can be refused before torch is imported: option combinations, ranges, a plot
    without matplotlib. (Choice options are checked by their type while parsing.)"""
    d, o, k = req.derivative, req.output, req.kind
    if o.save == STDIO and o.json:
        raise UsageError("--save - writes the result to stdout, which --json also needs", hint="save to a file")
    if not 1 <= o.digits <= 17:
        raise UsageError("--digits out of range", expected="1 to 17 significant digits", got=o.digits)
    if "estimator" not in k.options and (d.estimator != "exact" or d.probes != 16 or d.seed != 0):
        raise UsageError(f"--estimator, --probes and --seed are options of divergence, not {k.name}")
    if o.flatten and not k.flattens:
        raise UsageError(f"--flatten applies to jacobian and hessian, not {k.name}")
    if o.plot is not None and not _has_matplotlib():
        raise DependencyError("plots need matplotlib, which is not installed", hint="pip install 'jaccli[plot]'")


def _has_matplotlib() -> bool:
    """Whether matplotlib can be imported, found without importing it (nor torch)."""
    if "matplotlib" in sys.modules:
        return sys.modules["matplotlib"] is not None
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def _check_outputs(req: Request) -> None:
    """Fail before any work where a --save or --plot file cannot be written."""
    from jaccli.io import check_output

    o = req.output
    if o.save is not None:
        check_output(o.save, force=o.force)
    if o.plot is not None:
        from jaccli.show import plot

        plot.check_path(o.plot, force=o.force)


@contextmanager
def process_group(device: str):
    """Under torchrun (``WORLD_SIZE`` > 1), join a process group for the command's duration
    (gloo on CPU, nccl on CUDA, each rank on its own ``cuda:LOCAL_RANK``); yields the rank's
    device, the number of processes and this one's rank. One process: the device as given."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield device, 1, 0
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    joined = not dist.is_initialized()
    if joined:
        # the group's objects must stay collectable: frozen ones (collector.resume freezes what
        # exists) are never freed, and a gloo group left alive at exit aborts the process
        collector.resume()
        nccl = device.startswith("cuda") and torch.cuda.is_available()  # else loading says CUDA is missing
        if nccl:  # nccl's object collectives run on the current device: each rank's own, not cuda:0
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if nccl else "gloo")
    done = False
    try:
        yield device, dist.get_world_size(), dist.get_rank()
        done = True
    finally:
        if joined:
            if done:  # every rank leaves together: none tears gloo down while another still talks to it
                dist.barrier()
            dist.destroy_process_group()


@dataclass
class Outcome:
    """What a command computed, named for saving, plotting and summarising."""

    results: dict
    axes: dict[str, list[str]]
    args: dict[str, tuple[str, ...]]
    arguments: dict
    metadata: dict
    title: str
    extra: dict = field(default_factory=dict)  # tensors saved beside the results (stderr)
    summaries: dict = field(default_factory=dict)
    #: what the kind's engine returned, for a kind that draws its own picture (curvature)
    value: object = None


# --------------------------------------------------------------------------- derivatives


def _streams(req: Request) -> bool:
    """Whether the result goes to disk chunk by chunk: one per-sample tensor to .npy/.safetensors."""
    from jaccli.io import can_stream

    d = req.derivative
    one = not d.wrt or len(d.wrt) == 1
    return bool(req.kind.streams and d.per_sample and one and d.estimator == "exact" and can_stream(req.output.save))


def file_facts(req: Request) -> dict:
    """The model, input (and ``--target``) files a resumed run must share with the interrupted
    one (what the engine's :func:`~jaccli.engine.api.fingerprint` cannot see from tensors), and
    the CLI's loading options: the caller's part of the one fingerprint of a streamed result."""
    from jaccli.io import InputSpec
    from jaccli.io.records import file_fingerprint

    s, q = req.source, req.derivative.parameters
    facts: dict = {"cli": {"device": s.device, "dtype": s.dtype, "key": s.key, "arch": s.arch,
                           "activation": s.activation, "arch_kwargs": s.arch_kwargs, "flatten": req.output.flatten}}
    if Path(s.model).is_file():
        facts["model"] = file_fingerprint(s.model)
    files = ([] if s.input is None else [("", s.input)]) + [(sp.name, sp.path) for sp in map(InputSpec.parse, s.inputs)]
    if q is not None and q.target is not None:  # FILE or FILE:KEY
        files.append(("target", q.target if Path(q.target).is_file() else q.target.rpartition(":")[0]))
    if files and all(path != STDIO and Path(path).is_file() for _, path in files):
        facts["inputs"] = {name: file_fingerprint(path, whole=False) for name, path in files}
    return facts


def _flatten(t, axes: list[str], k: Kind):
    """The matrix view ``[N, out, in(, in')]``: each group of axes collapsed to one."""
    groups = [a.rstrip("0123456789") for a in axes]
    want = (["sample"] if "sample" in groups else []) + ["out", "in"] + (["in'"] if k.order == 2 else [])
    shape = [math.prod(s for s, g in zip(t.shape, groups) if g == w) for w in want]
    return t.reshape(shape), want


def _name_results(k: Kind, value, wrt: list[str], in_ndims: list[int], per_sample: bool):
    """``{name: tensor}``, ``{name: axes}`` and ``{name: arguments}`` of an API result (a
    tensor, or nested tuples with several arguments)."""
    names = k.result_names(wrt)
    parts = [value] if len(names) == 1 else [p for row in value for p in (row if isinstance(row, (tuple, list)) else (row,))]
    ndim = dict(zip(wrt, in_ndims))
    results, axes, args = {}, {}, {}
    for (name, arg), t in zip(names, parts):
        results[name] = t
        axes[name] = axis_names(per_sample, t.dim(), tuple(ndim[a] for a in arg))
        args[name] = arg
    return results, axes, args


def derivative(req: Request, *, world: int = 1, rank: int = 0) -> None:
    """Load, plan, compute and deliver one of the engine's derivative kinds."""
    from jaccli.jets.fused import collect_notes as fused_notes
    from jaccli.show import render
    from jaccli.show.progress import ProgressBar

    d, o, k = req.derivative, req.output, req.kind
    quiet, as_json = o.quiet or rank != 0, o.json and rank == 0  # rank 0 alone prints
    streams = _streams(req)
    if o.resume and not streams:
        raise ResumeError(
            "--resume continues a per-sample result streaming to --save FILE.npy or FILE.safetensors",
            got="no --save" if o.save is None else f"--save {o.save}" if d.per_sample else "no --per-sample",
            hint="only one result per point (one --wrt; not hutchinson) streams",
        )
    _check_outputs(req)
    messages: list[str] = []
    out = Console(stderr=o.save == STDIO, highlight=False)
    with collect_warnings(messages, show=rank == 0):
        net, args, sources, wrt = load_request(req.source, d.wrt)
        wrt_arg = wrt if wrt is None or len(wrt) > 1 else wrt[0]
        plan = jaccli.plan(
            k.name, net, args, wrt=wrt_arg, per_sample=d.per_sample, mode=d.mode, chunk_size=d.chunk_size,
            output=d.output, select=d.select, estimator=d.estimator, probes=d.probes,
            check_batch=d.check_batch, strict=d.strict,
        )  # fmt: skip
        if o.verbose:
            why = f"; {plan.engine_note}" if plan.engine_note else ""
            err_console().print(f"[bold]note:[/] {plan.mode} mode on the {plan.engine} engine{escape(why)}")
            if plan.predicted:  # what auto mode weighed, so that a surprising choice can be read
                err_console().print(f"[bold]note:[/] predicted: {escape(plan.predicted)}")
        if o.dry_run:
            if as_json:
                typer.echo(json.dumps({"schema": "jaccli.plan", "version": render.JSON_SCHEMA_VERSION, **plan.as_dict()}))
            elif not quiet:
                render.show_plan(out, plan)
            return
        show = o.show
        if show is None:
            show = plan.points if plan.per_sample else 1
            if show > SHOW_ALL_MAX:
                raise UsageError(
                    f"--show all would print {show:,} tables",
                    expected=f"at most {SHOW_ALL_MAX} points",
                    hint="pass --show N for the first N points, or --save/--plot for all of them",
                )
        in_tensors = args if isinstance(args, dict) else {next(iter(sources)): args}
        diff = wrt or list(in_tensors)[:1]
        in_ndims = [in_tensors[w].dim() - (1 if d.per_sample else 0) for w in diff]
        inputs = input_meta(args, sources)
        meta = _metadata(req, inputs)
        stream = None
        if streams:
            shape = tuple(plan.result_shape)
            axes = axis_names(True, len(shape), tuple(in_ndims[:1] * k.order))
            if o.flatten:
                import torch

                view, axes = _flatten(torch.empty(shape, device="meta"), axes, k)
                shape = tuple(view.shape)
            stream = jaccli.Stream(o.save, name=k.name, metadata={**meta, "axes": {k.name: axes}}, shape=shape,
                                   force=o.force, resume=o.resume, fingerprint=file_facts(req))  # fmt: skip
        show_bar = o.progress if o.progress is not None else err_console().is_terminal
        label = k.name if world == 1 else f"{k.name} (rank 0, 1/{world} of the points)"
        extra = {"estimator": d.estimator, "probes": d.probes, "seed": d.seed} if "estimator" in k.options else {}
        with ProgressBar(label, force=bool(o.progress)) as bar:
            start = time.perf_counter()
            try:
                with fused_notes() as notes:
                    value = k.engine()(
                        net, args, plan=plan, wrt=wrt_arg, per_sample=d.per_sample, mode=d.mode, chunk_size=d.chunk_size,
                        output=d.output, select=d.select, check_batch=d.check_batch, strict=d.strict, save=stream,
                        progress=bar if show_bar and not quiet and not as_json else None, compile=d.compile, **extra,
                    )  # fmt: skip
            except KeyboardInterrupt:
                if stream is not None and rank == 0:
                    err_console().print(
                        f"[bold]note:[/] the rows written so far are kept beside {escape(o.save)}; "
                        "the same command with --resume continues from there"
                    )
                raise
            seconds = time.perf_counter() - start
        if stream is not None:
            plan = replace(plan, world_size=stream.world_size)
        if notes:
            plan = replace(plan, compiled="; ".join(notes))
            if o.verbose:
                err_console().print(f"[bold]note:[/] {escape(plan.compiled)}")
    estimate = isinstance(value, jaccli.DivergenceEstimate)  # a value and its standard error
    stderr = value.stderr if estimate else None
    results, axes, arg_names = _name_results(k, value.value if estimate else value, diff, in_ndims, d.per_sample)
    if o.flatten:
        flat = {n: _flatten(v, axes[n], k) for n, v in results.items()}
        results = {n: v for n, (v, _) in flat.items()}
        axes = {n: a for n, (_, a) in flat.items()}
    report = render.Report(
        command=k.name, model=model_meta(net, req.source.model), inputs=inputs, wrt=diff,
        per_sample=d.per_sample, plan=plan, results=results, axes=axes, stderr=stderr, warnings=messages,
        seconds=seconds, saved_to=o.save, estimator=d.estimator, probes=d.probes if "estimator" in k.options else None,
        args=arg_names, arguments=in_tensors, show=show, digits=o.digits,
    )  # fmt: skip
    outcome = Outcome(results, axes, arg_names, in_tensors, {**meta, "axes": axes}, _plot_title(req, report.model, plan.points),
                      extra={} if stderr is None else {"stderr": stderr})  # fmt: skip
    if stream is not None:
        report.stats = {k.name: stream.stats}
        report.resumed_points = stream.resumed_points
    deliver(req, outcome, saved=stream is not None)
    report.summaries = outcome.summaries
    if as_json:
        typer.echo(json.dumps(render.result_json(report)))
    elif not quiet:
        render.show_result(out, report)


def _metadata(req: Request, inputs: dict) -> dict:
    """What a saved file records of the request (the .safetensors header keeps it)."""
    return {
        "jaccli_version": jaccli.__version__,
        "command": req.kind.name,
        "model": req.source.model,
        "inputs": {n: v["shape"] for n, v in inputs.items()},
        "per_sample": req.derivative.per_sample,
    }


def _plot_title(req: Request, model: dict, points: int) -> str:
    """The command, the model and N, e.g. ``jaccli jacobian --per-sample: pinn.pt, N = 1,000``."""
    flags = " --per-sample" if req.derivative.per_sample else ""
    what = f"N = {points:,}" if req.derivative.per_sample else "whole input as one point"
    return f"jaccli {req.kind.name}{flags}: {os.path.basename(model['path'])}, {what}"


# --------------------------------------------------------------------------- what every command does with a result


def summaries(k: Kind, outcome: Outcome, per_sample: bool) -> dict:
    """``--summary``: per result, the spectra of each point's matrix (Jacobian, Hessian;
    Hessian blocks of two different arguments have none) or the distribution of its
    values over the points (divergence, Laplacian, partials)."""
    from jaccli.show.summary import summarize_values

    found = {}
    for name, t in outcome.results.items():
        if k.summary == SPECTRA:
            if k.order == 2 and len(set(outcome.args.get(name, ()))) > 1:
                continue
            in_ndim = sum(group_of(a) == "in" for a in outcome.axes[name])
            found[name] = jaccli.summarize(t, k.name, per_sample=per_sample, in_ndim=in_ndim)
        else:
            found[name] = summarize_values(t, per_sample=per_sample)
    return found


def save_stdout(tensors: dict, metadata: dict) -> None:
    """``--save -``: one tensor as ``.npy`` bytes, several as an ``.npz`` archive, on stdout."""
    if len(tensors) == 1:
        jaccli.save_tensors(STDIO, next(iter(tensors.values())), metadata=metadata)
        return
    from jaccli.io.write import WRITERS, write_stdout

    buf = io.BytesIO()
    WRITERS["npz"](buf, tensors, {})
    write_stdout(buf.getbuffer())


def deliver(req: Request, outcome: Outcome, *, saved: bool = False) -> None:
    """Save (unless the result already streamed there), summarise and plot a computed result."""
    o, k, per_sample = req.output, req.kind, req.derivative.per_sample
    if o.summary:
        outcome.summaries = summaries(k, outcome, per_sample)
    if o.save is not None and not saved:
        tensors = {**outcome.results, **outcome.extra}
        if o.save == STDIO:
            save_stdout(tensors, outcome.metadata)
        else:
            jaccli.save_tensors(o.save, tensors, metadata=outcome.metadata, force=o.force)
    if o.plot is not None and k.plot is not None:
        k.plotter()(o.plot, outcome.value, title=outcome.title, force=o.force)
    elif o.plot is not None:
        from jaccli.show import plot

        spectra = {n: s for n, s in outcome.summaries.items() if k.summary == SPECTRA}
        plot.plot_results(
            o.plot, outcome.results, kind=k.name, title=outcome.title, axes=outcome.axes, args=outcome.args,
            per_sample=per_sample, coords=outcome.arguments, summaries=spectra, force=o.force,
        )  # fmt: skip


# --------------------------------------------------------------------------- partials


def partials(req: Request) -> None:
    """``jaccli partials``: named partials, expressions and their gates."""
    from jaccli.jets.fused import collect_notes as fused_notes
    from jaccli.show import partials as partials_view, tables

    d, o, k = req.derivative, req.output, req.kind
    limits = dict(d.limits)
    _check_outputs(req)
    messages: list[str] = []
    with collect_warnings(messages):
        net, args, sources, wrt = load_request(req.source, d.wrt)
        start = time.perf_counter()
        with fused_notes() as notes:
            result = k.engine()(
                net, args, list(d.want), inputs=d.in_names, outputs=d.out_names, per_sample=d.per_sample,
                wrt=None if wrt is None else (wrt if len(wrt) > 1 else wrt[0]), output=d.output, select=d.select,
                chunk_size=d.chunk_size, check_batch=d.check_batch, strict=d.strict, compile=d.compile,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        result.compiled = "; ".join(notes) or None
    if o.verbose:
        why = f"; {result.engine_note}" if result.engine_note else ""
        err_console().print(f"note: partials on the {result.engine} engine{escape(why)}")
        if result.compiled:
            err_console().print(f"note: {escape(result.compiled)}")
    in_tensors = args if isinstance(args, dict) else {next(iter(sources)): args}
    coords = next(iter(in_tensors.values())) if wrt is None or len(wrt) == 1 else None
    gates = [partials_view.gate(name, result[name], tol, d.per_sample, inputs=result.inputs, x=coords) for name, tol in limits.items()]
    inputs = input_meta(args, sources)
    names = {"inputs": result.inputs, "outputs": result.outputs}
    axes = {n: axis_names(d.per_sample, t.dim()) for n, t in result.items()}
    meta = {"jaccli_version": jaccli.__version__, "command": k.name, "model": req.source.model,
            "inputs": result.inputs, "outputs": result.outputs, "per_sample": d.per_sample}  # fmt: skip
    outcome = Outcome(dict(result), axes, {n: (next(iter(in_tensors)),) for n in result}, in_tensors, meta,
                      _plot_title(req, {"path": req.source.model}, result.points))  # fmt: skip
    deliver(req, outcome)
    if o.json or not o.quiet:
        doc = partials_view.partials_json(result, model_meta(net, req.source.model), inputs, d.per_sample, gates, messages,
                                   seconds, o.save)  # fmt: skip
        doc["names"] = names
        if outcome.summaries:
            doc["summary"] = {n: s.as_dict() for n, s in outcome.summaries.items()}
        if o.json:
            typer.echo(json.dumps(doc))
        else:
            console = Console(stderr=o.save == STDIO, highlight=False)
            partials_view.show_partials(console, doc, result, show=o.show if o.show is not None else result.points, digits=o.digits)
            for name, s in outcome.summaries.items():
                tables.show_value_summary(console, s, title=name, digits=o.digits)
    failed = [g for g in gates if not g["passed"]]
    if failed:
        raise GateFailed(partials_view.gate_line(failed[0]), where=req.source.model)
