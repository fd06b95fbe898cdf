"""A streamed result's bytes on the disk (jaccli/io/disk.py): writeback started as rows land,
in groups that cover every byte written, and the flush that waits for all of it."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import jaccli
from jaccli.io import disk
from problems import tanh_mlp


@pytest.fixture()
def started(monkeypatch):
    """The writeback starts asked for, as ``(offset, length)``, instead of the system call."""
    calls: list[tuple[int, int]] = []

    def start(fd, offset, length, flags):
        assert flags == disk._SYNC_FILE_RANGE_WRITE
        calls.append((offset, length))
        return 0

    monkeypatch.setattr(disk, "_start_writeback", start)
    return calls


def _file(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    return fd, disk.DiskFile(fd, str(tmp_path / "f"), lambda: 0)


def test_writeback_starts_every_few_megabytes_and_covers_every_byte_written(tmp_path, monkeypatch, started):
    monkeypatch.setattr(disk, "WRITEBACK_BYTES", 1000)
    fd, f = _file(tmp_path)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    for lo in range(0, 4000, 300):  # adjacent pieces: one start per 1000 bytes or so
        f.write(memoryview(data)[lo : min(lo + 300, 4000)], lo)
    assert started == [(0, 1200), (1200, 1200), (2400, 1200)]
    f.write(memoryview(data)[7000:7100], 7000)  # not adjacent (a resumed run skips done chunks)
    assert started[-1] == (3600, 400)  # the tail before the gap is started on its own
    calls = []
    monkeypatch.setattr(disk.os, "fdatasync", lambda fd: calls.append(list(started)))
    f.sync()
    assert started[-1] == (7000, 100) and calls == [started]  # the rest started before the flush
    covered = sorted(started)
    assert [(a, a + n) for a, n in covered] == [(0, 1200), (1200, 2400), (2400, 3600), (3600, 4000), (7000, 7100)]
    os.close(fd)
    got = (tmp_path / "f").read_bytes()
    assert got[:4000] == data[:4000] and got[7000:7100] == data[7000:7100]


def test_without_the_call_the_bytes_are_written_all_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "_start_writeback", None)
    monkeypatch.setattr(disk, "WRITEBACK_BYTES", 10)
    fd, f = _file(tmp_path)
    f.write(memoryview(b"0123456789abcdef"), 0)
    f.sync()
    os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789abcdef"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_linux_has_the_call_and_it_starts_writeback_of_a_real_file(tmp_path):
    assert disk._start_writeback is not None
    fd, f = _file(tmp_path)
    f.write(memoryview(bytes(range(256)) * 64), 0)
    assert disk._start_writeback(fd, 0, 256 * 64, disk._SYNC_FILE_RANGE_WRITE) == 0
    f.sync()
    os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(range(256)) * 64


def test_a_streamed_result_starts_its_writeback_chunk_by_chunk_and_equals_the_in_memory_one(tmp_path, monkeypatch,
                                                                                             started):  # fmt: skip
    monkeypatch.setattr(disk, "WRITEBACK_BYTES", 40_000)
    net = tanh_mlp((2, 16, 16, 4), dtype=torch.float32)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((3000, 2)).astype(np.float32))
    want = jaccli.jacobian(net, x, per_sample=True, chunk_size=700)
    got = jaccli.jacobian(net, x, per_sample=True, chunk_size=700, save=tmp_path / "J.npy")
    assert torch.equal(got, want)
    header = os.path.getsize(tmp_path / "J.npy") - want.numel() * 4
    ends = [a + n for a, n in started]
    assert started[0][0] == 0 and ends[-1] == header + want.numel() * 4  # the header and every row
    assert all(a == b for (a, _), b in zip(started[1:], ends))  # one run of adjacent ranges
    assert len(started) >= 3  # started while the chunks were computed, not only at the end
