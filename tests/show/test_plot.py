"""--plot and jaccli.show.plot: valid PNG/SVG/PDF files with the expected title and data; missing matplotlib."""

from __future__ import annotations

import doctest
import shlex
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.show import plot
from jaccli.cli.main import app
from jaccli.errors import EXIT_CODES
from problems import EXAMPLES, ROOT

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ex(name: str) -> str:
    return str(EXAMPLES / name)


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG file (where matplotlib writes its metadata)."""
    assert data[:8] == plot.PNG_MAGIC
    pos, found = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            found[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    assert kind == b"IEND"
    return found


TITLE = "jaccli {cmd} --per-sample: {model}, N = {n}"

# (command, model, input, suffix, extra args, title)
FILES = [
    ("jacobian", "pinn.pt", "pinn_x.npy", ".png", [], TITLE.format(cmd="jacobian", model="pinn.pt", n="1,000")),
    ("hessian", "potential.pt2", "potential_x.npy", ".svg", ["--summary"], TITLE.format(cmd="hessian", model="potential.pt2", n=500)),
    ("jacobian", "field.pt", "field_x.npy", ".pdf", ["--summary"], TITLE.format(cmd="jacobian", model="field.pt", n=500)),
    ("laplacian", "potential.pt", "potential_x.npy", ".png", [], TITLE.format(cmd="laplacian", model="potential.pt", n=500)),
]


@pytest.mark.parametrize("command,model,inp,suffix,extra,title", FILES, ids=[f"{f[0]}-{f[1]}{f[3]}" for f in FILES])
def test_plot_writes_a_valid_file_with_the_title(tmp_path, command, model, inp, suffix, extra, title):
    out = tmp_path / f"picture{suffix}"
    result = run(command, ex(model), ex(inp), "-p", "--plot", out, "-q", *extra)
    assert result.exit_code == 0, result.stderr
    data = out.read_bytes()
    check = {
        ".png": lambda: png_text(data)["Title"] == title,
        ".svg": lambda: data.startswith(b"<?xml") and f"<dc:title>{title}</dc:title>".encode() in data and data.rstrip().endswith(b"</svg>"),
        ".pdf": lambda: data.startswith(b"%PDF-") and f"/Title ({title})".encode() in data and data.rstrip().endswith(b"%%EOF"),
    }
    assert check[suffix](), data[:200]
    assert not list(tmp_path.glob(".*.part"))


def test_plot_of_the_whole_input_names_it(tmp_path):
    np.save(tmp_path / "x0.npy", np.load(ex("field_x.npy"))[0])
    out = tmp_path / "J.png"
    assert run("jacobian", ex("field.pt"), tmp_path / "x0.npy", "--plot", out).exit_code == 0
    assert png_text(out.read_bytes())["Title"] == "jaccli jacobian: field.pt, whole input as one point"


def test_one_coordinate_per_point_draws_derivatives_against_it():
    x = torch.linspace(-2, 2, 40, dtype=torch.float64)[:, None].flip(0)  # unsorted on purpose
    J = torch.cat([torch.cos(k * x)[:, :, None] for k in range(1, 9)], 1)  # [40, 8, 1]: 8 outputs
    fig = plot.figure({"jacobian": J}, kind="jacobian", per_sample=True, coords={"x": x}, title="waves", args={"jacobian": ("x",)})
    (ax,) = fig.axes
    assert fig._suptitle.get_text() == "waves"
    lines = [line for line in ax.get_lines() if line.get_label().startswith("out")]
    assert [line.get_label() for line in lines] == [f"out[{k}]" for k in range(plot.MAX_LINES)]
    np.testing.assert_allclose(lines[2].get_xdata(), np.sort(x[:, 0].numpy()))
    np.testing.assert_allclose(lines[2].get_ydata(), np.cos(3 * np.sort(x[:, 0].numpy())))
    assert ax.get_xlabel() == "x" and ax.get_ylabel() == "∂out/∂x" and "first 6 of 8" in ax.get_title()


def test_heat_map_is_the_mean_absolute_block_with_labels():
    J = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fig = plot.figure({"jacobian": J}, kind="jacobian", per_sample=True, coords={"x": torch.zeros(5, 3)}, title="t", args={"jacobian": ("x",)})
    ax = fig.axes[0]
    (image,) = ax.get_images()
    np.testing.assert_allclose(image.get_array(), J.abs().mean(0).numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["out[0]", "out[1]"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x[0]", "x[1]", "x[2]"]
    assert "mean |J| over 5 points" in ax.get_title()


def test_one_point_heat_map_is_signed_and_hessians_get_one_map_per_component():
    H = torch.randn(6, 2, 2, dtype=torch.float64)  # whole input [2], 6 outputs
    fig = plot.figure({"hessian": H}, kind="hessian", title="h", coords={"x": torch.zeros(2)}, args={"hessian": ("x", "x")})
    maps = [ax for ax in fig.axes if ax.get_images()]
    assert len(maps) == plot.MAX_MAPS and "of out[0]" in maps[0].get_title() and "(4 of 6)" in maps[0].get_title()
    np.testing.assert_allclose(maps[1].get_images()[0].get_array(), H[1].numpy())
    assert maps[0].get_images()[0].get_cmap().name == "RdBu_r"


def test_summary_histograms_of_the_spectra():
    J = torch.stack([torch.diag(torch.tensor([2.0, 0.5])) for _ in range(10)]).double()
    s = jaccli.summarize(J, "jacobian", per_sample=True)
    fig = plot.figure({"jacobian": J}, kind="jacobian", per_sample=True, title="s", coords={"x": torch.zeros(10, 2)}, summaries={"jacobian": s})
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any("singular values, 10 points" in t for t in titles) and any("log|det J|" in t for t in titles)
    hist = next(ax for ax in fig.axes if "singular values" in ax.get_title())
    assert [t.get_text() for t in hist.get_legend().get_texts()] == ["σ_max", "σ_min"]


def test_doctest():
    failed, attempted = doctest.testmod(plot)
    assert attempted > 0 and failed == 0


PLOT_ERRORS = [
    (["--plot", "{d}/J.gif"], jaccli.UsageError, ["picture format", ".png, .svg, .pdf", ".gif"]),
    (["--plot", "{d}/exists.png"], jaccli.OutputError, ["already exists", "--force"]),
    (["--plot", "{d}/no/such/J.png"], jaccli.OutputError, ["does not exist"]),
]


@pytest.mark.parametrize("extra,error,needles", PLOT_ERRORS)
def test_plot_errors_are_one_line(tmp_path, extra, error, needles):
    (tmp_path / "exists.png").write_bytes(b"keep me")
    result = run("laplacian", ex("potential.pt"), ex("potential_x.npy"), "-p", *[a.format(d=tmp_path) for a in extra])
    assert result.exit_code == EXIT_CODES[error], result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert all(n in line for n in needles), line
    assert (tmp_path / "exists.png").read_bytes() == b"keep me"


def test_missing_matplotlib_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "J.png"
    computed = []
    # the command plans (jaccli.plan) and runs the plan: a spy there sees any work begun
    monkeypatch.setattr(jaccli, "plan", lambda *a, **k: computed.append(1))
    monkeypatch.setattr(jaccli, "jacobian", lambda *a, **k: computed.append(1))
    result = run("jacobian", ex("field.pt"), ex("field_x.npy"), "-p", "--plot", out)
    assert result.exit_code == EXIT_CODES[jaccli.DependencyError] == 10
    (line,) = result.stderr.strip().splitlines()
    assert "matplotlib" in line and "pip install 'jaccli[plot]'" in line and "Traceback" not in result.stderr
    assert not out.exists() and not computed  # refused before any work
    with pytest.raises(jaccli.DependencyError):
        plot.figure({"jacobian": torch.zeros(1, 1)}, kind="jacobian", title="x")


def test_the_readme_picture_is_what_its_documented_command_draws(tmp_path):
    readme = (ROOT / "README.md").read_text()
    shipped = ROOT / "docs" / "pinn_derivatives.png"
    assert "](docs/pinn_derivatives.png)" in readme and shipped.stat().st_size < 200_000
    (command,) = [line[2:] for line in readme.splitlines() if line.startswith("$ ") and "--plot pinn_derivatives.png" in line]
    assert "with `--plot docs/pinn_derivatives.png`, drew this picture" in readme
    args = shlex.split(command.replace("examples/", f"{ROOT}/examples/").replace("pinn_derivatives.png", str(tmp_path / "p.png")))
    assert run(*args[1:]).exit_code == 0
    fresh, old = (tmp_path / "p.png").read_bytes(), shipped.read_bytes()
    assert png_text(fresh)["Title"] == png_text(old)["Title"] == "jaccli jacobian --per-sample: pinn.pt, N = 1,000"
    assert fresh[16:24] == old[16:24]  # IHDR width and height


def test_a_plot_target_created_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "p.png"

    class RacingFigure:  # another process writes the target while the figure renders
        def savefig(self, fh, **kw):
            target.write_bytes(b"another process's file")
            fh.write(b"png bytes")

    with pytest.raises(jaccli.OutputError, match="appeared while"):
        plot.save_figure(RacingFigure(), target, title="t")
    assert target.read_bytes() == b"another process's file"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
