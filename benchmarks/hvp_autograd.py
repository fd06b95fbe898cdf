"""One Hessian-vector product: torch.func's reverse over reverse (``vjp`` of ``grad``, ``vmap``
over a block of columns: what :meth:`Objective._hvp` did until it took ``torch.autograd``, to
leave ``torch._dynamo`` unimported) against ``Objective.matmat`` as it is, both through a graph
kept per chunk, interleaved in one process, medians of 15 (docs/curvature.md, "Whole process").

    python benchmarks/hvp_autograd.py
"""
import statistics, sys, time, torch
torch.set_num_threads(1)
from torch.func import grad, vjp, vmap
from jaccli.curvature.objective import build_objective

def old_matmat(obj, V, pulls):
    out = torch.zeros_like(V)
    for a, b in obj.chunks():
        if (a, b) not in pulls:
            _, pulls[(a, b)] = vjp(grad(lambda th: obj.chunk_loss(th, a, b)), obj.space.values)
        pull = pulls[(a, b)]
        f = lambda v: obj.space.flat(pull(obj.space.split(v))[0])
        out += vmap(f, in_dims=1, out_dims=1)(V) if V.shape[1] > 1 else f(V[:, 0])[:, None]
    return out

torch.manual_seed(0)
for n in (128, 1024):
    net = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    x, y = torch.randn(n, 10), torch.randn(n, 1)
    obj = build_objective(net, x, y, loss="mse", reduction=None, params=None, chunk_size=None, output=None)
    P = obj.space.size
    pulls = {}
    for k in (1, 32):
        V = torch.randn(P, k)
        err = float((old_matmat(obj, V, pulls) - obj.matmat("hessian", V)).abs().max())
        t_old, t_new = [], []
        for r in range(15):
            t = time.perf_counter(); old_matmat(obj, V, pulls); t_old.append(time.perf_counter() - t)
            t = time.perf_counter(); obj.matmat("hessian", V); t_new.append(time.perf_counter() - t)
        mo, mn = 1e3 * statistics.median(t_old) / k, 1e3 * statistics.median(t_new) / k
        print(f"P={P} N={n} columns={k}: torch.func {mo:.3f} ms/column, torch.autograd {mn:.3f} ms/column, ratio {mn/mo:.2f}, max diff {err:.1e}")
