"""The model called on a few points before any derivative: what it returns and runs, or why not.

Owns the output a request chose (:func:`select_output`, :func:`select_part`), the probe that
:func:`.problem.check_inputs` ends with (:func:`run_probe`: the model once on a
few points under a dispatch mode that learns output shape, memory and operations per point
(:func:`op_flops`), the ops it runs and whether derivatives reach the output; recalled per
model and request by :mod:`.memo`), the batch-independence check for per-sample work (left
pending for a recalled model, :func:`settle_batch_check`: a kept program may vouch for it),
and the one :class:`~jaccli.errors.ModelError` a failing model call becomes (:func:`model_failed`).

Imports: torch, :mod:`jaccli.errors`, :mod:`jaccli.request.spec`, :mod:`jaccli.load.models`,
:mod:`jaccli.jets.dispatch`, :mod:`.kernels`, :mod:`.memo` and :mod:`.paths`; nothing else of
the engine (:class:`~.problem.Problem` only for type annotations: :mod:`.problem` imports this).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import NamedTuple, TYPE_CHECKING

import torch

from jaccli.jets.dispatch import QuietDispatchMode
from jaccli.errors import first_line, JaccliError, ModelError, UsageError, shape_str
from jaccli.request.spec import Selection
from jaccli.load.models import ExpectedInput, expected_input
from jaccli.engine import memo
from jaccli.engine.kernels import FUSED_RNN_OPS, differentiable
from jaccli.engine.paths import Paths

if TYPE_CHECKING:
    from jaccli.engine.problem import Problem

_PROBE_POINTS = 8


def select_part(y, select: Selection | None, per_sample: bool, where: str):
    """The elements ``select`` picks of each point's output ``y`` (axis 0 holds the points
    with ``per_sample``): an index applied to every point, or per point the element of
    the largest (smallest) value, taken with ``amax`` (``amin``) so that the derivative
    is the selected element's (shared equally among exact ties)."""
    if select is None:
        return y
    if select.per_point:
        flat = y.reshape(y.shape[0], -1) if per_sample else y.reshape(1, -1)
        value = flat.amax(1) if select.argmax else flat.amin(1)
        return value if per_sample else value[0]
    lead = (slice(None),) if per_sample else ()
    try:
        return y[lead + select.index]
    except IndexError as exc:
        raise UsageError(
            f"the selection {select.text} does not fit the output of one point",
            where=where,
            expected=f"indices within {shape_str(y.shape[1:] if per_sample else y.shape)}",
            got=first_line(exc),
        ) from None


def select_output(y, output, where: str):
    """One tensor from a model's return value (a tensor, a sequence or a mapping)."""
    if isinstance(y, torch.Tensor):
        if output not in (None, 0):
            raise ModelError("the model returns a single tensor", where=where, got=f"--output {output}")
        return y
    if isinstance(y, Mapping):
        names = [str(k) for k in y]
        if output is None and len(y) == 1:
            output = names[0]
        if output is None or str(output) not in names:
            raise ModelError(
                f"the model returns {len(y)} outputs; choose one",
                where=where,
                expected="--output with one of " + ", ".join(names),
                got=None if output is None else str(output),
            )
        y = y[str(output)] if str(output) in y else dict(zip(names, y.values()))[str(output)]
    elif isinstance(y, (tuple, list)):
        fields = getattr(y, "_fields", None)
        if output is None and len(y) == 1:
            output = 0
        if isinstance(output, str) and output.isdigit():
            output = int(output)
        if isinstance(output, str) and fields and output in fields:
            output = fields.index(output)
        if not isinstance(output, int) or not 0 <= output < len(y):
            choices = ", ".join(fields) if fields else f"0..{len(y) - 1}"
            raise ModelError(
                f"the model returns {len(y)} outputs; choose one",
                where=where,
                expected=f"--output with one of {choices}",
                got=None if output is None else str(output),
            )
        y = y[output]
    else:
        raise ModelError("the model returns no tensor", where=where, got=type(y).__name__)
    if not isinstance(y, torch.Tensor):
        raise ModelError("the selected output is not a tensor", where=where, got=type(y).__name__)
    return y



#: ops that contract an axis: (position of the operand whose last axis is contracted)
_CONTRACTING = {"mm": 0, "addmm": 1, "bmm": 0, "baddbmm": 1, "matmul": 0, "linear": 0, "addbmm": 1}
_CONVOLUTIONS = frozenset({"convolution", "_convolution", "conv1d", "conv2d", "conv3d"})


