"""Python's cyclic garbage collector, held off while the ``jaccli`` process starts.

``import torch`` leaves some 170 000 objects that the collector tracks, and every full
collection walks all of them again: while a command starts (torch, the loaders, Typer,
Rich, jaccli's own modules) three full collections and some 400 young ones ran, 0.2 s of
CPU (measured under load with ``gc.callbacks``), and freed next to nothing — what they walk
are modules, classes and functions that live as long as the process. So the process entry
(``python -m jaccli``, the ``jaccli`` script) calls :func:`pause` before anything is
imported, and the command calls :func:`resume` once torch and the loaders are imported,
before the model is loaded (:func:`jaccli.cli.inputs.load_model_option`;
``example`` before it builds its models), so that what loading and computing discard is
collected as usual. :func:`gc.freeze` first moves what start-up left into the permanent
generation, which later collections skip: the compute's collections walk the compute's
objects only, and so do those the interpreter runs as it exits. This is the pattern the :mod:`gc` documentation gives for ``fork``.

Only the process entry pauses: a program that embeds the CLI (Typer's ``CliRunner``, a
script calling :func:`jaccli.cli.main.main`) keeps its collector as it is, and
:func:`resume` then does nothing. A command that ends before loading a model (``--help``,
a usage error) never resumes: the process exits.

Imports: the standard library only (this runs before anything else is imported).
"""

from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    """Disable the collector until :func:`resume` (where it was enabled)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """Freeze what start-up left and enable the collector again, if :func:`pause` disabled it."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
