"""The Taylor fast path against the forward pass, torch.func and (if installed) JAX, in ONE run.

    python benchmarks/bench.py [--quick] [--repeats R] [--json FILE]

Every case runs side by side in this one process, and within a case the candidates
take turns (round-robin, after one warm-up each) so that a drift of the machine, which
here reaches tens of percent within a minute, hits every term of a ratio alike. Times
are medians over ``--repeats`` rounds (fewer once a case has used ``--budget`` seconds).
"torch.func" is jaccli's own torch.func engine (the fast path switched off) unless a
row says otherwise; jaccli times are whole public-API calls, so they include input
checks, the model probe and the Taylor trace. Peak memory is the rise of the resident
set's high-water mark over the call (reset through /proc/self/clear_refs, with freed
heap returned to the system first), so it counts the result and every temporary.

JAX is optional: install it (``pip install jax``) to get the JAX columns.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import hessian, jacfwd, jacrev, jvp, vmap

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaccli  # noqa: E402
from timing import status_kib as _status_kib  # noqa: E402
from jaccli.engine import planner, probe, problem  # noqa: E402
from jaccli import jets as taylor  # noqa: E402
from jaccli.load.weights import build_mlp  # noqa: E402

try:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", False)
    from jax_twins import jax_mlp
except ImportError:  # JAX is optional
    jax = None


# --------------------------------------------------------------------------- measuring


def race(fns: dict, repeats: int, budget: float) -> dict[str, float]:
    """Median seconds of each of ``fns``, timed round-robin after one warm-up each.

    This machine's throughput drifts by tens of percent within a minute; taking turns
    lets a drift hit every candidate of a ratio alike. Rounds stop after ``budget``
    seconds (at least one round).
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_bytes(fn) -> int | None:
    """Rise of the peak resident set during ``fn()`` (None where /proc cannot say)."""
    try:
        _trim()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status_kib("VmRSS")
        out = fn()
        peak = _status_kib("VmHWM")
        del out
        return (peak - base) * 1024
    except OSError:
        return None


def rel_diff(got, want) -> float:
    got = getattr(got, "value", got)
    want = getattr(want, "value", want)
    scale = float(want.abs().max())
    return float((got - want).abs().max()) / max(scale, 1e-30)


def torch_func(fn):
    """Run ``fn`` with jaccli's fast path switched off."""
    saved = planner.FAST_PATH
    planner.FAST_PATH = False
    try:
        return fn()
    finally:
        planner.FAST_PATH = saved


def mlp(sizes, seed=0) -> nn.Sequential:
    """A tanh MLP from jaccli's own builder, seeded."""
    torch.manual_seed(seed)
    return build_mlp(list(sizes), "tanh").eval().requires_grad_(False)


def per_point(net):
    return lambda xi: net(xi[None])[0]


# --------------------------------------------------------------------------- JAX twins


def torch_weights(module) -> list:
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    weights = [k for k in state if k.endswith("weight")]
    return [(state[k], state[k[: -len("weight")] + "bias"]) for k in weights]


def jax_call(fn, x):
    """A jitted JAX function as a timed thunk (waits for the result)."""
    fn = jax.jit(fn)
    return lambda: fn(x).block_until_ready()


# --------------------------------------------------------------------------- cases


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, case: str, what: str, value: float, target: str | None = None, ok: bool | None = None,
            note: str = "") -> None:  # fmt: skip
        self.rows.append(dict(case=case, what=what, value=value, target=target, ok=ok, note=note))
        mark = "" if ok is None else ("  MET" if ok else "  NOT MET")
        print(f"  {what:<44} {value:>10.3f}  {target or '':<10}{mark}  {note}", flush=True)


def _exactness(t: Table, case: str, what: str, got, want) -> None:
    err = rel_diff(got, want)
    t.add(case, f"{what} max rel. diff", err, "<= 1e-6", err <= 1e-6)


