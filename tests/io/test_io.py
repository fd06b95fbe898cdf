"""Reading inputs and writing results: every format, every refusal."""

from __future__ import annotations

import io
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaccli
from jaccli import io as jio

WRITE_SUFFIXES = [".npy", ".npz", ".pt", ".safetensors"]


def _write_input(path, array: np.ndarray, fmt: str):
    """An input file in ``fmt`` written by the tool users would write it with."""
    writers = {
        "npy": lambda: np.save(path, array),
        "npz": lambda: np.savez(path, x=array),
        "pt": lambda: torch.save(torch.from_numpy(array), path),
        "safetensors": lambda: __import__("safetensors.numpy").numpy.save_file({"x": array}, str(path)),
        "csv": lambda: np.savetxt(path, array, delimiter=","),
        "txt": lambda: np.savetxt(path, array),
    }
    writers[fmt]()
    return path


@pytest.mark.parametrize("fmt", ["npy", "npz", "pt", "safetensors", "csv", "txt"])
def test_every_input_format_reads_back(tmp_path, fmt):
    array = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
    path = _write_input(tmp_path / f"x.{fmt}", array, fmt)
    got = jaccli.load_tensor(path)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), array, rtol=1e-15 if fmt not in ("csv", "txt") else 1e-12)


@pytest.mark.parametrize("suffix", WRITE_SUFFIXES)
def test_saved_results_read_back_with_metadata(tmp_path, suffix):
    t = torch.randn(3, 4, 2, dtype=torch.float64)
    path = tmp_path / f"r{suffix}"
    jaccli.save_tensors(path, {"jacobian": t}, metadata={"command": "jacobian", "shape": [3, 4, 2]})
    back = jaccli.load_tensors(path)
    (got,) = back.values()
    torch.testing.assert_close(got, t, rtol=0, atol=0)
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            assert fh.metadata() == {"command": "jacobian", "shape": "[3, 4, 2]"}


@settings(max_examples=25, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=5),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    suffix=st.sampled_from(WRITE_SUFFIXES),
)
def test_round_trip_property(tmp_path_factory, array, suffix):
    path = tmp_path_factory.mktemp("rt") / f"r{suffix}"
    t = torch.from_numpy(array.copy())
    jaccli.save_tensors(path, {"a": t, "b": t * 2} if suffix != ".npy" else t)
    back = jaccli.load_tensors(path)
    first = back.get("a", back.get("", back.get("result")))
    assert first.dtype == t.dtype and first.shape == t.shape
    torch.testing.assert_close(first, t, rtol=0, atol=0)


def test_big_endian_npy(tmp_path):
    path = tmp_path / "be.npy"
    np.save(path, np.arange(4, dtype=">f8"))
    torch.testing.assert_close(jaccli.load_tensor(path), torch.arange(4, dtype=torch.float64))


def test_content_wins_over_suffix(tmp_path):
    path = tmp_path / "really_npy.pt"
    with open(path, "wb") as fh:
        np.save(fh, np.ones((2, 2)))
    assert jaccli.load_tensor(path).shape == (2, 2)


def test_stdin_reads_npy_bytes(monkeypatch):
    buf = io.BytesIO()
    np.save(buf, np.ones((5, 1), dtype=np.float32))

    class Stdin:
        buffer = io.BytesIO(buf.getvalue())

    monkeypatch.setattr(sys, "stdin", Stdin)
    assert jaccli.load_tensor("-").shape == (5, 1)


def test_text_with_header_and_comments(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("# collocation points\nx,y\n1,2\n3,4\n")
    torch.testing.assert_close(jaccli.load_tensor(path), torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))


