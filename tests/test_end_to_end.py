"""End to end with real processes on loopback: an instrumented workload exhausting a real
PostgreSQL pool and HTTP pools (requests and httpx to a loopback server, boto3 to moto), a
real Prometheus scraping it every second with the shipped rules (their durations shortened
only through alerts/config.py overrides), and a real Alertmanager.

Prometheus and Alertmanager come from Debian's prometheus and prometheus-alertmanager
packages; the test command installs them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent
SHORT = {  # every override goes through the one configuration place
    "RATE_WINDOW": "10s",
    "UTILIZATION_HIGH_FOR": "5s",
    "SATURATED_FOR": "5s",
    "EXHAUSTED_FOR": "0s",
    "DISCARDING_FOR": "5s",
}
POOLS = [  # (pool.kind, pool.name) of every pool the workload runs
    ("sqlalchemy", "orders-db"),
    ("requests", "inventory-api"),
    ("httpx", "pricing-api"),
    ("botocore", "sessions-dynamodb"),
]
# Queries whose series only exist once something the workload never does has happened.
NEEDS_OTHER_EVENTS = {"wait errors", "connect errors"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(f"{names[0]} not found: the test command installs Debian's packages")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _until(what: str, probe: Callable[[], Any], seconds: float = 90.0) -> Any:
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except OSError as error:  # not listening yet
            last = error
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {seconds} s; last: {last!r}")


def _render_rules() -> str:
    spec = importlib.util.spec_from_file_location("poolwatch_e2e_build", ROOT / "alerts/build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build
    spec.loader.exec_module(build)
    text: str = build.render(**SHORT)
    return text


class _Processes:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.started):
            process.terminate()
        for process in self.started:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture
def stack(postgres: PostgresCluster, tmp_path: Path) -> Iterator[dict[str, str]]:
    processes = _Processes()
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
                "150",
            ],
            tmp_path / "workload.log",
        )
        workload_port = int(
            _until("the workload's endpoint", lambda: port_file.exists() and port_file.read_text())
        )
        am_port, prom_port = _free_port(), _free_port()
        (tmp_path / "alertmanager.yml").write_text(
            "route: {receiver: blackhole, group_wait: 1s, group_interval: 1s, "
            "repeat_interval: 1h}\nreceivers: [{name: blackhole}]\n"
        )
        processes.start(
            [
                _binary("prometheus-alertmanager", "alertmanager"),
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],  # no gossip port: loopback only
            tmp_path / "alertmanager.log",
        )
        (tmp_path / "rules.yml").write_text(_render_rules())
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [rules.yml]\n"
            "alerting: {alertmanagers: [{static_configs: "
            f"[{{targets: ['127.0.0.1:{am_port}']}}]}}]}}\n"
            "scrape_configs: [{job_name: poolwatch-e2e, static_configs: "
            f"[{{targets: ['127.0.0.1:{workload_port}']}}]}}]\n"
        )
        processes.start(
            [
                _binary("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            tmp_path / "prometheus.log",
        )
        yield {
            "prometheus": f"http://127.0.0.1:{prom_port}",
            "alertmanager": f"http://127.0.0.1:{am_port}",
        }
    finally:
        processes.stop()


def _firing(alertmanager: str, pool: str) -> dict[str, dict[str, str]]:
    """Alerts active in Alertmanager for ``pool``, by alert name."""
    alerts = _get(f"{alertmanager}/api/v2/alerts?active=true")
    return {
        a["labels"]["alertname"]: a["labels"]
        for a in alerts
        if a["labels"].get("pool_name") == pool
    }


def _query(prometheus: str, expr: str) -> list[Any]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = _get(url)
    assert body["status"] == "success", body
    result: list[Any] = body["data"]["result"]
    return result


def test_exhaustion_reaches_alertmanager_and_every_dashboard_query_has_data(
    stack: dict[str, str],
) -> None:
    wanted = {"PoolwatchPoolExhausted", "PoolwatchPoolUtilizationHigh"}
    firing = _until(
        f"{sorted(wanted)} in Alertmanager",
        lambda: (got := _firing(stack["alertmanager"], "orders-db")) and wanted <= set(got) and got,
    )
    for name in wanted:
        labels = firing[name]
        assert (labels["job"], labels["pool_name"], labels["pool_kind"]) == (
            "poolwatch-e2e",
            "orders-db",
            "sqlalchemy",
        )
    assert firing["PoolwatchPoolExhausted"]["severity"] == "critical"
    assert firing["PoolwatchPoolUtilizationHigh"]["severity"] == "warning"

    # A pool that discards on every cycle: requests' non-blocking urllib3 pool.
    _until(
        "PoolwatchPoolDiscarding for inventory-api",
        lambda: "PoolwatchPoolDiscarding" in _firing(stack["alertmanager"], "inventory-api"),
    )

    empty, checked = [], 0
    for kind, pool in POOLS:
        for name in ("poolwatch-overview.json", "poolwatch-pool.json"):
            dashboard = json.loads((ROOT / "dashboards" / name).read_text())
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    if target["legendFormat"] in NEEDS_OTHER_EVENTS:
                        continue
                    expr = (
                        target["expr"]
                        .replace("$__rate_interval", "10s")
                        .replace("$__range", "5m")
                        .replace("$job", "poolwatch-e2e")
                        .replace("$instance", ".*")
                        .replace("$kind", kind)
                        .replace("$pool", pool)
                    )
                    checked += 1
                    if not _query(stack["prometheus"], expr):
                        empty.append(f"{kind} {pool}: {name}: {panel['title']}: {expr}")
    assert empty == []
    # every target of both dashboards but the two in NEEDS_OTHER_EVENTS, for every pool
    assert checked == 27 * len(POOLS)
