"""The filter parser: every syntax form, precedence, and error positions."""

from __future__ import annotations

import random

import pytest
from filter_oracle import GENRES, SCORES, TAGS, YEARS, filter_trees, render
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.index.filter import (
    MAX_DEPTH,
    And,
    Compare,
    FilterError,
    In,
    Not,
    Or,
    Term,
    as_number,
    features,
    is_feature_name,
    parse,
)

KINDS = {
    "genre": ("categorical", set(GENRES)),
    "tag": ("categorical", set(TAGS)),
    "year": ("numeric", set(YEARS)),
    "score": ("numeric", set(SCORES)),
}

a, b, c, d = (Term(x, x) for x in "abcd")


@pytest.mark.parametrize(
    "expr, tree",
    [
        ("genre:Drama", Term("genre", "Drama")),
        ("genre:Sci-Fi", Term("genre", "Sci-Fi")),
        ("tag:c07", Term("tag", "c07")),
        ("tag:-5", Term("tag", -5)),
        ("year:1995", Term("year", 1995)),
        ('year:"1995"', Term("year", "1995")),
        ("rating:4.5", Term("rating", "4.5")),
        ('genre:"(no genres listed)"', Term("genre", "(no genres listed)")),
        ('genre:"Children\'s"', Term("genre", "Children's")),
        ("genre:'Children\\'s'", Term("genre", "Children's")),
        ('t:"a \\"b\\" \\\\"', Term("t", 'a "b" \\')),
        ("genre:AND", Term("genre", "AND")),
        ("genre IN (Drama, War, 3)", In("genre", ("Drama", "War", 3))),
        ('genre in ("x y",z)', In("genre", ("x y", "z"))),
        ("genre IN (Drama)", In("genre", ("Drama",))),
        ("year >= 1990", Compare("year", ">=", 1990)),
        ("year<=1990", Compare("year", "<=", 1990)),
        ("year > -2", Compare("year", ">", -2)),
        ("score < 2.5", Compare("score", "<", 2.5)),
        ("score = .5", Compare("score", "=", 0.5)),
        ("score != 1e3", Compare("score", "!=", 1000.0)),
        ("a:a AND b:b", And((a, b))),
        ("a:a and b:b & c:c", And((a, b, c))),
        ("a:a&b:b", And((a, b))),
        ("a:a OR b:b | c:c", Or((a, b, c))),
        ("a:a Or b:b", Or((a, b))),
        ("NOT a:a", Not(a)),
        ("!a:a", Not(a)),
        ("not not a:a", Not(Not(a))),
        ("a:a OR b:b AND c:c", Or((a, And((b, c))))),
        ("a:a AND b:b OR c:c AND d:d", Or((And((a, b)), And((c, d))))),
        ("NOT a:a AND b:b", And((Not(a), b))),
        ("NOT a:a OR b:b", Or((Not(a), b))),
        ("NOT (a:a OR b:b)", Not(Or((a, b)))),
        ("(a:a OR b:b) AND c:c", And((Or((a, b)), c))),
        ("((a:a))", a),
        ("(a:a AND b:b) AND c:c", And((And((a, b)), c))),
        ("  a:a  ", a),
    ],
)
def test_parse_forms(expr: str, tree: object) -> None:
    assert parse(expr) == tree


def test_positions_and_types() -> None:
    tree = parse('x:1 AND  y IN (a) OR z > 2.0 AND w:"1"')
    assert isinstance(tree, Or)
    first, second = tree.children
    assert [n.pos for n in first.children] == [0, 9]
    assert [n.pos for n in second.children] == [21, 33]
    assert type(first.children[0].value) is int
    assert type(second.children[0].number) is float
    assert type(second.children[1].value) is str