def case_pinn(t: Table, n: int, repeats: int, budget: float) -> None:
    """Per-sample Jacobian and Hessian of the seed PINN (TorchScript) against its forward pass."""
    print(f"\n[seed PINN 1→50→50→50→501 tanh, TorchScript, N={n:,}, float32]")
    model = jaccli.load_model(ROOT / "examples/models/pinn.pt")
    x = torch.linspace(0, 1, n)[:, None]
    p = problem.check_inputs(model, x, per_sample=True)
    rows = probe.probe_rows(p)

    def forward():
        with torch.no_grad():
            return model(x)

    fns = {
        "forward": forward,
        "jacobian": lambda: jaccli.jacobian(model, x, per_sample=True),
        "hessian": lambda: jaccli.hessian(model, x, per_sample=True),
        "trace": lambda: taylor.build(p.fn(rows), p.z(rows), orders=2),
    }
    if jax is not None:
        f = jax_mlp(torch_weights(model.module))
        xj = jnp.asarray(x.numpy())
        fns["JAX forward"] = jax_call(jax.vmap(f), xj)
        fns["JAX jacobian"] = jax_call(jax.vmap(jax.jacfwd(f)), xj)
        # forward over forward: with one input the cheapest JAX Hessian (jax.hessian is forward over reverse)
        fns["JAX hessian"] = jax_call(jax.vmap(jax.jacfwd(jax.jacfwd(f))), xj)
    # the fast candidates race twice as many rounds; the torch.func references (seconds
    # each) race apart, against their own forward pass
    m = race(fns, 2 * repeats, budget)
    slow = race({
        "forward": forward,
        "torch.func jacobian": lambda: torch_func(lambda: jaccli.jacobian(model, x, per_sample=True)),
        "torch.func hessian": lambda: torch_func(lambda: jaccli.hessian(model, x, per_sample=True)),
    }, repeats, budget)  # fmt: skip
    plan_j = jaccli.plan("jacobian", model, x, per_sample=True)
    plan_h = jaccli.plan("hessian", model, x, per_sample=True)
    print("  " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in m.items()))
    print("  separately: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in slow.items()))
    print(f"  engines: jacobian {plan_j.engine}, hessian {plan_h.engine}; {plan_j.chunks} passes of {plan_j.points_per_chunk} points")
    fwd, jac, hes = m["forward"], m["jacobian"], m["hessian"]
    t.add("pinn", "jacobian / forward", jac / fwd, "<= 1.5", jac / fwd <= 1.5)
    t.add("pinn", "hessian / forward", hes / fwd, "<= 2", hes / fwd <= 2)
    t.add("pinn", "trace + check of the model, ms (in the above)", m["trace"] * 1e3, note="no torch.compile")
    tf_jac, tf_hes = slow["torch.func jacobian"] / slow["forward"], slow["torch.func hessian"] / slow["forward"]
    t.add("pinn", "torch.func jacobian / forward", tf_jac, note="reference")
    t.add("pinn", "torch.func hessian / forward", tf_hes, note="reference")
    t.add("pinn", "jacobian: jaccli / torch.func", (jac / fwd) / tf_jac)
    t.add("pinn", "hessian: jaccli / torch.func", (hes / fwd) / tf_hes)
    if jax is not None:
        t.add("pinn", "JAX jacobian / JAX forward", m["JAX jacobian"] / m["JAX forward"], note="reference")
        t.add("pinn", "JAX hessian / JAX forward", m["JAX hessian"] / m["JAX forward"], note="reference")
        t.add("pinn", "JAX forward / torch forward", m["JAX forward"] / fwd, note="reference")
        t.add("pinn", "jacobian: jaccli / JAX jit", jac / m["JAX jacobian"], "<= 1", jac <= m["JAX jacobian"])
        t.add("pinn", "hessian: jaccli / JAX jit", hes / m["JAX hessian"], "<= 1", hes <= m["JAX hessian"])
    else:
        print("  JAX not installed: no JAX comparison")
    _exactness(t, "pinn", "jacobian", fns["jacobian"](), torch_func(fns["jacobian"]))
    _exactness(t, "pinn", "hessian", fns["hessian"](), torch_func(fns["hessian"]))


def case_laplacian(t: Table, n: int, repeats: int, budget: float) -> None:
    """Laplacian of a 100→256→256→256→1 tanh MLP against trace(vmap(hessian))."""
    print(f"\n[laplacian, 100→256→256→256→1 tanh, N={n:,}, float32]")
    net = mlp((100, 256, 256, 256, 1), seed=1)
    x = torch.randn(n, 100, generator=torch.Generator().manual_seed(0))
    f = lambda xi: net(xi[None])[0, 0]  # noqa: E731
    fns = {
        "jaccli": lambda: jaccli.laplacian(net, x, per_sample=True)[:, 0],
        "trace(vmap(hessian))": lambda: vmap(hessian(f))(x).diagonal(dim1=-2, dim2=-1).sum(-1),
        "jaccli torch.func": lambda: torch_func(lambda: jaccli.laplacian(net, x, per_sample=True)[:, 0]),
    }
    if jax is not None:
        g = jax_mlp(torch_weights(net))
        fns["JAX trace(hessian)"] = jax_call(jax.vmap(lambda xi: jnp.trace(jax.hessian(lambda v: g(v)[0])(xi))),
                                             jnp.asarray(x.numpy()))  # fmt: skip
    m = race(fns, repeats, budget)
    plan = jaccli.plan("laplacian", net, x, per_sample=True)
    print("  " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in m.items()))
    print(f"  engine {plan.engine}, {plan.points_per_chunk} points × {plan.directions_per_pass} directions per pass")
    ours, ref = m["jaccli"], m["trace(vmap(hessian))"]
    t.add("laplacian", "speed-up over trace(vmap(hessian))", ref / ours, ">= 5", ref / ours >= 5)
    mem_ours, mem_ref = peak_bytes(fns["jaccli"]), peak_bytes(fns["trace(vmap(hessian))"])
    if mem_ours is not None and mem_ref:
        t.add("laplacian", "peak memory / trace(vmap(hessian))'s", mem_ours / mem_ref, "<= 0.5",
              mem_ours / mem_ref <= 0.5, f"{mem_ours / 2**20:.0f} MiB vs {mem_ref / 2**20:.0f} MiB")  # fmt: skip
    t.add("laplacian", "jaccli / its torch.func engine", ours / m["jaccli torch.func"])
    if jax is not None:
        t.add("laplacian", "jaccli / JAX jit trace(hessian)", ours / m["JAX trace(hessian)"])
    _exactness(t, "laplacian", "vs trace(vmap(hessian))", fns["jaccli"](), fns["trace(vmap(hessian))"]())


