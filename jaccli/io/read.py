"""Reading tensor files: format sniffing by content, the reader table, the loading API.

A file is recognised by its content first (magic bytes), by its suffix second; each
format is a row of :data:`READERS` (and of :data:`SUFFIXES`). Nothing here runs code from
a data file: ``torch.load(weights_only=True)`` and ``np.load(allow_pickle=False)`` only.

The bytes come from :mod:`.sources` (bounded by the input limit); the numpy formats'
readers live in :mod:`.npy`; the torch, safetensors and text readers here.

Imports: numpy, torch, safetensors (on use), :mod:`.sources`, :mod:`.npy`, :mod:`.archives`,
:mod:`jaccli.request.choices`, :mod:`jaccli.errors`.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch

from jaccli.io.archives import ZIP_MAGIC as _ZIP_MAGIC, open_zip, verify_archive
from jaccli.io.npy import _map_npy, _read_npy, _read_npz
from jaccli.io.sources import (
    _NPY_MAGIC,
    Source,
    is_safetensors,
    limit_input_bytes,  # noqa: F401 (documented as jaccli.io.read.limit_input_bytes)
    max_input_bytes,
    read_source,
)
from jaccli.request.choices import DTYPE_NAMES, STDIO
from jaccli.errors import InputError, JaccliError, JaccliWarning, UsageError


#: dtype names accepted by ``--dtype`` and the API's ``dtype=``
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}

#: oldest torch whose ``torch.load(weights_only=True)`` has no known bypass (fixed in 2.6 and 2.10)
MIN_TORCH = (2, 10)

_SNIFF_BYTES = 64


def check_torch_version(version: str | None = None) -> None:
    """Refuse to unpickle anything with a torch whose safe loader is known to be bypassable."""
    text = version or torch.__version__
    parts = tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < MIN_TORCH:
        raise JaccliError(
            f"torch {text} is too old to load .pt files safely: torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
            "is required (earlier releases have known torch.load(weights_only=True) bypasses)",
            hint="upgrade torch, or use .npy or .safetensors inputs",
        )


_MODEL_ARCHIVES = {"torchscript": "a TorchScript model", "export": "a torch.export model"}


def _read_torch(src: Source) -> dict[str, torch.Tensor]:
    kind = archive_kind(src.data, src.name)
    if kind in _MODEL_ARCHIVES:
        raise InputError(
            f"is {_MODEL_ARCHIVES[kind]}, not a tensor file",
            where=src.name,
            hint="the model comes first on the command line, then the input",
        )
    obj = read_torch_object(src)
    if isinstance(obj, torch.Tensor):
        return {"": obj}
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    raise InputError(
        "holds no tensor",
        where=src.name,
        expected="a tensor or a dict of tensors",
        got=type(obj).__name__,
    )


def read_torch_object(src: Source):
    """What a ``torch.save`` file holds, loaded with ``weights_only=True`` (never arbitrary code)."""
    check_torch_version()
    if src.data.startswith(_ZIP_MAGIC):  # torch's reader checks no CRC: a damaged record would load
        verify_archive(src.data, src.name)
    try:
        # weights_only=True is explicit, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot override it
        return torch.load(io.BytesIO(src.data), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise InputError(
                "refused: the file needs arbitrary code to load (pickle), which jaccli never runs",
                where=src.name,
                hint="save plain tensors (torch.save(tensor) or a dict of tensors), .npy or .safetensors",
            ) from None
        raise InputError(f"cannot read torch file: {first}", where=src.name) from None


def _read_safetensors(src: Source) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    try:
        out = st_load(src.data)
    except Exception as exc:
        raise InputError(f"corrupt .safetensors: {exc}", where=src.name) from None
    if not out:
        raise InputError("holds no tensors", where=src.name)
    return out


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file's header (empty when absent)."""
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested 100 000 deep: not ours to parse
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def _read_text(src: Source) -> dict[str, torch.Tensor]:
    try:
        text = src.data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(
            "unrecognised binary file",
            where=src.name,
            expected="one of " + ", ".join(sorted(SUFFIXES)),
        ) from None
    delimiter = "," if src.suffix == ".csv" or ("," in text.split("\n", 1)[0]) else None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines:
        try:
            [float(v) for v in lines[0].split(delimiter)]
        except ValueError:
            lines = lines[1:]  # a header row of column names
    if not lines:
        raise InputError("holds no numbers", where=src.name)
    try:
        array = np.loadtxt(lines, delimiter=delimiter, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"not a numeric table: {exc}", where=src.name) from None
    return {"": torch.from_numpy(array)}


def _zip_names(data: bytes, name: str) -> list[str]:
    return open_zip(data, name).namelist()


