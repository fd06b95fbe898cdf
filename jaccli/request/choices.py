"""The names users choose from: commands, modes, estimators, dtypes, activations.

Plain tuples and strings, no torch: the CLI builds its options and ``--help`` from them
without importing torch (which takes a second), and the core modules that give the names
meaning (:mod:`jaccli.engine`, :mod:`jaccli.io`, :mod:`jaccli.load.weights`) import them from
here, so each list is written once.
"""

from jaccli.request.kinds import derivative_kinds

#: the derivative commands and the ``kind`` argument of :func:`jaccli.plan` (their records
#: are in :mod:`jaccli.request.kinds`)
KINDS = tuple(k.name for k in derivative_kinds())
#: ``mode=`` / ``--mode``
MODES = ("auto", "forward", "reverse")
#: ``compile=`` / ``--compile``: fused Taylor kernels (:mod:`jaccli.jets.fused`)
COMPILE = ("auto", "on", "off")
#: ``estimator=`` / ``--estimator`` of the divergence
ESTIMATORS = ("exact", "hutchinson")
#: ``dtype=`` / ``--dtype``
DTYPE_NAMES = ("float32", "float64")
#: activations of the built-in MLP family (``--arch mlp --activation``)
ACTIVATION_NAMES = ("tanh", "sigmoid", "softplus", "silu", "gelu", "elu", "sin", "relu", "leaky_relu")
#: the file name that means standard input or output
STDIO = "-"
#: significant digits of the numbers in tables (``--digits``)
DEFAULT_DIGITS = 4
#: ``--loss`` of ``jaccli curvature`` / ``grads`` (the table is :data:`jaccli.curvature.losses.LOSSES`)
LOSS_NAMES = ("mse", "cross-entropy", "bce", "nll", "output", "log-likelihood")
#: ``--matrix``: the loss Hessian, the generalised Gauss-Newton (Fisher), the empirical Fisher
MATRICES = ("hessian", "ggn", "ef")
#: ``--reduction`` of the loss over samples, as in ``torch.nn.functional``
REDUCTIONS = ("mean", "sum")
#: ``--trace-method`` of ``jaccli curvature``'s estimated Hessian trace (their meaning: :data:`jaccli.curvature.api.TRACE_METHODS`)
TRACE_METHODS = ("auto", "layers", "products")
#: ``--which`` eigenvalues ``--eig K`` finds
WHICH = ("largest", "smallest", "magnitude")


def compile_choice(value) -> str:
    """``compile=`` as one of :data:`COMPILE` (True and False are "on" and "off")."""
    if value is True or value is False:
        return "on" if value else "off"
    if value not in COMPILE:
        from jaccli.errors import UsageError

        raise UsageError("bad compile", expected="'auto', 'on', 'off', True or False", got=repr(value))
    return value
