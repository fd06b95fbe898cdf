"""``jaccli.partials``: named partial derivatives of any order, and expressions over them.

Owns the plan of one request: which directions the terms need (shared between terms,
each run to the highest order any term needs of it), how many points go through at
once, and whether the Taylor program (:mod:`jaccli.jets`, in its series mode) or
nested torch.func runs; and the exact interpolation of mixed partials from series.

Mixed partials come from series along integer directions: with ``|α| = d`` over the
inputs ``S`` of a term, the order-``d`` coefficients along all integer directions ``i``
with ``|i| = d`` on ``S`` determine every ``∂^α`` of that order exactly (Griewank, Utke
and Walther, Math. Comp. 69, 2000); the interpolation weights are computed once in
exact rational arithmetic.

Imports: :mod:`jaccli.engine` (request normalisation, memory budget), :mod:`jaccli.jets`,
:mod:`jaccli.request.names`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from itertools import combinations_with_replacement

import torch
from torch import Tensor

from jaccli.engine import planner
from jaccli.engine.execute import _empty_result
from jaccli.engine.memory import working_budget
from jaccli.engine.programs import program_for, settle
from jaccli.engine.probe import model_failed, probe_rows
from jaccli.engine.problem import Problem, all_finite, check_inputs
from jaccli.engine.results import NONSMOOTH_OPS
from jaccli.errors import JaccliWarning, ModelError, NumericalError, UsageError
from jaccli import jets
from jaccli.jets import Unsupported, fused
from jaccli.request.choices import compile_choice
from jaccli.request.names import ExpressionError, Request, Term, input_names, output_names, parse_want

_FUNCTIONS: dict[str, Callable] = {
    "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "exp": torch.exp, "log": torch.log,
    "sqrt": torch.sqrt, "tanh": torch.tanh, "abs": torch.abs,
}  # fmt: skip

#: on CPU a pass holds at most this much (by the estimate of :func:`_chunk_points`, which
#: counts every coefficient of every activation, about twice what runs): series run as
#: one op per coefficient, so passes of a few thousand points keep the per-op overhead
#: small while they still fit the caches (seed PINN, u_xxxx: 1 000 points per pass cost
#: 1.2×, 16 000 1.4× what 2 000–4 000 do). 768 MiB gave the u_xxxx job of
#: ``benchmarks/peers.py`` (1→50³→1) 11 917 points a pass: 0.36 s against 0.27–0.30 s at
#: 2 000–4 000 (interleaved, medians of 7, under load, 2026-12-06); 192 MiB gives it 2 979.
_PASS_BYTES = 192 * 2**20
_MIN_POINTS = 2048


def _on_tensor(fn: Callable, dtype, device, v):
    """A function of an expression on a term or on a plain number."""
    return fn(torch.as_tensor(v, dtype=dtype, device=device))


class Partials(dict):
    """``{name: tensor}`` in the order asked for, with how it was computed."""

    engine: str = "taylor"
    engine_note: str | None = None
    #: what the computation did with fused Taylor kernels (set by the CLI's ``--verbose`` / ``--json``)
    compiled: str | None = None
    points: int = 0
    inputs: list[str]
    outputs: list[str]


def _support(term: Term) -> tuple[int, ...]:
    return tuple(i for i, o in enumerate(term.orders) if o)


def _directions(terms: list[Term], n_in: int) -> dict[tuple[int, ...], set[int]]:
    """Primitive integer directions over all inputs → the orders of the coefficients needed
    along each (the highest one is how far its series runs)."""
    need: dict[tuple[int, ...], set[int]] = {}
    for t in terms:
        if t.order == 0:
            continue
        support = _support(t)
        dirs, _ = interpolation(len(support), t.order)
        for d in dirs:
            full = [0] * n_in
            for pos, c in zip(support, d):
                full[pos] = c
            g = math.gcd(*full)
            prim = tuple(c // g for c in full)
            need.setdefault(prim, set()).add(t.order)
    return need


def _combination(t: Term, n_in: int) -> list[tuple[tuple[int, ...], float]]:
    """``∂^α g`` of a term ``t`` (order ≥ 1) as ``Σ factor · c``, ``c`` the order-``|α|``
    series coefficient along a direction: the (direction, factor) pairs."""
    support = _support(t)
    dirs, weights = interpolation(len(support), t.order)
    alpha = tuple(t.orders[i] for i in support)
    row = weights[compositions(t.order, len(support)).index(alpha)]
    scale = math.prod(math.factorial(a) for a in alpha)
    pairs = []
    for d, w in zip(dirs, row):
        if w == 0:
            continue
        full = [0] * n_in
        for pos, c in zip(support, d):
            full[pos] = c
        g = math.gcd(*full)
        pairs.append((tuple(x // g for x in full), float(w * Fraction(g) ** t.order * scale)))
    return pairs


def _term_into(out: Tensor, t: Term, n_in: int, coeffs: dict[tuple[int, ...], list], value: Callable[[], Tensor]) -> None:
    """``∂^α g`` of one term written into ``out`` ``[b, n_out]`` from the series coefficients
    along the directions (``value()`` gives ``g``, computed only when a term needs it)."""
    b = out.shape[0]
    if t.order == 0:
        out.copy_(value()[:b])
        return
    first = True
    for prim, factor in _combination(t, n_in):
        c = coeffs[prim][t.order]
        if c is None:
            continue
        # one pass over the result per direction: the product lands in place
        if first:
            torch.mul(c[:b], factor, out=out)
        else:
            out.add_(c[:b], alpha=factor)
        first = False
    if first:
        out.zero_()


def _single_series(request: Request, n_in: int, program) -> tuple[Term, tuple[int, ...], float] | None:
    """The one term asked for when one series gives it (``u_xxxx``, not ``u_xt``): it is
    then written straight into the result (:meth:`~jaccli.jets.TaylorProgram.series_into`)."""
    if program is None or len(request.terms) != 1 or request.terms[0].order == 0:
        return None
    t = request.terms[0]
    pairs = _combination(t, n_in)
    return (t, *pairs[0]) if len(pairs) == 1 else None


def _program(p: Problem, order: int) -> tuple[jets.TaylorProgram | None, str | None]:
    """The Taylor program, checked to ``order``, where it applies (per-sample, one input, no static batch)."""
    if not (planner.FAST_PATH and p.per_sample and len(p.args.values) == 1 and p.static_batch is None):
        return None, None
    try:
        return program_for(p, order), None
    except Unsupported as exc:
        return None, f"Taylor series not used: {exc}"


def _chunk_points(p: Problem, chunk_size: int | None, order: int, rows_per_point: int) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise UsageError("chunk size must be positive", got=str(chunk_size))
        return min(int(chunk_size), p.n)
    per_point = max(p.act_bytes, 1.0) * (order + 2) * 3 * rows_per_point
    ppc = int(working_budget(p.device) // per_point)
    if p.device.type == "cpu":
        ppc = min(ppc, max(_MIN_POINTS, int(_PASS_BYTES // per_point)))
    return max(1, min(ppc, p.n))


def _coefficients(p: Problem, rows: Tensor, need: dict[tuple[int, ...], set[int]], program, with_value: bool):
    """Per direction, the series coefficients ``[B, n_out]`` that the terms read (index =
    order, None where not computed or zero), and a function giving the value ``[B, n_out]``."""
    z, g = p.z(rows), p.fn(rows)
    b = z.shape[0]
    coeffs: dict[tuple[int, ...], list] = {}
    cache: list[Tensor] = []

    def value() -> Tensor:
        if not cache:
            with torch.no_grad():
                cache.append(g(z))
        return cache[0]

    if program is None:  # nested torch.func, one direction and order at a time
        for prim, orders in need.items():
            v = torch.tensor(prim, dtype=z.dtype, device=z.device).expand(b, -1)
            coeffs[prim] = [None] * (max(orders) + 1)
            for k in orders:
                coeffs[prim][k] = nested_derivative(g, z, v, k) / math.factorial(k)
        return value, coeffs
    for order in sorted({max(o) for o in need.values()}):
        group = [prim for prim, o in need.items() if max(o) == order]
        keep = frozenset().union(*(need[prim] for prim in group)) | ({0} if with_value and not cache else set())
        dirs = torch.tensor(group, dtype=z.dtype, device=z.device)  # [m, n_in]
        # one row per direction in every coefficient block (the value row is shared)
        run = program.series(z, _along_points(dirs, b), order, keep)
        for i, prim in enumerate(group):
            coeffs[prim] = [None if c is None or k == 0 else c[i] for k, c in enumerate(run)]
        if run[0] is not None and not cache:
            cache.append(run[0])
    return value, coeffs


def partials(
    f: Callable,
    x,
    want: Sequence[str] | str,
    *,
    inputs: Sequence[str] | str | None = None,
    outputs: Sequence[str] | str | None = None,
    per_sample: bool = False,
    wrt=None,
    output=None,
    chunk_size: int | None = None,
    check_batch: bool = True,
    strict: bool = False,
    select=None,
    compile: str | bool = "auto",
) -> Partials:
    """Named partial derivatives of any order (``u_x``, ``u_txx``, ``v_xxxx``) and expressions over them.

    ``inputs`` names the components of one point of ``x`` (flattened; default ``x`` for
    one component, else ``x0, x1, …``), ``outputs`` the output components (one name for
    a vector output names the whole vector; default ``u``). A term is an output name,
    ``_`` and input names (``_``-separated when an input name is longer than one
    character); ``want`` also takes ``NAME = EXPR`` over terms, numbers, ``pi``,
    ``+ - * / **`` and ``sin cos tan exp log sqrt tanh abs``. Returns ``{name: tensor}``
    in the order asked for: ``[N, *term]`` with ``per_sample``, ``[*term]`` otherwise.
    ``select`` differentiates only some elements of each point's output (as for
    :func:`jaccli.jacobian`); the output names then name the selected components.

    Per-sample requests on one input run univariate Taylor series through the recorded
    model (the Taylor program of :mod:`jaccli.jets` in its series mode: order ``k`` for
    a few times ``k²`` the work of a forward pass per op); mixed partials are
    interpolated exactly from series along integer directions. Models with ops that
    have no rule use nested ``torch.func.jvp`` (``.engine`` says which ran).

    >>> import torch, jaccli
    >>> x = torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]
    >>> d = jaccli.partials(torch.sin, x, ["u_xxxx", "r = u_xx + u"], per_sample=True)
    >>> bool(torch.allclose(d["u_xxxx"], torch.sin(x))), float(d["r"].abs().max()) < 1e-12
    (True, True)
    >>> uv = lambda p: torch.stack([p[:, 0] * p[:, 1] ** 2, p[:, 0].exp()], 1)   # u = t x², v = eᵗ
    >>> d = jaccli.partials(uv, torch.ones(3, 2, dtype=torch.float64), "u_txx,v_tt",
    ...                     inputs="t,x", outputs="u,v", per_sample=True)
    >>> d["u_txx"].tolist(), [round(v, 6) for v in d["v_tt"].tolist()]
    ([2.0, 2.0, 2.0], [2.718282, 2.718282, 2.718282])
    """
    p = check_inputs(f, x, wrt=wrt, per_sample=per_sample, output=output, check_batch=check_batch, strict=strict,
                     select=select, defer_batch=True)  # fmt: skip
    try:
        names = input_names(inputs, p.n_in)
        request: Request = parse_want(want, names, output_names(outputs, p.n_out))
    except ExpressionError:
        raise
    except UsageError as exc:
        if per_sample or p.n_in == 1:
            raise
        # names for one point, given or used for a whole input: the points were meant as points
        raise UsageError(
            exc.what, where=exc.where, expected=exc.expected, got=exc.got,
            hint=f"without per_sample the whole input is one point of {p.n_in:,} components; pass per_sample=True "
            "if axis 0 holds the points",
            cli_hint=f"without --per-sample (-p) the whole input is one point of {p.n_in:,} components; pass -p "
            "if axis 0 holds the points",
        ) from None  # fmt: skip
    top = max(t.order for t in request.terms)
    need = _directions(request.terms, p.n_in)
    program, note = _program(p, top) if need else (None, None)
    settle(p, program, top)
    wrong = sorted(p.ops & planner.FORWARD_OVER_FORWARD_WRONG)
    if program is None and top >= 2 and wrong:
        # nested forward mode through these ops gives wrong numbers in PyTorch, and so do
        # autograd's third derivatives, which the series' check would need: refuse rather
        # than answer wrongly (order 2 runs on the series, checked by a double backward)
        raise ModelError(
            f"partials of order {top} through aten.{wrong[0]} are not supported: PyTorch's "
            "higher-order forward mode through it is wrong, and past order 2 its autograd "
            "derivatives (which would check jaccli's series) are wrong too",
            where=p.where,
            hint="order 2 works (u_xx, u_xy), as does jaccli hessian",
        )
    lead = (p.n,) if p.per_sample else ()
    values: dict[str, Tensor] = {}
    ppc = _chunk_points(p, chunk_size, top, max(1, len(need)))
    with_value = any(t.order == 0 for t in request.terms)
    single = _single_series(request, p.n_in, program)
    # chunks go straight into their rows of the results: no concatenation at the end
    flat = {t.name: _empty_result((p.n, p.n_out), p.dtype, p.device) for t in request.terms}
    # the passes reuse their buffers from chunk to chunk (see jaccli.jets.workspace)
    pool = contextlib.ExitStack()
    fz = None
    if program is not None:
        pool.enter_context(program.workspace())
        # elementwise rules as fused kernels where the policy says so (jaccli.jets.fused)
        fz = fused.fuser(compile_choice(compile), ppc, program.fusion)
    try:
        for start in range(0, p.n, ppc):
            stop = min(start + ppc, p.n)
            chunk = fz.chunk(stop - start) if fz is not None else contextlib.nullcontext()
            with chunk:
                _chunk_into(p, program, request, need, single, with_value, flat, start, stop)
    except (NotImplementedError, RuntimeError) as exc:
        model_failed(p, exc, probe_rows(p))
    finally:
        pool.close()
    if fz is not None:
        fz.finish()
    for t in request.terms:
        if len(request.outputs) == 1:
            values[t.name] = flat[t.name].reshape((*lead, *p.out_shape))
        else:
            values[t.name] = flat[t.name][:, request.outputs.index(t.out)].reshape(lead)
    for e in request.expressions:
        functions = {k: functools.partial(_on_tensor, fn, p.dtype, p.device) for k, fn in _FUNCTIONS.items()}
        result = torch.as_tensor(e.evaluate(values, functions), dtype=p.dtype, device=p.device)
        # an expression of numbers alone still gets one value per point
        values[e.name] = result.expand(lead).clone() if result.dim() == 0 else result
    out = Partials((name, values[name]) for name in request.order)
    out.engine = "taylor" if program is not None else "torch.func"
    out.engine_note, out.points = note, p.n
    out.inputs, out.outputs = request.inputs, request.outputs
    _finish(p, out, top, strict)
    return out


def _along_points(dirs: torch.Tensor, b: int) -> torch.Tensor:
    """``[m, b, n_in]``: each direction of ``dirs`` ``[m, n_in]`` at every point, by stride 0
    along the points, one point too (``expand`` gives a size-1 axis a stride of its own):
    the Taylor seed reads stride 0 as directions that are the same at every point."""
    return torch.as_strided(dirs, (dirs.shape[0], b, dirs.shape[1]), (dirs.stride(0), 0, dirs.stride(1)))


def _chunk_into(p: Problem, program, request: Request, need, single, with_value: bool, flat: dict,
                start: int, stop: int) -> None:  # fmt: skip
    """The terms of the points ``start`` to ``stop`` written into their rows of ``flat``."""
    rows = torch.arange(start, stop, device=p.device)
    if p.static_batch is not None and rows.numel() < p.static_batch:
        rows = torch.cat([rows, rows[-1:].expand(p.static_batch - rows.numel())])
    if single is not None:
        t, prim, factor = single
        z = p.z(rows)
        v = _along_points(torch.tensor([prim], dtype=z.dtype, device=z.device), z.shape[0])[0]
        program.series_into(z, v, t.order, flat[t.name][start:stop], factor)
        return
    value, coeffs = _coefficients(p, rows, need, program, with_value)
    for t in request.terms:
        _term_into(flat[t.name][start:stop], t, p.n_in, coeffs, value)


def _finish(p: Problem, out: Partials, top: int, strict: bool) -> None:
    bad = [name for name, v in out.items() if not all_finite(v)]
    if bad:
        msg = f"{', '.join(bad)} hold NaN or Inf values"
        if strict:
            raise NumericalError(msg, where=p.where)
        warnings.warn(f"{p.where}: {msg}", JaccliWarning, stacklevel=3)
    kinks = sorted(p.ops & NONSMOOTH_OPS)
    if kinks and top >= 2:
        warnings.warn(
            f"{p.where}: the model uses {', '.join(kinks)}: derivatives of order 2 and above through "
            "those units are zero almost everywhere and ignore their kinks; use a smooth activation "
            "(tanh, softplus, SiLU, GELU) for meaningful higher derivatives",
            JaccliWarning,
            stacklevel=3,
        )


def nested_derivative(g: Callable, z: Tensor, v: Tensor, order: int) -> Tensor:
    """``d^order/dt^order g(z + t v)`` at 0 by nested ``torch.func.jvp`` (the fall-back)."""
    from jaccli.engine.strategies import jvp

    h = g
    for _ in range(order):
        h = (lambda f: lambda zz: jvp(f, (zz,), (v,))[1])(h)
    with torch.no_grad():
        return h(z)


# --------------------------------------------------------------------------- interpolation


def compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """All tuples of ``parts`` non-negative integers summing to ``total``, in a fixed order."""
    out = []
    for combo in combinations_with_replacement(range(parts), total):
        t = [0] * parts
        for c in combo:
            t[c] += 1
        out.append(tuple(t))
    return sorted(set(out), reverse=True)


@functools.cache
def interpolation(parts: int, order: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[Fraction, ...], ...]]:
    """Directions ``i`` (``|i| = order`` over ``parts`` inputs) and the exact weights ``W``
    with ``∂^α g / α! = Σ_i W[α][i] c_i``, ``c_i`` the order-``order`` coefficient of
    ``t ↦ g(z + t i)``; rows of ``W`` in the order of :func:`compositions`."""
    idx = compositions(order, parts)
    n = len(idx)
    # c_i = Σ_α (∂^α g/α!) i^α: the matrix M[i][α] = i^α; W = M⁻¹ by Gauss–Jordan in ℚ
    m = [[Fraction(math.prod(b**a for a, b in zip(alpha, i))) for alpha in idx] + [Fraction(int(r == c)) for c in range(n)]
         for r, i in enumerate(idx)]  # fmt: skip
    for col in range(n):
        piv = next(r for r in range(col, n) if m[r][col] != 0)
        m[col], m[piv] = m[piv], m[col]
        p = m[col][col]
        m[col] = [x / p for x in m[col]]
        for r in range(n):
            if r != col and m[r][col] != 0:
                f = m[r][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return tuple(idx), tuple(tuple(row[n:]) for row in m)
