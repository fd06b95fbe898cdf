"""What a streamed run keeps beside its partial file, and the statistics it gathers.

Owns the names of the files beside ``DIR/NAME`` while a result streams (the partial file,
its request record, the per-rank records of finished chunks: see :mod:`.stream`), the lock
on the partial file, the reading of the records a resumed run continues, the
fingerprints a resumed run must match (files, parameters), the atomic JSON write of a
record, the chunk ranges records hold, and :class:`_Stats`: min / max / mean over the
result gathered chunk by chunk (so a streamed result gets the summary an in-memory one
gets, merged over ranks).

Imports: torch, numpy, :mod:`jaccli.signals`, :mod:`jaccli.errors` and the test pause hook of :mod:`.write`.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from jaccli import signals
from jaccli.errors import OutputError, ResumeError
from jaccli.io.write import _pause_for_tests

_PARTIAL = ".jaccli-partial"
_TMP = ".tmp"


def partial_path(target: str | os.PathLike) -> Path:
    t = Path(os.fspath(target))
    return t.parent / f".{t.name}{_PARTIAL}"


def _meta_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _done_paths(partial: Path) -> list[Path]:
    return sorted(partial.parent.glob(glob.escape(partial.name) + ".done*.json"))


def _done_path(partial: Path, rank: int) -> Path:
    return partial.with_name(f"{partial.name}.done{rank}.json")


def lock(partial: Path, target: Path) -> tuple[int, bool]:
    """Open (creating it if need be) the partial file and lock it for the run's life:
    ``(fd, whether this call created it)``.

    A second writer fails at once (exit 7) rather than waiting: it would only redo the
    same work, and a user who started two runs by mistake learns it now. The lock is the
    kernel's (``flock``): a killed holder releases it, so a stale partial run never
    blocks anyone. A file renamed into place or removed by the writer that held it while
    this one waited on the lock is not the partial file any more: open the name again.
    Where the file system has no ``flock`` (ENOLCK, EOPNOTSUPP), the run goes on unlocked.
    """
    while True:
        try:
            try:
                fd, created = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
            except FileExistsError:
                fd, created = os.open(partial, os.O_RDWR), False
        except FileNotFoundError:  # removed between the two opens: try again
            continue
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror or exc}", where=str(target)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)  # None where it let go meanwhile: it was writing all the same
            os.close(fd)
            raise OutputError(
                f"another jaccli {f'(pid {holder})' if holder else 'process'} is writing {target}",
                hint="wait for it to finish, or stop it (an interrupted run can be resumed with --resume)",
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise OutputError(f"cannot lock the partial file: {exc.strerror or exc}", where=str(partial)) from None
        try:
            same = os.stat(partial).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, created
        os.close(fd)


def _lock_holder(fd: int) -> int | None:
    """The pid holding the ``flock`` on ``fd``'s file, from ``/proc/locks`` (Linux), or None."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()
                if "FLOCK" in fields and want in fields:
                    pid = int(fields[fields.index(want) - 1])
                    if pid > 0 and pid != os.getpid():
                        return pid
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_records(partial: Path, target: Path, fingerprint: dict, *, header_len: int, data_bytes: int,
                 size: int) -> tuple[int, set[int]] | None:  # fmt: skip
    """``(grid, finished chunks)`` of the partial run a resumed run continues, or None
    where it must start from chunk 0 (stopped before it recorded its request or any chunk).

    A :class:`~jaccli.errors.ResumeError` where the records cannot be read (named, with
    the fix), were made for another request, or describe a file that is not there."""
    meta_file = _meta_path(partial)
    if not meta_file.exists():  # stopped between creating the file and writing its record
        return None
    try:
        meta = json.loads(meta_file.read_text())
        old = meta["fingerprint"]
        grid, offset = int(meta["grid"]), int(meta["offset"])
        if not isinstance(old, dict) or grid < 1:
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _unreadable(meta_file, exc) from None
    differ = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if differ:
        raise ResumeError(
            "the partial run was made with another model, input, command or options",
            where=str(target),
            got="differs in " + ", ".join(differ),
            hint="rerun without --resume to start over",
        )
    done: set[int] = set()
    for p in _done_paths(partial):
        try:
            done |= {i for a, b in json.loads(p.read_text())["chunks"] for i in range(int(a), int(b))}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _unreadable(p, exc) from None
    if not done:  # nothing recorded as finished: whatever the file holds, start from chunk 0
        return None
    if offset != header_len or size != header_len + data_bytes:
        raise ResumeError("the partial file does not match its records", where=str(partial),
                          expected=f"{header_len + data_bytes} bytes", got=f"{size} bytes",
                          hint="rerun without --resume to start over")  # fmt: skip
    return grid, done


