"""Test helpers: random catalogues, random filter trees, a renderer and a plain-Python oracle.

The oracle evaluates a filter tree over the raw attribute dicts, independently of
``sterling.index.attributes``; the renderer writes a tree back to text with randomly chosen
syntax (keywords in any case or as symbols, optional spaces and parentheses, quoting).
"""

from __future__ import annotations

import random
import re
from typing import Any

from hypothesis import strategies as st

from sterling.index.filter import And, Compare, FilterNode, In, Not, Or, Term

GENRES = [
    "Drama",
    "War",
    "Sci-Fi",
    "(no genres listed)",
    "Children's",
    "x y",
    "2020",
    "AND",
    'say "hi"',
]
TAGS = ["c07", "2020", 2020, 7, -5, "en", "not", "-3"]
YEARS = list(range(1985, 1996))
SCORES = [-1.0, 0.5, 1.0, 2.25, 3.5]
UNKNOWN = ["zzz", 999, "Dram"]
OPS = [">=", "<=", ">", "<", "=", "!="]

_BARE = re.compile(r"[^\s():,&|!<>=\"']+")
_INT = re.compile(r"-?\d+")


def _missing() -> st.SearchStrategy[Any]:
    return st.sampled_from(["absent", None])


@st.composite
def item_attributes(draw: st.DrawFn) -> dict[str, Any]:
    """One item: multi-valued ``genre``, scalar str/int ``tag``, int ``year``, float ``score``;
    any of them may be absent, None or (for genre) an empty list."""
    values = {
        "genre": draw(st.one_of(_missing(), st.just([]), st.lists(st.sampled_from(GENRES), min_size=1, max_size=3))),
        "tag": draw(st.one_of(_missing(), st.sampled_from(TAGS))),
        "year": draw(st.one_of(_missing(), st.sampled_from(YEARS))),
        "score": draw(st.one_of(_missing(), st.sampled_from(SCORES))),
    }
    return {k: v for k, v in values.items() if v != "absent"}


ANCHORS = [
    {"genre": ["Drama"], "tag": "c07", "year": 1990, "score": 2.25},
    {"genre": ["War", "x y"], "tag": 7, "year": 1985, "score": 0.5},
]


def catalogues(max_size: int = 120, anchored: bool = False) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Lists of attribute dicts; ``anchored`` ones start with :data:`ANCHORS`, so every feature
    exists with a fixed kind whatever the other items hold."""
    items = st.integers(0, max_size).flatmap(lambda n: st.lists(item_attributes(), min_size=n, max_size=n))
    return items.map(lambda rest: [dict(a) for a in ANCHORS] + rest) if anchored else items


def present(value: Any) -> list[Any]:
    """The values an item holds for a feature (empty when missing)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def schema(catalogue: list[dict[str, Any]]) -> dict[str, tuple[str, set[Any]]]:
    """feature -> (kind, values present) as the oracle sees it."""
    values: dict[str, list[Any]] = {}
    for item in catalogue:
        for name, value in item.items():
            if present(value):
                values.setdefault(name, []).extend(present(value))
    out = {}
    for name, vals in values.items():
        numeric = all(isinstance(v, (int, float)) for v in vals) and not any(
            isinstance(item.get(name), list) for item in catalogue
        )
        out[name] = ("numeric" if numeric else "categorical", set(vals))
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        return None


def oracle(node: FilterNode, item: dict[str, Any], kinds: dict[str, tuple[str, set[Any]]]) -> bool:
    """Whether ``item`` passes ``node``, computed directly over the attribute dict."""
    if isinstance(node, Not):
        return not oracle(node.child, item, kinds)
    if isinstance(node, And):
        return all(oracle(c, item, kinds) for c in node.children)
    if isinstance(node, Or):
        return any(oracle(c, item, kinds) for c in node.children)
    kind, _ = kinds[node.feature]
    held = present(item.get(node.feature))
    if isinstance(node, Compare):
        return bool(held) and _OPS[node.op](float(held[0]), float(node.number))
    wanted = [node.value] if isinstance(node, Term) else list(node.values)
    if kind == "numeric":
        return bool(held) and any(_number(w) == float(held[0]) for w in wanted)
    typed = {(type(v), v) for v in held}
    for w in wanted:  # an int token matches the int and its string form
        if (type(w), w) in typed or (isinstance(w, int) and (str, str(w)) in typed):
            return True
    return False


_OPS = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


