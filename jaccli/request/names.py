"""Names of partial derivatives (``u_txx``) and the expressions built from them.

Torch-free: the CLI validates ``--in``, ``--out``, ``--want`` and ``--fail-above`` with
this module before anything is loaded, and the engine evaluates parsed expressions on
whatever tensors it is given.

A *term* is an output name, ``_``, and the input names it is differentiated by:
``u_txx`` is ∂³u/∂t∂x². When any input name is longer than one character the input
names are separated by ``_`` (``u_x0_x1``). ``u`` alone is the value. Mixed partials
commute (``u_xt`` is ``u_tx``). An *expression* ``NAME = EXPR`` combines terms, numbers,
``pi``, ``+ - * / **`` and a few functions; it is parsed against a whitelist of syntax
nodes and never evaluated by Python.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from jaccli.errors import UsageError

#: highest total order of a term
MAX_ORDER = 8

#: functions an expression may call, by name: (torch function name, math fallback)
FUNCTIONS = ("sin", "cos", "tan", "exp", "log", "sqrt", "tanh", "abs")
CONSTANTS = {"pi": math.pi}

_NAME_OK = str.isidentifier


def _split(spec: str | Sequence[str] | None) -> list[str] | None:
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [s.strip() for s in items]


def _check_names(names: list[str], what: str, option: str) -> None:
    for n in names:
        if not n or not _NAME_OK(n) or "_" in n or n in CONSTANTS or n in FUNCTIONS:
            raise UsageError(
                f"bad {what} name {n!r}",
                expected=f"{option}: identifiers without '_', not pi or a function name",
            )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"duplicate {what} names", got=", ".join(dup))


def input_names(spec: str | Sequence[str] | None, n_in: int) -> list[str]:
    """``--in`` names for the ``n_in`` input components of one point (defaults ``x``; ``x0, x1, …``)."""
    names = _split(spec)
    if names is None:
        return ["x"] if n_in == 1 else [f"x{i}" for i in range(n_in)]
    _check_names(names, "input", "--in")
    if len(names) != n_in:
        raise UsageError(
            "--in must name every input component of one point",
            expected=f"{n_in} names", got=f"{len(names)} ({', '.join(names)})",
        )  # fmt: skip
    return names


def output_names(spec: str | Sequence[str] | None, n_out: int) -> list[str]:
    """``--out`` names: one per output component, or one for the whole output (default ``u``)."""
    names = _split(spec)
    if names is None:
        return ["u"]
    _check_names(names, "output", "--out")
    if len(names) not in (1, n_out):
        raise UsageError(
            "--out names one output vector or every output component",
            expected=f"1 or {n_out} names", got=f"{len(names)} ({', '.join(names)})",
        )  # fmt: skip
    return names


@dataclass(frozen=True)
class Term:
    """A requested partial derivative: output ``out``, orders per input component."""

    name: str
    out: str
    orders: tuple[int, ...]  # one entry per input component

    @property
    def order(self) -> int:
        return sum(self.orders)


def parse_term(text: str, inputs: list[str], outputs: list[str]) -> Term:
    """``u_txx`` → Term(out="u", orders=(1, 2)) for inputs ``t, x``."""
    out, sep, rest = text.partition("_")
    if out not in outputs:
        raise UsageError(f"unknown output in {text!r}", expected="one of " + ", ".join(outputs), got=out)
    orders = [0] * len(inputs)
    if sep:
        long = any(len(n) > 1 for n in inputs)
        parts = rest.split("_") if long else list(rest)
        if not rest or any(p not in inputs for p in parts):
            bad = next((p for p in parts if p not in inputs), rest)
            how = "separated by '_'" if long else "one letter each"
            raise UsageError(
                f"unknown input in {text!r}",
                expected=f"input names ({how}) from " + ", ".join(inputs), got=bad or "nothing after '_'",
            )  # fmt: skip
        for p in parts:
            orders[inputs.index(p)] += 1
    term = Term(text, out, tuple(orders))
    if term.order > MAX_ORDER:
        raise UsageError(f"{text!r} is of order {term.order}", expected=f"at most order {MAX_ORDER}")
    return term


# --------------------------------------------------------------------------- expressions

_BINOPS: dict[type, Callable] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}
_UNARY: dict[type, Callable] = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


@dataclass(frozen=True)
class Expression:
    """``name = text``, parsed; :meth:`names` are the terms and expressions it reads."""

    name: str
    text: str
    tree: ast.expr

    def names(self) -> list[str]:
        return sorted(
            {n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name)} - set(CONSTANTS) - set(FUNCTIONS)
        )

    def evaluate(self, values: Mapping[str, object], functions: Mapping[str, Callable]):
        """The expression over ``values`` (tensors or numbers); ``functions`` maps FUNCTIONS to callables."""

        def ev(node):
            if isinstance(node, ast.Constant):
                return node.value
            if isinstance(node, ast.Name):
                return CONSTANTS[node.id] if node.id in CONSTANTS else values[node.id]
            if isinstance(node, ast.BinOp):
                return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
            if isinstance(node, ast.UnaryOp):
                return _UNARY[type(node.op)](ev(node.operand))
            return functions[node.func.id](ev(node.args[0]))  # a checked ast.Call

        return ev(self.tree)


def _reject(text: str, node: ast.AST, what: str, expected: str) -> UsageError:
    col = getattr(node, "col_offset", 0)
    return UsageError(f"{what} at column {col + 1} of {text!r}", expected=expected)


def _check_node(text: str, node: ast.AST) -> None:
    allowed = "terms, numbers, pi, + - * / ** and " + ", ".join(FUNCTIONS)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise _reject(text, node, "not a number", allowed)
    elif isinstance(node, ast.Name):
        if node.id in FUNCTIONS:
            raise _reject(text, node, f"function {node.id} without an argument", allowed)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINOPS:
            raise _reject(text, node, "unsupported operator", allowed)
        _check_node(text, node.left)
        _check_node(text, node.right)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise _reject(text, node, "unsupported operator", allowed)
        _check_node(text, node.operand)
    elif isinstance(node, ast.Call):
        ok = isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
        if not ok or len(node.args) != 1 or node.keywords:
            raise _reject(text, node, "unsupported call", "one of " + ", ".join(FUNCTIONS) + " with one argument")
        _check_node(text, node.args[0])
    else:
        raise _reject(text, node, f"unsupported syntax ({type(node).__name__})", allowed)


def parse_expression(item: str) -> Expression:
    """``"r = u_t + u*u_x - 0.01*u_xx"`` → :class:`Expression` (syntax checked, never ``eval``)."""
    name, eq, text = item.partition("=")
    name, text = name.strip(), text.strip()
    if not eq or not name.isidentifier() or not text:
        raise UsageError(f"bad expression {item!r}", expected="NAME = EXPRESSION")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise UsageError(
            f"syntax error at column {exc.offset or 0} of {text!r}", hint=exc.msg
        ) from None
    _check_node(text, tree)
    return Expression(name, text, tree)


@dataclass(frozen=True)
class Request:
    """``--want`` resolved: the terms to compute and the expressions over them, in order."""

    inputs: list[str]
    outputs: list[str]
    terms: list[Term]
    expressions: list[Expression]
    order: list[str]  # names in the order asked for

    def names(self) -> list[str]:
        return list(self.order)


def _items(want: Sequence[str] | str) -> list[str]:
    """``--want`` values split into items at commas: no function of the expression grammar
    takes two arguments, so a comma always separates items (``u_t,u_xx,r = u_t - u_xx``)."""
    if isinstance(want, str):
        want = [want]
    return [w.strip() for item in want for w in item.split(",") if w.strip()]


def requested_names(want: Sequence[str] | str) -> list[str]:
    """The names a ``--want`` asks for (terms, and expressions by their name), unparsed."""
    return [item.partition("=")[0].strip() if "=" in item else item for item in _items(want)]


def parse_want(want: Sequence[str], inputs: list[str], outputs: list[str]) -> Request:
    """Terms and named expressions from ``want``; every name an expression reads must be
    a term (asked for or not) or an earlier expression."""
    items = _items(want)
    terms: dict[str, Term] = {}
    exprs: list[Expression] = []
    order: list[str] = []
    for item in items:
        if "=" in item:
            e = parse_expression(item)
            if e.name in order:
                raise UsageError(f"{e.name!r} is defined twice")
            known = set(terms) | {x.name for x in exprs}
            for n in e.names():
                if n not in known:
                    try:
                        terms[n] = parse_term(n, inputs, outputs)
                    except UsageError as exc:
                        raise UsageError(
                            f"expression {e.name!r} reads {n!r}, which is neither a term nor an earlier expression",
                            hint=exc.what,
                        ) from None
            exprs.append(e)
            order.append(e.name)
        else:
            if item in order:
                raise UsageError(f"{item!r} is asked for twice")
            terms[item] = parse_term(item, inputs, outputs)
            order.append(item)
    if not order:
        raise UsageError("nothing to compute", expected="--want with terms like u_x or NAME = EXPR")
    return Request(inputs, outputs, list(terms.values()), exprs, order)


def parse_limits(specs: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """``--fail-above NAME=TOL`` → ``{NAME: TOL}``; NAME must be among ``names``."""
    limits = {}
    for spec in specs:
        name, eq, tol = spec.partition("=")
        name = name.strip()
        if not eq or name not in names:
            raise UsageError(
                f"--fail-above {spec!r} names no computed result",
                expected="NAME=TOL with NAME one of " + ", ".join(names),
            )
        try:
            value = float(tol)
        except ValueError:
            raise UsageError(f"--fail-above {spec!r}: the tolerance is not a number") from None
        if not value >= 0:
            raise UsageError(f"--fail-above {spec!r}: the tolerance must be non-negative")
        limits[name] = value
    return limits
