"""Named partial derivatives of any order (``jaccli partials``) and expressions over them.

=============  ==================================================================
:mod:`.names`  terms (``u_txx``), inputs and outputs, ``NAME = EXPR`` (torch-free)
:mod:`.jets`   univariate Taylor series of any order through the recorded model;
               exact interpolation of mixed partials from integer directions
:mod:`.api`    :func:`partials`: shared directions, chunks, the fall-back
=============  ==================================================================

Imports: :mod:`jaccli.engine` and :mod:`jaccli.taylor` (from :mod:`.api`, loaded on first
use); nothing imports this package but :mod:`jaccli` (lazily) and the CLI (:mod:`.names`).
"""

from __future__ import annotations

import importlib

from .names import MAX_ORDER

__all__ = ["MAX_ORDER", "Partials", "partials"]


def __getattr__(name: str):
    # the engine (and torch) load on first use: the CLI reads .names at start-up
    if name in ("Partials", "partials"):
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module 'jaccli.higher' has no attribute {name!r}")