def op_flops(func, args, outputs: list[torch.Tensor]) -> int:
    """Floating-point operations of one op, roughly: 2·m·n·k for a matrix product, 2·out·(in
    channels · kernel) for a convolution, 4·L·S·E per head for attention, one per output
    element for anything else, none for a view."""
    if getattr(func, "is_view", False):
        return 0
    name = func.overloadpacket.__name__
    numel = sum(t.numel() for t in outputs)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in _CONTRACTING and len(tensors) > _CONTRACTING[name]:
        return 2 * numel * tensors[_CONTRACTING[name]].shape[-1]
    if name in _CONVOLUTIONS and len(tensors) > 1:
        return 2 * numel * math.prod(tensors[1].shape[1:])
    if "scaled_dot_product" in name and len(tensors) > 1 and outputs:
        q, k = tensors[0], tensors[1]
        return 4 * q.numel() * k.shape[-2]
    return numel


class _Recorder(QuietDispatchMode):
    """Counts the bytes and operations each op produces, remembers which ops ran and follows the inputs."""

    def __init__(self, paths: Paths) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.bytes = 0
        self.flops = 0
        self.paths = paths

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        self.paths.observe(func, args, kwargs or {}, out)
        outputs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        for t in outputs:
            self.bytes += t.numel() * t.element_size()
        self.flops += op_flops(func, args, outputs)
        return out



def probe_rows(problem: Problem) -> torch.Tensor:
    """Rows of a small probe batch; at least two points so batch mixing shows.

    The same tensor for the same sizes (kept, :data:`_ROWS`): a call asks twice (the probe,
    the kept program's recheck), each an ``arange`` and a remainder otherwise, and the
    recheck knows rows it saw by identity (:func:`jaccli.engine.programs._seen`). Nothing
    writes into them. Not kept while a dispatch mode is on (a fake tensor would be kept)."""
    want = 1 if not problem.per_sample else problem.static_batch or min(max(problem.n, 2), _PROBE_POINTS)
    key = (problem.per_sample, want, problem.n, problem.device)
    rows = _ROWS.get(key)
    if rows is None:
        if not problem.per_sample:
            rows = torch.zeros(1, dtype=torch.long, device=problem.device)
        else:
            rows = torch.arange(want, device=problem.device) % problem.n
        if torch._C._len_torch_dispatch_stack() == 0:
            if len(_ROWS) >= 64:  # one entry per input size met: a sweep of sizes is not all kept
                _ROWS.clear()
            _ROWS[key] = rows
    return rows


#: (per_sample, probe points, points, device) -> the probe rows (:func:`probe_rows`)
_ROWS: dict[tuple, torch.Tensor] = {}


def _call(problem: Problem, values: list[torch.Tensor]) -> torch.Tensor:
    """The model's chosen output (``output``) on argument ``values``, shaped as the model
    returns it; before ``select``, whose ops (``amax`` of argmax) are not the model's."""
    keys = problem.args.keys
    pos = [v for k, v in zip(keys, values) if isinstance(k, int)]
    kw = {k: v for k, v in zip(keys, values) if isinstance(k, str)}
    return select_output(problem.f(*pos, **kw), problem.output, problem.where)


def _call_shapes(problem: Problem, rows: torch.Tensor) -> str:
    return ", ".join(
        shape_str(v.index_select(0, rows).shape if problem.per_sample else v.shape)
        for v in problem.args.values
    )


def model_cause(exc: BaseException) -> str:
    """The line that says why the model failed.

    TorchScript wraps the error that says it (``mat1 and mat2 shapes cannot be multiplied
    (8x3 and 2x50)``) in its interpreter's tracebacks, whose first line says only "The
    following operation failed in the TorchScript interpreter."; the inner error is the
    last ``SomethingError: …`` line.
    """
    text = str(exc).strip()
    if "TorchScript" in first_line(exc):
        for line in reversed(text.splitlines()):
            inner = re.match(r"\s*[\w.]*(?:Error|Exception): (.+)", line)
            if inner:
                return inner[1].strip()[:300]
    return first_line(exc)


#: what an error's text says the failing op wanted on an axis of its input:
#: (pattern, axis from the end or start, group of the size found, group of the size wanted)
_WANTED_IN_ERRORS = (
    # F.linear / matmul: "mat1 and mat2 shapes cannot be multiplied (8x3 and 2x50)"
    (re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)"), -1, 2, 3),
    # convolutions: "… expected input[8, 4, 32, 32] to have 3 channels, but got 4 channels instead"
    (re.compile(r"to have (\d+) channels, but got (\d+) channels"), 1, 2, 1),
)


