"""Building a program from a function and verifying it before use.

:func:`build` records the function at two probe batch sizes, compiles the records,
and checks the program's value, ``J v``, ``d²g[v, v]`` and (past order 2) the top
derivative ``dᴷ/dtᴷ g(z + t v)`` against the function and plain autograd off the traced
points (so baked-in branches show); a program that disagrees is :class:`~.jet.Unsupported`.

Imports: :mod:`.record`, :mod:`.program`, :mod:`.jet`.
"""

from __future__ import annotations

from collections.abc import Callable

import math

import torch
from torch import Tensor

from jaccli.jets.jet import Unsupported, _Call
from jaccli.jets.record import _INPUT, PROBE_BATCHES, _BatchDim, _BatchScalar, _Ref, _Step, _compile, _trace
from jaccli.jets.program import TaylorProgram, WANT


def _probe_batch(z: Tensor, b: int) -> Tensor:
    return z[torch.arange(b, device=z.device) % z.shape[0]]


def build(g: Callable[[Tensor], Tensor], z_probe: Tensor, orders: int = 2) -> TaylorProgram:
    """Trace ``g: [B, n_in] -> [B, n_out]`` and check the program against it; raises :class:`Unsupported`.

    ``g`` is traced at two batch sizes (rows of ``z_probe``, cycled) so that shape
    arguments holding the batch size become symbolic. The program is then run on a
    perturbed probe batch and compared with ``g`` and with torch.func's directional
    derivatives up to ``orders`` (1 for Jacobians and divergences, 2 for Hessians and
    Laplacians, ``k`` for order-``k`` partials: checking only what will be used keeps
    small requests cheap); a mismatch
    means a rule does not fit this model, and the caller should fall back.
    """
    b1, b2 = PROBE_BATCHES
    trace1, trace2 = _trace(g, _probe_batch(z_probe, b1)), _trace(g, _probe_batch(z_probe, b2))
    steps, output = _compile(trace1, trace2, (b1, b2))
    for s in steps:
        if s.kind == "jet":
            s.affine = s.linear and all(steps[r].affine for r in s.jet_refs)
    for i in sorted(_reachable(steps, output)):
        if steps[i].kind == "jet" and steps[i].rule is None:
            raise Unsupported(steps[i].name)
    y = trace2[2]
    if not isinstance(y, Tensor) or y.dim() != 2 or not y.is_floating_point():
        raise Unsupported("trace", "the batch function must return a [B, n_out] floating-point tensor")
    program = TaylorProgram(steps, output, z_probe.shape[1], y.shape[1], y.dtype, y.element_size())
    # a float64 model that computes in float32 somewhere is checked at float32's tolerance;
    # float64 not at 1e-9 either: some of torch's float64 backward kernels use float32
    # constants (hardsigmoid's slope 1/6 is off by 2e-8), and a wrong rule is off by O(1)
    low = any(isinstance(r[3], Tensor) and r[3].is_floating_point() and r[3].element_size() < 8 for r in trace2[0])
    program.tol = 1e-4 if low or z_probe.dtype != torch.float64 else 1e-7
    _verify(program, g, z_probe, orders, tol=program.tol)
    program.orders = orders
    return program


def recheck(program: TaylorProgram, g: Callable[[Tensor], Tensor], z_probe: Tensor, orders: int,
            value: Tensor | None = None) -> None:  # fmt: skip
    """The check of a program reused for new inputs: its value against ``g``'s on these probe
    points; raises :class:`Unsupported`.

    Only the value: the derivatives were checked against autograd when the program was
    built, and a program is the function's own ops with a rule each, so it cannot come to
    disagree with autograd while its ops still compute ``g``. What a reuse can meet is
    another function behind the same key (a Python flag, a plain tensor attribute): that
    changes the values. The derivative check was two reverse passes of the model and the
    program's first and second order, about 5 ms of fixed cost per call on small models.

    The value is the program's recorded ops replayed on plain tensors (:func:`_replay`:
    one straight-line function, no rules, no jets; the rules' value parts, checked with
    their derivatives when the program was built, cost 3-6x as much per call).
    ``value`` is ``g(z_probe)`` where the caller has it already (the batch-independence
    check's forward on the same probe rows): then ``g`` is not called again. Without it,
    ``g`` runs on the probe points moved off the traced ones, as :func:`build` checks.
    """
    if value is None:
        z, _v, _gen = _off_trace(z_probe)
        with torch.no_grad():
            value = g(z)
    else:
        z = z_probe
    try:
        with torch.no_grad():
            got = _replay(program)(z)
    except Exception as exc:  # noqa: BLE001 - the ops do not fit these inputs: record anew
        raise Unsupported("verify", f"{type(exc).__name__}: {exc}") from None
    if not _close(got, value.detach(), program.tol):
        raise Unsupported("verify", "the traced program disagrees with the model")


