"""Jets and the arithmetic on stacked rows that every rule shares.

A :class:`Jet` is an op's result with its Taylor rows stacked along a leading axis:
the value (one row), ``k1`` first-order rows (one per input direction) and ``k2``
second-order rows (Hessian entries, or one collapsed Laplacian row); :class:`Layout`
says which of the three a node carries. :class:`_Call` is what a rule gets to make new
jets; :class:`Rule` is one entry of the rule table (:mod:`.table`). Also here: the
broadcasting helpers and bilinear maps on stacked rows used by the rule families.

Imports: torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class Unsupported(Exception):
    """The model cannot use the Taylor path; ``op`` names the ATen op (or ``trace``/``verify``)."""

    def __init__(self, op: str, detail: str = "") -> None:
        super().__init__(detail or f"aten.{op} has no Taylor rule")
        self.op = op
        self.detail = detail


# --------------------------------------------------------------------------- jets


class Layout(NamedTuple):
    """Which row blocks a jet holds: value (1 row), first order (k1 rows), second order (k2 rows)."""

    value: bool
    first: bool
    second: bool

    def rows(self, k1: int, k2: int) -> int:
        return int(self.value) + k1 * int(self.first) + k2 * int(self.second)


EMPTY = Layout(False, False, False)


class Jet:
    """A node's value and derivative streams, stacked along axis 0 as ``[rows, *shape]``.

    A missing second-order block means zero (the node is affine in the input);
    missing value or first-order blocks are never read (the need analysis says so).
    """

    __slots__ = ("t", "lay", "k1", "k2", "onehot")

    def __init__(self, t: Tensor, lay: Layout, k1: int, k2: int) -> None:
        self.t, self.lay, self.k1, self.k2 = t, lay, k1, k2
        #: first-order row r is e_onehot[r] at every point (the seed, through identity views)
        self.onehot: Tensor | None = None

    def span(self, order: int) -> tuple[int, int]:
        sizes = (int(self.lay.value), self.k1 * self.lay.first, self.k2 * self.lay.second)
        start = sum(sizes[:order])
        return start, start + sizes[order]

    def block(self, order: int) -> Tensor | None:
        if not self.lay[order]:
            return None
        start, stop = self.span(order)
        return self.t[start:stop]

    @property
    def shape(self) -> torch.Size:
        return self.t.shape[1:]


@dataclass
class _Call:
    """What one evaluation propagates: stream counts and how second-order rows pair up."""

    k1: int
    k2: int
    pairs: tuple[Tensor, Tensor] | None  # local (i, j) per second-order row; None: collapsed
    batch: int

    def empty(self, lay: Layout, shape: Sequence[int], like: Tensor, dtype=None) -> Jet:
        t = like.new_empty((lay.rows(self.k1, self.k2), *shape), dtype=dtype or like.dtype)
        return Jet(t, lay, self.k1, self.k2)

    def jet(self, t: Tensor, lay: Layout) -> Jet:
        return Jet(t, lay, self.k1, self.k2)

    def square(self, d1: Tensor, out: Tensor) -> Tensor:
        """The second-order term of a unary op before ``f''``: ``d1_i d1_j`` per pair, or ``Σ d1_k²``."""
        if self.pairs is None:
            return torch.sum(d1 * d1, 0, keepdim=True, out=out)
        if self.k1 == 1:  # one direction, one pair (0, 0)
            return torch.mul(d1, d1, out=out)
        i, j = self.pairs
        torch.index_select(d1, 0, i, out=out)
        return out.mul_(d1.index_select(0, j))

    def cross(self, a1: Tensor, b1: Tensor, beta: Callable) -> Tensor:
        """The second-order term of a bilinear ``β(a, b)``: ``β(a_i, b_j) + β(a_j, b_i)``, or ``2 Σ β(a_k, b_k)``."""
        if self.pairs is None:
            return 2 * beta(a1, b1).sum(0, keepdim=True)
        i, j = self.pairs
        return beta(a1.index_select(0, i), b1.index_select(0, j)) + beta(
            a1.index_select(0, j), b1.index_select(0, i)
        )


def _take(jet: Jet, lay: Layout) -> Tensor:
    """The rows of ``jet`` for ``lay``: a slice when adjacent, else a copy (absent second order: zeros)."""
    if jet.lay == lay:
        return jet.t
    wanted = [o for o in range(3) if lay[o]]
    present = [o for o in range(3) if jet.lay[o]]
    if set(wanted) <= set(present):
        lo, hi = present.index(wanted[0]), present.index(wanted[-1])
        if present[lo : hi + 1] == wanted:
            return jet.t[jet.span(wanted[0])[0] : jet.span(wanted[-1])[1]]
    parts = []
    for o in wanted:
        block = jet.block(o)
        parts.append(block if block is not None else jet.t.new_zeros((jet.k2, *jet.shape)))
    return torch.cat(parts)


def _lift(x, rank: int):
    """``[rows, *S]`` -> ``[rows, 1, …, 1, *S]`` with ``rank`` per-row dimensions (numbers pass)."""
    if not isinstance(x, Tensor) or x.dim() - 1 >= rank:
        return x
    return x[(slice(None),) + (None,) * (rank - x.dim() + 1)]


def _rows1(x):
    """A constant as a one-row operand (numbers pass)."""
    return x[None] if isinstance(x, Tensor) else x


def _rank(x) -> int:
    return x.dim() - 1 if isinstance(x, Tensor) else 0


def _shift(d: int) -> int:
    # a leading row axis moves non-negative dims by one; negative dims count from the end
    return d + 1 if d >= 0 else d


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# --------------------------------------------------------------------------- bilinear maps on stacked rows
# β(x, y) for operands that both carry a leading row axis (1 row or many, broadcast).


def _b_mul(x, y):
    r = max(_rank(x), _rank(y))
    return _lift(x, r) * _lift(y, r)


def _b_div(x, y):
    r = max(_rank(x), _rank(y))
    return _lift(x, r) / _lift(y, r)


def _b_mm(x: Tensor, y: Tensor) -> Tensor:
    # one GEMM over all rows: a one-row operand is folded instead of being expanded per row
    if y.shape[0] == 1 and y.dim() == 3:
        return torch.matmul(x, y[0])
    if x.shape[0] == 1 and x.dim() == 3:
        return torch.matmul(y.transpose(-1, -2), x[0].transpose(-1, -2)).transpose(-1, -2)
    return torch.matmul(x, y)


def _b_mv(x: Tensor, y: Tensor) -> Tensor:
    return _b_mm(x, y.unsqueeze(-1)).squeeze(-1)


# A rule is fn(cx, lay, *args, **kwargs) -> Jet | list[Jet]; input-dependent arguments
# arrive as Jets, everything else as plain values. ``lay`` is the layout to produce.


@dataclass(frozen=True)
class Rule:
    fn: Callable
    #: whether the op is (jointly) linear in the input-dependent arguments at these positions
    linear: Callable[[frozenset[int]], bool]
    #: the output is a view of an input (costs no memory of its own)
    view: bool = False


def _always(pos) -> bool:
    return True


def _one_factor(pos) -> bool:
    return len(pos) <= 1
