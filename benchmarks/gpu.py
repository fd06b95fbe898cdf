"""Streaming a per-sample result from a GPU to a file: with and without the copy overlap.

    python benchmarks/gpu.py [--points 10000000] [--dir DIR ...] [--chunk-size 1000000] [--json FILE]

The seed PINN (``examples/models/pinn.pt``, 1→50→50→50→501 tanh, float32) at N points
x ∈ [0, 1], per-sample Jacobian and Hessian (501 values, 2 kB, per point: 20 GB each at
N = 10 M), on ``cuda``:

* ``in GPU memory``: the whole result computed into device memory, nothing written
  (what the derivative alone costs);
* ``stream, overlap``: ``save=DIR/r.npy`` as jaccli streams it by default on CUDA, each
  chunk copied on a side stream through pinned buffers and written while the next chunk
  computes (``jaccli/io/transfer.py``);
* ``stream, sync``: the same with ``JACCLI_STREAM_OVERLAP=0``: each chunk copied with
  ``.cpu()`` and written before the next is computed (jaccli before the overlap).

Chunks are 1 M points (2 GB of result) unless ``--chunk-size`` says otherwise (0: the
planner's, which on a large GPU puts millions of points in a chunk, leaving few chunks or
one, and so little to overlap). For each run: seconds (the whole public call: plan, trace, chunks, flush to disk with
``fdatasync``, rename), points/s, the file's GB/s, the peak of
``torch.cuda.max_memory_allocated`` and the rise of the process's peak resident memory. The
streamed file's first and last rows are compared with the in-memory result (``identical``).
A streamed run writes as fast as DIR's file system takes the data, so ``--dir /dev/shm``
(memory) separates the pipeline from the disk; a DIR without room for the result is
skipped. Runs stop before ``--budget`` seconds would be exceeded (estimated from the run
before), so that one invocation fits a ten-minute slot.

Without a CUDA device it says so and exits 0; ``--smoke`` then runs a tiny N on the CPU
through the same code, to check the script itself.

``--table [PEERS.PY OPTIONS]``: instead, issue 23's jobs and table (``benchmarks/peers.py``:
jaccli against JAX jit, folx and ``torch.func``, in-process and as a whole process, each
result checked against float64) with every candidate on ``cuda`` — the same jobs and the same
table as on the CPU. JAX and folx count only where jaxlib has a CUDA backend (otherwise they
are skipped with a line saying so). Without CUDA it says so and exits 0; with ``--smoke`` it
runs the table at a tiny N on the CPU, to check the script::

    python benchmarks/gpu.py --table --repeats 5 --process-repeats 3 --markdown gpu-peers.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaccli  # noqa: E402
from timing import status_kib as _status_kib  # noqa: E402
from jaccli.io import transfer  # noqa: E402

MODEL = ROOT / "examples/models/pinn.pt"


def _reset_peaks(device: torch.device) -> int:
    """Reset the GPU's and the process's peak memory; the resident bytes now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peaks(device: torch.device, rss0: int) -> tuple[int | None, int]:
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    try:
        rss = _status_kib("VmHWM") * 1024
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return gpu, rss - rss0


def _fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                mount = parts[1]
                if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(kind: str, model, x: torch.Tensor, device: torch.device, *, chunk_size, save=None, overlap=True):
    """Seconds, peak GPU bytes, peak RSS rise, and the result (a tensor; file-backed when saved)."""
    os.environ[transfer.OVERLAP_ENV] = "1" if overlap else "0"
    rss0 = _reset_peaks(device)
    t0 = time.perf_counter()
    out = getattr(jaccli, kind)(model, x, per_sample=True, chunk_size=chunk_size, save=save)
    _sync(device)
    seconds = time.perf_counter() - t0
    gpu, rss = _peaks(device, rss0)
    return seconds, gpu, rss, out


