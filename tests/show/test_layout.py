"""jaccli.show.layout: results split into points, output components, labelled rows and columns."""

from __future__ import annotations

import numpy as np
import pytest

from jaccli.show.layout import Layout, axis_names, index_label

# (kind, axes, shape, args) -> (points, components, rows, cols, first row label, last column label)
LAYOUTS = [
    ("jacobian", ["out", "in"], (3, 3), ("x",), (1, 1, 3, 3, "out[0]", "x[2]")),
    ("jacobian", ["sample", "out", "in"], (5, 501, 1), ("input",), (5, 1, 501, 1, "out[0]", "input[0]")),
    ("jacobian", ["sample", "out0", "out1", "in0", "in1"], (2, 2, 3, 4, 5), ("x",), (2, 1, 6, 20, "out[0,0]", "x[3,4]")),
    ("jacobian", ["sample", "in"], (4, 3), ("x",), (4, 1, 1, 3, "out", "x[2]")),  # scalar output
    ("hessian", ["sample", "in", "in'"], (7, 3, 3), ("x", "x"), (7, 1, 3, 3, "x[0]", "x[2]")),
    ("hessian", ["out", "in", "in'"], (4, 2, 2), ("t", "x"), (1, 4, 2, 2, "t[0]", "x[1]")),
    ("hessian", ["sample", "out", "in", "in'"], (9, 501, 1, 1), ("x", "x"), (9, 1, 501, 1, "out[0]", "∂²/∂x²")),
    ("divergence", ["sample"], (6,), (), (6, 1, 1, 1, "out", "div")),
    ("laplacian", ["sample", "out"], (6, 4), (), (6, 1, 1, 4, "out", "out[3]")),
]


@pytest.mark.parametrize("kind,axes,shape,args,want", LAYOUTS, ids=[f"{k}-{'x'.join(map(str, s))}" for k, _, s, _, _ in LAYOUTS])
def test_layouts(kind, axes, shape, args, want):
    lay = Layout.of(kind, axes, shape, args=args)
    points, comps, rows, cols, first_row, last_col = want
    assert (lay.points, lay.components, lay.rows, lay.cols) == (points, comps, rows, cols)
    assert lay.row_label(0) == first_row and lay.col_label(cols - 1) == last_col
    assert lay.blocks(np.zeros(shape)).shape == (points, comps, rows, cols)


def test_blocks_keep_the_entries_in_place():
    t = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)  # [N, out, in, in']
    lay = Layout.of("hessian", ["sample", "out", "in", "in'"], t.shape, args=("x", "x"))
    b = lay.blocks(t)
    assert b[1, 2, 0, 1] == t[1, 2, 0, 1] and lay.comp_label(2) == "out[2]"
    assert lay.blocks(t[:1]).shape == (1, 3, 2, 2)  # the first points alone


def test_index_labels_and_axis_names():
    assert index_label("x", (), 0) == "x"
    assert index_label("x", (3, 2, 2), 7) == "x[1,1,1]"
    assert axis_names(True, 5, (2,)) == ["sample", "out0", "out1", "in0", "in1"]
    assert axis_names(False, 3, (1, 1)) == ["out", "in", "in'"]
