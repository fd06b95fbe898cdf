"""jaccli's own broadcast_shapes (which keeps sympy out of a command's start) agrees with
torch.broadcast_shapes on every concrete shape, including the ones torch refuses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jaccli.jets.jet import broadcast_shapes

# sizes 0, 1 and a few others, so that equal, broadcastable and clashing sizes all turn up often
SIZE = st.sampled_from([0, 1, 1, 2, 3, 5])
SHAPE = st.lists(SIZE, max_size=5).map(tuple)


def torch_says(shapes):
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return RuntimeError


def ours(shapes):
    try:
        return broadcast_shapes(*shapes)
    except RuntimeError:
        return RuntimeError


@settings(max_examples=400, deadline=None)
@given(st.lists(SHAPE, max_size=4))
def test_agrees_with_torch(shapes):
    want = torch_says(shapes)
    got = ours(shapes)
    assert got == want
    if want is not RuntimeError:
        assert type(got) is torch.Size


@settings(max_examples=200, deadline=None)
@given(SHAPE, st.data())
def test_shapes_made_to_broadcast_agree(shape, data):
    # shapes derived from one target by dropping leading dims and setting some sizes to 1
    # always broadcast: this covers the success path, which random shapes reach less often
    others = []
    for _ in range(data.draw(st.integers(1, 3))):
        cut = data.draw(st.integers(0, len(shape)))
        others.append(tuple(1 if data.draw(st.booleans()) else d for d in shape[cut:]))
    assert ours([shape, *others]) == torch.broadcast_shapes(shape, *others) == torch.Size(shape)


@pytest.mark.parametrize(
    ("shapes", "want"),
    [((), torch.Size([])), (((3, 1), (1, 4)), torch.Size([3, 4])), ((torch.Size([2, 1, 5]), (7, 1)), torch.Size([2, 7, 5])), (((0,), (1,)), torch.Size([0]))],
)
def test_examples(shapes, want):
    assert broadcast_shapes(*shapes) == want


def test_a_clash_names_the_argument():
    with pytest.raises(RuntimeError, match="argument 1 has size 3 where the others have 2"):
        broadcast_shapes((2, 4), (3, 4))
