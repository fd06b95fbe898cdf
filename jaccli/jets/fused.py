"""Fused Taylor kernels: the chain rule of one elementwise op compiled by inductor (``torch.compile``'s compiler).

What it owns: the *unit* that is compiled, the compiled kernels of this process, the on-disk
cache directory, and the policy of when compiling pays (:func:`should_compile`).

**The unit.** Eager, a ``tanh`` layer of a fourth-order series is some fifteen memory-bound
passes over its rows (the value, ``h = 1 - y²``, the recurrence's products): inductor fuses
them into one loop nest that reads the input's rows once and writes the output's once
(u_xxxx's tanh rule on ``[5, 12000, 50]``: 6.5 ms eager, 2.4 ms compiled; a Hessian pair
pass 0.42 → 0.33 ms; a Laplacian of a 256-wide layer 142 → 116 ms; one thread, under load).
The whole per-chunk pass is *not* the unit: the eager rules write their rows into slices
of one buffer (``out=``), and functionalisation turns each write into a ``slice_scatter``
of the whole buffer; inductor fused those into nested selects evaluated element by element
(the 2→50³→1 Hessian's chunk pass took 108 ms compiled against 4.5 ms eager, and still
10-16 ms with every buffer realised). So the kernels here are written functionally (the
blocks joined by one ``cat``), for the ops whose derivatives follow an ODE ``f′ = g(f)``
with ``g`` a polynomial of degree ≤ 2 (tanh, sigmoid, tan, exp, expm1: :data:`ODES`), in
every mode of :class:`~.jet._Call` (pairs, collapsed, series of any order).

**Shapes stay static.** A kernel is compiled for one key (op, mode, layout, the input's
blocks, shape, dtype, device) with ``dynamic=False``; only passes at the planned chunk
size (:attr:`Fuser.batch`) use it, a shorter last chunk runs eager (rows are independent
per point, so this changes no value): no recompilation, no padding.

**The cache.** Inductor's FX-graph cache under ``$TORCHINDUCTOR_CACHE_DIR`` when set, else
``$XDG_CACHE_HOME/jaccli/inductor`` (``~/.cache/jaccli/inductor``; inductor reads only the
environment, so the first compile sets ``TORCHINDUCTOR_CACHE_DIR`` for the process when unset). A marker file per kernel
key (:func:`cache_marker`) says that a compile of that key finished once on this machine,
so the policy can predict a warm compile instead of a cold one.

**Failure** (no C++ compiler, a dynamo error) marks the key failed: the pass runs eager and
:attr:`Fuser.notes` says why; never an error.

Imports: torch, :mod:`.jet`, :mod:`.elementwise` (its ODE table); :mod:`.program` imports this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from jaccli.jets.elementwise import _ODES as _ELEMENTWISE_ODES
from jaccli.jets.jet import Jet, Layout, _Call

#: ``f′ = g(f)``: ``g``'s coefficients (low to high, :mod:`.elementwise`'s table) and the op computing ``f``
ODES: dict[str, tuple[tuple[float, ...], object]] = {name: (g, getattr(torch, name)) for name, g in _ELEMENTWISE_ODES.items()}

#: ``compile=`` / ``--compile`` values and what they mean
MODES = {"auto": "auto", "on": True, "off": False, True: True, False: False}

#: predicted compile seconds per kernel (not in the cache, in it) and the one-time import of
#: inductor, on the safe side of what the project's 2-core CPU took under load (one thread,
#: a fresh process): u_xxxx's three kernels 17.1 s cold and 3.4 s warm, imports included;
#: importing ``torch._dynamo`` and ``torch._inductor.compile_fx`` alone 3.0 s (docs/performance.md)
COLD_S, WARM_S, IMPORT_S = 10.0, 1.5, 3.0
#: a kernel is used only where it takes at most this fraction of the eager rule's time
MARGIN = 0.9
#: ``auto`` keeps a program's fused passes only while they take at most this fraction of its
#: eager ones (medians of its last 16 full chunks of each, judged from the 8th fused one on):
#: lenient, because the eager times are older and a shared machine's load moves in between
#: (u_xxxx's fused chunks, 0.68 of eager in one run, read 0.95 in another under a load spike)
PROGRAM_MARGIN, PROGRAM_CHUNKS = 1.0, 8


def cache_dir() -> Path:
    """Where inductor's on-disk cache (and the markers of compiled keys) live."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaccli" / "inductor"


def cache_marker(key: tuple) -> Path:
    digest = hashlib.sha1(repr((torch.__version__, key)).encode()).hexdigest()[:24]
    return cache_dir() / "jaccli-keys" / digest