def archive_kind(data: bytes, name: str = "<archive>") -> str | None:
    """``"torchscript"``, ``"export"`` or ``"torch"`` for a zip written by torch; else None.
    A zip archive too damaged to list is an :class:`InputError` naming ``name``."""
    if not data.startswith(_ZIP_MAGIC):
        return None
    names = _zip_names(data, name)
    if any(n.endswith("archive_format") or "/models/" in n and n.endswith(".json") for n in names):
        return "export"
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch"
    return None


def _sniff(src: Source) -> str | None:
    """The tensor format of ``src`` by content, or None when the bytes do not say."""
    head = src.data[:_SNIFF_BYTES]
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_ZIP_MAGIC):
        names = _zip_names(src.data, src.name)
        if any(n.endswith(".npy") for n in names) and not any(n.endswith("data.pkl") for n in names):
            return "npz"
        return "pt"
    if is_safetensors(src.data):  # before the pickle test: a header length may start with 0x80
        return "safetensors"
    if head.startswith(b"\x80"):  # legacy (non-zip) torch.save: a pickle stream
        return "pt"
    return None


#: tensor format name -> reader of its bytes into ``{name: tensor}`` ("" for an unnamed one)
READERS: dict[str, Callable[[Source], dict[str, torch.Tensor]]] = {
    "npy": _read_npy,
    "npz": _read_npz,
    "pt": _read_torch,
    "safetensors": _read_safetensors,
    "text": _read_text,
}

#: file suffix -> tensor format, used when the content does not identify itself
SUFFIXES: dict[str, str] = {
    ".npy": "npy",
    ".npz": "npz",
    ".pt": "pt",
    ".pth": "pt",
    ".safetensors": "safetensors",
    ".csv": "text",
    ".txt": "text",
}


def load_tensors(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor in a file, by name (a single unnamed tensor has the name ``""``).

    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.npz")
    >>> np.savez(p, t=np.zeros(3), x=np.ones((3, 2)))
    >>> sorted(load_tensors(p))
    ['t', 'x']
    """
    mapped = _map_npy(path, max_input_bytes() if max_bytes is None else max_bytes)
    if mapped is not None:
        return mapped
    src = read_source(path, what="tensor file", max_bytes=max_bytes)
    fmt = _sniff(src) or SUFFIXES.get(src.suffix, "text")
    return READERS[fmt](src)


def load_tensor(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    dtype: torch.dtype | str | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """One floating-point tensor from ``path`` (``"-"`` reads ``.npy`` bytes from stdin).

    ``key`` picks a tensor from a file holding several. Integer and boolean data
    are cast to ``float32`` with a :class:`~jaccli.JaccliWarning` (a derivative needs
    a floating input); half precision is widened to ``float32`` likewise; complex
    data are refused. ``dtype`` (``"float32"``/``"float64"``) overrides the result's dtype.
    ``max_bytes`` caps what is read (default :func:`max_input_bytes`, 4 GiB).

    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> np.save(p, np.linspace(0, 1, 5)[:, None])
    >>> load_tensor(p).shape
    torch.Size([5, 1])
    """
    name = "<stdin>" if os.fspath(path) == STDIO else os.fspath(path)
    tensor = _pick(load_tensors(path, max_bytes=max_bytes), key, name)
    return as_float(tensor, dtype=dtype, where=name if key is None else f"{name}[{key}]")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A :class:`torch.dtype` from a name in :data:`DTYPES` (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UsageError(
        "unsupported dtype", expected="one of " + ", ".join(DTYPES), got=str(dtype)
    )


def as_float(tensor: torch.Tensor, *, dtype=None, where: str = "input") -> torch.Tensor:
    """``tensor`` as a float32/float64 tensor, casting with a notice where needed."""
    want = resolve_dtype(dtype)
    if tensor.is_complex():
        raise InputError(
            "complex inputs are not supported",
            where=where,
            expected="real numbers",
            got=str(tensor.dtype).removeprefix("torch."),
            hint="split real and imaginary parts into separate inputs",
        )
    if want is None:
        if tensor.dtype in DTYPES.values():
            return tensor
        want = torch.float32
        warnings.warn(
            f"{where}: {str(tensor.dtype).removeprefix('torch.')} data cast to float32 "
            "(derivatives need floating-point inputs; pass --dtype float64 for more precision)",
            JaccliWarning,
            stacklevel=2,
        )
    return tensor.to(want)


def _pick(found: dict[str, torch.Tensor], key: str | None, where: str) -> torch.Tensor:
    if key is None:
        if len(found) == 1:
            return next(iter(found.values()))
        raise InputError(
            "holds several tensors and no key was given",
            where=where,
            expected="--key with one of " + ", ".join(sorted(found)),
        )
    if key not in found:
        raise InputError(
            f"has no tensor named {key!r}", where=where, expected="one of " + ", ".join(sorted(found))
        )
    return found[key]
