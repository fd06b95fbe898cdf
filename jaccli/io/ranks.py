"""What the ranks of a ``torch.distributed`` job (``torchrun``) exchange besides rows: this
process's world size and rank, and an error carried to the other ranks as a payload and
rebuilt there with its class and exact message (:meth:`~.stream.FileSink._sync`).

Imports: torch.distributed (on use), :mod:`jaccli.errors`.
"""

from __future__ import annotations

from jaccli.errors import JaccliError


def world_and_rank():
    """(world size, rank) of the torch.distributed group this process belongs to, if any."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def error_payload(exc: BaseException) -> dict:
    if isinstance(exc, JaccliError):
        return {"error": str(exc), "kind": type(exc).__name__}
    return {"error": f"{type(exc).__name__}: {exc}", "kind": "JaccliError"}


def rebuild_error(cls: type[JaccliError], message: str) -> JaccliError:
    """An error of ``cls`` whose message is exactly ``message`` (another rank's, already composed)."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.what, err.where, err.expected, err.got, err.hint = message, None, None, None, None
    return err


def _error_classes() -> dict[str, type[JaccliError]]:
    from jaccli import errors

    return {name: obj for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, JaccliError)}


ERRORS = _error_classes()
