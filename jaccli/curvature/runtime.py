"""Where an :class:`~.objective.Objective` runs: the ranks of ``torch.distributed`` it shards
the samples over, and the bytes one call of the model allocates (which size its chunks, column
blocks and kept graphs).

Imports: torch, :mod:`jaccli.jets.dispatch` (a dispatch mode that leaves ``torch._dynamo`` unimported).
"""

from __future__ import annotations

import torch

from jaccli.jets.dispatch import QuietDispatchMode


class _Bytes(QuietDispatchMode):
    """Counts the bytes of every tensor the ops produce: a model's activations per call
    (``bytes``), and of those that are not views (``fresh``: memory a kept graph holds; a
    weight's ``t()`` is a view, yet its size made ``bytes`` of a 0.5M-parameter MLP 20× its
    activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.fresh = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
                if t.untyped_storage().data_ptr() not in inputs:  # not a view of an input
                    self.fresh += t.numel() * t.element_size()
        return out


def dist_info() -> tuple[int, int]:
    """(world size, rank) of the ``torch.distributed`` group, (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks (``t`` itself in one process)."""
    import torch.distributed as dist

    if dist_info()[0] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
