"""Issue 23's question: is forward over reverse INSIDE jaccli's Taylor engine worth an engine
strategy for the per-sample Hessian? (An experiment; its answer is in docs/performance.md,
"Forward over reverse in the engine".)

    python benchmarks/forward_over_reverse.py [--only NAME,...] [--points N] [--repeats R]
        [--formats pt,pt2] [--threads T] [--per-output] [--tol TOL]

For each model of ``tests/architectures.py``, saved as a trace and as a ``.pt2`` and loaded
by ``jaccli.load_model``, the model's GRADIENT program is recorded by the engine's own
recorder (``jaccli.jets.build``): the forward, then its reverse pass for every output at
once (``functionalize(vmap(vjp))``: one backward sweep whose rows are the ``n_out``
one-hot cotangents), a flat function ``z [B, n_in] -> ∇y [B, n_out·n_in]``. Its per-point
Jacobian (``TaylorProgram.jacobian``: ``n_in`` one-hot first-order rows, every linear
layer of forward and backward one product for all of them) is the Hessian. That is what
``vmap(hessian)`` (``jacfwd(jacrev)``) computes, with the same products, but without the
batching interpreter. ``--per-output`` adds a variant with one ``autograd.grad`` sweep per
output (no functorch inside the record).

Three candidates, called alternately (``--repeats`` rounds, medians, one warm-up): this
forward over reverse (``fr``), jaccli's public ``hessian`` (auto mode: Taylor's forward
Hessian, ``n_in + n_in(n_in+1)/2`` rows, or torch.func) and torch.func's ``vmap(hessian)``
of the same loaded model. Every result is compared with a float64 ``vmap(hessian)`` of the
eager module; a result off by more than ``--tol`` gets no figure. Only ``fr``'s pass is
timed (the recorded program, no checks, no plan): an upper bound on what a strategy built
on it would reach.

Recording a backward pass needs what :func:`gradient_recording` installs for the time of
the record (and takes back): backward ops with no rule become torch._decomp's
decompositions, ops the autograd engine adds (``detach`` of a saved output, ``to``,
``conj_physical``) are identities, and the scatters that backward passes of indexing
write (``index_put``, ``slice_scatter``, ``select_scatter``) and the input's gradient of a
convolution (``convolution_backward``: a transposed convolution) are written in ops that
have rules. Not covered: ``adaptive_max_pool2d_backward`` (InstanceNorm model), and the
max-pooling CNN's record changes with the batch size. And the recorder learns that autograd hands back a SAVED OUTPUT as a new tensor
object sharing its memory (``tensor_data()``): the recorder knows tensors by ``id``, so
it took it for a constant, and the program's derivative check failed (it is mapped back
to the record with the same memory and geometry).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor
from torch._decomp import decomposition_table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks", ROOT / "tests", ROOT / "examples" / "models"):
    sys.path.insert(0, str(_p))

import jaccli  # noqa: E402
from jaccli.jets import RULES, Unsupported, build  # noqa: E402
from jaccli.jets import decompose, record  # noqa: E402
from jaccli.jets.table import _op_name  # noqa: E402
from zoo import func_hessian, saved  # noqa: E402

aten = torch.ops.aten

DEFAULT_MODELS = "silu_mlp,maf,realnvp,bert,gpt2,encoder"


# --------------------------------------------------------------------------- recording a backward pass


def _identity(x, *args, **kwargs):
    """``detach``/``conj_physical``/``to`` (same dtype) of a real tensor, inside a gradient program."""
    dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
    if dtype is None or dtype == x.dtype:
        return aten.alias.default(x)
    return aten._to_copy.default(x, dtype=dtype)


def _index_put(base, indices, values, accumulate=False):
    """``base`` plus ``values`` moved to the entries of one 1-D index (the backward of ``x[:, idx]``),
    as a product with the index's one-hot matrix. Exact for ``accumulate`` and for distinct indices."""
    dims = [i for i, ix in enumerate(indices) if ix is not None]
    if len(dims) != 1 or indices[dims[0]].dim() != 1 or indices[dims[0]].dtype == torch.bool:
        return NotImplemented
    d, idx = dims[0], indices[dims[0]]
    onehot = torch.nn.functional.one_hot(idx, base.shape[d]).to(base.dtype)  # [k, size]
    shape = list(base.shape)
    shape[d] = idx.numel()
    perm = [i for i in range(len(shape)) if i != d] + [d]
    moved = aten.clone.default(aten.permute.default(values.expand(shape), perm), memory_format=torch.contiguous_format)
    product = aten.mm.default(aten.view.default(moved, [-1, idx.numel()]), onehot)
    back = aten.view.default(product, list(moved.shape[:-1]) + [base.shape[d]])
    return base + aten.permute.default(back, [perm.index(i) for i in range(len(shape))])


