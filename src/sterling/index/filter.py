"""The filter language: ``genre:Drama AND NOT year:1995``, parsed into a tree of frozen nodes.

Grammar (precedence NOT > AND > OR; keywords are case-insensitive)::

    filter   := or
    or       := and (("OR" | "|") and)*
    and      := unary (("AND" | "&") unary)*
    unary    := ("NOT" | "!") unary | primary
    primary  := "(" or ")"
              | feature ":" value                    -> Term
              | feature "IN" "(" value ("," value)* ")" -> In
              | feature (">=" | "<=" | ">" | "<" | "=" | "!=") number -> Compare

A value is a bare word (any run of characters other than whitespace and ``():,&|!<>="'``), a
single- or double-quoted string (backslash escapes the quote and itself), and a bare word matching
``-?\\d+`` is an ``int``; a quoted ``"1995"`` stays a string. Two terms side by side without an
operator are an error. Every error is a :class:`FilterError` naming the problem and the 0-based
character position, with a caret under it.

Example::

    >>> parse("genre:Drama AND NOT year >= 1995") == And(
    ...     (Term("genre", "Drama"), Not(Compare("year", ">=", 1995)))
    ... )
    True
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import NamedTuple

Value = str | int
Number = int | float

COMPARISON_OPS = (">=", "<=", ">", "<", "=", "!=")

_SPECIALS = "():,&|!<>=\"'"
_INT = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_KEYWORDS = {"AND": "&", "OR": "|", "NOT": "!"}
MAX_DEPTH = 64  # NOTs and parentheses nested (deeper is a FilterError, not a RecursionError)


class FilterError(ValueError):
    """A malformed filter or one naming an unknown feature.

    Attributes:
        problem (str): what is wrong, e.g. ``expected a value after ':'``.
        expr (str | None): the filter expression, when known.
        position (int): 0-based character offset of the problem in ``expr``.
    """

    def __init__(self, problem: str, expr: str | None, position: int) -> None:
        message = f"{problem} at position {position}"
        if expr is not None:
            message += f"\n  {expr}\n  {' ' * position}^"
        super().__init__(message)
        self.problem = problem
        self.expr = expr
        self.position = position


@dataclass(frozen=True)
class Term:
    """``feature:value``: the item has ``value`` (categorical) or equals it (numeric)."""

    feature: str
    value: Value
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class In:
    """``feature IN (a, b, c)``: the item has at least one of ``values``."""

    feature: str
    values: tuple[Value, ...]
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Compare:
    """``feature op number`` on a numeric feature, ``op`` one of :data:`COMPARISON_OPS`."""

    feature: str
    op: str
    number: Number
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Not:
    child: FilterNode


@dataclass(frozen=True)
class And:
    children: tuple[FilterNode, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[FilterNode, ...]


FilterNode = Term | In | Compare | Not | And | Or


def as_number(value: object) -> float | None:
    """The numeric reading of a filter value: ints and number-like strings, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    return None


def is_feature_name(name: object) -> bool:
    """Whether ``name`` can be written as a feature in a filter (a bare word, not a keyword)."""
    return (
        isinstance(name, str)
        and name != ""
        and not any(c.isspace() or c in _SPECIALS for c in name)
        and name.upper() not in _KEYWORDS
    )


def features(node: FilterNode) -> set[str]:
    """Every feature name a filter tree refers to."""
    if isinstance(node, (Term, In, Compare)):
        return {node.feature}
    if isinstance(node, Not):
        return features(node.child)
    return set().union(*(features(child) for child in node.children))


class _Token(NamedTuple):
    kind: str  # one of "(", ")", ":", ",", "&", "|", "!", "op", "word", "string", "end"
    text: str
    pos: int

    def describe(self) -> str:
        return "end of filter" if self.kind == "end" else repr(self.text)