def case_divergence(t: Table, d: int, n: int, probes: int, repeats: int, budget: float) -> None:
    """Exact divergence against d forward-mode products; Hutchinson against K of them."""
    print(f"\n[divergence, {d}→256→256→{d} tanh, N={n:,}, float32]")
    net = mlp((d, 256, 256, d), seed=2)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    v = torch.randn_like(x)
    fns = {
        "one product": lambda: jvp(net, (x,), (v,)),  # torch.func.jvp on the whole batch
        "exact": lambda: jaccli.divergence(net, x, per_sample=True),
        "hutchinson": lambda: jaccli.divergence(net, x, per_sample=True, estimator="hutchinson", probes=probes),
        "exact torch.func": lambda: torch_func(lambda: jaccli.divergence(net, x, per_sample=True)),
    }
    m = race(fns, repeats, budget)
    plan = jaccli.plan("divergence", net, x, per_sample=True)
    print("  " + ", ".join(f"{k} {v_ * 1e3:.1f} ms" for k, v_ in m.items()))
    print(f"  engine {plan.engine}, {plan.directions_per_pass} of {plan.directions} streams per pass")
    prod, div, hut = m["one product"], m["exact"], m["hutchinson"]
    case = f"divergence d={d}"
    t.add(case, f"exact / ({d} products)", div / (d * prod), "<= 1", div <= d * prod)
    t.add(case, f"hutchinson K={probes} / ({probes} products)", hut / (probes * prod), "<= 1", hut <= probes * prod)
    t.add(case, "exact: jaccli / torch.func", div / m["exact torch.func"])
    _exactness(t, case, "exact", fns["exact"](), fns["exact torch.func"]())


