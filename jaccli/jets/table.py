"""The rule table: ATen op name → :class:`~.jet.Rule`, and the ops that carry values only.

One rule per op for every order (the design of ``jax.experimental.jet``'s ``jet_rules``
and torch-jet's ``MAPPING``): a rule reads the orders to produce from its layout, and
serves Jacobians, Hessians, Laplacians and series alike. A recorded op with neither a
rule nor a place in :data:`VALUE_OPS` makes the program :class:`~.jet.Unsupported`
and the engine falls back to torch.func, naming the op (``--verbose``).

Imports: the rule families (:mod:`.shape`, :mod:`.linear`, :mod:`.elementwise`, :mod:`.spatial`).
"""

from __future__ import annotations

import operator


from jaccli.jets.jet import Rule, _always, _b_mm, _b_mul, _b_mv, _norm
from jaccli.jets.shape import (
    _getitem,
    _r_diagonal,
    _r_expand,
    _r_flip,
    _r_index,
    _r_index_select,
    _r_mean,
    _r_neg,
    _r_permute,
    _r_repeat,
    _r_roll,
    _r_same,
    _r_select,
    _slice_rule,
    _r_squeeze,
    _r_sum,
    _r_t,
    _r_to_copy,
    _r_transpose,
    _r_unsqueeze,
    _r_view,
    _rowwise,
    _split_rule,
)
from jaccli.jets.linear import _ADD, _add_rule, _addmm_like, _bilinear, _r_cat, _r_div, _r_pow, _r_stack, _r_where
from jaccli.jets.elementwise import _UNARY_RULES, _nonlinear, _r_clamp_tensor
from jaccli.jets.spatial import SPATIAL_RULES


#: ATen op name (overload packet) -> rule
RULES: dict[str, Rule] = {
    # views and reshapes
    "view": _rowwise(_r_view, view=True, identity=True),
    "reshape": _rowwise(_r_view, view=True, identity=True),
    "_unsafe_view": _rowwise(_r_view, view=True, identity=True),
    "t": _rowwise(_r_t, view=True),
    "transpose": _rowwise(_r_transpose, view=True),
    "permute": _rowwise(_r_permute, view=True),
    "unsqueeze": _rowwise(_r_unsqueeze, view=True),
    "squeeze": _rowwise(_r_squeeze, view=True),
    "expand": _rowwise(_r_expand, view=True),
    "slice": _slice_rule(),
    "select": _rowwise(_r_select, view=True),
    "diagonal": _rowwise(_r_diagonal, view=True),
    "alias": _rowwise(_r_same, view=True, identity=True),
    "clone": _rowwise(_r_same, view=True, identity=True),
    "_to_copy": _rowwise(_r_to_copy),
    "split": _split_rule("split"),
    "split_with_sizes": _split_rule("split"),
    "unbind": _split_rule("unbind"),
    "getitem": Rule(_getitem, _always, view=True),
    # other linear maps of one tensor
    "neg": _rowwise(_r_neg),
    "sum": _rowwise(_r_sum),
    "mean": _rowwise(_r_mean),
    "index_select": _rowwise(_r_index_select),
    "index": _rowwise(_r_index),
    "flip": _rowwise(_r_flip),
    "roll": _rowwise(_r_roll),
    "repeat": _rowwise(_r_repeat),
    "tril": _rowwise(lambda t, r, diagonal=0: t.tril(diagonal)),
    "triu": _rowwise(lambda t, r, diagonal=0: t.triu(diagonal)),
    "cumsum": _rowwise(lambda t, r, dim, dtype=None: t.cumsum(_norm(dim, r) + 1, dtype=dtype)),
    # sums of terms
    "add": _ADD,
    "sub": _add_rule(-1.0),
    "rsub": _add_rule(-1.0, reverse=True),
    "cat": Rule(_r_cat, _always),
    "stack": Rule(_r_stack, _always),
    "where": Rule(_r_where, _always),
    # products
    "mul": _bilinear(_b_mul),
    "div": Rule(_r_div, lambda pos: 1 not in pos),
    "mm": _bilinear(_b_mm),
    "bmm": _bilinear(_b_mm),
    "mv": _bilinear(_b_mv),
    "addmm": _addmm_like(_b_mm),
    "baddbmm": _addmm_like(_b_mm),
    "addmv": _addmm_like(_b_mv),
    # elementwise nonlinear
    **{name: Rule(rule, _nonlinear) for name, rule in _UNARY_RULES.items() if name != "clamp"},
    "clamp": Rule(_r_clamp_tensor, _nonlinear),
    "pow": Rule(_r_pow, _nonlinear),
    # convolutions, pooling, upsampling, padding, maxima
    **SPATIAL_RULES,
}

#: ops whose result carries no derivative (comparisons, rounding, detach): evaluated on values only
VALUE_OPS = frozenset(
    {
        "detach", "sign", "floor", "ceil", "round", "trunc", "gt", "ge", "lt", "le", "eq", "ne",
        "logical_and", "logical_or", "logical_not", "logical_xor", "isnan", "isinf", "isfinite",
        "argmax", "argmin", "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros",
        "new_ones", "new_full", "new_empty", "bitwise_and", "bitwise_or", "bitwise_not", "all", "any",
    }
)  # fmt: skip


def _rule_for(op) -> Rule | None:
    return RULES.get(_op_name(op))


def _op_name(op) -> str:
    if op is operator.getitem:
        return "getitem"
    packet = getattr(op, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(op, "__name__", str(op))
