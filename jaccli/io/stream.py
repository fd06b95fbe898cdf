"""Streaming a per-sample result to disk, chunk by chunk, resumable and shared between ranks.

Owns :class:`Stream` (what a caller asks for: the target, its metadata, ``resume``),
:class:`FileSink` (what the engine's chunk loop writes into when a result streams: each
finished chunk goes to its rows of a ``.npy`` or ``.safetensors`` file, whose header is
written first from the result's shape and dtype), the partial file beside the target and
its resume records, and the split of chunks between the ranks of a ``torch.distributed``
job (``torchrun``).

Files beside ``DIR/NAME`` while a run is in progress:

* ``DIR/.NAME.jaccli-partial`` — the result file being filled; renamed to ``NAME`` when complete;
* ``DIR/.NAME.jaccli-partial.json`` — fingerprints of the request and the chunk grid;
* ``DIR/.NAME.jaccli-partial.doneR.json`` — the chunks rank ``R`` has finished (data flushed first).

What a signal or a kill can leave, and what becomes of it (rank 0 does all of this):

* The partial file is created first and locked (``flock``, held until the run ends, released
  by the kernel when the process dies): a second writer of the same target fails at once with
  exit 7 and the holder's pid. Then the request record is written and fsynced, then the header,
  then the space is reserved, and only then rows. A run interrupted (SIGINT, SIGTERM, SIGHUP)
  before its record is on disk removes its partial file; after that it keeps the partial run
  and records what it finished, for ``--resume``.
* ``--resume`` continues whatever is there: with no record or no finished chunk it starts from
  chunk 0; a record it cannot read is named, with the fix (rerun without ``--resume``).
* Records are written through a temporary file with signals held back, so only SIGKILL can
  leave one; the next run on the target, with or without ``--resume``, removes them.
* Under ``torchrun`` only rank 0 takes the lock; the other ranks open the file it created.
  A rank that loses contact with the others (one was killed) keeps the partial run.

How a chunk gets from where it was computed to the file is :mod:`.transfer`'s business (on
CUDA: copied on a side stream while the next chunk computes); how its bytes get onto the disk
(written whole, space reserved, writeback started as they land) is :mod:`.disk`'s.

The file's layout (formats, header, the finished file as a tensor) is :mod:`.streamfile`'s;
what the ranks exchange besides rows (rank, their meetings, errors as payloads) is :mod:`.ranks`'.

Imports: torch, numpy, :mod:`jaccli.errors`, :mod:`.write`, :mod:`.transfer`, :mod:`.records`,
:mod:`.streamfile`, :mod:`.ranks`, :mod:`.disk`; nothing of the engine.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from jaccli.errors import JaccliError, OutputError, ResumeError, UsageError
from jaccli import signals
from jaccli.io import transfer
from jaccli.io import records
from jaccli.io.records import (_Stats, _atomic_json, _done_path, _done_paths, _fsync_dir, _meta_path, _ranges, lock,
                                partial_path, read_records, remove_stale_temporaries)  # fmt: skip
from jaccli.io.disk import DiskFile
from jaccli.io.ranks import error_payload, Meetings, world_and_rank
from jaccli.io.streamfile import STREAM_FORMATS, file_header, open_result
from jaccli.io.write import _pause_for_tests, _place, check_writable, output_format


#: seconds between two resume records: each one flushes the data written so far to disk
RECORD_INTERVAL = 1.0
#: environment variable that sets another interval (seconds): fewer flushes on a slow network
#: file system; the tests set it beyond any run, so that records come only where a test makes them
RECORD_INTERVAL_ENV = "JACCLI_RECORD_INTERVAL"

#: test-only: SIGKILL this process after it has written this many chunks (and recorded them);
#: ``R:K`` does so on rank R alone
KILL_HOOK = "JACCLI_TEST_KILL_AFTER_CHUNKS"
#: test-only: ``R:K`` makes rank R fail with an error after writing K chunks
FAIL_HOOK = "JACCLI_TEST_FAIL_AFTER_CHUNKS"

_FORMAT_VERSION = 1


def can_stream(path) -> bool:
    """Whether a result saved to ``path`` can be written chunk by chunk (``.npy``, ``.safetensors``)."""
    return path is not None and os.fspath(path) != "-" and output_format(path) in STREAM_FORMATS


@dataclass
class Stream:
    """Where and how a per-sample result streams to disk (``save=`` of the derivative functions).

    ``shape`` is the file's shape when it differs from the result's (the same elements per
    point, e.g. a flattened view); ``name`` the tensor's name in a ``.safetensors`` file.
    ``fingerprint`` holds facts the caller knows (hashes of the model and input files,
    the command line) that must match for ``resume=True`` to continue a partial run;
    the request's own options, the chunk grid and the versions are added to it.

    After the run, :attr:`stats` holds min / max / mean over finite values and
    ``all_finite`` of the whole result (computed chunk by chunk), and
    :attr:`resumed_points` how many points an earlier run had already written.
    """

    path: str | os.PathLike
    name: str = "result"
    metadata: Mapping[str, object] | None = None
    shape: tuple[int, ...] | None = None
    force: bool = False
    resume: bool = False
    fingerprint: Mapping[str, object] | None = None
    stats: dict | None = field(default=None, init=False)
    resumed_points: int = field(default=0, init=False)
    world_size: int = field(default=1, init=False)


class FileSink:
    """Chunks of a per-sample result written straight into their rows of a file.

    The engine's chunk loop calls :meth:`open` (the flat result's shape and dtype),
    iterates :meth:`chunks`, fills :meth:`rows` and calls :meth:`commit` per chunk and
    :meth:`flush` at the end; the caller then calls :meth:`gather` (statistics of the whole
    result) and :meth:`finalise` (rename into place), or :meth:`abort` on any failure.
    A chunk counts as done (progress, resume records) once its rows are in the file, which
    on a GPU is while a later chunk computes (:mod:`.transfer`).

    Under ``torch.distributed`` every rank holds a sink: the chunks are split into
    contiguous shards, rank 0 creates the partial file and renames it, and the ranks
    meet at four fixed points (:class:`~jaccli.io.ranks.Meetings`), where any rank's
    failure reaches all of them; a failing rank still takes part in the remaining
    meetings, so none waits forever.
    """

    def __init__(self, stream: Stream, shape: tuple[int, ...], *, fingerprint: Mapping,
                 progress: Callable[[int, int], None] | None = None) -> None:  # fmt: skip
        self.stream = stream
        self.target = Path(os.fspath(stream.path))
        self.fmt = output_format(self.target)
        if self.fmt not in STREAM_FORMATS:
            raise UsageError("cannot stream to this format", where=str(self.target), expected=".npy or .safetensors")
        self.result_shape = tuple(shape)
        self.shape = tuple(stream.shape or shape)
        if math.prod(self.shape) != math.prod(shape) or self.shape[:1] != shape[:1]:
            raise UsageError("Stream.shape must hold the result's elements per point",
                             expected=str(list(shape)), got=str(list(self.shape)))  # fmt: skip
        self.fingerprint = dict(fingerprint)
        self.progress = progress
        self.partial = partial_path(self.target)
        self.world, self.rank = world_and_rank()
        stream.world_size = self.world
        self.fd: int | None = None
        self.disk: DiskFile | None = None  # writes self.fd's bytes once it is open
        self.copier = None  # a transfer.SyncChunks or DeviceChunks once open
        self.owned = False  # this run created or adopted the partial file: it may delete it
        self.meet = Meetings(self.world, self.rank, str(self.target))  # the ranks' fixed points
        self.done: set[int] = set()
        self.recorded: set[int] = set()
        self.last_record = time.monotonic()
        self.record_interval = _record_interval()
        self.stats = _Stats()
        self.written = 0
        self.meta_written = False  # the request record of this run's partial file is on disk
        kill = os.environ.get(KILL_HOOK, "").rpartition(":")
        self.kill_after = int(kill[2]) if kill[2] and (not kill[0] or int(kill[0]) == self.rank) else None
        fail = os.environ.get(FAIL_HOOK, "").partition(":")
        self.fail_after = int(fail[2]) if fail[2] and int(fail[0]) == self.rank else None

    # ------------------------------------------------------------------ the chunk loop's side

    def open(self, flat_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *,
             zero: bool, ppc: int) -> None:  # fmt: skip
        if self.meet.count:  # a fall-back plan reopens the sink: start again on the same file
            self._reset(flat_shape, dtype, device, zero, ppc)
            return
        if flat_shape[0] != self.shape[0] or math.prod(flat_shape) != math.prod(self.shape):
            raise UsageError("internal: the streamed result's shape changed", got=str(flat_shape))
        self.dtype, self.device, self.zero = dtype, device, zero
        parts = self.meet({"ppc": int(ppc)})
        grid = min(p["ppc"] for p in parts)
        info: dict = {}
        if self.rank == 0:
            try:
                info = self._create_or_resume(grid)
            except BaseException as exc:
                info = error_payload(exc)
                if not isinstance(exc, Exception):
                    raise
        parts = self.meet(info)
        info = parts[0]
        self.grid = info["grid"]
        self.done = {i for a, b in info["done"] for i in range(a, b)}
        self.recorded = set(self.done)
        if self.rank != 0:
            self._opened(os.open(self.partial, os.O_RDWR))
        self.offset = info["offset"]
        self.row_bytes = math.prod(flat_shape[1:]) * torch.empty((), dtype=dtype).element_size()
        self._open_copier(flat_shape, dtype, device)
        n = self.shape[0]
        count = math.ceil(n / self.grid)
        lo, hi = count * self.rank // self.world, count * (self.rank + 1) // self.world
        self.mine = [c for c in range(lo, hi) if c not in self.done]
        for c in range(lo, hi):  # the statistics must cover the rows an earlier run wrote too
            if c in self.done:
                self._restat(c * self.grid, min((c + 1) * self.grid, n))
        done_points = sum(min(self.grid, n - c * self.grid) for c in self.done)
        self.stream.resumed_points = done_points
        self.total = sum(min(self.grid, n - c * self.grid) for c in range(lo, hi))
        self.points_done = self.total - sum(min(self.grid, n - c * self.grid) for c in self.mine)
        if self.progress is not None:
            self.progress(self.points_done, self.total)

    def _restat(self, start: int, stop: int) -> None:
        """Add rows already in the file (written by an interrupted run) to the statistics."""
        np_dtype = np.dtype(str(self.dtype).removeprefix("torch."))
        data = os.pread(self.fd, (stop - start) * self.row_bytes, self.offset + start * self.row_bytes)
        self.stats.add(torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()))

    def _reset(self, flat_shape, dtype, device, zero, ppc) -> None:
        # only a single process falls back (an op without forward-mode derivative is found on
        # the first chunk of every rank alike); what the first plan wrote is overwritten
        self.dtype, self.device, self.zero = dtype, device, zero
        self.done, self.recorded = set(), set()
        self.grid = int(ppc)
        self.row_bytes = math.prod(flat_shape[1:]) * torch.empty((), dtype=dtype).element_size()
        self._open_copier(flat_shape, dtype, device)
        n = self.shape[0]
        count = math.ceil(n / self.grid)
        lo, hi = count * self.rank // self.world, count * (self.rank + 1) // self.world
        self.mine = list(range(lo, hi))
        self.stats = _Stats()
        self.points_done = 0
        # the records must describe the new grid, or a resumption would mix the two
        _done_path(self.partial, self.rank).unlink(missing_ok=True)
        if self.rank == 0:
            meta = _meta_path(self.partial)
            doc = json.loads(meta.read_text())
            _atomic_json(meta, {**doc, "grid": self.grid})

    def chunks(self, n: int) -> Iterator[tuple[int, int]]:
        for c in list(self.mine):
            yield c * self.grid, min((c + 1) * self.grid, n)

    def _open_copier(self, flat_shape, dtype, device) -> None:
        self._close_copier()
        self.copier = transfer.make_copier(device, min(self.grid, self.shape[0]), tuple(flat_shape[1:]), dtype,
                                           self._write_rows, self._finish)  # fmt: skip

    def rows(self, start: int, stop: int) -> torch.Tensor:
        block = self.copier.rows(stop - start)
        if self.zero:
            block.zero_()
        return block

    def commit(self, start: int, stop: int) -> None:
        """The chunk's rows are computed (or, on a GPU, queued): hand them to the copier,
        which writes them and calls :meth:`_finish`, at once or while later chunks compute."""
        block = self.copier.rows(stop - start)
        note = None
        if self.copier.overlaps:
            note = _Stats.reduce(block)
        else:
            self.stats.add(block)
        self.copier.submit((start, stop), stop - start, note)

    def flush(self) -> None:
        """Write every chunk committed so far (the chunk loop's end)."""
        if self.copier is not None:
            self.copier.flush()

    def _write_rows(self, key: tuple[int, int], row0: int, host: torch.Tensor) -> None:
        data = host.detach().cpu().contiguous().numpy()
        self.disk.write(memoryview(data).cast("B"), self.offset + (key[0] + row0) * self.row_bytes)

    def _finish(self, key: tuple[int, int], note: torch.Tensor | None, block: torch.Tensor) -> None:
        """All rows of the chunk are in the file: count it done (resume records, hooks, progress)."""
        start, stop = key
        if note is not None and not self.stats.add_reduced(block.numel(), note):
            self.stats.add(block)
        c = start // self.grid
        self.done.add(c)
        self.points_done += stop - start
        self.written += 1
        now = time.monotonic()
        kill = self.kill_after is not None and self.written >= self.kill_after
        if kill or now - self.last_record >= self.record_interval:
            self._record()
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        _pause_for_tests(f"chunk-{self.written}")
        if self.fail_after is not None and self.written >= self.fail_after:
            raise OutputError(f"injected test failure ({FAIL_HOOK})", where=str(self.target))
        if self.progress is not None:
            self.progress(self.points_done, self.total)

    def _close_copier(self, *, failed: bool = False) -> None:
        """Drop the copier and whatever it still has in flight."""
        copier, self.copier = self.copier, None
        if copier is None:
            return
        try:
            copier.close()
        except RuntimeError:
            if not failed:  # after a failure, a broken CUDA context is news of that failure
                raise

    # ------------------------------------------------------------------ files

    def _opened(self, fd: int) -> None:
        self.fd = fd
        self.disk = DiskFile(fd, str(self.target), self._file_bytes)

    def _file_bytes(self) -> int:
        return self.offset + math.prod(self.shape) * self._itemsize()

    def _itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _record(self) -> None:
        """Flush the rows written so far, then say so: a record never claims unwritten data."""
        new = self.done - self.recorded
        if not new or self.fd is None:
            return
        self.disk.sync()
        _atomic_json(_done_path(self.partial, self.rank), {"chunks": _ranges(self.done)}, pause="done-record")
        self.recorded = set(self.done)
        self.last_record = time.monotonic()

    def _fingerprint(self) -> dict:
        """The caller's facts with this file's layout: :func:`~jaccli.io.records.fingerprint`."""
        return records.fingerprint(self.fingerprint, layout={
            "format_version": _FORMAT_VERSION,
            "file_format": self.fmt,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "name": self.stream.name,
            "metadata": {k: v if isinstance(v, str) else json.dumps(v) for k, v in (self.stream.metadata or {}).items()},
        })  # fmt: skip

    def _create_or_resume(self, grid: int) -> dict:
        """Rank 0: lock the partial file, then either continue the run it holds (``--resume``)
        or start it afresh: request record (fsynced) first, then header, then space."""
        check_writable(self.target, force=self.stream.force)
        header = file_header(self.fmt, self.shape, self.dtype, self.stream.name, self.stream.metadata or {})
        self.offset = len(header)
        fingerprint = self._fingerprint()
        meta_file = _meta_path(self.partial)
        if self.stream.resume and not self.partial.exists() and not meta_file.exists():
            remove_stale_temporaries(self.partial)  # no partial file: no writer can own them
            raise ResumeError(
                "nothing to resume: no partial run of this result",
                where=str(self.target),
                expected=f"{self.partial.name} beside it",
                hint="run without --resume",
            )
        fd, self.owned = lock(self.partial, self.target)  # ours to remove only if created here
        self._opened(fd)
        _pause_for_tests("locked")
        remove_stale_temporaries(self.partial)  # a killed run's: the lock says none is live
        if self.stream.resume:
            found = self._resume(header, fingerprint)
            if found is not None:
                return found
        return self._fresh(header, fingerprint, grid)

    def _fresh(self, header: bytes, fingerprint: dict, grid: int) -> dict:
        self.owned = True
        for stale in [_meta_path(self.partial), *_done_paths(self.partial)]:
            stale.unlink(missing_ok=True)
        self.meta_written = False
        try:
            os.ftruncate(self.fd, 0)
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror or exc}", where=str(self.target)) from None
        self.disk.check_space(self._file_bytes())
        _atomic_json(_meta_path(self.partial), {"fingerprint": fingerprint, "grid": grid, "offset": len(header)},
                     pause="meta-record")  # fmt: skip
        self.meta_written = True
        _pause_for_tests("meta-written")
        self.disk.write(memoryview(header), 0)
        self.disk.reserve(len(header), self._file_bytes())
        _pause_for_tests("allocated")
        return {"grid": grid, "done": [], "offset": len(header)}

    def _resume(self, header: bytes, fingerprint: dict) -> dict | None:
        """The state of the partial run this one continues, or None to start it from chunk 0
        (a run stopped before it recorded anything)."""
        found = read_records(self.partial, self.target, fingerprint, header_len=len(header),
                             data_bytes=math.prod(self.shape) * self._itemsize(), size=os.fstat(self.fd).st_size)  # fmt: skip
        if found is None:
            return None
        grid, done = found
        self.meta_written = self.owned = True
        return {"grid": grid, "done": _ranges(done), "offset": len(header)}

    # ------------------------------------------------------------------ the caller's side

    def gather(self) -> dict:
        """Flush this rank's rows and return the statistics of the whole result."""
        self.flush()
        self._close_copier()
        if self.disk is not None:
            self.disk.sync()
        parts = self.meet({"stats": self.stats.as_dict()})
        stats = _Stats.merge([p["stats"] for p in parts])
        self.stream.stats = {k: stats[k] for k in ("min", "max", "mean", "all_finite")}
        return stats

    def finalise(self) -> torch.Tensor:
        """Rank 0 renames the complete file into place; every rank gets it back as a tensor
        of the result's shape, backed by the file.

        The lock is held until the file has its name: a rival that opened the partial file
        meanwhile finds, once it gets the lock, that the name is no longer that file's. The
        records go first, so that a kill between leaves a partial file without records,
        which ``--resume`` redoes from chunk 0, never records of a file already placed."""
        info: dict = {}
        if self.rank == 0:
            try:
                mask = os.umask(0)
                os.umask(mask)
                os.fchmod(self.fd, 0o666 & ~mask)
                _pause_for_tests()
                with signals.deferred():  # not cut between placing the file and dropping its records
                    for p in [*_done_paths(self.partial), _meta_path(self.partial)]:
                        p.unlink(missing_ok=True)
                    # without --force, a file another process made meanwhile is not replaced
                    _place(str(self.partial), Path(self.target), self.stream.force)
                    _fsync_dir(self.partial.parent)
                self.owned = False
            except OutputError as exc:
                self._remove_partial()
                info = error_payload(exc)
            except OSError as exc:
                info = error_payload(OutputError(f"cannot write: {exc.strerror or exc}", where=str(self.target)))
            finally:
                self._close_fd()
        self.meet(info)
        self._close_fd()
        return open_result(self.target, self.shape, self.dtype).reshape(self.result_shape)

    def abort(self, exc: BaseException) -> None:
        """After a failure: tell the other ranks, and remove the partial file unless the run
        was interrupted or lost a rank (then ``--resume`` continues it). An interrupted run
        that had not yet recorded its request removes its partial file all the same: there
        is nothing in it to continue."""
        interrupted = not isinstance(exc, Exception) or self.meet.peer_lost
        self._close_copier(failed=True)  # chunks in flight are not done: a resumption redoes them
        if interrupted:
            try:
                with signals.deferred():
                    self._record()
            except (OSError, signals.Interrupted):
                pass
        elif self.world > 1:
            self.meet.attend_rest(exc)
        if self.rank == 0 and self.owned and (not interrupted or not self.meta_written):
            self._remove_partial()
        self._close_fd()

    def _remove_partial(self) -> None:
        """Remove the partial file, and its records where this run wrote or continued them
        (rank 0, holding the lock): a run refused before that leaves others' records alone."""
        records = [_meta_path(self.partial), *_done_paths(self.partial)] if self.meta_written else []
        with signals.deferred():
            for p in [self.partial, *records]:
                Path(p).unlink(missing_ok=True)
        self.owned = False

    def _close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd, self.disk = None, None


def _record_interval() -> float:
    text = os.environ.get(RECORD_INTERVAL_ENV, "").strip()
    if not text:
        return RECORD_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise UsageError(f"{RECORD_INTERVAL_ENV} must be a positive number of seconds", got=text)
    return value
