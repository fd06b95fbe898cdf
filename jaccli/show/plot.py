"""Pictures of derivative results with matplotlib (the optional extra ``jaccli[plot]``).

- One input coordinate per point (u(x) on a line, a trajectory in t): every result
  against that coordinate, the first output components as lines with a legend
  (u_x(x), u_xx(x), Δu(x)).
- Otherwise a heat map of each point's matrix: the mean |J| over the points, or the
  signed values of the one point of a whole-input request; Hessians one map per output
  component (the first few). Divergences and Laplacians of several coordinates per
  point: histograms over the points.
- With summaries: histograms of the singular values (and log|det J|) or eigenvalues.

matplotlib is imported only when a picture is drawn, and figures are drawn on the Agg
canvas without pyplot (no display, no global backend switch). Files are written
atomically, with the title in their metadata (PNG text chunk, SVG ``<dc:title>``,
PDF info).

>>> import torch, tempfile, pathlib
>>> x = torch.linspace(-2, 2, 50)[:, None]
>>> J = torch.stack([1 - torch.tanh(x) ** 2], 1)            # d tanh / dx: [50, 1, 1]
>>> path = pathlib.Path(tempfile.mkdtemp()) / "j.png"
>>> plot_results(path, {"jacobian": J}, kind="jacobian", per_sample=True, coords={"x": x}, title="tanh'")
>>> path.read_bytes()[:8] == PNG_MAGIC
True
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from jaccli.errors import DependencyError, UsageError
from jaccli.io import check_writable, write_atomically
from jaccli.request.kinds import kind as kind_of
from jaccli.show.layout import Layout, axis_names

#: suffix -> matplotlib format
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: output components drawn as lines against a 1-D input
MAX_LINES = 6
#: Hessian output components drawn as heat maps
MAX_MAPS = 4
#: spectra with at most this many values per matrix get one histogram per value
MAX_SPECTRUM_LINES = 4
#: tick labels are written out up to this many rows or columns
MAX_TICKS = 24
# A line plot's y label, the symbol of a heat map and whether a kind has a row of output
# components per point rather than a matrix are fields of its record (jaccli.request.kinds).


def _vector(kind: str) -> bool:
    """Whether ``kind`` has a row of output components per point, not a matrix."""
    return kind_of(kind).groups[1] is None


def require_matplotlib():
    """The matplotlib module, or a :class:`DependencyError` naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise DependencyError(
            "plots need matplotlib, which is not installed", hint="pip install 'jaccli[plot]'"
        ) from None
    return matplotlib


def check_path(path: str | os.PathLike, *, force: bool = False) -> str:
    """The matplotlib format of ``path`` by suffix; fails now if it cannot be written."""
    name = os.fspath(path)
    suffix = Path(name).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(
            "cannot tell the picture format from the suffix",
            where=name,
            expected="one of " + ", ".join(FORMATS),
            got=suffix or "no suffix",
        )
    check_writable(name, force=force)
    return FORMATS[suffix]


def _values(t):
    return t.detach().cpu().double().numpy()


def _one_coordinate(coords: Mapping, arg: str | None, points: int):
    """The input coordinate of each point when the argument has exactly one per point."""
    x = coords.get(arg) if arg is not None else None
    if x is None or x.dim() == 0 or x.shape[0] != points or x[0].numel() != 1:
        return None
    return _values(x).reshape(points)


