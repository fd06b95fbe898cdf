"""Generate the example models and inputs in this folder.

    python examples/models/make_examples.py [OUTDIR]

Every model is built from fixed seeds, so the files are reproducible; each is saved
as a TorchScript archive (``NAME.pt``) and as a ``torch.export`` program with a
dynamic batch dimension (``NAME.pt2``), next to an example input ``NAME_x.npy``.

- ``pinn``: the classic physics-informed network, a 1→50→50→50→501 tanh MLP.
- ``ode``: the exact solution of a damped oscillator, t ↦ e^{-γt} (cos ωt, sin ωt).
- ``field``: a vector field R³→R³, F(x) = A x + b ⊙ tanh(x), divergence tr A + Σ bᵢ sech²xᵢ.
- ``potential``: a scalar potential R³→R, V(x) = ½ xᵀQx + Σ log cosh xᵢ + c·x.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def pinn() -> nn.Module:
    """1→50→50→50→501 tanh MLP with Xavier-initialised weights."""
    torch.manual_seed(0)
    sizes = [1, 50, 50, 50, 501]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(a, b)
        nn.init.xavier_normal_(linear.weight)
        nn.init.normal_(linear.bias, std=0.1)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class DampedOscillator(nn.Module):
    """u(t) = e^{-γt} (cos ωt, sin ωt) for t of shape [N, 1]: output [N, 2]."""

    def __init__(self, gamma: float = 0.3, omega: float = 2.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor(gamma))
        self.omega = nn.Parameter(torch.tensor(omega))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        phase = self.omega * t
        return torch.exp(-self.gamma * t) * torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class VectorField(nn.Module):
    """F(x) = A x + b ⊙ tanh(x) for x of shape [N, 3]."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.A = nn.Parameter(torch.randn(3, 3, generator=g))
        self.b = nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A.T + self.b * torch.tanh(x)


class Potential(nn.Module):
    """V(x) = ½ xᵀQx + Σ log cosh xᵢ + c·x for x of shape [N, 3]: output [N]."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.Q = nn.Parameter(torch.randn(3, 3, generator=g))
        self.c = nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quad = 0.5 * ((x @ self.Q) * x).sum(-1)
        return quad + torch.log(torch.cosh(x)).sum(-1) + x @ self.c


def examples() -> dict[str, tuple[nn.Module, np.ndarray]]:
    """Each example's module (eval mode) and example input."""
    rng = np.random.default_rng(3)
    return {
        "pinn": (pinn(), np.linspace(0.0, 1.0, 1000, dtype=np.float32)[:, None]),
        "ode": (DampedOscillator(), np.linspace(0.0, 10.0, 200, dtype=np.float32)[:, None]),
        "field": (VectorField(), rng.standard_normal((500, 3)).astype(np.float32)),
        "potential": (Potential(), rng.standard_normal((500, 3)).astype(np.float32)),
    }


def save_torchscript(module: nn.Module, path: Path) -> Path:
    """``torch.jit.script`` + ``torch.jit.save``, quiet about their deprecation (still loadable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), path)
    return path


def save_export(module: nn.Module, example: torch.Tensor, path: Path, dynamic: bool = True) -> Path:
    """``torch.export`` with a dynamic batch dimension (or the example's, if not ``dynamic``)."""
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    torch.export.save(torch.export.export(module.eval(), (example,), dynamic_shapes=shapes), path)
    return path


def save(name: str, module: nn.Module, x: np.ndarray, outdir: Path) -> list[Path]:
    """Write NAME.pt (TorchScript), NAME.pt2 (torch.export, dynamic batch) and NAME_x.npy."""
    np.save(outdir / f"{name}_x.npy", x)
    return [
        save_torchscript(module, outdir / f"{name}.pt"),
        save_export(module, torch.from_numpy(x[:4]), outdir / f"{name}.pt2"),
        outdir / f"{name}_x.npy",
    ]


def main(outdir: Path = HERE) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    for name, (module, x) in examples().items():
        for path in save(name, module, x, outdir):
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
