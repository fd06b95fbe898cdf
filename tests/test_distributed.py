"""``torchrun --nproc-per-node 2 -m jaccli …``: two CPU processes (gloo) share a streamed
result and write into one file; a failing rank fails them all and leaves nothing; a rank
killed leaves a partial run that one process resumes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import jaccli
from jaccli.io import stream as st
from problems import HANG_GUARD_S, tanh_mlp


pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def _torchrun(d, *args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "jaccli", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=d, env=env)


@pytest.fixture()
def case(tmp_path):
    net = tanh_mlp((2, 16, 16, 4), dtype=torch.float32)
    jaccli.save_mlp(net, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3001, 2)).astype(np.float32))
    return tmp_path


def test_two_ranks_write_the_single_process_file_and_rank_0_alone_prints(case):
    d = case
    args = ["m.safetensors", "x.npy", "-p", "--chunk-size", "250"]
    one = jaccli.jacobian(jaccli.load_model(d / "m.safetensors"), jaccli.load_tensor(d / "x.npy"), per_sample=True,
                          chunk_size=250)  # fmt: skip
    np.save(d / "ref.npy", one.numpy())
    two = _torchrun(d, "jacobian", *args, "--save", "J.npy", "--json")
    assert two.returncode == 0, two.stderr
    (doc,) = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]  # one object
    assert doc["plan"]["world_size"] == 2 and doc["streamed"]
    assert (d / "J.npy").read_bytes() == (d / "ref.npy").read_bytes()
    assert sorted(p.name for p in d.iterdir()) == ["J.npy", "m.safetensors", "ref.npy", "x.npy"]


def test_a_failing_rank_fails_every_rank_with_its_message_and_leaves_nothing(case):
    d = case
    r = _torchrun(d, "jacobian", "m.safetensors", "x.npy", "-p", "--chunk-size", "250", "--save", "J.npy",
                  env={st.FAIL_HOOK: "1:2"})  # fmt: skip
    assert r.returncode != 0
    assert "rank 1: " in r.stderr and "injected test failure" in r.stderr, r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["m.safetensors", "x.npy"]


def test_torchrun_refuses_a_request_that_does_not_stream(case):
    from typer.testing import CliRunner

    from jaccli.cli.main import app

    # refused before joining the process group, so one process with torchrun's variables shows it
    r = CliRunner(env={"WORLD_SIZE": "2", "RANK": "0"}).invoke(
        app, ["jacobian", str(case / "m.safetensors"), str(case / "x.npy"), "-p", "--save", str(case / "J.npz")]
    )
    assert r.exit_code == 2 and "under torchrun (2 processes)" in r.stderr


def test_one_rank_killed_leaves_a_partial_run_that_resumes_bit_identical(case):
    """Rank 1 is SIGKILLed after two chunks; rank 0 loses its peer (or is stopped by torchrun)
    and keeps the partial run rather than removing it; one process resumes it."""
    d = case
    args = ["m.safetensors", "x.npy", "-p", "--chunk-size", "250"]
    killed = _torchrun(d, "jacobian", *args, "--save", "J.safetensors", env={st.KILL_HOOK: "1:2"})
    assert killed.returncode != 0 and not (d / "J.safetensors").exists()
    # rank 0 says why in one line (torchrun adds its own report of the killed rank after it)
    assert re.search(r"lost contact with the other ranks|interrupted \(SIGTERM\)", killed.stderr), killed.stderr
    left = sorted(p.name for p in d.iterdir() if p.name.startswith(".J"))
    assert ".J.safetensors.jaccli-partial" in left and ".J.safetensors.jaccli-partial.done1.json" in left, left
    assert not [n for n in left if n.endswith(".tmp")], left
    resumed = subprocess.run([sys.executable, "-m", "jaccli", "jacobian", *args, "--save", "J.safetensors", "--resume",
                              "--json"], capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=d)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_points"] >= 2 * 250  # rank 1's two chunks at least
    from safetensors.numpy import load_file

    (got,) = load_file(d / "J.safetensors").values()
    np.testing.assert_array_equal(got, jaccli.jacobian(
        jaccli.load_model(d / "m.safetensors"), jaccli.load_tensor(d / "x.npy"), per_sample=True, chunk_size=250).numpy())
    assert sorted(p.name for p in d.iterdir()) == ["J.safetensors", "m.safetensors", "x.npy"]