def _lines(ax, values, x, lay: Layout, kind: str, arg: str, name: str, connect: bool = True) -> None:
    """Each of the first output components against the input coordinate; dots instead of
    lines (``connect=False``) when other inputs vary from point to point too."""
    order = x.argsort()
    flat = values.reshape(len(x), -1)
    n = flat.shape[1]
    # the series are the block's rows (Jacobian, Hessian shown as a column) or columns (div, Δ)
    series = lay.col_label if _vector(kind) else lay.row_label
    for k in range(min(n, MAX_LINES)):
        label = series(k) if n > 1 else "out"
        ax.plot(x[order], flat[order, k], "-" if connect else ".", label=label, lw=1.4, ms=3)
    ax.set_xlabel(arg)
    ax.set_ylabel(kind_of(kind).line_label.format(out="out", x=arg))
    more = f" (first {MAX_LINES} of {n} outputs)" if n > MAX_LINES else ""
    ax.set_title(f"{name}{more}", fontsize=10)
    ax.axhline(0, color="0.6", lw=0.6)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def _ticks(ax, lay: Layout, rows: int, cols: int) -> None:
    if rows <= MAX_TICKS:
        ax.set_yticks(range(rows), [lay.row_label(i) for i in range(rows)], fontsize=8)
    if cols <= MAX_TICKS:
        ax.set_xticks(range(cols), [lay.col_label(j) for j in range(cols)], fontsize=8, rotation=90 if cols > 6 else 0)
    ax.set_ylabel(f"{lay.row_name} ({rows})")
    ax.set_xlabel(f"{lay.col_name or lay.col_title} ({cols})")


