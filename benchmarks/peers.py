"""Issue 23's peer table in ONE benchmark: jaccli against JAX jit, folx and torch.func on every job.

    python benchmarks/peers.py [--jobs J,J] [--peers P,P] [--quick] [--points N] [--repeats R] [--rounds K]
                               [--process-repeats P] [--threads T] [--tol TOL]

The jobs (float32, CPU):

* ``laplacian-mlp``: Laplacian of a 100→256³→1 tanh MLP, N = 2 000 — folx ``forward_laplacian``,
  JAX ``jit(vmap(trace(hessian)))``, ``torch.func`` ``trace(vmap(hessian))``;
* ``laplacian-pinn``: Laplacian of a 2→50³→1 tanh PINN, N = 100 000 — the same peers;
* ``u_xxxx``: ∂⁴u/∂x⁴ of a 1→50³→1 tanh PINN, N = 100 000 — JAX ``jit(vmap(jacfwd⁴))`` and
  ``jax.experimental.jet``, ``torch.func`` ``vmap(jacfwd⁴)``;
* ``hessian``: per-sample Hessian of a 2→50³→1 tanh PINN, N = 100 000 — JAX ``jit(vmap(hessian))``,
  ``torch.func`` ``vmap(hessian)``;
* ``pinn-jacobian`` / ``pinn-hessian``: per-sample Jacobian / Hessian of the seed PINN's shape
  1→50³→501 tanh, N = 100 000 — JAX ``jit(vmap(jacfwd))`` / ``jit(vmap(jacfwd(jacfwd)))``,
  ``torch.func`` the same; also printed as a multiple of jaccli's own forward pass.

Every job's weights (fixed seeds, jaccli's own MLP builder) and inputs are made once and
saved to a temporary directory: ``model.pt`` (TorchScript, what jaccli reads), ``weights.npz``
(``w0, b0, w1, …`` for the JAX, folx and torch.func peers) and ``x.npy``.

Two measures per job:

* **in-process**: each candidate in a process of its own (``--run JOB NAME DIR``, so that no
  library's thread pool or heap reaches another's timing), one warm-up (JAX and folx compile
  there), the median of ``--repeats`` timed calls; the candidates take turns over ``--rounds``
  rounds, a fresh process each, and the median of the rounds is the figure (this VM's speed
  drifts by up to half over minutes: one process per candidate in a row compared a fast minute
  with a slow one). jaccli is called through its Python API
  (``jaccli.load_model`` + ``jaccli.laplacian`` …) as a user would, without the allocator
  settings its command applies.
* **whole process**: ``jaccli <command> model.pt x.npy -p --save out.npy`` against
  ``python peer_script.py DIR out.npy`` (each peer's script is written to the temp directory and
  runs the very code its in-process figure timed, compile included), each a fresh process,
  taking turns (the order alternates every round), the medians of ``--process-repeats``.

Every result — each in-process one and each whole-process ``out.npy`` — is compared with a
float64 reference (``torch.func`` in float64, in its own process): a candidate whose max
difference relative to the reference's largest magnitude exceeds ``--tol`` gets no figure.
Peers that are not installed (``pip install 'jaccli[bench]'`` brings JAX and folx) are skipped
with a line saying so. Ratios are jaccli's time over the fastest agreeing peer's; issue 23's
targets are ≤ 0.8 in-process and ≤ 1.0 as a whole process.

``--readme`` rewrites the README's performance table (between :data:`README_MARKS`) from the run,
with the date, the machine and the command; ``--markdown FILE`` writes the same table to a file.
``--device cuda`` puts every candidate on a GPU (``benchmarks/gpu.py --table`` does so when CUDA is
present); JAX and folx then count only on a jaxlib with a CUDA backend.

``--threads`` sets ``OMP_NUM_THREADS`` / XLA's thread count of every child (1 on a shared machine).
Figures and the targets met and not met: docs/performance.md, "Against every peer (issue 23)".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

IN_PROCESS_TARGET, PROCESS_TARGET = 0.8, 1.0

# ------------------------------------------------------------------ the candidates' code

#: the start of every candidate's script: ``make(D, dtype)`` (below it) returns a thunk whose
#: call is what gets timed; ``as_numpy`` turns its value into the array that is checked
PRELUDE = '''
import sys
from pathlib import Path
import numpy as np


def as_numpy(v):
    v = getattr(v, "value", v)
    if hasattr(v, "detach"):
        v = v.detach().cpu()
    return np.asarray(v)


def synced(thunk, device):
    """On CUDA a call returns once the kernels have run (what a timing must include)."""
    if not str(device).startswith("cuda"):
        return thunk

    def run():
        import torch

        out = thunk()
        torch.cuda.synchronize()
        return out

    return run
'''

TORCH_NET = '''
def torch_net(D, dtype):
    import torch
    w = np.load(D / "weights.npz")
    n = len(w.files) // 2
    layers = []
    for i in range(n):
        W, b = torch.from_numpy(w[f"w{i}"]).to(dtype), torch.from_numpy(w[f"b{i}"]).to(dtype)
        lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        layers += [lin, torch.nn.Tanh()] if i < n - 1 else [lin]
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)
'''

TORCH = TORCH_NET + '''
def make(D, dtype, device="cpu"):
    import torch
    from torch.func import hessian, jacfwd, vmap
    dt = getattr(torch, dtype)
    net = torch_net(D, dt).to(device)
    x = torch.from_numpy(np.load(D / "x.npy")).to(device, dt)
    return synced({expr}, device)
'''

JAX = '''
def make(D, dtype, device="cpu"):
    import jax
    jax.config.update("jax_enable_x64", dtype == "float64")
    import jax.numpy as jnp
    sys.path.insert(0, str(D))
    from jax_twins import jax_mlp
    w = np.load(D / "weights.npz")
    n = len(w.files) // 2
    g = jax_mlp([(w[f"w{i}"].astype(dtype), w[f"b{i}"].astype(dtype)) for i in range(n)])
    x = jnp.asarray(np.load(D / "x.npy").astype(dtype))
    {imports}
    fn = jax.jit({expr})
    return lambda: fn(x).block_until_ready()
'''

JACCLI = '''
def make(D, dtype, device="cpu"):
    import torch
    import jaccli
    model = jaccli.load_model(D / "model.pt", device=device)
    x = torch.from_numpy(np.load(D / "x.npy")).to(device)
    return synced({expr}, device)
'''

SAVE = '''
if __name__ == "__main__":
    np.save(sys.argv[2], as_numpy(make(Path(sys.argv[1]), "float32", sys.argv[3] if len(sys.argv) > 3 else "cpu")()))
'''

SCALAR = "lambda v: g(v)[0]"  # one point's scalar output (the JAX twin maps [in] -> [1])
LAP_JAX = f"jax.vmap(lambda p: jnp.trace(jax.hessian({SCALAR})(p)))"
FWD4_JAX = f"jax.vmap(lambda p: jax.jacfwd(jax.jacfwd(jax.jacfwd(jax.jacfwd({SCALAR}))))(p)[0, 0, 0, 0])"
ONE = "lambda p: net(p[None])[0]"  # one point through the torch net


def torch_peer(expr: str) -> tuple[str, str]:
    return "torch", TORCH.replace("{expr}", expr)


def jax_peer(expr: str, imports: str = "", needs: str = "jax") -> tuple[str, str]:
    return needs, JAX.replace("{expr}", expr).replace("{imports}", imports)


def jaccli_cand(expr: str) -> str:
    return JACCLI.replace("{expr}", expr)


@dataclass
class Job:
    title: str
    sizes: tuple[int, ...]
    points: int
    quick_points: int
    command: list[str]  # the jaccli command's arguments after MODEL INPUT (-p --save out.npy added)
    jaccli: str  # the in-process jaccli candidate's source
    peers: dict[str, tuple[str, str]]  # name -> (module it needs, source)
    reference: str = "torch.func"  # the peer whose float64 run is the reference
    forward: bool = False  # also time jaccli's forward pass (ratios to it)
    out: str = "out.npy"


def laplacian_peers() -> dict[str, tuple[str, str]]:
    """The Laplacian's peers: folx's forward Laplacian, JAX jit ``trace(hessian)``, torch.func."""
    return {
        "folx": jax_peer(f"jax.vmap(lambda p: forward_laplacian({SCALAR})(p).laplacian)",
                         "from folx import forward_laplacian", needs="folx"),
        "JAX jit trace(hessian)": jax_peer(LAP_JAX),
        "torch.func": torch_peer("lambda: vmap(hessian(lambda p: net(p[None])[0, 0]))(x).diagonal(dim1=-2, dim2=-1).sum(-1)"),
    }  # fmt: skip


JOBS: dict[str, Job] = {
    "laplacian-mlp": Job(
        "Laplacian, MLP 100→256³→1 tanh", (100, 256, 256, 256, 1), 2_000, 200, ["laplacian"],
        jaccli_cand("lambda: jaccli.laplacian(model, x, per_sample=True)"), laplacian_peers()),
    "laplacian-pinn": Job(
        "Laplacian, PINN 2→50³→1 tanh", (2, 50, 50, 50, 1), 100_000, 2_000, ["laplacian"],
        jaccli_cand("lambda: jaccli.laplacian(model, x, per_sample=True)"), laplacian_peers()),
    "u_xxxx": Job(
        "u_xxxx, PINN 1→50³→1 tanh", (1, 50, 50, 50, 1), 100_000, 2_000,
        ["partials", "--in", "x", "--want", "u_xxxx"],
        jaccli_cand('lambda: jaccli.partials(model, x, ["u_xxxx"], inputs=["x"], outputs=["u"], per_sample=True)["u_xxxx"]'),
        {
            "JAX jit jacfwd^4": jax_peer(FWD4_JAX),
            # jet's series holds derivatives along the direction: its 4th output term is u_xxxx
            "JAX jet": jax_peer("lambda p: jet(g, (p,), ((jnp.ones_like(p),) + (jnp.zeros_like(p),) * 3,))[1][3]",
                                "from jax.experimental.jet import jet"),
            "torch.func": torch_peer("lambda: vmap(jacfwd(jacfwd(jacfwd(jacfwd(lambda p: net(p[None])[0, 0])))))(x)"),
        }, out="out.npz"),  # fmt: skip
    "hessian": Job(
        "per-sample Hessian, PINN 2→50³→1 tanh", (2, 50, 50, 50, 1), 100_000, 2_000, ["hessian"],
        jaccli_cand("lambda: jaccli.hessian(model, x, per_sample=True)"),
        {
            "JAX jit vmap(hessian)": jax_peer("jax.vmap(jax.hessian(g))"),
            "torch.func": torch_peer(f"lambda: vmap(hessian({ONE}))(x)"),
        }),  # fmt: skip
    "pinn-jacobian": Job(
        "per-sample Jacobian, seed PINN 1→50³→501 tanh", (1, 50, 50, 50, 501), 100_000, 2_000, ["jacobian"],
        jaccli_cand("lambda: jaccli.jacobian(model, x, per_sample=True)"),
        {
            "JAX jit vmap(jacfwd)": jax_peer("jax.vmap(jax.jacfwd(g))"),
            "torch.func": torch_peer(f"lambda: vmap(jacfwd({ONE}))(x)"),
        }, forward=True),  # fmt: skip
    "pinn-hessian": Job(
        "per-sample Hessian, seed PINN 1→50³→501 tanh", (1, 50, 50, 50, 501), 100_000, 2_000, ["hessian"],
        jaccli_cand("lambda: jaccli.hessian(model, x, per_sample=True)"),
        {
            # forward over forward: with one input the cheapest Hessian (jax.hessian is forward over reverse)
            "JAX jit vmap(jacfwd(jacfwd))": jax_peer("jax.vmap(jax.jacfwd(jax.jacfwd(g)))"),
            "torch.func": torch_peer(f"lambda: vmap(jacfwd(jacfwd({ONE})))(x)"),
        }, forward=True),  # fmt: skip
}

FORWARD = jaccli_cand("forward_thunk(model, x)") + '''

def forward_thunk(model, x):
    import torch

    def run():
        with torch.no_grad():
            return model(x)

    return run
'''


#: jaccli with fused Taylor kernels forced on (``compile="on"``): compiled in the warm-up call,
#: as JAX jit is, so the timed calls are the compiled program's (whole process: ``auto``)
COMPILED = "jaccli (compiled)"


def source(job: Job, name: str) -> str:
    if name == "jaccli":
        return PRELUDE + job.jaccli
    if name == COMPILED:
        return PRELUDE + job.jaccli.replace("per_sample=True)", 'per_sample=True, compile="on")')
    if name == "forward":
        return PRELUDE + FORWARD
    return PRELUDE + job.peers[name][1]


def needs(job: Job, name: str) -> str:
    return "jaccli" if name in ("jaccli", "forward", COMPILED) else job.peers[name][0]


# ------------------------------------------------------------------ files


def build(job: Job, points: int, d: Path) -> None:
    """The job's model (TorchScript), its weights (npz) and inputs, from fixed seeds."""
    import torch

    sys.path.insert(0, str(ROOT))
    from jaccli.load.weights import build_mlp

    torch.manual_seed(sum(job.sizes))
    net = build_mlp(list(job.sizes), "tanh").eval().requires_grad_(False)
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, the format the jobs were measured in
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(d / "model.pt"))
    lins = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    np.savez(d / "weights.npz", **{f"{k}{i}": getattr(m, a).detach().numpy()
                                   for i, m in enumerate(lins) for k, a in (("w", "weight"), ("b", "bias"))})  # fmt: skip
    g = torch.Generator().manual_seed(0)
    n_in = job.sizes[0]
    # one input: an even grid of [0, 1] (the PINN's domain); several: standard normal points
    x = torch.linspace(0, 1, points)[:, None] if n_in == 1 else torch.randn(points, n_in, generator=g)
    np.save(d / "x.npy", x.numpy())
    shutil.copy(HERE / "jax_twins.py", d / "jax_twins.py")
    for name in ["jaccli", *job.peers]:
        if name != "jaccli":
            (d / f"peer_{slug(name)}.py").write_text(source(job, name) + SAVE)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def load_result(path: Path) -> np.ndarray:
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z[z.files[0]]
    return np.load(path)


