"""jaccli: derivatives of saved PyTorch models with respect to their inputs and their parameters.

The public API is what this module exports; the ``jaccli`` command calls exactly it.

>>> import torch, jaccli
>>> x = torch.linspace(-1, 1, 5)[:, None]
>>> jaccli.jacobian(torch.tanh, x, per_sample=True).shape
torch.Size([5, 1, 1])

Names are imported on first use (PEP 562): ``import jaccli`` does not import torch,
so that ``jaccli --help`` answers at once; ``jaccli.jacobian`` and the rest load the
engine the first time they are touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jaccli.errors import (
    CheckFailed,
    DependencyError,
    GateFailed,
    InputError,
    JaccliError,
    JaccliWarning,
    ModelError,
    NumericalError,
    OutputError,
    ResourceError,
    ResumeError,
    UsageError,
)

__version__ = "0.1.0"

#: exported name -> the module that defines it, imported when the name is first used
_LAZY = {
    "CheckReport": ".engine.check",
    "check": ".engine.check",
    "DivergenceEstimate": ".engine",
    "Plan": ".engine",
    "describe": ".engine",
    "divergence": ".engine",
    "hessian": ".engine",
    "jacobian": ".engine",
    "laplacian": ".engine",
    "plan": ".engine",
    "load_tensor": ".io",
    "load_tensors": ".io",
    "save_tensors": ".io",
    "Stream": ".io",
    "Arch": ".load",
    "LoadedModel": ".load",
    "ModelInfo": ".load",
    "load_model": ".load",
    "save_mlp": ".load",
    "Partials": ".engine.partials",
    "partials": ".engine.partials",
    "Summary": ".show.summary",
    "CurvatureResult": ".curvature",
    "GradsResult": ".curvature",
    "curvature": ".curvature",
    "grads": ".curvature",
    "summarize": ".show.summary",
}

if TYPE_CHECKING:  # what IDEs and type checkers see
    from jaccli.engine import DivergenceEstimate, Plan, describe, divergence, hessian, jacobian, laplacian, plan
    from jaccli.io import Stream, load_tensor, load_tensors, save_tensors
    from jaccli.engine.partials import Partials, partials
    from jaccli.load import Arch, LoadedModel, ModelInfo, load_model, save_mlp
    from jaccli.show.summary import Summary, summarize
    from jaccli.engine.check import CheckReport, check
    from jaccli.curvature import CurvatureResult, GradsResult, curvature, grads


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jaccli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Arch",
    "CheckFailed",
    "CheckReport",
    "CurvatureResult",
    "DependencyError",
    "GateFailed",
    "GradsResult",
    "DivergenceEstimate",
    "InputError",
    "JaccliError",
    "JaccliWarning",
    "LoadedModel",
    "ModelError",
    "ModelInfo",
    "NumericalError",
    "OutputError",
    "Partials",
    "Plan",
    "ResourceError",
    "ResumeError",
    "Stream",
    "Summary",
    "UsageError",
    "__version__",
    "check",
    "curvature",
    "describe",
    "divergence",
    "grads",
    "hessian",
    "jacobian",
    "laplacian",
    "load_model",
    "load_tensor",
    "load_tensors",
    "partials",
    "plan",
    "save_mlp",
    "save_tensors",
    "summarize",
]
