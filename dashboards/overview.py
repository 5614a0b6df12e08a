"""The worldmesh overview dashboard: traffic, latency, load, workers and the autoscaler.

Requests, errors, latency quantiles and mean batch size come from the recording rules in
helm/worldmesh/rules/worldmesh.rules.yaml (5-minute windows); the rest is read raw.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from .common import SELECTED, dashboard, graph, row, single, states


def build() -> Dashboard:
    return (
        dashboard(
            "worldmesh / Overview",
            "worldmesh-overview",
            "Requests, latency, queues, batches, workers and autoscaler decisions per "
            "deployment and stage.",
        )
        .with_row(row("Requests"))
        .with_panel(
            graph(
                "Requests/s by stage and code",
                "Inference requests answered per second, by HTTP status code.",
                "reqps",
                (
                    f"sum by (deployment, stage, code) "
                    f"(deployment_stage_code:worldmesh_requests:rate5m{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}} · {{code}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Errors/s by stage and code",
                "Requests answered with anything but 2xx, per second, by code.",
                "reqps",
                (
                    f"sum by (deployment, stage, code) "
                    f'(deployment_stage_code:worldmesh_requests:rate5m{{{SELECTED}, code!~"2.."}})',
                    "{{deployment}} stage {{stage}} · {{code}}",
                ),
                bars=True,
                stacked=True,
            )
        )
        .with_panel(
            graph(
                "Error ratio by stage",
                "Share of requests answered 5xx or 429 (alert: above 5% for 5 minutes).",
                "percentunit",
                (
                    f"deployment_stage:worldmesh_requests_errors:ratio_rate5m{{{SELECTED}}}",
                    "{{deployment}} stage {{stage}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Request latency quantiles",
                "End-to-end latency of inference requests, measured at the front stage.",
                "s",
                (
                    f"deployment_stage:worldmesh_request_duration_seconds:quantile_rate5m"
                    f"{{{SELECTED}}}",
                    "{{deployment}} p{{quantile}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Stage compute time quantiles by stage",
                "Time of one batch through a stage's slice of the model.",
                "s",
                (
                    f"deployment_stage:worldmesh_stage_compute_seconds:quantile_rate5m"
                    f"{{{SELECTED}}}",
                    "{{deployment}} stage {{stage}} p{{quantile}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Latency objective: error budget burn rate",
                "Share of requests slower than 1 s divided by the 1% budget: 1 spends the "
                "budget exactly in 30 days; the alerts fire at 14.4 (1 h) and 6 (6 h).",
                "none",
                (
                    'deployment:worldmesh_request_latency_objective_misses:ratio_rate5m{deployment=~"$deployment"} / 0.01',
                    "{{deployment}} 5m",
                ),
                (
                    'deployment:worldmesh_request_latency_objective_misses:ratio_rate1h{deployment=~"$deployment"} / 0.01',
                    "{{deployment}} 1h",
                ),
            )
        )
        .with_row(row("Load"))
        .with_panel(
            graph(
                "Queue depth by stage",
                "Rows waiting for a batch, summed over the stage's workers.",
                "short",
                (
                    f"sum by (deployment, stage) (worldmesh_queue_depth{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}}",
                ),
                width=8,
            )
        )
        .with_panel(
            graph(
                "Rows in flight by stage",
                "Rows sent to the next stage and not answered yet.",
                "short",
                (
                    f"sum by (deployment, stage) (worldmesh_in_flight_rows{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}}",
                ),
                width=8,
            )
        )
        .with_panel(
            graph(
                "Batch size by stage",
                "Rows per stage compute: the mean, and the 90th percentile.",
                "short",
                (
                    f"deployment_stage:worldmesh_batch_size:mean_rate5m{{{SELECTED}}}",
                    "{{deployment}} stage {{stage}} mean",
                ),
                (
                    f"histogram_quantile(0.9, sum by (deployment, stage, le) "
                    f"(rate(worldmesh_batch_size_bucket{{{SELECTED}}}[$__rate_interval])))",
                    "{{deployment}} stage {{stage}} p90",
                ),
                width=8,
            )
        )
        .with_row(row("Workers and autoscaler"))
        .with_panel(
            graph(
                "Workers desired vs ready by stage",
                "What the control loop wants, what serves, and the stage's bounds.",
                "short",
                (
                    f"max by (deployment, stage) (worldmesh_stage_desired_workers{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}} desired",
                ),
                (
                    f"max by (deployment, stage) (worldmesh_stage_ready_workers{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}} ready",
                ),
                (
                    f"max by (deployment, stage) (worldmesh_stage_min_workers{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}} min",
                ),
                (
                    f"max by (deployment, stage) (worldmesh_stage_max_workers{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}} max",
                ),
            )
        )
        .with_panel(
            graph(
                "Autoscaler decisions",
                "Decisions that changed a stage's size, up or down.",
                "short",
                (
                    f"sum by (deployment, stage, direction) "
                    f"(increase(worldmesh_autoscaler_decisions_total{{{SELECTED}}}[$__rate_interval]))",
                    "{{deployment}} stage {{stage}} {{direction}}",
                ),
                bars=True,
            )
        )
        .with_panel(
            graph(
                "Autoscaler signal and recommendation",
                "The load signal the autoscaler read for each stage, and the workers it "
                "recommends (absent signal: metrics stale, size held).",
                "short",
                (
                    f"max by (deployment, stage) (worldmesh_autoscaler_signal{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}} signal",
                ),
                (
                    f"max by (deployment, stage) "
                    f"(worldmesh_autoscaler_recommended_workers{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}} recommended",
                ),
            )
        )
        .with_panel(
            states(
                "Autoscaler metrics stale",
                "1 while a stage's metrics are missing or stale and its size is held.",
                (
                    f"max by (deployment, stage) (worldmesh_autoscaler_metrics_stale{{{SELECTED}}})",
                    "{{deployment}} stage {{stage}}",
                ),
            )
        )
        .with_panel(
            single(
                "Workers draining",
                "Workers finishing their rows before they stop.",
                "short",
                (f"sum(worldmesh_draining{{{SELECTED}}})", "draining"),
            )
        )
    )
