"""The one place for poolwatch's alert thresholds, durations and selectors.

Every value here is used by ``alerts/build.py`` to render ``alerts/poolwatch.rules.yml``,
the Grafana-managed copies of the alerts, and ``poolwatch/diagnostics/thresholds.py`` — the
thresholds ``poolwatch doctor`` and ``poolwatch top`` judge pools by, so that they say what
the alerts would — and by ``dashboards/build.py`` (the overview's "pools above" stat).
Change a value, run ``scripts/mixin`` (or ``python alerts/build.py`` and then ``python
dashboards/build.py``), and commit the results (tests check that every rendered file is
current). Each value says why you might change it.
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
"""PoolwatchPoolSaturated: connections in use plus callers waiting, over the limit, at or
above this (or any caller waiting). Pools without a pool-wide limit have no such ratio."""
SATURATED_FOR: Final = "5m"
"""Sustained saturation pages: callers are queuing now."""

EXHAUSTED_FOR: Final = "1m"
"""PoolwatchPoolExhausted fires once callers time out; this confirms it on two evaluations."""

DISCARD_RATIO: Final = 0.1
"""PoolwatchPoolDiscarding: pool_full closes per checkout. Each is a connection opened for
a checkout the pool had no room for, then thrown away: past one checkout in ten, the pool
is too small for its traffic. A ratio, not a rate, so that a SQLAlchemy QueuePool closing
an overflow connection now and then (by design) among hundreds of checkouts a second does
not fire, while a non-blocking urllib3 pool (requests, botocore) discarding on most of
its checkouts does."""
DISCARD_RATE: Final = 0.1
"""PoolwatchPoolDiscarding also needs more than this many pool_full closes per second: a
quiet pool discarding one connection in five checkouts costs nothing worth a warning."""
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

HEADROOM: Final = 1.5
"""The recommended pool size (recording rule ``poolwatch:pool_size:recommended``, and
``poolwatch doctor``): connections busy on average (Little's law: the rate of hold-seconds,
plus callers waiting) times this. Raise it for bursty traffic."""

ANTIPATTERN_FOR: Final = "0m"
"""PoolwatchPoolAntipattern (severity info) fires while a detected anti-pattern is still
observed (``poolwatch_antipatterns_active``): poolwatch finds each after conservative checks
of its own and keeps it active until five minutes after its last sign, so there is nothing
more to wait for."""

LEAK_FOR: Final = "5m"
"""PoolwatchConnectionLeak: how long a leak must stay active. The leak threshold itself is
poolwatch's ``leak_threshold`` setting (default 30 s)."""

BACKEND_BY: Final = ("server_address", "server_port")
"""What one backend is: its connections are summed over every instance and service that
talks to it. Add ``instance`` when each instance has a backend of its own at the same
address (a PgBouncer or Envoy sidecar on 127.0.0.1), or a cluster label when several
clusters reuse addresses."""

BACKEND_NEAR_LIMIT: Final = 0.80
"""PoolwatchBackendNearLimit: connections open to a backend across the fleet, over the limit
declared for it (the ``server_limits`` setting), above this. 80% leaves room for the
backend's own administrative connections and for the next deploy's new instances."""
BACKEND_NEAR_LIMIT_FOR: Final = "10m"
"""How long it must last: a burst of connections at a deploy is normal, a plateau is not."""

BACKEND_OVERSUBSCRIBED_FOR: Final = "15m"
"""PoolwatchBackendOversubscribed: how long the fleet's pools must be allowed more connections
than the backend accepts. Longer than a rolling deploy, during which the old instances and
the new ones both count."""

RUNBOOK_URL: Final = "alerts/runbooks/{alert}.md"
"""Where each alert's runbook lives: point it at your copy of alerts/runbooks, e.g.
``https://git.example.com/ops/poolwatch/blob/main/alerts/runbooks/{alert}.md``."""

GRAFANA_DATASOURCE_UID: Final = "prometheus"
"""The uid of the Prometheus datasource the Grafana-managed copies of the alerts query (the
demo stack provisions its datasource with this uid)."""

GRAFANA_FOLDER: Final = "Connection pools"
"""The Grafana folder holding the Grafana-managed alert rules."""
