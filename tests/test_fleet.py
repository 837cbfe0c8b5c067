"""The fleet view end to end: many poolwatch processes, one real PostgreSQL, the sums.

Twelve processes (tests/support/fleet.py) — eight of a service ``api`` and four of a
service ``worker``, each with a pool of its own to one PostgreSQL whose ``max_connections``
is set to a known value — hold known numbers of connections, and declare the server's limit
through ``POOLWATCH_SERVER_LIMITS`` as a deployment would. One worker also keeps a
connection to a loopback HTTP server through an httpx pool with no limit. A real Prometheus
scrapes all twelve every second with the shipped rules (their durations shortened only
through alerts/config.py overrides), wired to a real Alertmanager.

Everything here is exact: the recording rules' sums against what the processes hold and
against what PostgreSQL itself counts, the declared limit against what the server says,
PoolwatchBackendOversubscribed and PoolwatchBackendNearLimit in Alertmanager with their
rendered descriptions, and every query of the backends dashboard returning data.

Twelve processes are what the project's 2-core machine carries next to PostgreSQL,
Prometheus and Alertmanager; each is idle once its connections are open. Every wait is
bounded (``until``), and each process stops after ``SECONDS`` at the latest.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

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
from tests.support.upstream import ThreadedUpstream

pytestmark = [pytest.mark.postgres, pytest.mark.serial]

SECONDS = 150.0
"""The most each process of the fleet lives (they are stopped at the end of the test)."""
MAX_CONNECTIONS = 40
"""The PostgreSQL server's own limit; it keeps 3 of them for superusers."""
APPLICATION = "poolwatch-fleet"
"""The fleet's ``application_name``, by which PostgreSQL's own count is taken."""
SHORT = {"BACKEND_OVERSUBSCRIBED_FOR": "5s", "BACKEND_NEAR_LIMIT_FOR": "5s"}
HTTP_LIMIT = 100
"""The limit declared for the HTTP server (it has none of its own here)."""


@dataclass(frozen=True)
class Service:
    """Instances of one service and what each one's pool holds."""

    instances: int
    pool_size: int
    max_overflow: int
    used: int
    idle: int = 0
    waiting: int = 0


SERVICES = {
    # pools of 2 + 2 overflow, holding 2 used and 1 idle each
    "api": Service(instances=8, pool_size=2, max_overflow=2, used=2, idle=1),
    # pools of 2 without overflow, both used, one caller waiting in each
    "worker": Service(instances=4, pool_size=2, max_overflow=0, used=2, waiting=1),
}
OPEN = sum(s.instances * (s.used + s.idle) for s in SERVICES.values())  # 32
WORST = sum(s.instances * (s.pool_size + s.max_overflow) for s in SERVICES.values())  # 40
WAITING = sum(s.instances * s.waiting for s in SERVICES.values())  # 4
MEMBERS = sum(s.instances for s in SERVICES.values())  # 12


def _server_limit(postgres: PostgresCluster) -> int:
    """What clients may open: max_connections less the connections reserved (PostgreSQL
    16 adds reserved_connections to superuser_reserved_connections)."""
    engine = sa.create_engine(postgres.url(), poolclass=sa.NullPool)
    with engine.connect() as connection:
        settings = dict(
            connection.execute(
                sa.text(
                    "SELECT name, setting::int FROM pg_settings WHERE name IN "
                    "('max_connections', 'superuser_reserved_connections', "
                    "'reserved_connections')"
                )
            ).all()
        )
    return int(
        settings["max_connections"]
        - settings["superuser_reserved_connections"]
        - settings.get("reserved_connections", 0)
    )