def _heat(fig, ax, block, lay: Layout, title: str, signed: bool) -> None:
    if signed:
        top = float(abs(block).max()) or 1.0
        image = ax.imshow(block, cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto", interpolation="nearest")
    else:
        image = ax.imshow(block, cmap="viridis", vmin=0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.85)
    _ticks(ax, lay, *block.shape)
    ax.set_title(title, fontsize=10)


def _hist(ax, values, title: str, xlabel: str, zero_line: bool = False, labels: list[str] | None = None) -> None:
    """A histogram of ``values`` (or of each column of it, labelled, when ``labels`` is given)."""
    import numpy as np

    columns = [values[:, k] for k in range(values.shape[1])] if labels else [values]
    columns = [v[np.isfinite(v)] for v in columns]
    size = max(v.size for v in columns)
    bins = np.histogram_bin_edges(np.concatenate(columns), bins=min(60, max(10, int(math.sqrt(size)) + 1)))
    for v, label in zip(columns, labels or [None]):
        ax.hist(v, bins=bins, alpha=0.65 if labels else 0.85, label=label, histtype="stepfilled")
    if labels:
        ax.legend(fontsize=8)
    if zero_line:
        ax.axvline(0, color="0.2", lw=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)


def _spectrum_labels(order: int, k: int) -> list[str] | None:
    """Legend of each singular value (largest first) or eigenvalue (smallest first), when few."""
    if k > MAX_SPECTRUM_LINES or k < 2:
        return None
    if order == 1:
        return ["σ_max"] + [f"σ_{i + 1}" for i in range(1, k - 1)] + ["σ_min"]
    return ["λ_min"] + [f"λ_{i + 1}" for i in range(1, k - 1)] + ["λ_max"]


def figure(
    results: Mapping[str, object],
    *,
    kind: str,
    title: str,
    axes: Mapping[str, list[str]] | None = None,
    args: Mapping[str, tuple[str, ...]] | None = None,
    per_sample: bool = False,
    coords: Mapping[str, object] | None = None,
    summaries: Mapping[str, object] | None = None,
):
    """The matplotlib ``Figure`` of ``results`` (``{name: tensor}`` as the CLI names them).

    ``axes`` gives each result's axis names (default: ``sample`` when ``per_sample``, then
    ``out`` and one ``in`` axis per differentiated argument); ``args`` the argument names
    its input axes belong to (labels, and the coordinate of a line plot); ``coords`` the
    input tensors by argument name; ``summaries`` a :class:`jaccli.Summary` per result.
    """
    import numpy as np

    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    coords = dict(coords or {})
    args = dict(args or {})
    summaries = dict(summaries or {})
    draws = []
    for name, t in results.items():
        arg = args.get(name)
        first = arg[0] if arg else next(iter(coords), None)
        names = (axes or {}).get(name) or _default_axes(kind, t, per_sample, coords.get(first))
        lay = Layout.of(kind, names, t.shape, args=arg or (), per_sample=per_sample)
        values = _values(t)
        line_x = _one_coordinate(coords, first, lay.points) if per_sample else None
        if line_x is not None and all(_one_coordinate(coords, a, lay.points) is not None for a in (arg or ())):
            alone = len(coords) == 1
            draws.append(lambda fig, ax, v=values, x=line_x, lay=lay, a=first, n=name: _lines(ax, v, x, lay, kind, a, n, alone))
        elif _vector(kind) and lay.points > 1:
            flat = values.reshape(lay.points, -1)
            for k in range(min(flat.shape[1], MAX_MAPS)):
                xlabel = kind_of(kind).line_label.format(out=lay.col_label(k) if lay.cols > 1 else "out", x=first)
                what = f"{name} over {lay.points:,} points"
                draws.append(lambda fig, ax, v=flat[:, k], xl=xlabel, w=what: _hist(ax, v, w, xl))
        else:
            blocks = lay.blocks(values)
            several = lay.points > 1
            shown = blocks if not several else np.abs(blocks).mean(0, keepdims=True)
            sym = kind_of(kind).symbol
            for k in range(min(lay.components, MAX_MAPS)):
                part = f" of {lay.comp_label(k)}" if lay.comp_shape else ""
                what = f"mean |{sym}| over {lay.points:,} points" if several else f"{sym}"
                more = f" ({MAX_MAPS} of {lay.components})" if lay.components > MAX_MAPS and k == 0 else ""
                draws.append(
                    lambda fig, ax, b=shown[0, k], t_=f"{name}{part}: {what}{more}", lay=lay, s=not several: _heat(fig, ax, b, lay, t_, s)
                )
        s = summaries.get(name)
        if s is not None:
            spec = s.spectra.numpy()
            labels = _spectrum_labels(s.order, spec.shape[1])
            spec = spec if labels else spec.reshape(-1)
            over = f"{s.points:,} points" + (f" × {s.components:,} outputs" if s.components > 1 else "")
            if s.order == 1:
                draws.append(lambda fig, ax, v=spec, n=name, o=over, lb=labels: _hist(ax, v, f"{n}: singular values, {o}", "σ", labels=lb))
                if "logabsdet" in s.per_point:
                    ld = s.per_point["logabsdet"].numpy()
                    draws.append(lambda fig, ax, v=ld, n=name, o=over: _hist(ax, v, f"{n}: log|det J|, {o}", "log|det J|", True))
            else:
                draws.append(lambda fig, ax, v=spec, n=name, o=over, lb=labels: _hist(ax, v, f"{n}: eigenvalues, {o}", "λ", True, lb))
    ncols = min(2, len(draws))
    nrows = math.ceil(len(draws) / ncols)
    fig = Figure(figsize=(5.6 * ncols, 4.0 * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    for i, draw in enumerate(draws):
        draw(fig, fig.add_subplot(nrows, ncols, i + 1))
    fig.suptitle(title, fontsize=12, fontweight="bold")
    return fig


def _default_axes(kind: str, t, per_sample: bool, x) -> list[str]:
    """Axis names when none are given: one ``in`` group as the input's shape says."""
    n_in = (x.dim() - (1 if per_sample else 0)) if x is not None else 1
    return axis_names(per_sample, t.dim(), (n_in,) * kind_of(kind).order)


def save_figure(fig, path: str | os.PathLike, *, title: str, force: bool = False) -> None:
    """Write ``fig`` to ``path`` (format by suffix) atomically, ``title`` in the metadata."""
    fmt = check_path(path, force=force)
    write_atomically(path, lambda fh: fig.savefig(fh, format=fmt, metadata={"Title": title}, dpi=100), force=force)


def plot_results(path: str | os.PathLike, results: Mapping[str, object], *, title: str, force: bool = False, **kw) -> None:
    """Draw ``results`` (see :func:`figure` for the keywords) into ``path``: ``.png``,
    ``.svg`` or ``.pdf``. Needs matplotlib (``pip install 'jaccli[plot]'``)."""
    check_path(path, force=force)
    save_figure(figure(results, title=title, **kw), path, title=title, force=force)
