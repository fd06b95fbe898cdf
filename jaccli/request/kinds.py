"""The derivative kinds: one :class:`Kind` record per command, in one registry.

Everything that differs between ``jacobian``, ``hessian``, ``divergence``, ``laplacian``,
``partials`` and the parameter-space kinds ``curvature`` and ``grads`` is a
field of its record here: the name, the title and symbol shown, how many differentiated
arguments the result's trailing axes belong to (its shape and axis names), how a
point's block is laid out for tables and pictures, which options the command takes,
what ``--summary`` gives, whether a per-sample result streams to disk, the help text
and the runnable ``--help`` examples, the function of the engine that computes it, and
the Typer command of a kind with options of its own. ``jaccli --help`` lists these
commands in registration order.
Adding a kind is one :func:`register` call; nothing else in jaccli tests a kind's name.

**Layers.** This module sits in the torch-free :mod:`jaccli.request` layer, below
everything that gives a kind meaning, so that the CLI can build ``--help`` and check a
request before torch is imported, and every layer above (engine, show, cli) can read
the records. The references *upwards* — the engine function that computes a kind, the
Typer command of a kind with its own options, a kind's own picture — are therefore written as ``"module:attribute"`` strings
and resolved with :func:`importlib.import_module` when first used (:meth:`Kind.engine`).
import-linter does not see those strings, on purpose: resolving them at run time, in the
layer that calls them, is what keeps the import graph pointing downwards.

>>> kind("hessian").order, kind("hessian").groups
(2, ('out', 'in', "in'"))
>>> [k.name for k in derivative_kinds()]
['jacobian', 'hessian', 'divergence', 'laplacian']
>>> [k.name for k in kinds() if k.command]
['partials', 'curvature', 'grads']
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from jaccli.errors import UsageError

#: how the results of several ``--wrt`` arguments are split: one per argument (a Jacobian
#: per input), one per pair of arguments (Hessian blocks), or one over all together
PER_ARGUMENT, PER_PAIR, JOINT = "per-argument", "per-pair", "joint"

#: what ``--summary`` computes: spectra of each point's matrix (Jacobian singular values,
#: Hessian eigenvalues), the distribution over the points of each value, or nothing (the
#: parameter-space kinds, whose tables already are figures over the data set)
SPECTRA, VALUES, NO_SUMMARY = "spectra", "values", "none"


@dataclass(frozen=True)
class Kind:
    """One derivative command and the Python function behind it."""

    #: command and ``kind`` argument of :func:`jaccli.plan`, and the name results are saved under
    name: str
    #: what tables and titles call it ("Jacobian")
    title: str
    #: what heat maps of it show ("J"), and the column of a scalar result per point
    symbol: str
    #: y-axis label of a line plot against one input coordinate ({out}, {x} filled in)
    line_label: str
    #: differentiated-argument axis groups its result ends with (``in``, ``in'``): 1 for a
    #: Jacobian, 2 for a Hessian, 0 for a trace
    order: int
    #: order of the Taylor coefficients the engine needs (2 for second derivatives and traces of them)
    taylor_order: int
    #: axis groups of one point's block: (components, rows, columns); None where a level is absent
    groups: tuple[str | None, str | None, str | None]
    #: how results split with several ``--wrt`` arguments (:data:`PER_ARGUMENT`, …)
    split: str
    #: what ``--summary`` gives (:data:`SPECTRA` or :data:`VALUES`)
    summary: str
    #: ``module:function`` of the engine that computes it, resolved when first used
    entry: str
    #: the command's ``--help`` text (first line: its one-line description)
    help: str
    #: runnable examples shown in ``--help``, in the folder ``jaccli example all`` fills
    examples: tuple[str, ...] = ()
    #: options only this kind takes (beyond the common ones), by their CLI name
    options: frozenset[str] = field(default_factory=frozenset)
    #: whether ``--flatten`` (the matrix view ``[N, out, in]``) applies
    flattens: bool = False
    #: whether it is a trace of a square Jacobian: one argument, output shaped as the input
    square: bool = False
    #: whether a per-sample result of one tensor streams to ``--save FILE.npy``/``.safetensors``
    #: chunk by chunk (and ``--resume`` continues it); otherwise results are saved when done
    streams: bool = True
    #: whether :func:`jaccli.plan` plans it (the engine's chunked strategies and the Taylor
    #: program); partials plan themselves
    planned: bool = True
    #: ``module:function`` of its Typer command where it has its own options (partials, the
    #: parameter-space kinds); None for the command every planned kind shares
    command: str | None = None
    #: ``module:function`` drawing ``--plot`` where the kind draws its own picture (the
    #: spectral density of ``curvature``); None for :func:`jaccli.show.plot.plot_results`
    plot: str | None = None

    def engine(self) -> Callable:
        """The engine's function for this kind (imports torch on first call)."""
        return _resolve(self.entry)

    def typer_command(self) -> Callable | None:
        """The kind's own Typer command function, or None for the shared one (torch-free)."""
        return None if self.command is None else _resolve(self.command)

    def plotter(self) -> Callable | None:
        """The kind's own ``--plot`` function, or None for the shared one."""
        return None if self.plot is None else _resolve(self.plot)

    def result_names(self, wrt: list[str]) -> list[tuple[str, tuple[str, ...]]]:
        """``(name, differentiated arguments)`` of each result tensor for arguments ``wrt``:
        the kind's name alone for one argument, ``jacobian_x``, ``hessian_x_y`` for several."""
        if len(wrt) <= 1 or self.split == JOINT:
            return [(self.name, tuple(wrt[:1] * self.order))]
        if self.split == PER_ARGUMENT:
            return [(f"{self.name}_{a}", (a,)) for a in wrt]
        return [(f"{self.name}_{a}_{b}", (a, b)) for a in wrt for b in wrt]


