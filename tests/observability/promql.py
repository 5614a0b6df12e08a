"""The metric names a PromQL expression reads, by a small tokenizer (no full parser).

A name is an identifier that is not a keyword, an aggregation operator, a function (an
identifier followed by ``(``), a label inside ``{...}`` or in a ``by``/``without``/
``on``/``ignoring``/``group_left``/``group_right`` list, nor a number or duration. A
``{__name__="..."}`` matcher counts as a name too. Prometheus itself decides whether the
expression is valid; this only needs to find the names, and raises ``PromQLError`` (with
the position) on an unterminated string or an unbalanced bracket, so that a mangled query
cannot pass by yielding no names.

Grafana's ``$variables`` are not PromQL: ``grafana_to_promql`` substitutes them first.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<number>(?:0x[0-9a-fA-F]+|[0-9][0-9a-zA-Z_.]*|\.[0-9][0-9a-zA-Z_.]*))
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=,(){}\[\]@])
    """,
    re.VERBOSE,
)
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}
CLOSING = {"(": ")", "{": "}", "[": "]"}
GRAFANA_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


class PromQLError(ValueError):
    pass


def tokens(expr: str) -> list[tuple[str, str, int]]:
    """(kind, text, offset) of every token but whitespace and comments."""
    out: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            what = "unterminated string" if expr[pos] in "\"'`" else f"unexpected {expr[pos]!r}"
            raise PromQLError(f"{what} at offset {pos} of {expr!r}")
        kind = m.lastgroup or ""
        if kind != "space":
            out.append((kind, m.group(), pos))
        pos = m.end()
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names that ``expr`` selects."""
    toks = tokens(expr)
    names: set[str] = set()
    stack: list[tuple[str, int]] = []  # open brackets: ("(", "{", "[" or "labels", offset)
    labels_next = False  # the next "(" opens a label list
    for i, (kind, text, pos) in enumerate(toks):
        inside = stack[-1][0] if stack else ""
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text in CLOSING:
            stack.append(("labels" if text == "(" and labels_next else text, pos))
            labels_next = False
            continue
        if text in CLOSING.values():
            opener = "(" if inside == "labels" else inside
            if CLOSING.get(opener) != text:
                raise PromQLError(f"unbalanced {text!r} at offset {pos} of {expr!r}")
            stack.pop()
            continue
        if inside == "{":
            # Label matchers: only __name__="x" names a metric.
            if text == "__name__" and nxt == "=" and i + 2 < len(toks):
                value = toks[i + 2]
                if value[0] == "string":
                    names.add(value[1][1:-1])
            continue
        if inside in ("[", "labels") or kind != "ident":
            continue
        if text in GROUPING:
            labels_next = nxt == "("
        elif text.lower() in KEYWORDS or text in AGGREGATIONS or nxt == "(":
            continue
        else:
            names.add(text)
    if stack:
        bracket, pos = stack[-1]
        opener = "(" if bracket == "labels" else bracket
        raise PromQLError(f"unclosed {opener!r} at offset {pos} of {expr!r}")
    return names


def grafana_to_promql(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's ``$name``/``${name}``/``${name:format}`` replaced from
    ``values``; an unknown variable is a ``KeyError`` naming it."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return GRAFANA_VARIABLE.sub(sub, expr)
