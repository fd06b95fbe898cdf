"""The copiers of jaccli.io.transfer: chunks from where they were computed to the file.

On CPU, :class:`DeviceChunks` runs with :class:`FakeStreams`, which models CUDA's ordering
rather than ignoring it: a copy issued on the side stream happens only when something
waits for it (an event synchronised by the host, or the compute stream waiting before it
reuses a slot). A copier that read a staging buffer too early, or let the next chunk be
computed into a slot whose copy had not run, writes wrong bytes here, as it would on a GPU
(and the loop below checks the second directly).
The CUDA tests at the end run the real streams.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaccli
from jaccli.io import stream as st
from jaccli.io import transfer
from problems import HANG_GUARD_S, tanh_mlp


class FakeStreams:
    """CUDA's stream semantics on the CPU: side-stream copies run late, when waited for
    (the compute stream is the test itself, synchronous)."""

    def __init__(self, *, slots: int = 2) -> None:
        self.queue: list[tuple[torch.Tensor, torch.Tensor]] = []  # copies issued, in order
        self.ran = 0  # how many of them have run
        self.log: list[tuple] = []
        self.slots_left = slots
        self.host_buffers = 0

    def device_buffer(self, shape, dtype):
        if self.slots_left == 0:
            raise torch.OutOfMemoryError("fake: no memory for another slot")
        self.slots_left -= 1
        return torch.full(shape, float("nan"), dtype=dtype)

    def host_buffer(self, shape, dtype):
        self.host_buffers += 1
        return torch.full(shape, float("nan"), dtype=dtype)

    def mark(self):
        self.log.append(("mark",))
        return ("main", len(self.log))

    def after(self, event):
        self.log.append(("after", event))

    def copy(self, dst, src):
        self.queue.append((dst, src))
        self.log.append(("copy", len(self.queue)))
        return len(self.queue)

    def _run(self, upto: int) -> None:
        while self.ran < upto:
            dst, src = self.queue[self.ran]
            dst.copy_(src)
            self.ran += 1

    def wait(self, event):
        self.log.append(("wait", event))
        self._run(event)

    def in_flight(self, sources) -> int:
        """Copies issued and not yet run whose source lies in one of ``sources``."""
        ptrs = {t.untyped_storage().data_ptr() for t in sources}
        return sum(src.untyped_storage().data_ptr() in ptrs for _, src in self.queue[self.ran :])

    def close(self):
        self.log.append(("close",))
        self._run(len(self.queue))


class Recorder:
    """The FileSink side: what was written where, and when chunks finished."""

    def __init__(self, n_rows: int, row_shape=(3,)) -> None:
        self.file = torch.full((n_rows, *row_shape), float("nan"))
        self.events: list[tuple] = []
        self.notes: dict = {}

    def write(self, key, row0, host):
        start, stop = key
        assert start + row0 + host.shape[0] <= stop
        self.file[start + row0 : start + row0 + host.shape[0]] = host
        self.events.append(("write", key, row0))

    def finish(self, key, note, rows):
        assert torch.equal(rows, self.file[key[0] : key[1]])  # the chunk is still intact in its slot
        self.notes[key] = None if note is None else note.clone()
        self.events.append(("finish", key))


def _chunks(n: int, size: int):
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _run_loop(copier, rec: Recorder, n: int, size: int, *, log=None, streams=None):
    """The engine's chunk loop: compute each chunk into rows(), commit, flush at the end."""
    want = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    for k, (a, b) in enumerate(_chunks(n, size)):
        block = copier.rows(b - a)
        if streams is not None:  # nothing may still be copied out of the slot we write into
            slot = block.untyped_storage().data_ptr()
            assert all(src.untyped_storage().data_ptr() != slot for _, src in streams.queue[streams.ran :])
        block.copy_(want[a:b])
        note = st._Stats.reduce(block) if copier.overlaps else None
        copier.submit((a, b), b - a, note)
        if log is not None:
            log.append(("submitted", k, len(rec.events)))
    copier.flush()
    return want