def peers(argv: list[str]) -> int:
    """Issue 23's table (benchmarks/peers.py) on CUDA; without one: a message, or with --smoke the CPU at tiny N."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers as table

    smoke = "--smoke" in argv
    argv = [a for a in argv if a != "--smoke"]
    if torch.cuda.is_available():
        return table.main([*argv, "--device", "cuda"])
    if not smoke:
        print("no CUDA device: --table measures issue 23's jobs on a GPU; nothing to do "
              "(--smoke runs the table at a tiny N on the CPU to check the script)")  # fmt: skip
        return 0
    return table.main(["--quick", "--points", "64", "--repeats", "1", "--process-repeats", "1", *argv, "--device", "cpu"])


def main() -> None:
    if "--table" in sys.argv[1:]:
        sys.exit(peers([a for a in sys.argv[1:] if a != "--table"]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10_000_000)
    parser.add_argument("--dir", action="append", type=Path, help="where the streamed files go (repeatable; default: .)")
    parser.add_argument("--chunk-size", type=int, default=1_000_000, help="points per chunk (0: the planner's)")
    parser.add_argument("--kinds", default="jacobian,hessian")
    parser.add_argument("--budget", type=float, default=500.0, help="seconds for all runs together")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--smoke", action="store_true", help="without CUDA: a tiny N on the CPU")
    args = parser.parse_args()
    args.chunk_size = args.chunk_size or None
    start = time.perf_counter()

    if torch.cuda.is_available():
        device = torch.device("cuda")
        gpu_name = torch.cuda.get_device_name(device)
    elif args.smoke:
        device, gpu_name = torch.device("cpu"), "none (CPU smoke run)"
        args.points = min(args.points, 20_000)
        args.chunk_size = args.chunk_size and min(args.chunk_size, 2_000)
    else:
        print("no CUDA device: this benchmark measures streaming from a GPU; nothing to do "
              "(--smoke runs a tiny N on the CPU to check the script)")  # fmt: skip
        return

    dirs = args.dir or [Path(".")]
    kinds = [k for k in args.kinds.split(",") if k]
    n = args.points
    model = jaccli.load_model(MODEL, device=device)
    x = torch.linspace(0.0, 1.0, n, dtype=torch.float32, device=device)[:, None]
    print(f"device {gpu_name}; torch {torch.__version__} (CUDA {torch.version.cuda}); {platform.node()}")
    print(f"seed PINN 1→50→50→50→501 tanh, float32, N = {n:,}")
    # warm-up: CUDA context, kernels, cuBLAS handles, pinned allocator (not timed)
    for kind in kinds:
        with tempfile.TemporaryDirectory(dir=dirs[0]) as tmp:
            measure(kind, model, x[: min(n, 100_000)], device, chunk_size=None, save=Path(tmp) / "w.npy")

    rows: list[dict] = []
    head = f"{'dir':<12} {'kind':<9} {'run':<16} {'seconds':>8} {'points/s':>12} {'GB/s':>6} {'GPU peak':>9} {'RSS rise':>9}  identical"
    print(head)
    print("-" * len(head))

    def report(row: dict) -> None:
        rows.append(row)
        gb = row["result_bytes"] / row["seconds"] / 1e9 if row.get("streamed") else None
        gpu = f"{row['gpu_peak_bytes'] / 1e9:.2f} GB" if row["gpu_peak_bytes"] is not None else "-"
        print(f"{row['dir']:<12} {row['kind']:<9} {row['run']:<16} {row['seconds']:>8.2f} {n / row['seconds']:>12,.0f} "
              f"{(f'{gb:.2f}' if gb else '-'):>6} {gpu:>9} {row['rss_rise_bytes'] / 1e9:>6.2f} GB  "
              f"{row.get('identical', '')}", flush=True)  # fmt: skip

    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        label = f"{d}" if len(str(d)) <= 12 else "…" + str(d)[-11:]
        last_stream = None
        for i, kind in enumerate(kinds):
            plan = jaccli.plan(kind, model, x, per_sample=True, chunk_size=args.chunk_size)
            result_bytes = plan.result_bytes
            chunks = -(-n // plan.points_per_chunk)
            print(f"[{kind}: {plan.engine}, {plan.points_per_chunk:,} points per chunk, {chunks} chunks, "
                  f"result {result_bytes / 1e9:.1f} GB; {d} is {_fs_type(d)}]", flush=True)  # fmt: skip
            seconds, gpu, rss, ref = measure(kind, model, x, device, chunk_size=args.chunk_size)
            k = min(n, 1000)
            ref_rows = (ref[:k].cpu().clone(), ref[-k:].cpu().clone())
            del ref
            report({"dir": label, "kind": kind, "run": "in GPU memory", "seconds": seconds, "gpu_peak_bytes": gpu,
                    "rss_rise_bytes": rss, "result_bytes": result_bytes, "streamed": False})  # fmt: skip
            free = shutil.disk_usage(d).free
            if free < 1.05 * result_bytes:
                print(f"  skipped streaming into {d}: {free / 1e9:.1f} GB free, the result needs {result_bytes / 1e9:.1f} GB")
                continue
            # alternate which goes first, so that neither always meets a cold or warm page cache
            order = [True, False] if i % 2 == 0 else [False, True]
            for overlap in order:
                elapsed = time.perf_counter() - start
                if last_stream is not None and elapsed + last_stream > args.budget:
                    print(f"  skipped {kind} {'overlap' if overlap else 'sync'}: would exceed --budget {args.budget:.0f} s")
                    continue
                with tempfile.TemporaryDirectory(dir=d) as tmp:
                    target = Path(tmp) / "r.npy"
                    seconds, gpu, rss, got = measure(kind, model, x, device, chunk_size=args.chunk_size,
                                                     save=target, overlap=overlap)  # fmt: skip
                    same = torch.equal(got[:k], ref_rows[0]) and torch.equal(got[-k:], ref_rows[1])
                    del got
                    target.unlink()
                os.sync()  # the next run starts with no writeback of this one pending
                last_stream = seconds
                report({"dir": label, "kind": kind, "run": "stream, overlap" if overlap else "stream, sync",
                        "seconds": seconds, "gpu_peak_bytes": gpu, "rss_rise_bytes": rss,
                        "result_bytes": result_bytes, "streamed": True, "identical": same})  # fmt: skip
    os.environ.pop(transfer.OVERLAP_ENV, None)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        doc = {"device": gpu_name, "torch": torch.__version__, "points": n, "chunk_size": args.chunk_size, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