def _replay(program: TaylorProgram) -> Callable[[Tensor], Tensor]:
    """``z -> g(z)`` ``[B, n_out]`` by the program's recorded ops, made once per program.

    The ops the output depends on become one generated Python function of straight-line
    calls (``v7 = op(v3, k2, 2 * b)``: references to earlier results, the batch size where
    a shape follows it, every other argument a constant bound by name, never written into
    the source): a step costs its op's call, where running the program (``program.value``)
    costs a rule, a jet and the substitution of its arguments (0.40 ms against 0.07 ms for
    the 29 steps of the MAF flow, 8 rows).
    """
    if program.replay is None:
        program.replay = _generate(program.steps, program.output, program.n_out)
    return program.replay


def _generate(steps: list[_Step], output, n_out: int) -> Callable[[Tensor], Tensor]:
    consts: dict[str, object] = {}

    def const(obj) -> str:
        name = f"k{len(consts)}"
        consts[name] = obj
        return name

    def expr(obj) -> str:
        if isinstance(obj, _Ref):
            return f"v{obj.index}"
        if isinstance(obj, _BatchDim):
            return f"({obj.factor} * b)"
        if isinstance(obj, _BatchScalar):
            return f"{const(obj)}.at(b)"
        if isinstance(obj, list):
            return "[" + ", ".join(map(expr, obj)) + "]"
        if isinstance(obj, tuple):
            return "(" + "".join(expr(o) + ", " for o in obj) + ")"
        if isinstance(obj, dict):
            return "{" + ", ".join(f"{const(k)}: {expr(v)}" for k, v in obj.items()) + "}"
        if obj is None or type(obj) in (bool, int):
            return repr(obj)
        return const(obj)

    lines = ["def replay(z):", "    b = z.shape[0]"]
    for i in sorted(_reachable(steps, output)):
        s = steps[i]
        if s.kind == _INPUT:
            lines.append(f"    v{i} = z")
            continue
        args = [expr(a) for a in s.args] + ([f"**{expr(s.kwargs)}"] if s.kwargs else [])
        lines.append(f"    v{i} = {const(s.op)}({', '.join(args)})")
    lines.append(f"    return {expr(output)}.reshape(b, {int(n_out)})")
    namespace = dict(consts)
    exec(compile("\n".join(lines), "<jaccli.jets replay>", "exec"), namespace)  # noqa: S102 - no text of the model's
    return namespace["replay"]


def _reachable(steps: list[_Step], output) -> set[int]:
    """Steps the output depends on (an unsupported op elsewhere does not matter)."""
    seen: set[int] = set()
    todo = [output.index] if isinstance(output, _Ref) else []
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend((*steps[i].jet_refs, *steps[i].value_refs))
    return seen