def _wanted_by_error(cause: str, call_shape: tuple[int, ...]) -> ExpectedInput | None:
    """The input shape an error's text asks for, where the size it complains about is the
    input's own (so the failing op is the one that reads the input)."""
    for pattern, axis, found, wanted in _WANTED_IN_ERRORS:
        m = pattern.search(cause)
        if m is None or len(call_shape) < (axis + 1 if axis >= 0 else -axis):
            continue
        if call_shape[axis] != int(m[found]):
            continue
        shape: list[int | None] = [None] * len(call_shape)
        shape[axis] = int(m[wanted])
        return ExpectedInput(tuple(shape), "the error")
    return None


def _given(problem: Problem) -> str:
    """The input as given (the file's whole tensor, not the probe's rows), labelled when several."""
    shapes = [shape_str(v.shape) for v in problem.args.values]
    if len(shapes) == 1:
        return shapes[0]
    return ", ".join(f"{label} {shape}" for label, shape in zip(problem.labels, shapes))


def model_failed(problem: Problem, exc: BaseException, rows: torch.Tensor):
    """Raise the :class:`ModelError` for the model failing on ``rows``: why (the inner
    error, TorchScript's included), the input as given, and what the model expects where
    its export signature, its first layer or the error tells."""
    text = model_cause(exc)
    # a backward op without a derivative of its own only shows in second derivatives
    second = re.search(r"derivative for '?(\w+_backward\w*)'? is not implemented", text)
    if second:
        raise ModelError(
            f"PyTorch has no derivative of aten.{second[1]}, the first derivative of an op of the "
            "model: its second derivatives cannot be taken",
            where=problem.where,
            hint="first derivatives can (jaccli jacobian, divergence)",
        ) from None
    first = problem.args.values[0]  # the argument a first layer or a signature is about
    call_shape = tuple(first.index_select(0, rows).shape if problem.per_sample else first.shape)
    want = expected_input(problem.module)
    if want is not None and want.matches(call_shape):
        want = None  # the input is what the first layer takes: the failure is further in
    want = want or _wanted_by_error(text, call_shape)
    probe = f" (run on its first {rows.numel()} points)" if problem.per_sample and rows.numel() < problem.n else ""
    raise ModelError(
        f"the model failed on input {_given(problem)}{probe}: {text}",
        where=problem.where,
        expected=None if want is None else f"{want} by {want.source}",
    ) from None


def _record(problem: Problem, values: list[torch.Tensor], rows: torch.Tensor):
    """The model's output on ``values`` without gradient, and the ops it ran."""
    recorder = _Recorder(Paths(dict(zip(problem.labels, values))))
    try:
        with torch.no_grad(), recorder:
            return _call(problem, values), recorder
    except JaccliError:  # a ModelError, or a --select the output has no room for
        raise
    except Exception as exc:
        model_failed(problem, _without_recorder(problem, values, exc), rows)


def _without_recorder(problem: Problem, values: list[torch.Tensor], exc: Exception) -> Exception:
    """The error of the same call made without the recorder, for TorchScript: an error raised
    inside a Python dispatch mode reaches the interpreter's traceback without its message
    ("RuntimeError: " and nothing after it), where a plain call keeps it."""
    if "TorchScript" not in first_line(exc):
        return exc
    try:
        with torch.no_grad():
            _call(problem, values)
    except Exception as plain:  # noqa: BLE001 - whatever it is, it is the model's own error
        return plain
    return exc


class _ProbeFacts(NamedTuple):
    """What :func:`run_probe` learns of a model, kept per model and request (:mod:`.memo`)."""

    native_rnn: bool
    out_shape: tuple[int, ...]
    act_bytes: float
    flops: float
    ops: frozenset[str]
    blocked: ModelError | None


def _probe_request(problem: Problem) -> tuple:
    """What a probe's facts depend on besides the model: every argument's per-point shape,
    dtype and device, and the request's names, output, selection and per-sample flag."""
    lead = 1 if problem.per_sample else 0
    args = tuple((tuple(v.shape[lead:]), v.dtype, str(v.device)) for v in problem.args.values)
    return (args, tuple(map(str, problem.args.keys)), problem.wrt, problem.per_sample, problem.output,
            repr(problem.select), problem.static_batch)  # fmt: skip


