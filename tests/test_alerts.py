"""Alert and recording rules: current, valid, unit-tested by promtool, documented.

promtool comes from Debian's prometheus package; the test command installs it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ALERTS = Path(__file__).resolve().parent.parent / "alerts"
RULES = ALERTS / "poolwatch.rules.yml"
UNIT_TESTS = ALERTS / "tests" / "poolwatch.rules.test.yml"

ALERT_NAMES = [
    "PoolwatchPoolUtilizationHigh",
    "PoolwatchPoolSaturated",
    "PoolwatchPoolExhausted",
    "PoolwatchPoolDiscarding",
    "PoolwatchSlowAcquire",
    "PoolwatchConnectionChurn",
    "PoolwatchConnectionLeak",
    "PoolwatchPoolAntipattern",
    "PoolwatchBackendOversubscribed",
    "PoolwatchBackendNearLimit",
]
POOL_ALERTS = ALERT_NAMES[:8]
BACKEND_ALERTS = ALERT_NAMES[8:]
RECORDING_RULES = [
    "poolwatch:pool_utilization:ratio",
    "poolwatch:wait_duration_seconds:p50",
    "poolwatch:wait_duration_seconds:p95",
    "poolwatch:wait_duration_seconds:p99",
    "poolwatch:checkouts:rate",
    "poolwatch:connects:rate",
    "poolwatch:checkout_reuse:ratio",
    "poolwatch:pool_demand:ratio",
    "poolwatch:pool_size:recommended",
    "poolwatch:backend_connections:sum",
    "poolwatch:backend_connections_worst_case:sum",
    "poolwatch:backend_unbounded_pools:count",
    "poolwatch:backend_connections_limit:min",
    "poolwatch:backend_utilization:ratio",
    "poolwatch:backend_pending_requests:sum",
]


def _build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("poolwatch_alerts_build", ALERTS / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _promtool(*args: str, cwd: Path = ALERTS) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's prometheus package (scripts/test does)"
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _rules() -> dict[str, dict[str, object]]:
    document = yaml.safe_load(RULES.read_text())
    return {
        str(rule.get("alert") or rule.get("record")): rule
        for group in document["groups"]
        for rule in group["rules"]
    }


def test_the_rules_file_is_rendered_from_the_config() -> None:
    result = subprocess.run(
        [sys.executable, str(ALERTS / "build.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 25 rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("setting", "value", "alert"),
    [
        ("UTILIZATION_HIGH", 0.91, "PoolwatchPoolUtilizationHigh"),  # 90% no longer fires
        ("SATURATED", 0.94, "PoolwatchPoolSaturated"),  # 94 of 100 now fires
        ("DISCARD_RATIO", 0.09, "PoolwatchPoolDiscarding"),  # exactly 10% now fires
        ("DISCARD_RATE", 0.09, "PoolwatchPoolDiscarding"),  # 0.1/s now fires
        ("CHURN_RATIO", 0.49, "PoolwatchConnectionChurn"),  # exactly 0.5 now fires
        ("HEADROOM", 2.0, "poolwatch:pool_size:recommended"),  # 12 becomes 16
        ("BACKEND_NEAR_LIMIT", 0.79, "PoolwatchBackendNearLimit"),  # exactly 80% now fires
        ("BACKEND_NEAR_LIMIT", 0.83, "PoolwatchBackendNearLimit"),  # 82.5% no longer fires
        ("BACKEND_OVERSUBSCRIBED_FOR", "20m", "PoolwatchBackendOversubscribed"),
    ],
)
def test_the_unit_tests_notice_a_changed_threshold(
    tmp_path: Path, setting: str, value: float, alert: str
) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "poolwatch.rules.yml").write_text(_build().render(**{setting: value}))
    shutil.copy(UNIT_TESTS, tmp_path / "tests" / UNIT_TESTS.name)
    result = _promtool("test", "rules", str(tmp_path / "tests" / UNIT_TESTS.name), cwd=tmp_path)
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr


def test_rule_names_are_pinned() -> None:
    assert list(_rules()) == RECORDING_RULES + ALERT_NAMES


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_every_alert_follows_the_mixin_conventions(name: str) -> None:
    rule = _rules()[name]
    labels = rule["labels"]
    annotations = rule["annotations"]
    assert isinstance(labels, dict) and isinstance(annotations, dict)
    assert labels["severity"] in ("info", "warning", "critical")
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert "{{" not in annotations["summary"]
    if name in POOL_ALERTS:
        parts: tuple[str, ...] = ("$labels.job", "$labels.instance", "$labels.pool_name")
    else:  # a backend, whichever instances talk to it
        parts = ("$labels.server_address", "$labels.server_port")
    for part in (*parts, "$value"):
        assert part in annotations["description"]
    assert annotations["runbook_url"] == f"alerts/runbooks/{name}.md"
    runbook = ALERTS / "runbooks" / f"{name}.md"
    text = runbook.read_text()
    for section in ("Meaning", "Impact", "Diagnosis", "Mitigation"):
        assert f"## {section}" in text, f"{runbook.name} lacks a {section} section"
    diagnosis = text.split("## Diagnosis", 1)[1].split("\n## ", 1)[0]
    for command in ("poolwatch top --url http://<instance>/metrics", "poolwatch doctor --url"):
        assert command in diagnosis, f"{runbook.name}: Diagnosis does not use {command}"


def test_the_antipattern_runbook_explains_every_antipattern() -> None:
    from poolwatch import _catalogue

    text = (ALERTS / "runbooks" / "PoolwatchPoolAntipattern.md").read_text()
    sections = text.split("\n### ")[1:]
    assert [section.split("\n", 1)[0].strip("`") for section in sections] == list(
        _catalogue.ANTIPATTERNS
    )
    for section in sections:
        for part in ("Meaning", "Impact", "Diagnosis", "Mitigation"):
            assert f"**{part}.**" in section, (section.split("\n", 1)[0], part)


def test_doctor_and_top_judge_by_the_alerts_thresholds() -> None:
    from poolwatch.cli import top as _top
    from poolwatch.diagnostics import advice as _advice
    from poolwatch.diagnostics import thresholds as _thresholds

    config = _build().config
    assert {name: getattr(_thresholds, name) for name in _build().SHARED} == {
        name: getattr(config, name) for name in _build().SHARED
    }
    assert (_top.WARN_AT, _top.CRITICAL_AT) == (config.UTILIZATION_HIGH, config.SATURATED)
    assert (_advice.HIGH_UTILIZATION, _advice.SATURATED_UTILIZATION) == (0.8, 0.95)
    assert (_advice.DISCARD_RATIO, _advice.DISCARD_RATE, _advice.HEADROOM) == (0.1, 0.1, 1.5)
    assert (_advice.CHURN_RATIO, _advice.CHURN_MIN_RATE) == (0.5, 1.0)
    assert _build().render_thresholds(UTILIZATION_HIGH=0.7).count("UTILIZATION_HIGH: Final = 0.7")


def test_durations_and_thresholds_come_from_the_one_config_place() -> None:
    build = _build()
    short = yaml.safe_load(build.render(UTILIZATION_HIGH_FOR="30s", SELECTOR='job="api"'))
    alerts = {r["alert"]: r for g in short["groups"] for r in g["rules"] if "alert" in r}
    assert alerts["PoolwatchPoolUtilizationHigh"]["for"] == "30s"
    recording = short["groups"][0]["rules"][0]["expr"]
    assert 'poolwatch_connections{job="api", state="used"}' in recording
    with pytest.raises(KeyError, match="unknown alert settings"):
        build.render(UTILIZATION_HIGHER=0.9)


def test_grafana_managed_rules_mirror_the_prometheus_rules() -> None:
    grafana = yaml.safe_load(
        (ALERTS.parent / "deploy/grafana/provisioning/alerting/poolwatch-alerts.yml").read_text()
    )
    assert grafana["apiVersion"] == 1
    [group] = grafana["groups"]
    assert (group["name"], group["folder"]) == ("poolwatch", "Connection pools")
    rules = {rule["title"]: rule for rule in group["rules"]}
    assert list(rules) == ALERT_NAMES
    uids = [rule["uid"] for rule in group["rules"]]
    assert len(set(uids)) == len(uids) and all(len(uid) <= 40 for uid in uids)
    [datasource] = yaml.safe_load(
        (ALERTS.parent / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    prometheus = _rules()
    build = _build()
    alerts = {alert.name: alert for alert in build.alerts()}
    for name, rule in rules.items():
        query, condition, *lookups = rule["data"]
        assert query["datasourceUid"] == datasource["uid"]
        assert query["model"]["expr"] == prometheus[name]["expr"]
        assert (condition["datasourceUid"], rule["condition"]) == ("__expr__", condition["refId"])
        assert rule["for"] == prometheus[name]["for"]
        assert rule["labels"] == prometheus[name]["labels"]
        # the same description but for the values looked up: Grafana's own queries (L, …)
        # where Prometheus has its query function
        alert = alerts[name]
        expected = dict(prometheus[name]["annotations"])  # type: ignore[call-overload]
        assert expected["description"] == (build.lookups_for_prometheus(alert) + alert.description)
        expected["description"] = build.lookups_for_grafana(alert) + alert.description.replace(
            "$value", "$values.A.Value"
        )
        assert rule["annotations"] == expected
        assert [(q["refId"], q["model"]["expr"], q["datasourceUid"]) for q in lookups] == [
            (chr(ord("L") + i), lookup, datasource["uid"])
            for i, (_, lookup) in enumerate(alert.lookups)
        ]
    assert [len(alerts[name].lookups) for name in BACKEND_ALERTS] == [1, 1]
    assert build.lookups_for_grafana(alerts["PoolwatchBackendNearLimit"]) == (
        '{{ $limit := printf "%.0f" $values.L.Value }}'
    )


def test_a_backend_is_what_backend_by_says() -> None:
    build = _build()
    by = ("server_address", "server_port", "cluster")
    document = yaml.safe_load(build.render(BACKEND_BY=by))
    rules = {r.get("record") or r["alert"]: r for g in document["groups"] for r in g["rules"]}
    assert rules["poolwatch:backend_connections:sum"]["expr"] == (
        'sum by (server_address, server_port, cluster) (poolwatch_connections{server_address!=""})'
    )
    description = rules["PoolwatchBackendNearLimit"]["annotations"]["description"]
    assert description.startswith(
        '{{ $limit := "?" }}{{ with printf "poolwatch:backend_connections_limit:min'
        '{server_address=%q, server_port=%q, cluster=%q}" $labels.server_address '
        "$labels.server_port $labels.cluster | query }}"
    )
    assert "Connections open to {{ $labels.server_address }}:{{ $labels.server_port }}:" in (
        description
    )
