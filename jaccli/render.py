"""Presentation: Rich summaries for people, versioned JSON for programs.

Nothing here computes a derivative; it formats a :class:`Report` the CLI fills in.
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

from .engine import Plan, format_bytes

#: bump when a key of the JSON output changes meaning or disappears (adding keys is compatible)
JSON_SCHEMA_VERSION = 1
#: results with at most this many elements carry their values in the JSON output
JSON_MAX_VALUES = 10_000

KIND_TITLES = {
    "jacobian": "Jacobian",
    "hessian": "Hessian",
    "divergence": "divergence",
    "laplacian": "Laplacian",
}


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


def axis_names(per_sample: bool, ndim: int, in_ndims: tuple[int, ...] = ()) -> list[str]:
    """Names of a result's axes: ``sample``, ``out``, ``in`` (and ``in'`` for a Hessian).

    ``in_ndims`` holds the number of input axes the result ends with: none for a
    divergence or Laplacian, one entry for a Jacobian, two for a Hessian block.
    Several axes of one kind are numbered (``out0``, ``out1``).
    """

    def group(name: str, count: int) -> list[str]:
        return [name] if count == 1 else [f"{name}{i}" for i in range(count)]

    lead = ["sample"] if per_sample else []
    n_out = ndim - len(lead) - sum(in_ndims)
    names = lead + group("out", n_out)
    for name, count in zip(("in", "in'"), in_ndims):
        names += group(name, count)
    return names


def named_shape(names: list[str], shape) -> str:
    """``[sample=100000, out=501, in=1]``."""
    return "[" + ", ".join(f"{n}={s}" for n, s in zip(names, shape)) + "]"


def stats(t: torch.Tensor) -> dict:
    """min, max, mean over finite values, and whether every value is finite."""
    flat = t.detach().reshape(-1)
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


def preview(t: torch.Tensor, per_sample: bool) -> str:
    """The first and last few values of the first point's block (``per_sample``) or of the
    whole result, flattened: a 6-axis Hessian block printed whole would fill the screen."""
    arr = t.detach().cpu().numpy()
    if per_sample and arr.ndim > 1:
        arr = arr[0]
    with np.printoptions(precision=5, threshold=12, edgeitems=4, linewidth=10_000, suppress=False):
        return np.array2string(np.asarray(arr).reshape(-1), separator=", ")


def _title(report: Report) -> str:
    name = KIND_TITLES.get(report.command, report.command)
    prefix = "per-sample " if report.per_sample else ""
    if report.command == "divergence" and report.estimator == "hutchinson":
        return f"{prefix}divergence (Hutchinson, {report.probes} probes)"
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
        s = stats(t)
        table.add_row(label, escape(f"{named_shape(names, t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"))
        if s["min"] is not None:
            table.add_row("  min / max / mean", f"{s['min']:.6g} / {s['max']:.6g} / {s['mean']:.6g}")
        finite = Text("yes", style="green") if s["all_finite"] else Text("NO", style="bold red")
        table.add_row("  all finite", finite)
        where = "sample 0, flattened" if report.per_sample else "flattened"
        table.add_row(f"  preview ({where})", escape(preview(t, report.per_sample)))
    if report.stderr is not None:
        se = stats(report.stderr)
        table.add_row("standard error", f"max {se['max']:.3g}, mean {se['mean']:.3g}")
    table.add_row("time", f"{report.seconds:.3f} s")
    if report.saved_to:
        table.add_row("saved to", escape(report.saved_to))
    console.print(table)


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


def result_json(report: Report) -> dict:
    """The ``--json`` document of a computed derivative (schema in the README)."""
    results = {}
    for name, t in report.results.items():
        s = stats(t)
        results[name] = {
            "shape": list(t.shape),
            "axes": report.axes[name],
            "dtype": str(t.dtype).removeprefix("torch."),
            "min": _json_number(s["min"]),
            "max": _json_number(s["max"]),
            "mean": _json_number(s["mean"]),
            "all_finite": s["all_finite"],
            "values": _values(t),
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
    }
    if report.stderr is not None:
        doc["stderr"] = {"probes": report.probes, "values": _values(report.stderr), **stats(report.stderr)}
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
