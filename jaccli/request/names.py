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
from typing import NamedTuple

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


def _listed(names: Sequence[str], most: int = 8) -> str:
    """``x0, x1, x2`` — or, for more than ``most``, the first and last few and the count."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[: most - 2])}, …, {', '.join(names[-2:])} ({len(names):,} names)"


def parse_term(text: str, inputs: list[str], outputs: list[str]) -> Term:
    """``u_txx`` → Term(out="u", orders=(1, 2)) for inputs ``t, x``."""
    out, sep, rest = text.partition("_")
    if out not in outputs:
        raise UsageError(f"unknown output in {text!r}", expected="one of " + _listed(outputs), got=out)
    orders = [0] * len(inputs)
    if sep:
        long = any(len(n) > 1 for n in inputs)
        parts = rest.split("_") if long else list(rest)
        if not rest or any(p not in inputs for p in parts):
            bad = next((p for p in parts if p not in inputs), rest)
            how = "separated by '_'" if long else "one letter each"
            raise UsageError(
                f"unknown input in {text!r}",
                expected=f"input names ({how}) from " + _listed(inputs), got=bad or "nothing after '_'",
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
    start: int = 0  # where ``text`` starts in the item as typed (``r = `` before it)

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


class ExpressionError(UsageError):
    """A ``--want`` expression that cannot be parsed or is not allowed: the message ends with
    the item as typed and a caret under the column it names (as Python and rustc show it)."""

    def __init__(self, what: str, item: str, column: int, detail: str | None = None, **parts) -> None:
        self.item, self.column = item, max(0, min(column, len(item)))
        where = f"{what} at column {self.column + 1} of {item!r}"
        super().__init__(f"{where}: {detail}" if detail else where, **parts)

    def _compose(self, hint: str | None = None) -> str:
        return f"{super()._compose(hint)}\n    {self.item}\n    {' ' * self.column}^"


class _Source(NamedTuple):
    """An expression item (``r = u_t - u_xx``) and where its right-hand side starts in it."""

    item: str
    text: str
    start: int

    def reject(self, what: str, column: int, detail: str | None = None, **parts) -> ExpressionError:
        """An error about the right-hand side's ``column`` (0-based), pointed at in the item."""
        return ExpressionError(what, self.item, self.start + column, detail, **parts)


def _chars(text: str, byte_col: int) -> int:
    """A syntax node's column in characters: ``ast`` counts UTF-8 bytes (``τ`` is two)."""
    return len(text.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def _reject(src: _Source, node: ast.AST, what: str, expected: str) -> ExpressionError:
    return src.reject(what, _chars(src.text, getattr(node, "col_offset", 0)), expected=expected)


def _operator_column(src: _Source, node: ast.BinOp | ast.UnaryOp) -> int:
    """Where a binary operator stands (after its left operand), or a unary one (first)."""
    if isinstance(node, ast.UnaryOp):
        return _chars(src.text, node.col_offset)
    left, right = _chars(src.text, node.left.end_col_offset), _chars(src.text, node.right.col_offset)
    gap = src.text[left:right]
    return left + len(gap) - len(gap.lstrip(" ()"))


def _symbol(text: str, col: int) -> str:
    """The operator at ``col`` (``%``, ``//``, ``~``, ``not``)."""
    word = col < len(text) and text[col].isalpha()
    end = col
    while end < len(text) and (text[end].isalpha() if word else not (text[end].isalnum() or text[end] in " _().")):
        end += 1
    return text[col:end] or text[col : col + 1]


_OPERATORS = ("**", "+", "-", "*", "/", "(")


def _syntax_error(src: _Source, exc: SyntaxError) -> ExpressionError:
    """Python's SyntaxError as the column it is about and what is wrong there.

    The parser gives no column when the text ends too early (``u_t +``): the error then
    points at the operator left without an operand.
    """
    text = src.text
    offset = exc.offset or 0
    end = exc.end_offset or 0
    expected = "terms, numbers, pi, + - * / ** ( ) and " + ", ".join(FUNCTIONS)
    if exc.msg.startswith("'(' was never closed") and 0 < offset <= len(text):
        return src.reject("syntax error", offset - 1, "'(' is never closed", hint="add the ')' that ends it")
    if exc.msg.startswith("unmatched ')'") and 0 < offset <= len(text):
        return src.reject("syntax error", offset - 1, "')' closes no '('")
    if offset < 1 or offset > len(text):
        tail = text.rstrip()
        op = next((o for o in _OPERATORS if tail.endswith(o)), None)
        if op is not None:
            return src.reject("syntax error", len(tail) - len(op), f"{op!r} has nothing after it",
                              expected="a term, number or '(' after it")  # fmt: skip
        return src.reject("syntax error", len(tail), "the expression ends too early", expected=expected)
    token = text[offset - 1 : end - 1] if end > offset else text[offset - 1]
    before = text[: offset - 1].rstrip()
    if (token[0].isalnum() or token[0] in "_.(") and before and (before[-1].isalnum() or before[-1] in "_)"):
        return src.reject("syntax error", offset - 1, f"an operator is missing before {token!r}",
                          expected="+ - * / or ** between two operands")  # fmt: skip
    return src.reject("syntax error", offset - 1, f"unexpected {token!r}", expected=expected)


def _check_node(src: _Source, node: ast.AST) -> None:
    allowed = "terms, numbers, pi, + - * / ** and " + ", ".join(FUNCTIONS)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise _reject(src, node, "not a number", allowed)
    elif isinstance(node, ast.Name):
        if node.id in FUNCTIONS:
            raise _reject(src, node, f"function {node.id} without an argument", allowed)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINOPS:
            col = _operator_column(src, node)
            raise src.reject("unsupported operator", col, repr(_symbol(src.text, col)), expected=allowed)
        _check_node(src, node.left)
        _check_node(src, node.right)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            col = _operator_column(src, node)
            raise src.reject("unsupported operator", col, repr(_symbol(src.text, col)), expected=allowed)
        _check_node(src, node.operand)
    elif isinstance(node, ast.Call):
        ok = isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
        if not ok or len(node.args) != 1 or node.keywords:
            raise _reject(src, node, "unsupported call", "one of " + ", ".join(FUNCTIONS) + " with one argument")
        _check_node(src, node.args[0])
    else:
        raise _reject(src, node, f"unsupported syntax ({type(node).__name__})", allowed)


def parse_expression(item: str) -> Expression:
    """``"r = u_t + u*u_x - 0.01*u_xx"`` → :class:`Expression` (syntax checked, never ``eval``)."""
    lhs, eq, rhs = item.partition("=")
    name, text = lhs.strip(), rhs.strip()
    src = _Source(item, text, len(lhs) + 1 + len(rhs) - len(rhs.lstrip()))
    if not eq or not name.isidentifier():
        at = len(lhs) - len(lhs.lstrip())
        raise ExpressionError("bad expression", item, at, "no name before '='" if not name else "the name is not an identifier",
                              expected="NAME = EXPRESSION")  # fmt: skip
    if not text:
        raise ExpressionError("bad expression", item, len(item.rstrip()), "nothing after '='", expected="NAME = EXPRESSION")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise _syntax_error(src, exc) from None
    _check_node(src, tree)
    return Expression(name, text, tree, src.start)


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
                        col = min(_chars(e.text, x.col_offset) for x in ast.walk(e.tree) if isinstance(x, ast.Name) and x.id == n)
                        raise ExpressionError(
                            f"expression {e.name!r} reads {n!r}", item, e.start + col,
                            "neither a term nor an earlier expression", hint=exc.what,
                        ) from None  # fmt: skip
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