def _slice_scatter(base, src, dim=0, start=None, end=None, step=1):
    """``src`` written into a slice of ``base``: the slices of ``base`` around it and ``src``, concatenated."""
    if step != 1:
        return NotImplemented
    n = base.shape[dim]
    s = 0 if start is None else (start + n if start < 0 else min(start, n))
    e = n if end is None else (end + n if end < 0 else min(end, n))
    parts = ([aten.slice.Tensor(base, dim, 0, s)] if s > 0 else []) + [src]
    parts += [aten.slice.Tensor(base, dim, e, n)] if e < n else []
    return aten.cat.default(parts, dim) if len(parts) > 1 else aten.alias.default(src)


def _select_scatter(base, src, dim, index):
    index = index + base.shape[dim] if index < 0 else index
    return _slice_scatter(base, src.unsqueeze(dim), dim, index, index + 1)


def _convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                          groups, mask):  # fmt: skip
    """The input's gradient of a convolution: the transposed convolution of ``grad`` (the
    weights' and bias' are not asked for: the parameters are constants)."""
    if transposed or mask[1] or mask[2]:
        return NotImplemented
    k = weight.shape[2:]
    extra = [x.shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
             for i in range(len(k))]  # fmt: skip
    gi = aten.convolution.default(grad, weight, None, stride, padding, dilation, True, extra, groups)
    return gi, None, None


