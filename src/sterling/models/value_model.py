"""The Value Model (VM): folds per-task scores into one composite score with a user-written formula
(spec ``silvertorch.md`` §5.3).

A formula such as ``0.7*click + 0.2*like^0.5 + 0.1*share`` is parsed once, when the module is built,
into a small tree of plain Python objects; ``forward`` walks that tree with torch ops, so
``torch.export`` and ``torch.compile`` see straight-line tensor code. The formula text comes from
users or config and is never executed: a hand-written tokenizer and recursive-descent parser accept
only the grammar below (no ``eval``, no Python ``ast``).

Grammar, loosest binding first::

    expression := term (('+' | '-') term)*
    term       := unary (('*' | '/') unary)*
    unary      := ('-' | '+') unary | power
    power      := primary (('^' | '**') unary)?       right-associative: 2^3^2 = 2^9
    primary    := number | task | function '(' expression (',' expression)* ')' | '(' expression ')'

As in Python, power binds tighter than a unary minus on its left (``-x^2 = -(x^2)``) and its exponent
may carry a sign (``2^-1 = 0.5``). Numbers are decimal (``3``, ``.5``, ``1e-3``); tasks are names
from the task list (``[A-Za-z_][A-Za-z0-9_]*``). Functions: ``min(a, b, ...)`` and
``max(a, b, ...)`` (at least 2 arguments), ``clamp(x, lo, hi)``, ``log``, ``exp``, ``sqrt``, ``abs``
and ``sigmoid`` (1 argument each).

Semantics are torch's, with no silent guarding. Inputs are per-task probabilities (the OverArch's
sigmoid outputs) by convention, but nothing here assumes it. ``log`` of 0 is ``-inf`` and of a
negative score ``nan``; ``sqrt`` of a negative score is ``nan``; ``/`` is true division (``x / 0``
is ``±inf``); a negative base to a fractional power is ``nan`` (``torch.pow``); ``min``/``max``/
``clamp`` propagate ``nan``; ``clamp(x, lo, hi)`` with ``lo > hi`` gives ``hi``. Sub-expressions made
of constants only are folded when the module is built and must be finite: ``1/0``, ``log(0)`` and
``1e999`` raise :class:`FormulaError`. Constants enter the ops as Python floats, never as tensors,
so the module has no parameters or buffers and keeps the input's dtype.

``formula`` and ``tasks`` rebuild the module exactly (:meth:`ValueModel.to_json`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FormulaError", "ValueModel"]


class FormulaError(ValueError):
    """A formula that does not parse or validate; the message names the 0-based column.

    Args:
        formula (str): the whole formula text.
        column (int): 0-based column of the problem (``len(formula)`` for the end of the formula).
        problem (str): what is wrong, e.g. ``"unknown task 'clik'"``.
        detail (str): appended after the column, e.g. ``"; tasks are click, like"``.
    """

    def __init__(self, formula: str, column: int, problem: str, detail: str = "") -> None:
        super().__init__(f"formula {formula!r}: {problem} at column {column}{detail}")
        self.formula = formula
        self.column = column


# ---- the tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constant:
    value: float


@dataclass(frozen=True)
class TaskScore:
    name: str
    index: int  # position of the task in the last dim of ``task_scores``


@dataclass(frozen=True)
class Operation:
    op: str  # a key of _OPERATIONS
    args: tuple[Node, ...]


Node = Constant | TaskScore | Operation
Value = torch.Tensor | float  # float only where every input of the sub-expression is constant


def _minimum(a: Value, b: Value) -> Value:
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    if not isinstance(a, torch.Tensor):
        return min(a, b)  # two finite constants (a runtime min(1, 2, click) pairs them first)
    return torch.clamp(a, max=b) if isinstance(b, float) else torch.minimum(a, b)


def _maximum(a: Value, b: Value) -> Value:
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    if not isinstance(a, torch.Tensor):
        return max(a, b)
    return torch.clamp(a, min=b) if isinstance(b, float) else torch.maximum(a, b)


def _divide(a: Value, b: Value) -> Value:
    if isinstance(a, float):  # a float over a tensor would be b.reciprocal() * a: 0 / 1e-320 = nan
        a = torch.full_like(b, a)
    return a / b


def _fold(pair: Callable[[Value, Value], Value], args: Sequence[Value]) -> Value:
    result = args[0]
    for arg in args[1:]:
        result = pair(result, arg)
    return result


# op -> implementation over its evaluated arguments (at least one a tensor, see ``_evaluate``)
_OPERATIONS: dict[str, Callable[..., Value]] = {
    "add": lambda a, b: a + b,
    "subtract": lambda a, b: a - b,
    "multiply": lambda a, b: a * b,
    "divide": _divide,
    "power": torch.pow,
    "negate": torch.neg,
    "min": lambda *args: _fold(_minimum, args),
    "max": lambda *args: _fold(_maximum, args),
    "clamp": lambda x, lo, hi: _minimum(_maximum(x, lo), hi),
    "log": torch.log,
    "exp": torch.exp,
    "sqrt": torch.sqrt,
    "abs": torch.abs,
    "sigmoid": torch.sigmoid,
}
_BINARY = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}
# function name -> (fewest, most) arguments; None = no upper bound
_FUNCTIONS: dict[str, tuple[int, int | None]] = {
    "min": (2, None),
    "max": (2, None),
    "clamp": (3, 3),
    "log": (1, 1),
    "exp": (1, 1),
    "sqrt": (1, 1),
    "abs": (1, 1),
    "sigmoid": (1, 1),
}


def _evaluate(node: Node, task_scores: torch.Tensor) -> Value:
    """``task_scores`` [..., T] -> the node's value [...] (or a float for a constant)."""
    if isinstance(node, Constant):
        return node.value
    if isinstance(node, TaskScore):
        return task_scores[..., node.index]  # [...]
    return _OPERATIONS[node.op](*(_evaluate(arg, task_scores) for arg in node.args))


