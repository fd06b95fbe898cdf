"""What the recorder does with an op that has no rule: decompose it, or replay it out of place.

Normalisations, softmax and a few composite activations are fused kernels in PyTorch;
written out in ops that have rules (means, products, ``rsqrt``, ``exp``) they go through
the Taylor path at the cost of those ops, and exactly: for these decompositions the
forward-over-forward derivative is right, where PyTorch's own forward-mode formula for
``native_layer_norm`` is not (see :data:`jaccli.engine.planner.FORWARD_OVER_FORWARD_WRONG`).

- :data:`DECOMPOSITIONS`: ATen op → a function of the same arguments, written in ops
  with rules, that the recorder runs in place of the op (its ops are then recorded).
  The softmax family subtracts a *detached* maximum: the shift changes no derivative,
  and keeps ``exp`` from overflowing exactly as the fused kernel does.
  ``torch.jit.trace`` records convolutions as ``aten._convolution`` (with backend
  flags that change no value): they become ``aten.convolution``, which has a rule.
- :func:`functional_twin`: the out-of-place op of an in-place one (``add_`` → ``add``,
  ``masked_fill_`` → ``masked_fill``, then decomposed), which the recorder records
  instead when no other tensor shares the mutated one's memory (it was made by the
  model, is not a view and nothing views it): ops that read it before the update were
  recorded with the old value, ops after it read the twin's result, as in the model.

Imports: torch only (the recorder, :mod:`.record`, imports this).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

aten = torch.ops.aten


def _last_dims(x: Tensor, count: int) -> list[int]:
    return list(range(x.dim() - count, x.dim()))


def _normalise(x: Tensor, dims: Sequence[int], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(x - mean) * rstd`` over ``dims`` (biased variance, as the norm layers use), mean, rstd."""
    mean = x.mean(dims, keepdim=True)
    d = x - mean
    rstd = torch.rsqrt((d * d).mean(dims, keepdim=True) + eps)
    return d * rstd, mean, rstd


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    y, mean, rstd = _normalise(x, _last_dims(x, len(normalized_shape)), eps)
    return _affine(y, weight, bias), mean, rstd


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    dims = _last_dims(x, len(normalized_shape))
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    rstd = torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)
    return _affine(x * rstd, weight, None), rstd


def _channel_shape(x: Tensor) -> list[int]:
    # per-channel parameters [C] broadcast against [N, C, *spatial]
    return [x.shape[1]] + [1] * (x.dim() - 2)


def _group_norm(x, weight, bias, n, c, hxw, group, eps):
    grouped = x.reshape(x.shape[0], group, -1)
    y, mean, rstd = _normalise(grouped, [2], eps)
    y = y.reshape(x.shape)
    shape = _channel_shape(x)
    y = _affine(y, None if weight is None else weight.reshape(shape), None if bias is None else bias.reshape(shape))
    return y, mean.reshape(x.shape[0], group), rstd.reshape(x.shape[0], group)


def _batch_norm_eval(x, weight, bias, running_mean, running_var, eps):
    # eval mode: a per-channel affine map with the running statistics (constants)
    shape = _channel_shape(x)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    y = x * scale.reshape(shape) + shift.reshape(shape)
    empty = x.new_empty(0)
    return y, empty, empty


def _native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps):
    if not training and running_mean is not None and running_var is not None:
        return _batch_norm_eval(x, weight, bias, running_mean, running_var, eps)
    if running_mean is not None or running_var is not None:
        return NotImplemented  # training with running statistics: the kernel updates buffers in place
    # statistics of the input: what InstanceNorm runs (on [1, B·C, …], every point's channels
    # apart); a BatchNorm that mixes the points this way is refused by the batch check
    y, mean, rstd = _normalise(x, [0, *range(2, x.dim())], eps)
    shape = _channel_shape(x)
    y = _affine(y, None if weight is None else weight.reshape(shape), None if bias is None else bias.reshape(shape))
    return y, mean.flatten(), rstd.flatten()


def _batch_norm_no_training(x, weight, bias, running_mean, running_var, momentum, eps):
    return _batch_norm_eval(x, weight, bias, running_mean, running_var, eps)


def _shifted(x: Tensor, dim) -> Tensor:
    """``x`` minus its detached maximum along ``dim`` (0 where that maximum is infinite)."""
    m = x.detach().amax(dim, keepdim=True)
    return x - torch.where(torch.isinf(m), 0.0, m)


def _softmax(x, dim, half_to_float=False):
    e = torch.exp(_shifted(x, dim))
    return e / e.sum(dim, keepdim=True)


def _log_softmax(x, dim, half_to_float=False):
    s = _shifted(x, dim)
    return s - torch.log(torch.exp(s).sum(dim, keepdim=True))


def _safe_softmax(x, dim, dtype=None):
    # softmax, with 0 (not NaN) in rows that are entirely -inf (fully masked attention rows)
    if dtype is not None:
        x = x.to(dtype)
    masked = torch.eq(x, float("-inf")).all(dim, keepdim=True)
    return torch.where(masked, 0.0, _softmax(x, dim))


def _logsumexp(x, dim, keepdim=False):
    m = x.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    out = torch.log(torch.exp(x - m).sum(dim, keepdim=True)) + m
    return out if keepdim else out.squeeze(dim)


