"""The full parameter Hessian of a model whose parameters all sit in linear layers, by GEMMs.

For ``--full`` with ``--matrix hessian`` the generic path
(:func:`.assembled.dense_hessian`) pays one forward-and-backward-sized pass over
all samples per column. When every selected parameter is the weight or the bias of a linear
layer used once (an MLP, a residual MLP, any DAG of such layers and elementwise ops), the
Hessian has an exact layer-wise form that turns those passes into matrix products:

Perturb each linear output ``z_l = W_l a_l + b_l`` by ``ε_l`` (zero), and let ``F(ε)`` be one
sample's loss. Then ``∂ℓ/∂W_l = δ_l a_lᵀ`` with ``δ_l = ∂F/∂ε_l``, and since ``W_p`` acts only
through ``z_p`` (and ``a_p`` does not depend on it), for ``p`` no later than ``q`` in the graph

    ∂²ℓ / ∂W_p[i,j] ∂W_q[k,m] = a_p[j] (S_pq[i,k] a_q[m] + δ_q[k] T_pq[i,m])

with ``S = ∂²F/∂ε²`` and ``T_pq[i,m] = ∂a_q[m]/∂ε_p[i]`` (zero unless ``q`` is downstream of
``p``, so zero for ``p = q``); a bias is a weight column whose input is the constant 1. One
``vmap(jacfwd(grad))`` pass per layer ``p`` over the samples gives ``S_pq`` for ``q ≥ p`` and
the ``T_pq`` the blocks need (the tangents of ``ε_p`` skip the layers before ``p``, and the
backward pass stops at ``ε_p``); ``δ`` and ``a`` come with them. Each block ``H_pq`` is then a
sum over samples of Kronecker products, i.e. GEMMs over the samples (their inner dimension):

* the ``S`` term as ``[(i k), n] · [n, (j̃ m̃)]``, inside a layer's own block only for ``i ≤ k``;
* the ``T`` term as ``[(i m), n] · [n, (j̃ k)]``, or as ``[(i j̃), n] · [n, k]`` where ``T_pq``
  is diagonal (``a_q`` a chain of pointwise ops of ``z_p`` alone, read off the graph).

Only ``p ≤ q`` is computed, the rest by symmetry; the GEMMs accumulate in place chunk by
chunk (memory flat in ``N``); under ``torch.distributed`` the matrix is all-reduced. The
products' layouts are permuted once, into the ``P × P`` matrix (in the model's precision).

The layers are found by :mod:`.layers` (``mm``/``addmm`` with a transposed or a plain 2-d
weight, a 1-d bias, one row per sample) in the model's aten ops recorded at one sample with
:func:`torch.fx.experimental.proxy_tensor.make_fx` (the graph this module replays). Anything
else a selected parameter feeds (a convolution, a parameter used twice, a sequence axis) raises
:class:`NotStructured` with the first reason found, and the caller falls back to the generic path. The
assembled matrix is checked against one Hessian-vector product before it is returned.

Imports: torch, :mod:`.layers`, :mod:`.objective` (the data, chunks, products), :mod:`.runtime` (all-reduce), :mod:`jaccli.engine.memory`
(the memory budget).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import grad, jacfwd, vmap

from jaccli.curvature.layers import find_layers, Layer, shape
from jaccli.curvature.objective import Objective
from jaccli.curvature.params import take
from jaccli.curvature.runtime import all_reduce
from jaccli.engine.memory import working_budget
from jaccli.engine.strategies import jvp_ready

#: the most samples one pass carries: the GEMMs' inner dimension, longer is faster up to here
MAX_CHUNK = 512
#: the relative error the check against one Hessian-vector product allows, by dtype
CHECK_TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}

class NotStructured(Exception):
    """The model is not made of linear layers this module recognises (the message says why)."""


def _trace(obj: Objective):
    """The model's aten graph at one sample, parameters as its first placeholders."""
    from torch.fx.experimental.proxy_tensor import make_fx

    space = obj.space
    if space.static_batch is not None:
        raise NotStructured("a program exported for one batch size")
    x1 = take(obj.args, 0, 1)
    try:
        gm = make_fx(lambda theta, x: space.call(theta, x))(space.values, x1)
    except Exception as exc:  # noqa: BLE001 -- any failure to record means: the generic path
        raise NotStructured(f"the model could not be recorded ({type(exc).__name__})") from None
    return gm