@pytest.mark.parametrize(
    "expr, position, problem",
    [
        ("", 0, "empty filter"),
        ("   ", 0, "empty filter"),
        ("genre:", 6, "expected a value after ':'"),
        ("genre:Drama)", 11, "unbalanced ')'"),
        ("genre:Drama AND year:1995)", 25, "unbalanced ')'"),
        ("(genre:Drama", 0, "unclosed '('"),
        ("a:a AND (b:b OR (c:c)", 8, "unclosed '('"),
        ("genre:Drama year:1995", 12, "expected AND, OR or end of filter"),
        ("genre:Drama (year:1995)", 12, "expected AND, OR or end of filter"),
        ("genre:Drama AND", 15, "unexpected end of filter"),
        ("NOT", 3, "unexpected end of filter"),
        ("AND genre:x", 0, "expected a filter term"),
        ("genre:x OR OR b:c", 11, "expected a filter term"),
        ("()", 1, "expected a filter term"),
        ("genre Drama", 6, "expected ':', IN or a comparison after feature 'genre'"),
        ("genre", 5, "expected ':', IN or a comparison after feature 'genre'"),
        ("year >= abc", 8, "expected a number after '>='"),
        ("year >=", 7, "expected a number after '>='"),
        ("year > 1e", 7, "expected a number after '>'"),
        ("genre IN ()", 10, "expected a value after '('"),
        ("genre IN (a,)", 12, "expected a value after ','"),
        ("genre IN (a b)", 12, "expected ',' or ')' in IN list"),
        ("genre IN (a", 11, "expected ',' or ')' in IN list"),
        ("genre IN a", 9, "expected '(' after IN"),
        ('genre:"Drama', 6, "unterminated string"),
        ("a:b AND c:'d", 10, "unterminated string"),
        ("genre:a:b", 7, "expected AND, OR or end of filter"),
        ("genre::a", 6, "expected a value after ':'"),
        ("genre:(a)", 6, "expected a value after ':'"),
        ("a:b && c:d", 5, "expected a filter term"),
        ("(a:b))", 5, "unbalanced ')'"),
        ("x:1 OR (y:2 z:3)", 12, "expected ')'"),
    ],
)
def test_error_positions(expr: str, position: int, problem: str) -> None:
    with pytest.raises(FilterError) as info:
        parse(expr)
    err = info.value
    assert err.position == position
    assert err.expr == expr
    assert err.problem.startswith(problem)
    lines = str(err).split("\n")
    assert lines[0] == f"{err.problem} at position {position}"
    assert lines[1] == f"  {expr}" and lines[2] == "  " + " " * position + "^"


def test_filter_error_is_value_error() -> None:
    assert issubclass(FilterError, ValueError)
    with pytest.raises(TypeError, match="must be a str"):
        parse(None)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(tree=filter_trees(KINDS, max_leaves=8), rnd=st.randoms(use_true_random=False))
def test_render_parse_round_trip(tree: object, rnd: random.Random) -> None:
    text = render(tree, rnd)
    assert parse(text) == tree, text


def test_features() -> None:
    assert features(parse("a:1 AND NOT (b IN (x) OR c > 2) OR a:2")) == {"a", "b", "c"}


def test_as_number() -> None:
    assert as_number(3) == 3.0 and as_number("2.5") == 2.5 and as_number("-1e3") == -1000.0
    assert as_number("abc") is None and as_number("nan") is None and as_number(True) is None


def test_is_feature_name() -> None:
    assert is_feature_name("genre") and is_feature_name("release_year.v2") and is_feature_name("IN")
    for bad in ["", "a b", "a:b", "x(", "AND", "not", "Or", 3]:
        assert not is_feature_name(bad), bad


def test_nesting_is_bounded_with_a_filter_error() -> None:
    deep_ok = "(" * MAX_DEPTH + "a:a" + ")" * MAX_DEPTH
    assert parse(deep_ok) == Term("a", "a")
    assert parse("NOT " * MAX_DEPTH + "a:a") is not None
    for expr, position in (
        ("(" * (MAX_DEPTH + 1) + "a:a" + ")" * (MAX_DEPTH + 1), MAX_DEPTH),
        ("NOT " * 5000 + "a:a", 4 * MAX_DEPTH),
        ("(" * 3000 + "a:a" + ")" * 3000, MAX_DEPTH),
        ("NOT (" * 40 + "a:a" + ")" * 40, 5 * 32),
    ):
        with pytest.raises(FilterError, match=f"nests deeper than {MAX_DEPTH}") as e:
            parse(expr)
        assert e.value.position == position
