"""End to end with real processes on loopback: an instrumented workload exhausting a real
PostgreSQL pool, HTTP pools (requests and httpx to a loopback server, boto3 to moto) and a
redis-py pool (a throw-away redis-server),
keeping another pool busy but not exhausted, leaking a connection, and calling a server
that refuses connections; a real Prometheus scraping it every second with the shipped
rules (their durations shortened only through alerts/config.py overrides), and a real
Alertmanager. The whole test, start-up included, is held to 3 minutes.

Prometheus and Alertmanager come from Debian's prometheus and prometheus-alertmanager
packages; the test command installs them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.postgres import PostgresCluster
from tests.support.prometheus import (
    ROOT,
    Processes,
    Prometheus,
    binary,
    free_port,
    get_json,
    rules,
    until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.serial]

BUDGET = 180.0
"""Seconds the whole test may take, the workload's and the servers' start-up included."""
SHORT = {  # every override goes through the one configuration place
    "RATE_WINDOW": "10s",
    "UTILIZATION_HIGH_FOR": "5s",
    "SATURATED_FOR": "5s",
    "EXHAUSTED_FOR": "0s",
    "DISCARDING_FOR": "5s",
    "LEAK_FOR": "5s",
}
POOLS = [  # (pool.kind, pool.name) of every pool the workload's cycles run
    ("sqlalchemy", "orders-db"),
    ("requests", "inventory-api"),
    ("httpx", "pricing-api"),
    ("botocore", "sessions-dynamodb"),
    ("redis", "sessions-cache"),
]
BROKEN = [  # pools whose server refuses connections
    ("sqlalchemy", "replica-db"),
    ("requests", "down-api"),
    ("httpx", "down-pricing"),
    ("botocore", "down-dynamodb"),
    ("redis", "down-cache"),
]
# Targets whose series exist only once a failure happened: checked against BROKEN. A
# refused connect fails the checkout where the checkout includes opening the connection
# (SQLAlchemy, redis-py) or is counted only once the connection accepts the request (httpx):
# a wait error; urllib3 (requests, botocore) connects after a checkout that succeeded, so
# there the refused connect is a connect error only.
ON_FAILURE = {
    "wait errors": ["replica-db", "down-pricing", "down-cache"],
    "connect errors": [name for _, name in BROKEN],
}
ANTIPATTERNS = {  # the only anti-patterns the workload has: non-blocking pools of 2, 4 callers
    ("inventory-api", "pool_overflowing"),
    ("sessions-dynamodb", "pool_overflowing"),
}


@pytest.fixture
def stack(postgres: PostgresCluster, tmp_path: Path) -> Iterator[dict[str, Any]]:
    started = time.monotonic()
    processes = Processes()
    try:
        port_file = tmp_path / "workload.port"
        processes.start(
            [
                sys.executable,
                "-m",
                "tests.support.workload",
                "--url",
                postgres.url(),
                "--port-file",
                str(port_file),
                "--seconds",
                str(BUDGET),
            ],
            tmp_path / "workload.log",
        )
        workload_port = int(
            until("the workload's endpoint", lambda: port_file.exists() and port_file.read_text())
        )
        am_port = free_port()
        (tmp_path / "alertmanager.yml").write_text(
            "route: {receiver: blackhole, group_wait: 1s, group_interval: 1s, "
            "repeat_interval: 1h}\nreceivers: [{name: blackhole}]\n"
        )
        processes.start(
            [
                binary("prometheus-alertmanager", "alertmanager"),
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],  # no gossip port: loopback only
            tmp_path / "alertmanager.log",
        )
        prometheus = Prometheus(
            processes,
            tmp_path,
            {"poolwatch-e2e": [f"127.0.0.1:{workload_port}"]},
            rules(**SHORT),
            alertmanager=f"127.0.0.1:{am_port}",
        )
        yield {
            "prometheus": prometheus,
            "alertmanager": f"http://127.0.0.1:{am_port}",
            "started": started,
        }
    finally:
        processes.stop()
        print(f"end to end: {time.monotonic() - started:.1f} s")  # shown with -s or on failure


def _firing(alertmanager: str, pool: str) -> dict[str, dict[str, str]]:
    """Alerts active in Alertmanager for ``pool``, by alert name."""
    alerts = get_json(f"{alertmanager}/api/v2/alerts?active=true")
    return {
        a["labels"]["alertname"]: a["labels"]
        for a in alerts
        if a["labels"].get("pool_name") == pool
    }


def _substituted(expr: str, kind: str, pool: str) -> str:
    return (
        expr.replace("$__rate_interval", "10s")
        .replace("$__range", "5m")
        .replace("$job", "poolwatch-e2e")
        .replace("$instance", ".*")
        .replace("$kind", kind)
        .replace("$pool", pool)
    )


def _value(prometheus: Prometheus, expr: str) -> float:
    [sample] = prometheus.query(expr)
    return float(sample["value"][1])


def _dashboards() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name in ("poolwatch-overview.json", "poolwatch-pool.json"):
        dashboard = json.loads((ROOT / "dashboards" / name).read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                yield name, panel, target


def test_alerts_reach_alertmanager_and_every_dashboard_query_has_data(
    stack: dict[str, Any],
) -> None:
    prometheus: Prometheus = stack["prometheus"]
    alertmanager: str = stack["alertmanager"]
    wanted = {
        "orders-db": {"PoolwatchPoolExhausted", "PoolwatchPoolUtilizationHigh"},
        # high but not exhausted: 11 of 12 connections, nobody waiting, nobody timing out
        "catalog-db": {"PoolwatchPoolUtilizationHigh"},
        "reports-db": {"PoolwatchConnectionLeak"},
        # a requests pool of 2 for 4 callers: a discard for half its checkouts
        "inventory-api": {"PoolwatchPoolDiscarding", "PoolwatchPoolAntipattern"},
        # a redis-py blocking pool of 2 for 4 transactions: two time out
        "sessions-cache": {"PoolwatchPoolExhausted"},
    }
    firing = until(
        f"{wanted} in Alertmanager",
        lambda: (
            (got := {pool: _firing(alertmanager, pool) for pool in wanted})
            and all(names <= set(got[pool]) for pool, names in wanted.items())
            and got
        ),
    )
    for pool, names in wanted.items():
        for name in names:
            labels = firing[pool][name]
            assert (labels["job"], labels["pool_name"]) == ("poolwatch-e2e", pool)
    assert firing["orders-db"]["PoolwatchPoolExhausted"]["severity"] == "critical"
    assert firing["catalog-db"]["PoolwatchPoolUtilizationHigh"]["severity"] == "warning"
    assert firing["inventory-api"]["PoolwatchPoolAntipattern"]["antipattern"] == "pool_overflowing"
    assert firing["inventory-api"]["PoolwatchPoolAntipattern"]["severity"] == "info"
    # catalog-db's utilization alone fired: it never saturated, nothing timed out
    assert set(firing["catalog-db"]) == {"PoolwatchPoolUtilizationHigh"}
    assert (
        prometheus.query(
            'ALERTS{pool_name="catalog-db", '
            'alertname=~"PoolwatchPoolSaturated|PoolwatchPoolExhausted"}'
        )
        == []
    )

    empty, checked = [], 0
    for kind, pool in POOLS:
        for name, panel, target in _dashboards():
            if target["legendFormat"] in ON_FAILURE or panel["title"] == "Anti-patterns":
                continue
            expr = _substituted(target["expr"], kind, pool)
            checked += 1
            if not prometheus.query(expr):
                empty.append(f"{kind} {pool}: {name}: {panel['title']}: {expr}")
    assert empty == [], "\n".join(empty)
    # every target of both dashboards but the failure and anti-pattern ones, for every pool
    assert checked == 41 * len(POOLS)

    # failures: the broken pools' series, and only where each kind can fail that way
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

    # the anti-patterns table lists exactly what the workload does wrong
    [target] = [t for _, p, t in _dashboards() if p["title"] == "Anti-patterns"]
    rows = prometheus.query(_substituted(target["expr"], ".*", ".*"))
    assert {(r["metric"]["pool_name"], r["metric"]["antipattern"]) for r in rows} == ANTIPATTERNS

    # the stats, without their "or vector(0)" fallback, where the workload makes them happen
    stats = {
        panel["title"].split(" above ")[0]: target["expr"]
        for _, panel, target in _dashboards()
        if panel["type"] == "stat"
    }
    assert all(expr.endswith(" or vector(0)") for expr in stats.values())
    bare = {title: expr.removesuffix(" or vector(0)") for title, expr in stats.items()}
    assert _value(prometheus, _substituted(bare["Pools"], ".*", "catalog-db")) == 1
    assert _value(prometheus, _substituted(bare["Active leaks"], ".*", "reports-db")) == 1
    assert _value(prometheus, _substituted(bare["Timeouts in range"], ".*", "orders-db")) >= 1
    assert _value(prometheus, _substituted(bare["Discards in range"], ".*", "inventory-api")) >= 1
    # and with it, 0 where nothing of the kind happens
    assert _value(prometheus, _substituted(stats["Active leaks"], ".*", "catalog-db")) == 0
    assert _value(prometheus, _substituted(stats["Timeouts in range"], ".*", "catalog-db")) == 0

    elapsed = time.monotonic() - stack["started"]
    assert elapsed < BUDGET, f"the end-to-end test took {elapsed:.0f} s"