class _Perturbed(torch.fx.Interpreter):
    """The recorded model with ``ε_l`` added to each linear output, recording each layer's input."""

    def __init__(self, gm, layers: list[Layer]) -> None:
        # a layer's input is read when its output is: keep values past their last use
        super().__init__(gm, garbage_collect_values=False)
        self.layers = layers
        self.index = {l.node: k for k, l in enumerate(layers)}
        self.eps: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor | None] = []

    def run_node(self, n):
        out = super().run_node(n)
        k = self.index.get(n)
        if k is not None:
            self.inputs[k] = self.env[self.layers[k].input]
            out = out + self.eps[k]
        return out

    def __call__(self, eps, theta, args):
        self.eps, self.inputs = eps, [None] * len(eps)
        flat = torch.utils._pytree.tree_leaves((tuple(theta), args))
        out = self.run(*flat)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out, self.inputs


def _downstream(layers: list[Layer]) -> list[set[int]]:
    """For each layer, the layers whose input depends on its output (``T_pq`` can be nonzero)."""
    reach: list[set[int]] = []
    index = {l.node: k for k, l in enumerate(layers)}
    for layer in layers:
        seen, stack = set(), [layer.node]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                stack.append(u)
        found = {k for k, other in enumerate(layers) if other.input is layer.node or other.input in seen}
        found.discard(index[layer.node])
        reach.append(found)
    return reach