def _unreadable(path: Path, exc: BaseException) -> ResumeError:
    if isinstance(exc, OSError):
        reason = exc.strerror or "cannot be read"
    elif isinstance(exc, ValueError) and not isinstance(exc, UnicodeDecodeError):
        reason = "not valid JSON"
    else:
        reason = "not a jaccli record"
    return ResumeError(f"the partial run's record is unreadable ({reason})", where=str(path),
                       hint="rerun without --resume to start over")  # fmt: skip


def file_fingerprint(path: str | os.PathLike, *, whole: bool = True) -> dict:
    """Size, modification time and SHA-256 of a file (of its first and last MiB unless ``whole``)."""
    p = Path(os.fspath(path))
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        if whole or st.st_size <= 2 * 2**20:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
        else:
            h.update(fh.read(2**20))
            fh.seek(-(2**20), os.SEEK_END)
            h.update(fh.read(2**20))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest(), "whole": whole}


def parameters_fingerprint(f) -> str | None:
    """SHA-256 of a module's parameters and buffers (None for a plain function)."""
    state = getattr(f, "state_dict", None)
    if not callable(state):
        return None
    h = hashlib.sha256()
    for k, v in state().items():
        if isinstance(v, torch.Tensor):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(facts: Mapping, *, module=None, tensors: Mapping | None = None, layout: Mapping | None = None) -> dict:
    """The one fingerprint of a streamed result: what a resumed run must share with the
    interrupted one, recorded beside the partial file and compared key by key on resume.

    ``facts`` are the caller's: the request's options and the plan's chunking (the engine),
    or the loss and parameters (``grads``), and what the CLI knows of its files (``model``,
    ``inputs``: :func:`file_fingerprint`) and loading options. Where the caller names no
    ``model`` or ``inputs``, digests of ``module``'s parameters and of the argument
    ``tensors`` themselves stand in; the jaccli and torch versions are added unless given.
    ``layout`` is the file's own (format, shape, dtype, tensor name, header metadata), which
    :class:`~jaccli.io.stream.FileSink` adds."""
    import importlib.metadata

    out = dict(facts)
    out.setdefault("versions", {"jaccli": importlib.metadata.version("jaccli"), "torch": torch.__version__})
    if module is not None and "model" not in out:
        out["model"] = parameters_fingerprint(module)
    if tensors is not None and "inputs" not in out:
        out["inputs"] = {
            label: {"shape": list(v.shape), "dtype": str(v.dtype),
                    "sha256": hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()}
            for label, v in tensors.items()
        }  # fmt: skip
    return {**out, **(layout or {})}


