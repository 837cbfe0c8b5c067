"""Render poolwatch's Prometheus recording and alert rules from ``alerts/config.py``.

    python alerts/build.py           # write the rules files
    python alerts/build.py --check   # exit 1 if a committed file is not current

Three outputs from the same definitions: ``alerts/poolwatch.rules.yml`` for Prometheus,
``deploy/grafana/provisioning/alerting/poolwatch-alerts.yml``, the same alerts as
Grafana-managed alert rules (Grafana's alerting provisioning format), and
``poolwatch/diagnostics/thresholds.py``, the thresholds ``poolwatch doctor`` and ``top`` share with
the alerts.

Every rule is built on the one poolwatch metric family, so it covers every pool kind.
Tests (and an end-to-end run wanting short durations) call ``render(**overrides)`` with
any setting of config.py replaced.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "poolwatch.rules.yml"
GRAFANA_RULES = HERE.parent / "deploy/grafana/provisioning/alerting/poolwatch-alerts.yml"
THRESHOLDS = HERE.parent / "poolwatch/diagnostics/thresholds.py"
SHARED = {  # the settings the package's commands use, and what they use them for
    "UTILIZATION_HIGH": "Utilization from which top shows a pool yellow, doctor reports it high.",
    "SATURATED": "Utilization from which top shows a pool red and doctor reports it saturated.",
    "DISCARD_RATIO": "pool_full closes per checkout above which doctor reports discards...",
    "DISCARD_RATE": "... when there are more than this many per second, too.",
    "CHURN_RATIO": "New connections per checkout above which doctor reports churn...",
    "CHURN_MIN_CHECKOUTS": "... at this many checkouts per second or more.",
    "HEADROOM": "doctor's recommended size: connections busy on average times this.",
}


def _load_config() -> ModuleType:
    spec = importlib.util.spec_from_file_location("poolwatch_alerts_config", HERE / "config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config = _load_config()


ACQUIRED = 'outcome="acquired"'
CONNECTED = 'outcome="ok"'
USED = 'state="used"'
POOL_FULL = 'reason="pool_full"'


POOL = ("job", "instance", "pool_kind", "pool_name")
"""One pool of one process, whatever AGGREGATE_BY says: the backend rules join a pool's
limit to the backends it talks to, which needs each pool's own series."""


@dataclass(frozen=True)
class Alert:
    """One alert rule and its documentation."""

    name: str
    expr: str
    duration: str
    severity: str
    summary: str
    description: str
    lookups: tuple[tuple[str, str], ...] = ()
    """(template variable, recording rule): the description's ``{{ $variable }}`` is that
    rule's value for the alert's labels (of BACKEND_BY), looked up when it is rendered."""


def _settings(overrides: dict[str, Any]) -> dict[str, Any]:
    values = {k: v for k, v in vars(config).items() if k.isupper()}
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise KeyError(f"unknown alert settings {unknown}: expected some of {sorted(values)}")
    return {**values, **overrides}


