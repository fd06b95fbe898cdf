"""Hostile and damaged input files: each ends in one line naming the file and what is wrong,
with the documented exit code, never a traceback, an "internal error" or a result computed
from damaged bytes. Run in-process (the command's Typer app), since none needs a signal."""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli.main import app
from jaccli.errors import EXIT_CODES
from problems import EXAMPLES

MODEL = str(EXAMPLES / "field.pt")  # R^3 -> R^3: a [N, 3, 3] Jacobian per sample

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def _clean(code: int, stderr: str, want: int, *needles: str) -> str:
    """One line, the wanted code, no traceback, no "internal error", no Python repr."""
    lines = stderr.strip().splitlines()
    assert code == want, (code, stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr and "Exception ignored" not in stderr
    assert not re.search(r"<[\w.]+ object at 0x|\\x[0-9a-f]{2}", stderr), stderr
    for needle in needles:
        assert re.search(needle, lines[0]), (needle, lines[0])
    return lines[0]


def _npy_with_header(path: Path, shape_text: str, payload: bytes = b"\0" * 64) -> Path:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % shape_text
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + payload)
    return path


@pytest.fixture
def hostile(tmp_path):
    """name -> (CLI arguments, expected error class, patterns in the one line)."""
    from safetensors.torch import save

    x = tmp_path / "x.npy"
    np.save(x, np.ones((4, 3), np.float32))
    cases = {}
    cases["400-digit dimension"] = (
        [MODEL, _npy_with_header(tmp_path / "absurd.npy", "9" * 400 + ", 3")],
        jaccli.InputError, "truncated or corrupt", "402-digit number of bytes",
    )  # fmt: skip
    sparse = tmp_path / "sparse.npy"
    _npy_with_header(sparse, f"{(4 * 2**30) // 12 + 1}, 3", b"")
    with open(sparse, "r+b") as fh:  # a truthful header over 4 GiB of holes: costs no disk
        fh.truncate(4 * 2**30 + 128)
    cases["4 GiB input"] = ([MODEL, sparse], jaccli.ResourceError, "larger than the input limit", "got 4.0 GiB", "--max-input-bytes")
    np.save(tmp_path / "x1000.npy", np.ones((1000, 3), np.float32))  # 12 128 bytes; the model is 2.7 KiB
    cases["over --max-input-bytes"] = (
        [MODEL, tmp_path / "x1000.npy", "--max-input-bytes", "5K"], jaccli.ResourceError, "x1000.npy", "at most 5.0 KiB", "got 11.8 KiB",
    )  # fmt: skip
    bomb = io.BytesIO()
    np.save(bomb, np.ones((4, 3), np.float32))
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", bomb.getvalue() + b"\0" * (32 * 2**20))  # 32 MiB of padding in ~32 KB
    cases["npz bomb, limit below its inflated size"] = (
        [MODEL, tmp_path / "bomb.npz", "--max-input-bytes", "1M", "--save", tmp_path / "bomb_r.npy"], None,
    )  # fmt: skip
    lying = {"0.weight": torch.zeros(2, 3), "0.bias": torch.zeros(2)}
    meta = {"jaccli.arch": "mlp", "jaccli.activation": "tanh"}
    (tmp_path / "huge.safetensors").write_bytes(save(lying, metadata={**meta, "jaccli.sizes": "[3, 40000, 40000, 3]"}))
    cases["metadata declares a 1.6 GB network"] = (
        [tmp_path / "huge.safetensors", x], jaccli.ModelError, "metadata declares", "0.weight \\[40000, 3\\]",
    )  # fmt: skip
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.safetensors").write_bytes(save(lying, metadata={**meta, "jaccli.sizes": deep}))
    cases["metadata nested 100 000 deep"] = ([tmp_path / "deep.safetensors", x], jaccli.InputError, "bad jaccli metadata")
    cases["--arch-kwargs nested 100 000 deep"] = (
        [EXAMPLES / "pinn.safetensors", x, "--arch", "mlp", "--activation", "tanh", "--arch-kwargs", deep],
        jaccli.UsageError, "nested too deeply",
    )  # fmt: skip
    long = "n" * 300
    cases["input name too long"] = ([MODEL, tmp_path / f"{long}.npy"], jaccli.InputError, "File name too long", "303 characters|…")
    cases["model name too long"] = ([tmp_path / f"{long}.pt", x], jaccli.InputError, "model file", "File name too long")
    cases["--input path too long"] = ([MODEL, "-i", "x=" + "d/" * 3000 + "x.npy"], jaccli.InputError, "File name too long")
    cases["--save name too long"] = ([MODEL, x, "--save", tmp_path / f"{long}.npy"], jaccli.OutputError, "File name too long")
    cases["/dev/zero as input"] = ([MODEL, "/dev/zero"], jaccli.InputError, "unrecognised binary data")
    cases["/dev/zero as model"] = (["/dev/zero", x], jaccli.InputError, "unrecognised binary data, not a model")
    return cases


