"""Render poolwatch's Grafana dashboards: ``python dashboards/build.py [--check]``.

Three dashboards, on the one poolwatch metric family, so they cover every pool kind:

* ``poolwatch-overview.json`` — "Connection pools / overview": every pool of the selected
  services and instances, ranked by utilization;
* ``poolwatch-pool.json`` — "Connection pool / detail": one pool in depth;
* ``poolwatch-backends.json`` — "Connection pools / backends": each backend (server) with
  the connections every instance and service holds to it, what their pools may open at
  worst, and the limit declared for it (from the backend recording rules, so load
  ``alerts/poolwatch.rules.yml`` into Prometheus too).

The first two have the variables datasource (any Prometheus), job, instance, kind and pool;
the backends dashboard datasource, address and port. Every panel has a unit and a
description; every rate uses ``$__rate_interval``; no datasource uid is hard-coded.
``tests/test_dashboards.py`` lints that and parses every query with promtool. Thresholds
shared with the alerts (the "above" stats, the recommended size's headroom) are read from
``alerts/config.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent


def _alerts_config() -> ModuleType:
    path = HERE.parent / "alerts" / "config.py"
    spec = importlib.util.spec_from_file_location("poolwatch_dashboards_alerts_config", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config = _alerts_config()
SCHEMA_VERSION = 39
BY = "job, instance, pool_kind, pool_name"
SEL = 'job=~"$job", instance=~"$instance", pool_kind=~"$kind", pool_name=~"$pool"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PROCESS_SEL = 'job=~"$job", instance=~"$instance"'
"""The process view's points describe a process, not a pool: no kind or pool to select."""
BACKEND = "server_address, server_port"
BACKEND_SEL = 'server_address=~"$address", server_port=~"$port"'
"""The backends dashboard selects servers, whichever instances talk to them."""


def _utilization() -> str:
    return (
        f'sum by ({BY}) (poolwatch_connections{{{SEL}, state="used"}})\n'
        f"/\n(sum by ({BY}) (poolwatch_connections_max{{{SEL}}}) > 0)"
    )


def _recommended(headroom: float) -> str:
    used = f'sum(poolwatch_connections{{{SEL}, state="used"}})'
    busy = (
        f"sum(rate(poolwatch_use_duration_seconds_sum{{{SEL}}}[$__rate_interval]))\n+\n"
        f"sum(avg_over_time(poolwatch_pending_requests{{{SEL}}}[$__rate_interval]))"
    )
    return f"(clamp_min(ceil({headroom} * (\n{busy}\n)), 1)\n>= {used})\nor\n{used}"


def _quantile(q: float, metric: str, by: str, *matchers: str) -> str:
    selector = ", ".join((SEL, *matchers))
    return (
        f"histogram_quantile({q}, sum by ({by}, le) "
        f"(rate({metric}_bucket{{{selector}}}[$__rate_interval])))"
    )


def _target(expr: str, legend: str = "", **extra: Any) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, **extra}