def _variance(x, dim=None, correction=None, keepdim=False):
    dims = list(range(x.dim())) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    count = 1
    for d in dims:
        count *= x.shape[d]
    d = x - x.mean(dims, keepdim=True)
    ddof = 1 if correction is None else correction
    return (d * d).sum(dims, keepdim=keepdim) / max(count - ddof, 0)


def _var(x, dim=None, *, correction=None, keepdim=False):
    return _variance(x, dim, correction, keepdim)


def _std(x, dim=None, *, correction=None, keepdim=False):
    return torch.sqrt(_variance(x, dim, correction, keepdim))


def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    dims = list(range(x.dim())) if dim is None else dim
    return _variance(x, dim, correction, keepdim), x.mean(dims, keepdim=keepdim)


def _mish(x):
    return x * torch.tanh(torch.nn.functional.softplus(x))


def _hardsigmoid(x):
    return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def _hardswish(x):
    return x * _hardsigmoid(x)


def _glu(x, dim=-1):
    a, b = x.split(x.shape[dim] // 2, dim)  # not chunk: inside the recorder it is not decomposed
    return a * torch.sigmoid(b)


def _adaptive_max_pool(x, output_size):
    spatial = len(output_size)
    sizes = x.shape[x.dim() - spatial :]
    if any(o <= 0 for o in output_size):
        return NotImplemented
    if not any(s % o for s, o in zip(sizes, output_size)):
        # windows of one size (the input a multiple of the output): max pooling, whose
        # indices into each flattened plane are the adaptive op's
        kernel = [s // o for s, o in zip(sizes, output_size)]
        return getattr(aten, f"max_pool{spatial}d_with_indices").default(x, kernel, kernel)
    # windows of two sizes, [⌊i·s/o⌋, ⌈(i+1)·s/o⌉): the maximum of each, its indices as values
    dims = list(range(x.dim() - spatial, x.dim()))
    cells = []
    for cell in itertools.product(*(range(o) for o in output_size)):
        window = x
        for d, i, s, o in zip(dims, cell, sizes, output_size):
            window = aten.slice.Tensor(window, d, i * s // o, -(-(i + 1) * s // o))
        cells.append(window.amax(dims))
    values = torch.stack(cells, -1)
    values = values.reshape(*values.shape[:-1], *output_size)
    indices = getattr(aten, f"adaptive_max_pool{spatial}d").default(x.detach(), output_size)[1]
    return values, indices


def _prelu(x, weight):
    # the kernel behind nn.PReLU (its weight already shaped to broadcast over the channels)
    return torch.where(x > 0, x, weight * x)


def _convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, *backend_flags):
    # what torch.jit.trace records for every convolution; the flags (benchmark,
    # deterministic, cudnn_enabled, allow_tf32) pick kernels and change no value
    return aten.convolution.default(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


def _masked_fill(x, mask, value):
    # a Python number or a 0-dim tensor (input-dependent or not) where ``mask`` holds
    if not isinstance(value, Tensor):
        value = torch.full((), value, dtype=x.dtype, device=x.device)
    return torch.where(mask, value.to(x.dtype), x)


def _unsafe_split(x, size, dim=0):
    return aten.split.Tensor(x, size, dim)


def _unsafe_split_with_sizes(x, sizes, dim=0):
    return aten.split_with_sizes.default(x, sizes, dim)


#: ATen overload → decomposition with the same arguments (returning ``NotImplemented`` keeps the op)
DECOMPOSITIONS: dict[object, Callable] = {
    aten.native_layer_norm.default: _layer_norm,
    aten._fused_rms_norm.default: _rms_norm,
    aten.native_group_norm.default: _group_norm,
    aten.native_batch_norm.default: _native_batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm_no_training,
    aten._softmax.default: _softmax,
    aten._log_softmax.default: _log_softmax,
    aten._safe_softmax.default: _safe_softmax,
    aten.logsumexp.default: _logsumexp,
    aten.var.correction: _var,
    aten.std.correction: _std,
    aten.var_mean.correction: _var_mean,
    aten.mish.default: _mish,
    aten.hardsigmoid.default: _hardsigmoid,
    aten.hardswish.default: _hardswish,
    aten.glu.default: _glu,
    aten.adaptive_max_pool2d.default: _adaptive_max_pool,
    aten.adaptive_max_pool3d.default: _adaptive_max_pool,
    aten._prelu_kernel.default: _prelu,
    aten._convolution.default: _convolution,
    aten._convolution.deprecated: _convolution,
    aten.masked_fill.Scalar: _masked_fill,
    aten.masked_fill.Tensor: _masked_fill,
    aten.unsafe_split.Tensor: _unsafe_split,
    aten.unsafe_split_with_sizes.default: _unsafe_split_with_sizes,
}


def functional_twin(func):
    """The out-of-place overload of an in-place ATen op whose first argument it mutates, or None."""
    schema = func._schema
    if not schema.arguments or schema.arguments[0].alias_info is None or not schema.arguments[0].alias_info.is_write:
        return None
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments[1:]):
        return None
    name = func.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    if packet is None:
        return None
    twin = getattr(packet, func._overloadname, None)
    if twin is None:  # transpose_.default is transpose.int: the overload taking the same arguments
        want = _argument_types(func)
        twin = next((o for o in (getattr(packet, n) for n in packet.overloads()) if _argument_types(o) == want), None)
    if twin is None or twin._schema.is_mutable:
        return None
    return twin


def _argument_types(func) -> list[str]:
    return [f"{a.name}:{a.type}" for a in func._schema.arguments]
