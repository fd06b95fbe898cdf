"""Comparing jaccli's two engines: the Taylor fast path against its own torch.func strategies.

"torch.func" below always means the engine's strategies with the fast path switched off,
so every comparison is between the two engines on the same request. Tolerances are
relative to the largest entry of the reference: 1e-12 in float64, 1e-6 in float32.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import jaccli
from jaccli.engine import planner

REL = {torch.float32: 1e-6, torch.float64: 1e-12}
KINDS = ("jacobian", "hessian", "laplacian", "divergence")


def assert_rel(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= REL[dtype] * max(scale, torch.finfo(dtype).tiny), f"max error {err:.3g} at scale {scale:.3g}"


def torch_func(kind: str, f, x, **kwargs):
    """The same request with the fast path off (advice about kinks in the model silenced)."""
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", jaccli.JaccliWarning)
        mp.setattr(planner, "FAST_PATH", False)
        assert jaccli.plan(kind, f, x, **{k: v for k, v in kwargs.items() if k != "seed"}).engine == "torch.func"
        return getattr(jaccli, kind)(f, x, **kwargs)


def square(f, x) -> bool:
    with torch.no_grad():
        return f(x[:2]).shape[1:] == x.shape[1:]


def mlp3() -> nn.Module:
    """A small float64 tanh network 3 -> 4 -> 3."""
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


def points(n: int = 5, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """``n`` points in (0.5, 1.5)³, where every op case is smooth."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) + 0.5).to(dtype)
