"""The example models and inputs: what ``jaccli example NAME|all [DIR]`` writes.

Shipped with the package (pip users have no clone) and run by
``examples/models/make_examples.py``, which regenerates the copies in the repository:

    jaccli example all DIR        # or: python examples/models/make_examples.py [OUTDIR]

Every model is built from fixed seeds, so the files are reproducible; each is saved
as a TorchScript archive (``NAME.pt``) and as a ``torch.export`` program with a
dynamic batch dimension (``NAME.pt2``), next to an example input ``NAME_x.npy``
(``NAME_inputs.npz`` for a model of several arguments).

- ``pinn``: the classic physics-informed network, a 1→50→50→50→501 tanh MLP; also as
  ``pinn.safetensors`` (self-describing, loads without code) and ``pinn_state.pt`` (a
  plain state dict, for ``--arch mlp --activation tanh`` or ``--arch make_examples.py:pinn``).
- ``ode``: the exact solution of a damped oscillator, t ↦ e^{-γt} (cos ωt, sin ωt).
- ``field``: a vector field R³→R³, F(x) = A x + b ⊙ tanh(x), divergence tr A + Σ bᵢ sech²xᵢ.
- ``potential``: a scalar potential R³→R, V(x) = ½ xᵀQx + Σ log cosh xᵢ + c·x.
- ``decay``: two arguments, g(t, x) = e^{-t} sin x + t² x with t [N] and x [N, 3, 2, 2].
- ``heat``: an exact solution of the heat equation u_t = 0.1 u_xx on points (t, x).
- ``cnn``: a small image classifier (3×32×32 → 10 logits; convolutions, BatchNorm,
  GroupNorm, a residual block, pooling).
- ``transformer``: a 2-layer causal transformer encoder over 16 tokens × 64 features,
  one scalar per token.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: the repository's copies (``make_examples.py`` without OUTDIR writes there)
HERE = Path(__file__).resolve().parents[2] / "examples" / "models"


def pinn(width: int = 50, depth: int = 3, outputs: int = 501) -> nn.Sequential:
    """1→50→50→50→501 tanh MLP with Xavier-initialised weights (also an ``--arch`` factory)."""
    torch.manual_seed(0)
    sizes = [1] + [width] * depth + [outputs]
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


class Decay(nn.Module):
    """g(t, x) = e^{-t} sin x + t² x for t [N] and x [N, 3, 2, 2]: output [N, 3, 2, 2]."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t[:, None, None, None]
        return torch.exp(-tt) * torch.sin(x) + tt * tt * x


class Heat(nn.Module):
    """u(t, x) = e^{-κt} sin x + ½ e^{-4κt} cos 2x, κ = 0.1, on points (t, x): an exact
    solution of the heat equation u_t = κ u_xx (for ``jaccli partials --fail-above``)."""

    def __init__(self, kappa: float = 0.1) -> None:
        super().__init__()
        self.kappa = kappa

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        t, x = p[:, 0:1], p[:, 1:2]
        k = self.kappa
        return torch.exp(-k * t) * torch.sin(x) + 0.5 * torch.exp(-4 * k * t) * torch.cos(2 * x)


class SmallCNN(nn.Module):
    """An image classifier head: 4 convolutions (one strided, one grouped), BatchNorm and
    GroupNorm in eval mode, a residual block, average pooling, tanh/SiLU, ``classes`` logits."""

    def __init__(self, channels: int = 3, width: int = 8, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        w = width
        self.c1 = nn.Conv2d(channels, w, 3, padding=1)
        self.bn = nn.BatchNorm2d(w)
        self.c2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(4, 2 * w)
        self.c4 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.fc = nn.Linear(2 * w, classes)
        with torch.no_grad():  # running statistics as after training, not the identity
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn(self.c1(x)))
        h = torch.tanh(self.c2(h))
        h = nn.functional.silu(self.gn(self.c3(h)))
        h = h + torch.tanh(self.c4(h))
        h = nn.functional.avg_pool2d(h, 2)
        return self.fc(h.mean((2, 3)))