def predicted_cost(keys) -> float:
    """Seconds compiling ``keys`` is expected to take in this process: :data:`WARM_S` where a
    marker says the cache holds the key, :data:`COLD_S` otherwise; plus :data:`IMPORT_S`
    while dynamo and inductor are not imported yet."""
    import_s = 0.0 if "torch._inductor.compile_fx" in sys.modules else IMPORT_S
    return import_s + sum(WARM_S if _warm(k) else COLD_S for k in keys)


#: key -> whether its marker exists (asked once a process: the policy asks after every chunk)
_WARM: dict[tuple, bool] = {}


def _warm(key: tuple) -> bool:
    if key not in _WARM:
        _WARM[key] = cache_marker(key).exists()
    return _WARM[key]


def should_compile(mode, spent_s: float, predicted_s: float) -> bool:
    """Ski rental: ``auto`` compiles once the eager time already spent on a program reaches
    what compiling is predicted to cost, so a run never pays more than about twice the best
    choice made in hindsight, and a run shorter than one compile never pays one."""
    mode = MODES[mode]
    if mode is True or mode is False:
        return mode
    return spent_s >= predicted_s


def kernel_key(name: str, cx: _Call, lay: Layout, x: Jet) -> tuple | None:
    """What one compiled kernel serves, or None where the op or its use is not fused."""
    if name not in ODES or not isinstance(x, Jet) or not x.lay.value:
        return None
    t = x.t
    if t.dtype not in (torch.float32, torch.float64) or not t.is_contiguous():
        return None
    if lay.top >= 1 and x.block(1) is None:  # the eager rule handles a constant input
        return None
    present = tuple(x.block(k) is not None for k in range(lay.top + 1))
    return (name, cx.counts, cx.pair_key, cx.collapsed, tuple(lay), present, tuple(t.shape), str(t.dtype), str(t.device))


def _kernel(key: tuple):
    """The functional chain rule of ``key``: ``(input blocks) -> output rows`` (one ``cat``)."""
    name, counts, pairs, collapsed, lay, present, _shape, _dtype, _device = key
    (g, f) = ODES[name]
    if name == "tanh" and _dtype == "torch.float32" and _device == "cpu":
        f = _tanh_expm1
    g = tuple(g) + (0.0,) * (3 - len(g))
    top = len(lay) - 1
    series = pairs is None and not collapsed

    def poly(y):  # g(y), skipping zero terms
        r = None
        for c, term in ((g[0], None), (g[1], y), (g[2], None if not g[2] else y * y)):
            if c:
                part = c if term is None else c * term
                r = part if r is None else r + part
        return r

    def run(out: Tensor, *blocks: Tensor) -> None:
        it = iter(blocks)
        xs = [next(it) if p else None for p in present] + [None] * (top + 1 - len(present))
        y0 = f(xs[0])
        h0 = poly(y0)
        ys: list = [y0] + [None] * top
        if series:  # y_k = (1/k) Σ j x_j h_{k-j}, h_m = g₁ y_m + g₂ Σ_{i+j=m} y_i y_j
            hs: list = [h0] + [None] * top
            for k in range(1, top + 1):
                if k > 1:
                    m = k - 1
                    sq = sum(ys[i] * ys[m - i] for i in range(m + 1))
                    hs[m] = g[1] * ys[m] + g[2] * sq
                terms = [j * xs[j] * hs[k - j] for j in range(1, k + 1) if xs[j] is not None]
                ys[k] = sum(terms) / k
        else:  # orders ≤ 2: y₁ = h x₁, y₂ = h x₂ + f″ x₁⊗x₁, f″ = g′(y) h
            x1 = xs[1]
            if top >= 1:
                ys[1] = h0 * x1
            if top >= 2:
                if collapsed:
                    sq = (x1 * x1).sum(0, keepdim=True)
                else:
                    sq = torch.cat([x1[i : i + 1] * x1[j : j + 1] for i, j in zip(*pairs)])
                f2 = (g[1] + 2.0 * g[2] * y0) * h0
                ys[2] = f2 * sq if xs[2] is None else f2 * sq + h0 * xs[2]
        # into the caller's buffer (from the workspace): inductor stores there directly,
        # and a fresh output per pass would page-fault its megabytes again every chunk
        out.copy_(torch.cat([ys[k] for k in range(top + 1) if lay[k]]))

    return run


def _tanh_expm1(x: Tensor) -> Tensor:
    """float32 CPU tanh as the eager rule's five-pass form computes it (:func:`.elementwise._tanh`:
    ``e / (e + 2)``, ``e = expm1(2x)``, as accurate as torch's kernel): inductor's own tanh made the fused
    series kernel of u_xxxx 1.6× slower (2.0 against 1.3 ms, under load)."""
    e = torch.expm1(2.0 * x.clamp(-9.0, 9.0))
    return e / (e + 2.0)


#: key -> compiled kernel (None: compiling it failed, or it lost to the eager rule); shared by
#: every program of the process; and why a key has none
_KERNELS: dict[tuple, object] = {}
_WHY: dict[tuple, str] = {}


