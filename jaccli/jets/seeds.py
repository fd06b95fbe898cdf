"""Seeds: what a pass starts from — the input jet, its one-hot first-order rows, the columns
of each pass — and a jet with no rows for steps the pass skips.

Kept apart from :mod:`.program` (which runs the steps) because every pass kind builds its
seed here and the engine's strategies do not: one place says how a direction becomes rows.

Imports: :mod:`.jet`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jaccli.jets.jet import Jet, Layout, _Call, empty_layout


def _zero_jet(cx: _Call, shape, like: Tensor):
    """A jet with no rows: zero wherever it is read (a list of them for several results)."""
    if isinstance(shape, list):
        return [_zero_jet(cx, s, like) for s in shape]
    return Jet(like.new_zeros(()).expand(0, *shape), empty_layout(cx.order), cx.counts)


def _seed(cx: _Call, lay: Layout, z: Tensor, tangents: Tensor | None, onehot: Tensor | None) -> Jet:
    jet = cx.empty(lay, z.shape, z)
    if lay.value:
        jet.block(0).copy_(z)  # [1, B, …] from [B, …] by broadcasting: no indexing from Python
    if lay.first:
        jet.block(1).copy_(tangents)
        jet.onehot = None if onehot is None else onehot.to(z.device)
        # one-hot seeds, and directions broadcast along the points (stride 0, which the caller
        # gives them even for one point; a single point's own direction is not a constant one)
        if onehot is not None or (tangents.dim() >= 2 and tangents.stride(1) == 0):
            jet.rows1 = tangents[:, 0]
    return jet


#: the most entries of a request's seeds (columns, one-hot rows, pairs) kept with the program between calls
_KEEP_SEEDS = 1 << 16


def _onehot_rows(cols: Tensor, n: int, like: Tensor) -> Tensor:
    """``[k, n]`` rows ``e_cols[k]``."""
    e = like.new_zeros((cols.numel(), n))
    e[torch.arange(cols.numel(), device=like.device), cols.to(like.device)] = 1
    return e


def _broadcast(e: Tensor, b: int) -> Tensor:
    """``[k, n]`` rows as ``[k, B, n]``, the same for every point (a broadcast view, no copy)."""
    return e[:, None, :].expand(-1, b, e.shape[1])


def _onehot(cols: Tensor, b: int, n: int, like: Tensor) -> Tensor:
    """``[k, B, n]`` rows ``e_cols[k]``, the same for every point (a broadcast view)."""
    return _broadcast(_onehot_rows(cols, n, like), b)


def _chunks(n: int, size: int | None):
    size = n if size is None else max(1, int(size))
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))
