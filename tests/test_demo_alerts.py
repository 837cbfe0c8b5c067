"""The demo's scenarios against the shipped alert rules, with a real Prometheus scraping
real demos on loopback: healthy makes no alert's condition happen, and every other
scenario makes the conditions of the alerts it names (``Scenario.alerts``) happen.

The rules are rendered with a 10 s rate window (through alerts/config.py overrides, the
one configuration place); their ``for`` durations are the shipped ones, and the
expressions themselves are evaluated — a condition that holds is what the scenario
promises, the ``for`` only says how long before a page.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from poolwatch._demo.workload import SCENARIOS
from tests.support.demo import ON_POSTGRESQL, POOLS
from tests.support.prometheus import Processes, Prometheus, build, free_port, rules, until

pytestmark = pytest.mark.serial  # demos judged by timing: run alone (scripts/test)

WINDOW = {"RATE_WINDOW": "10s"}
WARM_UP = 15.0
"""Seconds the demo runs before the expressions are judged: the 10 s window is then full
of steady work, not of its first connects."""


def _demo(processes: Processes, tmp_path: Path, scenario: str, *extra: str) -> str:
    port = free_port()
    processes.start(
        [
            sys.executable,
            "-m",
            "poolwatch",
            "demo",
            "--scenario",
            scenario,
            "--duration",
            "120",
            "--port",
            str(port),
            *extra,
        ],
        tmp_path / f"demo-{scenario}.log",
    )
    return f"127.0.0.1:{port}"


def _pools_scraped(prometheus: Prometheus, job: str) -> dict[str, str]:
    result = prometheus.query(
        f'count by (pool_name, pool_kind) (poolwatch_connections{{job="{job}"}})'
    )
    return {r["metric"]["pool_name"]: r["metric"]["pool_kind"] for r in result}


def _true(prometheus: Prometheus, expr: str, job: str) -> list[dict[str, str]]:
    """The label sets of ``expr``'s result for ``job``: where the alert's condition holds (a
    backend alert's, which sums every job, counts for any)."""
    return [r["metric"] for r in prometheus.query(expr) if r["metric"].get("job", job) == job]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp_path = tmp_path_factory.mktemp("healthy")
    processes = Processes()
    try:
        target = _demo(processes, tmp_path, "healthy")  # the default database: PostgreSQL
        prometheus = Prometheus(processes, tmp_path, {"healthy": [target]}, rules(**WINDOW))
        until(
            "the healthy demo's pools in Prometheus",
            lambda: _pools_scraped(prometheus, "healthy") == POOLS | ON_POSTGRESQL,
            90,
        )
        yield prometheus
    finally:
        processes.stop()
        log = (tmp_path / "demo-healthy.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]


@pytest.mark.postgres
def test_the_healthy_demo_makes_no_alert_condition_happen(healthy: Prometheus) -> None:
    alerts = build().alerts(**WINDOW)
    assert len(alerts) == 10  # the backend alerts too: the demo declares no server limit
    time.sleep(WARM_UP)
    checked_from = time.monotonic()
    found: dict[str, list[dict[str, str]]] = {}
    rounds = 0
    while time.monotonic() - checked_from < 12 and rounds < 30:  # every expression, ~1/s
        for alert in alerts:
            if true := _true(healthy, alert.expr, "healthy"):
                found.setdefault(alert.name, []).extend(true)
        rounds += 1
        time.sleep(1.0)
    # Prometheus itself evaluated every rule each second meanwhile: no alert was pending
    seconds = round(time.monotonic() - checked_from)
    active = healthy.query(f'count_over_time(ALERTS{{job="healthy"}}[{seconds}s])')
    assert (found, active) == ({}, [])
    assert rounds >= 8
    # and the expressions had data to judge: every pool kind, reusing its connections
    reuse = healthy.query('poolwatch:checkout_reuse:ratio{job="healthy"}')
    assert {r["metric"]["pool_name"]: float(r["value"][1]) > 0.9 for r in reuse} == dict.fromkeys(
        POOLS | ON_POSTGRESQL, True
    )


EXPECTED = {name: s.alerts for name, s in SCENARIOS.items() if name != "healthy"}


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Every other scenario side by side (SQLite: lighter), one Prometheus job each."""
    tmp_path = tmp_path_factory.mktemp("scenarios")
    processes = Processes()
    try:
        targets = {
            name: [_demo(processes, tmp_path, name, "--database", "sqlite")] for name in EXPECTED
        }
        prometheus = Prometheus(processes, tmp_path, targets, rules(**WINDOW))
        for job in targets:
            until(
                f"the {job} demo in Prometheus", lambda job=job: _pools_scraped(prometheus, job), 90
            )
        yield prometheus
    finally:
        processes.stop()


def test_every_scenario_makes_the_conditions_of_its_alerts_happen(scenarios: Prometheus) -> None:
    alerts = {alert.name: alert.expr for alert in build().alerts(**WINDOW)}
    assert {
        name for pools in EXPECTED.values() for names in pools.values() for name in names
    } <= set(alerts)

    def missing() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for job, pools in EXPECTED.items():
            for pool, names in pools.items():
                for name in names:
                    holds = [
                        m for m in _true(scenarios, alerts[name], job) if m["pool_name"] == pool
                    ]
                    if not holds:
                        out.setdefault(job, []).append(f"{pool}: {name}")
        return out

    last: Any = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        last = missing()
        if not last:
            break
        time.sleep(1.0)
    assert last == {}
