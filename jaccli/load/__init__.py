"""Loading: saved model files into callables, and a model's dtype changed all through.

==================  ====================================================================
:mod:`.models`      model files by content, one row of :data:`~.models.LOADERS` a format
                    (TorchScript script and trace, ``.pt2``, safetensors MLP, state dict +
                    architecture); what a model expects; :func:`~.models.save_mlp`
:mod:`.cast`        ``--dtype``: parameters, buffers, exported constants and trace constants
==================  ====================================================================

Imports: torch, :mod:`jaccli.io`, :mod:`jaccli.request`, :mod:`jaccli.errors`; nothing
above (the engine, the CLI).
"""

from jaccli.load.models import Arch, LoadedModel, ModelInfo, load_model, save_mlp

__all__ = ["Arch", "LoadedModel", "ModelInfo", "load_model", "save_mlp"]