def _rules(s: dict[str, Any]) -> tuple[dict[str, list[dict[str, str]]], list[Alert]]:
    """The recording rules by group, and the alerts."""
    by = ", ".join(s["AGGREGATE_BY"])
    window = s["RATE_WINDOW"]

    def sel(*matchers: str) -> str:
        chosen = [m for m in (s["SELECTOR"], *matchers) if m]
        return "{" + ", ".join(chosen) + "}" if chosen else ""

    def total(metric: str, *matchers: str) -> str:
        return f"sum by ({by}) ({metric}{sel(*matchers)})"

    def rate(metric: str, *matchers: str) -> str:
        return f"sum by ({by}) (rate({metric}{sel(*matchers)}[{window}]))"

    def quantile(q: float) -> str:
        buckets = "poolwatch_wait_duration_seconds_bucket" + sel(ACQUIRED)
        return f"histogram_quantile({q}, sum by ({by}, le) (rate({buckets}[{window}])))"

    used = total("poolwatch_connections", USED)
    pending = total("poolwatch_pending_requests")
    # Little's law: the rate of hold-seconds is the number of connections busy on average;
    # callers waiting on average want one each too.
    busy = (
        f"{rate('poolwatch_use_duration_seconds_sum')}\n+\n"
        f"sum by ({by}) (avg_over_time(poolwatch_pending_requests{sel()}[{window}]))"
    )
    recommended = f"clamp_min(ceil({s['HEADROOM']} * (\n{busy}\n)), 1)"

    recording = [
        {
            "record": "poolwatch:pool_utilization:ratio",
            # The limit filtered to > 0: a pool with max 0 has no utilization (not +Inf).
            "expr": f"{total('poolwatch_connections', USED)}\n"
            f"/\n({total('poolwatch_connections_max')} > 0)",
        },
        *(
            {"record": f"poolwatch:wait_duration_seconds:p{int(q * 100)}", "expr": quantile(q)}
            for q in (0.5, 0.95, 0.99)
        ),
        {
            "record": "poolwatch:checkouts:rate",
            "expr": rate("poolwatch_wait_duration_seconds_count", ACQUIRED),
        },
        {
            "record": "poolwatch:connects:rate",
            "expr": rate("poolwatch_connect_duration_seconds_count", CONNECTED),
        },
        {
            # Checkouts served by a connection already open, over all checkouts.
            "record": "poolwatch:checkout_reuse:ratio",
            "expr": f"{rate('poolwatch_checkouts_reused_total')}\n/\n"
            f"({rate('poolwatch_wait_duration_seconds_count', ACQUIRED)} > 0)",
        },
        {
            # Connections in use plus callers waiting, over the limit: above 1, callers wait.
            "record": "poolwatch:pool_demand:ratio",
            "expr": f"({used}\n+\n{pending})\n/\n({total('poolwatch_connections_max')} > 0)",
        },
        {
            # HEADROOM x connections busy on average, never below the connections in use now.
            "record": "poolwatch:pool_size:recommended",
            "expr": f"({recommended}\n>= {used})\nor\n{used}",
        },
    ]
    backends = _backend_rules(s, sel)
    where = (
        "Pool {{ $labels.pool_name }} ({{ $labels.pool_kind }}) of job {{ $labels.job }} "
        "on {{ $labels.instance }}"
    )
    discards = rate("poolwatch_connections_closed_total", POOL_FULL)
    antipatterns = f"poolwatch_antipatterns_active{sel()}"
    backend = ":".join(f"{{{{ $labels.{label} }}}}" for label in s["BACKEND_BY"])
    worst_case = (
        "{{ if gt $value 1e300 }}any number of connections (a pool without a limit talks to "
        'it){{ else }}{{ $value | printf "%.0f" }} connections together{{ end }}'
    )
    alerts = [
        Alert(
            "PoolwatchPoolUtilizationHigh",
            f"poolwatch:pool_utilization:ratio > {s['UTILIZATION_HIGH']}",
            s["UTILIZATION_HIGH_FOR"],
            "warning",
            "A connection pool is running close to its limit.",
            f"{where} has used {{{{ $value | humanizePercentage }}}} of its connections for "
            f"{s['UTILIZATION_HIGH_FOR']} (threshold {s['UTILIZATION_HIGH']:.0%}).",
        ),
        Alert(
            "PoolwatchPoolSaturated",
            # The value is always the demand ratio, whichever condition holds.
            f"poolwatch:pool_demand:ratio >= {s['SATURATED']}\nor\n"
            f"(poolwatch:pool_demand:ratio and {pending} > 0)",
            s["SATURATED_FOR"],
            "critical",
            "A connection pool is saturated: callers are waiting for connections.",
            f"{where} has been saturated for {s['SATURATED_FOR']}: connections in use plus "
            "callers waiting are {{ $value | humanizePercentage }} of its limit (threshold "
            f"{s['SATURATED']:.0%}, or any caller waiting).",
        ),
        Alert(
            "PoolwatchPoolExhausted",
            f"sum by ({by}) (increase(poolwatch_timeouts_total{sel()}[{window}])) > 0",
            s["EXHAUSTED_FOR"],
            "critical",
            "Callers are timing out waiting for a connection from a pool.",
            f'{where} timed out {{{{ $value | printf "%.0f" }}}} callers in the last {window}: '
            "the pool is exhausted.",
        ),
        Alert(
            "PoolwatchPoolDiscarding",
            f"{discards}\n/\n(poolwatch:checkouts:rate > 0)\n> {s['DISCARD_RATIO']}\n"
            f"and\n{discards}\n> {s['DISCARD_RATE']}",
            s["DISCARDING_FOR"],
            "warning",
            "A pool keeps opening connections it then discards because it is full.",
            f"{where} has thrown away a connection for {{{{ $value | humanizePercentage }}}} of "
            f"its checkouts for {s['DISCARDING_FOR']} (threshold {s['DISCARD_RATIO']:.0%}, at "
            f"more than {s['DISCARD_RATE']}/s): opened past its size and closed on return "
            "because the pool was full, it is too small for its traffic.",
        ),
        Alert(
            "PoolwatchSlowAcquire",
            f"poolwatch:wait_duration_seconds:p99 > {s['SLOW_ACQUIRE_P99']}",
            s["SLOW_ACQUIRE_FOR"],
            "warning",
            "Getting a connection from a pool is slow.",
            f"{where} has a p99 wait for a connection of {{{{ $value | humanizeDuration }}}} "
            f"(threshold {s['SLOW_ACQUIRE_P99']}s) for {s['SLOW_ACQUIRE_FOR']}.",
        ),
        Alert(
            "PoolwatchConnectionChurn",
            f"poolwatch:connects:rate / poolwatch:checkouts:rate > {s['CHURN_RATIO']}\n"
            f"and\npoolwatch:checkouts:rate >= {s['CHURN_MIN_CHECKOUTS']}",
            s["CHURN_FOR"],
            "warning",
            "A pool opens new connections for a large share of its checkouts.",
            f'{where} opened {{{{ $value | printf "%.2f" }}}} new connections per checkout for '
            f"{s['CHURN_FOR']}: connections are not being reused.",
        ),
        Alert(
            "PoolwatchConnectionLeak",
            f"{total('poolwatch_leaks_active')} > 0",
            s["LEAK_FOR"],
            "warning",
            "Connections are checked out of a pool for longer than the leak threshold.",
            f'{where} has {{{{ $value | printf "%.0f" }}}} checkouts held past the leak threshold '
            f"for {s['LEAK_FOR']}.",
        ),
        Alert(
            "PoolwatchPoolAntipattern",
            f"sum by ({by}, antipattern) ({antipatterns}) > 0",
            s["ANTIPATTERN_FOR"],
            "info",
            "A pool shows an anti-pattern in how it is configured or used.",
            f"{where} shows the anti-pattern {{{{ $labels.antipattern }}}} now (pools showing "
            'it: {{ $value | printf "%.0f" }}; the alert resolves once it stops): the runbook '
            "says what it means and how to fix it.",
        ),
        Alert(
            "PoolwatchBackendOversubscribed",
            "poolwatch:backend_connections_worst_case:sum\n"
            "> poolwatch:backend_connections_limit:min",
            s["BACKEND_OVERSUBSCRIBED_FOR"],
            "warning",
            "The fleet's pools may open more connections to a backend than it accepts.",
            f"The pools of every instance that talks to {backend} may open {worst_case}, "
            "more than the {{ $limit }} it accepts, and have been allowed to for "
            f"{s['BACKEND_OVERSUBSCRIBED_FOR']}: when they are all busy at once, new "
            "connections fail at the backend, whatever each pool's own health.",
            (("limit", "poolwatch:backend_connections_limit:min"),),
        ),
        Alert(
            "PoolwatchBackendNearLimit",
            f"poolwatch:backend_utilization:ratio > {s['BACKEND_NEAR_LIMIT']}",
            s["BACKEND_NEAR_LIMIT_FOR"],
            "warning",
            "Connections open to a backend are close to its limit.",
            f"Connections open to {backend} from every instance have been "
            "{{ $value | humanizePercentage }} of its limit of {{ $limit }} for "
            f"{s['BACKEND_NEAR_LIMIT_FOR']} (threshold {s['BACKEND_NEAR_LIMIT']:.0%}).",
            (("limit", "poolwatch:backend_connections_limit:min"),),
        ),
    ]
    return {"poolwatch.recording": recording, "poolwatch.backends": backends}, alerts