# ------------------------------------------------------------------ children


def child_env(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                            " intra_op_parallelism_threads=1").strip()  # fmt: skip
    return env


def pinned(threads: int):
    """A ``preexec_fn`` that keeps a child on ``threads`` CPUs (None where it has no more).

    Why: XLA's CPU runtime runs independent ops of one program on a pool of its own,
    whatever ``intra_op_parallelism_threads`` says: with ``--threads 1`` folx's Laplacian
    of the MLP kept two threads busy (0.50 s and 0.45 s of CPU in one call, measured
    per thread from ``/proc``, 2026-12-06), so on an idle 2-core machine it had twice
    the CPU of a one-thread jaccli (0.48 s against 0.78 s). Pinning every candidate to
    the same ``threads`` CPUs makes ``--threads`` hold for all of them.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if threads >= len(cpus):
        return None
    keep = set(cpus[:threads])
    return lambda: os.sched_setaffinity(0, keep)


def run_one(job_name: str, name: str, d: str, a) -> None:
    """The child: one candidate, warmed up once, then timed; its result saved next to the files."""
    job = JOBS[job_name]
    mod = needs(job, name)
    if mod != "jaccli" and importlib.util.find_spec(mod) is None:
        print(json.dumps({"skipped": f"{mod} is not installed"}))
        return
    if mod in ("jax", "folx") and a.device != "cpu":
        import jax

        if jax.default_backend() == "cpu":  # a CPU-only jaxlib: its figure would not be a GPU's
            print(json.dumps({"skipped": f"JAX has no {a.device} backend here (jaxlib for CPU only)"}))
            return
    if mod in ("torch", "jaccli"):
        import torch

        torch.set_num_threads(a.threads)
    scope: dict = {"__name__": "candidate"}
    exec(compile(source(job, name), f"<{job_name}: {name}>", "exec"), scope)
    thunk = scope["make"](Path(d), a.dtype, a.device)
    value = scope["as_numpy"](thunk())
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        thunk()
        times.append(time.perf_counter() - t0)
    tag = "ref" if a.dtype == "float64" else slug(name)
    np.save(Path(d) / f"in_{tag}.npy", value)
    print(json.dumps({"seconds": statistics.median(times) if times else None, "result": str(Path(d) / f"in_{tag}.npy")}))


def child(job_name: str, name: str, d: Path, a, reference: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--run", job_name, name, str(d), "--repeats", str(0 if reference else a.repeats),
           "--threads", str(a.threads), "--dtype", "float64" if reference else "float32", "--device", a.device]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(a.threads), preexec_fn=pinned(a.threads))
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"failed": (r.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def disagreement(got: np.ndarray, ref: np.ndarray) -> float:
    """Max |got - ref| over the reference's largest magnitude (inf when the shapes differ)."""
    n = ref.shape[0]
    if got.size != ref.size:
        return float("inf")
    got, ref = got.reshape(n, -1).astype(np.float64), ref.reshape(n, -1)
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-300))