def _elementwise_between(p: Layer, q: Layer) -> bool:
    """Whether ``q``'s input is a chain of pointwise ops of ``p``'s output alone (then
    ``T_pq = ∂a_q/∂ε_p`` is diagonal)."""
    n = q.input
    while n is not p.node:
        if not isinstance(n, torch.fx.Node) or n.op != "call_function" or shape(n) != shape(p.node):
            return False
        if torch.Tag.pointwise not in getattr(n.target, "tags", ()):
            return False
        nodes = [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if len(nodes) != 1:
            return False
        n = nodes[0]
    return True


def structured_hessian(obj: Objective) -> torch.Tensor:
    """The Hessian ``[P, P]`` of ``obj``'s loss by the layer-wise form; raises :class:`NotStructured`."""
    jvp_ready()  # jacfwd of backward ops needs torch's forward-AD decompositions, loaded lazily
    space = obj.space
    gm = _trace(obj)
    nodes = list(gm.graph.nodes)
    layers, refused = find_layers(nodes, [n for n in nodes if n.op == "placeholder"][: len(space.names)], space.names)
    if refused:  # the first reason found
        raise NotStructured(refused[0])
    interp = _Perturbed(gm, layers)
    dims = [l.d_out for l in layers]
    E = sum(dims)
    eo = [sum(dims[:k]) for k in range(len(dims))]  # offsets of ε_l in the flat ε
    ins = [l.d_in for l in layers]
    ao = [sum(ins[:k]) for k in range(len(ins))]
    A = sum(ins)
    theta, dtype, device = space.values, space.dtype, space.device
    item = theta[0].element_size()
    budget = working_budget(device)
    # per sample: S, T, their jacfwd working copies (the activations once per ε), the GEMMs' operands
    widest = max(l.width * m.width + l.d_out * m.d_out for l in layers for m in layers)
    per_sample = (4 * (E * E + A * E) + 2 * widest) * item + 4 * obj.act_bytes * E
    if per_sample > budget // 4:
        raise NotStructured("the per-sample second derivatives of the layer outputs do not fit the memory budget")
    # a --chunk-size caps the chunks (a smaller one than memory allows is the caller's choice)
    chunk = int(max(1, min(obj.hi - obj.lo, (budget // 4) // per_sample, obj.chunk_size or MAX_CHUNK)))
    scale = obj.norm * obj.weight

    zeros = [torch.zeros(d, dtype=dtype, device=device) for d in dims]

    reach = _downstream(layers)
    L = len(layers)
    # the inputs whose change with ε_p the blocks need (T_pq): only those go through jacfwd
    t_of = [[q for q in sorted(reach[p]) if layers[q].weight is not None] for p in range(L)]
    t_at = [{q: sum(ins[r] for r in t_of[p][: t_of[p].index(q)]) for q in t_of[p]} for p in range(L)]

    def G(p):
        """``ε_p ↦ (∂F/∂(ε_p, ε_{p+1}, …), the inputs a_q of T_pq)``: the earlier layers' ε stay
        constant, so the tangents of ε_p skip the layers before p and the backward pass stops at ε_p."""

        def F(later, xi, yi):
            eps = [zeros[k].reshape(1, -1) for k in range(p)] + [e.reshape(1, -1) for e in later]
            out, acts = interp(eps, theta, _one(xi))
            value = obj.loss.raw(out, None if yi is None else yi[None])[0] * scale
            return value, [acts[q].reshape(-1) for q in t_of[p]]

        def g(e, xi, yi):
            d, acts = grad(F, has_aux=True)((e, *zeros[p + 1 :]), xi, yi)
            d = torch.cat(d)
            return ((d, torch.cat(acts)) if acts else (d,)), d

        return g

    def inputs(xi):
        return torch.cat([a.reshape(-1) for a in interp([z.reshape(1, -1) for z in zeros], theta, _one(xi))[1]])

    diagonal = [[_elementwise_between(lp, lq) for lq in layers] for lp in layers]
    # the S term of block (p, q) as [(i k), (j̃ m̃)]: for p = q only the pairs i ≤ k (symmetry);
    # the T term as [(i m), (j̃ k)], or as [(i j̃), k] where T_pq is diagonal (a_q an elementwise
    # function of z_p): all accumulate in place over the chunks (addmm)
    upper = [torch.triu_indices(l.d_out, l.d_out, device=device) for l in layers]
    s_acc: dict[tuple[int, int], torch.Tensor] = {}
    t_acc: dict[tuple[int, int], torch.Tensor] = {}
    d_acc: dict[tuple[int, int], torch.Tensor] = {}
    for a0 in range(obj.lo, obj.hi, chunk):
        b0 = min(a0 + chunk, obj.hi)
        x, y = take(obj.args, a0, b0), obj.targets(a0, b0)
        S, T = [], []
        try:
            for p in range(L):
                jac, d = vmap(jacfwd(G(p), has_aux=True), in_dims=(None, 0, None if y is None else 0))(zeros[p], x, y)
                S.append(jac[0].detach())  # [n, (k of q ≥ p), i of p]
                T.append(jac[1].detach() if len(jac) > 1 else None)  # [n, (m of q in t_of[p]), i of p]
                if p == 0:
                    delta = d.detach()
            with torch.no_grad():
                acts = vmap(inputs)(x)
        except (RuntimeError, NotImplementedError) as exc:
            raise NotStructured(f"the second derivatives of the layer outputs failed ({type(exc).__name__})") from None
        n = b0 - a0
        aug = []
        for k, l in enumerate(layers):
            parts = [acts[:, ao[k] : ao[k] + l.d_in]] if l.weight is not None else []
            if l.bias is not None:
                parts.append(torch.ones(n, 1, dtype=dtype, device=device))
            aug.append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
        for p, lp in enumerate(layers):
            for q in range(p, L):
                lq = layers[q]
                ks = slice(eo[q] - eo[p], eo[q] - eo[p] + lq.d_out)
                cols = slice(eo[q], eo[q] + lq.d_out)
                if p == q:
                    iu, ku = upper[p]
                    Spq = S[p][:, ks][:, ku, iu]  # [n, pairs i ≤ k]
                else:
                    Spq = S[p][:, ks].transpose(1, 2).reshape(n, -1)  # [n, (i k)]
                Y = (aug[p][:, :, None] * aug[q][:, None, :]).reshape(n, -1)  # [n, (j̃ m̃)]
                _addmm(s_acc, (p, q), Spq.T, Y)
                if q in t_at[p]:
                    # the weight of q sees its input a_q change with ε_p
                    Tpq = T[p][:, t_at[p][q] : t_at[p][q] + lq.d_in]  # [n, m, i]
                    if diagonal[p][q]:
                        W = (Tpq.diagonal(dim1=1, dim2=2)[:, :, None] * aug[p][:, None, :]).reshape(n, -1)  # [n, (i j̃)]
                        _addmm(d_acc, (p, q), W.T, delta[:, cols])
                    else:
                        Z = (aug[p][:, :, None] * delta[:, None, cols]).reshape(n, -1)  # [n, (j̃ k)]
                        _addmm(t_acc, (p, q), Tpq.transpose(1, 2).reshape(n, -1).T, Z)
    out = torch.empty(space.size, space.size, dtype=dtype, device=device)
    if obj.lo >= obj.hi:  # a rank without samples still takes part in the all-reduce
        out.zero_()
    for (p, q), acc in s_acc.items():
        lp, lq = layers[p], layers[q]
        if p == q:  # the pairs i ≤ k, and i > k by symmetry: [i, k, j̃, m̃]
            acc = acc.reshape(-1, lp.width, lp.width)
            block = torch.empty(lp.d_out, lp.d_out, lp.width, lp.width, dtype=dtype, device=device)
            at = 0
            for i in range(lp.d_out):  # row i's pairs (i, k ≥ i) are contiguous (triu order): no scatter
                row = acc[at : at + lp.d_out - i]
                block[i, i:] = row
                block[i + 1 :, i] = row[1:].transpose(1, 2)
                at += lp.d_out - i
        else:
            block = acc.reshape(lp.d_out, lq.d_out, lp.width, lq.width)
            if (p, q) in t_acc:  # [i, m, j̃, k] into [i, k, j̃, m]
                block[..., : lq.d_in] += t_acc[(p, q)].reshape(lp.d_out, lq.d_in, lp.width, lq.d_out).permute(0, 3, 2, 1)
            if (p, q) in d_acc:  # [i, j̃, k] into the entries m = i of [i, k, j̃, m]: [k, j̃, i]
                block.diagonal(dim1=0, dim2=3).add_(d_acc[(p, q)].reshape(lp.d_out, lp.width, lq.d_out).permute(2, 1, 0))
        block = block.permute(0, 2, 1, 3)  # [i, j̃, k, m̃]
        for r0, rj, rt in _parts(space, lp):
            for c0, cj, ct in _parts(space, lq):
                sub = block[:, rj, :, cj]
                sub = sub.transpose(0, 1) if rt else sub
                sub = sub.transpose(2, 3) if ct else sub
                R = slice(r0, r0 + sub.shape[0] * sub.shape[1])
                C = slice(c0, c0 + sub.shape[2] * sub.shape[3])
                out[R, C].view(sub.shape).copy_(sub)
                if p != q:
                    out[C, R].view(sub.shape[2], sub.shape[3], sub.shape[0], sub.shape[1]).copy_(sub.permute(2, 3, 0, 1))
    all_reduce(out)
    _check(obj, out)
    return out


def _addmm(acc: dict, key, a: torch.Tensor, b: torch.Tensor) -> None:
    if key in acc:
        acc[key].addmm_(a, b)
    else:
        acc[key] = a @ b


def _parts(space, layer: Layer):
    """``(offset, columns of ã, flattened (j, i))`` of the layer's selected parameter tensors."""
    out = []
    if layer.weight is not None:
        out.append((space.infos[layer.weight].offset, slice(0, layer.d_in), layer.stored_t))
    if layer.bias is not None:
        out.append((space.infos[layer.bias].offset, slice(layer.width - 1, layer.width), False))
    return out


def _check(obj: Objective, H: torch.Tensor) -> None:
    """The assembled matrix against one Hessian-vector product of the generic path."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(H.shape[0], 1, generator=g, dtype=torch.float64).to(dtype=H.dtype, device=H.device)
    want = obj.matmat("hessian", v)[:, 0]
    got = H @ v[:, 0]
    # ‖Hv‖ ≈ ‖H‖_F for a Gaussian v: the error relative to it, and 0 for a zero matrix
    size = max(float(want.norm()), float(got.norm()))
    err = float((got - want).norm()) / size if size > 0 else 0.0
    tol = CHECK_TOL.get(H.dtype, 1e-3)
    if not err <= tol:
        raise NotStructured(f"the layer-wise matrix disagrees with a Hessian-vector product (relative error {err:.1e})")


def _one(x):
    if isinstance(x, Mapping):
        return {k: v[None] for k, v in x.items()}
    return x[None]