def _open_in_postgres(postgres: PostgresCluster) -> int:
    """The fleet's connections as PostgreSQL counts them."""
    engine = sa.create_engine(postgres.url(), poolclass=sa.NullPool)
    with engine.connect() as connection:
        count = connection.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
            {"name": APPLICATION},
        ).scalar_one()
    return int(count)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, Any]]:
    processes = Processes()
    postgres = PostgresCluster(max_connections=MAX_CONNECTIONS)
    postgres.start()
    upstream = ThreadedUpstream()
    upstream.__enter__()
    try:
        limit = _server_limit(postgres)
        environment = {
            key: value for key, value in os.environ.items() if not key.startswith("OTEL_")
        }
        environment.update(
            POOLWATCH_SERVER_LIMITS=f"{postgres.host}:{postgres.port}={limit},"
            f"127.0.0.1:{upstream.port}={HTTP_LIMIT}",
            POOLWATCH_PROCESS_VIEW="off",
        )
        url = f"{postgres.url()}?application_name={APPLICATION}"
        port_files: dict[str, list[Path]] = {}
        for job, service in SERVICES.items():
            for index in range(service.instances):
                port_file = tmp_path / f"{job}-{index}.port"
                port_files.setdefault(job, []).append(port_file)
                http = ["--http-url", upstream.url] if (job, index) == ("worker", 0) else []
                processes.start(
                    [
                        sys.executable, "-m", "tests.support.fleet", "--url", url,
                        "--port-file", str(port_file),
                        "--pool-size", str(service.pool_size),
                        "--max-overflow", str(service.max_overflow),
                        "--used", str(service.used), "--idle", str(service.idle),
                        "--waiting", str(service.waiting), "--seconds", str(SECONDS), *http,
                    ],
                    tmp_path / f"{job}-{index}.log",
                    env=environment,
                )  # fmt: skip
        targets = {
            job: [
                f"127.0.0.1:{until(f'{f.name} written', lambda f=f: f.exists() and f.read_text())}"
                for f in files
            ]
            for job, files in port_files.items()
        }
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
            processes, tmp_path, targets, rules(**SHORT), alertmanager=f"127.0.0.1:{am_port}"
        )
        yield {
            "prometheus": prometheus,
            "alertmanager": f"http://127.0.0.1:{am_port}",
            "postgres": postgres,
            "database": {"server_address": postgres.host, "server_port": str(postgres.port)},
            "http": {"server_address": "127.0.0.1", "server_port": str(upstream.port)},
            "limit": limit,
        }
    finally:
        processes.stop()
        upstream.__exit__(None, None, None)
        postgres.stop()


def _one(prometheus: Prometheus, expr: str) -> float:
    [sample] = prometheus.query(expr)
    return float(sample["value"][1])


