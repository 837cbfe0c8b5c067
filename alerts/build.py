"""Render poolwatch's Prometheus recording and alert rules from ``alerts/config.py``.

    python alerts/build.py           # write the rules files
    python alerts/build.py --check   # exit 1 if a committed file is not current

Two outputs from the same definitions: ``alerts/poolwatch.rules.yml`` for Prometheus, and
``deploy/grafana/provisioning/alerting/poolwatch-alerts.yml``, the same alerts as
Grafana-managed alert rules (Grafana's alerting provisioning format).

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


@dataclass(frozen=True)
class Alert:
    """One alert rule and its documentation."""

    name: str
    expr: str
    duration: str
    severity: str
    summary: str
    description: str


def _settings(overrides: dict[str, Any]) -> dict[str, Any]:
    values = {k: v for k, v in vars(config).items() if k.isupper()}
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise KeyError(f"unknown alert settings {unknown}: expected some of {sorted(values)}")
    return {**values, **overrides}


def _rules(s: dict[str, Any]) -> tuple[list[dict[str, str]], list[Alert]]:
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
    ]
    where = (
        "Pool {{ $labels.pool_name }} ({{ $labels.pool_kind }}) of job {{ $labels.job }} "
        "on {{ $labels.instance }}"
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
            f"poolwatch:pool_utilization:ratio >= {s['SATURATED']}\nor\n"
            f"{total('poolwatch_pending_requests')} > 0",
            s["SATURATED_FOR"],
            "critical",
            "A connection pool is saturated: callers are waiting for connections.",
            f"{where} has been saturated for {s['SATURATED_FOR']} (utilization at or above "
            f"{s['SATURATED']:.0%}, or callers waiting; current value "
            '{{ $value | printf "%.2f" }}).',
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
            f"{rate('poolwatch_connections_closed_total', POOL_FULL)} > {s['DISCARD_RATE']}",
            s["DISCARDING_FOR"],
            "warning",
            "A pool keeps opening connections it then discards because it is full.",
            f'{where} has discarded {{{{ $value | printf "%.2f" }}}} connections per second for '
            f"{s['DISCARDING_FOR']} because the pool was full: it is too small for its traffic.",
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
    ]
    return recording, alerts


def alerts(**overrides: Any) -> list[Alert]:
    """The alert rules with ``overrides`` of config.py applied."""
    return _rules(_settings(overrides))[1]


def render(**overrides: Any) -> str:
    """The rules file, as YAML, with ``overrides`` of config.py applied."""
    s = _settings(overrides)
    recording, alert_list = _rules(s)
    document = {
        "groups": [
            {"name": "poolwatch.recording", "rules": recording},
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
                            "description": a.description,
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
            "description": a.description.replace("$value", "$values.A.Value"),
            "runbook_url": s["RUNBOOK_URL"].format(alert=a.name),
        }
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is not current")
    args = parser.parse_args()
    stale = []
    for path, text in ((RULES, render()), (GRAFANA_RULES, render_grafana())):
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
