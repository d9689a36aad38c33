"""Builds grafana/dashboards/*.json with grafana-foundation-sdk, Grafana's typed dashboard model.

The JSON is generated, committed, and checked: `python grafana/build.py` rewrites it, `--check`
exits 1 when a committed file differs from what this code builds (tests/test_prometheus.py runs
it, and evaluates every panel query against a real Prometheus).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, units
from grafana_foundation_sdk.models import dashboard as model

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="prometheus")  # provisioning's uid
PERFORMANCE_UID = "mailpipe-performance"
HEALTH_UID = "mailpipe-health"
TAGS = ["mailpipe"]
P = 'provider=~"$provider"'  # the provider variable, in a label matcher
RATE = "$__rate_interval"
WIDTH = 24


def query(expr: str, legend: str) -> prometheus.Dataquery:
    """A range query with a legend."""
    return prometheus.Dataquery().expr(expr).legend_format(legend).range()


def graph(
    title: str, unit: str, description: str, *queries: prometheus.Dataquery, bars: bool = False
) -> timeseries.Panel:
    """A time-series panel with the legend as a table of last and max values."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .height(8)
        .span(WIDTH // 3)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
    return _with_targets(panel, queries)


def single(title: str, unit: str, description: str, *queries: prometheus.Dataquery) -> stat.Panel:
    """A stat panel showing the last value of each series."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(WIDTH // 3)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    return _with_targets(panel, queries)


def _with_targets(panel, queries: Sequence[prometheus.Dataquery]):
    for ref, target in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def provider_variable() -> dashboard.QueryVariable:
    """`$provider`: one or more of the fixed provider labels, all by default."""
    return (
        dashboard.QueryVariable("provider")
        .label("Provider")
        .datasource(DATASOURCE)
        .query("label_values(mailpipe_account_runs_total, provider)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(model.VariableOption(selected=True, text="All", value="$__all"))
    )


def base(title: str, uid: str, *, other_title: str, other_uid: str) -> dashboard.Dashboard:
    """Common settings, the provider variable, and a link to the other dashboard."""
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .tags(TAGS)
        .timezone("utc")
        .time("now-6h", "now")
        .refresh("1m")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(provider_variable())
        .link(
            dashboard.DashboardLink(other_title)
            .type(model.DashboardLinkType.LINK)
            .url(f"/d/{other_uid}")
            .icon("dashboard")
            .include_vars(True)
            .keep_time(True)
        )
    )


def performance() -> dashboard.Dashboard:
    """Per-phase timings, throughput, run and job durations, and a 7-day trend."""
    board = base(
        "Mailpipe / Performance",
        PERFORMANCE_UID,
        other_title="Mailpipe / Health",
        other_uid=HEALTH_UID,
    )
    phase_bucket = f"rate(mailpipe_phase_duration_seconds_bucket{{{P}}}[{RATE}])"
    run_bucket = f"rate(mailpipe_account_run_duration_seconds_bucket{{{P}}}[{RATE}])"
    job_bucket = f"rate(mailpipe_job_duration_seconds_bucket[{RATE}])"
    return (
        board.with_row(dashboard.Row("Phases"))
        .with_panel(
            graph(
                "Phase duration p95",
                units.Seconds,
                "95th percentile of each timed phase block (connect, fetch, save, ...).",
                query(
                    f"histogram_quantile(0.95, sum by (phase, le) ({phase_bucket}))", "{{phase}}"
                ),
            )
        )
        .with_panel(
            graph(
                "Phase duration p50",
                units.Seconds,
                "Median of each timed phase block.",
                query(f"histogram_quantile(0.5, sum by (phase, le) ({phase_bucket}))", "{{phase}}"),
            )
        )
        .with_panel(
            graph(
                "Phase busy time",
                units.Seconds,
                "Seconds spent in each phase per second of wall time, over all workers.",
                query(
                    f"sum by (phase) (rate(mailpipe_phase_duration_seconds_sum{{{P}}}[{RATE}]))",
                    "{{phase}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Phase targets",
                units.Seconds,
                "The seed's targets, alerted on: folder list p95 under 1 s; fetching 50 mails under"
                " 5 s and parsing plus saving them under 2 s (runs that fetched mail, 10 minutes).",
                query(
                    "max(phase_provider:mailpipe_phase_duration_seconds:histogram_quantile"
                    f'{{phase="folder_list", quantile="0.95", {P}}})',
                    "folder list p95",
                ),
                query(
                    f"max(provider:mailpipe_fetch_seconds_per_50_emails:rate10m{{{P}}})",
                    "fetch of 50 mails",
                ),
                query(
                    f"max(provider:mailpipe_parse_save_seconds_per_50_emails:rate10m{{{P}}})",
                    "parse and save of 50 mails",
                ),
            )
        )
        .with_row(dashboard.Row("Throughput"))
        .with_panel(
            graph(
                "Emails per second",
                units.MessagesPerSecond,
                "Messages fetched per provider, and messages stored (new, over all providers).",
                query(
                    f"sum by (provider) (rate(mailpipe_emails_fetched_total{{{P}}}[{RATE}]))",
                    "fetched {{provider}}",
                ),
                query(f"sum(rate(mailpipe_emails_saved_total[{RATE}]))", "saved (all providers)"),
            )
        )
        .with_panel(
            graph(
                "Bytes fetched per second",
                units.BytesPerSecondIEC,
                "Message bodies fetched from IMAP servers.",
                query(
                    f"sum by (provider) (rate(mailpipe_fetched_bytes_total{{{P}}}[{RATE}]))",
                    "{{provider}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Flag updates and vanished mail per second",
                units.MessagesPerSecond,
                "Stored messages whose flags were brought in step with the server, and stored "
                "messages removed because the server no longer holds them (expunged or moved).",
                query(
                    f"sum by (provider) (rate(mailpipe_flag_updates_total{{{P}}}[{RATE}]))",
                    "flags {{provider}}",
                ),
                query(
                    f"sum by (provider) (rate(mailpipe_vanished_total{{{P}}}[{RATE}]))",
                    "vanished {{provider}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Account runs per second",
                units.OpsPerSecond,
                "Account runs that ended, by outcome.",
                query(
                    f"sum by (outcome) (rate(mailpipe_account_runs_total{{{P}}}[{RATE}]))",
                    "{{outcome}}",
                ),
            )
        )
        .with_row(dashboard.Row("Durations"))
        .with_panel(
            graph(
                "Account-run duration",
                units.Seconds,
                "p50 and p95 of the attempt that ended each account run.",
                query(f"histogram_quantile(0.95, sum by (le) ({run_bucket}))", "p95"),
                query(f"histogram_quantile(0.5, sum by (le) ({run_bucket}))", "p50"),
            )
        )
        .with_panel(
            graph(
                "Job duration",
                units.Seconds,
                "Enqueue to final status, by job type (jobs carry no provider).",
                query(
                    f"histogram_quantile(0.95, sum by (type, le) ({job_bucket}))", "p95 {{type}}"
                ),
                query(f"histogram_quantile(0.5, sum by (type, le) ({job_bucket}))", "p50 {{type}}"),
            )
        )
        .with_panel(
            graph(
                "Dramatiq message duration p95",
                units.Milliseconds,
                "Time each actor spends on a message, from Dramatiq's own middleware.",
                query(
                    "histogram_quantile(0.95, sum by (actor_name, le) "
                    f"(rate(dramatiq_message_duration_milliseconds_bucket[{RATE}])))",
                    "{{actor_name}}",
                ),
            )
        )
        .with_row(dashboard.Row("Push"))
        .with_panel(
            graph(
                "IDLE connections held",
                units.Short,
                "IMAP IDLE connections the watchers hold now, by provider (0 with no watcher).",
                # a gauge of live processes only: with no watcher up it has no series, so the
                # providers the push counter knows show 0 instead of an empty panel
                query(
                    f"sum by (provider) (mailpipe_idle_connections{{{P}}}) or "
                    f"0 * sum by (provider) (mailpipe_push_runs_total{{{P}}})",
                    "{{provider}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Push runs per second",
                units.OpsPerSecond,
                "Fetch runs the watchers enqueued because new mail arrived.",
                query(
                    f"sum by (provider) (rate(mailpipe_push_runs_total{{{P}}}[{RATE}]))",
                    "{{provider}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Push latency",
                units.Seconds,
                "p50 and p95 from a watcher seeing new mail to that mail stored by its push run.",
                query(
                    "histogram_quantile(0.95, sum by (provider, le) "
                    f"(rate(mailpipe_push_latency_seconds_bucket{{{P}}}[{RATE}])))",
                    "p95 {{provider}}",
                ),
                query(
                    "histogram_quantile(0.5, sum by (provider, le) "
                    f"(rate(mailpipe_push_latency_seconds_bucket{{{P}}}[{RATE}])))",
                    "p50 {{provider}}",
                ),
            )
        )
        .with_panel(
            graph(
                "IDLE reconnects per second",
                units.OpsPerSecond,
                "IDLE connections lost or not opened and tried again, by error class.",
                query(
                    f"sum by (error_class) (rate(mailpipe_idle_reconnects_total[{RATE}]))",
                    "{{error_class}}",
                ),
            )
        )
        .with_row(dashboard.Row("7-day trend"))
        .with_panel(
            graph(
                "Phase p95, 7 days",
                units.Seconds,
                "Recorded p95 per phase (10-minute windows), slowest provider shown.",
                query(
                    "max by (phase) (phase_provider:mailpipe_phase_duration_seconds:"
                    f'histogram_quantile{{quantile="0.95", {P}}})',
                    "{{phase}}",
                ),
            ).time_from("7d")
        )
        .with_panel(
            graph(
                "Account-run p95, 7 days",
                units.Seconds,
                "Recorded p95 of account runs per provider (10-minute windows).",
                query(
                    "max by (provider) (provider:mailpipe_account_run_duration_seconds:"
                    f'histogram_quantile{{quantile="0.95", {P}}})',
                    "{{provider}}",
                ),
            ).time_from("7d")
        )
        .with_panel(
            graph(
                "Emails fetched per day, 7 days",
                units.Short,
                "Messages fetched per day.",
                query(f"sum(increase(mailpipe_emails_fetched_total{{{P}}}[1d]))", "fetched"),
                bars=True,
            )
            .time_from("7d")
            .interval("1d")
        )
    )


def health() -> dashboard.Dashboard:
    """Job outcomes, errors and retries, accounts and circuits, queues and dead letters."""
    board = base(
        "Mailpipe / Health",
        HEALTH_UID,
        other_title="Mailpipe / Performance",
        other_uid=PERFORMANCE_UID,
    )
    return (
        board.with_row(dashboard.Row("Jobs and account runs"))
        .with_panel(
            graph(
                "Jobs by final status",
                units.Short,
                "Fetch jobs that ended, by status and type.",
                query(
                    f"sum by (status, type) (increase(mailpipe_jobs_total[{RATE}]))",
                    "{{status}} {{type}}",
                ),
                bars=True,
            )
        )
        .with_panel(
            graph(
                "Account runs by outcome",
                units.Short,
                "Account runs that ended: success, failed, or skipped (no key, circuit open).",
                query(
                    f"sum by (outcome) (increase(mailpipe_account_runs_total{{{P}}}[{RATE}]))",
                    "{{outcome}}",
                ),
                bars=True,
            )
        )
        .with_panel(
            graph(
                "Account-run failure ratio",
                units.PercentUnit,
                "Failed share of finished runs over 10 minutes; the alert fires above 25 %.",
                query(
                    f"provider:mailpipe_account_runs_failed:ratio_rate10m{{{P}}}", "{{provider}}"
                ),
            ).max(1)
        )
        .with_row(dashboard.Row("Errors and retries"))
        .with_panel(
            graph(
                "Errors by class",
                units.Short,
                "Failed attempts by error class (see docs/design.md, Errors).",
                query(
                    f"sum by (error_class) (increase(mailpipe_errors_total{{{P}}}[{RATE}]))",
                    "{{error_class}}",
                ),
                bars=True,
            )
        )
        .with_panel(
            graph(
                "Errors by phase",
                units.Short,
                "Failed attempts by the phase they failed in.",
                query(
                    f"sum by (phase) (increase(mailpipe_errors_total{{{P}}}[{RATE}]))",
                    "{{phase}}",
                ),
                bars=True,
            )
        )
        .with_panel(
            graph(
                "Retries by error class",
                units.Short,
                "Attempts sent back for a retry, and Dramatiq's own retry count per actor.",
                query(
                    f"sum by (error_class) (increase(mailpipe_retries_total[{RATE}]))",
                    "{{error_class}}",
                ),
                query(
                    f"sum by (actor_name) (increase(dramatiq_message_retries_total[{RATE}]))",
                    "dramatiq {{actor_name}}",
                ),
                bars=True,
            )
        )
        .with_panel(
            graph(
                "OAuth2 token refreshes by outcome",
                units.Short,
                "Access-token refreshes at the providers' token endpoints: success, refused "
                "(the user must connect again), unavailable (retried), failed (the client).",
                query(
                    "sum by (outcome) "
                    f"(increase(mailpipe_oauth2_token_refreshes_total{{{P}}}[{RATE}]))",
                    "{{outcome}}",
                ),
                bars=True,
            )
        )
        .with_panel(
            graph(
                "Quarantined emails by reason",
                units.Short,
                "Messages stored raw because they did not parse.",
                query(
                    f"sum by (reason) (increase(mailpipe_emails_quarantined_total[{RATE}]))",
                    "{{reason}}",
                ),
                bars=True,
            )
        )
        .with_panel(
            graph(
                "Failed messages (Dramatiq)",
                units.Short,
                "Messages whose actor raised, per actor, from Dramatiq's own middleware.",
                query(
                    f"sum by (actor_name) (increase(dramatiq_message_errors_total[{RATE}]))",
                    "{{actor_name}}",
                ),
                bars=True,
            )
        )
        .with_row(dashboard.Row("Accounts"))
        .with_panel(
            single(
                "Accounts by health",
                units.Short,
                "Enabled accounts by health; BROKEN ones wait for their owner.",
                query("max by (health) (mailpipe_accounts)", "{{health}}"),
            )
        )
        .with_panel(
            single(
                "Circuits by state",
                units.Short,
                "Enabled accounts by circuit-breaker state.",
                query("max by (state) (mailpipe_circuits)", "{{state}}"),
            )
        )
        .with_panel(
            single(
                "Stalest successful fetch",
                units.Seconds,
                "Age of the oldest last success among accounts background sync keeps current.",
                query("max(mailpipe_last_success_age_seconds)", "age"),
            )
        )
        .with_row(dashboard.Row("Queues"))
        .with_panel(
            graph(
                "Queue depth",
                units.Short,
                "Messages ready to run and delayed (retry backoff, busy waits), per queue.",
                query(
                    'max by (queue, state) (mailpipe_queue_messages{state=~"ready|delayed"})',
                    "{{queue}} {{state}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Dead letters",
                units.Short,
                "Dead-lettered messages per queue, and newly dead-lettered ones per actor.",
                query('max by (queue) (mailpipe_queue_messages{state="dead"})', "{{queue}}"),
                query(
                    f"sum by (actor_name) (increase(dramatiq_message_rejects_total[{RATE}]))",
                    "new {{actor_name}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Messages processed per second",
                units.OpsPerSecond,
                "Messages workers finished, per queue (Dramatiq's own middleware).",
                query(
                    f"sum by (queue_name) (rate(dramatiq_messages_total[{RATE}]))",
                    "{{queue_name}}",
                ),
            )
        )
    )


def render(board: dashboard.Dashboard) -> str:
    """The dashboard's JSON as committed: panels numbered, sorted keys, two-space indent."""
    built = board.build()
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number  # Grafana needs ids unique within a dashboard
    return json.dumps(built, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def files() -> dict[Path, str]:
    """Every generated file and its content."""
    return {
        DASHBOARDS / "mailpipe-performance.json": render(performance()),
        DASHBOARDS / "mailpipe-health.json": render(health()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in files().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path.name}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
