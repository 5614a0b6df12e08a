"""Building blocks shared by the worldmesh dashboards: datasource, variables, panels, JSON.

Every panel reads one Prometheus datasource chosen by the ``datasource`` variable, so a
dashboard works unchanged whether the Grafana sidecar provisions it or a person imports it.
Queries filter on the ``deployment`` and ``stage`` variables (multi-value, regex matchers).
Panel ids and query refIds are assigned here, in order, so the JSON is deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from grafana_foundation_sdk.builders import stat, statetimeline, timeseries
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    StackingConfig,
    VizLegendOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog import builder, variants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    BigValueJustifyMode,
    BigValueTextMode,
    GraphDrawStyle,
    LegendDisplayMode,
    LegendPlacement,
    PercentChangeColorMode,
    StackingMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The label matchers every worldmesh query carries.
SELECTED = 'deployment=~"$deployment", stage=~"$stage"'
#: The series whose labels list the deployments and stages (every worker exports it).
INVENTORY = "worldmesh_queue_depth"

Query = tuple[str, str]  # (PromQL, legend)


def dashboard(title: str, uid: str, description: str) -> Dashboard:
    """A dashboard with the datasource, deployment and stage variables."""
    all_option = VariableOption(selected=True, text="All", value="$__all")
    return (
        Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["worldmesh"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .readonly()
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("deployment")
            .label("Deployment")
            .datasource(DATASOURCE)
            .query(f"label_values({INVENTORY}, deployment)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(all_option)
        )
        .with_variable(
            QueryVariable("stage")
            .label("Stage")
            .datasource(DATASOURCE)
            .query(f'label_values({INVENTORY}{{deployment=~"$deployment"}}, stage)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.NUMERICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(all_option)
        )
    )


def _targets(queries: Iterable[Query]) -> list[builder.Builder[variants.Dataquery]]:
    return [
        Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
        for i, (expr, legend) in enumerate(queries)
    ]


def _legend() -> VizLegendOptions:
    return (
        VizLegendOptions()
        .show_legend(True)
        .display_mode(LegendDisplayMode.TABLE)
        .placement(LegendPlacement.BOTTOM)
        .calcs(["lastNotNull", "max"])
    )


def graph(
    title: str,
    description: str,
    unit: str,
    *queries: Query,
    bars: bool = False,
    stacked: bool = False,
    width: int = 12,
) -> timeseries.Panel:
    """A time series panel of one or more queries."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
        .fill_opacity(10)
        .legend(_legend())
        .targets(_targets(queries))
    )
    if bars:
        panel = panel.draw_style(GraphDrawStyle.BARS).fill_opacity(80)
    if stacked:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL))
    return panel


def single(title: str, description: str, unit: str, query: Query, width: int = 6) -> stat.Panel:
    """A single-value (stat) panel."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(4)
        .targets(_targets([query]))
        # The stat plugin's schema requires every display option: Grafana's defaults.
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .orientation(VizOrientation.AUTO)
        .color_mode(BigValueColorMode.VALUE)
        .graph_mode(BigValueGraphMode.AREA)
        .justify_mode(BigValueJustifyMode.AUTO)
        .text_mode(BigValueTextMode.AUTO)
        .wide_layout(True)
        .show_percent_change(False)
        .percent_change_color_mode(PercentChangeColorMode.STANDARD)
    )


def states(title: str, description: str, *queries: Query) -> statetimeline.Panel:
    """A state timeline, for 0/1 series (a ramp on, metrics stale)."""
    return (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(12)
        .height(8)
        .legend(_legend().calcs([]))
        .targets(_targets(queries))
    )


def row(title: str) -> Row:
    return Row(title)


def to_json(board: Dashboard) -> str:
    """The dashboard as stable, sorted JSON with panel ids 1..n in layout order."""
    data: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True).encode(board.build()))
    for i, panel in enumerate(data.get("panels", []), start=1):
        panel["id"] = i
    for variable in data.get("templating", {}).get("list", []):
        # The SDK writes the interval variable's auto* fields on every variable; Grafana
        # ignores them elsewhere and @grafana/schema's VariableModel does not declare them.
        if variable.get("type") != "interval":
            for key in ("auto", "auto_count", "auto_min"):
                variable.pop(key, None)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