def whole_process(job: Job, names: list[str], d: Path, a) -> dict[str, tuple[float, float]]:
    """Fresh processes taking turns: {name: (median wall seconds, disagreement of its saved result)}."""
    cmds = {}
    for name in names:
        out = d / (f"proc_{slug(name)}" + (Path(job.out).suffix if name == "jaccli" else ".npy"))
        if name == "jaccli":
            exe = shutil.which("jaccli") or str(Path(sys.executable).parent / "jaccli")
            cmds[name] = ([exe, job.command[0], str(d / "model.pt"), str(d / "x.npy"), "-p", *job.command[1:],
                           "--save", str(out), "--force", "-q", "--device", a.device], out)  # fmt: skip
        else:
            cmds[name] = ([sys.executable, str(d / f"peer_{slug(name)}.py"), str(d), str(out), a.device], out)
    times: dict[str, list[float]] = {n: [] for n in names}
    env = child_env(a.threads)
    for r in range(a.process_repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate who goes first
            cmd, out = cmds[name]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=pinned(a.threads))
            times[name].append(time.perf_counter() - t0)
            if p.returncode != 0:
                print(f"    {name}: the process failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
                times[name] = []
                break
    ref = np.load(d / "in_ref.npy")
    res = {}
    for name in names:
        if times[name]:
            err = disagreement(load_result(cmds[name][1]), ref)
            if a.perturb == name:
                err = disagreement(load_result(cmds[name][1]) * 1.01, ref)
            res[name] = (statistics.median(times[name]), err)
    return res


# ------------------------------------------------------------------ the table


def run_job(job_name: str, a, tmp: Path) -> dict:
    job = JOBS[job_name]
    points = a.points or (job.quick_points if a.quick else job.points)
    d = tmp / job_name
    d.mkdir()
    build(job, points, d)
    print(f"\n[{job.title}, N = {points:,}, float32, {a.threads} thread(s)]", flush=True)
    row = {"job": job_name, "title": job.title, "points": points}
    ref = child(job_name, job.reference, d, a, reference=True)
    if "failed" in ref or "skipped" in ref:
        print(f"  the float64 reference ({job.reference}) failed: {ref.get('failed') or ref.get('skipped')}; no figures")
        return row
    want = np.load(ref["result"])
    ours = ("jaccli", COMPILED, "forward")
    names = ["jaccli", *([COMPILED] if a.compiled else []), *(["forward"] if job.forward else []), *job.peers]
    peers = [n for n in names if n not in ours and n in a.peer_filter(n)]
    # The candidates take turns over --rounds rounds, each a fresh process: the machine's speed
    # drifts by up to half over minutes (a shared VM), so one run per candidate in a row
    # compared a fast minute with a slow one; the median of the rounds is each one's figure.
    said: dict[str, str] = {}  # name -> the line that drops it (left out, skipped, disagrees)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, float] = {}
    for name in names:
        if name not in ours and name not in peers:
            said[name] = f"  {name:<30} left out by --peers"
    for _ in range(a.rounds):
        for name in names:
            if name in said:
                continue
            r = child(job_name, name, d, a)
            if "skipped" in r or "failed" in r:
                said[name] = f"  {name:<30} skipped: {r.get('skipped') or 'failed: ' + r['failed']}"
                continue
            if name != "forward" and name not in errors:
                got = np.load(r["result"]) * (1.01 if a.perturb == name else 1.0)
                errors[name] = disagreement(got, want)
                if errors[name] > a.tol:
                    said[name] = (f"  {name:<30} DISAGREES with float64 (max rel. difference {errors[name]:.1e} > "
                                  f"{a.tol:g}): no figure")  # fmt: skip
                    continue
            seconds[name].append(r["seconds"])
    inproc: dict[str, float] = {}
    for name in names:
        if name in said:
            print(said[name])
            continue
        inproc[name] = statistics.median(seconds[name])
        if name == "forward":
            print(f"  {'jaccli forward pass':<30} {inproc[name]:9.4f} s")
        else:
            print(f"  {name:<30} {inproc[name]:9.4f} s   max rel. difference to float64 {errors[name]:.1e}", flush=True)
    row["in_process"] = inproc
    agreeing = [n for n in peers if n in inproc]
    if "jaccli" in inproc and agreeing:
        best = min(agreeing, key=inproc.get)
        row["peer"], row["ratio"] = best, inproc["jaccli"] / inproc[best]
    if COMPILED in inproc and "jaccli" in inproc:
        row["compiled_over_eager"] = inproc[COMPILED] / inproc["jaccli"]
        best = f", {inproc[COMPILED] / inproc[row['peer']]:.2f} of {row['peer']}" if "peer" in row else ""
        print(f"  {COMPILED} / jaccli: {row['compiled_over_eager']:.2f}{best}")
    if "forward" in inproc and "jaccli" in inproc:
        row["over_forward"] = inproc["jaccli"] / inproc["forward"]
        print(f"  jaccli / its forward pass: {row['over_forward']:.2f}")
    if a.process_repeats and "jaccli" in inproc and agreeing:
        print(f"  whole process, medians of {a.process_repeats} fresh processes each:", flush=True)
        proc = whole_process(job, ["jaccli", *agreeing], d, a)
        ok = {}
        for name, (sec, err) in proc.items():
            if err > a.tol:
                print(f"    {name:<28} DISAGREES with float64 (max rel. difference {err:.1e}): no figure")
            else:
                ok[name] = sec
                print(f"    {name:<28} {sec:9.3f} s   max rel. difference to float64 {err:.1e}")
        row["process"] = ok
        others = [n for n in ok if n != "jaccli"]
        if "jaccli" in ok and others:
            best = min(others, key=ok.get)
            row["process_peer"], row["process_ratio"] = best, ok["jaccli"] / ok[best]
    return row


def table(rows: list[dict]) -> None:
    print("\nsummary: jaccli / fastest peer that agrees with float64 (target ≤ 0.8 in-process, ≤ 1.0 whole process)")
    head = f"  {'job':<16} {'jaccli s':>9} {'fastest peer':<30} {'peer s':>8} {'in-proc':>8} {'':<8} " \
           f"{'jaccli s':>9} {'peer s':>8} {'process':>8} {'':<8}"  # fmt: skip
    print(head)
    for r in rows:
        ip, pr = r.get("in_process", {}), r.get("process", {})

        def mark(v, target):
            return "" if v is None else ("met" if v <= target else "NOT MET")

        ratio, pratio = r.get("ratio"), r.get("process_ratio")
        peer = r.get("peer", "-")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"  {r['job']:<16} {fmt(ip.get('jaccli'), '9.4f'):>9} {peer:<30} {fmt(ip.get(peer), '8.4f'):>8} "
              f"{fmt(ratio, '8.3f'):>8} {mark(ratio, IN_PROCESS_TARGET):<8} "
              f"{fmt(pr.get('jaccli'), '9.3f'):>9} {fmt(pr.get(r.get('process_peer')), '8.3f'):>8} "
              f"{fmt(pratio, '8.3f'):>8} {mark(pratio, PROCESS_TARGET):<8}"
              + (f"  (jaccli {r['over_forward']:.2f}× its forward pass)" if "over_forward" in r else ""))  # fmt: skip
        if ip.get(COMPILED) is not None:
            vs = f", {ip[COMPILED] / ip[peer]:.3f} of the peer" if peer in ip else ""
            print(f"  {'':<16} {COMPILED}: {ip[COMPILED]:.4f} s in-process, {r['compiled_over_eager']:.3f} of jaccli's{vs}")
        if r.get("process_peer") and r.get("process_peer") != peer:
            print(f"  {'':<16} whole process: the fastest peer is {r['process_peer']}")


