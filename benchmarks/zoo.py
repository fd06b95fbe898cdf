"""The models of ``tests/architectures.py`` as the benchmarks save and check them (shared by
``per_call.py`` and ``architectures.py``): saved as a ``torch.jit.trace`` file and a ``.pt2``,
and torch.func's per-point answers to compare jaccli's with.

Imports torch and ``examples/models/make_examples.py`` (on the caller's ``sys.path``), never
jaccli: ``per_call.py --root`` decides which checkout's jaccli runs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import hessian, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class Saved:
    """One model of the zoo saved: its per-point ``shape``, the eager ``module``, the ``files``
    by format, the batch of a static ``.pt2`` (or None) and ``points`` inputs ``x`` (seed 0)."""

    name: str
    shape: tuple[int, ...]
    module: torch.nn.Module
    files: dict[str, Path]
    static: int | None
    x: torch.Tensor


def saved(names, points: int, folder: Path, formats=("pt", "pt2")) -> Iterator[Saved]:
    """Each model of ``names`` (``tests/architectures.py``, on the caller's ``sys.path``)
    traced and saved in ``formats`` under ``folder``, with its inputs."""
    from architectures import ZOO, trace

    for name in names:
        shape = ZOO[name][1]
        traced, module = trace(name)
        files, static = save_formats(name, shape, traced, module, folder, formats)
        x = torch.randn(points, *shape, generator=torch.Generator().manual_seed(0))
        yield Saved(name, shape, module, files, static, x)


def save_formats(name: str, shape, traced, module, folder: Path,
                 formats=("pt", "pt2")) -> tuple[dict[str, Path], int | None]:  # fmt: skip
    """The model saved in each of ``formats`` (``traced`` as ``.pt``, ``module`` exported as
    ``.pt2``), and the batch a static ``.pt2`` was exported at (None where the batch is dynamic)."""
    import make_examples  # examples/models/make_examples.py

    example, files, static = (torch.randn(2, *shape),), {}, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notes
        if "pt" in formats:
            files["pt"] = folder / f"{name}.pt"
            torch.jit.save(traced, files["pt"])
        if "pt2" in formats:
            files["pt2"] = folder / f"{name}.pt2"
            try:
                make_examples.save_export(module, example, files["pt2"])
            except Exception:  # MultiheadAttention specialises the batch: static, as users must
                make_examples.save_export(module, example, files["pt2"], dynamic=False)
                static = 2
    return files, static


def func_hessian(net, shape, static_batch: int | None):
    """torch.func's per-sample Hessian of ``net``: ``vmap(hessian)`` of one point's outputs. A
    ``.pt2`` exported with a static batch is called on that many copies of the point (row 0
    read: the points are independent, so its derivatives are the point's own)."""

    def one(xi):
        xb = xi.reshape(1, *shape)
        if static_batch is not None:
            xb = xb.expand(static_batch, *shape)
        return net(xb)[0].reshape(-1)

    flat = vmap(hessian(one))
    return lambda x: flat(x.reshape(x.shape[0], -1))  # [N, outputs, n, n] of n = one point's numel


def reference(kind: str, module, x: torch.Tensor) -> torch.Tensor:
    """The float64 ``jacobian``, ``hessian`` or ``laplacian`` of the eager module at the points
    ``x`` by torch.func, one point per call (vmapped), on a float64 copy of the module."""
    m = copy.deepcopy(module).double().requires_grad_(False)
    shape = x.shape[1:]
    with sdpa_kernel([SDPBackend.MATH]):  # torch.func's second derivatives need the math kernel
        if kind == "jacobian":
            flat = x.double().reshape(x.shape[0], -1)
            return vmap(jacrev(lambda xi: m(xi.reshape(1, *shape))[0].reshape(-1)))(flat)
        h = func_hessian(m, shape, None)(x.double())
    return h if kind == "hessian" else h.diagonal(dim1=-2, dim2=-1).sum(-1)
