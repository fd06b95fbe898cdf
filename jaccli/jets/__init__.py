"""Forward (Taylor-mode) derivatives of a traced flat batch function, at any order.

torch.func builds a per-sample Jacobian from ``vmap(jvp)``: the model runs under a
batching interpreter, every op pays for a tangent of its own, and a Hessian nests
two such transforms. Here the flat batch function ``g: [B, n_in] -> [B, n_out]`` of
the engine is recorded once as a list of ATen ops (by a dispatch mode, which sees
through eager modules, TorchScript and ``torch.export`` programs alike; two records
at different batch sizes tell batch-sized shape arguments apart) and each op's result
carries a *jet*: its value (one row) and its Taylor rows of each order ``1 … K``:

- Jacobians, divergences (order 1): one first-order row per input direction;
- Hessians (order 2): also one second-order row per entry ``(i, j)``;
- Laplacians (order 2): one *collapsed* second-order row holding ``Σᵢ ∂²/∂xᵢ²`` (the
  forward Laplacian of Li et al. 2023, collapsed Taylor mode of Dangel et al. 2025);
- partials (order ``K``): univariate Taylor series, one row per direction in every order.

One rule per ATen op serves them all (the design of ``jax.experimental.jet`` and of
torch-jet): a rule gets the order from its layout, and the one place the kinds differ
is how rows of two factors multiply (:class:`~.jet._Call`). The rows of a jet are
stacked along a leading axis, so a linear layer costs ONE matrix product for value and
every row together, and a backward *need* analysis keeps only the orders the requested
result uses (no value through the last layer of a Jacobian, only the asked coefficient
after the last nonlinearity of a series, no rows of order ≥ 2 while a node is still
affine in the input).

Every op has a rule in :data:`RULES` (or is a non-differentiable op in
:data:`VALUE_OPS`, or is decomposed into such ops as it is recorded, :mod:`.decompose`);
a graph with an op that has none of these raises :class:`Unsupported`
naming the op, and the engine falls back to torch.func. :func:`build` also checks the
program against the model on a probe batch before it is used.

The package, in the order a program is made (each module imports only those above it;
:mod:`.fused` imports only :mod:`.jet`, and :mod:`.program` reads it):

===================  ==================================================================
:mod:`.jet`          :class:`Jet`, :class:`Layout`, :class:`Rule`, row arithmetic
:mod:`.shape`        rules for views, indexing, reductions, casts
:mod:`.chain`        the chain rule at any order (Faà di Bruno, ODE recurrences)
:mod:`.elementwise`  rules for unary ops, from one table of derivatives of any order
:mod:`.linear`       rules for sums and products (add, mul, div, mm, addmm, …)
:mod:`.spatial`      rules for convolutions, pooling, upsampling, padding, maxima
:mod:`.table`        the rule table :data:`RULES` (op name → rule) and :data:`VALUE_OPS`
:mod:`.decompose`    norms, softmax, … written in ops with rules; in-place ops' twins
:mod:`.record`       record a function's ATen ops; compile two records into steps
:mod:`.fold`         runs of steps a pass computes together (the first layer into the second's GEMM)
:mod:`.seeds`        what a pass starts from: the input jet, one-hot rows, each pass's columns
:mod:`.program`      :class:`TaylorProgram`: the need analysis and the chunk runs
:mod:`.builder`      :func:`build`: record, compile, verify against autograd
:mod:`.workspace`    buffers the passes reuse, chunk after chunk (kept by the program for its next call)
:mod:`.fused`        elementwise chain rules as ``torch.compile``'d kernels, and when to compile
:mod:`.adjoint`      Hessians by adjoints: each step's second-order source contracted in place
===================  ==================================================================

To add a rule: write it in the family's module, add one line to :data:`RULES` and one
case to ``OP_CASES`` in ``tests/jets/test_rules.py``, which compares every rule with
torch.func in float64 at orders 1 to 4 (and in the Hessian and Laplacian modes).
"""

from jaccli.jets.builder import build, recheck
from jaccli.jets.jet import Layout, Rule, Unsupported
from jaccli.jets.program import WANT, TaylorProgram
from jaccli.jets import adjoint  # noqa: E402 - after program, which it reads
from jaccli.jets.record import PROBE_BATCHES
from jaccli.jets.table import RULES, VALUE_OPS

__all__ = ["PROBE_BATCHES", "RULES", "VALUE_OPS", "WANT", "Layout", "Rule", "TaylorProgram", "Unsupported", "build", "recheck"]
