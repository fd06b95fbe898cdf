"""The compiled program: which rows each step needs, and running it on chunks of points.

:class:`TaylorProgram` holds the steps; a backward *need* analysis (:meth:`~TaylorProgram.schedule`)
keeps only the orders the requested result uses, and its methods seed the input jet and
run the steps on one chunk of points, writing into the caller's result:

- order 1: ``jacobian``, ``divergence``, ``jvp``;
- order 2: ``hessian`` (one row per entry ``(i, j)``), ``laplacian`` (one collapsed row);
- any order: ``series`` (univariate Taylor coefficients along directions, for
  ``partials``) and ``series_into`` (one coefficient written straight into a result).

Passes run inside :meth:`~TaylorProgram.workspace` take their rows from buffers reused
chunk after chunk (:mod:`.workspace`): no allocator setting is needed for speed.

Passes inside a :class:`~.fused.Fuser` (:data:`.fused.CURRENT`) take the chain rule of
elementwise ODE ops (tanh, sigmoid, …) from compiled kernels where the policy chose them.

Imports: :mod:`.jet`, :mod:`.record`, :mod:`.seeds`, :mod:`.workspace`, :mod:`.fused`, :mod:`.fold`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from jaccli.jets import fold, fused
from jaccli.jets.jet import Jet, Layout, _Call, empty_layout
from jaccli.jets.record import _INPUT, _BatchDim, _BatchScalar, _Ref, _Step, _substitute, _value_of, _walk
from jaccli.jets.seeds import _KEEP_SEEDS, _broadcast, _chunks, _onehot, _onehot_rows, _seed, _zero_jet
from jaccli.jets.workspace import _CURRENT, Workspace, empty_like


@dataclass
class _Schedule:
    """Per requested output orders: each step's layout and what to free after it."""

    layouts: list[Layout]
    live: list[bool]
    frees: list[list[int]]
    #: jets with no rows that a live step reads (a sum with an affine term): zero placeholders
    zero: list[bool]
    #: runs of steps computed together (:mod:`.fold`): step -> the folds that may start
    #: there, tried in order (the first whose ``run`` returns a jet computes its steps)
    folds: dict[int, list[fold.Fold]] = field(default_factory=dict)


#: the most bytes of buffers a program keeps between computations (:meth:`TaylorProgram.workspace`):
#: a CPU pass's working set is sized near 8-32 MiB by the planner, past it only where a
#: single point needs more
KEEP_BYTES = 64 * 2**20

#: what each kind needs at the output: the orders of its rows (``series`` asks its own)
WANT = {
    "value": frozenset({0}),
    "jacobian": frozenset({1}),
    "divergence": frozenset({1}),
    "jvp": frozenset({1}),
    "hessian": frozenset({2}),
    "laplacian": frozenset({2}),
}


