"""Recording a flat batch function as a list of ATen ops, and compiling the records.

A dispatch mode (which sees eager modules, TorchScript and ``torch.export`` programs
alike) records every op with references to earlier results; two records at the batch
sizes :data:`PROBE_BATCHES` tell batch-sized shape arguments from fixed ones, and
:func:`_compile` merges them into steps whose batch sizes are symbolic, each classified
as a rule, a value-only op, or a constant folded away.

Ops without a rule are decomposed as they are recorded, and in-place updates of tensors
the model made recorded as their out-of-place twins (:mod:`.decompose`); what shares
memory with an updated tensor goes stale, and a record that reads a stale tensor is
refused (the replay would give it the old values). A trace's shape arithmetic on the
batch size (0-dim tensors made outside the dispatcher) is replayed at the batch at
hand (:class:`_BatchScalar`).

Imports: :mod:`.jet`, :mod:`.table`, :mod:`.decompose`.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from jaccli.jets.dispatch import QuietDispatchMode

from jaccli.jets.decompose import DECOMPOSITIONS, functional_twin
from jaccli.jets.jet import Jet, Rule, Unsupported
from jaccli.jets.table import VALUE_OPS, _op_name, _rule_for

aten = torch.ops.aten


#: batch sizes of the two probe traces; two distinct sizes tell batch-sized shape
#: entries from fixed ones (1 is avoided: ops special-case singleton dimensions)
PROBE_BATCHES = (2, 3)


# --------------------------------------------------------------------------- tracing


@dataclass(frozen=True)
class _BatchDim:
    """A shape entry equal to ``factor`` times the batch size."""

    factor: int


@dataclass(frozen=True)
class _BatchScalar:
    """A 0-dim integer tensor holding ``factor`` times the batch size.

    ``torch.jit.trace`` records the model's shape arithmetic (``x.size(0) * heads``) on
    0-dim tensors that ``prim::NumToTensor`` makes outside the dispatcher: the recorder
    sees them as constants, but their values follow the batch, and become shape
    arguments again through ``aten._local_scalar_dense``. Replayed as the tensor of the
    batch at hand, the shape arithmetic runs as value steps like any other.
    """

    factor: int
    dtype: torch.dtype
    device: torch.device

    def at(self, batch: int) -> Tensor:
        return torch.tensor(self.factor * batch, dtype=self.dtype, device=self.device)


@dataclass(frozen=True)
class _Ref:
    """The output of step ``index``."""

    index: int


_INPUT = "input"


@dataclass
class _Step:
    op: Any
    name: str
    args: tuple
    kwargs: dict
    kind: str  # "input" | "jet" | "value"
    rule: Rule | None = None
    linear: bool = True
    affine: bool = True
    jet_refs: tuple[int, ...] = ()
    value_refs: tuple[int, ...] = ()
    numel: float = 0.0  # elements per point of one row of the result
    shape: Any = None  # of the result, batch entries symbolic (a list for several results)


class _Recorder(QuietDispatchMode):
    """Records the ATen ops of one call of ``g``; every tensor is known by the record that made it.

    A dispatch mode sees what ``make_fx`` sees (eager modules, TorchScript, exported
    programs all reach the dispatcher) at a fraction of its cost: no FX graph, no
    fake-tensor metadata. Record 0 is the input; a tensor no record made is a constant
    (a parameter, a buffer, a captured tensor) and stays in the arguments as itself.
    """

    def __init__(self, z: Tensor) -> None:
        super().__init__()
        self.records: list[tuple[Any, Any, Any, Any]] = [(_INPUT, (), {}, z)]  # (op, args, kwargs, result)
        self.made: dict[int, int] = {id(z): 0}
        #: memory the records live in: storage → records in it, and storages the model did not
        #: allocate (the input's, views of constants): an update there is not the model's own
        self.storages: dict[int, list[int]] = {_storage(z): [0]}
        self.foreign: set[int] = {_storage(z)}
        #: records an in-place update changed behind their back (sharing memory with the updated
        #: tensor), and the op: a replay has their old values, so nothing may read them
        self.stale: dict[int, str] = {}
        self.refused: tuple[str, str] | None = None  # (op, why): raised once the call is over
        self.decomposing: set = set()  # ops whose decomposition runs now: inside it, they are recorded as they are

    def ref(self, obj):
        if isinstance(obj, Tensor):
            index = self.made.get(id(obj))
            return obj if index is None else _Ref(index)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.ref(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self.ref(v) for k, v in obj.items()}
        return obj

    def _recorded(self, args) -> bool:
        found = []
        _walk(args, lambda o: found.append(o) if isinstance(o, Tensor) and id(o) in self.made else None)
        return bool(found)

    def _blocker(self, t) -> str | None:
        """Why an in-place update of ``t`` cannot be replayed out of place, or None."""
        index = self.made.get(id(t)) if isinstance(t, Tensor) else None
        if index is None:
            return "it updates a constant (a parameter, a buffer or a captured tensor)"
        if _storage(t) in self.foreign:
            return "it updates the memory of the input or of a constant"
        return None

    def _updated(self, t: Tensor, op: str, func) -> None:
        """``t`` is about to be updated in place: every other record overlapping it goes stale
        (unless only ``t``'s own shape changes: ``transpose_``, ``unsqueeze_``, …)."""
        if torch.Tag.inplace_view in func.tags:
            return
        index = self.made[id(t)]
        for other in self.storages.get(_storage(t), ()):
            if other != index and other not in self.stale and _overlap(self.records[other][3], t):
                self.stale[other] = op

    def _stale_read(self, args) -> str | None:
        found = []
        _walk(args, lambda o: found.append(self.made[id(o)]) if isinstance(o, Tensor) and id(o) in self.made else None)
        for index in found:
            if index in self.stale:
                return self.stale[index]
        return None

    def _register(self, out: Tensor, index: int, aliases: bool, args) -> None:
        key = _storage(out)
        if key not in self.storages:
            constants = set()
            _walk(args, lambda o: constants.add(_storage(o)) if isinstance(o, Tensor) and id(o) not in self.made else None)
            if aliases or key in constants:  # a view of a constant (or the constant itself)
                self.foreign.add(key)
        self.storages.setdefault(key, []).append(index)
        self.made[id(out)] = index

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if self.refused is None:
            updater = self._stale_read((args, kwargs))
            if updater is not None:
                self.refused = (updater, f"aten.{name} reads a tensor that aten.{updater} updated in place through "
                                      "another tensor sharing its memory; the Taylor path replays out-of-place ops only")  # fmt: skip
        twin = functional_twin(func) if func._schema.is_mutable else None
        target = func if twin is None else twin
        decompose = DECOMPOSITIONS.get(target)
        if (decompose is not None and _rule_for(target) is None and self._recorded(args) and target not in self.decomposing
                and (twin is None or self._blocker(args[0]) is None)):  # fmt: skip
            self.decomposing.add(target)  # a decomposition may call its op (on values: max pooling's indices)
            try:
                with self:  # the decomposition's own ops are recorded
                    out = decompose(*args, **kwargs)
            finally:
                self.decomposing.discard(target)
            if out is not NotImplemented:
                if twin is None:
                    return out
                # in place: the model's tensor is updated for real, the replay reads the
                # decomposition's (out-of-place) result from here on
                self._updated(args[0], name, func)
                result = func(*args, **kwargs)
                self.made[id(result)] = self.made[id(out)]
                return result
        record_as = func
        if self.refused is None:
            if func._schema.is_mutable:
                why = "it has no out-of-place twin" if twin is None else self._blocker(args[0])
                if why is None:
                    record_as = twin  # replayed as the twin's result; what shares the memory goes stale
                    self._updated(args[0], name, func)
                else:
                    self.refused = (name, f"in-place op aten.{name}: {why}; the Taylor path replays out-of-place ops only")
            elif torch.Tag.nondeterministic_seeded in func.tags:
                self.refused = (name, f"random op aten.{name} (a replay would repeat its numbers)")
        out = func(*args, **kwargs)
        index = len(self.records)
        rargs = self.ref(args)
        if isinstance(out, Tensor) and out.is_floating_point() and self._recorded(args):
            rargs = _scalars_as(rargs, out.dtype)
        self.records.append((record_as, rargs, self.ref(kwargs), out))
        aliases = _may_alias(record_as)
        if isinstance(out, Tensor):
            self._register(out, index, aliases, args)
        elif isinstance(out, (list, tuple)):
            # several results: one getitem record each, as consumers see them
            for j, o in enumerate(out):
                self.records.append((operator.getitem, (_Ref(index), j), {}, o))
                if isinstance(o, Tensor):
                    self._register(o, len(self.records) - 1, aliases, args)
        return out


#: bytes of storage up to which overlaps are computed element by element
_OVERLAP_LIMIT = 1 << 26


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _overlap(a, b: Tensor) -> bool:
    """Whether tensors ``a`` and ``b`` of one storage share an element (probe-sized: exact)."""
    if not isinstance(a, Tensor) or a.numel() == 0 or b.numel() == 0:
        return False
    if a.element_size() != b.element_size() or a.untyped_storage().nbytes() > _OVERLAP_LIMIT:
        return True  # a storage past probe sizes (a preallocated buffer): assumed to overlap

    def elements(t: Tensor) -> Tensor:
        n = t.untyped_storage().nbytes() // t.element_size()
        return torch.arange(n).as_strided(t.shape, t.stride(), t.storage_offset()).flatten()

    return bool(torch.isin(elements(a), elements(b)).any())


def _scalars_as(args, dtype: torch.dtype):
    """0-dim floating constants cast to the result's ``dtype``, in which the op computes.

    A trace holds Python numbers of the model (``/ math.sqrt(d)``) as 0-dim float64
    tensors that type promotion treats as numbers; a rule that computes with them (a
    reciprocal, a product) would make float64 tensors of them and promote a float32 jet.
    """
    if isinstance(args, Tensor):
        return args.to(dtype) if args.dim() == 0 and args.is_floating_point() and args.dtype != dtype else args
    if isinstance(args, (list, tuple)):
        return type(args)(_scalars_as(a, dtype) for a in args)
    return args


def _may_alias(func) -> bool:
    # views say so in their schema; _unsafe_view and _reshape_alias share memory without saying it
    name = _op_name(func)
    return any(r.alias_info is not None for r in func._schema.returns) or "view" in name or "alias" in name


def _trace(g: Callable, z: Tensor) -> tuple[list, Any, Any]:
    """The records of one call of ``g`` on ``z``, its output as a reference, and the output."""
    z = z.detach().requires_grad_(z.is_floating_point())
    rec = _Recorder(z)
    try:
        # with gradients on, as when jaccli differentiates: without them nn.Transformer*
        # and nn.MultiheadAttention switch to fused inference kernels that have no rule
        with torch.enable_grad(), warnings.catch_warnings(), rec:
            warnings.simplefilter("ignore")
            y = g(z)
    except Exception as exc:  # untraceable code: the caller falls back
        text = str(exc).strip()
        raise Unsupported("trace", f"cannot trace the model: {text.splitlines()[0] if text else type(exc).__name__}") from None
    updater = rec._stale_read(y) if rec.refused is None else None
    if updater is not None:
        rec.refused = (updater, f"the output is a tensor that aten.{updater} updated in place through another "
                                "tensor sharing its memory; the Taylor path replays out-of-place ops only")  # fmt: skip
    if rec.refused is not None:
        raise Unsupported(*rec.refused)
    return rec.records, rec.ref(y), y


_BATCH_CHANGES = "the traced graph changes with the batch size"


def _merge(a, b, batches: tuple[int, int]):
    """One argument of two traces at different batch sizes, with batch-sized ints made symbolic."""
    b1, b2 = batches
    if isinstance(a, _Ref) or isinstance(b, _Ref):
        if a != b:
            raise Unsupported("trace", _BATCH_CHANGES)
        return a
    if isinstance(a, Tensor):
        if not isinstance(b, Tensor) or (a is not b and (a.shape != b.shape or not torch.equal(a, b))):
            scalar = _batch_scalar(a, b, batches)
            if scalar is None:
                raise Unsupported("trace", _constant_changes(a, b))
            return scalar
        return a
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            raise Unsupported("trace", _BATCH_CHANGES)
        return type(a)(_merge(x, y, batches) for x, y in zip(a, b))
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            raise Unsupported("trace", _BATCH_CHANGES)
        return {k: _merge(a[k], b[k], batches) for k in a}
    if isinstance(a, int) and not isinstance(a, bool) and isinstance(b, int) and a != b:
        if a % b1 == 0 and b % b2 == 0 and a // b1 == b // b2:
            return _BatchDim(a // b1)
        raise Unsupported("trace", f"an argument changes with the batch size, not in proportion ({a} vs {b})")
    if type(a) is not type(b) or (a != b and not (isinstance(a, float) and math.isnan(a) and math.isnan(b))):
        raise Unsupported("trace", _BATCH_CHANGES)
    return a


def _batch_scalar(a: Tensor, b, batches: tuple[int, int]) -> _BatchScalar | None:
    """``a`` and ``b`` as one :class:`_BatchScalar`, if they are integer scalars in proportion to the batch."""
    b1, b2 = batches
    if not (isinstance(b, Tensor) and a.dim() == b.dim() == 0 and a.dtype == b.dtype and not a.is_floating_point()):
        return None
    if a.dtype == torch.bool or a.is_complex():
        return None
    x, y = int(a), int(b)
    if x % b1 == 0 and y % b2 == 0 and x // b1 == y // b2 and x != y:
        return _BatchScalar(x // b1, a.dtype, a.device)
    return None


def _constant_changes(a: Tensor, b) -> str:
    """Why a constant that changes with the batch size cannot be replayed, for ``--verbose``."""
    got = f"{tuple(a.shape)} vs {tuple(b.shape)}" if isinstance(b, Tensor) and a.shape != b.shape else "its values"
    return (
        f"a constant changes with the batch size ({str(a.dtype).removeprefix('torch.')} tensor, {got} "
        "at two batch sizes): the model makes it from the batch outside any op the replay can follow"
    )


def _shape_of(val):
    if isinstance(val, Tensor):
        return tuple(val.shape)
    if isinstance(val, (list, tuple)):
        return [_shape_of(v) for v in val]
    return None


def _numel(val) -> int:
    if isinstance(val, Tensor):
        return val.numel()
    if isinstance(val, (list, tuple)):
        return sum(_numel(v) for v in val)
    return 0


def _walk(obj, fn):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            _walk(o, fn)
    elif isinstance(obj, dict):
        for o in obj.values():
            _walk(o, fn)
    else:
        fn(obj)


def _has_batch(obj) -> bool:
    found = []
    _walk(obj, lambda o: found.append(o) if isinstance(o, (_BatchDim, _BatchScalar)) else None)
    return bool(found)


def _substitute(obj, env: list, batch: int, values: bool = False):
    """Arguments for one evaluation: references replaced by their entries (``values``:
    by the values of jets), batch entries by sizes."""
    if isinstance(obj, _Ref):
        return _value_of(env[obj.index]) if values else env[obj.index]
    if isinstance(obj, _BatchDim):
        return obj.factor * batch
    if isinstance(obj, _BatchScalar):
        return obj.at(batch)
    if isinstance(obj, list):
        return [_substitute(o, env, batch, values) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_substitute(o, env, batch, values) for o in obj)
    if isinstance(obj, dict):
        return {k: _substitute(v, env, batch, values) for k, v in obj.items()}
    return obj


def _fold(obj, consts: dict[int, Any]):
    if isinstance(obj, _Ref) and obj.index in consts:
        return consts[obj.index]
    if isinstance(obj, list):
        return [_fold(o, consts) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_fold(o, consts) for o in obj)
    if isinstance(obj, dict):
        return {k: _fold(v, consts) for k, v in obj.items()}
    return obj


def _positions(args: tuple, kinds: dict[int, str], kind: str) -> tuple[frozenset[int], tuple[int, ...]]:
    """Positions of the top-level arguments that hold a ``kind`` reference, and those references."""
    pos, refs = set(), []
    for i, a in enumerate(args):
        found = []
        _walk(a, lambda o: found.append(o.index) if isinstance(o, _Ref) and kinds.get(o.index) == kind else None)
        if found:
            pos.add(i)
            refs.extend(found)
    return frozenset(pos), tuple(refs)


def _compile(trace1, trace2, batches: tuple[int, int]) -> tuple[list[_Step], Any]:
    """Steps of the generalised program and the output argument (refs into the steps)."""
    (recs1, out1, _), (recs2, out2, _) = trace1, trace2
    if [r[0] for r in recs1] != [r[0] for r in recs2]:
        raise Unsupported("trace", _BATCH_CHANGES)
    b1, b2 = batches
    steps: list[_Step] = []
    consts: dict[int, Any] = {}
    kinds: dict[int, str] = {}
    from_input: set[int] = set()  # steps whose results depend on the input's values
    for index, (r1, r2) in enumerate(zip(recs1, recs2)):
        op, res1, res2 = r1[0], r1[3], r2[3]
        per_point = max((_numel(res2) - _numel(res1)) / (b2 - b1), 0.0)
        shape = _merge(_shape_of(res1), _shape_of(res2), batches)
        if op == _INPUT:
            steps.append(_Step(_INPUT, "input", (), {}, _INPUT, numel=per_point, shape=shape))
            kinds[index] = "jet"
            continue
        args = _fold(_merge(r1[1], r2[1], batches), consts)
        kwargs = _fold(_merge(r1[2], r2[2], batches), consts)
        op, args = _fix_squeeze(op, args, recs1)
        step = _classify(op, args, kwargs, kinds, per_point)
        if step.kind == "jet" and op is operator.getitem and isinstance(res1, Tensor) and not res1.is_floating_point():
            step.kind = "value"  # the indices of max pooling or max(dim): no derivative, read as values
        step.shape = shape
        if step.kind == "const":
            consts[index] = res1  # computed from constants only: the same in every call
        elif step.jet_refs or any(r in from_input for r in step.value_refs):
            from_input.add(index)
            if not isinstance(res1, (Tensor, list, tuple)):
                # a Python number from an input-dependent tensor: control flow or shapes read from values
                raise Unsupported("trace", f"cannot trace the model: it reads input values into Python (aten.{step.name})")
        # else: shape arithmetic on the batch size (a trace's sizes, see _BatchScalar), replayed as values
        steps.append(step)
        kinds[index] = step.kind
    return steps, _fold(_merge(out1, out2, batches), consts)


def _fix_squeeze(op, args, records):
    # squeeze.default drops every size-1 dim, which at one point per chunk would include
    # the batch axis; pin the dims it dropped when traced
    if op is aten.squeeze.default and isinstance(args[0], _Ref):
        shape = records[args[0].index][3].shape
        return aten.squeeze.dims, (args[0], [i for i, s in enumerate(shape) if s == 1])
    return op, args


def _classify(op, args, kwargs, kinds: dict[int, str], per_point: float) -> _Step:
    name = _op_name(op)
    jet_pos, jet_refs = _positions(args, kinds, "jet")
    _, value_refs = _positions(args, kinds, "value")
    _, kw_jets = _positions(tuple(kwargs.values()), kinds, "jet")
    if kw_jets:
        raise Unsupported(name, "input-dependent keyword argument")
    if not jet_refs:
        batchy = bool(value_refs) or _has_batch(args) or _has_batch(kwargs)
        return _Step(op, name, args, kwargs, "value" if batchy else "const", value_refs=value_refs)
    if name in VALUE_OPS:
        return _Step(op, name, args, kwargs, "value", jet_refs=jet_refs, value_refs=value_refs)
    rule = _rule_for(op)
    step = _Step(op, name, args, kwargs, "jet", rule=rule, jet_refs=jet_refs, value_refs=value_refs,
                 numel=per_point)  # fmt: skip
    step.linear = rule.linear(jet_pos) if rule is not None else False
    return step


def _value_of(e):
    """The value of an environment entry for ops that read values only."""
    if isinstance(e, Jet):
        return e.block(0)[0]
    if isinstance(e, list):
        return [_value_of(x) for x in e]
    return e
