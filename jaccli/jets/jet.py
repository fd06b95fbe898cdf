"""Jets and the arithmetic on stacked rows that every rule shares.

A :class:`Jet` is an op's result with its Taylor rows stacked along a leading axis:
the value (one row), then the rows of each order ``1 … K`` (one per direction for a
series; for order 2 also Hessian entries, or one collapsed Laplacian row); :class:`Layout`
says which orders a node carries. :class:`_Call` is what a rule gets to make new jets
(and how rows of two factors multiply); :class:`Rule` is one entry of the rule table
(:mod:`.table`). Also here: :func:`broadcast_shapes`, :func:`sum_few` and the
broadcasting helpers and bilinear maps on stacked rows used by the rule families.

Imports: torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


class Unsupported(Exception):
    """The model cannot use the Taylor path; ``op`` names the ATen op (or ``trace``/``verify``)."""

    def __init__(self, op: str, detail: str = "") -> None:
        super().__init__(detail or f"aten.{op} has no Taylor rule")
        self.op = op
        self.detail = detail


# --------------------------------------------------------------------------- jets


class Layout(tuple):
    """Which row blocks a jet holds, by order: ``lay[0]`` the value (1 row), ``lay[k]`` the
    order-``k`` Taylor rows (``counts[k]`` of them, see :class:`_Call`).

    ``Layout(False, True)`` is a Jacobian's last layer, ``Layout(False, False, True)`` a
    Laplacian's; orders past the last one present hold no rows, so those two equal
    ``Layout(False, True, False)`` and ``Layout(False, False, True, False)``.
    """

    # plain attributes, set once: rules read them for every op of every chunk
    value: bool
    first: bool
    second: bool
    #: the highest order present (-1: none)
    top: int

    def __new__(cls, *flags: bool) -> Layout:
        self = super().__new__(cls, tuple(bool(f) for f in flags))
        self.top = max((k for k, f in enumerate(self) if f), default=-1)
        self.value, self.first, self.second = self.has(0), self.has(1), self.has(2)
        return self

    def __repr__(self) -> str:
        return f"Layout{tuple(self)!r}"

    def __eq__(self, other) -> bool:
        if self is other:  # the common case: a step's layout compared with itself
            return True
        if not isinstance(other, tuple):
            return False
        if not isinstance(other, Layout):
            other = Layout(*other)
        return self.top == other.top and self[: self.top + 1] == other[: other.top + 1]

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(tuple(self[: self.top + 1]))

    def has(self, order: int) -> bool:
        return order < len(self) and self[order]

    def rows(self, counts: Sequence[int]) -> int:
        return sum(c for f, c in zip(self, counts) if f)


def empty_layout(order: int) -> Layout:
    return Layout(*(False,) * (order + 1))


class Jet:
    """A node's value and Taylor rows, stacked along axis 0 as ``[rows, *shape]``.

    ``counts[k]`` is the number of order-``k`` rows a full jet has (``counts[0] == 1``).
    A missing block of order ≥ 2 means zero (the node is affine in the input); missing
    value or first-order blocks are never read (the need analysis says so).
    """

    __slots__ = ("t", "lay", "counts", "onehot", "rows1", "_blocks")

    def __init__(self, t: Tensor, lay: Layout, counts: tuple[int, ...]) -> None:
        self.t, self.lay, self.counts = t, lay, counts
        #: first-order row r is e_onehot[r] at every point (the seed, through identity views)
        self.onehot: Tensor | None = None
        #: the first-order rows where they are the same at every point, ``[k1, *shape[1:]]``
        #: (a one-hot seed's rows or a series pass's constant directions, through identity
        #: views, reshapes that keep the points' axis and constant padding)
        self.rows1: Tensor | None = None
        #: order -> its block, sliced once: rules read a jet's blocks again and again (a
        #: small model's Laplacian pass asked ~90 times, each a Python span and a slice op)
        self._blocks: dict[int, Tensor | None] = {}

    def span(self, order: int) -> tuple[int, int]:
        lay, counts = self.lay, self.counts
        start = 0
        for o in range(min(order, len(lay))):
            if lay[o]:
                start += counts[o]
        return start, start + (counts[order] if order < len(lay) and lay[order] else 0)

    def block(self, order: int) -> Tensor | None:
        blocks = self._blocks
        if order in blocks:
            return blocks[order]
        lay = self.lay
        if order >= len(lay) or not lay[order]:
            blocks[order] = None
            return None
        present = [o for o in range(min(len(lay), len(self.counts))) if lay[o]]
        if len(present) == 1:  # a jet of one block is that block: no view to make
            blocks[order] = self.t
        else:  # every block at once: a rule that reads one block reads the others too
            sizes = [self.counts[o] for o in present]
            blocks.update(zip(present, self.t.split_with_sizes(sizes)))
        return blocks[order]

    @property
    def shape(self) -> torch.Size:
        return self.t.shape[1:]


#: a pass whose pairs scatter into more runs than this gathers them (index_select) instead
_MAX_RUNS = 16
#: a pair block of fewer elements than this is squared by gathering both factors (3 ATen
#: calls) rather than run by run (4 per run): below it the calls cost more than the copies
#: (40k elements, 4 directions: 14 µs against 22 µs; 80k: 34 µs against 27 µs)
_GATHER_BELOW = 50_000


@dataclass
class _Call:
    """What one evaluation propagates: rows per order and how products of rows combine.

    Three modes, one arithmetic. Blocks hold Taylor coefficients, and ``cross(a, b)`` is
    what the rows ``a`` (order ``i ≥ 1``) and ``b`` (order ``j ≥ 1``) of two factors add
    to the order-``i + j`` rows of their product:

    - *series* (``pairs is None``, not ``collapsed``): every order has the same rows, one
      per direction ``v``; row ``r`` of block ``k`` is ``(1/k!) dᵏ/dtᵏ f(z + t v_r)``, and
      products are row by row (the Cauchy product of univariate series), any order;
    - *pairs* (order 2): block 2 has one row per Hessian entry ``(i, j)`` of the
      first-order directions, holding the derivative itself (not halved): a product adds
      ``a_i b_j + a_j b_i``;
    - *collapsed* (order 2): block 2 is one row, ``Σᵢ ∂²/∂vᵢ²`` (the forward Laplacian):
      a product adds ``2 Σᵢ a_i b_i``.

    :attr:`half` is the factor of ``f''`` in a unary rule's order-2 rows (``½`` for
    normalised series coefficients, 1 for derivatives), so one chain rule serves all three.
    """

    counts: tuple[int, ...]
    pairs: tuple[Tensor, Tensor] | None  # local (i, j) per second-order row
    batch: int
    collapsed: bool = False
    #: where :meth:`empty` takes its rows from (a :class:`~.workspace.Workspace`), if anywhere
    pool: object = None

    def __post_init__(self) -> None:
        self.order = len(self.counts) - 1
        self.series = self.pairs is None and not self.collapsed
        self.half = 0.5 if self.series else 1.0

    @cached_property
    def pair_key(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The pairs as Python tuples (a hashable key; None without pairs), converted once per
        pass set-up rather than at every step that asks (:func:`.fused.kernel_key`)."""
        return None if self.pairs is None else (tuple(self.pairs[0].tolist()), tuple(self.pairs[1].tolist()))

    @cached_property
    def runs(self) -> list[tuple[int, int, int, int]] | None:
        """The second-order rows as runs ``(r0, r1, i, j0)``: rows ``r0 … r1-1`` are the pairs
        ``(i, j0) … (i, j0 + r1 - r0 - 1)``; None off the CPU or where the pairs scatter into
        more than :data:`_MAX_RUNS` runs. A Hessian's pass over every pair ``i ≤ j`` of ``k``
        directions is ``k`` runs (the upper triangle row by row)."""
        i, j = self.pairs
        if i.device.type != "cpu":
            return None
        runs: list[list[int]] = []
        for r, (a, b) in enumerate(zip(i.tolist(), j.tolist())):
            last = runs[-1] if runs else None
            if last is not None and last[2] == a and last[3] + (last[1] - last[0]) == b:
                last[1] = r + 1
            else:
                runs.append([r, r + 1, a, b])
        return [tuple(run) for run in runs] if len(runs) <= _MAX_RUNS else None  # type: ignore[misc]

    def empty(self, lay: Layout, shape: Sequence[int], like: Tensor, dtype=None) -> Jet:
        return Jet(self.tensor((lay.rows(self.counts), *shape), like, dtype), lay, self.counts)

    def tensor(self, shape: Sequence[int], like: Tensor, dtype=None) -> Tensor:
        """An uninitialised tensor on ``like``'s device, from the pass's workspace where it has one."""
        if self.pool is None:
            return like.new_empty(shape, dtype=dtype or like.dtype)
        return self.pool.empty(shape, dtype or like.dtype, like)

    def jet(self, t: Tensor, lay: Layout) -> Jet:
        return Jet(t, lay, self.counts)

    def square(self, d1: Tensor, out: Tensor) -> Tensor:
        """``d1 ⊗ d1`` into ``out``: ``d1_i d1_j`` per pair, ``Σ d1_k²``, or ``d1²`` row by row
        (times :attr:`half` ``· f''`` it is a unary op's order-2 term)."""
        if self.collapsed:  # the squares into a workspace buffer: a fresh [rows, B, n] each call page-faults
            return torch.sum(torch.mul(d1, d1, out=self.tensor(d1.shape, d1)), 0, keepdim=True, out=out)
        if self.pairs is None or self.counts[1] == 1:  # series, or one direction and one pair (0, 0)
            return torch.mul(d1, d1, out=out)
        runs = self.runs if out.numel() > _GATHER_BELOW else None
        if runs is not None:  # each run one product into its rows: no gathered copies of d1
            for r0, r1, i0, j0 in runs:
                torch.mul(d1[i0 : i0 + 1], d1[j0 : j0 + r1 - r0], out=out[r0:r1])
            return out
        i, j = self.pairs
        torch.index_select(d1, 0, i, out=out)
        return out.mul_(d1.index_select(0, j))

    def cross(self, a: Tensor, b: Tensor, beta: Callable = None) -> Tensor:
        """What ``β(a, b)`` of rows of order ≥ 1 adds to the product's rows of the summed order."""
        beta = beta or _b_mul
        if self.collapsed:
            return 2 * beta(a, b).sum(0, keepdim=True)
        if self.pairs is None:
            return beta(a, b)
        i, j = self.pairs
        return beta(a.index_select(0, i), b.index_select(0, j)) + beta(a.index_select(0, j), b.index_select(0, i))

    def cross_into(self, a: Tensor, b: Tensor, dst: Tensor, first: bool, rank: int) -> Tensor:
        """:meth:`cross` for ``β = ·`` of pairs or the collapsed row (a series pass multiplies
        row by row, not here), written into ``dst`` (``first``: ``dst`` is uninitialised) or
        added to it, with no new tensor for the sum: the products of pairs by ``addcmul_``, the
        collapsed row's ``2 Σᵢ aᵢ bᵢ`` with its 2 riding on the write. ``rank``: the per-row
        dimensions of the broadcast product (the caller's, not recomputed)."""
        if self.collapsed:
            total = _b_mul(a, b).sum(0, keepdim=True)
            return torch.mul(total, 2, out=dst) if first else dst.add_(total, alpha=2)
        i, j = self.pairs
        x, y = _lift(a.index_select(0, i), rank), _lift(b.index_select(0, j), rank)
        torch.mul(x, y, out=dst) if first else dst.addcmul_(x, y)
        return dst.addcmul_(_lift(a.index_select(0, j), rank), _lift(b.index_select(0, i), rank))


