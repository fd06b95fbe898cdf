"""Showing curvature and gradients: Rich tables for people, the spectral-density picture.

Owns :func:`show_curvature` (a table of the figures, the ``--by-layer`` table, standard
errors), :func:`show_grads` (the gradient and a summary of per-sample gradient norms) and
:func:`plot_density` (the SLQ density, Gaussian-smoothed, with the nodes as a rug; written
atomically by :func:`jaccli.show.plot.save_figure`). The JSON documents are the results'
own ``as_dict()``.

Imports: :mod:`jaccli.curvature` (results, the smoothing), :mod:`.plot`, rich, numpy.
"""

from __future__ import annotations

import os

import numpy as np
from rich.console import Console
from rich.table import Table

from jaccli.curvature.spectral import smooth_density


#: the most parameters whose full matrix is printed as a table (larger ones: --save)
SMALL = 8


def _g(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def _params_line(result) -> str:
    names = [p.name for p in result.params]
    shown = ", ".join(names[:6]) + (f", … ({len(names)} tensors)" if len(names) > 6 else "")
    return f"{sum(p.size for p in result.params):,} parameters: {shown}"


def _figures(title: str, result, gradient_norm: float, digits: int) -> Table:
    """The table both commands start with: samples, parameters, the loss and its gradient's norm."""
    t = Table(title=title, title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("samples", f"{result.samples:,}")
    t.add_row("parameters", _params_line(result))
    t.add_row("loss", _g(result.loss_value, digits))
    t.add_row("‖gradient‖", _g(gradient_norm, digits))
    return t


def show_curvature(console: Console, result, *, model: str, digits: int = 6, saved_to: str | None = None) -> None:
    """The figures of a :class:`jaccli.CurvatureResult` as tables."""
    t = _figures(f"{result.matrix} of the {result.loss} loss ({result.reduction}) of {model}", result,
                 result.gradient_norm, digits)  # fmt: skip
    if result.trace is not None:
        err = "exact" if result.trace_stderr is None else f"± {result.trace_stderr:.3g} ({result.trace_estimator} estimate)"
        t.add_row("trace", f"{_g(result.trace, digits)}  {err}")
    if result.diag is not None:
        est = "" if result.diag_stderr is None else "  (Hutchinson estimate)"
        t.add_row("diagonal", f"min {_g(float(result.diag.min()), digits)}, max {_g(float(result.diag.max()), digits)}{est}")
    if result.eigenvalues is not None:
        t.add_row(f"eigenvalues ({result.which})", ", ".join(_g(float(w), digits) for w in result.eigenvalues))
    if result.density is not None:
        n, w = result.density["nodes"], result.density["weights"]
        mean = float((n * w).sum() / n.shape[0])
        t.add_row("spectral density", f"{n.shape[0]} probes × {n.shape[1]} Lanczos steps; support "
                  f"[{_g(float(n[w > 0].min()), 4)}, {_g(float(n[w > 0].max()), 4)}], mean eigenvalue {_g(mean, digits)}")  # fmt: skip
    if result.full is not None:
        t.add_row("full matrix", f"{result.size:,} × {result.size:,}" + ("" if saved_to else " (--save to keep it)"))
    t.add_row("products", f"{result.products:,} ({result.seconds:.2f} s)")
    if saved_to:
        t.add_row("saved to", saved_to)
    console.print(t)
    if result.full is not None and result.size <= SMALL:
        m = Table(title=f"the {result.matrix} ({result.size} × {result.size})", title_justify="left")
        labels = [f"{p.name}{'' if p.size == 1 else list(np.unravel_index(i, p.shape))}" for p in result.params
                  for i in range(p.size)]  # fmt: skip
        m.add_column("")
        for lab in labels:
            m.add_column(lab, justify="right")
        for lab, row in zip(labels, result.full):
            m.add_row(lab, *(_g(float(v), digits) for v in row))
        console.print(m)
    if result.by_layer:
        b = Table(title="diagonal blocks, one per parameter tensor", title_justify="left")
        for col in ("tensor", "shape", "size", "trace", f"eigenvalues ({result.which})"):
            b.add_column(col, justify="left" if col in ("tensor", "shape") else "right")
        for row in result.by_layer:
            tr = _g(row["trace"], digits) + ("" if row["trace_stderr"] is None else f" ± {row['trace_stderr']:.2g}")
            b.add_row(row["name"], str(row["shape"]), f"{row['size']:,}", tr, ", ".join(_g(w, digits) for w in row["eigenvalues"]))
        console.print(b)
    if result.standard_errors is not None:
        s = Table(title="standard errors √diag(I⁻¹)", title_justify="left")
        s.add_column("parameter")
        s.add_column("standard error", justify="right")
        shown = 0
        for p in result.params:
            for i in range(p.size):
                if shown == 50:
                    break
                idx = "" if p.size == 1 else str(list(np.unravel_index(i, p.shape)))
                s.add_row(f"{p.name}{idx}", _g(float(result.standard_errors[p.offset + i]), digits))
                shown += 1
        console.print(s)
        if result.size > 50:
            console.print(f"(first 50 of {result.size:,}; --json or --save for all)")
    for note in result.notes:
        console.print(f"[dim]note: {note}[/]")


def show_grads(console: Console, result, *, model: str, digits: int = 6) -> None:
    """The gradient of a :class:`jaccli.GradsResult` and its per-sample norms."""
    t = _figures(f"gradient of the {result.loss} loss ({result.reduction}) of {model}", result,
                 float(result.gradient.norm()), digits)  # fmt: skip
    for p in result.params:
        part = result.gradient[p.offset : p.offset + p.size]
        t.add_row(f"  ‖∂L/∂{p.name}‖", _g(float(part.norm()), digits))
    if result.norms is not None:
        n = result.norms
        t.add_row("per-sample ‖gᵢ‖", f"min {_g(n['min'], 4)}, median {_g(n['median'], 4)}, mean {_g(n['mean'], 4)}, "
                  f"max {_g(n['max'], 4)}")  # fmt: skip
        t.add_row("largest ‖gᵢ‖", ", ".join(f"#{d['sample']}: {_g(d['norm'], 4)}" for d in n["largest"]))
        if result.path:
            t.add_row("per-sample by", {"linear": "δxᵀ of linear layers (one batched backward)",
                                        "linear+vmap": "δxᵀ of linear layers, vmap(grad) for the rest"}
                      .get(result.path, result.path))  # fmt: skip
        if result.resumed_samples:
            t.add_row("resumed", f"{result.resumed_samples:,} samples were already written")
    if result.saved_to:
        t.add_row("saved to", result.saved_to)
    t.add_row("time", f"{result.seconds:.2f} s")
    console.print(t)


def plot_density(path: str | os.PathLike, result, *, title: str, force: bool = False) -> None:
    """Draw the SLQ spectral density of ``result`` into ``path`` (.png, .svg, .pdf)."""
    from jaccli.show.plot import check_path, require_matplotlib, save_figure

    check_path(path, force=force)
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nodes, weights = result.density["nodes"], result.density["weights"]
    live = nodes[weights > 0]
    lo, hi = float(live.min()), float(live.max())
    span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    sigma = span / 100  # a hundredth of the support, as PyHessian's density plots use
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 1000)
    dens = smooth_density(nodes, weights, grid, sigma)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    floor = float(dens.max()) * 1e-6  # six decades: the outliers' bumps show, the gaps between them do not dominate
    ax.semilogy(grid, np.maximum(dens, floor), lw=1.4)
    ax.plot(live, np.full(live.shape, floor), "|", color="0.3", ms=8, label="Ritz values (quadrature nodes)")
    ax.set_ylim(bottom=floor / 2)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density (Gaussian-smoothed, σ = span/100)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    save_figure(fig, path, title=title, force=force)
