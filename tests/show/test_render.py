"""What a person sees: tables of each point's block (right values in the right cells), previews,
terminal shading, summaries; colours only on a terminal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import jaccli
from jaccli.show import render
from jaccli.show import tables as show_tables
from jaccli.cli.main import app
from jaccli.errors import EXIT_CODES
from jaccli.show.layout import Layout
from problems import EXAMPLES, save_export

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ex(name: str) -> str:
    return str(EXAMPLES / name)


def _number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def tables(text: str) -> dict[str, dict]:
    """``{title: {"header": [...], "rows": {label: [numbers as printed]}}}`` of every table printed."""
    found, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if i + 2 < len(lines) and set(lines[i + 2].strip()) == {"─"}:
            header = lines[i + 1].split()
            rows = {}
            for row in lines[i + 3 :]:
                if not row.strip():
                    break
                label, *rest = row.split()
                rows[label] = [t for t in rest if _number(t) or t in ("…", "⋮")]
            found[line.strip()] = {"header": header, "rows": rows}
    return found


@pytest.fixture
def x0(tmp_path):
    np.save(tmp_path / "x0.npy", np.load(ex("field_x.npy"))[0])
    np.save(tmp_path / "x3.npy", np.load(ex("field_x.npy"))[:3])
    return tmp_path


def test_whole_input_jacobian_is_a_labelled_matrix(x0):
    result = run("jacobian", ex("field.pt"), x0 / "x0.npy")
    assert result.exit_code == 0, result.stderr
    J = jaccli.jacobian(jaccli.load_model(ex("field.pt")), jaccli.load_tensor(x0 / "x0.npy")).numpy()
    table = tables(result.stdout)["Jacobian"]
    assert table["header"] == ["x[0]", "x[1]", "x[2]"]
    assert list(table["rows"]) == ["out[0]", "out[1]", "out[2]"]
    want = show_tables.format_numbers(J, 4)
    for i in range(3):
        assert table["rows"][f"out[{i}]"] == want[3 * i : 3 * i + 3]
        np.testing.assert_allclose([float(v) for v in table["rows"][f"out[{i}]"]], J[i], atol=5e-4)


def test_per_sample_hessians_show_the_first_points_with_their_coordinates(x0):
    result = run("hessian", ex("potential.pt"), x0 / "x3.npy", "-p", "--show", "2", "--digits", "6")
    assert result.exit_code == 0, result.stderr
    found = tables(result.stdout)
    x = np.load(x0 / "x3.npy")
    H = jaccli.hessian(jaccli.load_model(ex("potential.pt")), torch.from_numpy(x), per_sample=True).numpy()
    titles = [t for t in found if t.startswith("Hessian, sample")]
    assert len(titles) == 2 and titles[1].startswith("Hessian, sample 1 at x = [")
    coords = titles[1].split("= [")[1].rstrip("]").split(", ")
    np.testing.assert_allclose([float(c) for c in coords], x[1], atol=1e-5)
    rows = found[titles[1]]["rows"]
    assert list(rows) == ["x[0]", "x[1]", "x[2]"] and found[titles[1]]["header"] == ["x[0]", "x[1]", "x[2]"]
    np.testing.assert_allclose(np.array([[float(v) for v in rows[f"x[{i}]"]] for i in range(3)]), H[1], atol=5e-6)


def test_show_all_and_show_none(x0):
    every = run("jacobian", ex("field.pt"), x0 / "x3.npy", "-p", "--show", "all")
    assert sum(t.startswith("Jacobian, sample") for t in tables(every.stdout)) == 3
    assert not any(t.startswith("Jacobian") for t in tables(run("jacobian", ex("field.pt"), x0 / "x3.npy", "-p", "--show", "0").stdout))
    assert not any(t.startswith("Jacobian") for t in tables(run("jacobian", ex("field.pt"), x0 / "x0.npy", "--show", "0").stdout))


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--show", "all"], ["--show all would print 500 tables", "at most 100"]),
        (["--show", "-2"], ["bad --show", "or all"]),
        (["--digits", "0"], ["--digits", "1 to 17"]),
    ],
)
def test_bad_show_and_digits(args, needles):
    result = run("jacobian", ex("field.pt"), ex("field_x.npy"), "-p", *args)
    assert result.exit_code == EXIT_CODES[jaccli.UsageError]
    (line,) = result.stderr.strip().splitlines()
    assert all(n in line for n in needles), line


def test_many_output_components_end_with_a_note(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh()).eval()
    save_export(net, torch.zeros(4, 2), tmp_path / "m.pt2")
    np.save(tmp_path / "x.npy", np.array([[0.3, -0.2]], np.float32))
    result = run("hessian", tmp_path / "m.pt2", tmp_path / "x.npy", "-p")
    assert result.exit_code == 0, result.stderr
    titles = [t for t in tables(result.stdout) if t.startswith("Hessian of out[")]
    assert titles == [f"Hessian of out[{k}], sample 0 at input = [0.3000, -0.2000]" for k in range(show_tables.MAX_COMPONENTS)]
    assert "2 more output components (6 in all)" in result.stdout


def test_large_blocks_are_previews_with_labels():
    result = run("jacobian", ex("pinn.pt"), ex("pinn_x.npy"), "-p")
    assert result.exit_code == 0, result.stderr
    (title,) = [t for t in tables(result.stdout) if "preview" in t]
    assert title.startswith("Jacobian, sample 0 at input = [0") and "of 501 rows, 1 of 1 columns" in title
    rows = tables(result.stdout)[title]["rows"]
    assert list(rows)[:2] == ["out[0]", "out[1]"] and list(rows)[-2:] == ["out[499]", "out[500]"] and "⋮" in rows
    J = jaccli.jacobian(jaccli.load_model(ex("pinn.pt")), jaccli.load_tensor(ex("pinn_x.npy"))[:1], per_sample=True)
    assert float(rows["out[500]"][0]) == pytest.approx(float(J[0, 500, 0]), abs=1e-4)


def test_previews_fit_the_console_width():
    lay = Layout.of("laplacian", ["sample", "out"], (3, 501))
    console = Console(width=60, record=True)
    console.print(show_tables.block_table(np.random.default_rng(0).standard_normal((3, 501)), lay, title="t", width=60))
    assert max(len(line) for line in console.export_text().splitlines()) <= 60


def test_divergences_stack_the_points_with_their_coordinates(x0):
    result = run("divergence", ex("field.pt"), x0 / "x3.npy", "-p", "--show", "3")
    table = tables(result.stdout)["divergence, first 3 of 3 points"]
    assert table["header"] == ["x[0]", "x[1]", "x[2]", "div"]
    d = jaccli.divergence(jaccli.load_model(ex("field.pt")), jaccli.load_tensor(x0 / "x3.npy"), per_sample=True).numpy()
    np.testing.assert_allclose([float(table["rows"][f"sample[{i}]"][-1]) for i in range(3)], d, atol=1e-3)


# (values, digits) -> strings
NUMBERS = [
    ([1.5, -0.25, 12.0], 3, ["1.5", "-0.2", "12.0"]),
    ([0.625, -1.5228, 0.0], 4, ["0.625", "-1.523", "0.000"]),
    ([1e-6, -3e-7], 2, ["1.0e-06", "-3.0e-07"]),
    ([2.5e7, 1.0], 3, ["2.50e+07", "1.00e+00"]),
    ([float("nan"), 1.0, float("inf")], 2, ["nan", "1.0", "inf"]),
    ([0.0, 0.0], 4, ["0", "0"]),
]


@pytest.mark.parametrize("values,digits,want", NUMBERS)
def test_format_numbers(values, digits, want):
    assert show_tables.format_numbers(values, digits) == want


def test_shading_by_magnitude_and_sign():
    lines = show_tables.shade(np.array([[1.0, -0.5], [0.0, 0.2]]))
    assert [line.plain for line in lines] == ["██▒▒", " ·░░"]  # |v| / max in quarters; a dot for 0
    spans = {lines[0].plain[s.start : s.end]: str(s.style) for s in lines[0].spans}
    assert spans == {"██": "red", "▒▒": "blue"}


def test_colours_only_on_a_terminal(x0):
    plain = run("jacobian", ex("field.pt"), x0 / "x0.npy").stdout
    assert "\x1b[" not in plain and "▒" in plain  # the shading still shows without colour
    J = torch.eye(2) - 2 * torch.ones(2, 2)
    lay = Layout.of("jacobian", ["out", "in"], (2, 2), args=("x",))
    console = Console(force_terminal=True, color_system="truecolor", width=100)
    with console.capture() as cap:
        console.print(show_tables.block_table(J.numpy(), lay, title="J"))
    assert "\x1b[" in cap.get()


def test_summary_is_printed_and_in_json():
    result = run("jacobian", ex("field.pt"), ex("field_x.npy"), "-p", "--summary")
    assert result.exit_code == 0, result.stderr
    table = tables(result.stdout)["Jacobian summary: 3 × 3 matrices over 500 points"]
    assert table["header"] == ["min", "median", "max"]
    assert "det J:" in result.stdout
    doc = json.loads(run("jacobian", ex("field.pt"), ex("field_x.npy"), "-p", "--summary", "--json").stdout)
    s = doc["summary"]["jacobian"]
    assert s["points"] == 500 and s["matrix"] == [3, 3] and sum(s["det_sign"].values()) == 500
    J = jaccli.jacobian(jaccli.load_model(ex("field.pt"), dtype="float64"), jaccli.load_tensor(ex("field_x.npy")).double(), per_sample=True)
    sv = torch.linalg.svdvals(J)
    assert s["sigma_max"]["max"] == pytest.approx(float(sv[:, 0].max()), rel=1e-5)
    assert s["sigma_min"]["min"] == pytest.approx(float(sv[:, -1].min()), rel=1e-4)
    assert "summary" not in json.loads(run("jacobian", ex("field.pt"), ex("field_x.npy"), "-p", "--json").stdout)


def test_hessian_summary_on_the_command_line():
    doc = json.loads(run("hessian", ex("potential.pt2"), ex("potential_x.npy"), "-p", "--summary", "--json", "--dtype", "float64").stdout)
    s = doc["summary"]["hessian"]
    x = jaccli.load_tensor(ex("potential_x.npy")).double()
    from problems import _potential_h

    lam = torch.linalg.eigvalsh(torch.stack([_potential_h(xi) for xi in x]))
    assert s["eigenvalue_min"]["min"] == pytest.approx(float(lam[:, 0].min()), rel=1e-9)
    assert s["eigenvalue_max"]["median"] == pytest.approx(float(np.median(lam[:, -1].numpy())), rel=1e-9)
    assert s["definiteness"]["positive_definite"] == int((lam[:, 0] > 0).sum())
    assert s["definiteness"]["indefinite"] == int((lam[:, 0] < 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_stats_are_over_the_finite_values(dtype, bad):
    t = torch.linspace(-3, 5, 101, dtype=dtype).reshape(1, 101)
    if bad is not None:
        t[0, 7] = bad
    arr = t.double().numpy().ravel()
    ok = arr[np.isfinite(arr)]
    s = render.stats(t)
    assert s["all_finite"] is (bad is None)
    assert s["min"] == pytest.approx(ok.min()) and s["max"] == pytest.approx(ok.max())
    assert s["mean"] == pytest.approx(ok.mean(), rel=1e-12, abs=1e-7)


def test_stats_of_finite_values_whose_sum_overflows():
    t = torch.full((4,), torch.finfo(torch.float64).max, dtype=torch.float64)
    assert render.stats(t)["all_finite"] is True
