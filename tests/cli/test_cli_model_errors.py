"""A model that fails on the input says why, what it expected and what the input holds,
in every format: the real command on a model of 2 inputs fed a file of [10, 3].

TorchScript used to print only "The following operation failed in the TorchScript
interpreter." and the probe's batch ([8, 3]) instead of the file's [10, 3].
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import jaccli
from jaccli.cli.main import app
from jaccli.engine.probe import model_cause
from jaccli.load.models import describe_expected_input, expected_input
from problems import save_export, save_torchscript, tanh_mlp

runner = CliRunner(env={"COLUMNS": "400"})


def mlp() -> nn.Sequential:
    return tanh_mlp((2, 16, 1), dtype=torch.float32, seed=2)


def _script(path):
    return save_torchscript(mlp(), path / "m.pt")


def _trace(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(mlp(), torch.zeros(4, 2)), path / "m.pt")
    return path / "m.pt"


def _export(path):
    return save_export(mlp(), torch.zeros(4, 2), path / "m.pt2")


def _safetensors(path):
    jaccli.save_mlp(mlp(), path / "m.safetensors")
    return path / "m.safetensors"


def _state_dict(path):
    torch.save(mlp().state_dict(), path / "m_state.pt")
    return path / "m_state.pt"


# (format, writer, extra options, what the cause must say)
FORMATS = [
    ("script", _script, [], r"mat1 and mat2 shapes cannot be multiplied \(8x3 and 2x16\)"),
    ("trace", _trace, [], r"mat1 and mat2 shapes cannot be multiplied \(8x3 and 2x16\)"),
    ("safetensors", _safetensors, [], r"mat1 and mat2 shapes cannot be multiplied \(8x3 and 2x16\)"),
    ("state dict", _state_dict, ["--arch", "mlp", "--activation", "tanh"], r"mat1 and mat2 shapes cannot be multiplied \(8x3 and 2x16\)"),
    ("pt2", _export, [], r"does not have the shape the model was exported for"),
]


@pytest.mark.parametrize("fmt,write,extra,cause", FORMATS, ids=[f[0] for f in FORMATS])
def test_a_wrong_input_width_names_cause_expectation_and_the_files_shape(tmp_path, fmt, write, extra, cause):
    model = write(tmp_path)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32))
    result = runner.invoke(app, ["jacobian", str(model), str(tmp_path / "x.npy"), "-p", *extra])
    assert result.exit_code == 4, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"model error: {model}: ")
    assert re.search(cause, line), line
    assert "TorchScript interpreter" not in line
    assert re.search(r"expected \[\*, 2\]", line), line  # what the model takes
    assert "[10, 3]" in line and "[8, 3]" not in line  # what the file holds, not the probe's batch
    if fmt != "pt2":
        assert "by its first layer, Linear with weight [16, 2]" in line


def test_a_convolution_says_its_channels(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).eval()
    net(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    model = save_torchscript(net, tmp_path / "c.pt")
    np.save(tmp_path / "x.npy", np.zeros((5, 4, 8, 8), np.float32))
    result = runner.invoke(app, ["jacobian", str(model), str(tmp_path / "x.npy"), "-p"])
    assert result.exit_code == 4
    assert "to have 3 channels, but got 4 channels" in result.stderr
    assert "expected [*, 3, *, *] by its first layer, Conv2d with weight [4, 3, 3, 3]" in result.stderr
    assert "failed on input [5, 4, 8, 8]" in result.stderr


class _Raw(nn.Module):
    """No layer of a known kind: only the error can tell what the model takes."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w).sum(1, keepdim=True)


def test_without_a_known_first_layer_the_error_says_what_was_expected(tmp_path):
    model = save_torchscript(_Raw(), tmp_path / "raw.pt")
    assert describe_expected_input(jaccli.load_model(model)) is None
    np.save(tmp_path / "x.npy", np.zeros((10, 3), np.float32))
    result = runner.invoke(app, ["jacobian", str(model), str(tmp_path / "x.npy"), "-p"])
    assert result.exit_code == 4
    assert "expected [*, 2] by the error" in result.stderr and "[10, 3]" in result.stderr


def test_a_failure_past_the_first_layer_claims_no_input_shape(tmp_path):
    # the input is what the first layer takes: the mistake is inside the model
    torch.manual_seed(0)
    broken = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(20, 1)).eval()
    model = save_torchscript(broken, tmp_path / "b.pt")
    np.save(tmp_path / "x.npy", np.zeros((10, 3), np.float32))
    result = runner.invoke(app, ["jacobian", str(model), str(tmp_path / "x.npy"), "-p"])
    assert result.exit_code == 4
    assert "mat1 and mat2 shapes cannot be multiplied (8x16 and 20x1)" in result.stderr
    assert "expected" not in result.stderr


def test_a_whole_input_request_shows_the_shape_it_ran_on(tmp_path):
    model = _script(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((10, 3), np.float32))
    result = runner.invoke(app, ["jacobian", str(model), str(tmp_path / "x.npy")])
    assert result.exit_code == 4
    assert "failed on input [10, 3]: mat1 and mat2 shapes cannot be multiplied (10x3 and 2x16)" in result.stderr
    assert "run on its first" not in result.stderr


# ----------------------------------------------------------------- the pieces


def test_the_inner_torchscript_error_is_the_cause(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(_script(tmp_path)))
    with pytest.raises(RuntimeError) as info:
        model(torch.zeros(8, 3))
    assert str(info.value).startswith("The following operation failed in the TorchScript interpreter.")
    assert model_cause(info.value) == "mat1 and mat2 shapes cannot be multiplied (8x3 and 2x16)"
    assert model_cause(ValueError("first\nsecond")) == "first"


@pytest.mark.parametrize("write", [_script, _trace, _export, _safetensors], ids=["script", "trace", "pt2", "safetensors"])
def test_info_tells_the_expected_input_of_every_format(tmp_path, write):
    model = jaccli.load_model(write(tmp_path))
    found = expected_input(model)
    assert str(found) == "[*, 2]"
    assert found.matches((10, 2)) and not found.matches((10, 3)) and not found.matches((10, 2, 1))
    assert jaccli.describe(model)["expected_input"].startswith("[*, 2]")
    assert expected_input(lambda x: x) is None
