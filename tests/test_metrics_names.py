"""/metrics follows the Prometheus naming conventions (docs/ops.md "Metrics")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from server.app import create_app
from server.config import Settings
from tests.auth_support import auth_settings
from tests.live_metrics import exercise, families, series_names

# prometheus-client's own collectors keep their standard names, which every
# Prometheus and Grafana user knows; nothing else is outside the namespace.
STANDARD_PREFIXES = ("process_", "python_")
UNITS = ("_seconds", "_bytes", "_total", "_bucket", "_sum", "_count")


@pytest.fixture
async def scraped(aiohttp_client: Any, make_settings: Callable[..., Settings]) -> tuple[str, web.Application]:
    app = create_app(auth_settings(make_settings, cron_enabled=False))
    client = await aiohttp_client(app)
    return await exercise(client, app), app


async def test_every_family_the_app_defines_is_in_the_wardrobe_namespace(scraped: Any) -> None:
    text, _ = scraped
    names = families(text)
    assert len(names) > 40
    outside = sorted(n for n in names if not n.startswith(("wardrobe_", *STANDARD_PREFIXES)))
    assert outside == []
    for required in (
        "wardrobe_http_requests_total",
        "wardrobe_db_pool_in_use",
        "wardrobe_redis_pool_in_use",
        "wardrobe_vendor_in_flight",
        "wardrobe_vendor_concurrency_limit",
        "wardrobe_cron_runs_total",
        "wardrobe_credits_sweeper_cancelled_total",
        "wardrobe_tasks",
        "wardrobe_task_run_seconds",
        "wardrobe_ws_connections",
        "wardrobe_actor_mailbox_depth",
    ):
        assert required in names, required


async def test_no_created_series_at_all(scraped: Any) -> None:
    text, _ = scraped
    names = series_names(text)
    assert "wardrobe_http_requests_total" in names
    assert not [n for n in names if n.endswith("_created")]


async def test_labels_hold_route_templates_never_ids(scraped: Any) -> None:
    text, _ = scraped
    routes = {line.split('route="')[1].split('"')[0] for line in text.splitlines() if 'route="' in line}
    assert "/api/v1/tasks/{task_id}" in routes or "/api/v1/tasks" in routes
    assert "<unmatched>" in routes  # the 404 is counted, not under its path
    assert not [r for r in routes if any(ch.isdigit() for ch in r.replace("/api/v1", ""))]


async def test_timing_families_carry_their_base_unit(scraped: Any) -> None:
    text, _ = scraped
    for name, kind in families(text).items():
        if kind == "histogram" and name.startswith("wardrobe_") and not name.endswith("_batch_size"):
            assert name.endswith("_seconds"), name


async def test_cron_jobs_record_start_end_success_and_next_run(scraped: Any) -> None:
    text, _ = scraped
    for job in ("reservation-sweeper", "task-recovery", "orphan-files", "ops-gauges"):
        for family in (
            "wardrobe_cron_last_start_timestamp_seconds",
            "wardrobe_cron_last_end_timestamp_seconds",
            "wardrobe_cron_last_success_timestamp_seconds",
            "wardrobe_cron_next_run_timestamp_seconds",
            "wardrobe_cron_period_seconds",
            "wardrobe_cron_duration_seconds_count",
        ):
            assert f'{family}{{job="{job}"}}' in text, (family, job)
        assert f'wardrobe_cron_runs_total{{job="{job}",result="ok"}} 1.0' in text
    assert 'wardrobe_cron_period_seconds{job="orphan-files"} 86400.0' in text
    assert 'wardrobe_tasks{status="succeeded"} 1.0' in text
    assert 'wardrobe_tasks_finished_total{status="succeeded"} 1.0' in text
