#!/usr/bin/env bash
# What a session with a GPU runs, from the repository root, in about five minutes:
# the CUDA tests (pytest -m cuda), then benchmarks/gpu.py (N = 10 M streamed from the GPU,
# into /dev/shm and into the checkout's file system). Logs and gpu.json go to $OUT
# (default ./gpu-out). jaccli need not be installed: the checkout goes on PYTHONPATH, with
# a stub of its package metadata where none is installed (the resume fingerprint and
# --version read the version from it).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c 'import importlib.metadata as m; m.version("jaccli")' 2>/dev/null; then
    meta=$(mktemp -d)
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
    mkdir -p "$meta/jaccli-$version.dist-info"
    printf 'Metadata-Version: 2.1\nName: jaccli\nVersion: %s\n' "$version" >"$meta/jaccli-$version.dist-info/METADATA"
    export PYTHONPATH="$PYTHONPATH:$meta"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'; df -h . /dev/shm; } 2>&1 | tee "$out/env.log"
timeout 240 "$py" -m pytest -q -m cuda tests/ 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
timeout 330 "$py" benchmarks/gpu.py --dir /dev/shm --dir . --budget 270 --json "$out/gpu.json" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench"
exit $((tests != 0 || bench != 0))