def run_probe(problem: Problem, *, check_batch: bool, refuse_blocked: bool = True, defer_batch: bool = False) -> None:
    """Run the model once on a few points: output shape, memory per point, ops used (recalled
    for a model called again with the same shapes: :mod:`.memo`, the shape confirmed by a
    forward on the probe rows, the batch check's where it runs); then the batch check.

    ``defer_batch``: a recalled model's batch check is left pending (``problem.batch_pending``,
    its rows) for :func:`settle_batch_check`, which the caller runs once it knows whether a
    kept program vouches for these rows (:func:`jaccli.engine.programs.program_for`)."""
    rows = probe_rows(problem)
    request = _probe_request(problem)
    facts = memo.recall(problem.module, request, problem.state)
    if facts is not None and facts.native_rnn:
        problem.f = differentiable(problem.module, native_rnn=True)
    checked = False  # whether the batch check ran on the model as it now stands
    if facts is not None:
        if check_batch and facts.blocked is None and not defer_batch:
            # the batch check's own forward shows the output's shape: one forward of the
            # probe rows fewer per call (0.1-0.4 ms of a 2-20 ms call, most from a .pt2)
            checked = fits = _checked_output(problem, rows) == facts.out_shape
        else:
            fits = _same_output(problem, rows, facts)
        if not fits:  # a change the key cannot see (a Python flag) changed the output's shape
            facts, checked = None, False
            problem.f = differentiable(problem.module)
        elif check_batch and defer_batch:
            checked, problem.batch_pending = True, rows  # settled by settle_batch_check
    if facts is None:
        facts = _probe_model(problem, rows)
        memo.keep(problem.module, request, facts, problem.state)
    problem.out_shape, problem.act_bytes, problem.flops = facts.out_shape, facts.act_bytes, facts.flops
    problem.ops, problem.blocked = facts.ops, facts.blocked
    if problem.blocked is not None and refuse_blocked:
        raise problem.blocked
    if check_batch and not checked:
        check_batch_independence(problem, rows)


def settle_batch_check(problem: Problem) -> bool:
    """Run the batch check :func:`run_probe` left pending, unless a kept program vouched for
    the rows in the meantime; whether it ran (and passed: a coupled model raises)."""
    rows, problem.batch_pending = problem.batch_pending, None
    if rows is None:
        return False
    check_batch_independence(problem, rows)
    return True


def _checked_output(problem: Problem, rows: torch.Tensor) -> tuple[int, ...] | None:
    """The batch-independence check of a model whose probe was recalled, and the per-point
    shape of the output it ran into; None where the model failed (the full probe then runs
    and reports it as it would)."""
    try:
        return check_batch_independence(problem, rows)
    except ModelError as exc:
        if "mixes batch elements" in exc.what:
            raise
        return None
    except Exception:  # noqa: BLE001 - as in _same_output: the full probe reports it
        return None


def _same_output(problem: Problem, rows: torch.Tensor, facts: _ProbeFacts) -> bool:
    """Whether the model, run plainly on the probe rows, still gives the kept output shape
    (a plain forward of a few points: a fraction of the recorded probe's cost)."""
    values = [v.index_select(0, rows) if problem.per_sample else v for v in problem.args.values]
    try:
        with torch.no_grad():
            y = _call(problem, values)
        part = select_part(y, problem.select, problem.per_sample, problem.where)
    except Exception:  # noqa: BLE001 - the full probe runs again and reports it as it would
        return False
    _keep_output(problem, rows, part)
    return tuple(part.shape[1:] if problem.per_sample else part.shape) == facts.out_shape


def _keep_output(problem: Problem, rows: torch.Tensor, part: torch.Tensor) -> None:
    """Keep the model's (selected) output on the probe rows for the kept program's recheck
    (:func:`jaccli.engine.programs.program_for`): one forward of the model fewer per call."""
    if problem.per_sample and part.dim() > 0 and part.shape[0] == rows.numel():
        problem.probe_output = (rows, part.detach().reshape(rows.numel(), -1))


