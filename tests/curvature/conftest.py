"""What the curvature tests share: one classifier saved in every format jaccli loads."""

from __future__ import annotations

import warnings

import pytest
import torch

import jaccli
from problems import save_export, save_torchscript, tanh_mlp


@pytest.fixture(scope="module")
def saved_formats(tmp_path_factory):
    """A tanh MLP 2 → 5 → 3 (float64) in every format, 9 inputs and class labels: ``(dir, net, x, y)``."""
    d = tmp_path_factory.mktemp("formats")
    net = tanh_mlp((2, 5, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    save_torchscript(net, d / "script.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, x[:4]), d / "trace.pt")
    save_export(net, x[:4], d / "dynamic.pt2")
    save_export(net, x[:4], d / "static.pt2", dynamic=False)
    jaccli.save_mlp(net, d / "mlp.safetensors")
    torch.save(net.state_dict(), d / "state.pt")
    return d, net, x, y