def _resolve(ref: str) -> Callable:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Kind] = {}


def register(record: Kind) -> Kind:
    """Add a kind (a new command and its Python function); names are unique."""
    if record.name in _REGISTRY and _REGISTRY[record.name] != record:
        raise ValueError(f"kind {record.name!r} is registered already")
    _REGISTRY[record.name] = record
    return record


def kind(name: str) -> Kind:
    """The record of ``name``; an unknown name is a :class:`UsageError` listing the kinds."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError("unknown derivative kind", expected="one of " + ", ".join(_REGISTRY), got=name) from None


def kinds() -> list[Kind]:
    """Every registered kind, in registration order."""
    return list(_REGISTRY.values())


def derivative_kinds() -> list[Kind]:
    """The kinds :func:`jaccli.plan` plans (one derivative tensor per argument or pair)."""
    return [k for k in _REGISTRY.values() if k.planned]


register(
    Kind(
        name="jacobian",
        title="Jacobian",
        symbol="J",
        line_label="∂{out}/∂{x}",
        order=1,
        taylor_order=1,
        groups=(None, "out", "in"),
        split=PER_ARGUMENT,
        summary=SPECTRA,
        entry="jaccli.engine.api:jacobian",
        help=(
            "Jacobian of the model's output with respect to its input.\n\n"
            "Shape out.shape + in.shape for the whole input as one point; [N, *out, *in] with --per-sample."
        ),
        examples=(
            "jaccli jacobian field.pt field_x.npy --per-sample --summary",
            "jaccli jacobian cnn.pt2 cnn_x.npy -p --select argmax --save saliency.npy",
            "jaccli jacobian decay.pt2 -i t=decay_inputs.npz:t -i x=decay_inputs.npz:x -p --wrt t --wrt x --save - > j.npz",
        ),
        flattens=True,
    )
)
register(
    Kind(
        name="hessian",
        title="Hessian",
        symbol="H",
        line_label="∂²{out}/∂{x}²",
        order=2,
        taylor_order=2,
        groups=("out", "in", "in'"),
        split=PER_PAIR,
        summary=SPECTRA,
        entry="jaccli.engine.api:hessian",
        help=(
            "Second derivatives, one Hessian per output component.\n\n"
            "[*, *in, *in] for a scalar output per point, [*, *out, *in, *in] otherwise. "
            "Warns when the model is piecewise linear (ReLU), whose second derivatives vanish."
        ),
        examples=(
            "jaccli hessian potential.pt potential_x.npy --per-sample --show 2",
            "jaccli hessian pinn.pt pinn_x.npy -p --select 0 --summary --json",
        ),
        flattens=True,
    )
)
register(
    Kind(
        name="divergence",
        title="divergence",
        symbol="div",
        line_label="div {out}",
        order=0,
        taylor_order=1,
        groups=(None, None, "out"),
        split=JOINT,
        summary=VALUES,
        entry="jaccli.engine.api:divergence",
        help=(
            "Divergence (trace of the Jacobian) of a map whose output shape equals its input's.\n\n"
            "Exact by default (one forward product per input dimension); --estimator hutchinson "
            "gives an unbiased estimate from --probes Rademacher vectors and reports its standard error."
        ),
        examples=(
            "jaccli divergence field.pt2 field_x.npy --per-sample --estimator hutchinson",
            "jaccli divergence field.pt field_x.npy -p --summary --save div.npy",
        ),
        options=frozenset({"estimator", "probes", "seed"}),
        square=True,
    )
)
register(
    Kind(
        name="laplacian",
        title="Laplacian",
        symbol="Δ",
        line_label="Δ{out}",
        order=0,
        taylor_order=2,
        groups=(None, None, "out"),
        split=JOINT,
        summary=VALUES,
        entry="jaccli.engine.api:laplacian",
        help="Laplacian (trace of the Hessian) of every output component: [*, *out].",
        examples=(
            "jaccli laplacian pinn.pt pinn_x.npy --per-sample --select ':10' --summary",
            "jaccli laplacian heat.pt heat_x.npy -p --save - > laplacian.npy",
        ),
    )
)
register(
    Kind(
        name="partials",
        title="partials",
        symbol="∂",
        line_label="{out}",
        order=0,
        taylor_order=0,  # any order: the terms asked for say
        groups=(None, None, "out"),
        split=JOINT,
        summary=VALUES,
        entry="jaccli.engine.partials:partials",
        help=(
            "Named partial derivatives of any order (u_x, u_txx, v_xxxx) and expressions over them, "
            "with --fail-above gates for CI.\n\n"
            "--in names the input components of one point, --out the output components (one name for "
            "the whole output vector). A term is OUT_ then input names (u_txx = ∂³u/∂t∂x²; "
            "'_'-separated when an input name is longer than one letter: u_x0_x1). --want also takes "
            "NAME = EXPR over terms, numbers, pi, + - * / ** and sin cos tan exp log sqrt tanh abs. "
            "--fail-above NAME=TOL exits with code 9 when max |NAME| over the points exceeds TOL."
        ),
        examples=(
            'jaccli partials heat.pt heat_x.npy -p --in t,x --want "r = u_t - 0.1*u_xx" --fail-above r=1e-4',
            "jaccli partials ode.pt2 ode_x.npy -p --in t --out u,v --want u_t,v_tt --plot ode.png",
            "jaccli partials heat.pt heat_x.npy -p --in t,x --want u_x,u_xx --save - > partials.npz",
        ),
        options=frozenset({"want", "in", "out", "fail_above"}),
        planned=False,
        streams=False,
        command="jaccli.cli.partials:partials_command",
    )
)
# The parameter-space kinds: derivatives of a loss over a data set with respect to the
# model's parameters (jaccli.curvature). Their results are figures of one P-vector or P×P
# matrix, not per-point blocks over the input, so they have no block layout of their own.
register(
    Kind(
        name="curvature",
        title="curvature",
        symbol="H",
        line_label="{out}",
        order=0,
        taylor_order=0,
        groups=(None, None, None),
        split=JOINT,
        summary=NO_SUMMARY,
        entry="jaccli.curvature:curvature",
        help=(
            "Curvature of the loss over a data set with respect to the model's parameters: the Hessian, the "
            "Gauss-Newton matrix (ggn, the Fisher for these losses) or the empirical Fisher (ef).\n\n"
            "Parameters are the named parameters in state-dict order, each flattened row-major (--params "
            "restricts them by glob). --full the P×P matrix, --diag, --trace (exact when affordable, else "
            "Hutch++, or Hutchinson on a flat spectrum, ± its standard error), --eig K eigenvalues by Lanczos, "
            "--density the spectral density by "
            "stochastic Lanczos quadrature (--plot draws it), --by-layer the figures of each tensor's diagonal "
            "block, --standard-errors √diag(I⁻¹) of the observed information of a log-likelihood. Without any "
            "of these: the loss, the gradient norm and the trace."
        ),
        examples=(
            "jaccli curvature potential.pt potential_x.npy --loss output --matrix ef --eig 3 --trace --by-layer",
            "jaccli curvature potential.pt2 potential_x.npy --loss output --diag --save curvature.npz",
        ),
        options=frozenset({"loss", "target", "matrix", "full", "diag", "trace", "eig", "which", "density",
                           "by_layer", "standard_errors", "params", "reduction", "samples", "probes", "steps",
                           "tol", "seed"}),  # fmt: skip
        planned=False,
        streams=False,
        command="jaccli.cli.curvature:curvature_command",
        plot="jaccli.show.curvature:plot_density",
    )
)
register(
    Kind(
        name="grads",
        title="gradients",
        symbol="∇",
        line_label="{out}",
        order=0,
        taylor_order=0,
        groups=(None, None, None),
        split=JOINT,
        summary=NO_SUMMARY,
        entry="jaccli.curvature:grads",
        help=(
            "The gradient of the reduced loss with respect to the model's parameters; --per-sample the [N, P] "
            "gradients of each sample's own loss (their mean is the gradient of the mean loss), streamed to "
            "--save FILE.npy or .safetensors chunk by chunk (--resume continues), with a summary of their norms."
        ),
        examples=(
            "jaccli grads potential.pt2 potential_x.npy --loss output --per-sample --save g.npy",
            "jaccli grads potential.pt potential_x.npy --loss output --params Q --json",
        ),
        options=frozenset({"loss", "target", "params", "reduction"}),
        planned=False,
        streams=True,
        command="jaccli.cli.curvature:grads_command",
    )
)