@st.composite
def filter_trees(draw: st.DrawFn, kinds: dict[str, tuple[str, set[Any]]], max_leaves: int = 6) -> FilterNode:
    """Random filter trees over the features of ``kinds``, in the parser's normal form (And/Or
    with at least two children). Values mix present ones, their int forms and unknown ones."""
    names = sorted(kinds)

    def value_for(name: str) -> st.SearchStrategy[Any]:
        kind, vocab = kinds[name]
        seen = sorted((repr(v) if isinstance(v, float) else v for v in vocab), key=repr)
        if kind == "numeric":
            return st.sampled_from(seen + [1990, "2.25", "abc", "1e3", 0])
        int_forms = [int(v) for v in seen if isinstance(v, str) and _INT.fullmatch(v)]
        values = st.sampled_from(seen + UNKNOWN)
        return st.one_of(values, st.sampled_from(int_forms)) if int_forms else values

    @st.composite
    def leaf(draw2: st.DrawFn) -> FilterNode:
        name = draw2(st.sampled_from(names))
        numeric = kinds[name][0] == "numeric"
        shape = draw2(st.sampled_from(["term", "in", "compare"] if numeric else ["term", "in"]))
        if shape == "term":
            return Term(name, draw2(value_for(name)))
        if shape == "in":
            return In(name, tuple(draw2(st.lists(value_for(name), min_size=1, max_size=4))))
        held = sorted(kinds[name][1])
        number = draw2(st.sampled_from(held + [v + 0.5 for v in held] + [0, -2, 1e3]))
        return Compare(name, draw2(st.sampled_from(OPS)), number)

    def extend(children: st.SearchStrategy[FilterNode]) -> st.SearchStrategy[FilterNode]:
        return st.one_of(
            children.map(Not),
            st.lists(children, min_size=2, max_size=3).map(lambda c: And(tuple(c))),
            st.lists(children, min_size=2, max_size=3).map(lambda c: Or(tuple(c))),
        )

    return draw(st.recursive(leaf(), extend, max_leaves=max_leaves))


def render(node: FilterNode, rnd: random.Random) -> str:
    """Filter text for ``node`` with random but equivalent syntax choices."""
    text = _render(node, rnd)
    return f"({text})" if rnd.random() < 0.1 else text


def _render(node: FilterNode, rnd: random.Random) -> str:
    if isinstance(node, Not):
        child = _render(node.child, rnd)
        if isinstance(node.child, (And, Or)):
            child = f"({child})"
        return rnd.choice(["NOT ", "not ", "Not ", "!", "! "]) + child
    if isinstance(node, (And, Or)):
        word, symbol = ("AND", "&") if isinstance(node, And) else ("OR", "|")
        parts = []
        for child in node.children:
            text = _render(child, rnd)
            needs = isinstance(child, (And, Or)) and not (isinstance(node, Or) and isinstance(child, And))
            parts.append(f"({text})" if needs or rnd.random() < 0.1 else text)
        joiner = rnd.choice([f" {word} ", f" {word.lower()} ", f" {symbol} ", symbol])
        return joiner.join(parts)
    if isinstance(node, Term):
        return f"{node.feature}:{_value(node.value, rnd)}"
    if isinstance(node, In):
        values = rnd.choice([",", ", ", " , "]).join(_value(v, rnd) for v in node.values)
        return f"{node.feature} {rnd.choice(['IN', 'in'])} ({values})"
    space = rnd.choice(["", " "])
    return f"{node.feature}{space}{node.op}{space}{node.number!r}"


def _value(value: Any, rnd: random.Random) -> str:
    if isinstance(value, int):
        return str(value)
    if _BARE.fullmatch(value) and not _INT.fullmatch(value) and rnd.random() < 0.7:
        return value
    quote = rnd.choice(['"', "'"])
    return quote + value.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote


def zipf_catalogue(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """A realistic catalogue of ``n`` items with Zipf-distributed values: ``genre`` (1-3 of 20),
    ``language`` (1 of 30), ``country`` (1 of 120, 10% missing), ``tags`` (0-6 of 3,000, ints
    and strings), ``year`` (int 1950-2024, skewed recent, 5% missing), ``rating`` (float 1.0-5.0
    in steps of 0.1)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def zipf(size: int, vocab: int, s: float = 1.1) -> Any:
        p = 1.0 / np.arange(1, vocab + 1) ** s
        return rng.choice(vocab, size=size, p=p / p.sum())

    n_genres, n_tags = rng.integers(1, 4, n), rng.integers(0, 7, n)
    genres, tags = zipf(int(n_genres.sum()), 20), zipf(int(n_tags.sum()), 3000, 1.0)
    language, country = zipf(n, 30, 1.5), zipf(n, 120)
    has_country, has_year = rng.random(n) >= 0.1, rng.random(n) >= 0.05
    year = 2024 - np.minimum(rng.exponential(15, n), 74).astype(int)
    rating = np.round(rng.uniform(1.0, 5.0, n), 1)
    g_off = np.concatenate([[0], np.cumsum(n_genres)])
    t_off = np.concatenate([[0], np.cumsum(n_tags)])
    items = []
    for i in range(n):
        item: dict[str, Any] = {
            "genre": [f"g{g}" for g in dict.fromkeys(genres[g_off[i] : g_off[i + 1]].tolist())],
            "language": f"l{language[i]}",
            "tags": [t if t % 2 else f"t{t}" for t in tags[t_off[i] : t_off[i + 1]].tolist()],
            "rating": float(rating[i]),
        }
        if has_country[i]:
            item["country"] = f"c{country[i]}"
        if has_year[i]:
            item["year"] = int(year[i])
        items.append(item)
    return items
