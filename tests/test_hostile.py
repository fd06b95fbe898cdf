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



# ----------------------------------------------------------------- damaged files (issue 22)


def _npy_with_descr(path: Path, descr: str, shape_text: str) -> Path:
    header = "{'descr': %s, 'fortran_order': False, 'shape': (%s), }" % (descr, shape_text)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 256)
    return path


def _central_entries(data: bytes):
    """Offsets of the central directory's entries of a zip archive (after its members,
    which may hold zip archives of their own)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        at = data.find(b"PK\x01\x02", z.start_dir)
    while at >= 0:
        yield at
        at = data.find(b"PK\x01\x02", at + 4)


def _patched(src: Path, dst: Path, how: str) -> Path:
    """``src`` with every member needing zip version 12.8 to extract, or with a first member
    name flagged UTF-8 whose first byte is not UTF-8: what the issue's mutated files hold."""
    data = bytearray(src.read_bytes())
    for at in _central_entries(bytes(data)):
        if how == "version":
            struct.pack_into("<H", data, at + 6, 128)
        else:
            struct.pack_into("<H", data, at + 8, struct.unpack_from("<H", data, at + 8)[0] | 0x800)
            data[at + 46] = 0xFF
            break
    dst.write_bytes(bytes(data))
    return dst


def _member(src: Path, suffix: str) -> zipfile.ZipInfo:
    with zipfile.ZipFile(src) as z:
        return next(i for i in z.infolist() if i.filename.endswith(suffix) and i.file_size > 0)


def _flipped(src: Path, dst: Path, suffix: str) -> Path:
    """``src`` with one byte of its (stored) member ``*suffix`` changed in place: the CRC-32
    in the archive no longer matches."""
    info = _member(src, suffix)
    data = bytearray(src.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0x55
    dst.write_bytes(bytes(data))
    return dst


def _truncated(src: Path, dst: Path, suffix: str, keep: int) -> Path:
    """``src`` re-zipped with member ``*suffix`` cut to ``keep`` bytes and a CRC-32 that
    matches the cut bytes: only the tensor's declared size can tell."""
    victim = _member(src, suffix).filename
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(zipfile.ZipInfo(info.filename, info.date_time), data[:keep] if info.filename == victim else data)
    return dst


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """name -> (CLI arguments, patterns in the one line); every one is exit 3 (InputError)."""
    from safetensors.torch import save

    d = tmp_path_factory.mktemp("damaged")
    x = d / "x.npy"
    np.save(x, np.ones((4, 3), np.float32))
    np.savez(d / "x.npz", x=np.ones((4, 3), np.float32))
    torch.save(torch.ones(4, 3), d / "x.pt")
    script, export = EXAMPLES / "field.pt", EXAMPLES / "field.pt2"
    cases = {
        "npy: negative dimension": ([MODEL, _npy_with_descr(d / "neg.npy", "'<f4'", "-4, 3")], "negative dimension", r"\[-4, 3\]"),
        "npy: datetime64": ([MODEL, _npy_with_descr(d / "dt.npy", "'<M8[ns]'", "4, 3")], "dates and times", "datetime64"),
        "npy: longdouble": ([MODEL, _npy_with_descr(d / "ld.npy", "'<f16'", "4, 3")], "extended-precision", "float64"),
        "npy: a bare name in the header": ([MODEL, _npy_with_descr(d / "ast.npy", "x", "4, 3")], "corrupt .npy header", "'descr'"),
    }  # fmt: skip
    for how, needle in (("version", r"zip version .*got 12\.8"), ("name", "not valid UTF-8")):
        cases[f"npz: {how}"] = ([MODEL, _patched(d / "x.npz", d / f"{how}.npz", how)], needle)
        cases[f"pt tensors: {how}"] = ([MODEL, _patched(d / "x.pt", d / f"{how}-x.pt", how)], needle)
        cases[f"TorchScript: {how}"] = ([_patched(script, d / f"{how}.pt", how), x], needle)
        cases[f"pt2: {how}"] = ([_patched(export, d / f"{how}.pt2", how), x], needle)
    crc = r"member .* does not match its CRC-32"
    cases["npz: a byte changed"] = ([MODEL, _flipped(d / "x.npz", d / "flip.npz", "x.npy")], crc)
    cases["pt tensors: a byte changed"] = ([MODEL, _flipped(d / "x.pt", d / "flip-x.pt", "data/0")], crc)
    cases["TorchScript: a weight byte changed"] = ([_flipped(script, d / "flip.pt", "data/0"), x], crc)
    cases["pt2: a weight byte changed"] = ([_flipped(export, d / "flip.pt2", "weights/weight_0"), x], crc)
    short = r"tensor record .*data/0 is shorter than its tensor .*expected 36 bytes, got {} bytes"
    for keep in (8, 0):
        cases[f"TorchScript: weight record cut to {keep} bytes"] = (
            [_truncated(script, d / f"cut{keep}.pt", "data/0", keep), x], short.format(keep))
    lying = {"0.weight": torch.zeros(2, 3), "0.bias": torch.zeros(2)}
    meta = {"jaccli.arch": "mlp", "jaccli.activation": "tanh", "jaccli.sizes": "[3, 1e400, 3]"}
    (d / "inf.safetensors").write_bytes(save(lying, metadata=meta))
    cases["safetensors MLP: sizes of 1e400"] = ([d / "inf.safetensors", x], "jaccli.sizes is not a list of whole numbers")
    return cases


DAMAGED = [
    "npy: negative dimension", "npy: datetime64", "npy: longdouble", "npy: a bare name in the header",
    *(f"{kind}: {how}" for how in ("version", "name") for kind in ("npz", "pt tensors", "TorchScript", "pt2")),
    "npz: a byte changed", "pt tensors: a byte changed", "TorchScript: a weight byte changed", "pt2: a weight byte changed",
    "TorchScript: weight record cut to 8 bytes", "TorchScript: weight record cut to 0 bytes",
    "safetensors MLP: sizes of 1e400",
]  # fmt: skip


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_files_are_input_errors_naming_the_file(damaged, name, tmp_path):
    """Exit 3, the file named, what is wrong in words; no result is ever computed from
    damaged bytes (nothing is saved)."""
    args, *needles = damaged[name]
    bad = next(a for a in args if "damaged" in str(a))
    result = run("jacobian", *args, "-p", "-q", "--save", tmp_path / "r.npy")
    _clean(result.exit_code, result.stderr, EXIT_CODES[jaccli.InputError], re.escape(Path(bad).name), *needles)
    assert not (tmp_path / "r.npy").exists()


def test_the_damaged_files_are_damaged_only_where_meant(damaged, tmp_path):
    """The mutations above damage what they say and nothing else: the same steps with no
    change give files that compute."""
    script = EXAMPLES / "field.pt"
    whole = _truncated(script, tmp_path / "whole.pt", "data/0", 10**6)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((4, 3), np.float32))
    result = run("jacobian", whole, x, "-p", "-q", "--save", tmp_path / "r.npy")
    assert result.exit_code == 0, result.stderr
    want = run("jacobian", script, x, "-p", "-q", "--save", tmp_path / "want.npy")
    assert want.exit_code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), np.load(tmp_path / "want.npy"))


def test_no_hostile_input_is_an_internal_error(hostile):
    """The rule: "internal error" is kept for bugs; no damaged file is one."""
    for name in HOSTILE:
        text = run("jacobian", *hostile[name][0], "-p", "-q").stderr
        assert "internal error" not in text and "Traceback" not in text, (name, text)
