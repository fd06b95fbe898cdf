"""Rules for ops that move or sum values without changing them: views, permutes,
slices, indexing, expands, sums and means, casts, splits.

Every one acts on each row of a jet alike (:func:`_rowwise`), so a rule is the op itself
applied to the stacked rows.

Imports: :mod:`.jet`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from jaccli.jets.jet import Rule, Unsupported, _always, _lift, _norm, _shift, _take, sum_few

aten = torch.ops.aten


def _rowwise(fn: Callable, view: bool = False, identity: bool = False) -> Rule:
    """An op that acts on every row alike (views, reductions, casts): ``fn(t, rank, *args)``.

    ``identity`` ops (reshapes, aliases) that leave the shape as it was keep a seed's
    one-hot mark, so the first linear layer can skip its product with the identity, and its
    rows that are the same at every point (:attr:`~.jet.Jet.rows1`), so that a series pass can
    fold its first layer; those that keep the points' axis (and so each point's values, in
    order) reshape those rows, for the first convolution.
    """

    def rule(cx, lay, x, *args, **kwargs):
        out = cx.jet(fn(_take(x, lay), len(x.shape), *args, **kwargs), lay)
        if identity and out.shape == x.shape:
            out.onehot, out.rows1 = x.onehot, x.rows1
        elif (identity and x.rows1 is not None and out.shape[:1] == x.shape[:1]
                and out.shape[1:].numel() == x.shape[1:].numel()):  # fmt: skip
            out.rows1 = x.rows1.reshape(x.rows1.shape[0], *out.shape[1:])
        return out

    return Rule(rule, _always, view)


def _r_view(t, r, shape):
    return t.reshape(t.shape[0], *shape)


def _r_t(t, r):
    return t.transpose(1, 2) if r == 2 else t


def _r_transpose(t, r, a, b):
    return t.transpose(_shift(a), _shift(b))


def _r_permute(t, r, dims):
    return t.permute(0, *(_norm(d, r) + 1 for d in dims))


def _r_unsqueeze(t, r, d):
    return t.unsqueeze(_norm(d, r + 1) + 1)


def _r_squeeze(t, r, dims=None):
    if dims is None:  # squeeze.default, resolved at build time (see _fix_squeeze)
        raise AssertionError("squeeze.default reaches no rule")
    dims = [dims] if isinstance(dims, int) else dims
    return t.squeeze(tuple(_norm(d, r) + 1 for d in dims))


def _r_expand(t, r, size, implicit=False):
    t = _lift(t, len(size))
    return t.expand(t.shape[0], *size)


def _r_slice(t, r, dim=0, start=None, end=None, step=1):
    return aten.slice.Tensor(t, _shift(dim), start, end, step)


def _slice_rule() -> Rule:
    """``slice``; one that keeps the whole axis (``x[:, :2]`` traces a slice of all the points
    first) is its input's jet itself: no op and no jet, in the pass (a step of ~10 µs on a
    small model) and in nothing after it (jets are never written in place)."""
    rowwise = _rowwise(_r_slice, view=True, identity=True)

    def rule(cx, lay, x, dim=0, start=None, end=None, step=1):
        if (step == 1 and start in (None, 0) and x.lay == lay
                and (end is None or end >= x.shape[_norm(dim, len(x.shape))])):  # fmt: skip
            return x
        return rowwise.fn(cx, lay, x, dim, start, end, step)

    return Rule(rule, _always, view=True)


def _r_select(t, r, dim, index):
    return t.select(_shift(dim), index)


def _dims_all(dims, r):
    return list(range(1, r + 1)) if not dims else [_norm(d, r) + 1 for d in dims]


def _r_sum(t, r, dims=None, keepdim=False, dtype=None):
    return sum_few(t if dtype is None else t.to(dtype), _dims_all(dims, r), keepdim)


def _r_mean(t, r, dims=None, keepdim=False, dtype=None):
    dims = _dims_all(dims, r)
    return sum_few(t if dtype is None else t.to(dtype), dims, keepdim).div_(math.prod(t.shape[d] for d in dims))


def _r_same(t, r, *args, **kwargs):
    # clone/alias/contiguous: jets are never written in place, so sharing is safe
    return t


def _r_to_copy(t, r, dtype=None, **kwargs):
    if dtype is not None and not dtype.is_floating_point:
        raise Unsupported("_to_copy", f"cast of an input-dependent tensor to {dtype}")
    return t.to(dtype=dtype) if dtype is not None else t


def _r_neg(t, r):
    return -t


def _r_index_select(t, r, dim, index):
    return t.index_select(_shift(dim), index)


def _r_index(t, r, indices):
    # one 1-D integer index (x[:, perm]) selects along its dim: index_select is the same
    # result at a fifth of advanced indexing's time (a MAF's permutation: 60 µs -> 14 µs); on
    # CPU only, where index_select refuses a negative index with an IndexError (on a GPU it
    # is a device-side assert), which sends the index to advanced indexing, whose negative
    # indices count from the end. Not asked beforehand: a ``min`` and its ``.item()`` cost two
    # ATen calls a step and a call, and a cache by tensor and version would miss an index
    # changed through ``.data``, which keeps its version.
    picked = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(picked) == 1:
        d, i = picked[0]
        if (isinstance(i, torch.Tensor) and i.dim() == 1 and i.dtype in (torch.long, torch.int)
                and i.device.type == t.device.type == "cpu"):  # fmt: skip
            try:
                return t.index_select(d + 1, i)
            except IndexError:  # a negative index (or one out of range: advanced indexing says so)
                pass
    return aten.index.Tensor(t, [None, *indices])


def _r_flip(t, r, dims):
    return t.flip([_norm(d, r) + 1 for d in dims])


def _r_roll(t, r, shifts, dims=()):
    if not dims:
        raise Unsupported("roll", "roll without dims mixes the points")
    return t.roll(shifts, [_norm(d, r) + 1 for d in dims])


def _r_repeat(t, r, repeats):
    t = _lift(t, len(repeats))
    return t.repeat(1, *repeats)


def _r_diagonal(t, r, offset=0, dim1=0, dim2=1):
    return t.diagonal(offset, _norm(dim1, r) + 1, _norm(dim2, r) + 1)


def _split_rule(method: str) -> Rule:
    def rule(cx, lay, x, *args):
        t = _take(x, lay)
        r = len(x.shape)
        if method == "unbind":
            parts = t.unbind(_norm(args[0] if args else 0, r) + 1)
        else:
            size, dim = args[0], args[1] if len(args) > 1 else 0
            parts = t.split(size, _norm(dim, r) + 1)
        return [cx.jet(p, lay) for p in parts]

    return Rule(rule, _always, view=True)


def _getitem(cx, lay, seq, i):
    return seq[i]
