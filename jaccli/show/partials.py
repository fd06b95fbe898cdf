"""The output of ``jaccli partials``: ``--fail-above`` gates (verdict, worst point, its
inputs), the versioned JSON document and the Rich table of the named partials.

Imports: torch (through the results it is given), rich, :mod:`.render` (statistics, the JSON
schema version), :mod:`.tables` (number formats), :mod:`jaccli.request`.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from jaccli.request.choices import DEFAULT_DIGITS
from jaccli.show.render import JSON_SCHEMA_VERSION, _json_number, _tensor_json, stats
from jaccli.show.tables import format_numbers


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
