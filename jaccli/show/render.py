"""Presentation: Rich summaries for people, versioned JSON for programs.

Nothing here computes a derivative; it formats a :class:`Report` the CLI fills in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from jaccli.request.choices import DEFAULT_DIGITS
from jaccli.request.kinds import kind
from jaccli.show.summary import ValueSummary
from jaccli.engine import Plan
from jaccli.errors import format_bytes
from jaccli.show.layout import Layout, index_label

#: bump when a key of the JSON output changes meaning or disappears (adding keys is compatible)
JSON_SCHEMA_VERSION = 1
#: results with at most this many elements carry their values in the JSON output
JSON_MAX_VALUES = 10_000
#: a block with at most this many rows and columns prints whole; larger ones as a preview
TABLE_MAX = 12
#: rows (columns) a preview keeps from the end of a large block; the rest of its places go to the start
PREVIEW_TAIL = 2
#: Hessian output components shown as tables per point before a note says how many are left
MAX_COMPONENTS = 4
#: significant digits of table entries unless --digits says otherwise
#: input coordinates of a point printed in its table's title
MAX_COORDS = 6
#: shades of |value| / max|value| in the terminal picture, from small to largest
SHADES = "░▒▓█"



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


# --------------------------------------------------------------------------- tables of blocks


def format_numbers(values, digits: int = DEFAULT_DIGITS) -> list[str]:
    """Strings for ``values`` that line up in a right-justified column.

    One format for all: fixed point with as many decimals as give the largest magnitude
    ``digits`` significant digits, or scientific notation with ``digits`` significant
    digits when the magnitudes are very large or very small.

    >>> format_numbers([1.5, -0.25, 12.0], 3)
    ['1.5', '-0.2', '12.0']
    >>> format_numbers([1e-6, -3e-7], 2)
    ['1.0e-06', '-3.0e-07']
    """
    arr = np.asarray(values, dtype=float).reshape(-1)
    finite = arr[np.isfinite(arr)]
    big = float(np.abs(finite).max()) if finite.size else 0.0
    if big != 0 and not 1e-3 <= big < 10 ** max(digits, 6):
        return [f"{v:.{digits - 1}e}" if math.isfinite(v) else str(v) for v in arr.tolist()]
    decimals = max(0, digits - 1 - math.floor(math.log10(big))) if big else 0
    return [f"{v:.{decimals}f}" if math.isfinite(v) else str(v) for v in arr.tolist()]


def _take(block, rows: list[int], cols: list[int]) -> np.ndarray:
    """``block[rows][:, cols]`` as float64 numpy, from a numpy array or a tensor on any device."""
    sub = block[rows][:, cols]
    if hasattr(sub, "detach"):
        sub = sub.detach().cpu().double().numpy()
    return np.asarray(sub, dtype=float)


def _shown(n: int, limit: int = TABLE_MAX) -> list[int | None]:
    """Indices a table shows of ``n`` in at most ``limit`` places; None marks the gap of a
    preview, which keeps the first and the last :data:`PREVIEW_TAIL` indices."""
    if n <= limit:
        return list(range(n))
    tail = PREVIEW_TAIL if limit >= 8 else 1
    return list(range(max(1, limit - 1 - tail))) + [None] + list(range(n - tail, n))


def shade(block: np.ndarray) -> list[Text]:
    """Each row of ``block`` as a line of blocks, two characters per entry: the density
    says |value| / max|value| (a dot for an exact zero), the colour the sign (red
    positive, blue negative; colours only where the console has them)."""
    arr = np.asarray(block, dtype=float)
    finite = np.isfinite(arr)
    top = float(np.abs(arr[finite]).max()) if finite.any() else 0.0
    lines = []
    for row, ok in zip(arr, finite):
        line = Text()
        for v, good in zip(row.tolist(), ok.tolist()):
            if not good:
                line.append("??", style="bold magenta")
            elif v == 0 or top == 0:
                line.append(" ·", style="dim")
            else:
                level = min(len(SHADES), max(1, math.ceil(abs(v) / top * len(SHADES))))
                line.append(SHADES[level - 1] * 2, style="red" if v > 0 else "blue")
        lines.append(line)
    return lines


def block_table(
    block,
    lay: Layout,
    *,
    title: str,
    digits: int = DEFAULT_DIGITS,
    picture: bool = True,
    width: int | None = None,
    lead: dict[str, list[str]] | None = None,
) -> Table:
    """One point's block (a 2-D array or tensor) as a table: rows and columns labelled from ``lay``; a block
    larger than :data:`TABLE_MAX` either way (or wider than ``width`` characters) is a
    preview of its first and last rows and columns. Small blocks get a terminal picture
    as their last column; ``lead`` adds labelled columns of text (coordinates) first."""
    lead = lead or {}
    n_rows, n_cols = block.shape
    rows = _shown(n_rows)
    r_idx = [i for i in rows if i is not None]
    # only the shown part of a large block becomes float64 numpy; narrower previews take
    # a subset of the widest one's columns
    widest = [j for j in _shown(n_cols) if j is not None]
    corner = _take(block, r_idx, widest)
    where = {j: b for b, j in enumerate(widest)}
    drawn = picture and n_rows <= TABLE_MAX and n_cols <= TABLE_MAX and n_rows > 1 and n_cols > 1
    label_w = max(len(lay.row_label(i)) for i in r_idx) + sum(max(map(len, [k, *v])) + 3 for k, v in lead.items())
    for limit in range(TABLE_MAX, 1, -1):
        cols = _shown(n_cols, limit)
        c_idx = [j for j in cols if j is not None]
        texts = format_numbers(corner[:, [where[j] for j in c_idx]], digits)
        cell_w = max(map(len, texts)) if texts else 1
        used = label_w + sum(max(cell_w, len(lay.col_label(j)) if j is not None else 1) + 3 for j in cols)
        used += 2 * n_cols + 3 if drawn and len(c_idx) == n_cols else 0
        if width is None or used <= width:
            break
    cell = {(i, j): texts[a * len(c_idx) + b] for a, i in enumerate(r_idx) for b, j in enumerate(c_idx)}
    whole = len(r_idx) == n_rows and len(c_idx) == n_cols
    drawn = drawn and whole
    pics = shade(corner) if drawn else []
    if not whole:
        title += f" — preview: {len(r_idx)} of {n_rows} rows, {len(c_idx)} of {n_cols} columns"
    table = Table(title=escape(title), box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("", style="bold cyan", no_wrap=True)
    for name in lead:
        table.add_column(escape(name), justify="right", no_wrap=True, style="dim", header_style="bold cyan")
    for j in cols:
        table.add_column("…" if j is None else escape(lay.col_label(j)), justify="right", no_wrap=True, header_style="bold cyan")
    if drawn:
        table.add_column("", no_wrap=True)
    for i in rows:
        if i is None:
            table.add_row("⋮", *[""] * len(lead), *["⋮" if j is not None else "" for j in cols])
            continue
        cells = ["…" if j is None else cell[i, j] for j in cols]
        table.add_row(escape(lay.row_label(i)), *[v[i] for v in lead.values()], *cells, *([pics[i]] if drawn else []))
    return table


def _point_title(report: Report, name: str, point: int | None) -> str:
    if point is None:
        return ""
    text = f"sample {point}"
    args = report.args.get(name) or tuple(report.wrt[:1])
    x = report.arguments.get(args[0]) if args else None
    if x is not None and x.dim() >= 1 and x[point].numel() <= MAX_COORDS:
        coords = format_numbers(x[point].detach().cpu().double().numpy(), report.digits)
        where = coords[0] if x[point].dim() == 0 else "[" + ", ".join(coords) + "]"
        text += f" at {args[0]} = {where}"
    return text


def _coordinates(report: Report, name: str, points: int) -> dict[str, list[str]]:
    """``{x[0]: [...], x[1]: [...]}``: the input coordinates of the first points, when few."""
    args = report.args.get(name) or tuple(report.wrt[:1])
    x = report.arguments.get(args[0]) if args else None
    if x is None or x.dim() == 0 or x[0].numel() > 3:
        return {}
    flat = x[:points].reshape(points, -1).detach().cpu().double().numpy()
    return {
        index_label(args[0], tuple(x.shape[1:]), j): format_numbers(flat[:, j], report.digits)
        for j in range(flat.shape[1])
    }


def _result_title(report: Report, name: str) -> str:
    """``Jacobian``; ``Jacobian wrt t``, ``Hessian wrt t, x`` for one of several results."""
    head = kind(report.command).title
    return head if name == report.command else f"{head} wrt {', '.join(report.args.get(name, ()))}"


def _print_titled(console: Console, table: Table) -> None:
    """The table's title (markup) on a line of its own, then the table: a title as wide
    as a narrow table would wrap."""
    title, table.title = table.title, None
    console.print()
    console.print(f"[bold]{title}[/]")
    console.print(table)


def show_blocks(console: Console, report: Report, name: str) -> None:
    """Tables of a result: per shown point, its block (one per output component of a
    Hessian, up to :data:`MAX_COMPONENTS`); divergences and Laplacians as one table
    with a row per shown point."""
    t = report.results[name]
    lay = Layout.of(report.command, report.axes[name], t.shape, args=report.args.get(name, tuple(report.wrt[:1])))
    if lay.points == 0 or lay.rows * lay.cols == 0:
        return
    points = min(report.show, lay.points if report.per_sample else 1)
    if points == 0:
        return
    blocks = lay.blocks(t.detach()[:points] if report.per_sample else t.detach())
    head = _result_title(report, name)
    if lay.rows == 1 and lay.components == 1 and report.per_sample:
        # one value per output component: the points are the rows, their coordinates first
        stacked = replace(lay, comp_shape=(), row_shape=(points,), row_name="sample")
        table = block_table(
            blocks[:, 0, 0, :], stacked, title=f"{head}, first {points:,} of {lay.points:,} points",
            digits=report.digits, picture=False, width=console.width, lead=_coordinates(report, name, points),
        )  # fmt: skip
        _print_titled(console, table)
        return
    for p in range(points):
        where = _point_title(report, name, p if report.per_sample else None)
        shown = min(lay.components, MAX_COMPONENTS)
        for k in range(shown):
            part = f" of {lay.comp_label(k)}" if lay.comp_shape else ""
            title = f"{head}{part}" + (f", {where}" if where else "")
            _print_titled(console, block_table(blocks[p, k], lay, title=title, digits=report.digits, width=console.width))
        if lay.components > shown:
            console.print(
                f"[dim]… {lay.components - shown} more output components ({lay.components} in all); "
                "--save or --json for every value[/]"
            )


#: how the per-matrix classes read in the summary table
_CLASS_TEXT = {
    "positive": "positive",
    "negative": "negative",
    "zero": "zero",
    "positive_definite": "positive definite",
    "positive_semidefinite": "positive semidefinite",
    "negative_definite": "negative definite",
    "negative_semidefinite": "negative semidefinite",
    "indefinite": "indefinite",
}


def show_summary(console: Console, summary, *, title: str, digits: int = DEFAULT_DIGITS) -> None:
    """The Rich view of a :class:`jaccli.Summary`: min / median / max of each quantity."""
    from jaccli.show.summary import QUANTITIES

    over = f"{summary.points:,} point{'s' if summary.points != 1 else ''}"
    if summary.components > 1:
        over += f" × {summary.components:,} output components"
    r, c = summary.matrix
    title = escape(f"{title} summary: {r} × {c} matrices over {over}")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("", style="bold cyan", no_wrap=True)
    for col in ("min", "median", "max"):
        table.add_column(col, justify="right", no_wrap=True, header_style="bold cyan")
    stats_ = summary.stats()
    for key, label in QUANTITIES[summary.order].items():
        if key not in stats_:
            continue
        table.add_row(escape(label), *[("—" if v is None else f"{v:.{digits}g}") for v in stats_[key].values()])
    _print_titled(console, table)
    if summary.counts:
        what = "det J" if summary.order == 1 else "definiteness"
        parts = [f"{n:,} {_CLASS_TEXT[k]}" for k, n in summary.counts.items() if n]
        console.print(f"  [bold cyan]{what}:[/] " + escape(", ".join(parts) or "none"))
    if summary.order == 2 and summary.rtol is not None:
        console.print(f"  [dim]an eigenvalue counts as zero when |λ| ≤ {summary.rtol:.2g} · max|λ|[/]")
    if summary.non_finite:
        console.print(f"  [yellow]{summary.non_finite:,} matrices with NaN or Inf left out[/]")


# --------------------------------------------------------------------------- partials


def gate(name: str, t, tolerance: float, per_sample: bool, *, inputs: list[str] | None = None, x=None) -> dict:
    """One ``--fail-above`` verdict: the largest |value|, where it is (the point and, given
    the input names and tensor ``x``, its coordinates), and whether it passes."""
    flat = t.reshape(t.shape[0], -1) if per_sample and t.dim() else t.reshape(1, -1)
    per_point = flat.abs().amax(dim=1) if flat.numel() else flat.new_zeros(flat.shape[0])
    worst = int(per_point.argmax()) if per_point.numel() else 0
    top = float(per_point[worst]) if per_point.numel() else 0.0
    at = None
    if x is not None and inputs:
        row = (x[worst] if per_sample else x).reshape(-1)
        if row.numel() == len(inputs):
            at = {n: float(v) for n, v in zip(inputs, row.tolist())}
    return {
        "name": name,
        "tolerance": tolerance,
        "max_abs": _json_number(top),
        "worst_point": worst if per_sample else None,
        "worst_inputs": at,
        "passed": bool(top <= tolerance),  # NaN fails
    }


def gate_line(g: dict) -> str:
    """``r: max |r| = 0.1506 > 0.001 at point 337 (t=0.52, x=3.1)`` — the comparison as it
    came out, where, and at which inputs."""
    top = g["max_abs"]
    sign = "≤" if g["passed"] else ">"
    value = "nan" if top is None else f"{top:.4g}"
    where = f" at point {g['worst_point']}" if g["worst_point"] is not None else ""
    if g.get("worst_inputs"):
        where += " (" + ", ".join(f"{n}={v:.4g}" for n, v in g["worst_inputs"].items()) + ")"
    return f"{g['name']}: max |{g['name']}| = {value} {sign} {g['tolerance']:g}{where}"


def partials_json(result, model: dict, inputs: dict, per_sample: bool, gates: list[dict],
                  warnings: list[str], seconds: float, saved_to) -> dict:  # fmt: skip
    """The ``--json`` document of ``jaccli partials`` (schema in the README)."""
    results = {name: _tensor_json(t, stats(t)) for name, t in result.items()}
    return {
        "schema": "jaccli.partials",
        "version": JSON_SCHEMA_VERSION,
        "model": model,
        "inputs": inputs,
        "names": {"inputs": result.inputs, "outputs": result.outputs},
        "per_sample": per_sample,
        "points": result.points,
        "engine": result.engine,
        "engine_note": result.engine_note,
        "compiled": result.compiled,
        "results": results,
        "gates": gates,
        "passed": all(g["passed"] for g in gates),
        "warnings": warnings,
        "seconds": round(seconds, 6),
        "saved_to": saved_to,
    }


def show_partials(console: Console, doc: dict, result, *, show: int, digits: int = DEFAULT_DIGITS) -> None:
    """The Rich view of ``jaccli partials``: one row per name, its statistics and first values."""
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold cyan", no_wrap=True)
    head.add_column()
    head.add_row("model", escape(f"{doc['model']['path']} ({doc['model']['format']})"))
    head.add_row("names", escape(f"inputs {', '.join(doc['names']['inputs'])}; outputs {', '.join(doc['names']['outputs'])}"))
    head.add_row("points", f"{doc['points']:,} ({'per sample' if doc['per_sample'] else 'whole input'}), {doc['engine']} engine")
    head.add_row("time", f"{doc['seconds']:.3f} s")
    console.print(head)
    rows = []
    for name, r in doc["results"].items():
        t = result[name]
        firsts = [
            format_numbers([float(t[i])], digits)[0] if t[i].numel() == 1 else f"[{t[i].numel()} values]"
            for i in range(min(show, doc["points"]) if doc["per_sample"] else 0)
        ]
        rows.append([escape(name), escape(str(r["shape"])), *format_numbers([r["min"], r["max"], r["mean"]], digits), *firsts])
    # Numbers are never wrapped or cut: the "point i" columns that do not fit the terminal are dropped.
    fit = len(rows[0]) if rows else 5
    while True:
        table = Table(box=box.SIMPLE_HEAD)
        for col, justify in (("name", "left"), ("shape", "left"), ("min", "right"), ("max", "right"), ("mean", "right")):
            table.add_column(col, justify=justify, style="bold" if col == "name" else None, no_wrap=True)
        for i in range(fit - 5):
            table.add_column(f"point {i}", justify="right", no_wrap=True)
        for row in rows:
            table.add_row(*row[:fit])
        if fit <= 5 or console.measure(table, options=console.options.update_width(1 << 16)).maximum <= console.width:
            break
        fit -= 1
    console.print(table)
    for g in doc["gates"]:
        verdict = Text("PASS", style="bold green") if g["passed"] else Text("FAIL", style="bold red")
        console.print(Text.assemble(f"{gate_line(g)}: ", verdict))


def show_value_summary(console: Console, summary: ValueSummary, *, title: str, digits: int = DEFAULT_DIGITS) -> None:
    """The Rich view of a :class:`~jaccli.show.summary.ValueSummary`: one row per output component."""
    over = f"{summary.points:,} point{'s' if summary.points != 1 else ''}"
    table = Table(title=escape(f"{title} summary over {over}"), box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("", style="bold cyan", no_wrap=True)
    for col in ("min", "median", "max", "mean", "max |·|", "at point"):
        table.add_column(col, justify="right", no_wrap=True, header_style="bold cyan")
    for name, r in summary.rows.items():
        nums = [("—" if r[k] is None else f"{r[k]:.{digits}g}") for k in ("min", "median", "max", "mean", "max_abs")]
        table.add_row(escape(name), *nums, "—" if r["worst_point"] is None else f"{r['worst_point']:,}")
    _print_titled(console, table)
    if summary.non_finite:
        console.print(f"  [yellow]{summary.non_finite:,} values NaN or Inf left out[/]")
