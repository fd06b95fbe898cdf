"""A malformed ``--want`` expression is reported at its real column: the message names the
column of the item as typed, and shows the item with a caret under that character."""

from __future__ import annotations

import math

import pytest

from jaccli.errors import UsageError
from jaccli.request.names import ExpressionError, parse_expression, parse_want

INPUTS, OUTPUTS = ["t", "x"], ["u"]

# (item as typed, the text the caret must stand under (from there on), what the message says)
MALFORMED = [
    ("r = u_t - 0.01*u_xx +", "+", "'+' has nothing after it"),  # the report: was "column 0"
    ("r = u_t -", "-", "'-' has nothing after it"),
    ("r=2**", "**", "'**' has nothing after it"),
    ("r = u_t * (u_xx", "(u_xx", "'(' is never closed"),
    ("r = sin(u_x", "(u_x", "'(' is never closed"),
    ("r = u_t)", ")", "')' closes no '('"),
    ("r = u_t u_xx", "u_xx", "an operator is missing before 'u_xx'"),
    ("r = u_t 2", "2", "an operator is missing before '2'"),
    ("r = u_t + * u_x", "* u_x", "unexpected '*'"),
    ("r = 3 +* 4", "* 4", "unexpected '*'"),
    ("r = u_t $ u", "$", "unexpected '$'"),
    ("r = u_t = 2", "= 2", "unexpected '='"),
    ("r = u_t;2", ";", "unexpected ';'"),
    ("r = u_t % 2", "% 2", "unsupported operator at"),
    ("r = (u_t) // (2)", "// (2)", "'//'"),
    ("r = not u_t", "not", "'not'"),
    ("r = u_x.real", "u_x.real", "unsupported syntax (Attribute)"),
    ("r = open('x')", "open", "unsupported call"),
    ("r = 'a' + u_t", "'a'", "not a number"),
    ("r = 2 * sin", "sin", "function sin without an argument"),
    ("r = u_t + 2*q", "q", "reads 'q'"),
    ("2r = u_t", "2r", "the name is not an identifier"),
    ("= u_t", "= u_t", "no name before '='"),
]


def _error(item: str) -> ExpressionError:
    with pytest.raises(ExpressionError) as info:
        parse_want([item], INPUTS, OUTPUTS)
    return info.value


@pytest.mark.parametrize("item,at,says", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_the_caret_stands_under_the_real_column(item, at, says):
    err = _error(item)
    assert isinstance(err, UsageError) and err.exit_code == 2
    first, shown, caret = str(err).split("\n")
    column = item.index(at) if at != "+" else item.rindex("+")
    assert f"at column {column + 1} of {item!r}" in first and says in first
    assert shown == "    " + item
    assert caret == " " * (4 + column) + "^"
    assert (err.item, err.column) == (item, column)


def test_the_report_points_at_the_dangling_plus_not_column_0():
    err = _error("r = u_t - 0.01*u_xx +")
    assert str(err).splitlines() == [
        "syntax error at column 21 of 'r = u_t - 0.01*u_xx +': '+' has nothing after it "
        "(expected a term, number or '(' after it)",
        "    r = u_t - 0.01*u_xx +",
        "                        ^",
    ]


@pytest.mark.parametrize("item,at", [("r = τ % 2", "% 2"), ("r = τ + q", "q"), ("r = 'é'", "'é'"), ("r = ττ $ 2", "$")])
def test_columns_count_characters_not_bytes(item, at):
    # ast's offsets are in UTF-8 bytes; a caret must stand under the character
    with pytest.raises(ExpressionError) as info:
        parse_want([item], ["τ", "ττ", "x"] if "ττ" in item else ["τ", "x"], OUTPUTS)
    assert info.value.column == item.index(at)


def test_nothing_after_the_equals_sign_points_past_it():
    err = _error("r =")
    assert "nothing after '='" in str(err) and err.column == 3
    assert str(err).splitlines()[-1] == " " * 7 + "^"


def test_an_item_among_several_is_shown_alone():
    # --want items are split at commas: the error shows the one that is wrong
    with pytest.raises(ExpressionError) as info:
        parse_want(["u_t,u_xx, r = u_t - u_xx )"], INPUTS, OUTPUTS)
    assert info.value.item == "r = u_t - u_xx )" and info.value.column == len("r = u_t - u_xx ")


def test_well_formed_expressions_still_parse_and_evaluate():
    e = parse_expression("  r   =   u_t - 0.01 * u_xx + sin(pi / 2) ** 2  ")
    assert e.name == "r" and e.names() == ["u_t", "u_xx"]
    got = e.evaluate({"u_t": 3.0, "u_xx": 100.0}, {"sin": math.sin})
    assert got == pytest.approx(3.0 - 1.0 + 1.0)
    request = parse_want(["u_t", "r = u_t - 0.1*u_xx"], INPUTS, OUTPUTS)
    assert request.order == ["u_t", "r"] and [t.name for t in request.terms] == ["u_t", "u_xx"]


def test_the_command_shows_the_caret_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from jaccli.cli.main import app
    from problems import EXAMPLES

    out = tmp_path / "p.npz"
    result = CliRunner().invoke(app, [
        "partials", str(EXAMPLES / "heat.pt"), str(EXAMPLES / "heat_x.npy"), "-p", "--in", "t,x",
        "--want", "u_t, r = u_t - 0.01*u_xx +", "--save", str(out),
    ])  # fmt: skip
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr.splitlines() == [
        "usage error: syntax error at column 21 of 'r = u_t - 0.01*u_xx +': '+' has nothing after it "
        "(expected a term, number or '(' after it)",
        "    r = u_t - 0.01*u_xx +",
        "                        ^",
    ]
