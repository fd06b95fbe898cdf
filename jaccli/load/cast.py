"""Casting a loaded model to another floating dtype (``--dtype``), all of it.

``Module.to(dtype)`` converts parameters and buffers, which is not all a saved model
holds: ``torch.export`` lifts captured tensors into plain attributes, ``torch.jit.trace``
embeds them as graph constants, and both bake the dtypes of the tensors a model creates
(a recurrent net's zero initial state, ``x.to(torch.float32)``) into the graph. A float64
request then fails inside the model ("mat1 and mat2 must have the same dtype") or, worse,
silently computes in float32. :func:`cast_model` rewrites all of these, and names the
tensor it could not convert.

Imports: torch, :mod:`jaccli.errors`.
"""

from __future__ import annotations

import torch
from torch import nn

from jaccli.errors import ModelError

#: TorchScript's ScalarType codes of the floating dtypes (c10/core/ScalarType.h)
_SCALAR_TYPES = {torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bfloat16: 15}


def _cast(value, source: torch.dtype, dtype: torch.dtype):
    """A tensor (or a list or tuple of them) of dtype ``source`` in ``dtype``; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dtype == source:
        return value.to(dtype)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_cast(v, source, dtype) for v in value)
    return value


def _cast_attributes(module: nn.Module, source: torch.dtype, dtype: torch.dtype) -> None:
    """Plain tensor attributes (constants lifted by torch.export, hand-made caches)."""
    for sub in module.modules():
        if isinstance(sub, torch.jit.ScriptModule):
            continue
        for name, value in list(vars(sub).items()):
            if name in ("_parameters", "_buffers", "_modules"):  # .to() did those
                continue
            cast = _cast(value, source, dtype)
            if cast is not value:
                object.__setattr__(sub, name, cast)


def _swap(value, source: torch.dtype, dtype: torch.dtype):
    return dtype if isinstance(value, torch.dtype) and value == source else value


def _cast_fx(module: nn.Module, source: torch.dtype, dtype: torch.dtype) -> None:
    """dtypes written into FX graphs (``torch.export``'s ``module()``)."""
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        changed = False
        for node in sub.graph.nodes:
            if node.op != "call_function":
                continue
            args = tuple(_swap(a, source, dtype) for a in node.args)
            kwargs = {k: _swap(v, source, dtype) for k, v in node.kwargs.items()}
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs, changed = args, kwargs, True
        if changed:
            sub.recompile()


def _script_graphs(module: torch.jit.ScriptModule):
    for sub in module.modules():
        if isinstance(sub, torch.jit.ScriptModule):
            for name in sub._c._method_names():
                yield sub._c._get_method(name).graph


def _nodes(block):
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nodes(inner)


def _cast_script(module: torch.jit.ScriptModule, source: torch.dtype, dtype: torch.dtype) -> None:
    """dtype arguments and tensor constants baked into TorchScript graphs (a trace records
    the dtype of every tensor it saw created)."""
    code, old = _SCALAR_TYPES.get(dtype), _SCALAR_TYPES.get(source)
    for graph in _script_graphs(module):
        for node in list(_nodes(graph)):
            if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType":
                value = node.output().toIValue()
                cast = _cast(value, source, dtype)
                if cast is not value:
                    with graph.insert_point_guard(node):
                        node.output().replaceAllUsesWith(graph.insertConstant(cast))
                continue
            try:
                typed = "dtype" in node.schema()
            except RuntimeError:  # prim nodes have no schema
                typed = False
            if not typed or code is None:
                continue
            try:
                given = node.namedInput("dtype")
            except RuntimeError:
                continue
            if given.node().kind() == "prim::Constant" and given.toIValue() == old:
                with graph.insert_point_guard(node):
                    constant = graph.insertConstant(code)
                for i, v in enumerate(node.inputs()):
                    if v.unique() == given.unique():
                        node.replaceInput(i, constant)


def cast_model(model: nn.Module, dtype: torch.dtype, where: str) -> None:
    """Convert every tensor of the model's dtype that ``model`` holds or creates to
    ``dtype``, in place. The model's dtype is its parameters' (the default dtype without
    any): tensors the model deliberately keeps in another precision stay as they are."""
    source = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    model.to(dtype=dtype)
    if source != dtype:
        _cast_attributes(model, source, dtype)
        _cast_fx(model, source, dtype)
        script = model.module if isinstance(getattr(model, "module", None), torch.jit.ScriptModule) else model
        if isinstance(script, torch.jit.ScriptModule):
            _cast_script(script, source, dtype)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.dtype != dtype:
            raise ModelError(f"cannot convert the model's tensor {name} to {dtype}", where=where,
                             got=str(t.dtype).removeprefix("torch."))  # fmt: skip