def _atomic_json(path: Path, doc: dict, *, pause: str | None = None) -> None:
    """Write ``doc`` to ``path`` through a temporary file, durably (file and directory
    fsynced), with SIGINT/SIGTERM/SIGHUP held back until done: a signal never leaves the
    temporary file behind (it arrives as :class:`~jaccli.signals.Interrupted` afterwards).
    Only SIGKILL can, and :func:`remove_stale_temporaries` clears that on the next run.
    ``pause`` names a test moment between writing the temporary file and renaming it."""
    tmp = path.with_name(path.name + _TMP)
    with signals.deferred():
        try:
            with open(tmp, "w") as fh:
                json.dump(doc, fh)
                fh.flush()
                os.fsync(fh.fileno())
            if pause:
                _pause_for_tests(pause)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory: the rename is all they offer
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(partial: Path) -> list[Path]:
    """Remove the temporary files of records a killed run left beside ``partial``; call
    only while holding the partial run's lock (or where no partial run exists), when no
    other writer can be in the middle of one."""
    stale = sorted(partial.parent.glob(glob.escape(partial.name) + "*" + _TMP))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _ranges(done: set[int]) -> list[list[int]]:
    """``{0, 1, 2, 5}`` → ``[[0, 3], [5, 6]]``: chunk indices as half-open ranges."""
    out: list[list[int]] = []
    for i in sorted(done):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _sum64(flat: torch.Tensor) -> float:
    """The float64 sum of a flat tensor. On CPU numpy's reduction, which casts to float64 a
    buffer at a time: 0.3 ms for a million float32 values here, where torch's
    ``sum(dtype=torch.float64)`` takes 1.5 ms (0.06 s of a 200 MB result's 51 chunks)."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, an overflow: quiet, as torch's sum is
            return float(np.add.reduce(flat.numpy(), dtype=np.float64))
    return float(flat.sum(dtype=torch.float64))


class _Stats:
    """min / max / sum / count over finite values, chunk by chunk, as render.stats gives them whole."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.total = 0.0
        self.count = 0
        self.numel = 0
        self.all_finite = True
        self.nonzero = False

    def add(self, block: torch.Tensor) -> None:
        """Two passes over the chunk while it is still in cache: the sum (all finite where it
        is finite: an Inf or NaN makes it one, and float64 cannot overflow on float32 values)
        and min/max together; a chunk with non-finite values is masked and summed again."""
        flat = block.detach().reshape(-1)
        if flat.numel() == 0:
            return
        self.numel += flat.numel()
        total = _sum64(flat)
        if not math.isfinite(total):
            finite = torch.isfinite(flat)
            self.all_finite &= bool(finite.all())
            flat = flat[finite]
            if flat.numel() == 0:
                return
            total = _sum64(flat)
        lo, hi = (float(v) for v in torch.aminmax(flat))
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.total += total
        self.count += flat.numel()
        self.nonzero |= lo != 0 or hi != 0

    @staticmethod
    def reduce(block: torch.Tensor) -> torch.Tensor | None:
        """``[sum, min, max]`` of ``block`` in float64, computed where it lies and not waited
        for: a GPU chunk's statistics travel to the host with its rows instead of stalling
        the host until the chunk is done (the reason :meth:`add` is not used there)."""
        flat = block.reshape(-1)
        if flat.numel() == 0:
            return None
        lo, hi = torch.aminmax(flat)
        return torch.stack([flat.sum(dtype=torch.float64), lo.to(torch.float64), hi.to(torch.float64)])

    def add_reduced(self, numel: int, reduced: torch.Tensor) -> bool:
        """Add what :meth:`reduce` gave; False where a value is not finite (then :meth:`add`
        must look at the values themselves)."""
        total, lo, hi = reduced.tolist()
        if not math.isfinite(total):
            return False
        self.numel += numel
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.total += total
        self.count += numel
        self.nonzero |= bool(lo != 0 or hi != 0)
        return True

    def as_dict(self) -> dict:
        return vars(self).copy()

    @classmethod
    def merge(cls, parts: list[dict]) -> dict:
        """The stats of the whole result from those of the ranks (render.stats' keys)."""
        lo = min(p["lo"] for p in parts)
        hi = max(p["hi"] for p in parts)
        count = sum(p["count"] for p in parts)
        return {
            "min": lo if count else None,
            "max": hi if count else None,
            "mean": sum(p["total"] for p in parts) / count if count else None,
            "all_finite": all(p["all_finite"] for p in parts),
            "nonzero": any(p["nonzero"] for p in parts),
        }
