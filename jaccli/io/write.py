"""Writing results: the writer table, output checks and atomic writes.

Each format is a row of :data:`WRITERS`; a result is written to a temporary file beside
the target and renamed into place, so a failure never leaves a partial file.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..choices import STDIO
from ..errors import OutputError, UsageError
from .read import SUFFIXES


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _write_npy(fh: BinaryIO, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    if len(tensors) != 1:
        raise OutputError(
            ".npy holds one array",
            expected="one result",
            got=f"{len(tensors)} ({', '.join(tensors)})",
            hint="save to .npz, .pt or .safetensors",
        )
    (t,) = tensors.values()
    np.save(fh, _to_numpy(t), allow_pickle=False)


def _write_npz(fh: BinaryIO, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    np.savez(fh, **{k: _to_numpy(v) for k, v in tensors.items()})


def _write_torch(fh: BinaryIO, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    obj = next(iter(tensors.values())) if len(tensors) == 1 else dict(tensors)
    torch.save(_detached(obj), fh)


def _detached(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().contiguous()
    return {k: _detached(v) for k, v in obj.items()}


def _write_safetensors(fh: BinaryIO, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save

    fh.write(save(_detached(dict(tensors)), metadata=dict(meta)))


#: result format name -> writer of ``{name: tensor}`` and string metadata to a binary stream
WRITERS: dict[str, Callable[[BinaryIO, dict[str, torch.Tensor], dict[str, str]], None]] = {
    "npy": _write_npy,
    "npz": _write_npz,
    "pt": _write_torch,
    "safetensors": _write_safetensors,
}

_SAVE_SUFFIXES = {s: f for s, f in SUFFIXES.items() if f in WRITERS}


def output_format(path: str | os.PathLike) -> str:
    """The result format ``--save PATH`` implies (``-`` is ``.npy`` on stdout)."""
    name = os.fspath(path)
    if name == STDIO:
        return "npy"
    suffix = Path(name).suffix.lower()
    if suffix not in _SAVE_SUFFIXES:
        raise UsageError(
            "cannot tell the output format from the suffix",
            where=name,
            expected="one of " + ", ".join(sorted(_SAVE_SUFFIXES)) + " or - for stdout",
            got=suffix or "no suffix",
        )
    return _SAVE_SUFFIXES[suffix]


def check_output(path: str | os.PathLike, *, force: bool = False) -> None:
    """Fail now, before any work, if ``path`` cannot receive a result."""
    output_format(path)
    if os.fspath(path) != STDIO:
        check_writable(path, force=force)


def check_writable(path: str | os.PathLike, *, force: bool = False) -> None:
    """Fail now if a file cannot be written at ``path`` (any format)."""
    name = os.fspath(path)
    p = Path(name)
    if p.is_dir():
        raise OutputError("is a directory", where=name, expected="a file path")
    if p.exists() and not force:
        raise OutputError("already exists", where=name, hint="pass --force to overwrite it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError("directory does not exist", where=str(parent))
    try:  # a real file, not os.access: root passes permission bits but not read-only mounts
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OutputError(f"directory is not writable: {exc.strerror or exc}", where=str(parent)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(
    path: str | os.PathLike,
    tensors: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, object] | None = None,
    force: bool = False,
) -> None:
    """Write result tensor(s) to ``path``; the suffix picks the format.

    The file appears complete or not at all: data go to a temporary file beside
    it that is renamed into place, and removed on any failure (Ctrl-C included).
    ``metadata`` (JSON-able values) is stored where the format has room for it
    (``.safetensors`` header).
    """
    fmt = output_format(path)
    check_output(path, force=force)
    if isinstance(tensors, torch.Tensor):
        tensors = {"result": tensors}
    tensors = dict(tensors)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    name = os.fspath(path)
    if name == STDIO:
        buf = io.BytesIO()
        WRITERS[fmt](buf, tensors, meta)
        sys.stdout.buffer.write(buf.getvalue())
        sys.stdout.buffer.flush()
        return
    write_atomically(name, lambda fh: WRITERS[fmt](fh, tensors, meta))


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path`` and rename it into place: the
    file appears complete or not at all (removed on any failure, Ctrl-C included)."""
    name = os.fspath(path)
    target = Path(name)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result is an ordinary file
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write: {exc.strerror or exc}", where=name) from None
        raise
