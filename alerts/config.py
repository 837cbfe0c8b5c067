"""The one place for poolwatch's alert thresholds, durations and selectors.

Every value here is used by ``alerts/build.py`` to render ``alerts/poolwatch.rules.yml``.
Change a value, run ``python alerts/build.py``, and commit both files (a test checks that
the rendered file is current). Each value says why you might change it.
"""

from __future__ import annotations

from typing import Final

SELECTOR: Final = ""
"""Extra label matchers for every poolwatch series, e.g. ``job=~"api|worker"``: narrow the
rules to some jobs when several teams share a Prometheus."""

AGGREGATE_BY: Final = ("job", "instance", "pool_kind", "pool_name")
"""One alert per pool of each process. Drop ``instance`` to alert once per service."""

RATE_WINDOW: Final = "5m"
"""Window of every rate. Must span at least 4 scrapes; raise it if you scrape slower than
every 75 s."""

UTILIZATION_HIGH: Final = 0.80
"""PoolwatchPoolUtilizationHigh: used / max above this. 80% leaves room for a burst; lower
it for pools whose exhaustion is expensive (a primary database)."""
UTILIZATION_HIGH_FOR: Final = "10m"
"""How long utilization must stay high: short spikes are normal, a plateau is not."""

SATURATED: Final = 0.95
"""PoolwatchPoolSaturated: used / max at or above this, or callers waiting."""
SATURATED_FOR: Final = "5m"
"""Sustained saturation pages: callers are queuing now."""

EXHAUSTED_FOR: Final = "1m"
"""PoolwatchPoolExhausted fires once callers time out; this confirms it on two evaluations."""

DISCARD_RATE: Final = 0.1
"""PoolwatchPoolDiscarding: pool_full closes per second. An occasional discard is harmless;
six a minute, sustained, means the pool is too small for its traffic."""
DISCARDING_FOR: Final = "15m"

SLOW_ACQUIRE_P99: Final = 0.1
"""PoolwatchSlowAcquire: seconds, p99 of successful waits for a connection. Raise it for
pools that open a TLS connection on most checkouts."""
SLOW_ACQUIRE_FOR: Final = "10m"

CHURN_RATIO: Final = 0.5
"""PoolwatchConnectionChurn: new connections per checkout. A healthy pool reuses its
connections: far fewer than one new connection per two checkouts."""
CHURN_MIN_CHECKOUTS: Final = 1.0
"""Checkouts per second below which churn is not judged (a quiet pool reconnects after
idle timeouts, and the ratio means nothing)."""
CHURN_FOR: Final = "15m"

LEAK_FOR: Final = "5m"
"""PoolwatchConnectionLeak: how long a leak must stay active. The leak threshold itself is
poolwatch's ``leak_threshold`` setting (default 30 s)."""

RUNBOOK_URL: Final = "alerts/runbooks/{alert}.md"
"""Where each alert's runbook lives: point it at your copy of alerts/runbooks, e.g.
``https://git.example.com/ops/poolwatch/blob/main/alerts/runbooks/{alert}.md``."""

GRAFANA_DATASOURCE_UID: Final = "prometheus"
"""The uid of the Prometheus datasource the Grafana-managed copies of the alerts query (the
demo stack provisions its datasource with this uid)."""

GRAFANA_FOLDER: Final = "Connection pools"
"""The Grafana folder holding the Grafana-managed alert rules."""
