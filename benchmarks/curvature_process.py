"""Whole-process curvature timings: the ``jaccli`` command against a Python script running the
fastest peer library on the same files (issue 20, "Speed", last sentence).

    python benchmarks/curvature.py --process [--task eig|trace|per-sample] [--width W] [--points N] [--repeats R]
                                             [--baseline PATH]

The model (a TorchScript tanh MLP ``20 → W → W → 10``, softmax cross-entropy), its inputs and
labels are saved once to a temporary folder; then each pair runs as fresh processes, in turns
(one warm-up round first), and the figures are medians of wall and CPU (user + system) seconds,
with the ratio jaccli / peer (below 1: jaccli is faster):

* ``eig``: ``jaccli curvature MODEL X --loss cross-entropy --target Y --eig 10`` against
  curvlinops' ``HessianLinearOperator`` with ``scipy.sparse.linalg.eigsh`` (the fastest peer of
  ``--task eig``), both to ``--tol``;
* ``trace``: ``jaccli curvature … --trace --samples S`` against PyHessian's Hutchinson trace
  with ``S`` products (the fastest peer of ``--task trace``);
* ``per-sample``: ``jaccli grads … --per-sample --save G.npy`` against ``torch.func.vmap(grad)``
  saving the same ``.npy`` (the fastest peer of ``--task per-sample``).

A peer that is not installed is skipped with a line. Every process runs with one thread.
Both checkouts are byte-compiled first, as an install leaves them (``timing.compile_checkouts``).
``--baseline PATH`` runs the same jaccli command on another checkout as well (``git archive main
jaccli | tar -x -C PATH``, run as ``python -m jaccli`` with ``PYTHONPATH=PATH``), in the same turns:
before and after a change, against the same peer.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

#: what every peer script starts with: argv = model, inputs, labels, the task's argument, width
PRELUDE = """
import sys, numpy as np, torch
from torch import nn
# the peers need the nn.Module (curvlinops refuses TorchScript): its class, the saved weights
w = int(sys.argv[5])
net = nn.Sequential(nn.Linear(20, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 10))
net.load_state_dict(torch.jit.load(sys.argv[1]).state_dict())
x, y = torch.from_numpy(np.load(sys.argv[2])), torch.from_numpy(np.load(sys.argv[3]))"""

#: the peers' scripts, by task: (the module they need, the code)
PEER_SCRIPTS = {
    "eig": ("curvlinops", PRELUDE + """
from curvlinops import HessianLinearOperator
from scipy.sparse.linalg import eigsh
params = [p for p in net.parameters() if p.requires_grad]
op = HessianLinearOperator(net, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
print(sorted(eigsh(op.to_scipy(), k=10, which="LA", tol=float(sys.argv[4]))[0].tolist(), reverse=True))
"""),
    "trace": ("pyhessian", PRELUDE + """
from pyhessian import hessian
est = hessian(net, nn.CrossEntropyLoss(), data=(x, y), cuda=False).trace(maxIter=int(sys.argv[4]), tol=0.0)
print(sum(est) / len(est))
"""),
    "per-sample": ("torch.func", PRELUDE + """
from torch.func import functional_call, grad, vmap
params = {n: p.detach() for n, p in net.named_parameters()}
loss = lambda p, xi, yi: nn.functional.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])
g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
np.save(sys.argv[4], torch.cat([t.reshape(x.shape[0], -1) for t in g.values()], 1).numpy())
"""),
}


def _files(folder: Path, width: int, points: int) -> tuple[Path, Path, Path]:
    import warnings

    import numpy as np
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                              torch.nn.Tanh(), torch.nn.Linear(width, 10))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(folder / "mlp.pt"))
    rng = np.random.default_rng(0)
    np.save(folder / "x.npy", rng.standard_normal((points, 20)).astype(np.float32))
    np.save(folder / "y.npy", rng.integers(0, 10, points).astype(np.int64))
    return folder / "mlp.pt", folder / "x.npy", folder / "y.npy"


def main(width: int, points: int, repeats: int, tol: float, samples: int, tasks: tuple[str, ...] | None = None,
         baseline: Path | None = None) -> None:
    import importlib.util

    from timing import child_seconds, compile_checkouts

    # both checkouts as an install leaves them (else each jaccli process may compile its modules again)
    compile_checkouts([Path(__file__).resolve().parent.parent, *([baseline] if baseline is not None else [])])
    jaccli = shutil.which("jaccli") or str(Path(sys.executable).with_name("jaccli"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, x, y = _files(folder, width, points)
        common = [str(model), str(x), "--loss", "cross-entropy", "--target", str(y), "-q"]
        jobs = {
            "eig": ([jaccli, "curvature", *common, "--eig", "10", "--tol", str(tol)], [str(tol)]),
            "trace": ([jaccli, "curvature", *common, "--trace", "--samples", str(samples)], [str(samples)]),
            "per-sample": ([jaccli, "grads", *common, "--per-sample", "--save", str(folder / "G.npy"), "--force"],
                           [str(folder / "G_peer.npy")]),
        }  # fmt: skip
        print(f"whole process, TorchScript MLP 20 → {width} → {width} → 10 on {points} points, one thread, "
              f"medians of {repeats} (wall and CPU seconds)")  # fmt: skip
        for task, (mine, extra) in jobs.items():
            if tasks is not None and task not in tasks:
                continue
            peer, code = PEER_SCRIPTS[task]
            if peer != "torch.func" and importlib.util.find_spec(peer) is None:
                print(f"{task}: {peer} is not installed, skipped")
                continue
            script = folder / f"{task}.py"
            script.write_text(code)
            theirs = [sys.executable, str(script), str(model), str(x), str(y), *extra, str(width)]
            runs = [("jaccli", mine, env), (peer, theirs, env)]
            if baseline is not None:  # the same command on another checkout, from a folder that does not hold this one
                runs.insert(1, ("baseline", [sys.executable, "-m", "jaccli", *mine[1:]],
                                {**env, "PYTHONPATH": str(baseline.resolve())}))  # fmt: skip
            times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in runs}
            for r in range(repeats + 1):  # round 0 warms the file cache
                for name, cmd, e in runs:
                    got = child_seconds(cmd, e, cwd=folder)
                    if r:
                        times[name].append(got)
            med = {n: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for n, ts in times.items()}
            (jw, jc), (pw, pc) = med["jaccli"], med[peer]
            print(f"{task:10s} jaccli {jw:6.2f} s wall {jc:6.2f} s CPU | {peer} script {pw:6.2f} s wall {pc:6.2f} s CPU"
                  f" | ratio jaccli/peer {jw / pw:.2f} wall, {jc / pc:.2f} CPU")  # fmt: skip
            if baseline is not None:
                bw, bc = med["baseline"]
                print(f"{'':10s} baseline {bw:6.2f} s wall {bc:6.2f} s CPU | ratio baseline/peer {bw / pw:.2f} wall, "
                      f"{bc / pc:.2f} CPU | jaccli/baseline {jw / bw:.2f} wall, {jc / bc:.2f} CPU")  # fmt: skip
