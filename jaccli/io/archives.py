"""Zip archives (``.npz``, ``torch.save`` files, TorchScript, ``torch.export`` ``.pt2``)
checked before any of their bytes are used.

Python's :mod:`zipfile` raises a zoo of exceptions for a damaged archive
(``NotImplementedError`` for a "version needed to extract" it does not know,
``UnicodeDecodeError`` for a member name flagged UTF-8 that is not, ``BadZipFile``,
``EOFError``, ``struct.error``), and torch's own reader checks no CRC at all: a weight
record cut short or altered loads as garbage weights and computes a result. Here:

* :func:`open_zip` opens an archive and turns every one of those into one
  :class:`~jaccli.errors.InputError` in plain words, naming the file;
* :func:`verify_archive` checks every member's CRC-32 (so a damaged record is refused
  before torch reads it) and, for archives written by torch, that each tensor record holds
  the bytes its pickle declares (a record truncated and re-zipped with a fresh CRC).

The pickles are scanned with an unpickler that resolves no global at all (every class is a
stand-in that does nothing): nothing in the archive runs.

Imports: :mod:`jaccli.errors` only.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib

from jaccli.errors import InputError, first_line

ZIP_MAGIC = b"PK\x03\x04"

#: zipfile reads "version needed to extract" up to this (6.3); torch writes 2.0
_MAX_VERSION = zipfile.MAX_EXTRACT_VERSION


def is_zip(data: bytes) -> bool:
    return data[:4] == ZIP_MAGIC


def open_zip(data: bytes, name: str) -> zipfile.ZipFile:
    """The archive in ``data``; an :class:`InputError` naming ``name`` and what is wrong
    where :mod:`zipfile` cannot read its directory."""
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except Exception as exc:  # zipfile's zoo: see the module docstring
        raise damaged(exc, name) from None


def damaged(exc: BaseException, name: str, member: str | None = None) -> InputError:
    """What a :mod:`zipfile` failure means, in words."""
    text = str(exc)
    if isinstance(exc, NotImplementedError) and text.startswith("zip file version"):
        return InputError(
            "damaged or unsupported zip archive: a member needs a newer zip version to extract",
            where=name,
            expected=f"at most {_MAX_VERSION // 10}.{_MAX_VERSION % 10}",
            got=text.removeprefix("zip file version ").strip(),
        )
    if isinstance(exc, UnicodeDecodeError):
        return InputError("damaged zip archive: a member's name is flagged UTF-8 but is not valid UTF-8", where=name)
    if isinstance(exc, zipfile.BadZipFile) and text.startswith("Bad CRC-32"):
        return InputError(
            f"damaged zip archive: member {member or '?'} does not match its CRC-32 (corrupted or truncated)",
            where=name,
        )
    if isinstance(exc, zipfile.BadZipFile) and "not a zip file" in text:
        return InputError("damaged zip archive: its directory at the end is missing (truncated?)", where=name)
    if isinstance(exc, NotImplementedError):
        return InputError(f"unsupported zip archive: {first_line(exc).lower()}", where=name)
    if isinstance(exc, zipfile.BadZipFile | EOFError | struct.error | ValueError | OSError):
        where = f" (member {member})" if member else ""
        return InputError(f"damaged zip archive{where}: {_words(exc)}", where=name)
    return InputError(f"damaged zip archive: {type(exc).__name__}", where=name)


def _words(exc: BaseException) -> str:
    text = first_line(exc)
    if isinstance(exc, EOFError | struct.error) or not text or "0x" in text:
        return "it ends before its records do (truncated?)"
    return text[:1].lower() + text[1:]


def verify_archive(data: bytes, name: str) -> zipfile.ZipFile:
    """Open the archive and check, before anything uses it, every member's CRC-32 and,
    for torch's archives, that every tensor record holds the bytes its pickle declares."""
    archive = open_zip(data, name)
    for info in archive.infolist():
        if info.is_dir():
            continue
        try:
            with archive.open(info) as fh:
                crc = 0
                for block in iter(lambda: fh.read(1 << 20), b""):
                    crc = zlib.crc32(block, crc)
        except Exception as exc:  # zipfile checks the CRC itself at the member's end
            raise damaged(exc, name, info.filename) from None
        if crc != info.CRC:  # pragma: no cover - zipfile raised already; kept for readers that do not
            raise damaged(zipfile.BadZipFile("Bad CRC-32"), name, info.filename)
    _check_torch_records(archive, name)
    return archive


def _check_torch_records(archive: zipfile.ZipFile, name: str) -> None:
    """Each storage a torch pickle (``data.pkl``, ``constants.pkl``) declares is a record
    ``<pickle name>/<key>`` of at least its bytes."""
    sizes = {info.filename: info.file_size for info in archive.infolist()}
    for pkl in sizes:
        base = pkl.rsplit("/", 1)[-1]
        if base not in ("data.pkl", "constants.pkl"):
            continue
        records = pkl[: -len(".pkl")] + "/"
        try:
            storages = _storages(archive.read(pkl))
        except Exception:  # not a pickle we can scan: torch's loader reports it
            continue
        for key, need in storages:
            record = records + key
            have = sizes.get(record)
            if have is None:
                raise InputError(f"damaged archive: the tensor record {record} is missing", where=name)
            if need is not None and have < need:
                raise InputError(
                    f"damaged archive: the tensor record {record} is shorter than its tensor (truncated?)",
                    where=name,
                    expected=f"{need} bytes",
                    got=f"{have} bytes",
                )


class _Inert:
    """What every global of a scanned pickle becomes: accepts anything, does nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _Scanner(pickle.Unpickler):
    """Collects the storages a torch pickle refers to, resolving no global."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.found: list[tuple] = []

    def find_class(self, module: str, name: str):
        return type(str(name), (_Inert,), {})

    def persistent_load(self, pid):
        if isinstance(pid, tuple):
            self.found.append(pid)
        return _Inert()


def _storages(data: bytes) -> list[tuple[str, int | None]]:
    """``(record key, bytes needed or None)`` for each storage ``data`` (a pickle) refers to."""
    scanner = _Scanner(data)
    scanner.load()
    out = []
    for pid in scanner.found:
        if len(pid) >= 5 and pid[0] == "storage":
            kind, key, numel = getattr(pid[1], "__name__", ""), str(pid[2]), pid[4]
            size = _element_size(kind)
            out.append((key, numel * size if isinstance(numel, int) and size else None))
    return out


#: bytes per element of the storage classes torch's pickles name (``FloatStorage``, …)
_STORAGE_BYTES = {
    "Untyped": 1, "Byte": 1, "Char": 1, "Bool": 1, "QUInt8": 1, "QInt8": 1, "QUInt4x2": 1, "QUInt2x4": 1,
    "Short": 2, "Half": 2, "BFloat16": 2, "Int": 4, "Float": 4, "QInt32": 4, "Long": 8, "Double": 8,
    "ComplexHalf": 4, "ComplexFloat": 8, "ComplexDouble": 16,
}  # fmt: skip


def _element_size(storage_name: str) -> int | None:
    return _STORAGE_BYTES.get(storage_name.removesuffix("Storage"))