@dataclass
class Fuser:
    """One computation's use of fused kernels (see the module docstring).

    ``active``: use (and compile) kernels; otherwise only note the keys a pass meets
    (:attr:`seen`, what the policy prices). ``batch``: the chunk size kernels serve.
    """

    #: the chunk size kernels serve
    batch: int
    #: ``"auto"``, True or False (:data:`MODES`)
    mode: object = "auto"
    active: bool = False
    seen: set = field(default_factory=set)
    compiled: int = 0  # kernels compiled by this computation
    used: int = 0  # passes of a step through a fused kernel
    compile_s: float = 0.0
    notes: list = field(default_factory=list)
    #: the program's ledger (:attr:`TaylorProgram.fusion`), kept across calls: what ``auto`` decides by
    spent: dict = field(default_factory=dict, repr=False)

    def apply(self, name: str, cx: _Call, lay: Layout, x, eager) -> Jet | None:
        """The step's output jet from a fused kernel, or None: run the eager rule (``eager()``)."""
        if cx.batch != self.batch:
            return None
        key = kernel_key(name, cx, lay, x)
        if key is None:
            return None
        self.seen.add(key)
        if not self.active:
            return None
        blocks = [x.block(k) for k in range(lay.top + 1) if x.block(k) is not None]
        kernel = _KERNELS.get(key, _MISSING)
        if kernel is _MISSING:
            kernel = self._compile(key)
            if kernel is not None and not self._faster(kernel, eager, cx, lay, x, blocks):
                kernel = _KERNELS[key] = None
                _WHY[key] = f"the fused {name} kernel of {tuple(x.t.shape)} was slower than eager: not used"
        if kernel is None:
            if _WHY.get(key) and _WHY[key] not in self.notes:  # each computation says why, once
                self.notes.append(_WHY[key])
            return None
        out = cx.empty(lay, x.shape, x.t)
        kernel(out.t, *blocks)
        self.used += 1
        return out

    @staticmethod
    def _faster(kernel, eager, cx: _Call, lay: Layout, x: Jet, blocks: list) -> bool:
        """Whether the kernel beats the eager rule on this very input by :data:`MARGIN`
        (best of three each, interleaved): a 256-wide Laplacian's collapsed rows, say, ran
        1.2× slower fused."""
        out = cx.empty(lay, x.shape, x.t)
        fused_s, eager_s = [], []
        sync = torch.cuda.synchronize if x.t.is_cuda else (lambda: None)
        for _ in range(3):
            sync()
            start = time.perf_counter()
            kernel(out.t, *blocks)
            sync()
            fused_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            eager()
            sync()
            eager_s.append(time.perf_counter() - start)
        return min(fused_s) <= MARGIN * min(eager_s)

    def _compile(self, key: tuple):
        cache = cache_dir()
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
        start = time.perf_counter()
        fn = _kernel(key)
        try:
            with warnings.catch_warnings():  # torch's own deprecations as it imports inductor
                warnings.simplefilter("ignore")
                kernel = _inductor(fn, _example_blocks(key))
        except Exception as exc:  # noqa: BLE001 — any compiler failure means: run eager
            kernel = None
            _WHY[key] = f"compile of the fused {key[0]} rule failed, ran eager: {_first_line(exc)}"
        self.compile_s += time.perf_counter() - start
        _KERNELS[key] = kernel
        if kernel is not None:
            self.compiled += 1
            try:
                marker = cache_marker(key)
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError:
                pass  # an unwritable cache only makes the next prediction cold
        return kernel

    @contextlib.contextmanager
    def chunk(self, points: int | None = None):
        """One chunk's pass (of ``points`` points) under this fuser, accounted in the program's
        ledger (:attr:`spent`). In ``auto``: an eager chunk's time counts towards
        the compile (ski rental), and once the policy says so the next chunk compiles; the
        program's fused full chunks are then timed against its eager ones, and where they are
        not faster (:data:`PROGRAM_MARGIN`, medians, from the :data:`PROGRAM_CHUNKS`-th on) the
        program goes back to eager for good — a kernel can win alone and lose inside the pass
        (the 2→50³→1 Hessian's did). Only the program's first full chunk notes the keys its
        steps would compile: later eager ones pay two clock reads and no look-up per step."""
        if self.mode is False:  # nothing to observe or use
            yield
            return
        use = self.active or not self.spent.get("keys")
        token = CURRENT.set(self) if use else None
        compiled, start = self.compile_s, time.perf_counter()
        try:
            yield
        finally:
            if token is not None:
                CURRENT.reset(token)
            if self.mode == "auto":
                self._account(time.perf_counter() - start, points in (None, self.batch), compiled != self.compile_s)

    def _account(self, seconds: float, full: bool, compiled: bool) -> None:
        spent = self.spent
        if not self.active:
            spent["s"] = spent.get("s", 0.0) + seconds
            if full:
                spent["eager"] = [*spent.get("eager", [])[-15:], seconds]
            if self.seen:
                spent.setdefault("keys", set()).update(self.seen)
            self.active = _pays(spent)
            return
        if full and not compiled:
            spent["fused"] = [*spent.get("fused", [])[-15:], seconds]
        fused_s, eager_s = spent.get("fused", []), spent.get("eager", [])
        if len(fused_s) >= PROGRAM_CHUNKS and eager_s and statistics.median(fused_s) > PROGRAM_MARGIN * statistics.median(eager_s):
            ratio = statistics.median(fused_s) / statistics.median(eager_s)
            self.notes.append(f"fused passes took {ratio:.2f}× the eager ones for this program: eager from here on")
            self.active, spent["rejected"] = False, True

    def note(self) -> str | None:
        """``--verbose``'s line about this computation, if it used or tried kernels."""
        if not (self.active or self.used or self.compiled or self.notes):
            return None
        text = (f"fused Taylor kernels: {self.used} pass(es) through them, {self.compiled} compiled "
                f"in {self.compile_s:.1f} s (cache {cache_dir()})")  # fmt: skip
        return "; ".join([text, *self.notes])

    def finish(self) -> None:
        """Hand :meth:`note` to whoever collects notes (:data:`NOTES`: the CLI's ``--verbose``, ``--json``)."""
        notes, text = NOTES.get(), self.note()
        if notes is not None and text is not None:
            notes.append(text)