def _tokenize(expr: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
        elif expr.startswith(("!=", ">=", "<="), i):
            tokens.append(_Token("op", expr[i : i + 2], i))
            i += 2
        elif c in "<>=":
            tokens.append(_Token("op", c, i))
            i += 1
        elif c in "():,&|!":
            tokens.append(_Token(c, c, i))
            i += 1
        elif c in "\"'":
            text, end = _read_string(expr, i)
            tokens.append(_Token("string", text, i))
            i = end
        else:
            start = i
            while i < n and not expr[i].isspace() and expr[i] not in _SPECIALS:
                i += 1
            tokens.append(_Token("word", expr[start:i], start))
    tokens.append(_Token("end", "", n))
    return tokens


def _read_string(expr: str, start: int) -> tuple[str, int]:
    """Reads the quoted string opening at ``start``; returns its text and the offset after it."""
    quote, chars, i = expr[start], [], start + 1
    while i < len(expr):
        c = expr[i]
        if c == "\\" and i + 1 < len(expr) and expr[i + 1] in (quote, "\\"):
            chars.append(expr[i + 1])
            i += 2
        elif c == quote:
            return "".join(chars), i + 1
        else:
            chars.append(c)
            i += 1
    raise FilterError("unterminated string", expr, start)


class _Parser:
    """Recursive descent over the token list; one method per grammar rule."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.tokens = _tokenize(expr)
        self.i = 0
        self.depth = 0  # NOTs and parentheses open around the current token

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def fail(self, problem: str, position: int) -> FilterError:
        return FilterError(problem, self.expr, position)

    def at_operator(self, symbol: str) -> bool:
        """Whether the next token is ``symbol`` or its keyword (``&``/AND, ``|``/OR, ``!``/NOT)."""
        token = self.peek()
        return token.kind == symbol or (token.kind == "word" and _KEYWORDS.get(token.text.upper()) == symbol)

    def parse(self) -> FilterNode:
        if self.peek().kind == "end":
            raise self.fail("empty filter", 0)
        node = self.parse_or()
        token = self.peek()
        if token.kind == ")":
            raise self.fail("unbalanced ')'", token.pos)
        if token.kind != "end":
            raise self.fail(f"expected AND, OR or end of filter, found {token.describe()}", token.pos)
        return node

    def parse_or(self) -> FilterNode:
        children = [self.parse_and()]
        while self.at_operator("|"):
            self.advance()
            children.append(self.parse_and())
        return children[0] if len(children) == 1 else Or(tuple(children))

    def parse_and(self) -> FilterNode:
        children = [self.parse_unary()]
        while self.at_operator("&"):
            self.advance()
            children.append(self.parse_unary())
        return children[0] if len(children) == 1 else And(tuple(children))

    def parse_unary(self) -> FilterNode:
        token = self.peek()
        negated = self.at_operator("!")
        if not negated and token.kind != "(":
            return self.parse_primary()
        if self.depth >= MAX_DEPTH:
            raise self.fail(f"the filter nests deeper than {MAX_DEPTH} levels of NOT and parentheses", token.pos)
        self.depth += 1
        if negated:
            self.advance()
        node = Not(self.parse_unary()) if negated else self.parse_primary()
        self.depth -= 1
        return node

    def parse_primary(self) -> FilterNode:
        token = self.advance()
        if token.kind == "(":
            node = self.parse_or()
            close = self.advance()
            if close.kind == "end":
                raise self.fail("unclosed '('", token.pos)
            if close.kind != ")":
                raise self.fail(f"expected ')', found {close.describe()}", close.pos)
            return node
        if token.kind == "end":
            raise self.fail("unexpected end of filter", token.pos)
        if token.kind != "word" or token.text.upper() in _KEYWORDS:
            raise self.fail(f"expected a filter term, found {token.describe()}", token.pos)
        return self.parse_condition(token)

    def parse_condition(self, feature: _Token) -> FilterNode:
        token = self.advance()
        if token.kind == ":":
            return Term(feature.text, self.parse_value("after ':'"), feature.pos)
        if token.kind == "word" and token.text.upper() == "IN":
            opening = self.advance()
            if opening.kind != "(":
                raise self.fail(f"expected '(' after IN, found {opening.describe()}", opening.pos)
            values = [self.parse_value("after '('")]
            while self.peek().kind == ",":
                self.advance()
                values.append(self.parse_value("after ','"))
            close = self.advance()
            if close.kind != ")":
                raise self.fail(f"expected ',' or ')' in IN list, found {close.describe()}", close.pos)
            return In(feature.text, tuple(values), feature.pos)
        if token.kind == "op":
            number = self.advance()
            if number.kind != "word" or not _NUMBER.fullmatch(number.text):
                raise self.fail(f"expected a number after '{token.text}', found {number.describe()}", number.pos)
            value = int(number.text) if _INT.fullmatch(number.text) else float(number.text)
            return Compare(feature.text, token.text, value, feature.pos)
        raise self.fail(
            f"expected ':', IN or a comparison after feature '{feature.text}', found {token.describe()}",
            token.pos,
        )

    def parse_value(self, context: str) -> Value:
        token = self.advance()
        if token.kind == "string":
            return token.text
        if token.kind == "word":
            return int(token.text) if _INT.fullmatch(token.text) else token.text
        raise self.fail(f"expected a value {context}, found {token.describe()}", token.pos)


@functools.lru_cache(maxsize=4096)
def parse(expr: str) -> FilterNode:
    """Parses a filter expression into a tree of :class:`Term`, :class:`In`, :class:`Compare`,
    :class:`Not`, :class:`And` and :class:`Or` nodes (results are cached per string).

    Args:
        expr (str): the filter, e.g. ``'genre IN (Drama, "Sci-Fi") AND year >= 1990'``.

    Returns:
        FilterNode: the root node; ``pos`` fields hold each condition's offset in ``expr``.

    Raises:
        FilterError: on any syntax error, with the offending position.
    """
    if not isinstance(expr, str):
        raise TypeError(f"a filter must be a str, got {type(expr).__name__}")
    return _Parser(expr).parse()