def test_single_column_text_keeps_a_feature_axis(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("0.0\n0.5\n1.0\n")
    assert jaccli.load_tensor(path).shape == (3, 1)


# ----------------------------------------------------------------- several tensors


def test_several_tensors_need_a_key_and_the_error_lists_them(tmp_path):
    path = tmp_path / "xs.npz"
    np.savez(path, t=np.zeros(3), x=np.ones((3, 2)))
    with pytest.raises(jaccli.InputError, match="several tensors.*--key with one of t, x"):
        jaccli.load_tensor(path)
    assert jaccli.load_tensor(path, key="x").shape == (3, 2)
    with pytest.raises(jaccli.InputError, match="no tensor named 'y'.*one of t, x"):
        jaccli.load_tensor(path, key="y")


def test_gather_inputs_maps_named_tensors_to_arguments(tmp_path):
    path = tmp_path / "xs.npz"
    np.savez(path, t=np.zeros(3), x=np.ones((3, 2)), extra=np.ones(1))
    tensors, sources, positional = jio.gather_inputs(str(path), arg_names=("t", "x"))
    assert list(tensors) == ["t", "x"] and not positional
    assert sources["x"].endswith("xs.npz:x")
    with pytest.raises(jaccli.InputError, match="several tensors"):
        jio.gather_inputs(str(path), arg_names=("input",))


def test_gather_inputs_from_specs(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros(3))
    np.savez(tmp_path / "b.npz", x=np.ones((3, 2)))
    tensors, sources, positional = jio.gather_inputs(
        None, [f"t={tmp_path / 't.npy'}", f"x={tmp_path / 'b.npz'}:x"], arg_names=("t", "x")
    )
    assert tensors["x"].shape == (3, 2) and not positional
    with pytest.raises(jaccli.UsageError, match="no such argument"):
        jio.gather_inputs(None, [f"y={tmp_path / 't.npy'}"], arg_names=("t", "x"))
    with pytest.raises(jaccli.UsageError, match="NAME=FILE"):
        jio.gather_inputs(None, ["t"], arg_names=("t",))
    with pytest.raises(jaccli.UsageError, match="no input"):
        jio.gather_inputs(None, [], arg_names=("t",))


# ----------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.float16])
def test_non_float_inputs_are_cast_with_a_notice(tmp_path, dtype):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((2, 2), dtype=dtype))
    with pytest.warns(jaccli.JaccliWarning, match="cast to float32"):
        t = jaccli.load_tensor(path)
    assert t.dtype == torch.float32


def test_complex_inputs_are_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones(3, dtype=np.complex64))
    with pytest.raises(jaccli.InputError, match="complex inputs are not supported"):
        jaccli.load_tensor(path)


def test_explicit_dtype(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones(3, dtype=np.float32))
    assert jaccli.load_tensor(path, dtype="float64").dtype == torch.float64
    with pytest.raises(jaccli.UsageError, match="expected one of float32, float64"):
        jaccli.load_tensor(path, dtype="float8")


# ----------------------------------------------------------------- refusals


def _npy_header(shape, descr="<f8") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


