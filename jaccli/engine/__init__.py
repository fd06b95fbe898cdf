"""The derivative engine: Jacobians, Hessians, divergences and Laplacians of a callable.

Everything here is a function of a callable and tensors; nothing imports the CLI.
The pipeline, one module per stage:

========================  =================================================================
:mod:`.problem`           normalise a request once into a *flat batch function*
                          ``g: [B, n_in] -> [B, n_out]`` (:class:`~.problem.Problem`): the
                          points are rows, the differentiated arguments are flattened and
                          concatenated into columns; validate the arguments
:mod:`.probe`             the model on a few points: the output the request chose, output
                          shape, memory and operations per point, ops, whether derivatives
                          reach the output, that it does not mix batch elements; a failing
                          call as one :class:`~jaccli.errors.ModelError`
:mod:`.kernels`           the kernels a model call runs on: attention on its math kernel,
                          recurrent layers on ATen's cell loop where a probe saw a fused
                          kernel (oneDNN, cuDNN), TorchScript without its optimiser
:mod:`.paths`             whether derivatives get from the differentiated inputs to the
                          output: integer values, rounding and custom ops on every path
                          are refused, naming the op, instead of answered with zeros
:mod:`.strategies`        the torch.func products (JVP, VJP and their second-order
                          compositions) and the ``(kind, mode)`` table saying which
                          directions each request takes and where their values go
:mod:`.costs`             the cost model: each engine's products per point in forward
                          passes (``COSTS``), start costs, a request's predicted seconds
:mod:`.memory`            what the machine (or GPU) can still hand out, and what one pass
                          may use of it (the working budget)
:mod:`.planner`           each engine's predicted time, mode, memory budget, points and
                          directions per pass: the plan of the Taylor fast path
                          (:mod:`jaccli.jets`, requests on one per-sample input) or of
                          torch.func
:mod:`.measure`           the clock where two engines are predicted close: the Taylor
                          engine's two Hessians, its pick against torch.func's reverse mode
:mod:`.choice`            auto's choice of engine (predictions, the adjoints' n² term, the
                          clock, fall-backs), and a request's way in (``prepare``, ``reuse``)
:mod:`.execute`           the chunk loops that fill the result, and the fall-backs when an
                          op has no forward-mode derivative
:mod:`.results`           NaN/Inf and non-smoothness warnings; per-argument shapes
:mod:`.api`               the public functions, exported by :mod:`jaccli`
:mod:`.partials`          :func:`~.partials.partials`: named partials of any order on the
                          series engine (:mod:`jaccli.jets.series`) or nested torch.func
:mod:`.check`             :func:`~.check.check`: derivatives against float64 finite
                          differences (``jaccli check``)
========================  =================================================================

With ``per_sample=True`` axis 0 of the input holds independent points and the model is
called on batches of them exactly as it was saved; the per-point derivatives come from
products with one-hot directions that are the same for every row, which never forms
the cross-point blocks of the full Jacobian. Without it the whole input is one point.

Inside, imports go one way, up the table (``check``, ``partials`` → ``api`` → ``execute`` →
``choice`` → ``planner``, ``measure`` → ``strategies``, ``costs``, ``memory`` → ``problem`` → ``probe`` →
``memo``, ``kernels``, ``paths``). The package may import the
layers below it (:mod:`jaccli.jets`, :mod:`jaccli.load`, :mod:`jaccli.io`, :mod:`jaccli.request`,
:mod:`jaccli.errors`); only :mod:`jaccli`, :mod:`jaccli.show` and :mod:`jaccli.cli` import it
(``lint-imports`` checks this).
"""

from jaccli.request.choices import ESTIMATORS, KINDS, MODES
from jaccli.engine.api import DivergenceEstimate, describe, divergence, hessian, jacobian, laplacian, plan
from jaccli.engine.planner import Plan
from jaccli.errors import format_bytes
from jaccli.engine.probe import select_output
from jaccli.engine.results import NONSMOOTH_OPS

__all__ = [
    "ESTIMATORS",
    "KINDS",
    "MODES",
    "NONSMOOTH_OPS",
    "DivergenceEstimate",
    "Plan",
    "describe",
    "divergence",
    "format_bytes",
    "hessian",
    "jacobian",
    "laplacian",
    "plan",
    "select_output",
]
