"""Presentation of a command's report: the Rich summary for people, versioned JSON for programs;
the views of ``--dry-run`` (a plan), ``jaccli info`` and ``jaccli check``.

Nothing here computes a derivative; it formats a :class:`Report` the CLI fills in. The tables
of a result's values and of its ``--summary`` are :mod:`.tables`'; ``jaccli partials``' output
is :mod:`.partials`'.

Imports: torch, numpy, rich, :mod:`.tables`, :mod:`.summary`, :mod:`jaccli.engine` (plans),
:mod:`jaccli.request`, :mod:`jaccli.errors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from jaccli.request.choices import DEFAULT_DIGITS
from jaccli.request.kinds import kind
from jaccli.show.summary import ValueSummary
from jaccli.show.tables import _result_title, show_blocks, show_summary, show_value_summary
from jaccli.engine import Plan
from jaccli.errors import format_bytes

#: bump when a key of the JSON output changes meaning or disappears (adding keys is compatible)
JSON_SCHEMA_VERSION = 1
#: results with at most this many elements carry their values in the JSON output
JSON_MAX_VALUES = 10_000


@dataclass
class Report:
    """Everything one command did, for :func:`show_result` and :func:`result_json`."""

    command: str
    model: dict
    inputs: dict[str, dict]
    wrt: list[str]
    per_sample: bool
    plan: Plan
    results: dict[str, torch.Tensor]
    axes: dict[str, list[str]]
    stderr: torch.Tensor | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    saved_to: str | None = None
    estimator: str = "exact"
    probes: int | None = None
    #: per result, the differentiated argument(s) its ``in`` (and ``in'``) axes belong to
    args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: the model's input tensors by argument name (coordinates of the shown points)
    arguments: dict[str, object] = field(default_factory=dict)
    #: per result, its :class:`jaccli.Summary` (``--summary``)
    summaries: dict[str, object] = field(default_factory=dict)
    #: points shown as tables with ``per_sample`` (``--show``)
    show: int = 1
    #: significant digits in tables (``--digits``)
    digits: int = DEFAULT_DIGITS
    #: per result, statistics gathered while it streamed to disk (read instead of the file)
    stats: dict[str, dict] = field(default_factory=dict)
    #: points an interrupted run had already written (``--resume``)
    resumed_points: int = 0


def named_shape(names: list[str], shape) -> str:
    """``[sample=100000, out=501, in=1]``."""
    return "[" + ", ".join(f"{n}={s}" for n, s in zip(names, shape)) + "]"


def stats(t: torch.Tensor) -> dict:
    """min, max, mean over finite values, and whether every value is finite."""
    flat = t.detach().reshape(-1)
    total = flat.sum(dtype=torch.float64) if flat.numel() and flat.is_floating_point() else None
    if total is not None and bool(torch.isfinite(total)):  # every value finite: no mask, no copies
        lo, hi = torch.aminmax(flat)
        return {"min": float(lo), "max": float(hi), "mean": float(total) / flat.numel(), "all_finite": True}
    finite = torch.isfinite(flat)
    vals = flat[finite].double()
    if vals.numel() == 0:
        return {"min": None, "max": None, "mean": None, "all_finite": bool(finite.all())}
    return {
        "min": float(vals.min()),
        "max": float(vals.max()),
        "mean": float(vals.mean()),
        "all_finite": bool(finite.all()),
    }


def _title(report: Report) -> str:
    name = kind(report.command).title
    prefix = "per-sample " if report.per_sample else ""
    if report.estimator == "hutchinson":
        return f"{prefix}{name} (Hutchinson, {report.probes} probes)"
    return f"{prefix}{name}"


def show_result(console: Console, report: Report) -> None:
    """The Rich summary of a computed derivative."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    m = report.model
    table.add_row("model", escape(f"{m['path']} ({m['format']}, {m['parameters']:,} parameters)"))
    for name, meta in report.inputs.items():
        label = "input" if len(report.inputs) == 1 else f"input {name}"
        table.add_row(label, escape(f"{meta['path']}  {meta['shape']} {meta['dtype']}"))
    plan = report.plan
    table.add_row(
        "derivative",
        f"{_title(report)}, {plan.mode} mode ({plan.engine}), {plan.chunks} pass{'es' if plan.chunks != 1 else ''}",
    )
    for name, t in report.results.items():
        label = "result" if len(report.results) == 1 else name
        names = report.axes[name]
        s = report.stats.get(name) or stats(t)
        table.add_row(label, escape(f"{named_shape(names, t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"))
        if s["min"] is not None:
            table.add_row("  min / max / mean", f"{s['min']:.6g} / {s['max']:.6g} / {s['mean']:.6g}")
        finite = Text("yes", style="green") if s["all_finite"] else Text("NO", style="bold red")
        table.add_row("  all finite", finite)
    if report.stderr is not None:
        se = stats(report.stderr)
        table.add_row("standard error", f"max {se['max']:.3g}, mean {se['mean']:.3g}")
    table.add_row("time", f"{report.seconds:.3f} s")
    if report.saved_to:
        streamed = " (streamed" + (f", {report.resumed_points:,} points from the interrupted run" if report.resumed_points else "") + ")"
        table.add_row("saved to", escape(report.saved_to) + (streamed if report.stats else ""))
    console.print(table)
    for name, t in report.results.items():
        show_blocks(console, report, name)
        if name in report.summaries:
            summary = report.summaries[name]
            shown = show_value_summary if isinstance(summary, ValueSummary) else show_summary
            shown(console, summary, title=_result_title(report, name), digits=report.digits)


def show_plan(console: Console, plan: Plan) -> None:
    """The Rich view of ``--dry-run``."""
    table = Table(title="plan (nothing computed)", show_header=False, box=None, title_justify="left")
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    d = plan.as_dict()
    table.add_row("derivative", f"{'per-sample ' if plan.per_sample else ''}{plan.kind}")
    table.add_row("mode", f"{plan.mode} ({plan.engine})")
    if plan.engine_note:
        table.add_row("note", escape(plan.engine_note))
    if plan.estimator != "exact":
        table.add_row("estimator", plan.estimator)
    table.add_row("points", f"{plan.points:,}")
    table.add_row("directions per point", f"{plan.directions:,}")
    table.add_row("chunking", f"{plan.points_per_chunk:,} points × {plan.directions_per_pass:,} directions per pass, {plan.chunks:,} passes")
    table.add_row("result", escape(f"{d['result_shape']} {d['dtype']} on {d['device']}, {format_bytes(plan.result_bytes)}"))
    table.add_row("peak memory (estimate)", f"{format_bytes(plan.peak_bytes)} of {format_bytes(plan.available_bytes)} available")
    console.print(table)


def show_info(console: Console, info: dict) -> None:
    """The Rich view of ``jaccli info``."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for key, value in info.items():
        if value is None or value == [] or value == {}:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list) and key.endswith("shape"):
            value = str(value)
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(key.replace("_", " "), escape(str(value)))
    console.print(table)


def _values(t: torch.Tensor):
    if t.numel() > JSON_MAX_VALUES:
        return None
    arr = t.detach().cpu().double().numpy()
    return np.where(np.isfinite(arr), arr, np.nan).tolist() if arr.ndim else float(arr)


def _json_number(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _tensor_json(t: torch.Tensor, s: dict, **extra) -> dict:
    """One result of a ``--json`` document: shape (and ``extra`` such as axes), dtype,
    statistics and, when small enough, the values."""
    return {
        "shape": list(t.shape),
        **extra,
        "dtype": str(t.dtype).removeprefix("torch."),
        "min": _json_number(s["min"]),
        "max": _json_number(s["max"]),
        "mean": _json_number(s["mean"]),
        "all_finite": s["all_finite"],
        "values": _values(t),
    }


def result_json(report: Report) -> dict:
    """The ``--json`` document of a computed derivative (schema in the README)."""
    results = {
        name: _tensor_json(t, report.stats.get(name) or stats(t), axes=report.axes[name])
        for name, t in report.results.items()
    }
    doc = {
        "schema": "jaccli.result",
        "version": JSON_SCHEMA_VERSION,
        "command": report.command,
        "model": report.model,
        "inputs": report.inputs,
        "wrt": report.wrt,
        "per_sample": report.per_sample,
        "estimator": report.estimator,
        "plan": report.plan.as_dict(),
        "results": results,
        "warnings": report.warnings,
        "seconds": round(report.seconds, 6),
        "saved_to": report.saved_to,
        "streamed": bool(report.stats),
        "resumed_points": report.resumed_points,
    }
    if report.stderr is not None:
        doc["stderr"] = {"probes": report.probes, "values": _values(report.stderr), **stats(report.stderr)}
    if report.summaries:
        doc["summary"] = {name: s.as_dict() for name, s in report.summaries.items()}
    return doc


def show_check(console: Console, report) -> None:
    """The Rich view of ``jaccli check``."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    table.add_row("points", escape(str(report.points)))
    table.add_row("Jacobian vs finite differences", f"{report.jacobian_error:.3g} relative (tolerance {report.tolerance:g})")
    if report.hessian_error is not None:
        table.add_row("Hessian vs differences", f"{report.hessian_error:.3g} relative (tolerance {10 * report.tolerance:g})")
    independent = report.batch_independent
    table.add_row("batch independent", "yes" if independent is True else Text(escape(str(independent)), style="red"))
    table.add_row("smooth", "yes" if not report.nonsmooth_ops else f"no: {', '.join(report.nonsmooth_ops)}")
    table.add_row("verdict", Text("PASS", style="bold green") if report.passed else Text("FAIL", style="bold red"))
    console.print(table)
