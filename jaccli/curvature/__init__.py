"""Curvature in parameter space: gradients, loss Hessian, Gauss-Newton / Fisher, spectra.

Everything else in jaccli differentiates a model with respect to its inputs; this package
differentiates the *loss over a data set* with respect to the model's *parameters*.

==================  ====================================================================
:mod:`.losses`      the ``--loss`` table: per-sample loss, output-space Hessian (and its
                    square-root factor) of the Gauss-Newton matrix, target checks
:mod:`.params`      the parameters (state-dict order, ``--params`` globs, flat offsets)
                    and the model as a function of them, for every format jaccli loads
:mod:`.runtime`     the ranks of torchrun (shards, all-reduce) and a model call's
                    allocated bytes (chunks, column blocks, kept graphs)
:mod:`.objective`   the loss over the data, chunk by chunk and shard by shard (torchrun),
                    and its products: Hessian, GGN and empirical Fisher with a block of
                    vectors; per-sample gradients and Jacobians
:mod:`.assembled`   whole matrices from the objective: the Hessian ``[P, P]`` (layer by
                    layer by :mod:`.structured`, else by unit vectors), a small Hessian
                    from its products, the exact GGN/EF diagonals
:mod:`.layers`      which parameters are the weights and biases of linear layers, read
                    off a graph of the model's ops (for :mod:`.linear` and :mod:`.structured`)
:mod:`.linear`      per-sample gradients of linear layers' weights and biases as δxᵀ
                    from one batched backward (the layers read off the model's ops)
:mod:`.spectral`    those products as scipy ``LinearOperator``\\ s (a bare trace on torch
                    alone): ``eigsh``, Hutch++/Hutchinson,
                    Hutchinson diagonals, stochastic Lanczos quadrature, the dense matrix,
                    standard errors
:mod:`.structured`  the full Hessian of a model whose parameters sit in linear layers,
                    layer by layer (one ``jacfwd`` pass, GEMMs over the samples)
:mod:`.api`         :func:`curvature`, exported by :mod:`jaccli`
:mod:`.gradients`   :func:`grads` (per-sample gradients streamed to disk), exported too
==================  ====================================================================

Imports: torch, numpy, scipy, :mod:`jaccli.engine` (``select_output``, the memory budget),
:mod:`jaccli.load`, :mod:`jaccli.io` (streamed per-sample gradients), :mod:`jaccli.errors`.
Imported by :mod:`jaccli.show.curvature` (tables, plots) and the CLI; never by the engine.
"""

from jaccli.curvature.api import CurvatureResult, curvature
from jaccli.curvature.gradients import GradsResult, grads
from jaccli.curvature.losses import LOSSES, Loss

__all__ = ["LOSSES", "CurvatureResult", "GradsResult", "Loss", "curvature", "grads"]


class _CallablePackage(type(__import__("sys"))):
    """``jaccli.curvature`` names both this package and the function :func:`curvature`: once
    the package is imported, Python binds the name ``jaccli.curvature`` to it, so the package
    itself calls the function (``jaccli.curvature(model, x, y, loss="mse")`` works either way)."""

    def __call__(self, *args, **kwargs):
        return curvature(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallablePackage
