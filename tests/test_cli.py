"""The poolwatch command: each demo scenario really makes its condition happen."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from poolwatch._demo.workload import SCENARIOS
from poolwatch._registry import PoolSnapshot
from poolwatch.cli import COLUMNS, main, render
from tests.support.postgres import PostgresCluster

# SQLite keeps the side-by-side demos fast; the PostgreSQL default has its own test.
DEMO = [sys.executable, "-m", "poolwatch", "demo", "--port", "0", "--database", "sqlite"]


def _demo(*args: str) -> str:
    result = subprocess.run(
        [*DEMO, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _rows(output: str) -> dict[str, dict[str, str]]:
    """The last table the demo printed, by pool name, each row by column."""
    tables = output.split(COLUMNS[0] + " ")
    assert len(tables) > 1, output
    last = tables[-1].splitlines()[1:]
    rows = {}
    for line in last:
        if not line.strip():
            break
        name, kind, used_max, bar, *rest = line.split()
        rows[name] = dict(zip(COLUMNS, [name, kind, used_max, bar, *rest], strict=True))
    return rows


def test_render_is_one_line_per_pool(sample_snapshot: PoolSnapshot) -> None:
    header, row = render([sample_snapshot]).splitlines()
    assert header.split() == [
        "POOL", "KIND", "USED/MAX", "UTIL", "IDLE", "PEND", "CHECKOUTS", "CONNECTS",
        "TIMEOUTS", "DISCARDS", "STALE", "LEAKS", "WAIT", "P99",
    ]  # fmt: skip
    assert row == (
        "postgresql://db:5432/orders      sqlalchemy     8/10 ########..    2    3      1200"
        "       10        4        0     0     0   12.3ms"
    )


@pytest.fixture(scope="module")
def scenarios() -> dict[str, dict[str, dict[str, str]]]:
    """Every scenario's final table: the demos run side by side, each for a few seconds."""
    runs = {
        name: subprocess.Popen(
            [*DEMO, "--scenario", name, "--duration", "5" if name == "leak" else "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in SCENARIOS
    }
    tables = {}
    for name, process in runs.items():
        out, err = process.communicate(timeout=90)
        assert process.returncode == 0, err
        assert re.search(r"^Prometheus metrics on http://127\.0\.0\.1:\d+/metrics$", out, re.M)
        tables[name] = _rows(out)
    return tables


def test_demo_runs_every_pool_kind(scenarios: dict[str, dict[str, dict[str, str]]]) -> None:
    healthy = scenarios["healthy"]
    kinds = {row["KIND"] for row in healthy.values()}
    assert kinds == {"sqlalchemy", "requests", "httpx", "botocore"}
    assert set(healthy) == {
        "orders-db",
        "inventory-api",
        "pricing-api",
        "pricing-api-async",
        "sessions-dynamodb",
    }
    for row in healthy.values():
        assert int(row["CHECKOUTS"]) > 0, row
        assert (row["TIMEOUTS"], row["STALE"], row["LEAKS"]) == ("0", "0", "0"), row
    assert healthy["inventory-api"]["DISCARDS"] == "0"


def test_demo_exhaustion_times_callers_out(scenarios: dict[str, dict[str, dict[str, str]]]) -> None:
    db = scenarios["exhaustion"]["orders-db"]
    assert db["USED/MAX"] == "2/2"
    assert int(db["TIMEOUTS"]) > 0


def test_demo_leak_is_counted(scenarios: dict[str, dict[str, dict[str, str]]]) -> None:
    assert int(scenarios["leak"]["orders-db"]["LEAKS"]) >= 1


def test_demo_churn_opens_a_connection_per_request(
    scenarios: dict[str, dict[str, dict[str, str]]],
) -> None:
    [row] = [r for r in scenarios["churn"].values() if r["KIND"] == "requests"]
    checkouts, connects = int(row["CHECKOUTS"]), int(row["CONNECTS"])
    assert checkouts > 20
    assert connects >= checkouts - 8  # at most the 8 workers' requests still in flight


def test_demo_stale_finds_dropped_keep_alives(
    scenarios: dict[str, dict[str, dict[str, str]]],
) -> None:
    assert int(scenarios["stale"]["inventory-api"]["STALE"]) > 0


def test_demo_discard_throws_connections_away(
    scenarios: dict[str, dict[str, dict[str, str]]],
) -> None:
    assert int(scenarios["discard"]["inventory-api"]["DISCARDS"]) > 0
    assert int(scenarios["discard"]["sessions-dynamodb"]["DISCARDS"]) > 0


@pytest.mark.postgres
def test_demo_runs_against_a_database_url(postgres: PostgresCluster) -> None:
    output = _demo("--scenario", "exhaustion", "--duration", "2", "--url", postgres.url())
    db = _rows(output)["orders-db"]
    assert (db["KIND"], db["USED/MAX"]) == ("sqlalchemy", "2/2")
    assert int(db["TIMEOUTS"]) > 0
    assert postgres.password not in output


@pytest.mark.postgres
def test_demo_starts_a_throw_away_postgresql_when_it_can() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "poolwatch",
            "demo",
            "--port",
            "0",
            "--duration",
            "2",
            "--database",
            "postgresql",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^database: PostgreSQL on 127\.0\.0\.1:\d+ \(throw-away\)$", result.stdout, re.M
    )
    assert int(_rows(result.stdout)["orders-db"]["CHECKOUTS"]) > 0
    assert "poolwatch demo: starting a throw-away PostgreSQL …" in result.stderr


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["demo", "--duration", "-1"])
    assert caught.value.code == 2
    assert "expected a number of seconds > 0, got '-1'" in capsys.readouterr().err


def test_demo_against_a_separate_upstream_process() -> None:
    """The compose stack's wiring, on loopback: `poolwatch upstream` and `demo --http-url`."""
    server = subprocess.Popen(
        [sys.executable, "-m", "poolwatch", "upstream", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        found = re.fullmatch(r"demo upstream on (http://127\.0\.0\.1:\d+)/\n", line)
        assert found, line
        rows = _rows(_demo("--duration", "2", "--http-url", found.group(1)))
        assert int(rows["inventory-api"]["CHECKOUTS"]) > 0
        assert rows["inventory-api"]["TIMEOUTS"] == "0"
    finally:
        server.terminate()
        assert server.wait(10) == 0  # SIGTERM is a clean stop
        assert server.stdout is not None
        server.stdout.close()


@pytest.mark.parametrize("command", ["demo", "top", "doctor", "run", "upstream"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: poolwatch {command}")


def test_demo_failure_is_one_line_without_the_password() -> None:
    result = subprocess.run(
        [*DEMO, "--duration", "1", "--url", "postgresql+psycopg://app:s3cr3t@127.0.0.1:1/db"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "poolwatch demo: starting the pools …",
        "poolwatch demo: (psycopg.OperationalError) connection failed: connection to server "
        'at "127.0.0.1", port 1 failed: Connection refused',
    ]
    assert "s3cr3t" not in result.stdout + result.stderr


def test_demo_stops_cleanly_on_ctrl_c() -> None:
    process = subprocess.Popen(
        [*DEMO, "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # bounded: the demo prints a table every second
            if line.startswith("POOL "):
                break
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    assert process.returncode == 0, err
    assert "stopping…" in out
    assert "Traceback" not in err