class SmallTransformer(nn.Module):
    """A causal transformer encoder over ``[tokens, dim]`` sequences (GELU, LayerNorm,
    scaled dot-product attention), one scalar per token."""

    def __init__(self, tokens: int = 16, dim: int = 64, heads: int = 4, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 1)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, mask=self.mask, is_causal=True)).squeeze(-1)


def examples() -> dict[str, tuple[nn.Module, dict[str, np.ndarray]]]:
    """Each example's module and its example inputs by argument name."""
    rng = np.random.default_rng(3)
    return {
        "pinn": (pinn(), {"x": np.linspace(0.0, 1.0, 1000, dtype=np.float32)[:, None]}),
        "ode": (DampedOscillator(), {"t": np.linspace(0.0, 10.0, 200, dtype=np.float32)[:, None]}),
        "field": (VectorField(), {"x": rng.standard_normal((500, 3)).astype(np.float32)}),
        "potential": (Potential(), {"x": rng.standard_normal((500, 3)).astype(np.float32)}),
        "decay": (
            Decay(),
            {
                "t": np.linspace(0.0, 2.0, 64, dtype=np.float32),
                "x": rng.standard_normal((64, 3, 2, 2)).astype(np.float32),
            },
        ),
        "heat": (
            Heat(),
            {"x": np.stack([rng.uniform(0, 1, 256), rng.uniform(0, 2 * np.pi, 256)], 1).astype(np.float32)},
        ),
        "cnn": (SmallCNN(), {"x": rng.standard_normal((16, 3, 32, 32)).astype(np.float32)}),
        "transformer": (SmallTransformer(), {"x": rng.standard_normal((16, 16, 64)).astype(np.float32)}),
    }


def save_torchscript(module: nn.Module, path: Path) -> Path:
    """``torch.jit.script`` + ``torch.jit.save``, quiet about their deprecation (still loadable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), path)
    return path


def save_export(module: nn.Module, example, path: Path, dynamic: bool = True) -> Path:
    """``torch.export`` with a dynamic batch dimension on every argument (or static, if not ``dynamic``)."""
    example = example if isinstance(example, tuple) else (example,)
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} for _ in example)
    torch.export.save(torch.export.export(module.eval(), example, dynamic_shapes=shapes), path)
    return path


def save(name: str, module: nn.Module, inputs: dict[str, np.ndarray], outdir: Path) -> list[Path]:
    """NAME.pt (TorchScript), NAME.pt2 (torch.export, dynamic batch) and NAME_x.npy or NAME_inputs.npz."""
    if len(inputs) == 1:
        data = outdir / f"{name}_x.npy"
        np.save(data, next(iter(inputs.values())))
    else:
        data = outdir / f"{name}_inputs.npz"
        np.savez(data, **inputs)
    example = tuple(torch.from_numpy(v[:4]) for v in inputs.values())
    return [
        save_torchscript(module, outdir / f"{name}.pt"),
        save_export(module, example, outdir / f"{name}.pt2"),
        data,
    ]


def save_weights(module: nn.Sequential, outdir: Path, name: str) -> list[Path]:
    """The safe routes: a self-describing safetensors file and a plain state dict."""
    from jaccli import save_mlp

    save_mlp(module, outdir / f"{name}.safetensors", force=True)
    torch.save(module.state_dict(), outdir / f"{name}_state.pt")
    return [outdir / f"{name}.safetensors", outdir / f"{name}_state.pt"]


def file_names(name: str, n_inputs: int) -> list[str]:
    """The files :func:`write` makes for example ``name``, in the order it writes them."""
    files = [f"{name}.pt", f"{name}.pt2", f"{name}_x.npy" if n_inputs == 1 else f"{name}_inputs.npz"]
    return files + ([f"{name}.safetensors", f"{name}_state.pt"] if name == "pinn" else [])


def write(name: str, module: nn.Module, inputs: dict[str, np.ndarray], outdir: Path) -> list[Path]:
    """Every file of one example (the pinn's weights files too)."""
    paths = save(name, module, inputs, outdir)
    if name == "pinn":
        paths += save_weights(module, outdir, name)
    return paths


def main(outdir: Path = HERE) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    for name, (module, inputs) in examples().items():
        for path in write(name, module, inputs, outdir):
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