@pytest.mark.parametrize("n, size, stage_rows, stages", [(100, 16, 5, 3), (100, 16, 16, 2), (37, 50, 7, 3), (64, 8, 100, 3)])
def test_device_chunks_write_every_row_once_in_order(n, size, stage_rows, stages):
    fake = FakeStreams()
    rec = Recorder(n)
    copier = transfer.DeviceChunks(fake, size, (3,), torch.float32, rec.write, rec.finish,
                                   stage_bytes=stage_rows * 12, stages=stages)  # fmt: skip
    want = _run_loop(copier, rec, n, size, streams=fake)
    assert torch.equal(rec.file, want)
    writes = [e[1][0] + e[2] for e in rec.events if e[0] == "write"]  # first row of each piece
    assert writes == sorted(writes) and len(set(writes)) == len(writes)
    finished = [e[1] for e in rec.events if e[0] == "finish"]
    assert finished == _chunks(n, size)
    # a chunk finishes right after its last piece is written, never before
    for key in finished:
        i = rec.events.index(("finish", key))
        assert rec.events[i - 1][0] == "write" and rec.events[i - 1][1] == key
    # the statistics came along with each chunk: [sum, min, max] of its rows
    for a, b in finished:
        s, lo, hi = rec.notes[(a, b)].tolist()
        assert (s, lo, hi) == (float(want[a:b].double().sum()), float(want[a:b].min()), float(want[a:b].max()))
    assert fake.host_buffers == stages + len(finished)  # the staging ring once, a small note per chunk


def test_chunk_k_is_written_while_chunk_k_plus_1_computes():
    n, size = 80, 10
    fake, rec, log = FakeStreams(), Recorder(n), []
    copier = transfer.DeviceChunks(fake, size, (3,), torch.float32, rec.write, rec.finish, stage_bytes=5 * 12)
    _run_loop(copier, rec, n, size, log=log)
    finished_by = {k: count for _, k, count in log}
    keys = _chunks(n, size)
    for k in range(len(keys)):
        done_before_submit = [e for e in rec.events[: finished_by[k]] if e[0] == "finish"]
        # when chunk k is submitted, the host has not waited for it: its copy is queued, and
        # the loop goes on to compute chunk k + 1; chunk k - 1 was written meanwhile
        assert ("finish", keys[k]) not in done_before_submit
        if k >= 2:
            assert ("finish", keys[k - 2]) in done_before_submit
    # the side stream waits for each chunk's compute event before its first copy
    marks = [i for i, e in enumerate(fake.log) if e[0] == "mark"]
    afters = [i for i, e in enumerate(fake.log) if e[0] == "after"]
    assert len(marks) == len(afters) == len(keys) and all(m < a for m, a in zip(marks, afters))


