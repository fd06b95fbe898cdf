"""Loading: saved model files into callables, and a model's dtype changed all through.

==================  ====================================================================
:mod:`.loaders`     model files by content, one row of :data:`~.loaders.LOADERS` a format,
                    :func:`~.loaders.load_model`; the TorchScript (script and trace) and
                    ``.pt2`` loaders
:mod:`.weights`     weights-only files (safetensors MLP, state dict + architecture), the
                    built-in MLP family, :func:`~.weights.save_mlp`
:mod:`.models`      the wrapper (:class:`~.models.LoadedModel`, :class:`~.models.ModelInfo`)
                    and what a model has and expects (parameters, dtype, input shape)
:mod:`.cast`        ``--dtype``: parameters, buffers, exported constants and trace constants
==================  ====================================================================

Imports: torch, :mod:`jaccli.io`, :mod:`jaccli.request`, :mod:`jaccli.errors`; nothing
above (the engine, the CLI).
"""

from jaccli.load.loaders import load_model
from jaccli.load.models import LoadedModel, ModelInfo
from jaccli.load.weights import Arch, save_mlp

__all__ = ["Arch", "LoadedModel", "ModelInfo", "load_model", "save_mlp"]