HOSTILE = [
    "400-digit dimension", "4 GiB input", "over --max-input-bytes", "npz bomb, limit below its inflated size",
    "metadata declares a 1.6 GB network", "metadata nested 100 000 deep", "--arch-kwargs nested 100 000 deep",
    "input name too long", "model name too long", "--input path too long", "--save name too long",
    "/dev/zero as input", "/dev/zero as model",
]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_inputs_end_in_one_line(hostile, name):
    args, error, *needles = hostile[name]
    result = run("jacobian", *args, "-p", "-q")
    if error is None:  # handled: only the declared 48 bytes of the bomb are inflated
        assert result.exit_code == 0, result.stderr
        return
    _clean(result.exit_code, result.stderr, EXIT_CODES[error], *needles)


def test_endless_streams_stop_at_their_first_bytes_or_the_limit(tmp_path):
    result = run("jacobian", MODEL, "-", "-p", "-q", input=b"\0" * 200_000)
    _clean(result.exit_code, result.stderr, EXIT_CODES[jaccli.InputError], "<stdin>", "unrecognised binary data")
    fifo = tmp_path / "endless"
    os.mkfifo(fifo)
    for line, want, needle in ((b"y\n", jaccli.InputError, "not a numeric table"), (b"1,2,3\n", jaccli.ResourceError, "stream larger than")):
        stop = threading.Event()

        def writer():
            try:
                with open(fifo, "wb") as fh:
                    while not stop.is_set():
                        fh.write(line * 4096)
            except BrokenPipeError:  # the reader refused and left, as it should
                pass

        t = threading.Thread(target=writer)
        t.start()
        try:
            result = run("jacobian", MODEL, fifo, "-p", "-q", "--max-input-bytes", "2M")
        finally:
            stop.set()
            t.join(timeout=30)
        _clean(result.exit_code, result.stderr, EXIT_CODES[want], needle)


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_a_stream_is_read_only_as_far_as_its_header_declares(tmp_path, fmt):
    from safetensors.torch import save

    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ones((4, 3), np.float32))
        data = buf.getvalue()
    else:
        data = save({"x": torch.ones(4, 3)})
    endless = data + b"\0" * 100_000  # what follows the declared end is not read as the file's
    result = run("jacobian", MODEL, "-", "-p", "-q", "--save", tmp_path / "r.npy", input=endless)
    assert result.exit_code == 0, result.stderr
    assert np.load(tmp_path / "r.npy").shape == (4, 3, 3)


def test_max_input_bytes_from_the_environment_and_the_api(tmp_path, monkeypatch):
    x = tmp_path / "x.npy"
    np.save(x, np.ones((100, 3)))
    monkeypatch.setenv("JACCLI_MAX_INPUT_BYTES", "1K")
    with pytest.raises(jaccli.ResourceError, match="at most 1.0 KiB"):
        jaccli.load_tensor(x)
    assert jaccli.load_tensor(x, max_bytes=10_000).shape == (100, 3)
    from jaccli.io.read import limit_input_bytes

    with limit_input_bytes("1M"):
        assert jaccli.load_tensor(x).shape == (100, 3)
    result = run("jacobian", MODEL, x, "-p", "-q", "--max-input-bytes", "nonsense")
    _clean(result.exit_code, result.stderr, EXIT_CODES[jaccli.UsageError], "--max-input-bytes")



def test_no_hostile_input_is_an_internal_error(hostile):
    """The rule: "internal error" is kept for bugs; no damaged file is one."""
    for name in HOSTILE:
        text = run("jacobian", *hostile[name][0], "-p", "-q").stderr
        assert "internal error" not in text and "Traceback" not in text, (name, text)