def _take_view(jet: Jet, lay: Layout) -> Tensor | None:
    """The rows of ``jet`` for ``lay`` as one slice (its blocks of ``lay`` present and adjacent), else None."""
    if jet.lay == lay:
        return jet.t
    wanted = [o for o in range(len(lay)) if lay[o]]
    present = [o for o in range(len(jet.lay)) if jet.lay[o]]
    if wanted and set(wanted) <= set(present):
        lo, hi = present.index(wanted[0]), present.index(wanted[-1])
        if present[lo : hi + 1] == wanted:
            return jet.t[jet.span(wanted[0])[0] : jet.span(wanted[-1])[1]]
    return None


def _take(jet: Jet, lay: Layout) -> Tensor:
    """The rows of ``jet`` for ``lay``: a slice when adjacent, else a copy (absent blocks of order ≥ 2: zeros)."""
    view = _take_view(jet, lay)
    if view is not None:
        return view
    wanted = [o for o in range(len(lay)) if lay[o]]
    parts = []
    for o in wanted:
        block = jet.block(o)
        parts.append(block if block is not None else jet.t.new_zeros((jet.counts[o], *jet.shape)))
    return torch.cat(parts)


#: the most elements :func:`sum_few` adds slice by slice
FEW = 5


def sum_few(t: Tensor, dims: Sequence[int], keepdim: bool = False) -> Tensor:
    """``t.sum(dims, keepdim=keepdim)`` (``dims`` non-negative). ATen sums a small innermost axis
    entry by entry at ~4 ns an output whatever its length (a ``[15, 512, 3, L]`` jet over ``L``:
    ~100 µs for every ``L`` from 2 to 64); where ``dims`` hold at most :data:`FEW` elements,
    their slices are added in turn instead (12 µs at ``L = 2``, 52 at 5; even at 8). Whatever
    the size of the other axes, so that the order of the additions, and the bits, do not move
    with the chunk of points (a tiny tensor pays a few µs more than ATen's one call)."""
    size = math.prod(t.shape[d] for d in dims)
    if size > FEW or size <= 1:
        return t.sum(dim=tuple(dims), keepdim=keepdim)
    for d in dims:
        acc = t.narrow(d, 0, 1)
        if t.shape[d] > 1:
            acc = acc + t.narrow(d, 1, 1)
            for i in range(2, t.shape[d]):
                acc += t.narrow(d, i, 1)
        t = acc
    return t if keepdim else t.squeeze(tuple(dims))


