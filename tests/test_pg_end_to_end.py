"""The shipped alerts and dashboards on psycopg_pool and asyncpg pools, unchanged: a real
Prometheus with the shipped rules scrapes a workload exhausting real pools of both kinds
on the real PostgreSQL (tests/support/pg_workload.py). The alerts' conditions hold for
both kinds, and every dashboard query returns data for a pool of each, as for the kinds
the main end-to-end test runs (tests/test_end_to_end.py): one family, one dashboard and
one rule set for every pool of a process.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.pgadmin import dsn
from tests.support.postgres import PostgresCluster
from tests.support.prometheus import ROOT, Processes, Prometheus, build, rules, until

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.serial]

BUDGET = 120.0
"""Seconds the workload may run (the test stops it once it has seen everything)."""
SHORT = {"RATE_WINDOW": "10s"}
"""The rate window of every rule and query, through alerts/config.py (the one place)."""
POOLS = [("psycopg_pool", "orders-psycopg"), ("asyncpg", "orders-asyncpg")]
BROKEN = [("psycopg_pool", "down-psycopg"), ("asyncpg", "down-asyncpg")]
# A wait ends in error where it includes opening the connection: asyncpg's acquire, and a
# psycopg NullConnectionPool's getconn (a ConnectionPool's workers connect in the
# background, and its callers time out).
ON_FAILURE = {
    "wait errors": ["down-psycopg", "down-asyncpg"],
    "connect errors": ["down-psycopg", "down-asyncpg"],
}
CONDITIONS = {
    "orders-psycopg": {
        "PoolwatchPoolExhausted",
        "PoolwatchPoolSaturated",
        "PoolwatchSlowAcquire",
        "PoolwatchConnectionLeak",
        "PoolwatchPoolUtilizationHigh",
    },
    "orders-asyncpg": {
        "PoolwatchPoolExhausted",
        "PoolwatchPoolSaturated",
        "PoolwatchSlowAcquire",
        "PoolwatchConnectionLeak",
        "PoolwatchPoolUtilizationHigh",
        "PoolwatchPoolAntipattern",
    },
}
"""The alerts whose condition the workload makes hold, by pool."""


@pytest.fixture
def prometheus(postgres: PostgresCluster, tmp_path: Path) -> Iterator[Prometheus]:
    processes = Processes()
    try:
        port_file = tmp_path / "workload.port"
        processes.start(
            [
                sys.executable,
                "-m",
                "tests.support.pg_workload",
                "--dsn",
                dsn(postgres),
                "--port-file",
                str(port_file),
                "--seconds",
                str(BUDGET),
            ],
            tmp_path / "workload.log",
        )
        port = int(
            until("the workload's endpoint", lambda: port_file.exists() and port_file.read_text())
        )
        yield Prometheus(processes, tmp_path, {"pg-e2e": [f"127.0.0.1:{port}"]}, rules(**SHORT))
    finally:
        processes.stop()
        log = (tmp_path / "workload.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]


def _substituted(expr: str, kind: str, pool: str) -> str:
    return (
        expr.replace("$__rate_interval", "10s")
        .replace("$__range", "5m")
        .replace("$job", "pg-e2e")
        .replace("$instance", ".*")
        .replace("$kind", kind)
        .replace("$pool", pool)
    )


def _dashboards() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name in ("poolwatch-overview.json", "poolwatch-pool.json"):
        dashboard = json.loads((ROOT / "dashboards" / name).read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                yield name, panel, target


def test_alerts_and_dashboards_work_for_psycopg_pool_and_asyncpg(prometheus: Prometheus) -> None:
    alerts = {alert.name: alert.expr for alert in build().alerts(**SHORT)}
    until("Prometheus scraping the workload", lambda: prometheus.query('up{job="pg-e2e"} == 1'))

    def holding() -> dict[str, set[str]]:
        found: dict[str, set[str]] = {pool: set() for pool in CONDITIONS}
        for name, expr in alerts.items():
            for result in prometheus.query(expr):
                pool = result["metric"].get("pool_name")
                if pool in found:
                    found[pool].add(name)
        return found

    # Each condition holds at some evaluation (utilization is an instant: 3 of 3 while both
    # holders and the leak hold theirs, 2 of 3 between cycles).
    seen: dict[str, set[str]] = {pool: set() for pool in CONDITIONS}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for pool, names in holding().items():
            seen[pool] |= names
        if all(CONDITIONS[pool] <= seen[pool] for pool in CONDITIONS):
            break
        time.sleep(0.5)
    assert {pool: CONDITIONS[pool] - seen[pool] for pool in CONDITIONS} == {
        pool: set() for pool in CONDITIONS
    }

    empty, checked = [], 0
    for kind, pool in POOLS:
        for name, panel, target in _dashboards():
            if target["legendFormat"] in ON_FAILURE or panel["title"] == "Anti-patterns":
                continue
            expr = _substituted(target["expr"], kind, pool)
            checked += 1
            if not prometheus.query(expr):
                empty.append(f"{kind} {pool}: {name}: {panel['title']}: {expr}")
    assert empty == []
    assert checked == 41 * len(POOLS)  # as for every kind of tests/test_end_to_end.py

    failing = {}
    for kind, pool in BROKEN:
        for _, _panel, target in _dashboards():
            if target["legendFormat"] in ON_FAILURE:
                result = prometheus.query(_substituted(target["expr"], kind, pool))
                failing[target["legendFormat"], pool] = (
                    len(result) == 1 and float(result[0]["value"][1]) > 0
                )
    assert failing == {
        (legend, pool): pool in pools for legend, pools in ON_FAILURE.items() for _, pool in BROKEN
    }

    [target] = [t for _, p, t in _dashboards() if p["title"] == "Anti-patterns"]
    rows = prometheus.query(_substituted(target["expr"], ".*", ".*"))
    assert {(r["metric"]["pool_name"], r["metric"]["antipattern"]) for r in rows} == {
        ("orders-asyncpg", "no_pool_timeout")
    }
    # the closes the workload causes, under the one reason label every kind shares
    stale = prometheus.query('poolwatch_connections_closed_total{reason="stale"} > 0')
    assert {r["metric"]["pool_name"] for r in stale} == {"orders-psycopg", "orders-asyncpg"}