def test_the_staging_ring_stays_full_and_bounds_the_copies_in_flight():
    fake = FakeStreams()
    n, size, piece, stages = 200, 50, 4, 3
    rec = Recorder(n)
    seen = []

    def write(key, row0, host):
        seen.append(fake.in_flight(copier.slots))
        rec.write(key, row0, host)

    copier = transfer.DeviceChunks(fake, size, (3,), torch.float32, write, rec.finish,
                                   stage_bytes=piece * 12, stages=stages)  # fmt: skip
    _run_loop(copier, rec, n, size)
    # while one piece is written, the other staging buffers are being filled with the next
    # pieces (of this chunk or the next one submitted), never more
    pieces_per_chunk = -(-size // piece)
    assert len(seen) == pieces_per_chunk * (n // size)
    assert max(seen) == stages - 1
    # the ring runs dry only at the end, and where the next chunk is not submitted yet
    assert seen[-1] == 0 and seen.count(stages - 1) > len(seen) // 2


def test_one_slot_when_a_second_does_not_fit():
    n, size = 60, 10
    fake, rec, log = FakeStreams(slots=1), Recorder(n), []
    copier = transfer.DeviceChunks(fake, size, (3,), torch.float32, rec.write, rec.finish, stage_bytes=4 * 12)
    want = _run_loop(copier, rec, n, size, log=log, streams=fake)
    assert torch.equal(rec.file, want)
    assert len(copier.slots) == 1 and fake.slots_left == 0
    # with one slot a chunk is written before the next may be computed into it
    keys = _chunks(n, size)
    for _, k, count in log:
        assert ("finish", keys[k]) not in rec.events[:count]
        assert k == 0 or ("finish", keys[k - 1]) in rec.events[:count]


def test_an_error_in_a_write_propagates_and_close_drops_the_rest():
    n, size = 60, 10
    fake = FakeStreams()
    rec = Recorder(n)

    def write(key, row0, host):
        if key[0] == 20:
            raise jaccli.OutputError("disk full (test)")
        rec.write(key, row0, host)

    copier = transfer.DeviceChunks(fake, size, (3,), torch.float32, write, rec.finish, stage_bytes=4 * 12)
    with pytest.raises(jaccli.OutputError):
        _run_loop(copier, rec, n, size)
    copier.close()
    assert [e[1] for e in rec.events if e[0] == "finish"] == [(0, 10), (10, 20)]
    assert copier.pending == copier.inflight == type(copier.inflight)()


def test_sync_chunks_hand_on_the_buffer_itself():
    rec = Recorder(30)
    copier = transfer.SyncChunks(torch.device("cpu"), 10, (3,), torch.float32, rec.write, rec.finish)
    seen = []
    orig = rec.write
    rec.write = lambda key, row0, host: (seen.append(host.data_ptr()), orig(key, row0, host))
    copier.write = rec.write
    want = _run_loop(copier, rec, 30, 10)
    assert torch.equal(rec.file, want)
    assert set(seen) == {copier.buffer.data_ptr()}  # no copy on CPU: the rows go to pwrite as they are
    assert [e[0] for e in rec.events] == ["write", "finish"] * 3


def test_the_second_slot_is_made_only_for_a_second_chunk():
    for n, slots in [(10, 1), (11, 2)]:
        fake, rec = FakeStreams(), Recorder(n)
        copier = transfer.DeviceChunks(fake, 10, (3,), torch.float32, rec.write, rec.finish, stage_bytes=4 * 12)
        assert torch.equal(_run_loop(copier, rec, n, 10), rec.file)
        assert len(copier.slots) == slots


def test_make_copier_picks_by_device(monkeypatch):
    args = (4, (3,), torch.float32, lambda *a: None, lambda *a: None)
    assert isinstance(transfer.make_copier(torch.device("cpu"), *args), transfer.SyncChunks)
    if torch.cuda.is_available():
        assert isinstance(transfer.make_copier(torch.device("cuda"), *args), transfer.DeviceChunks)
        monkeypatch.setenv(transfer.OVERLAP_ENV, "0")
        assert isinstance(transfer.make_copier(torch.device("cuda"), *args), transfer.SyncChunks)


def test_stats_from_reduced_chunks_equal_those_of_the_values():
    rng = np.random.default_rng(1)
    blocks = [torch.from_numpy(rng.standard_normal((7, 3)).astype(np.float32)) for _ in range(4)]
    blocks.append(torch.tensor([[1.0, float("nan"), -2.0]]))
    whole, reduced = st._Stats(), st._Stats()
    for b in blocks:
        whole.add(b)
        if not reduced.add_reduced(b.numel(), st._Stats.reduce(b)):
            reduced.add(b)
    assert whole.as_dict() == reduced.as_dict()  # the same float64 sums in the same order
    assert reduced.all_finite is False


# ----------------------------------------------------------------- FileSink through DeviceChunks


@pytest.fixture()
def pipelined(monkeypatch):
    """Every FileSink copies through DeviceChunks with FakeStreams, as on a GPU."""
    made = []

    def make(device, capacity, row_shape, dtype, write, finish):
        c = transfer.DeviceChunks(FakeStreams(), capacity, row_shape, dtype, write, finish, stage_bytes=7 * 4 * 8)
        made.append(c)
        return c

    monkeypatch.setattr(transfer, "make_copier", make)
    return made


@pytest.fixture()
def case(tmp_path):
    net = tanh_mlp((2, 16, 16, 4), dtype=torch.float32)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3000, 2)).astype(np.float32))
    return net, x, tmp_path


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian"])
def test_file_sink_through_device_chunks_is_byte_for_byte_the_in_memory_result(case, pipelined, kind):
    net, x, d = case
    want = getattr(jaccli, kind)(net, x, per_sample=True, chunk_size=700)
    spec = jaccli.Stream(d / "r.npy", name=kind)
    got = getattr(jaccli, kind)(net, x, per_sample=True, chunk_size=700, save=spec)
    assert pipelined and torch.equal(got, want)
    np.save(d / "ref.npy", want.numpy())
    assert (d / "r.npy").read_bytes() == (d / "ref.npy").read_bytes()
    assert (spec.stats["min"], spec.stats["max"]) == (float(want.min()), float(want.max()))
    assert spec.stats["mean"] == pytest.approx(float(want.double().mean()), rel=1e-9)


