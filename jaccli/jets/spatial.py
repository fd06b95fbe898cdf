"""Rules for the ops of convolutional nets: convolutions, pooling, upsampling, padding, and
the piecewise-linear maxima (max pooling, ``amax``, ``max.dim``).

Convolutions, average pooling, upsampling and padding are linear maps of their input that
treat axis 0 as a batch: every row of a jet goes through ONE call of the op with rows and
points folded into that batch (the treatment ``addmm`` gets: one product per layer for the
value and all the streams), and a convolution's bias joins the value row alone. The first
convolution of the seed convolves its one-hot rows once, not once per point (they are the
same at every point: :func:`_seeded_convolution`).

A maximum is linear where it is differentiable: each stream is gathered where the value
attains its maximum (torch's convention at ties picks one; the kinks are reported by the
non-smoothness diagnostics).

Imports: :mod:`.jet`, :mod:`.elementwise`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jaccli.jets.jet import Jet, Rule, Unsupported, _take
from jaccli.jets.elementwise import _nonlinear

aten = torch.ops.aten


def _fold(t: Tensor) -> tuple[Tensor, int, int]:
    """``[rows, B, …]`` → ``[rows·B, …]`` (a view where the layout allows), rows, B."""
    rows, batch = t.shape[0], t.shape[1]
    return t.reshape(rows * batch, *t.shape[2:]), rows, batch


def _batched_linear(packet, min_rank: int = 0) -> Rule:
    """An op linear in its first argument that maps the slices along axis 0 independently
    (pooling, upsampling, padding); ``min_rank``: the rank below which axis 0 would be
    channels that the op mixes (pixel shuffle, fold/unfold of an unbatched input)."""

    def rule(cx, lay, x, *args, **kwargs):
        if any(isinstance(a, Jet) for a in (*args, *kwargs.values())):
            raise Unsupported(packet.__name__, "input-dependent parameters")
        if len(x.shape) < min_rank:
            raise Unsupported(packet.__name__, "an unbatched input (axis 0 is mixed)")
        flat, rows, batch = _fold(_take(x, lay))
        out = packet(flat, *args, **kwargs)
        return cx.jet(out.reshape(rows, batch, *out.shape[1:]), lay)

    return Rule(rule, _first_only)


def _first_only(pos) -> bool:
    return pos <= {0}


def _r_convolution(cx, lay, x, weight, bias, *params):
    if isinstance(weight, Jet) or isinstance(bias, Jet) or not isinstance(x, Jet):
        raise Unsupported("convolution", "input-dependent weights")
    if x.rows1 is not None and lay.top == 1 and x.lay == lay:
        return _seeded_convolution(cx, lay, x, weight, bias, params)
    flat, rows, batch = _fold(_take(x, lay))
    out = aten.convolution(flat, weight, None, *params)
    out = out.reshape(rows, batch, *out.shape[1:])
    if bias is not None and lay.value:
        # the bias is the value's alone (derivative rows are the convolution without it)
        out[0].add_(bias.reshape(-1, *(1,) * (out.dim() - 3)))
    return cx.jet(out, lay)


def _seeded_convolution(cx, lay, x: Jet, weight: Tensor, bias, params: tuple) -> Jet:
    """The first convolution of a one-hot seed: its first-order rows are the same at every
    point (:attr:`~.jet.Jet.rows1`), so they are convolved once, as ``k`` more images beside
    the value's ``B`` (one call: oneDNN's ~70 µs a call is most of a small one), and broadcast
    to the points, where the rows of every point made ``k·B`` images (the instance-norm
    CNN's Laplacian: 0.42 ms, now 0.1). Each entry is the same sum of products either way
    (one weight times 1, the others times 0; the value's images are convolved alike)."""
    k, batch = x.rows1.shape[0], x.shape[0]
    images = torch.cat([x.block(0)[0], x.rows1.to(x.t.dtype)]) if lay.value else x.rows1.to(x.t.dtype)
    conv = aten.convolution(images, weight, None, *params)  # [(B +) k, C, …]
    out = cx.tensor((lay.rows(cx.counts), batch, *conv.shape[1:]), conv, conv.dtype)
    if lay.value:
        out[0].copy_(conv[:batch])
        if bias is not None:
            out[0].add_(bias.reshape(-1, *(1,) * (conv.dim() - 2)))
        out[1:].copy_(conv[batch:, None])
    else:
        out.copy_(conv[:, None])
    return cx.jet(out, lay)


def _r_constant_pad(cx, lay, x, pad, value=0.0):
    t = _take(x, lay)
    out = aten.constant_pad_nd(t, pad, 0.0)
    if lay.value and value != 0:  # the padding constant is part of the value only
        out[0] = aten.constant_pad_nd(t[0], pad, value)
    jet = cx.jet(out, lay)
    if x.rows1 is not None and lay.first and len(pad) // 2 < len(x.shape):  # the points' axis unpadded
        jet.rows1 = aten.constant_pad_nd(x.rows1, pad, 0.0)  # rows the same at every point stay so
    return jet


# ---- maxima: gather each row where the value is largest


def _gather_rows(cx, lay, x: Jet, value: Tensor, index: Tensor, spatial: int) -> Jet:
    """``value`` in row 0 and every other row of ``x`` gathered at ``index``, an index
    into the last ``spatial`` dims of ``x`` flattened (as max pooling returns it)."""
    t = _take(x, lay)
    flat = t.flatten(-spatial)
    idx = index.flatten(-spatial)
    out = flat.gather(-1, idx[None].expand(t.shape[0], *idx.shape)).reshape(t.shape[0], *index.shape)
    if lay.value:
        out[0] = value
    return cx.jet(out, lay)


def _max_pool(spatial: int):
    packet = getattr(aten, f"max_pool{spatial}d_with_indices")

    def rule(cx, lay, x, *params):
        if not isinstance(x, Jet) or any(isinstance(p, Jet) for p in params):
            raise Unsupported(packet.__name__, "input-dependent parameters")
        value, index = packet(x.block(0)[0], *params)
        return [_gather_rows(cx, lay, x, value, index, spatial), index]

    return Rule(rule, _nonlinear)


def _reduced_last(t: Tensor, dims: list[int]) -> Tensor:
    """``t`` ``[rows, *S]`` with the per-row dims ``dims`` moved to the end and flattened."""
    keep = [d for d in range(1, t.dim()) if d not in dims]
    return t.permute(0, *keep, *dims).flatten(len(keep) + 1)


def _r_amax(cx, lay, x, dim=(), keepdim=False, smallest=False):
    r = len(x.shape)
    dims = sorted({(d % r) + 1 for d in ((dim,) if isinstance(dim, int) else dim)} or range(1, r + 1))
    v = _reduced_last(x.block(0), dims)  # [1, *kept, m]
    idx = (v.argmin(-1, keepdim=True) if smallest else v.argmax(-1, keepdim=True))
    t = _reduced_last(_take(x, lay), dims)
    out = t.gather(-1, idx.expand(t.shape[0], *idx.shape[1:]))[..., 0]
    if keepdim:
        for d in dims:
            out = out.unsqueeze(d)
    return cx.jet(out, lay)


def _r_amin(cx, lay, x, dim=(), keepdim=False):
    return _r_amax(cx, lay, x, dim, keepdim, smallest=True)


def _r_max(cx, lay, x, dim=None, keepdim=False, smallest=False):
    if dim is None:  # max.default: over everything
        return _r_amax(cx, lay, x, (), False, smallest)
    if not isinstance(dim, int):
        raise Unsupported("min" if smallest else "max", "elementwise maximum of two tensors")
    r = len(x.shape)
    d = dim % r + 1
    v = x.block(0)
    index = (v.min if smallest else v.max)(d, keepdim=True).indices
    t = _take(x, lay)
    out = t.gather(d, index.expand(t.shape[0], *index.shape[1:]))
    if not keepdim:
        out, index = out.squeeze(d), index.squeeze(d)
    return [cx.jet(out, lay), index[0]]


def _r_min(cx, lay, x, dim=None, keepdim=False):
    return _r_max(cx, lay, x, dim, keepdim, smallest=True)


#: ops linear in their input with axis 0 a batch: one call for all rows (the 1-d poolings
#: reach the dispatcher as their 2-d versions)
_BATCHED = [
    "avg_pool2d", "avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d",
    "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "reflection_pad1d", "reflection_pad2d",
    "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
]  # fmt: skip
#: … and those whose axis 0 is a batch only from this rank on
_MIXING = {"pixel_shuffle": 4, "pixel_unshuffle": 4, "im2col": 4, "col2im": 3}

SPATIAL_RULES: dict[str, Rule] = {
    "convolution": Rule(_r_convolution, _first_only),
    "constant_pad_nd": Rule(_r_constant_pad, _first_only),
    **{name: _batched_linear(getattr(aten, name)) for name in _BATCHED if hasattr(aten, name)},
    **{name: _batched_linear(getattr(aten, name), rank) for name, rank in _MIXING.items()},
    **{f"max_pool{k}d_with_indices": _max_pool(k) for k in (2, 3) if hasattr(aten, f"max_pool{k}d_with_indices")},
    "amax": Rule(_r_amax, _nonlinear),
    "amin": Rule(_r_amin, _nonlinear),
    "max": Rule(_r_max, _nonlinear),
    "min": Rule(_r_min, _nonlinear),
}
