"""Whether derivatives can pass from the differentiated inputs to the output.

torch.func answers zero, silently, where the output depends on an input only through
values that carry no derivative: integers (a cast to ``int``, ``argmax``, a comparison),
ops whose derivative is zero wherever it exists (``floor``, ``round``, ``sign``), ops
registered without autograd. It cannot differentiate custom ops (``torch.library``) at
all: forward mode leaves their outputs without a tangent (zeros again) and reverse mode
fails. :class:`Paths` follows each differentiated input through the probe's forward
pass, op by op as a dispatch mode sees them (in eager modules, TorchScript and
``torch.export`` programs alike), and :meth:`Paths.refusal` turns what stops it before
the output into one error that names the op.

Piecewise-constant parts beside a differentiable path (``torch.where(x > 0, x, 0)``,
max pooling's indices) pass: their derivative is zero almost everywhere, as is theirs
in the result; the non-smoothness warnings speak of them.

Imports: torch and :mod:`jaccli.errors`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from jaccli.errors import ModelError

#: floating-point ops whose derivative is zero wherever it exists
_ZERO_DERIVATIVE = frozenset(
    {"floor", "floor_", "ceil", "ceil_", "round", "round_", "trunc", "trunc_", "fix", "fix_",
     "sign", "sign_", "sgn", "heaviside", "heaviside_"}
)  # fmt: skip
#: ops whose output takes only the shape, dtype or device of their tensor argument
_SHAPE_ONLY = frozenset(
    {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
     "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided"}
)  # fmt: skip
_TORCH_NAMESPACES = frozenset({"aten", "prims"})

# per tensor and model input: (reached with a derivative, ops that stopped one)
_Mark = dict[str, tuple[bool, frozenset[str]]]


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class Paths:
    """Marks on every tensor the model's floating-point inputs reach (see the module docstring)."""

    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        self.marks = WeakIdKeyDictionary()
        for label, t in inputs.items():
            if _is_float(t):
                self.marks[t] = {**self.marks.get(t, {}), label: (True, frozenset())}

    def observe(self, func, args, kwargs, out) -> None:
        """Carry the marks of ``func``'s tensor arguments over to its outputs."""
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        merged: _Mark = {}
        for t in inputs:
            _merge(merged, self.marks.get(t, {}))
        name = func.overloadpacket.__name__
        if not merged or name in _SHAPE_ONLY:
            return
        namespace = getattr(func, "namespace", "aten")
        custom = namespace not in _TORCH_NAMESPACES
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            mark = merged
            if custom or not _is_float(t) or name in _ZERO_DERIVATIVE:
                op = f"{namespace}::{name}" if custom else f"aten.{name}"
                if name in ("_to_copy", "to", "type_as") and not _is_float(t):
                    op += f" to {str(t.dtype).removeprefix('torch.')}"
                mark = {label: (False, cuts | {op} if d else cuts) for label, (d, cuts) in merged.items()}
            self.marks[t] = mark
            base = t._base if any(t is a for a in inputs) else None
            if base is not None:  # written in place through a view: the base holds it too
                self.marks[base] = _merge(dict(self.marks.get(base, {})), mark)

    def refusal(self, y: torch.Tensor, wrt: Sequence[str], where: str) -> ModelError | None:
        """The error when a derivative with respect to ``wrt`` cannot reach output ``y``, else None."""
        mark = self.marks.get(y, {})
        for label in wrt:
            d, cuts = mark.get(label, (True, frozenset()))
            custom = sorted(c for c in cuts if "::" in c)
            if custom:
                return ModelError(
                    f"torch.func cannot differentiate the custom op {custom[0]} on the path from "
                    f"input {label!r} to the output (its derivatives would come out as zeros, or fail)",
                    where=where,
                    hint=_instead(mark, label)
                    or "write it with torch ops, or as a torch.autograd.Function with setup_context, "
                    "jvp and generate_vmap_rule=True",
                )
            if not d and cuts:
                ops = ", ".join(sorted(cuts)[:3]) + (", …" if len(cuts) > 3 else "")
                return ModelError(
                    f"the output depends on input {label!r} only through ops without a derivative "
                    f"({ops}): every derivative would be zero",
                    where=where,
                    hint=_instead(mark, label)
                    or f"no derivative command can see through them: keep the path from {label} to the "
                    "output in floating point (no integer casts, argmax, comparisons or rounding)",
                )
        return None


def _merge(into: _Mark, mark: _Mark) -> _Mark:
    for label, (d, cuts) in mark.items():
        d0, c0 = into.get(label, (False, frozenset()))
        into[label] = (d0 or d, c0 | cuts)
    return into


def _instead(mark: _Mark, refused: str) -> str | None:
    """The --wrt that would work: inputs whose derivative reaches the output, custom ops aside."""
    ok = [label for label, (d, cuts) in mark.items() if label != refused and d and not any("::" in c for c in cuts)]
    return f"differentiate {' or '.join(ok)} instead (wrt={ok[0]!r}, --wrt {ok[0]})" if ok else None