def test_progress_and_records_follow_the_written_chunks(case, pipelined):
    net, x, d = case
    want = jaccli.jacobian(net, x, per_sample=True, chunk_size=300)
    seen = []

    def stop(done, total):
        # what progress reports is on disk: those rows hold their final values already
        seen.append(done)
        assert np.array_equal(np.load(d / ".J.npy.jaccli-partial")[:done], want[:done].numpy())
        if done >= 1500:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=d / "J.npy", progress=stop)
    assert seen[-1] == 1500
    spec = jaccli.Stream(d / "J.npy", name="jacobian", resume=True)
    got = jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=spec)
    assert spec.resumed_points == 1500 and torch.equal(got, want)


def test_nan_in_a_chunk_takes_the_statistics_of_its_finite_values(case, pipelined):
    net, x, d = case
    x = x.clone()
    x[2500, 0] = float("nan")
    spec = jaccli.Stream(d / "J.npy", name="jacobian")
    with pytest.warns(jaccli.JaccliWarning):
        want = jaccli.jacobian(net, x, per_sample=True, chunk_size=300, check_batch=False)
        got = jaccli.jacobian(net, x, per_sample=True, chunk_size=300, check_batch=False, save=spec)
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    finite = want[torch.isfinite(want)]
    assert spec.stats["all_finite"] is False
    assert (spec.stats["min"], spec.stats["max"]) == (float(finite.min()), float(finite.max()))
    with pytest.raises(jaccli.NumericalError):
        jaccli.jacobian(net, x, per_sample=True, chunk_size=300, check_batch=False, strict=True, save=d / "S.npy")
    assert not (d / "S.npy").exists() and not [p for p in d.iterdir() if "jaccli-partial" in p.name]


def test_a_failure_mid_stream_leaves_no_file(case, pipelined, monkeypatch):
    net, x, d = case
    monkeypatch.setenv(st.FAIL_HOOK, "0:3")
    with pytest.raises(jaccli.OutputError, match="injected"):
        jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=d / "J.npy")
    assert sorted(p.name for p in d.iterdir()) == []


def test_disk_full_mid_stream_leaves_no_file(case, pipelined, monkeypatch):
    import errno
    import os

    net, x, d = case
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(st.os, "pwrite", pwrite)
    with pytest.raises(jaccli.OutputError, match="not enough disk space"):
        jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=d / "J.npy")
    assert sorted(p.name for p in d.iterdir()) == []


# ----------------------------------------------------------------- CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian"])
def test_cuda_stream_equals_the_in_memory_cuda_result_and_the_cpu_one(tmp_path, monkeypatch, kind):
    made = []
    real = transfer.make_copier
    monkeypatch.setattr(transfer, "make_copier", lambda *a: made.append(real(*a)) or made[-1])
    net = tanh_mlp((2, 32, 32, 5), dtype=torch.float32)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((5000, 2)).astype(np.float32))
    want_gpu = getattr(jaccli, kind)(net.cuda(), x.cuda(), per_sample=True, chunk_size=700).cpu()
    want_cpu = getattr(jaccli, kind)(net.cpu(), x, per_sample=True, chunk_size=700)
    spec = jaccli.Stream(tmp_path / "r.npy", name=kind)
    got = getattr(jaccli, kind)(net.cuda(), x.cuda(), per_sample=True, chunk_size=700, save=spec)
    # the same kernels on the same chunks (only where the rows lie differs, which could at
    # most change a library's choice of kernel): rounding apart, a misplaced row is O(1) off
    torch.testing.assert_close(got, want_gpu, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, want_cpu, rtol=1e-5, atol=1e-6)
    assert spec.stats["min"] == pytest.approx(float(want_gpu.min()), rel=1e-6)
    assert spec.stats["max"] == pytest.approx(float(want_gpu.max()), rel=1e-6)
    assert spec.stats["mean"] == pytest.approx(float(want_gpu.double().mean()), rel=1e-6)
    assert (spec.stats["min"], spec.stats["max"]) == (float(got.min()), float(got.max()))
    assert [type(c) for c in made] == [transfer.DeviceChunks]  # the overlapped path ran


