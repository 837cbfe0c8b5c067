"""Grafana dashboards: current, linted, and every query parsed by promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
FILES = ["poolwatch-overview.json", "poolwatch-pool.json", "poolwatch-backends.json"]
VARIABLES = {
    "poolwatch-overview.json": ["datasource", "job", "instance", "kind", "pool"],
    "poolwatch-pool.json": ["datasource", "job", "instance", "kind", "pool"],
    "poolwatch-backends.json": ["datasource", "address", "port"],
}
BACKEND_SELECTOR = 'server_address=~"$address", server_port=~"$port"'
"""Every query of the backends dashboard selects backends, whichever instances hold them."""
RANGE = re.compile(r"\[([^\]]+)\]")
"""Every range selector of an expression, e.g. ``[$__rate_interval]``."""
WINDOWED = re.compile(r"\b(rate|irate|increase|avg_over_time)\([^\[()]*\[([^\]]+)\]")
"""A range function applied directly to a selector, and its window."""
ALLOWED_WINDOWS = {
    "rate": {"$__rate_interval"},
    "irate": {"$__rate_interval"},
    "avg_over_time": {"$__rate_interval"},
    "increase": {"$__rate_interval", "$__range"},  # "in range" stats count the whole range
}
WINDOWS = {"poolwatch-overview.json": 4, "poolwatch-pool.json": 20, "poolwatch-backends.json": 0}
"""Range selectors per dashboard, each checked: a new one is counted, so cannot slip by."""


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return data


def _targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


def test_the_dashboards_are_rendered_from_code() -> None:
    result = subprocess.run(
        [sys.executable, str(DASHBOARDS / "build.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_titles_and_uids_are_pinned() -> None:
    assert [(_load(f)["uid"], _load(f)["title"]) for f in FILES] == [
        ("poolwatch-overview", "Connection pools / overview"),
        ("poolwatch-pool", "Connection pool / detail"),
        ("poolwatch-backends", "Connection pools / backends"),
    ]


@pytest.mark.parametrize("name", FILES)
def test_dashboard_lint(name: str) -> None:
    dashboard = _load(name)
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == VARIABLES[name]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in VARIABLES[name][1:]:
        assert variables[variable]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    windows = 0
    for panel in dashboard["panels"]:
        title = panel["title"]
        assert panel["description"].endswith("."), title
        assert panel["fieldConfig"]["defaults"]["unit"], title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", title
            expr = target["expr"]
            found = WINDOWED.findall(expr)
            # every range selector sits directly in one of the range functions checked here
            assert len(found) == len(RANGE.findall(expr)), f"{title}: unchecked range: {expr}"
            for function, window in found:
                assert window in ALLOWED_WINDOWS[function], f"{title}: {function}[{window}]"
                windows += 1
            if name == "poolwatch-backends.json":
                assert BACKEND_SELECTOR in expr, f"{title} ignores the backend variables"
            elif "poolwatch_process_" in expr:
                # the process view describes a process, not a pool: job and instance select it
                assert 'job=~"$job", instance=~"$instance"' in expr, title
                assert "pool_name" not in expr, title
            else:
                assert 'pool_name=~"$pool"' in expr, f"{title} ignores the pool variable"
    assert windows == WINDOWS[name]


def test_the_lint_catches_a_fixed_window() -> None:
    for bad in (
        'sum(increase(poolwatch_timeouts_total{pool_name=~"$pool"}[5m]))',
        'sum(rate(poolwatch_timeouts_total{pool_name=~"$pool"}[1m]))',
        'max_over_time(poolwatch_connections{pool_name=~"$pool"}[10m])',
    ):
        found = WINDOWED.findall(bad)
        assert len(found) != len(RANGE.findall(bad)) or any(
            window not in ALLOWED_WINDOWS[function] for function, window in found
        ), bad


def test_the_overview_lists_every_pool_and_its_anti_patterns() -> None:
    panels = {p["title"]: p for p in _load("poolwatch-overview.json")["panels"]}
    table = panels["Pools by utilization"]
    exprs = [t["expr"] for t in table["targets"]]
    # one query lists every pool (used is exported for all), the others fill their columns
    assert exprs[0].startswith(
        "sum by (job, instance, pool_kind, pool_name) (poolwatch_connections{"
    )
    assert 'state="used"' in exprs[0] and "poolwatch_connections_max" in exprs[3]
    assert [t["id"] for t in table["transformations"]] == ["merge", "organize"]
    renames = table["transformations"][1]["options"]["renameByName"]
    assert renames == {
        "Value #A": "Used",
        "Value #B": "Idle",
        "Value #C": "Max",
        "Value #D": "Utilization",
    }
    assert table["fieldConfig"]["overrides"] == [
        {
            "matcher": {"id": "byName", "options": "Utilization"},
            "properties": [{"id": "unit", "value": "percentunit"}],
        }
    ]
    [antipatterns] = panels["Anti-patterns"]["targets"]
    assert "by (job, instance, pool_kind, pool_name, antipattern)" in antipatterns["expr"]
    threshold = _alerts_config().UTILIZATION_HIGH
    assert f"Pools above {threshold:.0%}" in panels
    assert panels[f"Pools above {threshold:.0%}"]["targets"][0]["expr"].startswith("count((")
    assert (
        f") > {threshold}) or vector(0)"
        in panels[f"Pools above {threshold:.0%}"]["targets"][0]["expr"]
    )


def test_the_backends_dashboard_sets_each_backend_against_its_limit() -> None:
    panels = {p["title"]: p for p in _load("poolwatch-backends.json")["panels"]}
    table = panels["Backends"]
    renames = table["transformations"][1]["options"]["renameByName"]
    assert list(renames.values()) == [
        "Connections",
        "Worst case",
        "Limit",
        "Utilization",
        "Unbounded pools",
        "Waiting",
        "Instances",
        "Services",
    ]
    # the backend columns are the recording rules the alerts use
    rules = [t["expr"].split("{")[0] for t in table["targets"][:6]]
    assert rules == [
        "poolwatch:backend_connections:sum",
        "poolwatch:backend_connections_worst_case:sum",
        "poolwatch:backend_connections_limit:min",
        "poolwatch:backend_utilization:ratio",
        "poolwatch:backend_unbounded_pools:count",
        "poolwatch:backend_pending_requests:sum",
    ]
    unbounded = table["fieldConfig"]["overrides"][1]
    assert unbounded["matcher"] == {"id": "byName", "options": "Worst case"}
    [mapping] = unbounded["properties"][0]["value"]
    assert mapping["options"] == {"from": 1e300, "to": None, "result": {"text": "unbounded"}}
    threshold = _alerts_config().BACKEND_NEAR_LIMIT
    above = panels[f"Backends above {threshold:.0%}"]["targets"][0]["expr"]
    assert f" > {threshold}) or vector(0)" in above
    share = panels["Top pools by share"]["targets"][0]["expr"]
    assert share.startswith("topk by (server_address, server_port) (10, ")
    assert list(panels)[-2:] == ["Instances holding connections", "Top pools by share"]


def test_the_wait_and_connect_panels_show_exemplars_that_link_to_traces() -> None:
    """The p99 line of each carries the exemplars (pool.wait / pool.connect span ids); the
    other lines do not, or Grafana would draw each exemplar once per line."""
    panels = {p["title"]: p for p in _load("poolwatch-pool.json")["panels"]}
    for title, metric in (
        ("Wait for a connection", "poolwatch_wait_duration_seconds_bucket"),
        ("Time to open a connection", "poolwatch_connect_duration_seconds_bucket"),
    ):
        targets = panels[title]["targets"]
        assert [t["legendFormat"] for t in targets if t["exemplar"]] == ["p99"], title
        assert all(metric in t["expr"] for t in targets), title
        assert "exemplar" in panels[title]["description"].lower(), title
    exemplars = [
        title
        for name in FILES
        for p in _load(name)["panels"]
        for title in [p["title"]]
        if any(t.get("exemplar") for t in p.get("targets", []))
    ]
    assert sorted(exemplars) == ["Time to open a connection", "Wait for a connection"]


def _alerts_config() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", DASHBOARDS.parent / "alerts/config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_query_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's prometheus package (scripts/test does)"
    rules = []
    for name in FILES:
        for index, (_title, expr) in enumerate(_targets(_load(name))):
            substituted = (
                expr.replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$kind", ".*")
                .replace("$pool", ".*")
                .replace("$address", ".*")
                .replace("$port", ".*")
            )
            assert "$" not in substituted, substituted
            rules.append(
                {
                    "record": f"dashboard:{Path(name).stem.replace('-', '_')}:{index}",
                    "expr": substituted,
                }
            )
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