# ---- tokenizer ------------------------------------------------------------------------------

_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_RUN = re.compile(r"(\d+\.?\d*|\.\d+)[eE][+-][0-9A-Za-z_.]*|[0-9A-Za-z_.]+")  # '1.2.3', '2x'
_SYMBOLS = ("**", "+", "-", "*", "/", "^", "(", ")", ",")


@dataclass(frozen=True)
class _Token:
    kind: str  # "number", "name", "symbol" or "end"
    text: str
    column: int

    def describe(self) -> str:
        if self.kind == "end":
            return "end of formula"
        return f"{self.kind} {self.text!r}" if self.kind == "number" else repr(self.text)


def _tokenize(formula: str) -> list[_Token]:
    tokens, column = [], 0
    while column < len(formula):
        char = formula[column]
        if char.isspace():
            column += 1
        elif char.isdigit() or char == ".":
            text = _NUMBER_RUN.match(formula, column).group()
            if not _NUMBER.fullmatch(text):
                raise FormulaError(formula, column, f"bad number {text!r}")
            if not math.isfinite(float(text)):
                raise FormulaError(formula, column, f"constant {text!r} is not finite")
            tokens.append(_Token("number", text, column))
            column += len(text)
        elif name := _NAME.match(formula, column):
            tokens.append(_Token("name", name.group(), column))
            column = name.end()
        else:
            symbol = next((s for s in _SYMBOLS if formula.startswith(s, column)), None)
            if symbol is None:
                raise FormulaError(formula, column, f"unexpected character {char!r}")
            tokens.append(_Token("symbol", symbol, column))
            column += len(symbol)
    tokens.append(_Token("end", "", len(formula)))
    return tokens


# ---- parser ---------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over the tokens, one method per grammar rule; folds constants as it goes."""

    def __init__(self, formula: str, tasks: tuple[str, ...]) -> None:
        self.formula, self.tasks = formula, tasks
        self.tokens = _tokenize(formula)
        self.position = 0

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise FormulaError(self.formula, 0, "empty formula")
        try:
            node = self.expression()
        except RecursionError:
            raise FormulaError(self.formula, 0, "formula nested too deeply") from None
        token = self.peek()
        if token.kind != "end":
            problem = "unmatched ')'" if token.text == ")" else f"unexpected {token.describe()}"
            raise FormulaError(self.formula, token.column, problem, "; expected an operator or the end")
        return node

    def peek(self) -> _Token:
        return self.tokens[self.position]

    def take(self) -> _Token:
        self.position += 1
        return self.tokens[self.position - 1]

    def accept(self, *symbols: str) -> _Token | None:
        token = self.peek()
        return self.take() if token.kind == "symbol" and token.text in symbols else None

    def expression(self) -> Node:
        start, node = self.peek().column, self.term()
        while operator := self.accept("+", "-"):
            node = self.operation(_BINARY[operator.text], (node, self.term()), start)
        return node

    def term(self) -> Node:
        start, node = self.peek().column, self.unary()
        while operator := self.accept("*", "/"):
            node = self.operation(_BINARY[operator.text], (node, self.unary()), start)
        return node

    def unary(self) -> Node:
        start = self.peek().column
        if operator := self.accept("-", "+"):
            operand = self.unary()
            return operand if operator.text == "+" else self.operation("negate", (operand,), start)
        return self.power()

    def power(self) -> Node:
        start, base = self.peek().column, self.primary()
        if self.accept("^", "**"):
            return self.operation("power", (base, self.unary()), start)
        return base

    def primary(self) -> Node:
        token = self.take()
        if token.kind == "number":
            return Constant(float(token.text))
        if token.kind == "name":
            opener = self.accept("(")
            return self.call(token, opener) if opener else self.task(token)
        if token.text == "(":
            node = self.expression()
            self.close(token, "')'")
            return node
        raise FormulaError(
            self.formula, token.column, "expected a number, task, '(' or function", f" ({token.describe()})"
        )

    def task(self, token: _Token) -> TaskScore:
        if token.text in self.tasks:
            return TaskScore(token.text, self.tasks.index(token.text))
        if token.text in _FUNCTIONS:
            raise FormulaError(
                self.formula,
                token.column,
                f"function {token.text!r} without arguments",
                f"; call it as {token.text}(...)",
            )
        raise FormulaError(
            self.formula, token.column, f"unknown task {token.text!r}", f"; tasks are {', '.join(self.tasks)}"
        )

    def call(self, name: _Token, opener: _Token) -> Node:
        if name.text not in _FUNCTIONS:
            problem = "task {!r} called as a function" if name.text in self.tasks else "unknown function {!r}"
            raise FormulaError(
                self.formula, name.column, problem.format(name.text), f"; functions are {', '.join(sorted(_FUNCTIONS))}"
            )
        args = [self.expression()]
        while self.accept(","):
            args.append(self.expression())
        self.close(opener, "',' or ')'")
        fewest, most = _FUNCTIONS[name.text]
        if len(args) < fewest or (most is not None and len(args) > most):
            count = f"exactly {fewest}" if fewest == most else f"at least {fewest}"
            plural = "s" if fewest > 1 else ""
            raise FormulaError(
                self.formula, name.column, f"{name.text}() takes {count} argument{plural}, got {len(args)}"
            )
        return self.operation(name.text, tuple(args), name.column)

    def close(self, opener: _Token, expected: str) -> None:
        """Takes the ')' that closes ``opener``; else names what was ``expected`` and found."""
        if not self.accept(")"):
            token = self.peek()
            raise FormulaError(
                self.formula,
                token.column,
                f"expected {expected}",
                f" ({token.describe()}) to close the '(' at column {opener.column}",
            )

    def operation(self, op: str, args: tuple[Node, ...], start: int) -> Node:
        """The node for ``op(args)``; a constant if every argument is (``start``: its column)."""
        if not all(isinstance(arg, Constant) for arg in args):
            return Operation(op, args)
        constants = (torch.tensor(arg.value, dtype=torch.float64) for arg in args)
        value = float(_OPERATIONS[op](*constants))
        if not math.isfinite(value):
            end = self.tokens[self.position - 1]
            text = self.formula[start : end.column + len(end.text)]
            raise FormulaError(
                self.formula, start, f"constant expression {text!r} is {value}", "; constants must be finite"
            )
        return Constant(value)