def case_auto(t: Table, name: str, net, n_in: int, n: int, repeats: int, budget: float) -> None:
    """Auto mode against the faster of vmap(jacfwd) and vmap(jacrev).

    Each torch.func mode runs once; the slower (tens of seconds where it has to loop over
    thousands of directions) keeps that one time, the faster one races jaccli.
    """
    x = torch.randn(n, n_in, generator=torch.Generator().manual_seed(0))
    f = per_point(net)
    plan = jaccli.plan("jacobian", net, x, per_sample=True)
    print(f"\n[auto mode, {name}, N={n:,}: jaccli picks {plan.mode} ({plan.engine})]")
    modes = {"vmap(jacfwd)": lambda: vmap(jacfwd(f))(x), "vmap(jacrev)": lambda: vmap(jacrev(f))(x)}
    once = {}
    for k, fn in modes.items():
        t0 = time.perf_counter()
        fn()
        once[k] = time.perf_counter() - t0
    fast = min(once, key=once.get)
    m = race({"jaccli": lambda: jaccli.jacobian(net, x, per_sample=True), fast: modes[fast]}, repeats, budget)
    slow = max(once, key=once.get)
    print(f"  jaccli {m['jaccli'] * 1e3:.1f} ms, {fast} {m[fast] * 1e3:.1f} ms, {slow} {once[slow] * 1e3:.0f} ms (once)")
    t.add(f"auto {name}", f"jaccli auto / {fast}", m["jaccli"] / m[fast], "<= 1.2", m["jaccli"] / m[fast] <= 1.2)


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jax": None if jax is None else jax.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
        info["ram_gib"] = round(_status_meminfo("MemTotal") / 2**20, 1)
    except OSError:
        pass
    return info


def _status_meminfo(field: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller cases (minutes -> about a minute)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds after which a case stops repeating")
    ap.add_argument("--json", type=Path, help="also write the rows and the machine as JSON")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)
    q = args.quick
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    t = Table()
    case_pinn(t, 20_000 if q else 100_000, args.repeats, args.budget)
    case_laplacian(t, 500 if q else 2000, args.repeats, args.budget)
    case_divergence(t, 64, 500 if q else 2000, 16, args.repeats, args.budget)
    case_divergence(t, 256, 250 if q else 1000, 16, args.repeats, args.budget)
    # N=500: at N=1000 vmap(jacrev) on the tall model ran this 24 GB machine out of memory
    case_auto(t, "tall 32→2048", mlp((32, 128, 128, 2048), seed=3), 32, 200 if q else 500, args.repeats, args.budget)
    case_auto(t, "wide 2048→32", mlp((2048, 128, 128, 32), seed=4), 2048, 200 if q else 500, args.repeats, args.budget)
    pinn = mlp((1, 50, 50, 50, 501), seed=0)
    case_auto(t, "1→501", pinn, 1, 2000 if q else 10_000, args.repeats, args.budget)
    compiled = sum(torch._dynamo.utils.counters["frames"].values()) if hasattr(torch, "_dynamo") else 0
    print(f"\nframes compiled by torch.compile during the run: {compiled}")
    print("\nsummary (value: ratio unless noted)")
    print(f"  {'case':<18} {'what':<46} {'value':>10}  {'target':<10} status")
    for r in t.rows:
        status = "" if r["ok"] is None else ("met" if r["ok"] else "NOT MET")
        print(f"  {r['case']:<18} {r['what']:<46} {r['value']:>10.3g}  {r['target'] or '':<10} {status}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": t.rows, "torch_compile_frames": compiled}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
