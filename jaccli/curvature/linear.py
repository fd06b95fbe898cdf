"""Per-sample gradients of linear layers' parameters as outer products, from one batched backward.

For a layer ``z = x Wᵀ + b`` (weight ``[out, in]``, bias ``[out]``) sample ``n``'s own
gradient is ``δₙ xₙᵀ`` in ``W`` and ``δₙ`` in ``b``, with ``xₙ`` the layer's input row and
``δₙ = ∂ℓₙ/∂zₙ``. Where samples do not mix (what per-sample gradients assume anyway),
``∂(Σᵢ ℓᵢ)/∂zₙ = δₙ``, so ONE forward and backward of the summed loss over a chunk gives
every ``xₙ`` and ``δₙ`` of every layer, the loss and the gradient of the chunk at once, and
the rows are written as outer products straight into the ``[N, P]`` result; their squared
norms are ``‖δₙ‖²‖xₙ‖² (+ ‖δₙ‖²)`` per layer, without a pass over the rows. ``vmap(grad)``
instead runs the model once per sample, and its gradient kernels at batch size one.

Which parameters are linear weights and biases is read off the model's ops by
:mod:`.layers` (the rules the layer-wise Hessian uses too), recorded once on one sample (the
probe) and again in each chunk's pass (the layers' inputs and outputs of that pass). A weight
stored ``[in, out]`` (``x @ W``) gets its rows as ``xₙ δₙᵀ``. Any other parameter (a
convolution, a weight used twice, one used elsewhere too) gets its rows from ``vmap(grad)`` of
the model in those parameters alone; a model with no recognised layer, or whose samples mix
(one sample's output alone differs from its row in a batch), keeps
:class:`~.objective.Objective`'s ``vmap(grad)`` path whole.

Imports: torch, :mod:`.params`, :mod:`.layers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad, jacrev, vmap

from jaccli.curvature.layers import find_layers, Layer, LayerRecorder, mutated, value
from jaccli.curvature.params import take


class NotLinear(Exception):
    """The batched pass did not meet the layers the probe found (the caller falls back to ``vmap``)."""


@dataclass
class Chunk:
    """One chunk's rows ``[n, P]``, their squared norms ``[n]`` (float64), and the chunk's loss
    ``w Σ ℓᵢ`` and gradient ``[P]`` from the same backward."""

    rows: torch.Tensor
    sq_norms: torch.Tensor
    loss: torch.Tensor
    gradient: torch.Tensor


@dataclass
class Pass:
    """One chunk's batched forward (:meth:`LinearRows.recorded_pass`): the parameters it ran on
    (leaves requiring grad), its scaled loss with the graph, the layers holding a selected
    parameter (in op order, each once), each selected parameter's layer, and the rows the model
    was called with (more than the chunk's for a padded program)."""

    theta: tuple[torch.Tensor, ...]
    loss: torch.Tensor
    layers: list[Layer]
    where: dict[int, Layer]
    called: int


class LinearRows:
    """Per-sample gradient rows of an :class:`~.objective.Objective` by ``δₙ xₙᵀ`` for its
    linear layers' parameters and ``vmap(grad)`` for the rest."""

    def __init__(self, obj, weights: set[int], biases: set[int]) -> None:
        self.obj = obj
        self.weights, self.biases = weights, biases  # indices of the selected parameters
        fast = set(weights) | set(biases)
        self.rest = tuple(i for i in range(len(obj.space.values)) if i not in fast)
        self._vmap_ok = True
        k = len(fast)
        self.path = "linear" if not self.rest else "linear+vmap"
        self.note = (f"per-sample gradients of {k} of {k + len(self.rest)} parameter tensors as δxᵀ of their linear "
                     f"layers" + (f", of the other {len(self.rest)} by vmap(grad)" if self.rest else ""))  # fmt: skip

    @classmethod
    def detect(cls, obj) -> LinearRows | None:
        """The path for ``obj``'s model, or ``None`` where no selected parameter is a linear layer's."""
        space = obj.space
        rec = LayerRecorder(space.values)
        try:
            with torch.no_grad():
                with rec:
                    one = space.call(space.values, take(obj.args, 0, 1))
                many = space.call(space.values, take(obj.args, 0, min(obj.n, 4)))
        except Exception:  # noqa: BLE001 -- any failure only means the general path
            return None
        # a sample's output alone and in a batch must agree (up to the GEMMs' rounding): where
        # samples mix (x - x.mean(0), batch statistics) the batched backward is not the per-sample one
        tol = torch.finfo(one.dtype).eps ** 0.5
        if not torch.allclose(one, many[:1], rtol=tol, atol=tol * max(1.0, float(one.abs().max()))):
            return None
        # a parameter refused (or in a layer whose rows are not samples) takes vmap(grad)
        layers, _ = find_layers(rec.nodes, rec.params, space.names, rows=space.static_batch or 1)
        kept = [layer for layer in layers if not mutated(layer)]
        weights = {layer.weight for layer in kept if layer.weight is not None}
        biases = {layer.bias for layer in kept if layer.bias is not None}
        if not weights and not biases:
            return None
        return cls(obj, weights, biases)

    # ------------------------------------------------------------------ one chunk

    def recorded_pass(self, a: int, b: int, scale) -> Pass | None:
        """One batched forward of chunk ``[a, b)`` with its layers recorded, and its loss
        ``Σ ℓᵢ · scale`` with the graph (the rows' :meth:`chunk` and
        :func:`.layertrace.layer_trace` both start here); ``None`` where the pass does not meet
        the layers the probe found, or a layer holding a selected parameter was changed in
        place (:func:`.layers.mutated`: its ``z`` and ``δ`` are no longer that layer's).

        The edge case, decided: a layer changed in place that holds none of the parameters taken
        by ``δxᵀ`` does not refuse the pass — the rows read only those layers' ``x`` and ``δ``,
        and the parameters left to ``vmap(grad)`` (:attr:`rest`) take theirs from the model
        itself. For the trace this is the rule it always had, "any layer changed in place
        refuses": the recorder sees only the selected parameters (the others are constants of
        the call) and the trace applies only where none is left to ``vmap``
        (:func:`.layertrace.applies`), so every layer its pass finds holds one (in another role
        than the probe's, ``where`` comes out short: refused too). A first layer overwritten by
        ``relu_`` thus sends the trace to the parameter-space estimators where its parameters
        are selected (the probe leaves them to ``vmap``), and not where only the layers after
        it are (they read that tensor, unchanged since, as their input)."""
        obj, space = self.obj, self.obj.space
        theta = tuple(t.detach().requires_grad_() for t in space.values)
        rec = LayerRecorder(theta)
        with torch.enable_grad():
            with rec:
                z = space.call(theta, take(obj.args, a, b))
            loss = obj.loss.raw(z, obj.targets(a, b)).sum() * scale
        called = space.static_batch or b - a  # a program exported for one batch size runs on padded chunks
        # each recognised parameter's layer in this pass, by its role (the probe's op order is not relied on)
        layers, _ = find_layers(rec.nodes, rec.params, space.names, rows=called)
        where: dict[int, Layer] = {}
        mine: list[Layer] = []
        for layer in layers:
            held = [i for i, sel in ((layer.weight, self.weights), (layer.bias, self.biases)) if i in sel]
            if held:
                if mutated(layer):
                    return None
                mine.append(layer)
            where.update(dict.fromkeys(held, layer))
        if len(where) != len(self.weights) + len(self.biases):
            return None
        return Pass(theta, loss, mine, where, called)

    def chunk(self, a: int, b: int, out: torch.Tensor | None = None) -> Chunk:
        """Rows ``a:b`` (written into ``out``, contiguous ``[b - a, P]``, when given)."""
        obj, space = self.obj, self.obj.space
        n = b - a
        rows = torch.empty(n, space.size, dtype=space.dtype, device=space.device) if out is None else out
        got = self.recorded_pass(a, b, obj.norm)
        if got is None:
            raise NotLinear
        theta, total, where = got.theta, got.loss, got.where
        xs = {i: value(where[i].input)[:n].detach() for i in self.weights}
        zs = [value(layer.node) for layer in got.layers]
        grads = torch.autograd.grad(total, [*zs, *theta], allow_unused=True, materialize_grads=True)
        deltas = {id(z): d[:n].detach() for z, d in zip(zs, grads[: len(zs)])}
        gradient = space.flat(grads[len(zs) :]).detach() * obj.weight
        sq = torch.zeros(n, dtype=torch.float64, device=space.device)
        for i in self.weights:
            info, x, d = space.infos[i], xs[i], deltas[id(value(where[i].node))]
            view = rows[:, info.offset : info.offset + info.size].view(n, *info.shape)
            if where[i].stored_t:  # W stored [in, out]: its rows are x δᵀ
                torch.mul(x[:, :, None], d[:, None, :], out=view)
            else:
                torch.mul(d[:, :, None], x[:, None, :], out=view)
            sq += d.double().pow(2).sum(1) * x.double().pow(2).sum(1)
        for i in self.biases:
            info, d = space.infos[i], deltas[id(value(where[i].node))]
            rows[:, info.offset : info.offset + info.size] = d
            sq += d.double().pow(2).sum(1)
        if self.rest:
            for i, piece in zip(self.rest, self._rest_rows(a, b)):
                info = space.infos[i]
                part = rows[:, info.offset : info.offset + info.size]
                part.copy_(piece.reshape(n, -1))
                sq += part.double().pow(2).sum(1)
        return Chunk(rows, sq, total.detach() * obj.weight, gradient)

    def _rest_rows(self, a: int, b: int):
        """Per-sample gradients of the parameters outside linear layers, one tensor each ``[b - a, *shape]``."""
        obj, space = self.obj, self.obj.space
        theta, rest = space.values, self.rest

        def full(sub):
            th = list(theta)
            for i, t in zip(rest, sub):
                th[i] = t
            return th

        sub = tuple(theta[i] for i in rest)
        if self._vmap_ok and space.static_batch is None:
            x, y = take(obj.args, a, b), obj.targets(a, b)

            def one(s, xi, yi):
                z = space.call(full(s), {k: v[None] for k, v in xi.items()} if isinstance(xi, dict) else xi[None])
                return obj.loss.raw(z, None if yi is None else yi[None])[0] * obj.norm

            try:
                return [t.detach() for t in vmap(grad(one), in_dims=(None, 0, None if y is None else 0))(sub, x, y)]
            except (RuntimeError, NotImplementedError):
                self._vmap_ok = False  # the chunk's losses by jacrev instead: samples do not mix
        return [t.detach() for t in jacrev(lambda s: obj.sample_losses(full(s), a, b))(sub)]
