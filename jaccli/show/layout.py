"""How one derivative result splits into points, output components, rows and columns.

A result of :func:`jaccli.jacobian` is ``[N, *out, *in]`` (``N`` only per sample); a
Hessian is ``[N, *out, *in, *in']``; a divergence or Laplacian ``[N, *out]``. Tables,
summaries and pictures all need the same view: for every point, one matrix per output
component (Hessians) or one matrix (Jacobians) with labelled rows and columns. This
module computes that view from the axis names alone (``sample``, ``out``, ``in``,
``in'``, numbered when there are several: ``out0``, ``out1``), so it needs no torch at
import time and works on any array with ``reshape``.

>>> lay = Layout.of("jacobian", ["sample", "out", "in"], (5, 2, 3), args=("x",))
>>> lay.points, lay.rows, lay.cols, lay.row_label(1), lay.col_label(2)
(5, 2, 3, 'out[1]', 'x[2]')
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jaccli.request.kinds import kind as kind_of

# Per kind, the axis groups that make the (component, row, column) of one point's block are
# its record's ``groups`` (jaccli.request.kinds); a kind without rows (divergence, Laplacian)
# has a row of output components per point, and a scalar per point is titled by its symbol.


def group_of(axis: str) -> str:
    """``out1`` -> ``out``; ``in'0`` -> ``in'``; ``sample`` -> ``sample``."""
    return axis.rstrip("0123456789")


def axis_names(per_sample: bool, ndim: int, in_ndims: tuple[int, ...] = ()) -> list[str]:
    """Names of a result's axes: ``sample``, ``out``, ``in`` (and ``in'`` for a Hessian).

    ``in_ndims`` holds the number of input axes the result ends with: none for a
    divergence or Laplacian, one entry for a Jacobian, two for a Hessian block.
    Several axes of one kind are numbered (``out0``, ``out1``).
    """

    def group(name: str, count: int) -> list[str]:
        return [name] if count == 1 else [f"{name}{i}" for i in range(count)]

    lead = ["sample"] if per_sample else []
    n_out = ndim - len(lead) - sum(in_ndims)
    names = lead + group("out", n_out)
    for name, count in zip(("in", "in'"), in_ndims):
        names += group(name, count)
    return names


def index_label(prefix: str, shape: tuple[int, ...], flat: int) -> str:
    """``x[2]``, ``out[0,1]`` for the element ``flat`` of an axis group of ``shape``; ``out`` for ``()``."""
    if not shape:
        return prefix
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return f"{prefix}[{','.join(map(str, reversed(idx)))}]"


@dataclass(frozen=True)
class Layout:
    """The per-point block structure of one result (see the module docstring)."""

    kind: str
    shape: tuple[int, ...]
    per_sample: bool
    comp_shape: tuple[int, ...]
    row_shape: tuple[int, ...]
    col_shape: tuple[int, ...]
    row_name: str = "out"
    col_name: str = "in"
    #: label of the single column when a Hessian's blocks are 1 x 1 (``∂²/∂x²``)
    col_title: str | None = None

    @classmethod
    def of(cls, kind: str, axes: list[str], shape, *, args: tuple[str, ...] = (), per_sample: bool | None = None) -> Layout:
        """The layout of a result with axis names ``axes``; ``args`` names the
        differentiated argument(s) of the ``in`` (and ``in'``) axes, for labels.

        A Hessian whose blocks are 1 x 1 (one input coordinate per point, as for u(x)
        on a line) is shown as a column over the output components instead of many
        1 x 1 blocks.
        """
        shape = tuple(int(s) for s in shape)
        groups = [group_of(a) for a in axes]
        if len(groups) != len(shape):
            raise ValueError(f"{len(axes)} axis names for a result of {len(shape)} axes")
        sizes = {g: tuple(s for s, gg in zip(shape, groups) if gg == g) for g in ("out", "in", "in'")}
        record = kind_of(kind)
        comp_g, row_g, col_g = record.groups
        names = list(args)
        arg_a = names[0] if names else "in"
        arg_b = names[1] if len(names) > 1 else arg_a
        label = {"out": "out", "in": arg_a, "in'": arg_b}
        pick = lambda g: sizes[g] if g else ()  # noqa: E731
        lay = cls(
            kind=kind,
            shape=shape,
            per_sample="sample" in groups if per_sample is None else per_sample,
            comp_shape=pick(comp_g),
            row_shape=pick(row_g),
            col_shape=pick(col_g),
            row_name=label.get(row_g, "out"),
            col_name=label.get(col_g, "out"),
        )
        if row_g is None and not lay.col_shape:
            return cls(kind, shape, lay.per_sample, (), (), (), "out", "", record.symbol)
        if comp_g is not None and lay.rows * lay.cols == 1 and lay.components > 1:
            title = f"∂²/∂{arg_a}²" if arg_a == arg_b else f"∂²/∂{arg_a}∂{arg_b}"
            return cls(kind, shape, lay.per_sample, (), lay.comp_shape, (), "out", "", title)
        return lay

    @property
    def points(self) -> int:
        return self.shape[0] if self.per_sample else 1

    @property
    def components(self) -> int:
        return math.prod(self.comp_shape)

    @property
    def rows(self) -> int:
        return math.prod(self.row_shape)

    @property
    def cols(self) -> int:
        return math.prod(self.col_shape)

    def blocks(self, t):
        """``t`` (or its first points) viewed as ``[points, components, rows, cols]`` (any array with ``reshape``)."""
        return t.reshape(-1, self.components, self.rows, self.cols)

    def row_label(self, i: int) -> str:
        return index_label(self.row_name, self.row_shape, i)

    def col_label(self, j: int) -> str:
        if self.col_title is not None:
            return self.col_title
        return index_label(self.col_name, self.col_shape, j)

    def comp_label(self, k: int) -> str:
        return index_label("out", self.comp_shape, k)
