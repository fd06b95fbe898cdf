"""Problems with exact derivatives, shared by every test module.

Each :class:`Exact` is a batch-aware model ``f: [N, *in] -> [N, *out]`` in float64
with closed-form derivatives per point. The example models of
``examples/models/make_examples.py`` are here too, so the shipped files are checked
against the same formulas.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from jaccli.load.weights import build_mlp

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "models"
#: the time limit of a subprocess in a test: a guard against a hang, never a timing a test
#: relies on (torch's start-up on a loaded 2-core machine can take a minute or more)
HANG_GUARD_S = 900


def load_module(name: str, path: Path):
    """The Python file ``path`` as a module called ``name``, registered in ``sys.modules``
    (a dataclass in it looks its module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def benchmark(stem: str):
    """``benchmarks/<stem>.py`` as the module ``bench_<stem>``, with ``benchmarks/`` on the path
    for its own imports (appended, not prepended: tests/architectures.py, the models, must win
    over a benchmark's name)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    return load_module(f"bench_{stem}", ROOT / "benchmarks" / f"{stem}.py")


make_examples = load_module("make_examples", EXAMPLES / "make_examples.py")
save_torchscript = make_examples.save_torchscript
save_export = make_examples.save_export

torch.manual_seed(1234)
_A = torch.randn(4, 3, dtype=torch.float64)
_Q = torch.randn(3, 3, dtype=torch.float64)


def _sech2(x):
    return 1 - torch.tanh(x) ** 2


@dataclass
class Exact:
    """A model with closed-form per-point derivatives (each takes one point ``xi``)."""

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    point_shape: tuple[int, ...]
    jacobian: Callable[[torch.Tensor], torch.Tensor]
    hessian: Callable[[torch.Tensor], torch.Tensor] | None = None

    def points(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.rand((n, *self.point_shape), generator=g, dtype=torch.float64) + 0.5

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.f(self.points(1)).shape[1:])

    def per_point(self, fn, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([fn(xi) for xi in x])

    def laplacian(self, xi: torch.Tensor) -> torch.Tensor:
        h = self.hessian(xi)
        n = math.prod(self.point_shape)
        return h.reshape(*h.shape[: h.dim() - 2 * len(self.point_shape)], n, n).diagonal(dim1=-2, dim2=-1).sum(-1)

    def divergence(self, xi: torch.Tensor) -> torch.Tensor:
        n = math.prod(self.point_shape)
        return self.jacobian(xi).reshape(n, n).trace()

    @property
    def square(self) -> bool:
        return self.out_shape == self.point_shape


def _polar(x):
    r, th = x[..., 0], x[..., 1]
    return torch.stack([r * torch.cos(th), r * torch.sin(th)], dim=-1)


def _polar_j(xi):
    r, th = xi
    c, s = torch.cos(th), torch.sin(th)
    return torch.stack([torch.stack([c, -r * s]), torch.stack([s, r * c])])


def _polar_h(xi):
    r, th = xi
    c, s = torch.cos(th), torch.sin(th)
    z = torch.zeros((), dtype=xi.dtype)
    hx = torch.stack([torch.stack([z, -s]), torch.stack([-s, -r * c])])
    hy = torch.stack([torch.stack([z, c]), torch.stack([c, -r * s])])
    return torch.stack([hx, hy])


def _matsq(x):
    return x @ x


def _matsq_j(xi):
    # d(X²)_ij / dX_kl = δ_ik X_lj + X_ik δ_jl
    eye = torch.eye(2, dtype=xi.dtype)
    return torch.einsum("ik,lj->ijkl", eye, xi) + torch.einsum("ik,jl->ijkl", xi, eye)


def _matsq_h(xi):
    # d²(X²)_ij / dX_kl dX_mn = δ_ik δ_lm δ_nj + δ_im δ_nk δ_jl
    e = torch.eye(2, dtype=xi.dtype)
    return torch.einsum("ik,lm,nj->ijklmn", e, e, e) + torch.einsum("im,nk,jl->ijklmn", e, e, e)


def _field():
    return make_examples.VectorField().double().requires_grad_(False)


def _potential():
    return make_examples.Potential().double().requires_grad_(False)


def _oscillator():
    return make_examples.DampedOscillator().double().requires_grad_(False)


FIELD, POTENTIAL, OSCILLATOR = _field(), _potential(), _oscillator()


def _field_j(xi):
    return FIELD.A + torch.diag(FIELD.b * _sech2(xi))


def _field_h(xi):
    # F_i = Σ_j A_ij x_j + b_i tanh x_i: only ∂²F_i/∂x_i² = -2 b_i tanh x_i sech² x_i
    h = torch.zeros(3, 3, 3, dtype=xi.dtype)
    vals = -2 * FIELD.b * torch.tanh(xi) * _sech2(xi)
    idx = torch.arange(3)
    h[idx, idx, idx] = vals
    return h


def _potential_j(xi):
    Q, c = POTENTIAL.Q, POTENTIAL.c
    return 0.5 * (Q + Q.T) @ xi + torch.tanh(xi) + c


def _potential_h(xi):
    Q = POTENTIAL.Q
    return 0.5 * (Q + Q.T) + torch.diag(_sech2(xi))


def _osc_j(ti):
    g, w = float(OSCILLATOR.gamma), float(OSCILLATOR.omega)
    t = ti[0]
    e = torch.exp(-g * t)
    return torch.stack(
        [e * (-g * torch.cos(w * t) - w * torch.sin(w * t)), e * (-g * torch.sin(w * t) + w * torch.cos(w * t))]
    )[:, None]


def _osc_h(ti):
    g, w = float(OSCILLATOR.gamma), float(OSCILLATOR.omega)
    t = ti[0]
    e = torch.exp(-g * t)
    c, s = torch.cos(w * t), torch.sin(w * t)
    u = (g * g - w * w) * c + 2 * g * w * s
    v = (g * g - w * w) * s - 2 * g * w * c
    return (e * torch.stack([u, v]))[:, None, None]


PROBLEMS = [
    Exact("linear", lambda x: x @ _A.T, (3,), lambda xi: _A, lambda xi: torch.zeros(4, 3, 3, dtype=xi.dtype)),
    Exact(
        "quadratic",
        lambda x: ((x @ _Q) * x).sum(-1),
        (3,),
        lambda xi: (_Q + _Q.T) @ xi,
        lambda xi: _Q + _Q.T,
    ),
    Exact("polar", _polar, (2,), _polar_j, _polar_h),
    Exact("matrix_square", _matsq, (2, 2), _matsq_j, _matsq_h),
    Exact("field", FIELD, (3,), _field_j, _field_h),
    Exact("potential", POTENTIAL, (3,), _potential_j, _potential_h),
    Exact("oscillator", OSCILLATOR, (1,), _osc_j, _osc_h),
]
BY_NAME = {p.name: p for p in PROBLEMS}


def tanh_mlp(sizes=(3, 16, 16, 2), dtype=torch.float64, seed=0, act: str = "tanh") -> nn.Sequential:
    """A small MLP with no closed form (checked by finite differences): jaccli's own MLP builder."""
    torch.manual_seed(seed)
    return build_mlp(list(sizes), act).to(dtype).eval()


def fd_jacobian(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central finite differences in float64 of ``f`` at one point: ``out + in``."""
    x = x.double()
    cols = []
    flat = x.reshape(-1)
    for j in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[j] = h
        cols.append((f((flat + e).reshape(x.shape)) - f((flat - e).reshape(x.shape))) / (2 * h))
    out = torch.stack(cols, dim=-1)
    return out.reshape(*out.shape[:-1], *x.shape)


# --------------------------------------------------------------------------- the estimators' own errors
# What an estimate's reported standard error should be, from the exact matrix: so that a test
# comparing an estimate with the truth "within k of its standard errors" cannot pass on a
# standard error that is wrong, or merely large.


def hutchinson_se(a, products: int) -> float:
    """The standard error of Rademacher Hutchinson's trace of ``a`` from ``products`` probes:
    ``Var(zᵀAz) = 2(‖A‖²_F − Σ Aᵢᵢ²)``."""
    a = torch.as_tensor(a, dtype=torch.float64)
    return math.sqrt(2 * float((a * a).sum() - (a.diagonal() ** 2).sum()) / products)


def trace_se_bound(a, products: int) -> float:
    """A bound on the standard error of a trace of ``a`` from ``products`` products, Hutch++ or
    Hutchinson: Hutch++'s deflated probes are the fewest, ``products − 2⌊products/3⌋``, and a
    projected Rademacher vector ``Πg`` has ``Var(gᵀΠAΠg) ≤ 2‖ΠAΠ‖²_F ≤ 2‖A‖²_F``."""
    a = torch.as_tensor(a, dtype=torch.float64)
    return math.sqrt(2 * float((a * a).sum()) / max(2, products - 2 * (products // 3)))


def diagonal_se(a, products: int) -> torch.Tensor:
    """Each entry's standard error of Rademacher Hutchinson's diagonal of ``a`` from ``products``
    probes: ``zᵢ(Az)ᵢ = Aᵢᵢ + Σⱼ≠ᵢ Aᵢⱼ zᵢzⱼ``, of variance ``Σⱼ≠ᵢ Aᵢⱼ²``."""
    a = torch.as_tensor(a, dtype=torch.float64)
    return (((a * a).sum(1) - a.diagonal() ** 2) / products).sqrt()


# --------------------------------------------------------------------------- higher orders (jaccli partials)
# Each: a batch model on points [N, n_in], input names, and closed forms of named partials.

#: a sum of damped oscillators u(t) = Σ a e^{-γt} cos(ωt + φ), v(t) = Σ a e^{-γt} sin(ωt + φ):
#: the n-th derivative is Re / Im of Σ a e^{iφ} sⁿ e^{st} with s = -γ + iω, exact to any order
OSCILLATORS = [(1.0, 0.3, 2.0, 0.1), (0.5, 0.1, 5.0, -0.7), (0.25, 0.8, 0.5, 1.3)]  # (a, γ, ω, φ)


def oscillators(p: torch.Tensor) -> torch.Tensor:
    t = p[:, 0]
    u = sum(a * torch.exp(-g * t) * torch.cos(w * t + ph) for a, g, w, ph in OSCILLATORS)
    v = sum(a * torch.exp(-g * t) * torch.sin(w * t + ph) for a, g, w, ph in OSCILLATORS)
    return torch.stack([u, v], 1)


def oscillators_derivative(t: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u^(n), v^(n)) at times ``t`` [N]."""
    total = torch.zeros(t.shape, dtype=torch.complex128)
    for a, g, w, ph in OSCILLATORS:
        s = complex(-g, w)
        total = total + a * complex(math.cos(ph), math.sin(ph)) * s**n * torch.exp(s * t.to(torch.complex128))
    return total.real, total.imag


def sin_xyz(p: torch.Tensor) -> torch.Tensor:
    return torch.sin(p[:, 0] * p[:, 1] * p[:, 2])[:, None]


def sin_xyz_partials(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Closed forms of some partials of sin(xyz)."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    w = x * y * z
    return {
        "u_x": y * z * torch.cos(w),
        "u_xy": z * torch.cos(w) - x * y * z**2 * torch.sin(w),
        "u_xyz": (1 - w**2) * torch.cos(w) - 3 * w * torch.sin(w),
        "u_xx": -((y * z) ** 2) * torch.sin(w),
        "u_xxxx": (y * z) ** 4 * torch.sin(w),
    }


HEAT_KAPPA = 0.1


def heat(p: torch.Tensor) -> torch.Tensor:
    """An exact solution of u_t = κ u_xx on points (t, x)."""
    t, x = p[:, 0:1], p[:, 1:2]
    k = HEAT_KAPPA
    return torch.exp(-k * t) * torch.sin(x) + 0.5 * torch.exp(-4 * k * t) * torch.cos(2 * x)


# --------------------------------------------------------------- models no derivative gets through


@torch.library.custom_op("jaccli_tests::cube", mutates_args=())
def _cube(x: torch.Tensor) -> torch.Tensor:
    """A custom op without autograd: torch.func's forward mode gives zeros through it."""
    return x**3


@_cube.register_fake
def _(x):
    return torch.empty_like(x)


class _Blocked(nn.Module):
    """``x [N, 3] -> [N, 3]`` through ``path``, after a linear layer (weights for ``--arch``)."""

    def __init__(self, path: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 3)
        self.path = path

    def forward(self, x):
        return self.path(self.fc(x))


#: name -> (model, the op the refusal names); each output reaches its input only through that op
BLOCKED = {
    "int_cast": (lambda: _Blocked(lambda h: torch.tanh(h.long().to(h.dtype))), r"aten\._to_copy to int64"),
    "argmax": (lambda: _Blocked(lambda h: h.argmax(1, keepdim=True).to(h.dtype) * h.new_ones(3)), r"aten\.argmax"),
    "floor": (lambda: _Blocked(lambda h: torch.floor(h) * 2), r"aten\.floor"),
    "step": (lambda: _Blocked(lambda h: torch.where(h > 0, 1.0, -1.0).to(h.dtype)), r"aten\.gt"),
    "custom_op": (lambda: _Blocked(lambda h: torch.ops.jaccli_tests.cube(torch.tanh(h))), "jaccli_tests::cube"),
}


#: every saved file of the ``saved_formats`` fixture (tests/curvature/conftest.py) and the keywords ``jaccli.load_model`` needs for it
FORMATS = {
    "script.pt": {},
    "trace.pt": {},
    "dynamic.pt2": {},
    "static.pt2": {},
    "mlp.safetensors": {},
    "state.pt": {"arch": "mlp", "activation": "tanh"},
}