def _task_names(node: Node) -> set[str]:
    if isinstance(node, TaskScore):
        return {node.name}
    return set().union(*map(_task_names, node.args)) if isinstance(node, Operation) else set()


class ValueModel(nn.Module):
    """One composite score per candidate from its ``T`` per-task scores, by a formula.

    Shapes: ``T`` tasks; ``...`` any leading dims, e.g. ``[B, K0]`` requests × candidates.

    Args:
        formula (str): the formula (grammar in the module docstring), e.g.
            ``"0.7*click + 0.2*like^0.5 + 0.1*share"``.
        tasks (Sequence[str]): the task names, in the order of the last dim of ``task_scores``.

    Raises:
        FormulaError: the formula does not parse, names an unknown task or function, or has a
            non-finite constant.
        ValueError: ``tasks`` is empty, repeats a name or has a name that is not an identifier.
        TypeError: ``tasks`` is a single string.

    Example::

        vm = ValueModel("0.7*click + 0.3*like^0.5", tasks=["click", "like"])
        vm(torch.tensor([[0.5, 0.25]]))  # tensor([0.5000])
    """

    def __init__(self, formula: str, tasks: Sequence[str]) -> None:
        super().__init__()
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a sequence of names, not the string {tasks!r}")
        self.tasks = tuple(tasks)
        bad = [t for t in self.tasks if not isinstance(t, str) or not _NAME.fullmatch(t)]
        if not self.tasks or bad or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct identifiers ([A-Za-z_][A-Za-z0-9_]*), got {self.tasks}")
        self.formula = formula
        self.expression = _Parser(formula, self.tasks).parse()

    @property
    def used_tasks(self) -> tuple[str, ...]:
        """The tasks the formula reads, in ``tasks`` order."""
        read = _task_names(self.expression)
        return tuple(t for t in self.tasks if t in read)

    def forward(self, task_scores: torch.Tensor) -> torch.Tensor:
        """``task_scores`` float [..., T] (last dim in ``tasks`` order) -> composite score [...],
        same dtype."""
        if task_scores.dim() == 0 or task_scores.shape[-1] != len(self.tasks):
            raise ValueError(
                f"task_scores must be [..., {len(self.tasks)}] (tasks {', '.join(self.tasks)}), "
                f"got shape {tuple(task_scores.shape)}"
            )
        if not task_scores.is_floating_point():
            raise ValueError(f"task_scores must be a float tensor, got {task_scores.dtype}")
        value = _evaluate(self.expression, task_scores)  # [...]
        if isinstance(value, torch.Tensor):
            return value
        return task_scores.new_full(task_scores.shape[:-1], value)  # a formula of constants only

    def to_json(self) -> dict:
        return {"formula": self.formula, "tasks": list(self.tasks)}

    @classmethod
    def from_json(cls, d: dict) -> ValueModel:
        return cls(d["formula"], d["tasks"])

    def extra_repr(self) -> str:
        return f"formula={self.formula!r}, tasks={self.tasks}"
