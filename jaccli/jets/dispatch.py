"""A TorchDispatchMode base for jaccli's op recorders that never wakes torch.compile.

``TorchDispatchMode`` subclasses get their ``__torch_dispatch__`` wrapped in
``torch._dynamo.disable`` unless they opt out; the wrapper imports torch._dynamo on the
first call, about a second of start-up for every command. jaccli's modes (the engine's
probe, the Taylor recorder) only observe eager ops and never run under torch.compile,
so they opt out here, once.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class QuietDispatchMode(TorchDispatchMode):
    """A dispatch mode whose ``__torch_dispatch__`` is not wrapped for dynamo."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False