def _backend_rules(s: dict[str, Any], sel: Any) -> list[dict[str, str]]:
    """Backend level: every instance's pools summed per backend (BACKEND_BY), against the
    limit declared for it.

    A pool talks to a backend when its points carry the backend's ``server_address``: a pool
    of one server (SQLAlchemy, urllib3) has it on every point, its limit included; a pool
    spanning servers (httpx, aiohttp) has it on its connections per server, and its one
    limit counts in full for each server it has connections to (it could open all of them
    there). A pool with no limit counts as +Inf for the backends it has connections open
    to: a series kept with no pool alive (exported with nothing open and no limit, for
    RETENTION after its pools are gone) is not mistaken for one.
    """
    backend = ", ".join(s["BACKEND_BY"])
    pool = ", ".join(POOL)
    pair = f"{pool}, {backend}"
    at = 'server_address!=""'
    connections = f"poolwatch_connections{sel(at)}"
    bounded_one_server = f"sum by ({pair}) (poolwatch_connections_max{sel(at)})"
    spanning = 'server_address=""'  # a pool spanning servers: its limit has none
    bounded_spanning = (
        f"group by ({pair}) ({connections})\n  * on ({pool}) group_left\n"
        f"sum by ({pool}) (poolwatch_connections_max{sel(spanning)})"
    )
    open_pairs = f"(sum by ({pair}) ({connections}) > 0)"
    unbounded = f"{open_pairs}\n  unless on ({pool}) poolwatch_connections_max{sel()}"
    return [
        {
            # Connections open to each backend (used and idle), over every instance.
            "record": "poolwatch:backend_connections:sum",
            "expr": f"sum by ({backend}) ({connections})",
        },
        {
            # What the fleet's pools may open to it at most: the sum of their limits; +Inf
            # when a pool without a limit talks to it.
            "record": "poolwatch:backend_connections_worst_case:sum",
            "expr": f"sum by ({backend}) (\n{bounded_one_server}\nor\n{bounded_spanning}\n"
            f"or\n({unbounded}) * Inf\n)",
        },
        {
            # Pools without a limit that have connections open to it (absent when none).
            "record": "poolwatch:backend_unbounded_pools:count",
            "expr": f"count by ({backend}) (\n{unbounded}\n)",
        },
        {
            # The limit declared for it (server_limits); the lowest when instances disagree.
            "record": "poolwatch:backend_connections_limit:min",
            "expr": f"min by ({backend}) (poolwatch_server_connections_limit{sel()})",
        },
        {
            "record": "poolwatch:backend_utilization:ratio",
            "expr": "poolwatch:backend_connections:sum\n/\npoolwatch:backend_connections_limit:min",
        },
        {
            # Callers waiting for a connection to it, over every instance.
            "record": "poolwatch:backend_pending_requests:sum",
            "expr": f"sum by ({backend}) (poolwatch_pending_requests{sel(at)})",
        },
    ]