def _off_trace(z_probe: Tensor) -> tuple[Tensor, Tensor, torch.Generator]:
    """Probe points moved off the traced ones (so that baked-in branches show), the direction
    they moved along (the check's ``v``) and the generator that drew it (for the check's ``u``)."""
    z = _probe_batch(z_probe, max(PROBE_BATCHES) + 1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
    return z + 1e-3 * v, v, gen


def _close(got: Tensor, want: Tensor, tol: float) -> bool:
    """Agreement to relative ``tol``; non-finite entries must sit in the same places (sqrt at 0, …)."""
    if got.shape == want.shape and want.numel():
        # all finite (the common case, two reductions): a finite largest difference means
        # neither side holds an inf or a nan (inf - inf and x - nan are not finite)
        err, scale = float((got - want).abs().max()), float(want.abs().max())
        if math.isfinite(err):
            return err <= tol * max(scale, 1.0)
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        return False
    if not finite.any():
        return True
    scale = max(float(want[finite].abs().max()), 1.0)
    return bool((got[finite] - want[finite]).abs().max() <= tol * scale)


def _verify(program: TaylorProgram, g: Callable, z_probe: Tensor, orders: int, tol: float) -> None:
    """Compare value, ``J v`` and (``orders`` 2) ``d²g[v, v]`` — past order 2 the value and the
    top derivative along ``v`` — with the model and autograd on a few points, to relative
    ``tol`` (projected on a random output direction, see :func:`_reference_jets`)."""
    z, v, gen = _off_trace(z_probe)

    def close(got: Tensor, want: Tensor) -> bool:
        return _close(got, want, tol)

    def second(zz: Tensor) -> Tensor:
        pair = (torch.zeros(1, dtype=torch.long, device=zz.device),) * 2
        cx = _Call((1, 1, 1), pair, zz.shape[0])
        return program._out_block(program._run(zz, WANT["hessian"], cx, v[None]), 2, 1, zz)[0]

    def top(zz: Tensor) -> Tensor:
        c = program.series(zz, v[None], orders, frozenset({orders}))[orders]
        return zz.new_zeros((zz.shape[0], program.n_out), dtype=program.dtype) if c is None else c[0] * math.factorial(orders)

    try:
        if orders > 2:  # the top coefficient involves every lower one (as the partials use it)
            got = (program.value(z), None, None, top(z))
        else:
            got = (program.value(z), program.jvp(z, v[None])[0], second(z) if orders > 1 else None, None)
    except Unsupported:
        raise
    except Exception as exc:  # a rule that does not fit this use of its op
        raise Unsupported("verify", f"{type(exc).__name__}: {exc}") from None
    with torch.no_grad():
        if not close(got[0], g(z)):
            raise Unsupported("verify", "the traced program disagrees with the model")
    u = torch.randn(got[0].shape, generator=gen, dtype=z.dtype).to(z.device)
    if orders > 2:
        try:
            want_top = _reference(g, z, v, u, orders)
        except Exception:  # no (higher) backward in autograd: nothing to compare with
            return
        if not close((u * got[3]).sum(-1), want_top):
            raise Unsupported("verify", "the Taylor derivatives disagree with autograd")
        return
    try:
        want_t, want_tt = _reference_jets(g, z, v, u, orders)
    except Exception:  # autograd has no (double) backward for some op: nothing to compare with
        return
    if not close((u * got[1]).sum(-1), want_t):
        raise Unsupported("verify", "the Taylor derivatives disagree with autograd")
    if orders > 1 and not close((u * got[2]).sum(-1), want_tt):
        raise Unsupported("verify", "the Taylor derivatives disagree with autograd")


def _reference_jets(g: Callable, z: Tensor, v: Tensor, u: Tensor, orders: int) -> tuple[Tensor, Tensor | None]:
    """``uᵀ J v`` and (``orders`` 2) ``uᵀ d²g[v, v]`` per point, by one and two reverse passes.

    Projected on a random ``u``, every reference is a gradient or a Hessian-vector product
    of the scalar ``uᵀ g``: no forward mode (PyTorch's forward-mode formula for
    ``native_layer_norm`` gives wrong second derivatives) and nothing past the double
    backward that every op with a Hessian has. Not torch.func either: under it ``F.linear``
    and TorchScript ops run Python decompositions that import torch._dynamo, a second of
    start-up for every command.
    """
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        y = g(zz)
        # the scalar's gradient: grad_outputs would import sympy (see check_batch_independence)
        (w,) = torch.autograd.grad((y * u).sum(), zz, create_graph=orders > 1, allow_unused=True)
        if w is None:  # the output does not depend on the input
            return z.new_zeros(z.shape[0]), (z.new_zeros(z.shape[0]) if orders > 1 else None)
        first = (w * v).sum(-1)
        if orders < 2:
            return first.detach(), None
        if not first.requires_grad:  # linear in the input: no curvature
            return first.detach(), torch.zeros_like(first)
        (h,) = torch.autograd.grad(first.sum(), zz, allow_unused=True)
        second = torch.zeros_like(first) if h is None else (h * v).sum(-1)
    return first.detach(), second.detach()


def _reference(g: Callable, z: Tensor, v: Tensor, u: Tensor, order: int) -> Tensor:
    """``uᵀ dᵏ/dtᵏ g(z + t v)`` per point, ``k = order``, by ``order`` nested reverse passes of
    the scalar ``uᵀ g`` (``s ↦ ∇s · v``): gradients of gradients, never a JVP by double backward
    nor forward mode (both wrong through ``native_layer_norm`` in PyTorch)."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        s = (u * g(zz)).sum(-1)
        for k in range(order):
            if not s.requires_grad:  # a polynomial of lower degree: the rest is zero
                return torch.zeros_like(s).detach()
            (w,) = torch.autograd.grad(s.sum(), zz, create_graph=k < order - 1, allow_unused=True)
            if w is None:
                return torch.zeros_like(s).detach()
            s = (w * v).sum(-1)
    return s.detach()