def broadcast_shapes(*shapes: Sequence[int]) -> torch.Size:
    """The shape ``shapes`` broadcast to, as ``torch.broadcast_shapes`` gives for concrete sizes.

    torch's own goes through ``torch._refs``, whose first call imports sympy for symbolic
    sizes (0.3-0.7 s of a command's start); the rules only ever see concrete ints.
    """
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for arg, shape in enumerate(shapes):
        for i, d in enumerate(shape, ndim - len(shape)):
            if d == 1 or d == out[i]:
                continue
            if d < 0:
                raise RuntimeError(f"broadcast_shapes: negative size {d} in argument {arg}")
            if out[i] != 1:
                raise RuntimeError(
                    f"shape mismatch: objects cannot be broadcast to a single shape; argument {arg} has size {d} "
                    f"where the others have {out[i]} (dimension {i - ndim})"
                )
            out[i] = d
    return torch.Size(out)


def _lift(x, rank: int):
    """``[rows, *S]`` -> ``[rows, 1, …, 1, *S]`` with ``rank`` per-row dimensions (numbers pass)."""
    if not isinstance(x, Tensor) or x.dim() - 1 >= rank:
        return x
    return x[(slice(None),) + (None,) * (rank - x.dim() + 1)]


_SCALARS: dict = {}


