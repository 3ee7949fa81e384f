"""The Grafana board and the alert rules name only metrics the server exports
(ops/grafana/wardrobe.json, ops/prometheus/alerts.yml), and the board shows every family."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.app import create_app
from server.config import Settings
from tests.auth_support import auth_settings
from tests.live_metrics import PENDING, exercise, families, series_names

ROOT = Path(__file__).resolve().parent.parent
BOARD = ROOT / "ops" / "grafana" / "wardrobe.json"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
# Series Prometheus makes itself (not on /metrics).
SYNTHETIC = frozenset({"up"})
PROMQL_WORDS = frozenset(
    {
        "sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left",
        "group_right", "and", "or", "unless", "offset", "rate", "irate", "increase", "delta",
        "deriv", "histogram_quantile", "time", "abs", "clamp_min", "clamp_max", "topk",
        "bottomk", "label_values", "min_over_time", "max_over_time", "avg_over_time",
        "predict_linear", "vector", "scalar", "bool", "le", "inf", "nan",
    }
)  # fmt: skip
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACES = re.compile(r"\{[^}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels removed)."""
    text = _QUOTED.sub(" ", expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(1)
        rest = text[match.end() :].lstrip()
        if word.lower() in PROMQL_WORDS or rest.startswith("("):
            continue  # a function or an aggregation
        names.add(word)
    return names


def board_exprs() -> Iterator[tuple[str, str]]:
    board = json.loads(BOARD.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            match = re.match(r"label_values\((\w+)", var["definition"])
            assert match, var["definition"]
            yield var["name"], match.group(1)


def alert_exprs() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule["alert"], rule["expr"]


@pytest.fixture
async def exported(aiohttp_client: Any, make_settings: Callable[..., Settings]) -> tuple[set[str], set[str]]:
    """(every name a query may select, every family name) of an app driven through all its
    parts. A family declared with no sample yet (a labelled counter nothing incremented)
    still counts: its # TYPE line is on /metrics."""
    app = create_app(auth_settings(make_settings, cron_enabled=False))
    text = await exercise(await aiohttp_client(app), app)
    fams = families(text)
    names = series_names(text) | set(fams)
    for family, kind in fams.items():
        if kind == "histogram":
            names |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
    return names, set(fams)


def test_the_expression_parser_finds_metric_names_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, route) (rate(wardrobe_http_request_duration_seconds_bucket"
        '{instance=~"$instance",route!="/api/v1/ws"}[$__rate_interval]))) > 1 '
        'unless on (channel) max by (channel) (delta(wardrobe_orders{status="paid"}[30m])) > 0 '
        "and time() - wardrobe_cron_period_seconds offset 1d"
    )
    assert metric_names(expr) == {
        "wardrobe_http_request_duration_seconds_bucket",
        "wardrobe_orders",
        "wardrobe_cron_period_seconds",
    }


def test_the_board_is_valid_json_with_a_datasource_input_and_panels() -> None:
    board = json.loads(BOARD.read_text())
    assert board["uid"] == "wardrobe-server"
    assert [i["pluginId"] for i in board["__inputs"]] == ["prometheus"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) > 30
    assert all(p["targets"] for p in board["panels"] if p["type"] != "row")


async def test_every_board_and_alert_expression_names_a_metric_the_server_exports(
    exported: tuple[set[str], set[str]],
) -> None:
    samples, _ = exported
    missing = {}
    for where, expr in [*board_exprs(), *alert_exprs()]:
        names = metric_names(expr)
        assert names, (where, expr)
        unknown = names - samples - SYNTHETIC
        # Only the families of the storage and payments branches may be missing, and
        # only while this branch does not export them (tighten after the merge).
        not_yet = unknown - PENDING
        if not_yet:
            missing[where] = sorted(not_yet)
    assert missing == {}


async def test_the_board_shows_every_family_of_metrics(exported: tuple[set[str], set[str]]) -> None:
    _, fams = exported
    used = set().union(*(metric_names(expr) for _, expr in board_exprs()))
    for family in sorted(fams):
        shown = family in used or any(f"{family}_{s}" in used for s in ("bucket", "sum", "count"))
        if family.startswith(("process_", "python_")):
            continue  # the board shows the process's CPU, memory and files only
        assert shown, family
    assert used | {n for _, e in alert_exprs() for n in metric_names(e)} >= PENDING
