"""The worlds and early-exits dashboard: the state of every worker's worlds, their failures
and the retries they cause, and per ramp the early exits, thresholds and agreement.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from .common import SELECTED, dashboard, graph, row, single, states


def build() -> Dashboard:
    return (
        dashboard(
            "worldmesh / Worlds and early exits",
            "worldmesh-worlds",
            "Worlds by state, world failures and retries, and early exits per ramp.",
        )
        .with_row(row("Worlds"))
        .with_panel(
            single(
                "Broken worlds now",
                "Worlds whose peer died, froze or misbehaved, not yet closed.",
                "short",
                (f'sum(worldmesh_worlds{{{SELECTED}, state="broken"}})', "broken"),
            )
        )
        .with_panel(
            single(
                "Ready worlds now",
                "Worlds carrying rows between neighbouring stages.",
                "short",
                (f'sum(worldmesh_worlds{{{SELECTED}, state="ready"}})', "ready"),
            )
        )
        .with_panel(
            single(
                "World failures (range)",
                "Worlds that broke over the dashboard's time range.",
                "short",
                (
                    f"sum(increase(worldmesh_world_failures_total{{{SELECTED}}}[$__range]))",
                    "failures",
                ),
            )
        )
        .with_panel(
            single(
                "Retried rows (range)",
                "Rows resent to another worker after their world broke.",
                "short",
                (f"sum(increase(worldmesh_retries_total{{{SELECTED}}}[$__range]))", "retries"),
            )
        )
        .with_panel(
            graph(
                "Worlds by state",
                "Each worker's worlds by state, summed per stage (each world counts at both ends).",
                "short",
                (
                    f"sum by (deployment, stage, state) (worldmesh_worlds{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}} {{state}}",
                ),
                stacked=True,
            )
        )
        .with_panel(
            graph(
                "World failures and retries",
                "Worlds broken per second (alert: more than 10 in 5 minutes) and rows "
                "resent per second, by stage.",
                "ops",
                (
                    f"deployment_stage:worldmesh_world_failures:rate5m{{{SELECTED}}}",
                    "{{deployment}} stage {{stage}} failures",
                ),
                (
                    f"deployment_stage:worldmesh_retries:rate5m{{{SELECTED}}}",
                    "{{deployment}} stage {{stage}} retries",
                ),
            )
        )
        .with_row(row("Early exits"))
        .with_panel(
            graph(
                "Early exits/s by ramp",
                "Requests answered by an early-exit ramp, per second.",
                "reqps",
                (
                    f"sum by (deployment, ramp) "
                    f"(rate(worldmesh_early_exits_total{{{SELECTED}}}[$__rate_interval]))",
                    "{{deployment}} ramp {{ramp}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Early-exit share",
                "Early exits per successful request at the front stage.",
                "percentunit",
                (
                    f"sum by (deployment) "
                    f"(rate(worldmesh_early_exits_total{{{SELECTED}}}[$__rate_interval]))"
                    f" / sum by (deployment) (rate(worldmesh_requests_total"
                    f'{{{SELECTED}, code="200"}}[$__rate_interval]))',
                    "{{deployment}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Threshold per ramp",
                "Each ramp's current threshold on 1 - max softmax (tuned online).",
                "none",
                (
                    f"max by (deployment, ramp) (worldmesh_ramp_threshold{{{SELECTED}}})",
                    "{{deployment}} ramp {{ramp}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Agreement with the final answer per ramp",
                "Share of a ramp's exits that the full model agreed with, recent window.",
                "percentunit",
                (
                    f"min by (deployment, ramp) (worldmesh_ramp_agreement_ratio{{{SELECTED}}})",
                    "{{deployment}} ramp {{ramp}}",
                ),
            )
        )
        .with_panel(
            states(
                "Ramps active",
                "1 while a ramp answers requests, 0 while it is switched off.",
                (
                    f"max by (deployment, ramp) (worldmesh_ramp_active{{{SELECTED}}})",
                    "{{deployment}} ramp {{ramp}}",
                ),
            )
        )
    )