def machine(device: str) -> str:
    """The machine in words: CPU model, cores, memory, GPU where one ran, library versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem = f", {gib:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        mem = ""
    gpu = ""
    if device != "cpu":
        import torch

        gpu = f", {torch.cuda.get_device_name(torch.device(device))}"
    libs = []
    for dist in ("torch", "jax", "folx"):
        try:
            libs.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; Python {platform.python_version()}, {', '.join(libs)}"


def markdown(rows: list[dict], a, when: str) -> str:
    """The summary as a Markdown table, headed by the date, the machine and the command that made it."""
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    verdict = lambda v, t: "" if v is None else (" ✓" if v <= t else " ✗")  # noqa: E731
    shown, prev = [], None
    for arg in a.argv_given:  # the command that measured, less the options naming where it wrote
        writes = (arg in ("--json", "--markdown", "--readme") or prev in ("--json", "--markdown")
                  or (prev == "--readme" and not arg.startswith("-")))  # --readme's file is optional
        if not writes:
            shown.append(arg)
        prev = arg
    argv = " ".join(shown)
    lines = [
        f"Measured {when} on {machine(a.device)}; device {a.device}, {a.threads} thread(s) per process, float32, "
        f"every result within {a.tol:g} of float64. `python benchmarks/peers.py {argv}`".rstrip() + ". "
        f"Ratios are jaccli's time over the fastest peer's (below 1: jaccli is faster); targets ≤ "
        f"{IN_PROCESS_TARGET} in-process, ≤ {PROCESS_TARGET} as a whole process.",
        "",
        "| job | N | jaccli (s) | fastest peer (s) | in-process | whole process: jaccli / peer (s) | whole process |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ip, pr = r.get("in_process", {}), r.get("process", {})
        peer, ppeer = r.get("peer"), r.get("process_peer")
        ratio, pratio = r.get("ratio"), r.get("process_ratio")
        lines.append(
            f"| {r['title']} | {r['points']:,} | {fmt(ip.get('jaccli'), '.3g')} | "
            f"{(peer + ' ') if peer else ''}{fmt(ip.get(peer), '.3g')} | {fmt(ratio, '.2f')}{verdict(ratio, IN_PROCESS_TARGET)} | "
            f"{fmt(pr.get('jaccli'), '.2f')} / {fmt(pr.get(ppeer), '.2f')}{(' (' + ppeer + ')') if ppeer else ''} | "
            f"{fmt(pratio, '.2f')}{verdict(pratio, PROCESS_TARGET)} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


#: the README's performance table lies between these two lines; ``--readme`` rewrites what is between
README_MARKS = ("<!-- peers.py table: start -->", "<!-- peers.py table: end -->")


def write_readme(text: str, readme: Path) -> None:
    """Replace the README's table (between :data:`README_MARKS`) with ``text``; refuse without the marks."""
    doc = readme.read_text()
    start, end = README_MARKS
    i, j = doc.find(start), doc.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"{readme}: no table to replace (expected the lines {start!r} and {end!r})")
    readme.write_text(doc[: i + len(start)] + "\n" + text + doc[j:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="all", help=f"comma-separated, of: {', '.join(JOBS)} (default all)")
    ap.add_argument("--peers", default="all", help="comma-separated peer names to run (default all installed)")
    ap.add_argument("--quick", action="store_true", help="each job at a small N (a few minutes in all: each whole process still costs seconds)")
    ap.add_argument("--points", type=int, help="N for every job (overrides the job's and --quick's)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per candidate in-process (median)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="in-process: the candidates take turns this many times, each in a fresh process (median)")
    ap.add_argument("--process-repeats", type=int, default=3, help="fresh processes per candidate (median; 0: skip)")
    ap.add_argument("--no-compiled", dest="compiled", action="store_false",
                    help=f"leave out the in-process '{COMPILED}' row (fused kernels forced on, compiled in its warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="threads of every child process (torch and XLA)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max difference to float64 relative to its largest value")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--device", default="cpu", help="where every candidate computes: cpu, cuda, cuda:N "
                    "(JAX and folx only on a jaxlib with that backend; benchmarks/gpu.py --table uses it)")
    ap.add_argument("--markdown", type=Path, help="also write the summary as a Markdown table (date, machine, command)")
    ap.add_argument("--readme", type=Path, nargs="?", const=ROOT / "README.md",
                    help="rewrite the performance table in this README (default the project's) with the summary")
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--run", nargs=3, metavar=("JOB", "NAME", "DIR"), help=argparse.SUPPRESS)
    # a candidate whose result is scaled by 1.01 before the check (the test that the check rejects it)
    ap.add_argument("--perturb", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv_given = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg]
    if a.run:
        run_one(*a.run, a)
        return 0
    jobs = list(JOBS) if a.jobs == "all" else a.jobs.split(",")
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        ap.error(f"unknown job(s) {', '.join(unknown)}; the jobs are {', '.join(JOBS)}")
    chosen = None if a.peers == "all" else set(a.peers.split(","))
    a.peer_filter = lambda n: {n} if chosen is None or n in chosen else set()
    import platform

    print(f"python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs, {a.threads} thread(s)"
          f" per process; repeats {a.repeats}, process repeats {a.process_repeats}")  # fmt: skip
    sys.path.insert(0, str(HERE))
    from timing import compile_checkouts

    compile_checkouts([ROOT])  # the whole processes run jaccli as an install leaves it
    rows = []
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as tmp:
        for job in jobs:
            rows.append(run_job(job, a, Path(tmp)))
    table(rows)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    if a.markdown or a.readme:
        text = markdown(rows, a, time.strftime("%Y-%m-%d", time.gmtime()))
        if a.markdown:
            a.markdown.write_text(text)
        if a.readme:
            write_readme(text, a.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
