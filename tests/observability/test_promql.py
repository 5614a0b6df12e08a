"""The PromQL metric-name extractor (tests/observability/promql.py), on its own.

Covers: plain selectors, histogram suffixes, label matchers and label lists (by, without,
on, ignoring, group_left/right) never count as names, functions and aggregations never
do, range and subquery durations, offsets, numbers in every notation, strings holding
metric-like text, ``{__name__="..."}``, keywords in any case; an unterminated string or an
unbalanced bracket raises ``PromQLError`` naming the offset; Grafana variables are
substituted and an unknown one is an error naming it.
"""

from __future__ import annotations

import re

import pytest

from .promql import PromQLError, grafana_to_promql, metric_names

CASES = [
    ("up", {"up"}),
    ('up{job="worldmesh-operator"} == 1', {"up"}),
    (
        'sum by (deployment, stage) (rate(worldmesh_requests_total{code=~"5..|429"}[5m]))',
        {"worldmesh_requests_total"},
    ),
    (
        "histogram_quantile(0.99, sum by (le) (rate(worldmesh_request_duration_seconds_bucket[1m])))",
        {"worldmesh_request_duration_seconds_bucket"},
    ),
    (
        "sum without (worker) (a_sum) / ignoring (le) group_left (code, stage) b_count",
        {"a_sum", "b_count"},
    ),
    ("max(x) by (stage) > on (deployment, stage) max(y) by (stage)", {"x", "y"}),
    ("rate(x[5m] offset 1h) * 1e3 + 0x1f - .5 + Inf - NaN", {"x"}),
    ("max_over_time(rate(x[1m])[30m:1m])", {"x"}),
    ('count_values("worldmesh_not_a_metric", y)', {"y"}),
    ('{__name__="worldmesh_worlds", state="ready"}', {"worldmesh_worlds"}),
    ("a AND b or c unless d and bool_metric > bool 0", {"a", "b", "c", "d", "bool_metric"}),
    ("absent(up == 1)", {"up"}),
    (
        "deployment:worldmesh_misses:ratio_rate5m > (14.4 * 0.01)",
        {"deployment:worldmesh_misses:ratio_rate5m"},
    ),
    ("vector(1) + time() # a comment naming fake_metric", set()),
    ("topk(3, x) + quantile(0.5, y) + limitk(2, z)", {"x", "y", "z"}),
]


@pytest.mark.parametrize(("expr", "names"), CASES, ids=[c[0][:40] for c in CASES])
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ('up{job="x}', "unterminated string at offset 7"),
        ("sum(rate(x[5m])", "unclosed '(' at offset 3"),
        ("sum by (a (x)", "unclosed '(' at offset 7"),
        ("x[5m]))", "unbalanced ')' at offset 5"),
        ("x{a='b']", "unbalanced ']' at offset 7"),
        ("x ? y", "unexpected '?' at offset 2"),
    ],
)
def test_bad_expressions_raise_naming_the_offset(expr: str, message: str) -> None:
    with pytest.raises(PromQLError, match=re.escape(message)):
        metric_names(expr)


def test_grafana_variables_are_substituted() -> None:
    expr = 'rate(x{deployment=~"$deployment", stage=~"${stage:regex}"}[$__rate_interval])'
    values = {"deployment": "demo", "stage": ".*", "__rate_interval": "1m"}
    assert grafana_to_promql(expr, values) == 'rate(x{deployment=~"demo", stage=~".*"}[1m])'
    with pytest.raises(KeyError, match=r"\$__range"):
        grafana_to_promql("increase(x[$__range])", values)