def _selector(backend: dict[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in backend.items()) + "}"


def _chosen(expr: str, variables: dict[str, str]) -> str:
    """A dashboard query with its variables set."""
    for variable, value in variables.items():
        expr = expr.replace(variable, value)
    return expr


def _backend_alerts(alertmanager: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Active backend alerts in Alertmanager, by (alert name, server_port)."""
    return {
        (a["labels"]["alertname"], a["labels"]["server_port"]): a
        for a in get_json(f"{alertmanager}/api/v2/alerts?active=true")
        if a["labels"]["alertname"].startswith("PoolwatchBackend")
    }


def test_the_fleet_against_its_backends_limit(fleet: dict[str, Any]) -> None:
    prometheus: Prometheus = fleet["prometheus"]
    database, http = _selector(fleet["database"]), _selector(fleet["http"])
    limit: int = fleet["limit"]
    assert limit == MAX_CONNECTIONS - 3  # PostgreSQL 15's superuser_reserved_connections
    assert (OPEN, WORST, WAITING, MEMBERS) == (32, 40, 4, 12)
    assert OPEN / limit > 0.8 and limit < WORST  # both alerts' conditions, by construction

    # every instance scraped, then the recording rules' sums, exact
    until(
        f"{MEMBERS} instances up",
        lambda: len(prometheus.query('up{job=~"api|worker"} == 1')) == MEMBERS,
    )
    until(
        "every pool's levels in the recording rules",
        lambda: (
            prometheus.query(f"poolwatch:backend_connections:sum{database} == {OPEN}")
            and prometheus.query(f"poolwatch:backend_pending_requests:sum{database} == {WAITING}")
        ),
    )
    assert _one(prometheus, f"poolwatch:backend_connections:sum{database}") == OPEN
    assert _one(prometheus, f"poolwatch:backend_connections_worst_case:sum{database}") == WORST
    assert _one(prometheus, f"poolwatch:backend_connections_limit:min{database}") == limit
    assert _one(prometheus, f"poolwatch:backend_utilization:ratio{database}") == OPEN / limit
    assert _one(prometheus, f"poolwatch:backend_pending_requests:sum{database}") == WAITING
    assert prometheus.query(f"poolwatch:backend_unbounded_pools:count{database}") == []
    # PostgreSQL counts the same connections
    assert _open_in_postgres(fleet["postgres"]) == OPEN
    # the HTTP server: one connection from a pool without a limit, so no worst case
    assert _one(prometheus, f"poolwatch:backend_connections:sum{http}") == 1
    assert _one(prometheus, f"poolwatch:backend_connections_worst_case:sum{http}") == float("inf")
    assert _one(prometheus, f"poolwatch:backend_unbounded_pools:count{http}") == 1
    assert _one(prometheus, f"poolwatch:backend_connections_limit:min{http}") == HTTP_LIMIT
    # only these two backends, with one limit declared by every instance for each
    assert len(prometheus.query("poolwatch:backend_connections:sum")) == 2
    assert _one(prometheus, f"count(poolwatch_server_connections_limit{database})") == MEMBERS

    # the alerts reach Alertmanager, their descriptions rendered with the limit looked up
    wanted = {
        ("PoolwatchBackendOversubscribed", fleet["database"]["server_port"]),
        ("PoolwatchBackendOversubscribed", fleet["http"]["server_port"]),
        ("PoolwatchBackendNearLimit", fleet["database"]["server_port"]),
    }
    alerts = until(
        f"{wanted} in Alertmanager",
        lambda: (got := _backend_alerts(fleet["alertmanager"])) and wanted <= set(got) and got,
    )
    address, port = fleet["database"]["server_address"], fleet["database"]["server_port"]
    oversubscribed = alerts["PoolwatchBackendOversubscribed", port]
    assert oversubscribed["labels"] == {
        "alertname": "PoolwatchBackendOversubscribed",
        "severity": "warning",
        "server_address": address,
        "server_port": port,
    }
    assert oversubscribed["annotations"]["description"] == (
        f"The pools of every instance that talks to {address}:{port} may open {WORST} "
        f"connections together, more than the {limit} it accepts, and have been allowed to for "
        "5s: when they are all busy at once, new connections fail at the backend, whatever "
        "each pool's own health."
    )
    http_port = fleet["http"]["server_port"]
    assert alerts["PoolwatchBackendOversubscribed", http_port]["annotations"]["description"] == (
        f"The pools of every instance that talks to 127.0.0.1:{http_port} may open any number "
        f"of connections (a pool without a limit talks to it), more than the {HTTP_LIMIT} it "
        "accepts, and have been allowed to for 5s: when they are all busy at once, new "
        "connections fail at the backend, whatever each pool's own health."
    )
    assert alerts["PoolwatchBackendNearLimit", port]["annotations"]["description"] == (
        f"Connections open to {address}:{port} from every instance have been "
        f"{100 * OPEN / limit:.4g}% of its limit of {limit} for 5s (threshold 80%)."
    )  # humanizePercentage: 4 significant digits, 86.49%
    # 1 connection of 100 to the HTTP server: not near its limit
    assert ("PoolwatchBackendNearLimit", http_port) not in alerts
    near_http = http.replace("{", '{alertname="PoolwatchBackendNearLimit", ')
    assert prometheus.query(f"ALERTS{near_http}") == []
    near_database = database.replace(
        "{", '{alertname="PoolwatchBackendNearLimit", alertstate="firing", '
    )
    assert len(prometheus.query(f"ALERTS{near_database}")) == 1  # the query is not vacuous

    # every query of the backends dashboard returns data, for all backends together
    dashboard = json.loads((ROOT / "dashboards/poolwatch-backends.json").read_text())
    empty, checked = [], 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$address", ".*").replace("$port", ".*")
            checked += 1
            if not prometheus.query(expr):
                empty.append(f"{panel['title']}: {expr}")
    assert (empty, checked) == ([], 25)
    # and the table says what the fleet holds, backend by backend
    table = {panel["title"]: [t["expr"] for t in panel["targets"]] for panel in dashboard["panels"]}
    instances, services = table["Backends"][6:8]
    for backend, holders in ((fleet["database"], (MEMBERS, 2)), (fleet["http"], (1, 1))):
        chosen = {"$address": backend["server_address"], "$port": backend["server_port"]}
        assert tuple(_one(prometheus, _chosen(e, chosen)) for e in (instances, services)) == (
            holders
        )
    share = _chosen(table["Top pools by share"][0], {"$address": address, "$port": port})
    shares = {r["metric"]["job"]: float(r["value"][1]) for r in prometheus.query(share)}
    assert shares == {
        job: s.instances * (s.used + s.idle) / OPEN for job, s in SERVICES.items()
    }  # api 24 of 32, worker 8 of 32