def alerts(**overrides: Any) -> list[Alert]:
    """The alert rules with ``overrides`` of config.py applied."""
    return _rules(_settings(overrides))[1]


def lookups_for_prometheus(alert: Alert, **overrides: Any) -> str:
    """The template that sets each of ``alert.lookups`` for Prometheus (its ``query``
    function, on the alert's BACKEND_BY labels); "?" when the rule has no value."""
    by = _settings(overrides)["BACKEND_BY"]
    matchers = ", ".join(f"{label}=%q" for label in by)
    arguments = " ".join(f"$labels.{label}" for label in by)
    return "".join(
        f'{{{{ ${variable} := "?" }}}}{{{{ with printf "{rule}{{{matchers}}}" {arguments} '
        f'| query }}}}{{{{ ${variable} = . | first | value | printf "%.0f" }}}}{{{{ end }}}}'
        for variable, rule in alert.lookups
    )


def lookups_for_grafana(alert: Alert) -> str:
    """The same for Grafana, where each lookup is a query of the rule (refId L, M, …) whose
    series Grafana matches to the alert's by labels."""
    return "".join(
        f'{{{{ ${variable} := printf "%.0f" $values.{chr(ord("L") + i)}.Value }}}}'
        for i, (variable, _) in enumerate(alert.lookups)
    )