@dataclass
class TaylorProgram:
    """A traced batch function ready to push jets through; see :func:`build`."""

    steps: list[_Step]
    output: Any
    n_in: int
    n_out: int
    dtype: torch.dtype
    itemsize: int
    _schedules: dict = field(default_factory=dict, repr=False)
    #: (kind, directions) -> bytes_per_point: a kept program is planned again on every call
    _per_point: dict = field(default_factory=dict, repr=False)
    #: (what the plan was made from, the plan): the planner's last plan of this program
    #: (:func:`jaccli.engine.planner.taylor_plan`), kept with it
    _plan: Any = field(default=None, repr=False, compare=False)
    #: the relative tolerance :func:`~.builder.build` checked it to, and up to which order
    tol: float = field(default=1e-4, repr=False)
    orders: int = field(default=0, repr=False)
    #: the recorded ops as one straight-line function of values (the recheck's, see builder._replay)
    replay: Any = field(default=None, repr=False, compare=False)
    #: eager seconds spent on this program and the fused-kernel keys its passes met, in this
    #: process (what :func:`.fused.should_compile` weighs; kept with the program across calls)
    fusion: dict = field(default_factory=dict, repr=False)
    #: whether the Hessian by adjoints serves this program (:func:`.adjoint.agrees`; None: not asked yet)
    adjoint: bool | None = field(default=None, repr=False, compare=False)
    #: (kind, dtype, device) -> seconds of one pass of each Taylor mode on a few points
    #: (auto mode's measured choice, :mod:`jaccli.engine.measure`)
    measured: dict = field(default_factory=dict, repr=False, compare=False)
    #: step -> how its arguments bind (see :func:`_binding`), made on first use
    _bindings: dict = field(default_factory=dict, repr=False, compare=False)
    #: request -> its passes' seeds (:meth:`_seeds`)
    _seed_cache: dict = field(default_factory=dict, repr=False, compare=False)
    #: the workspace of the last computation, for the next (:meth:`workspace`)
    _kept: list = field(default_factory=list, repr=False, compare=False)

    @contextlib.contextmanager
    def workspace(self) -> Iterator[Workspace]:
        """Passes inside reuse their buffers chunk after chunk, and the program's next
        computation reuses them again: a computation of one pass (512 points of a
        transformer's Hessian) would otherwise page-fault all of its buffers on every call
        (multi-head attention's: 40 ms a call, 30 with glibc's thresholds raised). What is
        kept is one pass's working set, as the planner sized it, and at most
        :data:`KEEP_BYTES`; it goes with the program.

        The workspace belongs to the thread (a context variable) while it computes: a
        program kept for a model may run in two threads at once, and a buffer must never
        be handed to both (the second takes a new workspace; the kept one is taken by one
        thread at a time). Reentrant: an inner use shares the outer one's buffers.
        """
        pool = _CURRENT.get()
        if pool is not None:
            yield pool
            return
        try:
            pool = self._kept.pop()  # one list operation: no other thread gets the same one
        except IndexError:
            pool = Workspace()
        token = _CURRENT.set(pool)
        try:
            yield pool
        finally:
            _CURRENT.reset(token)
            if pool.allocated <= KEEP_BYTES and not self._kept:
                self._kept.append(pool)
            else:
                pool.clear()

    # ---- analysis

    def ops(self) -> frozenset[str]:
        return frozenset(s.name for s in self.steps if s.kind in ("jet", "value"))

    def schedule(self, want: frozenset[int]) -> _Schedule:
        """Backward need analysis: which orders each step must produce for ``want`` at the output."""
        if want in self._schedules:
            return self._schedules[want]
        top = max(want, default=0)
        n = len(self.steps)
        need: list[set[int]] = [set() for _ in range(n)]
        live = [False] * n
        out = self.output
        if isinstance(out, _Ref):
            need[out.index] |= set(want)
            live[out.index] = True
        for i in reversed(range(n)):
            s = self.steps[i]
            if not live[i] or s.kind == _INPUT:
                continue
            if s.kind == "value":
                for r in s.jet_refs:
                    need[r].add(0)
                    live[r] = True
            else:
                passed = need[i] if s.linear else set(range(max(need[i], default=-1) + 1))
                for r in s.jet_refs:
                    need[r] |= passed
                    live[r] = live[r] or bool(passed)
            for r in s.value_refs:
                live[r] = True
        layouts = []
        for i, s in enumerate(self.steps):
            if s.kind in ("jet", _INPUT):
                # an affine node has no rows of order ≥ 2 (they are zero)
                layouts.append(Layout(*(k in need[i] and (k < 2 or not s.affine) for k in range(top + 1))))
            else:
                layouts.append(empty_layout(top))
        # a jet with no rows is zero (or unused): its step need not run
        for i, s in enumerate(self.steps):
            if s.kind in ("jet", _INPUT) and not any(layouts[i]):
                live[i] = False
        last: dict[int, int] = {}
        zero = [False] * n
        for i, s in enumerate(self.steps):
            if live[i]:
                for r in (*s.jet_refs, *s.value_refs):
                    last[r] = i
                    zero[r] = zero[r] or not live[r]
        frees: list[list[int]] = [[] for _ in range(n)]
        keep = out.index if isinstance(out, _Ref) else -1
        for r, i in last.items():
            if r != keep:
                frees[i].append(r)
        sched = _Schedule(layouts, live, frees, zero, fold.find(self.steps, layouts, live, out))
        self._schedules[want] = sched
        return sched

    def bytes_per_point(self, kind: str, directions: int) -> int:
        """Peak bytes one point needs in one pass with ``directions`` streams (an estimate).

        Simulates the live jets of a pass (rows times elements per point) and adds the
        temporaries of the rule that runs: the planner divides its budget by this.
        """
        key = (kind, int(directions))
        if key not in self._per_point:
            self._per_point[key] = self._bytes_per_point(kind, directions)
        return self._per_point[key]

    def _bytes_per_point(self, kind: str, directions: int) -> int:
        k1, k2 = self.stream_counts(kind, directions)
        sched = self.schedule(WANT[kind])
        live_bytes, peak = 0.0, 0.0
        sizes: dict[int, float] = {}
        for i, s in enumerate(self.steps):
            if not sched.live[i]:
                continue
            lay = sched.layouts[i]
            rows = lay.rows((1, k1, k2)) if s.kind != "value" else 1
            own = 0.0 if (s.rule is not None and s.rule.view) else rows * s.numel
            temp = 0.0
            if s.kind == "jet" and not s.linear:
                temp = (4 + k1 + 2 * k2) * s.numel
            sizes[i] = own
            live_bytes += own
            peak = max(peak, live_bytes + temp)
            for r in sched.frees[i]:
                live_bytes -= sizes.pop(r, 0.0)
        return int(peak * self.itemsize) + 64

    def stream_counts(self, kind: str, directions: int) -> tuple[int, int]:
        """``(k1, k2)`` of one pass of ``kind`` with ``directions`` directions (pairs for a Hessian)."""
        d = max(1, int(directions))
        if kind == "hessian":
            return min(self.n_in, 2 * d), d
        if kind == "laplacian":
            return d, 1
        if kind == "value":
            return 0, 0
        return d, 0

    # ---- evaluation

    def _run(self, z: Tensor, want: frozenset[int], cx: _Call, tangents: Tensor | None,
             onehot: Tensor | None = None):  # fmt: skip
        """Push the jet of ``z`` (first-order rows ``tangents``) through; returns the output (Jet, tensor or None).

        ``onehot``: the input columns when ``tangents`` are their one-hot rows.
        """
        env = self._env(z, want, cx, tangents, onehot, [None] * len(self.steps), 0, len(self.steps))
        out = self.output
        return _substitute(out, env, z.shape[0]) if isinstance(out, _Ref) else out

    def _env(self, z: Tensor, want: frozenset[int], cx: _Call, tangents: Tensor | None, onehot: Tensor | None,
             env: list, start: int, stop: int) -> list:  # fmt: skip
        """``env`` after the steps ``start`` to ``stop`` (exclusive) have run."""
        sched = self.schedule(want)
        batch = z.shape[0]
        cx.pool = _CURRENT.get()
        fuser = fused.CURRENT.get()
        folded: tuple[int, ...] = ()
        with torch.no_grad():
            for i in range(start, stop):
                s = self.steps[i]
                for f in sched.folds.get(i, ()):  # the first whose run computes its steps
                    if f.steps[-1] < stop and (jet := f.run(cx, env, batch)) is not None:
                        env[f.steps[-1]], folded = jet, f.steps
                        break
                if i in folded:  # computed by the fold: only its frees are left
                    for r in sched.frees[i]:
                        env[r] = None
                    continue
                if not sched.live[i]:
                    if sched.zero[i]:
                        env[i] = _zero_jet(cx, _substitute(s.shape, env, batch), z)
                    continue
                if s.kind == _INPUT:
                    env[i] = _seed(cx, sched.layouts[i], z, tangents, onehot)
                    continue
                values = s.kind == "value"
                args, kwargs = self.arguments(i, env, batch, values)
                if values:
                    env[i] = s.op(*args, **kwargs)
                else:
                    jet = None
                    if fuser is not None and s.name in fused.ODES and len(args) == 1 and not kwargs:
                        lay = sched.layouts[i]
                        jet = fuser.apply(s.name, cx, lay, args[0], lambda: s.rule.fn(cx, lay, *args))
                    env[i] = jet if jet is not None else s.rule.fn(cx, sched.layouts[i], *args, **kwargs)
                for r in sched.frees[i]:
                    env[r] = None
        return env

    def arguments(self, i: int, env: list, batch: int, values: bool) -> tuple[list, dict]:
        """Step ``i``'s arguments and keyword arguments, its references taken from ``env`` (the
        values of jets where ``values``) and batch entries sized for ``batch`` points."""
        s, bind = self.steps[i], self._bindings.get(i)
        if bind is None:
            bind = self._bindings[i] = _binding(s)
        if bind:  # top-level references only: no walk through the arguments
            return [a if r is None else _value_of(env[r]) if values else env[r] for a, r in zip(s.args, bind)], s.kwargs
        return _substitute(s.args, env, batch, values=values), _substitute(s.kwargs, env, batch, values=values)

    def _out_block(self, res, order: int, rows: int, z: Tensor) -> Tensor:
        """Rows of one order at the output as ``[rows, B, n_out]`` (zeros where the output does not depend on them)."""
        b = z.shape[0]
        if isinstance(res, Jet) and res.block(order) is not None:
            return res.block(order).reshape(rows, b, self.n_out)
        return z.new_zeros((rows, b, self.n_out), dtype=self.dtype)

    def value(self, z: Tensor) -> Tensor:
        """``g(z)`` through the program (the value rows only): ``[B, n_out]``."""
        res = self._run(z, WANT["value"], _Call((1,), None, z.shape[0]), None)
        if isinstance(res, Jet):
            return res.block(0).reshape(z.shape[0], self.n_out)
        return torch.as_tensor(res).reshape(z.shape[0], self.n_out)

    def jvp(self, z: Tensor, tangents: Tensor) -> Tensor:
        """``J t`` for each ``t`` in ``tangents`` ``[k, B, n_in]`` -> ``[k, B, n_out]``."""
        cx = _Call((1, tangents.shape[0]), None, z.shape[0])
        return self._out_block(self._run(z, WANT["jvp"], cx, tangents), 1, tangents.shape[0], z)

    def jacobian(self, z: Tensor, *, directions: int | None = None, out: Tensor | None = None) -> Tensor:
        """Per-point Jacobian ``[B, n_out, n_in]``, ``directions`` input columns per pass."""
        b = z.shape[0]
        out = z.new_empty((b, self.n_out, self.n_in), dtype=self.dtype) if out is None else out
        if self.n_in == 1:  # one row: the last product writes it into the result itself
            cols = torch.zeros(1, dtype=torch.long)
            cx = _Call((1, 1), None, b)
            self._row_into(z, WANT["jacobian"], cx, _onehot(cols, b, 1, z), cols, 1, out.view(b, self.n_out))
            return out
        for cols in _chunks(self.n_in, directions):
            cx = _Call((1, cols.numel()), None, b)
            res = self._run(z, WANT["jacobian"], cx, _onehot(cols, b, self.n_in, z), onehot=cols)
            block = self._out_block(res, 1, cols.numel(), z)  # [k, B, n_out]
            if cols.numel() == self.n_in:
                out.copy_(block.permute(1, 2, 0))
            else:
                out[:, :, cols] = block.permute(1, 2, 0).to(out.dtype)  # a model may answer in another dtype
        return out

    def divergence(self, z: Tensor, *, directions: int | None = None, out: Tensor | None = None) -> Tensor:
        """``Σᵢ ∂gᵢ/∂zᵢ`` per point ``[B]`` (needs ``n_out == n_in``), ``directions`` per pass."""
        if self.n_out != self.n_in:
            raise ValueError("divergence needs as many outputs as inputs")
        b = z.shape[0]
        out = z.new_zeros(b, dtype=self.dtype) if out is None else out.zero_()
        for cols in _chunks(self.n_in, directions):
            cx = _Call((1, cols.numel()), None, b)
            res = self._run(z, WANT["divergence"], cx, _onehot(cols, b, self.n_in, z), onehot=cols)
            block = self._out_block(res, 1, cols.numel(), z)  # [k, B, n]
            out += block.gather(2, cols.to(z.device)[:, None, None].expand(-1, b, 1)).sum(0)[:, 0]
        return out

    def laplacian(self, z: Tensor, *, directions: int | None = None, out: Tensor | None = None) -> Tensor:
        """``Σᵢ ∂²g/∂zᵢ²`` per point ``[B, n_out]``: one collapsed stream, ``directions`` per pass."""
        b, n = z.shape[0], self.n_in
        out = z.new_empty((b, self.n_out), dtype=self.dtype) if out is None else out

        def passes():
            return [(cols, _onehot_rows(cols, n, z)) for cols in _chunks(n, directions)]

        for k, (cols, e) in enumerate(self._seeds(("laplacian", directions, z.dtype, z.device), passes)):
            cx = _Call((1, cols.numel(), 1), None, b, collapsed=True)
            # the first pass writes, later ones add
            self._row_into(z, WANT["laplacian"], cx, _broadcast(e, b), cols, 2, out, add=k > 0)
        return out

    def hessian(self, z: Tensor, *, directions: int | None = None, out: Tensor | None = None,
                columns: Tensor | None = None) -> Tensor:  # fmt: skip
        """Per-point Hessian ``[B, n_out, n_in, n_in]``, ``directions`` pairs ``i ≤ j`` per pass;
        ``columns`` (``k`` input indices): only the entries among them, ``[B, n_out, k, k]``."""
        b, n = z.shape[0], self.n_in
        k = n if columns is None else columns.numel()
        out = z.new_empty((b, self.n_out, k, k), dtype=self.dtype) if out is None else out

        def passes():
            pairs = torch.triu_indices(k, k, device=z.device)
            total = pairs.shape[1]
            step = total if directions is None else max(1, int(directions))
            made = []
            for start in range(0, total, step):
                i, j = pairs[:, start : start + step]  # positions in the result
                gi, gj = (i, j) if columns is None else (columns[i], columns[j])  # input indices
                cols, inverse = torch.unique(torch.cat([gi, gj]), return_inverse=True)
                made.append((i, j, cols, (inverse[: i.numel()], inverse[i.numel() :]), _onehot_rows(cols, n, z)))
            return made

        made = self._seeds(("hessian", directions, z.dtype, z.device), passes) if columns is None else passes()
        for i, j, cols, local, e in made:
            cx = _Call((1, cols.numel(), i.numel()), local, b)
            seed = _broadcast(e, b)
            if k == 1:  # one entry: the last product writes it into the result itself
                self._row_into(z, WANT["hessian"], cx, seed, cols, 2, out.view(b, self.n_out))
                continue
            res = self._run(z, WANT["hessian"], cx, seed, onehot=cols)
            block = self._out_block(res, 2, i.numel(), z)  # [P, B, n_out]
            block = block.permute(1, 2, 0).to(out.dtype)  # a model may answer in another dtype
            out[:, :, i, j] = block
            out[:, :, j, i] = block
        return out

    def _seeds(self, key: tuple, make) -> list:
        """The set-up of a request's passes (``make()``: columns, one-hot seed rows, pairs), kept
        per ``key`` while the input is small (:data:`_KEEP_SEEDS`): a program called again with
        the same request skips the ~10 ATen calls that build them (a small model's pass has ~170)."""
        got = self._seed_cache.get(key)
        if got is None:
            got = make()
            # a Hessian's one-hot rows are [columns, n_in] per pass: count what is kept, not n_in²
            if sum(t.numel() for made in got for t in made if isinstance(t, Tensor)) <= _KEEP_SEEDS:
                if len(self._seed_cache) >= 8:  # one entry per request shape; a sweep of them is not kept
                    self._seed_cache.clear()
                self._seed_cache[key] = got
        return got

    # ---- univariate series, any order (partials)

    def series(self, z: Tensor, tangents: Tensor, order: int, keep: frozenset[int] | None = None) -> list:
        """Taylor coefficients ``[g(z), c₁, …, c_order]`` of ``t ↦ g(z + t v)`` for each of the
        ``m`` directions ``v`` in ``tangents`` ``[m, B, n_in]``: entry ``k`` is ``[m, B, n_out]``
        (``[B, n_out]`` for the value), None where zero or not asked for. With ``keep``,
        only those coefficients are computed (and the rows each step needs for them)."""
        want = frozenset(range(order + 1)) if keep is None else frozenset(keep)
        m, b = tangents.shape[0], z.shape[0]
        cx = _Call((1, *(m,) * order), None, b)
        res = self._run(z, want, cx, tangents)
        out: list = []
        for k in range(order + 1):
            if k not in want:
                out.append(None)
            elif isinstance(res, Jet) and res.block(k) is not None:
                c = res.block(k)
                out.append(c[0].reshape(b, self.n_out) if k == 0 else c.reshape(m, b, self.n_out))
            elif k == 0:
                out.append(torch.as_tensor(res, dtype=self.dtype, device=z.device).reshape(b, self.n_out))
            else:
                out.append(None)
        return out

    def series_into(self, z: Tensor, v: Tensor, order: int, out: Tensor, factor: float) -> None:
        """``factor`` times coefficient ``order`` of ``t ↦ g(z + t v)`` (``v`` ``[B, n_in]``) written
        into ``out`` ``[B, n_out]`` (see :meth:`_row_into`)."""
        cx = _Call((1, *(1,) * order), None, z.shape[0])
        self._row_into(z, frozenset({order}), cx, v[None], None, order, out, factor)

    def _row_into(self, z: Tensor, want: frozenset[int], cx: _Call, tangents: Tensor | None,
                  onehot: Tensor | None, order: int, out: Tensor, factor: float = 1.0,
                  add: bool = False) -> None:  # fmt: skip
        """``factor`` times the one output row of ``order`` of a pass, written (``add``: added)
        into ``out`` ``[B, n_out]``. Where the output is a product with a constant matrix (a
        last linear layer, perhaps reshaped), the factor scales its narrow input and the
        product lands in ``out`` itself: no pass over the wide result but the one that
        writes it (no row block of the output, no copy of it)."""
        last = self._last_product()
        n = len(self.steps)
        b = z.shape[0]
        env = self._env(z, want, cx, tangents, onehot, [None] * n, 0, n if last is None else last)
        if last is not None:
            s = self.steps[last]
            args = _substitute(s.args, env, b)
            a, w = (args[1], args[2]) if s.name == "addmm" else (args[0], args[1])
            c = a.block(order) if isinstance(a, Jet) else None
            if (c is not None and c.shape[0] == 1 and isinstance(w, Tensor) and out.is_contiguous()
                    and c.shape[1] * w.shape[-1] == out.numel() and c.dtype == w.dtype == out.dtype):  # fmt: skip
                with torch.no_grad():
                    scale = factor * s.kwargs.get("alpha", 1)
                    x = c[0] if scale == 1 else torch.mul(c[0], scale, out=empty_like(c[0]))
                    dest = out.view(c.shape[1], w.shape[-1])
                    if add:
                        dest.addmm_(x, w)
                    else:
                        torch.mm(x, w, out=dest)
                return
            env = self._env(z, want, cx, tangents, onehot, env, last, n)  # the rest, as usual
        res = _substitute(self.output, env, b) if isinstance(self.output, _Ref) else self.output
        c = res.block(order) if isinstance(res, Jet) else None
        with torch.no_grad():
            if c is None:
                if not add:
                    out.zero_()
            elif add:
                out.add_(c.reshape(out.shape), alpha=factor)
            elif factor == 1:
                out.copy_(c.reshape(out.shape))
            else:
                torch.mul(c.reshape(out.shape), factor, out=out)

    def _last_product(self) -> int | None:
        """The step of ``x @ W`` (``mm``, or ``addmm`` whose bias only the value gets) the
        output is, through reshapes: its coefficients ≥ 1 are ``x_k @ W``."""
        i = self.output.index if isinstance(self.output, _Ref) else None
        while i is not None and self.steps[i].name in _RESHAPES and self.steps[i].kind == "jet":
            ref = self.steps[i].args[0]
            i = ref.index if isinstance(ref, _Ref) else None
        if i is None or self.steps[i].kind != "jet" or self.steps[i].name not in ("mm", "addmm"):
            return None
        s = self.steps[i]
        operands = s.args[1:3] if s.name == "addmm" else s.args[:2]
        if not isinstance(operands[0], _Ref) or isinstance(operands[1], _Ref) or len(s.jet_refs) != 1:
            return None  # the product must be linear in its left operand, the right a constant
        return i


def _binding(s: _Step) -> tuple:
    """How a step's arguments bind, per top-level argument: the index of the step it refers to,
    or None for a constant passed as it is; ``()`` where a reference or a batch size sits
    deeper (a list of jets, a shape), for :func:`~.record._substitute` to walk at each call.
    Walking every step's arguments cost ~0.1 ms of a small model's pass."""
    nested: list = []
    deeper = [a for a in s.args if not isinstance(a, _Ref)] + list(s.kwargs.values())
    _walk(deeper, lambda o: nested.append(o) if isinstance(o, (_Ref, _BatchDim, _BatchScalar)) else None)
    if nested or not s.args:
        return ()
    return tuple(a.index if isinstance(a, _Ref) else None for a in s.args)


#: ops that only reshape one jet (walked through to find the output's last product)
_RESHAPES = frozenset({"view", "_unsafe_view", "reshape", "alias", "clone", "squeeze", "unsqueeze"})
