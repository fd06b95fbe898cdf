"""The linear layers of a model: which selected parameters are a layer's weight or bias.

One set of rules, read off a graph of the model's aten ops, serves both paths that need the
layers: :mod:`.structured` (the layer-wise full Hessian, on the graph
:func:`torch.fx.experimental.proxy_tensor.make_fx` records at one sample, which it replays
with the layer outputs perturbed) and :mod:`.linear` (per-sample gradients as ``δxᵀ``, on the
graph :class:`LayerRecorder` builds while the model runs eagerly on a chunk, so that the
layers' very input and output tensors of that pass are at hand for its backward; TorchScript,
``.pt2`` programs and ``nn.Module``\\ s look alike to a dispatch mode). Both graphs offer what
:func:`find_layers` reads: each node's ``target``, ``args``, ``kwargs``, ``users`` and
``meta["val"]``.

A layer is an ``aten.mm``/``aten.addmm`` whose second matrix is a selected 2-d weight,
transposed (``aten.t``, or a 2-d ``transpose``/``permute``: ``x @ W.T``, as ``nn.Linear``) or
plain (``x @ W``, the weight stored ``[in, out]``), with a selected 1-d bias as ``addmm``'s
added term or added to such a product (``x @ W.T + b``), on one row per sample. A selected
parameter used in any other way (a convolution, used twice, a sequence axis folded into the
rows) is refused with the reason; the caller decides what a refusal means (the structured
Hessian falls back whole, the per-sample rows take ``vmap(grad)`` for that parameter).

Imports: torch, :mod:`jaccli.jets.dispatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

from jaccli.jets.dispatch import QuietDispatchMode

aten = torch.ops.aten
MM, ADDMM, ADD = aten.mm.default, aten.addmm.default, aten.add.Tensor
#: ops that give a 2-D parameter's transpose (``F.linear`` lowers to ``t``; exported programs may hold ``permute``)
TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}


@dataclass
class Layer:
    """One linear layer: its output node (the product, or the sum with its bias), its input,
    the product's node, and the selected weight and bias (indices among the parameters)."""

    node: Any
    input: Any
    d_out: int
    d_in: int
    weight: int | None = None
    bias: int | None = None
    #: the weight is stored ``[d_in, d_out]`` and multiplied as ``a @ W`` (flattened ``(j, i)``)
    stored_t: bool = False
    product: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.product = self.node

    @property
    def width(self) -> int:
        """Columns of the augmented input ``ã``: the input where the weight is selected, 1 for a bias."""
        return (self.d_in if self.weight is not None else 0) + (1 if self.bias is not None else 0)


class Node:
    """One recorded op of :class:`LayerRecorder` (the part of :class:`torch.fx.Node` that
    :func:`find_layers` reads); ``meta["val"]`` is the op's output tensor itself."""

    __slots__ = ("target", "args", "kwargs", "users", "meta")

    def __init__(self, target, args, kwargs, val) -> None:
        self.target, self.args, self.kwargs = target, args, kwargs
        self.users: dict[Node, None] = {}
        self.meta = {"val": val, "version": val._version if isinstance(val, torch.Tensor) else None}


def is_node(a) -> bool:
    return isinstance(a, (torch.fx.Node, Node))


def value(a):
    """The tensor a node stands for (a recorded tensor is its own value)."""
    return a.meta.get("val") if is_node(a) else a


def shape(a) -> tuple[int, ...] | None:
    val = value(a)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


class LayerRecorder(QuietDispatchMode):
    """Records, while the model runs, the ops that read the parameters ``params`` (told by
    identity: ``functional_call`` or TorchScript's swapped attributes hand the very tensors in
    to the ops), and the ops that read what those ops, and theirs, return: enough of the graph
    for :func:`find_layers` (a parameter's users, its transpose's, the product's) without
    keeping the model's other intermediates alive. ``params``: the parameters' nodes;
    ``nodes``: the recorded ops in order."""

    #: how far from a parameter an op's output is followed (parameter → transpose → product)
    DEPTH = 2

    def __init__(self, params) -> None:
        super().__init__()
        self.params = [Node(None, (), {}, t) for t in params]
        self.nodes: list[Node] = []
        self._known = {id(t): (n, 0) for t, n in zip(params, self.params)}  # id → (node, depth)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is aten.detach.default:
            return out  # autograd saving a tensor for backward; a detached copy carries no gradient
        known = self._known
        read = [known[id(t)] for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and id(t) in known]
        if not read:
            return out
        a, k = tree_map(lambda t: known[id(t)][0] if isinstance(t, torch.Tensor) and id(t) in known else t, (args, kwargs))
        node = Node(func, a, k, out)
        if func in (MM, ADDMM):  # the input's version now: an in-place op on it later shows
            node.meta["input_version"] = args[-2]._version
        for src, _ in read:
            src.users[node] = None
        self.nodes.append(node)
        depth = min(d for _, d in read) + 1
        if depth <= self.DEPTH and isinstance(out, torch.Tensor) and id(out) not in known:
            known[id(out)] = (node, depth)
        return out


