"""The docker-compose stack and its configs: valid, loopback-only, and consistent.

No Docker engine runs here: `docker-compose config -q` (Debian's docker-compose) validates
the stack file, `promtool check config` and `amtool check-config` validate Prometheus' and
Alertmanager's configs, and the cross-references (mounts, ports, names) are checked below.
The OpenTelemetry Collector has no binary here, so its config is checked for what the stack
relies on.
"""

from __future__ import annotations

import posixpath
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml(ROOT / "docker-compose.yml")
    return data


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = shutil.which(args[0])
    assert binary, f"{args[0]} not found: the test command installs it from Debian"
    return subprocess.run(
        [binary, *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _mounts(service: str) -> dict[str, Path]:
    """Container path -> repository file, for the service's bind mounts."""
    out = {}
    for volume in _compose()["services"][service].get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = ROOT / source
    return out


def test_docker_compose_accepts_the_stack() -> None:
    result = _run("docker-compose", "config", "-q")
    assert result.returncode == 0, result.stderr


def test_every_published_port_is_on_loopback() -> None:
    published = [
        (name, port)
        for name, service in _compose()["services"].items()
        for port in service.get("ports", [])
    ]
    assert published, "the stack publishes Grafana, Prometheus, Alertmanager and OTLP"
    assert [p for p in published if not p[1].startswith("127.0.0.1:")] == []


def test_every_mounted_file_exists() -> None:
    for name in _compose()["services"]:
        for target, source in _mounts(name).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"


def test_prometheus_config_is_valid_with_its_rules(tmp_path: Path) -> None:
    mounts = _mounts("prometheus")
    config = mounts["/etc/prometheus/prometheus.yml"]
    for rule_file in _yaml(config)["rule_files"]:
        target = posixpath.join("/etc/prometheus", rule_file)
        assert target in mounts, f"rule file {target} is not mounted"
        (tmp_path / rule_file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mounts[target], tmp_path / rule_file)
    shutil.copy(config, tmp_path / "prometheus.yml")
    result = _run("promtool", "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 25 rules found" in result.stdout


def test_alertmanager_config_is_valid() -> None:
    result = _run("amtool", "check-config", str(DEPLOY / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_flow_from_the_demo_through_the_collector_to_prometheus() -> None:
    services = _compose()["services"]
    collector = _yaml(DEPLOY / "otel-collector.yml")
    http_endpoint = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert services["demo"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
        f"http://otel-collector:{http_endpoint.rsplit(':', 1)[1]}"
    )
    assert services["demo"]["environment"]["OTEL_METRICS_EXPORTER"] == "otlp"
    pipeline = collector["service"]["pipelines"]["metrics"]
    assert (pipeline["receivers"], pipeline["exporters"]) == (["otlp"], ["prometheus"])
    exporter_port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    [scrape] = _yaml(DEPLOY / "prometheus.yml")["scrape_configs"]
    assert scrape["honor_labels"] is True  # keep each application's job and instance
    assert scrape["static_configs"] == [{"targets": [f"otel-collector:{exporter_port}"]}]


def test_the_demo_runs_on_the_stacks_postgresql() -> None:
    services = _compose()["services"]
    command = services["demo"]["command"]
    url = command[command.index("--url") + 1]
    postgres = services["postgres"]["environment"]
    assert url == (
        f"postgresql+psycopg://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    assert command[command.index("--scenario") + 1] == "${POOLWATCH_DEMO_SCENARIO:-healthy}"
    # the limit declared for it is the server's, less PostgreSQL's 3 superuser connections
    server = services["postgres"]["command"]
    max_connections = int(server[server.index("-c") + 1].removeprefix("max_connections="))
    assert services["demo"]["environment"]["POOLWATCH_SERVER_LIMITS"] == (
        f"postgres:5432={max_connections - 3}"
    )


def test_grafana_gets_the_datasource_and_the_dashboards() -> None:
    datasources = _yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    datasource = datasources[0]
    assert (datasource["type"], datasource["url"]) == ("prometheus", "http://prometheus:9090")
    [provider] = _yaml(DEPLOY / "grafana/provisioning/dashboards/poolwatch.yml")["providers"]
    mounts = _mounts("grafana")
    assert mounts[provider["options"]["path"]] == ROOT / "dashboards"
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana/provisioning"


def test_the_demo_calls_the_stacks_http_upstream() -> None:
    services = _compose()["services"]
    upstream = services["upstream"]
    command = upstream["command"]
    assert command[:3] == ["upstream", "--host", "0.0.0.0"]  # inside the stack's network
    port = command[command.index("--port") + 1]
    demo = services["demo"]["command"]
    assert demo[demo.index("--http-url") + 1] == f"http://upstream:{port}"
    assert "ports" not in upstream  # not published on the host at all
    assert upstream["build"] == services["demo"]["build"]


def test_traces_flow_from_the_demo_through_the_collector_to_jaeger() -> None:
    """The demo's spans (its calls, poolwatch's pool.wait and pool.connect) go to Jaeger; the
    histograms' exemplars reach Prometheus and link to Jaeger in Grafana."""
    services = _compose()["services"]
    assert services["demo"]["environment"]["OTEL_TRACES_EXPORTER"] == "otlp"
    collector = _yaml(DEPLOY / "otel-collector.yml")
    pipeline = collector["service"]["pipelines"]["traces"]
    assert (pipeline["receivers"], pipeline["exporters"]) == (["otlp"], ["otlp/jaeger"])
    jaeger_exporter = collector["exporters"]["otlp/jaeger"]
    assert jaeger_exporter["endpoint"] == "jaeger:4317"  # Jaeger's OTLP gRPC receiver
    jaeger = services["jaeger"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert jaeger["ports"] == ["127.0.0.1:16686:16686"]  # its UI, on loopback
    # exemplars: OpenMetrics out of the Collector, exemplar storage in Prometheus
    assert collector["exporters"]["prometheus"]["enable_open_metrics"] is True
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    prometheus, jaeger_source = _yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[
        "datasources"
    ]
    assert (jaeger_source["type"], jaeger_source["url"]) == ("jaeger", "http://jaeger:16686")
    assert prometheus["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": jaeger_source["uid"]}
    ]
    assert "jaeger" in services["grafana"]["depends_on"]