_MISSING = object()


def _inductor(fn, example: list[Tensor]):
    """``fn`` traced to ATen ops at the example's (static) shapes and compiled by inductor,
    what ``torch.compile`` does past dynamo. Not ``torch.compile`` itself: every kernel is
    the same Python function (closures of :func:`_kernel`), and dynamo keeps at most 8
    compiled variants per function (``recompile_limit``) before it silently runs the rest
    eager; and its guards cost some 30 µs a call. A traced graph has neither."""
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gm = make_fx(fn)(*example)
    # inductor's FX-graph cache needs a shape environment to key on ("No shape env" bypasses
    # it: a warm compile took 4.5 s a kernel instead of 1.5 s); dynamo would give it one
    with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
        kernel = compile_fx(gm, example)
    kernel(*example)  # run once: a failure shows here, where it is caught
    return kernel


def fuser(mode, batch: int, spent: dict) -> Fuser:
    """The fuser of one computation in ``mode`` (``"auto"``, ``"on"``, ``"off"``, True, False)
    whose chunks have ``batch`` points; ``spent`` is the program's ledger (:attr:`TaylorProgram.fusion`)."""
    mode = MODES[mode]
    return Fuser(batch=batch, mode=mode, active=mode is True or (mode == "auto" and _pays(spent)), spent=spent)


def _pays(spent: dict) -> bool:
    """Whether ``auto`` compiles for a program with ledger ``spent``: it has met keys to
    compile, has not gone back to eager, and its eager time has reached their predicted cost."""
    keys = spent.get("keys")
    return bool(keys) and not spent.get("rejected") and should_compile("auto", spent.get("s", 0.0), predicted_cost(keys))


def _example_blocks(key: tuple) -> list[Tensor]:
    name, counts, _pairs, _collapsed, lay, present, shape, dtype, device = key
    dt = getattr(torch, dtype.split(".")[-1])
    rows = [counts[k] for k in range(len(present)) if present[k]]
    out_rows = sum(counts[k] for k in range(len(lay)) if lay[k])
    return [torch.zeros((r, *shape[1:]), dtype=dt, device=device) for r in [out_rows, *rows]]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


#: the fuser of the computation running in this thread (read by :meth:`TaylorProgram._env`)
CURRENT: contextvars.ContextVar[Fuser | None] = contextvars.ContextVar("jaccli_fuser", default=None)


#: where :meth:`Fuser.finish` puts its note (the list :func:`collect_notes` set), if anywhere
NOTES: contextvars.ContextVar[list | None] = contextvars.ContextVar("jaccli_fuser_notes", default=None)


@contextlib.contextmanager
def collect_notes() -> Iterator[list[str]]:
    """The notes of fused-kernel use (:meth:`Fuser.note`) that the computations inside leave, one
    per computation that used or tried kernels, in a list filled as they finish (the CLI's
    ``--verbose`` and ``--json`` show them; a Python caller may read them the same way)."""
    notes: list[str] = []
    token = NOTES.set(notes)
    try:
        yield notes
    finally:
        NOTES.reset(token)


def clear() -> None:
    """Forget this process's compiled kernels (tests)."""
    _KERNELS.clear()
    _WHY.clear()