@pytest.mark.cuda
@cuda
def test_cuda_stream_with_nan_has_the_statistics_of_its_finite_values(tmp_path):
    net = tanh_mlp((2, 8, 4), dtype=torch.float32)
    x = torch.randn(1000, 2)
    x[500, 0] = float("nan")  # one point's Jacobian is NaN: its chunk takes the slow statistics
    spec = jaccli.Stream(tmp_path / "J.npy", name="jacobian")
    with pytest.warns(jaccli.JaccliWarning):
        got = jaccli.jacobian(net.cuda(), x.cuda(), per_sample=True, chunk_size=100, check_batch=False, save=spec)
    finite = got[torch.isfinite(got)]
    assert spec.stats["all_finite"] is False and torch.isnan(got[500]).all()
    assert spec.stats["min"] == float(finite.min()) and spec.stats["max"] == float(finite.max())
    assert spec.stats["mean"] == pytest.approx(float(finite.double().mean()), rel=1e-9)


@pytest.mark.cuda
@cuda
def test_cuda_stream_without_overlap_writes_the_same_file(tmp_path, monkeypatch):
    net = tanh_mlp((2, 32, 32, 5), dtype=torch.float32).cuda()
    x = torch.randn(5000, 2, device="cuda")
    a = jaccli.hessian(net, x, per_sample=True, chunk_size=600, save=tmp_path / "a.npy")
    monkeypatch.setenv(transfer.OVERLAP_ENV, "0")
    b = jaccli.hessian(net, x, per_sample=True, chunk_size=600, save=tmp_path / "b.npy")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@cuda
def test_cuda_copies_run_on_a_side_stream_while_the_next_chunk_computes():
    """One staging buffer, so that the second piece of chunk 0 is copied only after chunk
    1's "compute" (a long GPU sleep) is queued: it still reaches the host while the sleep
    runs, which a copy queued on the compute stream could not (it would wait its turn)."""
    dev = torch.device("cuda")
    n, size = 4, 2
    pieces, busy = [], []
    main = torch.cuda.current_stream(dev)

    def write(key, row0, host):
        busy.append(not main.query())  # the compute stream still has work queued
        pieces.append(host.clone())

    copier = transfer.DeviceChunks(transfer.CudaStreams(dev), size, (1024,), torch.float32, write,
                                   lambda *a: None, stage_bytes=1024 * 4, stages=1)  # fmt: skip
    assert copier.streams.side != main and copier.piece == 1
    want = torch.arange(n * 1024, dtype=torch.float32, device=dev).reshape(n, 1024)
    for a in range(0, n, size):
        block = copier.rows(size)
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time: the chunk's "compute"
        block.copy_(want[a : a + size])
        copier.submit((a, a + size), size, None)
    copier.flush()
    assert len(copier.slots) == 2
    assert busy[:size] == [True] * size, busy  # chunk 0 was written while chunk 1 computed
    assert torch.equal(torch.cat(pieces).to(dev), want)
    copier.close()


@pytest.mark.cuda
@cuda
def test_cuda_resume_after_sigkill_is_bit_identical(tmp_path):
    import os
    import subprocess
    import sys

    net = tanh_mlp((2, 16, 16, 4), dtype=torch.float32)
    jaccli.save_mlp(net, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3000, 2)).astype(np.float32))
    cmd = [sys.executable, "-m", "jaccli", "jacobian", str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy"),
           "--per-sample", "--device", "cuda", "--chunk-size", "250", "--quiet"]  # fmt: skip
    ref = subprocess.run([*cmd, "--save", str(tmp_path / "ref.npy")], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert ref.returncode == 0, ref.stderr
    env = {**os.environ, st.KILL_HOOK: "5"}
    killed = subprocess.run([*cmd, "--save", str(tmp_path / "J.npy")], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert killed.returncode == -9, killed.stderr
    resumed = subprocess.run([*cmd, "--save", str(tmp_path / "J.npy"), "--resume"], capture_output=True, text=True,
                             timeout=HANG_GUARD_S)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "J.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
