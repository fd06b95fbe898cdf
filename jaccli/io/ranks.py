"""What the ranks of a ``torch.distributed`` job (``torchrun``) exchange besides rows: this
process's world size and rank, the fixed points where they meet (:class:`Meetings`), and an
error carried to the other ranks as a payload and rebuilt there with its class and exact
message.

Imports: torch.distributed (on use), :mod:`jaccli.errors`.
"""

from __future__ import annotations

from jaccli.errors import JaccliError, OutputError


def world_and_rank():
    """(world size, rank) of the torch.distributed group this process belongs to, if any."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class Meetings:
    """The points where every rank of a streamed result meets the others (a single process
    meets itself): each gives a payload and gets all of them; a payload with an error makes
    every rank raise that error after the meeting. ``count`` meetings so far; ``peer_lost``
    once a collective failed (another rank is gone: no more meetings are tried)."""

    #: how many times a stream's ranks meet in all (a failing rank attends the rest, so that
    #: the others are not left waiting in a collective)
    TOTAL = 4

    def __init__(self, world: int, rank: int, target: str) -> None:
        self.world, self.rank, self.target = world, rank, target
        self.count = 0
        self.failure: str | None = None  # the error every rank raised, as this rank names it
        self.peer_lost = False

    def __call__(self, payload: dict) -> list[dict]:
        """All ranks' payloads; raises the first failing rank's error after the meeting."""
        self.count += 1
        if self.world == 1:
            parts = [payload]
        else:
            import torch.distributed as dist

            parts = [None] * self.world
            if self.peer_lost:
                raise self._lost()
            try:
                dist.all_gather_object(parts, payload)
            except Exception:  # gloo / nccl: a peer closed its connection or timed out
                self.peer_lost = True
                raise self._lost() from None
        for r, part in enumerate(parts):
            if part.get("error"):
                self.failure = part["error"] if r == self.rank else f"rank {r}: {part['error']}"
                raise rebuild_error(ERRORS.get(part.get("kind"), JaccliError), self.failure)
        return parts

    def attend_rest(self, exc: BaseException) -> None:
        """After ``exc`` on this rank: attend the meetings still to come, carrying the error to
        the others at the first (unless it came from a meeting, where they all raised it)."""
        payload = error_payload(exc) if self.failure is None else {}
        while self.count < self.TOTAL and not self.peer_lost:
            try:
                self(payload)
            except JaccliError:
                pass
            payload = {}

    def _lost(self) -> OutputError:
        return OutputError(
            "lost contact with the other ranks of the job (one was stopped or killed)",
            where=self.target,
            hint="the rows written so far are kept: the same command with --resume continues",
        )


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
