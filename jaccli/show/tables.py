"""The tables of a result: per shown point its block, labelled from its :class:`~.layout.Layout`
(a preview of the first and last rows and columns where the block is large, a terminal
picture where it is small), and the tables of ``--summary``.

Imports: numpy, rich, :mod:`.layout`, :mod:`jaccli.request`; :mod:`.render`'s
:class:`~.render.Report` for annotations only.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from jaccli.request.choices import DEFAULT_DIGITS
from jaccli.request.kinds import kind
from jaccli.show.layout import Layout, index_label

if TYPE_CHECKING:
    from jaccli.show.render import Report
    from jaccli.show.summary import ValueSummary

#: a block with at most this many rows and columns prints whole; larger ones as a preview
TABLE_MAX = 12
#: rows (columns) a preview keeps from the end of a large block; the rest of its places go to the start
PREVIEW_TAIL = 2
#: Hessian output components shown as tables per point before a note says how many are left
MAX_COMPONENTS = 4
#: input coordinates of a point printed in its table's title
MAX_COORDS = 6
#: shades of |value| / max|value| in the terminal picture, from small to largest
SHADES = "░▒▓█"


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
