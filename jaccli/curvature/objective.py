"""The training objective over a data set, and its curvature products, chunk by chunk.

:class:`Objective` holds a :class:`~.params.ParamSpace`, a loss row, the inputs and
targets; its loss is ``L(θ) = w Σᵢ ℓᵢ(θ)`` with ``ℓᵢ`` sample ``i``'s own loss (its
``raw`` loss, divided by its number of elements for ``mse``/``bce`` under ``mean``) and
``w = 1/N`` (``mean``) or ``1`` (``sum``). Every product runs over chunks of samples and
accumulates, so memory is flat in ``N``; under ``torch.distributed`` each rank takes a
contiguous shard of the samples and the sums are all-reduced, so every rank holds the
single-process result.

The gradient and the products, for a block of directions ``V`` ``[P, k]``:

* the gradient: one ``torch.autograd.grad`` per chunk;
* ``hessian``: reverse-over-reverse as PyHessian does it: the gradient of each chunk ``c`` with
  its graph (``create_graph``, built once by the gradient's pass and kept; one chunk per rank
  where the graphs fit), then a backward of the scalar ``∇L_c · v`` per column (``v`` a
  contiguous row of ``Vᵀ``), or the block's columns in one batched backward
  (``is_grads_batched``) where the chunk is small;
* ``ggn``: ``Jᵀ (w H_L) J V``: ``jvp`` of the model (forward mode, :mod:`torch.func`), the loss
  row's output-space product, one batched backward through the model's graph;
* ``ef``: ``Σᵢ gᵢ gᵢᵀ V / N`` from the chunk's per-sample gradients (δxᵀ for linear layers, ``vmap(grad)`` otherwise).

The assembled Hessian (``--full``), a small Hessian from these products and the exact GGN/EF
diagonals are :mod:`.assembled`'s (layer by layer by :mod:`.structured` where the parameters sit
in linear layers).

A model ``vmap`` cannot batch (an op without a batching rule) falls back to one column
(or one sample, by ``jacrev`` of the chunk's losses) at a time, with the same results.

Why plain ``torch.autograd`` for the gradient and the products: :mod:`torch.func`'s reverse
mode (``grad``, ``vjp``, ``jacrev``) imports ``torch._dynamo`` (with sympy, ~1.4 s of CPU) on
its first backward, which a PyHessian script never pays; the same products by
``torch.autograd.grad`` cost the same or less (docs/curvature.md, "Whole process").
:mod:`torch.func` stays where only it does the job: ``vmap(grad)`` per-sample rows of
non-linear parameters, ``jacrev`` fallbacks, ``jvp``, and the assembled Hessian.

Imports: torch, :mod:`.linear`, :mod:`.params`, :mod:`.losses`, :mod:`.runtime` (ranks, activation bytes),
:mod:`jaccli.engine.memory` (the memory budget), :mod:`jaccli.errors`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.func import grad, jacrev, vmap

from jaccli.curvature.linear import LinearRows, NotLinear
from jaccli.curvature.losses import Loss, get_loss
from jaccli.curvature.params import ParamSpace, _rows, take
from jaccli.curvature.runtime import _Bytes, all_reduce, dist_info
from jaccli.engine.memory import working_budget
from jaccli.engine.strategies import jvp
from jaccli.errors import first_line, InputError, ModelError, NumericalError, shape_str, UsageError

#: the most directions one pass carries, by device type: ``vmap`` over columns multiplies the
#: activations, and on a CPU blocks past a few dozen columns leave the caches (measured: the
#: Hessian products of a 7k-parameter MLP on 1024 points cost 4.7 ms a column in blocks of 32,
#: 8.9 ms in blocks of 128, on one core); a GPU wants wide blocks
MAX_COLUMNS = {"cpu": 32, "cuda": 256}
#: the most unit vectors one pass of :func:`.assembled.dense_hessian` carries: forward-over-reverse
#: keeps no graph per column, and wider blocks pay (measured on one core, a 6.2k-parameter MLP on
#: 256 points: 128 columns a pass 2.7 s for the whole matrix, 32 a pass 3.3 s, 512 a pass 4.8 s)
DENSE_COLUMNS = {"cpu": 128, "cuda": 1024}
#: samples the model is probed on for its activation bytes per sample
PROBE_SAMPLES = 8
#: a chunk's activation bytes below which a block of Hessian products runs as one batched
#: backward (``is_grads_batched``), above which one backward per column: batching saves the
#: per-call overhead on small chunks, but its batched GEMMs copy their operands (measured on
#: one core, a 4.9k-parameter MLP, blocks of 32: 128 points 0.22 ms a column batched, 0.48 ms
#: a backward each; 1024 points 3.3 ms batched, 2.0 ms each)
BATCHED_BACKWARD_BYTES = 1 << 20


class Objective:
    """``L(θ) = w Σᵢ ℓᵢ(θ)`` over ``args`` (and ``target``) with the products of its curvature."""

    def __init__(self, space: ParamSpace, loss: Loss, args, target: torch.Tensor | None, *,
                 reduction: str | None = None, chunk_size: int | None = None, target_name: str = "target") -> None:  # fmt: skip
        self.space, self.loss = space, loss
        self.reduction = reduction or loss.default_reduction
        if self.reduction not in ("mean", "sum"):
            raise UsageError("unknown reduction", expected="mean or sum", got=self.reduction)
        self.args = args
        self.n = _rows(args)
        if self.n == 0:
            raise InputError("the input holds no samples", expected="at least one row")
        if loss.needs_target and target is None:
            raise UsageError(f"--loss {loss.name} needs a target", hint="pass --target FILE")
        if target is not None and (target.dim() == 0 or target.shape[0] != self.n):
            raise InputError("the target has another number of samples than the input", where=target_name,
                             expected=f"{self.n} rows", got=shape_str(target.shape))  # fmt: skip
        self.world, self.rank = dist_info()
        self.lo, self.hi = self.n * self.rank // self.world, self.n * (self.rank + 1) // self.world
        theta = space.values
        # one call on a few samples: the output's shape, and the activation bytes per sample
        probe = min(self.n, space.static_batch or PROBE_SAMPLES)
        counter = _Bytes()
        with torch.no_grad():
            try:
                with counter:
                    out0 = space.call(theta, take(args, 0, probe))
            except (InputError, ModelError, UsageError):
                raise
            except Exception as exc:
                raise ModelError(f"the model fails on the input: {first_line(exc)}", where=space.where) from None
        if not isinstance(out0, torch.Tensor) or out0.dim() == 0 or out0.shape[0] != probe:
            raise ModelError("axis 0 of the model's output must hold the samples", where=space.where,
                             expected=f"{probe} rows for {probe} samples",
                             got=shape_str(getattr(out0, "shape", ())))  # fmt: skip
        if not out0.is_floating_point():
            raise ModelError("the model's output is not floating point", where=space.where, got=str(out0.dtype))
        self.act_bytes = counter.bytes / max(space.static_batch or probe, 1)
        self.graph_bytes = counter.fresh / max(space.static_batch or probe, 1)  # per sample, views left out
        item = space.values[0].element_size()
        budget = working_budget(space.device)
        #: the caller's ``--chunk-size`` (None: chosen here); the layer-wise Hessian sizes its own chunks below it
        self.chunk_size = chunk_size
        if space.static_batch is not None:
            self.chunk = space.static_batch
        elif chunk_size is not None:
            if chunk_size < 1:
                raise UsageError("--chunk-size must be positive", got=chunk_size)
            self.chunk = int(chunk_size)
        else:  # a per-sample gradient row and the activations behind it, a few times over
            per_sample = 4 * space.size * item + 4 * self.act_bytes
            self.chunk = int(max(1, min(1024, budget // max(per_sample, 1))))
        # directions per pass: vmap carries the chunk's activations and a gradient per direction
        per_column = 3 * min(self.chunk, self.n) * self.act_bytes + 3 * space.size * item
        most = MAX_COLUMNS.get(space.device.type, MAX_COLUMNS["cpu"])
        self.columns = int(max(1, min(most, (budget // 2) // max(per_column, 1))))
        most = DENSE_COLUMNS.get(space.device.type, DENSE_COLUMNS["cpu"])
        self.dense_columns = int(max(1, min(most, (budget // 2) // max(per_column, 1))))
        self.out_shape = tuple(out0.shape[1:])
        full = out0[:1].expand(self.n, *out0.shape[1:])
        self.target = loss.check(full, None if target is None else target.to(out0.device), target_name)
        elements = math.prod(self.out_shape) if loss.per_element else 1
        self.norm = 1.0 / elements if self.reduction == "mean" else 1.0
        self.weight = 1.0 / self.n if self.reduction == "mean" else 1.0
        self.products = 0  # curvature-vector products so far (each a pass over the data)
        self._vmap_ok = True
        self._batched_ok = True  # is_grads_batched works on this model's backward
        self._grad_cache: dict | bool | None = None
        self._rows_cache: tuple | None = None  # the last block of directions as rows (see _rows_of)
        # the gradient's graph per chunk (its backward is the Hessian's product), kept between
        # products while it fits, as PyHessian keeps its one graph: a product then costs one
        # backward pass instead of a forward, a backward and a backward of that
        self._graphs: dict | bool | None = None
        self._linear: LinearRows | bool | None = None
        #: how the last per-sample gradients were computed: linear (δxᵀ), linear+vmap, vmap or jacrev
        self.per_sample_path: str | None = None
        #: why :func:`.assembled.dense_hessian` took the generic path instead of :mod:`.structured` (None: it did not)
        self.dense_note: str | None = None

    # ------------------------------------------------------------------ chunks

    def chunks(self, size: int | None = None) -> Iterator[tuple[int, int]]:
        """This rank's chunks of samples (of ``size``, by default :attr:`chunk`)."""
        step = size or self.chunk
        for a in range(self.lo, self.hi, step):
            yield a, min(a + step, self.hi)

    def _graph_chunk(self) -> int:
        """Samples per kept Hessian graph: the rank's whole shard where the graphs fit and no
        ``--chunk-size`` was given (each chunk's product pays parameter-sized work), else :attr:`chunk`."""
        if self.chunk_size is None and self.space.static_batch is None and self._keeps_graphs():
            return max(self.hi - self.lo, 1)
        return self.chunk

    def targets(self, a: int, b: int):
        """The targets of points ``a:b`` (None for a loss without targets)."""
        return None if self.target is None else self.target[a:b]

    def loss_sqrt(self, a: int, b: int) -> torch.Tensor:
        """A factor ``S`` ``[b - a, C, K]`` of the loss Hessian at the model's outputs on
        points ``a:b`` (:class:`~.losses.Loss` ``sqrt``): the GGN is ``Σ Jᵀ S Sᵀ J``."""
        with torch.no_grad():
            out = self.space.call(self.space.values, take(self.args, a, b))
        return self.loss.sqrt(out, self.targets(a, b))

    def chunk_loss(self, theta, a: int, b: int) -> torch.Tensor:
        """``w Σ_{i∈[a,b)} ℓᵢ(θ)``."""
        out = self.space.call(theta, take(self.args, a, b))
        return self.loss.raw(out, self.targets(a, b)).sum() * (self.norm * self.weight)

    def sample_losses(self, theta, a: int, b: int) -> torch.Tensor:
        """``ℓᵢ(θ)`` for ``i`` in ``[a, b)``, ``[b - a]``."""
        return self.loss.raw(self.space.call(theta, take(self.args, a, b)), self.targets(a, b)) * self.norm

    # ------------------------------------------------------------------ loss and gradient

    def value_and_grad(self, *, keep_hessian_graphs: bool = False) -> tuple[float, torch.Tensor]:
        """``L(θ)`` and ``∇L(θ)`` ``[P]`` (all ranks' sums); ``keep_hessian_graphs``: the gradient
        taken with its graph, kept for the Hessian's products that follow (:meth:`_graph`)."""
        total = torch.zeros(self.space.size + 1, dtype=self.space.dtype, device=self.space.device)
        for a, b in self.chunks(self._graph_chunk() if keep_hessian_graphs else None):
            if keep_hessian_graphs and self._keeps_graphs():
                v, grads, (theta, _, _) = self._graph(a, b)
                g = self.space.flat([torch.zeros_like(t) if d is None else d for d, t in zip(grads, theta)])
            else:
                theta = self._leaves()
                with torch.enable_grad():
                    v = self.chunk_loss(theta, a, b)
                g = self.space.flat(torch.autograd.grad(v, theta, allow_unused=True, materialize_grads=True))
            total[0] += v.detach()
            total[1:] += g.detach()
        all_reduce(total)
        value = float(total[0])
        if not math.isfinite(value):
            raise NumericalError("the loss is not finite", where=self.space.where, got=value,
                                 hint="check the model, the input and the target for NaN, Inf or extreme values")  # fmt: skip
        return value, total[1:]

    def _leaves(self) -> tuple[torch.Tensor, ...]:
        """The parameters as fresh leaves that require grad (``torch.autograd`` differentiates in them)."""
        return tuple(t.detach().requires_grad_() for t in self.space.values)

    def per_sample_grads(self, a: int, b: int, *, losses: bool = False, out: torch.Tensor | None = None):
        """``∇ℓᵢ(θ)`` for ``i`` in ``[a, b)`` as rows ``[b - a, P]`` (and ``ℓᵢ`` with ``losses``).

        ``out`` (contiguous ``[b - a, P]``, the rows' dtype): the rows are written there, as the
        one concatenation of the parameters' pieces (no further copy), and returned. Linear layers'
        parameters take :mod:`.linear`'s path (one batched backward), the rest ``vmap(grad)``."""
        fast = None if losses else self.linear_rows()
        if fast is not None:
            try:
                return fast.chunk(a, b, out).rows
            except NotLinear:
                self._linear = False
        theta = self.space.values
        self.per_sample_path = "vmap" if self._vmap_ok and self.space.static_batch is None else "jacrev"
        if self._vmap_ok and self.space.static_batch is None:
            x, y = take(self.args, a, b), self.targets(a, b)

            def one(th, xi, yi):
                out = self.space.call(th, _unsqueeze(xi))
                value = self.loss.raw(out, None if yi is None else yi[None])[0] * self.norm
                return value, value

            try:
                g, ls = vmap(grad(one, has_aux=True), in_dims=(None, 0, None if y is None else 0))(theta, x, y)
                G = _cat_rows(g, b - a, out)
                return (G, ls.detach()) if losses else G
            except (RuntimeError, NotImplementedError):
                self._vmap_ok = False  # the chunk's losses by jacrev instead: samples do not mix
                self.per_sample_path = "jacrev"
        jac, ls = jacrev(lambda th: (lambda v: (v, v))(self.sample_losses(th, a, b)), has_aux=True)(theta)
        G = _cat_rows(jac, b - a, out)
        return (G, ls.detach()) if losses else G

    def linear_rows(self) -> LinearRows | None:
        """The δxᵀ path for this model's linear layers (:mod:`.linear`), ``None`` where it has none."""
        if self._linear is None:
            self._linear = LinearRows.detect(self) or False
        if self._linear:
            self.per_sample_path = self._linear.path
        return self._linear or None

    def per_sample_jacobians(self, a: int, b: int) -> torch.Tensor:
        """``∂fᵢ/∂θ`` ``[b - a, C, P]`` (C the output's elements per sample)."""
        theta = self.space.values
        c = math.prod(self.out_shape)
        if self._vmap_ok and self.space.static_batch is None:
            try:
                jac = vmap(jacrev(lambda th, xi: self.space.call(th, _unsqueeze(xi)).reshape(-1)),
                           in_dims=(None, 0))(theta, take(self.args, a, b))  # fmt: skip
                return torch.cat([t.reshape(b - a, c, -1) for t in jac], dim=2)
            except (RuntimeError, NotImplementedError):
                self._vmap_ok = False
        jac = jacrev(lambda th: self.space.call(th, take(self.args, a, b)).reshape(b - a, -1))(theta)
        return torch.cat([t.reshape(b - a, c, -1) for t in jac], dim=2)

    # ------------------------------------------------------------------ curvature products

    def matmat(self, matrix: str, V: torch.Tensor) -> torch.Tensor:
        """``M V`` for ``M`` the ``matrix`` (hessian, ggn, ef) and ``V`` ``[P, k]``."""
        PRODUCTS[matrix]  # noqa: B018 -- an unknown name fails before any work
        V = V.to(self.space.dtype)
        # each direction's product as a contiguous row (returned transposed, a [P, k] view): the
        # products come as rows, and adding them into columns of a [P, k] tensor cost 5 % of a trace
        rows = torch.empty(V.shape[1], self.space.size, dtype=V.dtype, device=V.device)
        k = self.columns
        for j in range(0, V.shape[1], k):
            block, dst, first = V[:, j : j + k], rows[j : j + k], True
            for a, b in self.chunks(self._graph_chunk() if matrix == "hessian" else None):
                part = PRODUCTS[matrix](self, block, a, b).T
                dst.copy_(part) if first else dst.add_(part)  # the first chunk's sets: no zero-filling pass
                first = False
            if first:  # this rank holds no samples: its share of the sum is zero
                dst.zero_()
        self.products += V.shape[1]
        self._rows_cache = None
        return all_reduce(rows).T

    def _keeps_graphs(self) -> bool:
        """Whether this rank's gradients' graphs fit in a quarter of the memory budget (then kept)."""
        if self._graphs is None:
            share = 6 * (self.hi - self.lo) * self.graph_bytes + 4 * self.space.size * self.space.values[0].element_size()
            self._graphs = {} if share <= working_budget(self.space.device) // 4 else False
        return self._graphs is not False

    def _graph(self, a: int, b: int) -> tuple[torch.Tensor, tuple, tuple]:
        """Chunk ``[a, b)``'s loss, its gradient per tensor (``None`` where a tensor has none) and the
        gradient's graph (``create_graph``): ``(θ leaves, flat live gradient, live tensors)``,
        kept for :meth:`_hvp` where it fits."""
        theta = self._leaves()
        with torch.enable_grad():
            v = self.chunk_loss(theta, a, b)
            g = torch.autograd.grad(v, theta, create_graph=True, allow_unused=True)
            # a gradient that is None or constant in θ (a loss linear in that tensor) adds nothing to H v
            live = [i for i, t in enumerate(g) if t is not None and t.requires_grad]
            # one flat output, so that a column's cotangent is one contiguous row of Vᵀ
            flat_g = torch.cat([g[i].reshape(-1) for i in live]) if live else None
        graph = (theta, flat_g, live)
        if self._keeps_graphs():
            self._graphs[(a, b)] = graph
        return v, g, graph

    def _hvp(self, V: torch.Tensor, a: int, b: int) -> torch.Tensor:
        # reverse over reverse, as PyHessian: the chunk's gradient with its graph, built once and
        # kept; H is symmetric, so the backward of ∇L_c · v through that graph is H_c v
        graph = self._graphs.get((a, b)) if self._keeps_graphs() else None
        theta, flat_g, live = graph if graph is not None else self._graph(a, b)[2]
        if flat_g is None:
            return self._backward([], theta, [], V.shape[1], b - a)
        return self._backward([flat_g], theta, [self._rows_of(V, live)], V.shape[1], b - a)

    def _rows_of(self, V: torch.Tensor, live: list[int]) -> torch.Tensor:
        """The block ``V`` ``[P, k]`` as contiguous rows ``[k, P_live]`` (the ``live`` tensors'
        entries), once per block: strided cotangents made every backward copy its operands
        (one core, P = 77k, 1024 points: 12.7 ms a backward, 11.2 ms with contiguous rows)."""
        # the same block object for every chunk of one pass (kept alive by the cache, so `is` is safe)
        if self._rows_cache is not None and self._rows_cache[0] is V and self._rows_cache[1] == live:
            return self._rows_cache[2]
        infos = self.space.infos
        if len(live) == len(infos):
            rows = V.T.contiguous()
        else:
            rows = torch.cat([V[infos[i].offset : infos[i].offset + infos[i].size] for i in live]).T.contiguous()
        self._rows_cache = (V, list(live), rows)
        return rows

    def _ggn(self, V: torch.Tensor, a: int, b: int) -> torch.Tensor:
        values, x, y = self.space.values, take(self.args, a, b), self.targets(a, b)
        theta = self._leaves()
        with torch.enable_grad():
            out = self.space.call(theta, x)
        f = lambda th: self.space.call(th, x)  # noqa: E731
        scale = self.norm * self.weight
        held = out.detach()

        def one(v):  # w H_L J v, the cotangent whose backward through the model is the product
            u = jvp(f, (values,), (self.space.split(v),))[1]
            return self.loss.hvp(held, y, u) * scale

        k = V.shape[1]
        if self._vmap_ok and k > 1:
            try:
                return self._backward([out], theta, [vmap(one, in_dims=1)(V)], k, b - a)
            except (RuntimeError, NotImplementedError):
                self._vmap_ok = False
        return self._backward([out], theta, [torch.stack([one(V[:, j]) for j in range(k)])], k, b - a)

    def _backward(self, outputs, theta, cots, k: int, rows: int) -> torch.Tensor:
        """``Σₒ cotsₒ[j] · ∂outputsₒ/∂θ`` for each ``j < k``, as flat columns ``[P, k]``, through
        a kept graph: one batched backward where the chunk of ``rows`` samples is small (see
        :data:`BATCHED_BACKWARD_BYTES`), else one backward per column, from the scalar
        ``Σₒ cotsₒ[j] · outputsₒ``: tensor ``grad_outputs`` would make torch import sympy
        (``symbolic_shapes``, ≈0.35 s of a fresh process)."""
        space = self.space
        if not outputs:
            return torch.zeros(space.size, k, dtype=space.dtype, device=space.device)

        def flat(got, lead, out=None):
            return torch.cat([(torch.zeros(*lead, t.numel(), dtype=space.dtype, device=space.device) if g is None
                               else g.reshape(*lead, -1)) for g, t in zip(got, theta)], dim=-1, out=out)  # fmt: skip

        if k > 1 and self._batched_ok and rows * self.act_bytes <= BATCHED_BACKWARD_BYTES:
            try:
                with warnings.catch_warnings():  # an op without a batching rule loops inside, correctly
                    warnings.filterwarnings("ignore", message="There is a performance drop")
                    got = torch.autograd.grad(outputs, theta, cots, retain_graph=True, allow_unused=True,
                                              is_grads_batched=True)  # fmt: skip
                return flat(got, (k,)).T
            except (RuntimeError, NotImplementedError):
                self._batched_ok = False
        out = torch.empty(k, space.size, dtype=space.dtype, device=space.device)
        for j in range(k):
            with torch.enable_grad():
                scalar = sum(torch.dot(o.reshape(-1), c[j].reshape(-1)) for o, c in zip(outputs, cots))
            flat(torch.autograd.grad(scalar, theta, retain_graph=True, allow_unused=True), (), out=out[j])
        return out.T

    def _ef(self, V: torch.Tensor, a: int, b: int) -> torch.Tensor:
        G = self.kept_grads(a, b)
        return ((G @ V).T @ G).T / self.n  # the product's rows contiguous, as matmat adds them

    def kept_grads(self, a: int, b: int) -> torch.Tensor:
        """Per-sample gradients ``[b - a, P]`` of points ``a:b``, kept between products when
        they fit: while this rank's share of ``[N, P]`` fits in a quarter of the working
        budget (else recomputed each time)."""
        if self._grad_cache is None:
            share = (self.hi - self.lo) * self.space.size * self.space.values[0].element_size()
            self._grad_cache = {} if share <= working_budget(self.space.device) // 4 else False
        if self._grad_cache is False:
            return self.per_sample_grads(a, b)
        if (a, b) not in self._grad_cache:
            self._grad_cache[(a, b)] = self.per_sample_grads(a, b).detach()
        return self._grad_cache[(a, b)]


def build_objective(model, inputs, target, *, loss: str, reduction: str | None, params: str | None,
                    chunk_size: int | None, output, names: str | None = None) -> Objective:
    """The :class:`Objective` of a public call: the parameters, the loss row by name, the data."""
    space = ParamSpace(model, params, output=output)
    return Objective(space, get_loss(loss), inputs, target, reduction=reduction, chunk_size=chunk_size,
                     target_name=names or "target")  # fmt: skip


def _cat_rows(pieces, rows: int, out: torch.Tensor | None) -> torch.Tensor:
    """The per-parameter pieces ``[rows, *shape]`` side by side as ``[rows, P]`` (into ``out``)."""
    flat = [t.detach().reshape(rows, -1) for t in pieces]
    return torch.cat(flat, dim=1) if out is None else torch.cat(flat, dim=1, out=out)


def _unsqueeze(x):
    if isinstance(x, dict):
        return {k: v[None] for k, v in x.items()}
    return x[None]


#: matrix name -> its product with a block of directions on one chunk of samples
PRODUCTS: dict[str, Callable[[Objective, torch.Tensor, int, int], torch.Tensor]] = {
    "hessian": Objective._hvp,
    "ggn": Objective._ggn,
    "ef": Objective._ef,
}
