"""A request, typed and built once: where the model and inputs come from, what to compute,
and what to show and write.

The CLI builds one :class:`Request` from its options (the commands' only state); the
Python API functions build the :class:`Derivative` part from their keywords. Everything
after that reads fields of these frozen records — no dictionaries of options travel.
Torch-free, so that a request is checked before torch is imported.

:class:`Selection` is ``--select`` / ``select=``: which elements of each point's output
are differentiated.

>>> Selection.parse(":, 3").index, Selection.parse("argmax").argmax
((slice(None, None, None), 3), True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaccli.errors import UsageError
from jaccli.request.kinds import Kind

#: ``--select`` words that pick one element per point by its value
SELECT_WORDS = ("argmax", "argmin")


@dataclass(frozen=True)
class Selection:
    """Elements of each point's output to differentiate (``--select``, ``select=``).

    Either an index over the output axes of one point — integers, slices and ``...`` as
    in ``y[2]``, ``y[:, 3]`` or ``y[0:5]`` — or, per point, the element of the largest
    (``argmax``) or smallest (``argmin``) value, found on the point's own output (the
    predicted class of a classifier). The derivatives of the other elements are never
    computed: the engine differentiates the selected part only.
    """

    index: tuple = ()
    argmax: bool = False
    argmin: bool = False
    text: str = ""

    @classmethod
    def parse(cls, value) -> Selection | None:
        """A selection from ``--select`` text (``"2"``, ``":, 3"``, ``"argmax"``) or from
        Python (an int, a slice, a tuple of them, ``Ellipsis``, one of the words); None stays None."""
        if value is None or isinstance(value, Selection):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text in SELECT_WORDS:
                return cls(argmax=text == "argmax", argmin=text == "argmin", text=text)
            return cls(index=tuple(_parse_item(part, value) for part in text.split(",")), text=text)
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if not (item is Ellipsis or isinstance(item, slice) or (isinstance(item, int) and not isinstance(item, bool))):
                raise UsageError(
                    "bad select", expected="an int, a slice, ..., a tuple of them, 'argmax' or 'argmin'", got=repr(value)
                )
        return cls(index=items, text=", ".join(_show_item(i) for i in items))

    @property
    def per_point(self) -> bool:
        """Whether the element depends on each point's value (argmax, argmin)."""
        return self.argmax or self.argmin


def _parse_item(part: str, whole: str):
    part = part.strip()
    if part in ("...", "…"):
        return Ellipsis
    bounds = part.split(":")
    try:
        if len(bounds) == 1:
            return int(part)
        if len(bounds) <= 3:
            start, stop, *step = (int(b) if b.strip() else None for b in bounds)
            if step and step[0] is not None and step[0] <= 0:
                raise ValueError
            return slice(start, stop, step[0] if step else None)
    except ValueError:
        pass
    raise UsageError(
        "bad --select",
        expected="indices and slices of the output of one point like 2, ':, 3' or 0:5, or argmax / argmin",
        got=whole,
    )


def _show_item(item) -> str:
    if item is Ellipsis:
        return "..."
    if isinstance(item, slice):
        text = f"{'' if item.start is None else item.start}:{'' if item.stop is None else item.stop}"
        return text + (f":{item.step}" if item.step is not None else "")
    return str(item)


@dataclass(frozen=True)
class Source:
    """Where the model and its arguments come from (MODEL, INPUT, ``--input`` and loading options)."""

    model: str
    input: str | None = None
    inputs: tuple[str, ...] = ()
    key: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    arch: str | None = None
    activation: str | None = None
    arch_kwargs: str | None = None


@dataclass(frozen=True)
class Parameters:
    """What a parameter-space kind (``curvature``, ``grads``) computes: the loss over the
    data set, which parameters, and which figures of its curvature."""

    loss: str = "mse"
    #: ``--target FILE[:KEY]``: one row per sample
    target: str | None = None
    reduction: str | None = None
    #: comma-separated globs of parameter names
    params: str | None = None
    matrix: str = "hessian"
    full: bool = False
    diag: bool = False
    trace: bool = False
    eig: int | None = None
    which: str = "largest"
    density: bool = False
    by_layer: bool = False
    standard_errors: bool = False
    samples: int = 100
    #: what an estimated Hessian trace may use: auto, layers or products (:data:`jaccli.curvature.api.TRACE_METHODS`)
    trace_method: str = "auto"
    probes: int = 8
    steps: int = 64
    tol: float = 1e-6
    seed: int = 0


@dataclass(frozen=True)
class Derivative:
    """What to compute: the kind and the options of the engine."""

    kind: Kind
    per_sample: bool = False
    wrt: tuple[str, ...] | None = None
    output: str | None = None
    select: Selection | None = None
    mode: str = "auto"
    chunk_size: int | None = None
    check_batch: bool = True
    strict: bool = False
    estimator: str = "exact"
    probes: int = 16
    seed: int = 0
    #: ``--compile`` / ``compile=``: fused Taylor kernels "auto" (when the time already spent
    #: pays a compile, :func:`jaccli.jets.fused.should_compile`), "on" or "off"
    compile: str = "auto"
    #: ``partials``: the terms and expressions, the names of the inputs and outputs, the gates
    want: tuple[str, ...] = ()
    in_names: str | None = None
    out_names: str | None = None
    limits: tuple[tuple[str, float], ...] = ()
    #: the parameter-space kinds: the loss and the figures asked for
    parameters: Parameters | None = None

    def fingerprint(self) -> dict:
        """The options a resumed run must share with the interrupted one, JSON-able."""
        return {
            "kind": self.kind.name, "per_sample": self.per_sample, "wrt": list(self.wrt or ()), "output": self.output,
            "select": None if self.select is None else self.select.text, "mode": self.mode,
            "chunk_size": self.chunk_size, "estimator": self.estimator, "probes": self.probes, "seed": self.seed,
        }  # fmt: skip


@dataclass(frozen=True)
class Output:
    """What to show and write: the presentation options every command shares."""

    save: str | None = None
    force: bool = False
    json: bool = False
    quiet: bool = False
    dry_run: bool = False
    verbose: bool = False
    #: points shown as tables; None for all of them
    show: int | None = 1
    digits: int = 4
    summary: bool = False
    plot: str | None = None
    progress: bool | None = None
    resume: bool = False
    flatten: bool = False


@dataclass(frozen=True)
class Request:
    """One command's whole request: built once, read by every later step."""

    source: Source
    derivative: Derivative
    output: Output = field(default_factory=Output)

    @property
    def kind(self) -> Kind:
        return self.derivative.kind