def _scalar(c: float, like: Tensor) -> Tensor:
    """``c`` as a 0-dim tensor of ``like``'s dtype and device (kept: made once per value), so that
    ``c + a·b`` is one ``addcmul`` and ``c + s·a`` one ``add`` where a Python number would cost a
    second pass. Not kept while a dispatch mode is on (a trace or fake tensors would be kept)."""
    if torch._C._len_torch_dispatch_stack() != 0:  # neither kept nor handed out: a real tensor under fake ones
        return torch.full((), c, dtype=like.dtype, device=like.device)
    key = (c, like.dtype, like.device)
    t = _SCALARS.get(key)
    if t is None:
        t = _SCALARS[key] = torch.full((), c, dtype=like.dtype, device=like.device)
    return t


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


#: ATen multiplies a batch of matrices of fewer multiply-adds than this in a scalar loop of
#: its own (~60 ns a product of 3×2 by 2×3): :func:`small_bmm` takes those with a short contraction
_SMALL_BMM = 400


def small_bmm(x: Tensor, y: Tensor) -> bool:
    """Whether ``x @ y`` of stacked rows of batched matrices (``[R, B, r, t] @ [R, B, t, c]``,
    either factor one row) is small enough for :func:`bmm_into`: at most :data:`FEW` terms
    in the contraction, fewer than :data:`_SMALL_BMM` multiply-adds a product, on the CPU
    (where ATen's loop was measured; a GPU's batched GEMM is one launch against ``t``)."""
    return (x.dim() == 4 and y.dim() == 4 and x.device.type == "cpu" and x.shape[-1] <= FEW
            and x.shape[-2] * x.shape[-1] * y.shape[-1] < _SMALL_BMM)  # fmt: skip


def bmm_into(x: Tensor, y: Tensor, dst: Tensor, first: bool) -> Tensor:
    """``dst = x @ y`` (``first``) or ``dst += x @ y`` for :func:`small_bmm` factors, ``dst``
    ``[R, r, c, B]``: the batch innermost, so that each of the ``t`` broadcast multiply-adds
    runs along it (attention's scores of 3 tokens and 2 features a head, 13 rows of 1,024
    batches: 0.34 ms against ATen's 1.5)."""
    xp, yp = x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1)  # [R, r, t, B], [R, t, c, B]
    for k in range(xp.shape[2]):
        u, v = xp[:, :, k, None], yp[:, None, k]
        torch.mul(u, v, out=dst) if first and k == 0 else dst.addcmul_(u, v)
    return dst


def _b_mm(x: Tensor, y: Tensor) -> Tensor:
    if small_bmm(x, y):  # the batch innermost in memory, the shape as bmm's
        shape = (max(x.shape[0], y.shape[0]), x.shape[2], y.shape[3], max(x.shape[1], y.shape[1]))
        return bmm_into(x, y, x.new_empty(shape, dtype=torch.result_type(x, y)), True).permute(0, 3, 1, 2)
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