class _Layout:
    """Places panels left to right, 24 grid units a row."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def place(self, width: int, height: int) -> dict[str, int]:
        if self.x + width > 24:
            self.x, self.y = 0, self.y + self.row_height
            self.row_height = 0
        pos = {"x": self.x, "y": self.y, "w": width, "h": height}
        self.x += width
        self.row_height = max(self.row_height, height)
        return pos


def _panel(
    layout: _Layout,
    kind: str,
    title: str,
    description: str,
    unit: str,
    *,
    targets: list[dict[str, Any]],
    width: int = 12,
    height: int = 8,
    **options: Any,
) -> dict[str, Any]:
    panel = {
        "id": layout.next_id,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": layout.place(width, height),
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": options,
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
    }
    layout.next_id += 1
    return panel


def _table(
    layout: _Layout,
    title: str,
    description: str,
    columns: dict[str, str],
    *,
    units: dict[str, str] | None = None,
    hide: tuple[str, ...] = (),
    sort_by: str,
) -> dict[str, Any]:
    """An instant table of one row per series, with a column per query (merged by labels):
    a series one query lacks (an unbounded pool's limit) leaves its cell blank."""
    targets = [_target(expr, "", instant=True, format="table") for expr in columns.values()]
    renames = {f"Value #{chr(ord('A') + i)}": name for i, name in enumerate(columns)}
    if len(columns) == 1:
        renames = {"Value": next(iter(columns))}
    excluded = {"Time": True, **{name: True for name in hide}}
    panel = _panel(
        layout,
        "table",
        title,
        description,
        "none",
        targets=targets,
        width=24,
        height=8,
        showHeader=True,
        sortBy=[{"displayName": sort_by, "desc": sort_by not in ("pool_name",)}],
    )
    panel["transformations"] = [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": excluded, "renameByName": renames}},
    ]
    panel["fieldConfig"]["overrides"] = [
        {
            "matcher": {"id": "byName", "options": name},
            "properties": [{"id": "unit", "value": unit}],
        }
        for name, unit in (units or {}).items()
    ]
    return panel


def _variable(name: str, label: str, query: str, multi: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "allValue": ".*" if multi else None,
        "current": {},
    }


_DATASOURCE_VARIABLE = {
    "name": "datasource",
    "label": "Data source",
    "type": "datasource",
    "query": "prometheus",
    "current": {},
}


def _templating(pool_multi: bool) -> dict[str, Any]:
    scope = 'job=~"$job", instance=~"$instance"'
    return {
        "list": [
            dict(_DATASOURCE_VARIABLE),
            _variable("job", "Job", "label_values(poolwatch_connections, job)"),
            _variable(
                "instance", "Instance", 'label_values(poolwatch_connections{job=~"$job"}, instance)'
            ),
            _variable(
                "kind", "Pool kind", f"label_values(poolwatch_connections{{{scope}}}, pool_kind)"
            ),
            _variable(
                "pool",
                "Pool",
                f'label_values(poolwatch_connections{{{scope}, pool_kind=~"$kind"}}, pool_name)',
                multi=pool_multi,
            ),
        ]
    }


def _backend_templating() -> dict[str, Any]:
    return {
        "list": [
            dict(_DATASOURCE_VARIABLE),
            _variable(
                "address",
                "Backend address",
                'label_values(poolwatch_connections{server_address!=""}, server_address)',
            ),
            _variable(
                "port",
                "Backend port",
                'label_values(poolwatch_connections{server_address=~"$address"}, server_port)',
            ),
        ]
    }


def _dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[dict[str, Any]],
    pool_multi: bool,
    *,
    templating: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["poolwatch", "connection-pools"],
        "schemaVersion": SCHEMA_VERSION,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timezone": "",
        "templating": templating or _templating(pool_multi),
        "annotations": {"list": []},
        "links": [
            {
                "title": "Connection pools",
                "type": "dashboards",
                "tags": ["poolwatch"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "panels": panels,
    }


def overview() -> dict[str, Any]:
    """Every selected pool, ranked by utilization."""
    layout = _Layout()
    high = config.UTILIZATION_HIGH
    stat = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"}
    panels = [
        _panel(
            layout,
            "stat",
            f"Pools above {high:.0%}",
            f"Pools whose used connections are above {high:.0%} of their limit now "
            f"(PoolwatchPoolUtilizationHigh fires when this lasts {config.UTILIZATION_HIGH_FOR}; "
            "the threshold is UTILIZATION_HIGH in alerts/config.py).",
            "none",
            targets=[_target(f"count(({_utilization()}) > {high}) or vector(0)")],
            width=6,
            height=4,
            **stat,
        ),
        _panel(
            layout,
            "stat",
            "Timeouts in range",
            "Callers that gave up waiting for a connection in the selected time range: "
            "each was an error for the application.",
            "none",
            targets=[
                _target(f"sum(increase(poolwatch_timeouts_total{{{SEL}}}[$__range])) or vector(0)")
            ],
            width=6,
            height=4,
            **stat,
        ),
        _panel(
            layout,
            "stat",
            "Discards in range",
            "Connections closed because the pool was full, in the selected time range: a "
            "non-blocking pool too small for its traffic opens and throws them away.",
            "none",
            targets=[
                _target(
                    f'sum(increase(poolwatch_connections_closed_total{{{SEL}, reason="pool_full"}}'
                    "[$__range])) or vector(0)"
                )
            ],
            width=6,
            height=4,
            **stat,
        ),
        _panel(
            layout,
            "stat",
            "Active leaks",
            "Checkouts held longer than the leak threshold that are still out now.",
            "none",
            targets=[_target(f"sum(poolwatch_leaks_active{{{SEL}}}) or vector(0)")],
            width=6,
            height=4,
            **stat,
        ),
        _table(
            layout,
            "Pools by utilization",
            "Every selected pool, most utilized first: connections in use and idle, the limit, "
            "and used against the limit now. A pool without a limit (unbounded) is listed "
            "with its limit and utilization blank.",
            {
                "Used": f'sum by ({BY}) (poolwatch_connections{{{SEL}, state="used"}})',
                "Idle": f'sum by ({BY}) (poolwatch_connections{{{SEL}, state="idle"}})',
                "Max": f"sum by ({BY}) (poolwatch_connections_max{{{SEL}}})",
                "Utilization": _utilization(),
            },
            units={"Utilization": "percentunit"},
            sort_by="Utilization",
        ),
        _table(
            layout,
            "Anti-patterns",
            "Anti-patterns poolwatch detected in how each pool is configured or used and still "
            "observes now (the process logged a WARNING with the numbers and the fix when it "
            "found each); PoolwatchPoolAntipattern's runbook explains each. Empty when there "
            "are none.",
            {
                "Pools": f"sum by ({BY}, antipattern) (poolwatch_antipatterns_active{{{SEL}}}) > 0",
            },
            hide=("Pools",),
            sort_by="pool_name",
        ),
        _panel(
            layout,
            "timeseries",
            "Utilization",
            "Used connections as a share of each pool's limit.",
            "percentunit",
            targets=[_target(_utilization(), "{{pool_name}} ({{instance}})")],
        ),
        _panel(
            layout,
            "timeseries",
            "Worst wait p99",
            "The five pools with the slowest 99th-percentile wait for a connection.",
            "s",
            targets=[
                _target(
                    "topk(5, "
                    + _quantile(0.99, "poolwatch_wait_duration_seconds", BY, 'outcome="acquired"')
                    + ")",
                    "{{pool_name}} ({{instance}})",
                )
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Callers waiting",
            "Callers waiting for a connection right now, per pool.",
            "none",
            targets=[
                _target(
                    f"sum by ({BY}) (poolwatch_pending_requests{{{SEL}}})",
                    "{{pool_name}} ({{instance}})",
                )
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Timeouts",
            "Callers per second that gave up waiting for a connection, per pool.",
            "ops",
            targets=[
                _target(
                    f"sum by ({BY}) (rate(poolwatch_timeouts_total{{{SEL}}}[$__rate_interval]))",
                    "{{pool_name}} ({{instance}})",
                )
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Process: file descriptors",
            "Each selected process's open file descriptors against its limit (the process "
            "view, refreshed every 10 s; needs psutil in the process). At the limit, new "
            "connections fail with 'Too many open files'.",
            "none",
            targets=[
                _target(
                    f"sum by (job, instance) (poolwatch_process_file_descriptors{{{PROCESS_SEL}}})",
                    "open ({{instance}})",
                ),
                _target(
                    "sum by (job, instance) "
                    f"(poolwatch_process_file_descriptors_max{{{PROCESS_SEL}}})",
                    "limit ({{instance}})",
                ),
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Process: TCP connections by owner",
            "Each selected process's TCP connections by who holds them: a tracked pool, "
            "nobody poolwatch knows (untracked: a client it does not hook, or a leak outside "
            "any pool), or the process's own listeners (inbound); and by TCP state. "
            "Untracked connections piling up in close_wait are sockets their servers closed "
            "and the process never did.",
            "none",
            targets=[
                _target(
                    "sum by (job, instance, owner, network_connection_state) "
                    f"(poolwatch_process_connections{{{PROCESS_SEL}}})",
                    "{{owner}} {{network_connection_state}} ({{instance}})",
                )
            ],
        ),
    ]
    return _dashboard(
        "poolwatch-overview",
        "Connection pools / overview",
        "Every connection pool of the selected services, ranked by utilization.",
        panels,
        pool_multi=True,
    )


def pool_detail() -> dict[str, Any]:
    """One pool in depth."""
    layout = _Layout()
    wait = "poolwatch_wait_duration_seconds"
    panels = [
        _panel(
            layout,
            "timeseries",
            "Connections",
            "Used and idle connections against the pool's limit, the most idle connections it "
            "keeps (idle max: SQLAlchemy pool_size, httpx max_keepalive_connections, urllib3 "
            "maxsize), and callers waiting.",
            "none",
            targets=[
                _target(f'sum(poolwatch_connections{{{SEL}, state="used"}})', "used"),
                _target(f'sum(poolwatch_connections{{{SEL}, state="idle"}})', "idle"),
                _target(f"sum(poolwatch_connections_max{{{SEL}}})", "max"),
                _target(f"sum(poolwatch_connections_idle_max{{{SEL}}})", "idle max"),
                _target(f"sum(poolwatch_pending_requests{{{SEL}}})", "waiting"),
            ],
            width=24,
        ),
        _panel(
            layout,
            "timeseries",
            "Wait for a connection",
            "Time callers waited for a connection (queue wait, opening one when needed, "
            "pre-ping), 50th, 95th and 99th percentiles. Dots are exemplars: waits poolwatch "
            "traced (pool.wait spans, with tracing on and exemplar storage in Prometheus); "
            "each links to its trace.",
            "s",
            targets=[
                _target(
                    _quantile(q, wait, "pool_name", 'outcome="acquired"'),
                    f"p{int(q * 100)}",
                    exemplar=q == 0.99,
                )
                for q in (0.5, 0.95, 0.99)
            ],
        ),
        _panel(
            layout,
            "heatmap",
            "Wait distribution",
            "How waits for a connection spread over the histogram's buckets.",
            "s",
            targets=[
                _target(
                    f'sum by (le) (increase({wait}_bucket{{{SEL}, outcome="acquired"}}'
                    "[$__rate_interval]))",
                    "{{le}}",
                    format="heatmap",
                )
            ],
            calculate=False,
            yAxis={"unit": "s"},
        ),
        _panel(
            layout,
            "timeseries",
            "Time to open a connection",
            "The driver's or socket's connect, 50th and 99th percentiles, successful connects. "
            "Dots are exemplars: slow connects poolwatch traced (pool.connect spans); each "
            "links to its trace.",
            "s",
            targets=[
                _target(
                    _quantile(q, "poolwatch_connect_duration_seconds", "pool_name", 'outcome="ok"'),
                    f"p{int(q * 100)}",
                    exemplar=q == 0.99,
                )
                for q in (0.5, 0.99)
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Hold time",
            "How long connections were held between checkout and return, "
            "50th and 99th percentiles.",
            "s",
            targets=[
                _target(
                    _quantile(q, "poolwatch_use_duration_seconds", "pool_name"), f"p{int(q * 100)}"
                )
                for q in (0.5, 0.99)
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Timeouts and failures",
            "Callers per second that timed out or failed getting a connection, "
            "and failed connects.",
            "ops",
            targets=[
                _target(
                    f"sum(rate(poolwatch_timeouts_total{{{SEL}}}[$__rate_interval]))", "timeouts"
                ),
                _target(
                    f'sum(rate({wait}_count{{{SEL}, outcome="error"}}[$__rate_interval]))',
                    "wait errors",
                ),
                _target(
                    f'sum(rate(poolwatch_connect_duration_seconds_count{{{SEL}, outcome="error"}}'
                    "[$__rate_interval]))",
                    "connect errors",
                ),
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Connections closed by reason",
            "Connections the pool closed per second: pool_full (a discard), stale, "
            "max_lifetime, idle_expired, invalidated, error, disposed.",
            "ops",
            targets=[
                _target(
                    "sum by (reason) "
                    f"(rate(poolwatch_connections_closed_total{{{SEL}}}[$__rate_interval]))",
                    "{{reason}}",
                )
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Connection lifetime",
            "Age of connections when they were closed, by close reason: 50th, 95th and 99th "
            "percentiles.",
            "s",
            targets=[
                _target(
                    _quantile(q, "poolwatch_connection_lifetime_seconds", "reason"),
                    f"{{{{reason}}}} p{int(q * 100)}",
                )
                for q in (0.5, 0.95, 0.99)
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Connections per host",
            "For pools that span hosts (HTTP pools): used and idle connections by server "
            "address and port.",
            "none",
            targets=[
                _target(
                    "sum by (server_address, server_port) "
                    f'(poolwatch_connections{{{SEL}, state="{state}"}})',
                    f"{{{{server_address}}}}:{{{{server_port}}}} {state}",
                )
                for state in ("used", "idle")
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Connection reuse",
            "Share of checkouts served by a connection that was already open (keep-alive at "
            "work); the others opened a new one. Near 1 for a healthy pool; near 0 when a "
            "client is made per request or the server closes every connection.",
            "percentunit",
            targets=[
                _target(
                    f"sum(rate(poolwatch_checkouts_reused_total{{{SEL}}}[$__rate_interval]))\n/\n"
                    f'(sum(rate({wait}_count{{{SEL}, outcome="acquired"}}[$__rate_interval])) > 0)',
                    "reused",
                )
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Recommended size vs max",
            f"Little's law: connections busy on average (the rate of hold-seconds) plus callers "
            f"waiting on average, x {config.HEADROOM} headroom (HEADROOM in alerts/config.py), "
            "never below the connections in use; against the pool's limit and its use now.",
            "none",
            targets=[
                _target(_recommended(config.HEADROOM), "recommended"),
                _target(f"sum(poolwatch_connections_max{{{SEL}}})", "max"),
                _target(f'sum(poolwatch_connections{{{SEL}, state="used"}})', "used"),
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Leaks",
            "Checkouts held past the leak threshold still out now, and new ones per second.",
            "none",
            targets=[
                _target(f"sum(poolwatch_leaks_active{{{SEL}}})", "active"),
                _target(
                    f"sum(rate(poolwatch_leaks_total{{{SEL}}}[$__rate_interval]))", "new per second"
                ),
            ],
        ),
    ]
    return _dashboard(
        "poolwatch-pool",
        "Connection pool / detail",
        "One connection pool in depth: levels, waits, connects, hold times, closes and leaks.",
        panels,
        pool_multi=False,
    )


def backends() -> dict[str, Any]:
    """Each backend: every instance's connections to it, the worst case, the limit."""
    layout = _Layout()
    near = config.BACKEND_NEAR_LIMIT
    stat = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"}
    worst = f"poolwatch:backend_connections_worst_case:sum{{{BACKEND_SEL}}}"
    limit = f"poolwatch:backend_connections_limit:min{{{BACKEND_SEL}}}"
    connections = f"poolwatch:backend_connections:sum{{{BACKEND_SEL}}}"
    held = f"poolwatch_connections{{{BACKEND_SEL}}}"
    legend = "{{server_address}}:{{server_port}}"
    panels = [
        _panel(
            layout,
            "stat",
            "Backends oversubscribed",
            "Backends whose pools, summed over every instance and service talking to them, may "
            "open more connections than the limit declared for them (server_limits): "
            "PoolwatchBackendOversubscribed fires when this lasts "
            f"{config.BACKEND_OVERSUBSCRIBED_FOR}.",
            "none",
            targets=[_target(f"count({worst} > {limit}) or vector(0)")],
            width=6,
            height=4,
            **stat,
        ),
        _panel(
            layout,
            "stat",
            f"Backends above {near:.0%}",
            f"Backends with more than {near:.0%} of their declared limit open from every "
            "instance now (PoolwatchBackendNearLimit fires when this lasts "
            f"{config.BACKEND_NEAR_LIMIT_FOR}; the threshold is BACKEND_NEAR_LIMIT in "
            "alerts/config.py).",
            "none",
            targets=[
                _target(
                    f"count(poolwatch:backend_utilization:ratio{{{BACKEND_SEL}}} > {near}) "
                    "or vector(0)"
                )
            ],
            width=6,
            height=4,
            **stat,
        ),
        _panel(
            layout,
            "stat",
            "Pools without a limit",
            "Pools with no connection limit that have connections open to the selected "
            "backends: each makes its backends' worst case unbounded.",
            "none",
            targets=[
                _target(
                    f"sum(poolwatch:backend_unbounded_pools:count{{{BACKEND_SEL}}}) or vector(0)"
                )
            ],
            width=6,
            height=4,
            **stat,
        ),
        _panel(
            layout,
            "stat",
            "Callers waiting",
            "Callers waiting for a connection to the selected backends now, over every instance.",
            "none",
            targets=[
                _target(
                    f"sum(poolwatch:backend_pending_requests:sum{{{BACKEND_SEL}}}) or vector(0)"
                )
            ],
            width=6,
            height=4,
            **stat,
        ),
        _table(
            layout,
            "Backends",
            "Each backend, most used first: connections open to it from every instance "
            "(used and idle), what the pools talking to it may open at worst (the sum of "
            "their limits; unbounded when one has none), the limit declared for it "
            "(server_limits, the lowest when processes disagree), connections against that "
            "limit, pools without a limit, callers waiting, and the instances and services "
            "holding connections. A backend with no declared limit has Limit and "
            "Utilization blank.",
            {
                "Connections": connections,
                "Worst case": worst,
                "Limit": limit,
                "Utilization": f"poolwatch:backend_utilization:ratio{{{BACKEND_SEL}}}",
                "Unbounded pools": f"poolwatch:backend_unbounded_pools:count{{{BACKEND_SEL}}}",
                "Waiting": f"poolwatch:backend_pending_requests:sum{{{BACKEND_SEL}}}",
                "Instances": f"count by ({BACKEND}) "
                f"(sum by ({BACKEND}, job, instance) ({held}) > 0)",
                "Services": f"count by ({BACKEND}) (sum by ({BACKEND}, job) ({held}) > 0)",
            },
            units={"Utilization": "percentunit"},
            sort_by="Utilization",
        ),
        _panel(
            layout,
            "timeseries",
            "Connections against the limit",
            "Connections open to each backend from every instance, the limit declared for it, "
            "and what the pools talking to it may open at worst (not drawn when unbounded).",
            "none",
            targets=[
                _target(connections, f"{legend} open"),
                _target(limit, f"{legend} limit"),
                _target(f"{worst} < +Inf", f"{legend} worst case"),
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Utilization of the limit",
            "Connections open to each backend from every instance, as a share of its declared "
            f"limit (PoolwatchBackendNearLimit: above {near:.0%}).",
            "percentunit",
            targets=[_target(f"poolwatch:backend_utilization:ratio{{{BACKEND_SEL}}}", legend)],
        ),
        _panel(
            layout,
            "timeseries",
            "Connections by service",
            "Connections open to each backend, by the service (job) holding them, summed over "
            "its instances.",
            "none",
            targets=[
                _target(f"sum by ({BACKEND}, job) ({held})", f"{{{{job}}}} → {legend}"),
            ],
        ),
        _panel(
            layout,
            "timeseries",
            "Callers waiting by backend",
            "Callers waiting for a connection to each backend, over every instance.",
            "none",
            targets=[
                _target(f"poolwatch:backend_pending_requests:sum{{{BACKEND_SEL}}}", legend),
            ],
        ),
        _table(
            layout,
            "Instances holding connections",
            "Every instance with connections to the selected backends, most first: used and "
            "idle connections, and callers waiting.",
            {
                "Connections": f"sort_desc(sum by ({BACKEND}, job, instance) ({held}))",
                "Used": f"sum by ({BACKEND}, job, instance) "
                f'(poolwatch_connections{{{BACKEND_SEL}, state="used"}})',
                "Idle": f"sum by ({BACKEND}, job, instance) "
                f'(poolwatch_connections{{{BACKEND_SEL}, state="idle"}})',
                "Waiting": f"sum by ({BACKEND}, job, instance) "
                f"(poolwatch_pending_requests{{{BACKEND_SEL}}})",
            },
            sort_by="Connections",
        ),
        _table(
            layout,
            "Top pools by share",
            "The ten pools (each service's pool, summed over its instances) holding the "
            "largest share of each backend's connections, with their connections and their "
            "limits summed (blank for a pool spanning servers, whose limit is not per server, "
            "and for one without a limit).",
            {
                "Share": f"topk by ({BACKEND}) (10, sum by ({BACKEND}, job, pool_kind, pool_name) "
                f"({held})\n/ on ({BACKEND}) group_left ()\n({connections} > 0))",
                "Connections": f"sum by ({BACKEND}, job, pool_kind, pool_name) ({held})",
                "Limits": f"sum by ({BACKEND}, job, pool_kind, pool_name) "
                f"(poolwatch_connections_max{{{BACKEND_SEL}}})",
            },
            units={"Share": "percentunit"},
            sort_by="Share",
        ),
    ]
    for panel in panels:
        if panel["title"] == "Backends":  # +Inf, as Prometheus returns it, is "unbounded"
            panel["fieldConfig"]["overrides"].append(
                {
                    "matcher": {"id": "byName", "options": "Worst case"},
                    "properties": [
                        {
                            "id": "mappings",
                            "value": [
                                {
                                    "type": "range",
                                    "options": {
                                        "from": 1e300,
                                        "to": None,
                                        "result": {"text": "unbounded"},
                                    },
                                }
                            ],
                        }
                    ],
                }
            )
    return _dashboard(
        "poolwatch-backends",
        "Connection pools / backends",
        "Each backend (server) with the connections every instance and service holds to it, "
        "what their pools may open at worst, and the limit declared for it.",
        panels,
        pool_multi=True,
        templating=_backend_templating(),
    )


DASHBOARDS = {
    "poolwatch-overview.json": overview,
    "poolwatch-pool.json": pool_detail,
    "poolwatch-backends.json": backends,
}


def render(name: str) -> str:
    """One dashboard as the JSON file holds it."""
    return json.dumps(DASHBOARDS[name](), indent=2, sort_keys=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is not current")
    args = parser.parse_args()
    stale = []
    for name in DASHBOARDS:
        path, text = HERE / name, render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"not current: {', '.join(stale)}: run python dashboards/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