def _probe_model(problem: Problem, rows: torch.Tensor) -> _ProbeFacts:
    """The probe itself: the model on the probe rows under the recorder."""
    values = [v.index_select(0, rows) if problem.per_sample else v for v in problem.args.values]
    y, recorder = _record(problem, values, rows)
    native_rnn = bool(recorder.ops & FUSED_RNN_OPS)
    if recorder.ops & FUSED_RNN_OPS:
        # fused recurrent kernels serve no derivative; what runs instead (ATen's cell
        # loop) is probed again, so that ops and memory per point are of what will run
        problem.f = differentiable(problem.module, native_rnn=True)
        y, recorder = _record(problem, values, rows)
    if problem.per_sample and (y.dim() == 0 or y.shape[0] != rows.numel()):
        raise ModelError(
            "with per_sample, axis 0 of the output must match the points",
            where=problem.where,
            expected=f"{rows.numel()} rows for input {_call_shapes(problem, rows)}",
            got=f"output {shape_str(y.shape)}",
        )
    if not y.is_floating_point():
        raise ModelError("the model's output is not floating point", where=problem.where, got=str(y.dtype))
    part = select_part(y, problem.select, problem.per_sample, problem.where)
    _keep_output(problem, rows, part)
    return _ProbeFacts(
        native_rnn=native_rnn,
        out_shape=tuple(part.shape[1:]) if problem.per_sample else tuple(part.shape),
        act_bytes=recorder.bytes / rows.numel(),
        flops=recorder.flops / rows.numel(),
        ops=frozenset(recorder.ops),
        blocked=recorder.paths.refusal(y, [problem.labels[i] for i in problem.wrt], problem.where),
    )


def check_batch_independence(problem: Problem, rows: torch.Tensor) -> tuple[int, ...]:
    """Refuse models whose output for one point depends on other points of the batch;
    returns the shape of the (selected) output per point that the check ran into.

    Two tests on the probe batch: the gradient of point 0's output reaches no other
    point (catches batch norm in training mode, attention across the batch, …), and
    where the model accepts a batch of one, point 0 alone gives the same output
    (catches batch statistics computed without gradient).
    """
    model, seen = problem.f, []

    def spy(*args, **kwargs):  # the model's output before the batch function flattens it
        out = model(*args, **kwargs)
        seen.append(out)
        return out

    problem.f = spy
    try:
        g = problem.fn(rows)  # binds the spy
    finally:
        problem.f = model
    z = problem.z(rows)
    eps = torch.finfo(problem.dtype).eps
    hint = (
        "per-sample derivatives assume independent points; put the model in eval mode, "
        "or skip this check (check_batch=False) if the coupling is intended"
    )
    cli = hint.replace("check_batch=False", "--no-batch-check")
    # plain autograd, not torch.func.vjp: its pullback imports torch._dynamo (a second of
    # start-up) and this check runs on every per-sample command
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        try:
            y = g(zz)
            v = torch.zeros_like(y)
            v[0] = torch.linspace(1.0, 2.0, v.shape[1], dtype=v.dtype, device=v.device)
            # an output that does not depend on the input has no graph, and no leak; the
            # gradient of the scalar (y * v).sum(), not of y with grad_outputs v: given a
            # tensor there, autograd imports torch.fx's symbolic shapes (sympy, seconds)
            grad = torch.autograd.grad((y * v).sum(), zz, allow_unused=True)[0] if y.requires_grad else None
        except RuntimeError as exc:
            if "inplace operation" not in str(exc) and "mutate" not in str(exc):
                model_failed(problem, exc, rows)
            raise ModelError(
                "the model mixes batch elements or updates its own state as it runs "
                "(batch norm in training mode?)",
                where=problem.where,
                hint=hint,
                cli_hint=cli,
            ) from None
    y = y.detach()
    _keep_output(problem, rows, y)
    if y.is_floating_point():  # a float64 input through a float32 model: float32's rounding
        eps = max(eps, torch.finfo(y.dtype).eps)
    grad = torch.zeros_like(z) if grad is None else grad
    with torch.no_grad():
        own = float(grad[0].abs().max())
        leak = float(grad[1:].abs().max())
        if leak > 1e3 * eps * max(own, 1.0):
            raise ModelError(
                "the model mixes batch elements: point 0's output depends on other points",
                where=problem.where,
                got=f"d out[0] / d in[1:] up to {leak:.3g}",
                hint=hint,
                cli_hint=cli,
            )
        if problem.static_batch is None:
            alone = problem.fn(rows[:1])(z[:1])
            scale = max(float(y[0].abs().max()), 1.0)
            if float((alone[0] - y[0]).abs().max()) > 1e3 * eps * scale:
                raise ModelError(
                    "the model mixes batch elements: point 0 alone gives another output than in a batch",
                    where=problem.where,
                    hint=hint,
                    cli_hint=cli,
                )
    with torch.no_grad():
        part = select_part(select_output(seen[0], problem.output, problem.where), problem.select,
                           problem.per_sample, problem.where)  # fmt: skip
    problem.batch_checked = True
    return tuple(part.shape[1:] if problem.per_sample else part.shape)
