"""jaccli: derivatives of saved PyTorch models with respect to their inputs.

The public API is what this module exports; the ``jaccli`` command calls exactly it.

>>> import torch, jaccli
>>> x = torch.linspace(-1, 1, 5)[:, None]
>>> jaccli.jacobian(torch.tanh, x, per_sample=True).shape
torch.Size([5, 1, 1])
"""

from .check import CheckReport, check
from .engine import (
    DivergenceEstimate,
    Plan,
    describe,
    divergence,
    hessian,
    jacobian,
    laplacian,
    plan,
)
from .errors import (
    CheckFailed,
    DependencyError,
    InputError,
    JaccliError,
    JaccliWarning,
    ModelError,
    NumericalError,
    OutputError,
    ResourceError,
    UsageError,
)
from .io import load_tensor, load_tensors, save_tensors
from .models import Arch, LoadedModel, ModelInfo, load_model, save_mlp
from .summary import Summary, summarize

__version__ = "0.1.0"

__all__ = [
    "Arch",
    "CheckFailed",
    "CheckReport",
    "DependencyError",
    "DivergenceEstimate",
    "InputError",
    "JaccliError",
    "JaccliWarning",
    "LoadedModel",
    "ModelError",
    "ModelInfo",
    "NumericalError",
    "OutputError",
    "Plan",
    "ResourceError",
    "Summary",
    "UsageError",
    "__version__",
    "check",
    "describe",
    "divergence",
    "hessian",
    "jacobian",
    "laplacian",
    "load_model",
    "load_tensor",
    "load_tensors",
    "plan",
    "save_mlp",
    "save_tensors",
    "summarize",
]