def render(**overrides: Any) -> str:
    """The rules file, as YAML, with ``overrides`` of config.py applied."""
    s = _settings(overrides)
    recording, alert_list = _rules(s)
    document = {
        "groups": [
            *({"name": name, "rules": rules} for name, rules in recording.items()),
            {
                "name": "poolwatch.alerts",
                "rules": [
                    {
                        "alert": a.name,
                        "expr": a.expr,
                        "for": a.duration,
                        "labels": {"severity": a.severity},
                        "annotations": {
                            "summary": a.summary,
                            "description": lookups_for_prometheus(a, **overrides) + a.description,
                            "runbook_url": s["RUNBOOK_URL"].format(alert=a.name),
                        },
                    }
                    for a in alert_list
                ],
            },
        ]
    }
    header = "# Generated by alerts/build.py from alerts/config.py: edit those, not this file.\n"
    return header + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(duration[:-1]) * units[duration[-1]]


def render_grafana(**overrides: Any) -> str:
    """The alerts as Grafana-managed alert rules (provisioning file), same thresholds.

    Query A is the alert's PromQL, which already holds its comparison; condition B fires
    when A returns a positive value. Grafana templates read A's value as
    ``$values.A.Value`` where Prometheus templates read ``$value``.
    """
    s = _settings(overrides)
    _, alert_list = _rules(s)
    window = _seconds(s["RATE_WINDOW"])
    rules = []
    for a in alert_list:
        annotations = {
            "summary": a.summary,
            "description": lookups_for_grafana(a)
            + a.description.replace("$value", "$values.A.Value"),
            "runbook_url": s["RUNBOOK_URL"].format(alert=a.name),
        }
        lookups = [
            {
                "refId": chr(ord("L") + i),
                "relativeTimeRange": {"from": window * 2, "to": 0},
                "datasourceUid": s["GRAFANA_DATASOURCE_UID"],
                "model": {"refId": chr(ord("L") + i), "expr": rule, "instant": True},
            }
            for i, (_, rule) in enumerate(a.lookups)
        ]
        rules.append(
            {
                "uid": "poolwatch-"
                + "".join(f"-{ch.lower()}" if ch.isupper() else ch for ch in a.name[9:]).lstrip(
                    "-"
                ),
                "title": a.name,
                "condition": "B",
                "data": [
                    {
                        "refId": "A",
                        "relativeTimeRange": {"from": window * 2, "to": 0},
                        "datasourceUid": s["GRAFANA_DATASOURCE_UID"],
                        "model": {"refId": "A", "expr": a.expr, "instant": True},
                    },
                    {
                        "refId": "B",
                        "datasourceUid": "__expr__",
                        "model": {
                            "refId": "B",
                            "type": "threshold",
                            "expression": "A",
                            "conditions": [{"evaluator": {"type": "gt", "params": [0]}}],
                        },
                    },
                    *lookups,
                ],
                "for": a.duration,
                "noDataState": "OK",
                "execErrState": "Error",
                "labels": {"severity": a.severity},
                "annotations": annotations,
            }
        )
    document = {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": "poolwatch",
                "folder": s["GRAFANA_FOLDER"],
                "interval": "1m",
                "rules": rules,
            }
        ],
    }
    header = "# Generated by alerts/build.py from alerts/config.py: edit those, not this file.\n"
    return header + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_thresholds(**overrides: Any) -> str:
    """``poolwatch/diagnostics/thresholds.py``: the settings the package's commands share
    (SHARED)."""
    s = _settings(overrides)
    lines = [
        '"""The alert thresholds poolwatch\'s own commands judge pools by (doctor, top).',
        "",
        "Generated by alerts/build.py from alerts/config.py: edit that, not this file. The",
        "commands then say what the alerts would.",
        '"""',
        "",
        "from typing import Final",
        "",
    ]
    for name, use in SHARED.items():
        lines += [f"{name}: Final = {s[name]!r}", f'"""{use}"""']
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is not current")
    args = parser.parse_args()
    stale = []
    outputs = (
        (RULES, render()),
        (GRAFANA_RULES, render_grafana()),
        (THRESHOLDS, render_thresholds()),
    )
    for path, text in outputs:
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"not current: {', '.join(stale)}: run python alerts/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
