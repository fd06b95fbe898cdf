"""Which kernels a model call runs on: ones torch.func can batch and differentiate twice.

PyTorch picks fused kernels for some layers by device and dtype, whatever format the model
was saved in (eager modules, TorchScript and ``torch.export`` programs all reach the same
ATen ops). Several of them cannot serve derivatives:

- attention's flash and memory-efficient kernels have no double backward and no vmap rule;
- recurrent layers (``aten.lstm``/``gru``/``rnn_tanh``/``rnn_relu``) go to oneDNN on CPU
  (``mkldnn_rnn_layer``: its backward needs a workspace that vmap's batching drops), cuDNN
  or MIOpen on GPUs (no double backward, and no backward at all in eval mode).

:func:`differentiable` wraps a model so that every call runs on the differentiable
implementations: attention on the math kernel, always (it costs nothing where the fused
kernels would not be picked); recurrent layers on ATen's own cell loop (matmuls and
pointwise ops, which vmap and any order of autograd handle) only when asked, since the
switch is process-wide and would also turn oneDNN convolutions and cuDNN off.
:data:`FUSED_RNN_OPS` are the ops by which a probe tells that it is needed.

Imports: torch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

#: ops of the fused recurrent kernels, as a probe's dispatch mode names them; their
#: presence asks for ``differentiable(f, native_rnn=True)``
FUSED_RNN_OPS = frozenset({"mkldnn_rnn_layer", "mkldnn_rnn", "_cudnn_rnn", "miopen_rnn"})


@contextmanager
def rnn_cell_loop():
    """oneDNN and cuDNN (which also gates MIOpen) off for the duration.

    Through the flags themselves, not ``torch.backends.*.flags()``: those context managers
    also reset TF32 and precision settings (and warn about TF32 on CPU builds).
    """
    mkldnn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    torch.backends.mkldnn.enabled = False
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        torch.backends.cudnn.enabled = cudnn


def differentiable(f: Callable, *, native_rnn: bool = False) -> Callable:
    """``f`` with attention on PyTorch's math kernel, TorchScript run outside its optimising
    executor (see :class:`~jaccli.load.models.LoadedModel`), and with ``native_rnn`` recurrent
    layers on ATen's cell loop.

    The math attention kernel is plain matmul and softmax, differentiable to any order, and
    what the Taylor recorder can follow op by op; so is the cell loop.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    script = isinstance(f, (torch.jit.ScriptModule, torch.jit.ScriptFunction))
    rnn = rnn_cell_loop if native_rnn else nullcontext

    def call(*args, **kwargs):
        with sdpa_kernel([SDPBackend.MATH]), rnn():
            if script:
                with torch.jit.optimized_execution(False):
                    return f(*args, **kwargs)
            return f(*args, **kwargs)

    return call