def _geometry(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


@contextlib.contextmanager
def gradient_recording():
    """The recorder made able to record backward passes, for the time of the block (see the module's text)."""
    table = dict(decompose.DECOMPOSITIONS)
    added = {op: fn for op, fn in decomposition_table.items()
             if "backward" in _op_name(op) and _op_name(op) not in RULES and op not in table}  # fmt: skip
    added.update({getattr(aten.to, o): _identity for o in aten.to.overloads()})
    added.update({aten.detach.default: _identity, aten.conj_physical.default: _identity,
                  aten.index_put.default: _index_put, aten.slice_scatter.default: _slice_scatter,
                  aten.select_scatter.default: _select_scatter,
                  aten.convolution_backward.default: _convolution_backward})  # fmt: skip
    rec = record._Recorder
    init, register, dispatch = rec.__init__, rec._register, rec.__torch_dispatch__

    def init_(self, z):
        init(self, z)
        self.geometry = {_geometry(z): z}

    def register_(self, out, index, aliases, args):
        register(self, out, index, aliases, args)
        self.geometry.setdefault(_geometry(out), out)

    def dispatch_(self, func, types, args=(), kwargs=None):
        # a saved output comes back as a new tensor object on the record's memory: the record itself
        def known(o):
            return self.geometry.get(_geometry(o), o) if isinstance(o, Tensor) and id(o) not in self.made else o

        return dispatch(self, func, types, tree_map(known, args), tree_map(known, kwargs or {}))

    decompose.DECOMPOSITIONS.update(added)
    rec.__init__, rec._register, rec.__torch_dispatch__ = init_, register_, dispatch_
    try:
        yield
    finally:
        rec.__init__, rec._register, rec.__torch_dispatch__ = init, register, dispatch
        decompose.DECOMPOSITIONS.clear()
        decompose.DECOMPOSITIONS.update(table)


def gradient_function(net, shape, n_in: int, n_out: int, per_output: bool = False):
    """``z [B, n_in] -> [B, n_out·n_in]``: the gradient of each output at each point, by reverse mode."""

    def forward(z: Tensor) -> Tensor:
        with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no second derivative
            return net(z.reshape(z.shape[0], *shape)).reshape(z.shape[0], n_out)

    def batched(z: Tensor) -> Tensor:  # one backward sweep, the n_out one-hot cotangents as its rows
        _, pullback = torch.func.vjp(forward, z)
        cotangents = torch.eye(n_out, dtype=z.dtype)[:, None, :].expand(n_out, z.shape[0], n_out)
        (grads,) = torch.func.vmap(pullback)(cotangents)
        return grads.permute(1, 0, 2).reshape(z.shape[0], n_out * n_in)

    def each(z: Tensor) -> Tensor:  # one autograd sweep per output
        y = forward(z)
        grads = [torch.autograd.grad(y[:, k].sum(), z, create_graph=True)[0] for k in range(n_out)]
        return torch.stack(grads, 1).reshape(z.shape[0], n_out * n_in)

    # vmap's batching rules write scatters in place into views; functionalize makes them *_scatter ops
    inner = each if per_output else torch.func.functionalize(batched, remove="mutations")

    def g(z: Tensor) -> Tensor:
        with torch.enable_grad():  # the build's check calls it under no_grad
            return inner(z if z.requires_grad else z.detach().requires_grad_(True))

    return g


# --------------------------------------------------------------------------- the comparison


def compare(names: list[str], points: int, repeats: int, formats: tuple[str, ...] = ("pt", "pt2"),
            per_output: bool = False, tol: float = 1e-4, out=print) -> list[dict]:  # fmt: skip
    """The candidates on each model and format, interleaved; one row per (model, format,
    candidate): its median ``seconds``, ``err`` against float64 and ``ratio`` (torch.func's
    time / its own; None where either result is off by more than ``tol``)."""
    variants = {"fr": False, **({"fr per output": True} if per_output else {})}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in saved(names, points, Path(tmp), formats):
            module = m.module.requires_grad_(False)
            with sdpa_kernel([SDPBackend.MATH]):
                ref = func_hessian(module.double(), m.shape, None)(m.x.double())
            module.float()
            x, n_in = m.x, m.x[0].numel()
            z = x.reshape(x.shape[0], -1)
            for fmt, path in m.files.items():
                net = jaccli.load_model(str(path))
                n_out = net(x[:2]).reshape(2, -1).shape[1]
                fns, notes, recorded = {}, {}, []
                for label, each in variants.items():
                    try:
                        with gradient_recording():
                            t0 = time.perf_counter()
                            program = build(gradient_function(net, m.shape, n_in, n_out, each), z[:8], orders=1)
                        steps = sum(1 for s in program.steps if s.kind == "jet")
                        notes[label] = f"{steps} jet steps, recorded and checked in {time.perf_counter() - t0:.2f} s"
                        fns[label] = lambda program=program: program.jacobian(z)
                        recorded.append(program)
                    except Unsupported as exc:
                        out(f"{m.name} {fmt} {label}: not recorded: {exc}")
                h_func = func_hessian(net, m.shape, m.static if fmt == "pt2" else None)
                fns["jaccli"] = lambda net=net: jaccli.hessian(net, x, per_sample=True)
                fns["func"] = lambda h_func=h_func: h_func(x)
                # the gradient programs' passes reuse one workspace, as the engine's do
                shared = recorded[0].workspace() if recorded else contextlib.nullcontext()
                with shared, sdpa_kernel([SDPBackend.MATH]):
                    errs = {k: float((fn().double().reshape(ref.shape) - ref).abs().max() / ref.abs().max()) for k, fn in fns.items()}
                    runs: dict[str, list[float]] = {k: [] for k in fns}
                    for _ in range(max(1, repeats)):
                        for k, fn in fns.items():
                            t0 = time.perf_counter()
                            fn()
                            runs[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in runs.items()}
                engine = jaccli.plan("hessian", net, x, per_sample=True).engine
                out(f"{m.name} .{fmt}: n_in {n_in}, n_out {n_out}, N = {points} (jaccli: {engine} engine)")
                for k, t in med.items():
                    ratio = med["func"] / t if errs[k] <= tol and errs["func"] <= tol else None
                    rows.append({"model": m.name, "format": fmt, "candidate": k, "seconds": t, "err": errs[k], "ratio": ratio})
                    shown = "  -  " if ratio is None else f"{ratio:5.2f}"
                    out(f"   {k:14s} {t * 1e3:9.2f} ms  func/this {shown}  rel. err {errs[k]:.1e}  {notes.get(k, '')}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=DEFAULT_MODELS, help=f"models of tests/architectures.py (default {DEFAULT_MODELS})")
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--formats", default="pt,pt2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-output", action="store_true", help="also the variant with one autograd sweep per output")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative error against float64 above which a result gets no ratio")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    compare(a.only.split(","), a.points, a.repeats, tuple(a.formats.split(",")), a.per_output, a.tol,
            out=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