BAD_INPUTS = [
    ("empty.npy", b"", "empty tensor file"),
    ("lfs.npy", b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", "Git LFS pointer"),
    ("huge.npy", _npy_header((10**6, 10**6)) + b"\0" * 64, "promises more data"),
    ("truncated.npy", _npy_header((100,)) + b"\0" * 80, "truncated"),
    ("badheader.npy", b"\x93NUMPY\x01\x00\x10\x00{garbage}      \n", "corrupt .npy header"),
    ("corrupt.pt", b"PK\x03\x04" + b"\0" * 60, "damaged zip archive: its directory at the end is missing"),
    ("corrupt.safetensors", struct.pack("<Q", 20) + b'{"x": {"dtype": 1}}  ', "corrupt .safetensors"),
    ("binary.bin", bytes(range(256)) * 4, "unrecognised binary file"),
    ("words.csv", b"a,b\nc,d\n", "holds no numbers|not a numeric table"),
]


@pytest.mark.parametrize("name,content,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_get_one_clear_error(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(jaccli.InputError, match=match) as info:
        jaccli.load_tensor(path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(jaccli.InputError, match="Python objects"):
        jaccli.load_tensor(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(jaccli.InputError, match="no such tensor file"):
        jaccli.load_tensor(tmp_path / "nope.npy")
    with pytest.raises(jaccli.InputError, match="is a directory"):
        jaccli.load_tensor(tmp_path)


class _Payload:
    """A pickle that creates a file when loaded."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


# torch's warning before an unsafe load stays a warning here: the suite turns warnings into
# errors, and that error would read as the refusal even if weights_only=True were lost
@pytest.mark.filterwarnings("default::UserWarning")
@pytest.mark.parametrize("force_unsafe", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, force_unsafe):
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(2), "payload": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(jaccli.InputError, match="needs arbitrary code"):
        jaccli.load_tensor(path)
    assert not marker.exists()


def test_torch_version_is_new_enough():
    from jaccli.io import MIN_TORCH, check_torch_version

    check_torch_version()  # the installed torch passes
    with pytest.raises(jaccli.JaccliError, match="torch >= 2.10"):
        check_torch_version("2.5.1+cpu")
    with pytest.raises(jaccli.JaccliError, match="weights_only"):
        check_torch_version("2.9.0")
    check_torch_version("2.10.0")
    assert MIN_TORCH == (2, 10)


# ----------------------------------------------------------------- writing


def test_existing_file_is_kept_without_force(tmp_path):
    path = tmp_path / "r.npy"
    path.write_bytes(b"precious")
    with pytest.raises(jaccli.OutputError, match="already exists.*--force"):
        jaccli.save_tensors(path, torch.zeros(2))
    assert path.read_bytes() == b"precious"
    jaccli.save_tensors(path, torch.zeros(2), force=True)
    assert jaccli.load_tensor(path).shape == (2,)


def test_missing_directory_and_unknown_suffix(tmp_path):
    with pytest.raises(jaccli.OutputError, match="directory does not exist"):
        jaccli.save_tensors(tmp_path / "no" / "r.npy", torch.zeros(2))
    with pytest.raises(jaccli.UsageError, match="suffix"):
        jaccli.save_tensors(tmp_path / "r.h5", torch.zeros(2))
    with pytest.raises(jaccli.OutputError, match=".npy holds one array"):
        jaccli.save_tensors(tmp_path / "r.npy", {"a": torch.zeros(1), "b": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def _read_only_directory(tmp_path):
    """A directory this process cannot write: chmod for users, a read-only system folder for root."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        return ro
    for candidate in ("/sys", "/proc/self"):
        try:
            with open(os.path.join(candidate, ".jaccli-probe"), "wb"):
                pass
        except OSError:
            return Path(candidate)
    pytest.skip("no read-only directory for root here")


def test_read_only_directory(tmp_path):
    ro = _read_only_directory(tmp_path)
    try:
        with pytest.raises(jaccli.OutputError, match="not writable"):
            jaccli.save_tensors(ro / "r.npy", torch.zeros(2))
    finally:
        if ro.is_relative_to(tmp_path):
            ro.chmod(0o700)


@pytest.mark.parametrize(
    "error,raised",
    [(RuntimeError("disk on fire"), jaccli.OutputError), (OSError(28, "No space left on device"), jaccli.OutputError),
     (KeyboardInterrupt(), KeyboardInterrupt)],
)  # fmt: skip
def test_failed_writes_leave_no_partial_file(tmp_path, monkeypatch, error, raised):
    def broken(fh, tensors, meta):
        fh.write(b"half a file")
        raise error

    monkeypatch.setitem(jio.WRITERS, "npy", broken)
    with pytest.raises(raised):
        jaccli.save_tensors(tmp_path / "r.npy", torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_save_to_stdout_writes_npy_bytes(monkeypatch):
    out = io.BytesIO()

    class Stdout:
        buffer = out

    monkeypatch.setattr(sys, "stdout", Stdout)
    jaccli.save_tensors("-", torch.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(np.load(io.BytesIO(out.getvalue())), np.arange(6.0).reshape(2, 3))


def test_a_write_removes_the_temporaries_of_dead_writers_of_its_target_only(tmp_path):
    """What SIGKILL leaves inside an atomic write (tests/test_faults.py kills one): the next
    write of that target removes it if its writer is gone from this machine, and leaves a
    live writer's, another machine's and another target's alone."""
    import subprocess

    from jaccli.io import write as jwrite

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        names = {
            "dead": f".r.npy.{jwrite._OWNER}-{gone.pid}.a1b2.part",
            "live": f".r.npy.{jwrite._OWNER}-{live.pid}.a1b2.part",
            "elsewhere": f".r.npy.{jwrite._OWNER}x-{gone.pid}.a1b2.part",
            "other target": f".q.npy.{jwrite._OWNER}-{gone.pid}.a1b2.part",
        }
        for n in names.values():
            (tmp_path / n).write_bytes(b"partial")
        jaccli.save_tensors(tmp_path / "r.npy", torch.zeros(3))
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["r.npy", names["live"], names["elsewhere"], names["other target"]])
    finally:
        live.stdin.close()
        live.wait()