def mutated(layer: Layer) -> bool:
    """Whether the layer's input or output was changed in place after the layer
    (``ReLU(inplace=True)``): then ``z`` no longer holds the layer's output, nor its gradient the
    layer's ``δ`` (the versions compared are the ones :class:`LayerRecorder` noted)."""
    return (value(layer.input)._version != layer.product.meta["input_version"]
            or value(layer.node)._version != layer.node.meta["version"])  # fmt: skip


def find_layers(nodes, params, names: tuple[str, ...], rows: int = 1) -> tuple[list[Layer], list[str]]:
    """The linear layers the parameters ``params`` (nodes, named ``names``) feed, in the order of
    ``nodes``, and the reasons the others were refused (in the order found: parameters first).

    ``rows``: the rows a layer's input has per call (1: one sample; more: a padded program)."""
    layers: dict[Any, Layer] = {}
    refused: list[str] = []
    out_of: set[int] = set()

    def refuse(i, why):
        refused.append(f"parameter {names[i]} {why}; only linear layers are recognised")
        out_of.add(i)

    biases = []
    for i, node in enumerate(params):
        users = list(node.users)
        if len(users) != 1:
            refuse(i, f"is used {len(users)} times")
            continue
        use = users[0]
        size = shape(node)
        if use.target in TRANSPOSES and size is not None and len(size) == 2:  # x @ W.T (nn.Linear)
            if use.target == aten.permute.default and list(use.args[1]) not in ([1, 0], [-1, -2]):
                refuse(i, "is permuted")
            elif use.target == aten.transpose.int and sorted(a % 2 for a in use.args[1:]) != [0, 1]:
                refuse(i, "is transposed oddly")
            elif len(use.users) != 1:
                refuse(i, "is used after its transpose more than once")
            else:
                mm = next(iter(use.users))
                pos = {MM: 1, ADDMM: 2}.get(mm.target)
                if pos is None or mm.args[pos] is not use or mm.kwargs:
                    refuse(i, f"feeds {mm.target}")
                else:
                    layer = layers.setdefault(mm, Layer(mm, mm.args[pos - 1], size[0], size[1]))
                    layer.weight = i
        elif use.target in (MM, ADDMM) and use.args[-1] is node and not use.kwargs and size is not None \
                and len(size) == 2:  # x @ W  # fmt: skip
            layer = layers.setdefault(use, Layer(use, use.args[-2], size[1], size[0]))
            layer.weight, layer.stored_t = i, True
        elif use.target == ADDMM and use.args[0] is node and not use.kwargs and size is not None and len(size) == 1:
            w = shape(use.args[2])
            if w is None or len(w) != 2:
                refuse(i, "is the bias of an unrecognised product")
            elif size[0] != w[1]:
                refuse(i, "is broadcast over its layer's outputs")
            else:
                layer = layers.setdefault(use, Layer(use, use.args[1], w[1], w[0]))
                layer.bias = i
        elif use.target == ADD and not use.kwargs and size is not None and len(size) == 1:  # x @ W.T + b
            biases.append((i, use))
        else:
            refuse(i, f"feeds {getattr(use.target, '__name__', use.target)}")
    for i, add in biases:  # after the weights: the product it is added to may be theirs
        mm = next((a for a in add.args if is_node(a) and a is not params[i]), None)
        w = shape(mm.args[1]) if mm is not None and mm.target == MM and len(mm.users) == 1 else None
        if w is None or len(w) != 2:
            refuse(i, "is added to something other than a matrix product")
        elif shape(params[i])[0] != w[1]:
            refuse(i, "is broadcast over its layer's outputs")
        else:
            layer = layers.setdefault(mm, Layer(mm, mm.args[0], w[1], w[0]))
            layer.bias, layer.node = i, add  # the layer's output is the sum
    order = {n: k for k, n in enumerate(nodes)}
    found = []
    for layer in sorted(layers.values(), key=lambda l: order[l.node]):
        if shape(layer.input) != (rows, layer.d_in) or shape(layer.node) != (rows, layer.d_out):
            refused.append(f"a linear layer acts on {shape(layer.input)} per sample (one row is recognised)")
        else:
            found.append(layer)
    return found, refused
