"""The poolwatch command: each demo scenario really makes its condition happen."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poolwatch._demo.workload import SCENARIOS, StopSignals
from poolwatch._models import PoolSnapshot
from poolwatch.cli import EXIT_CODES, main
from poolwatch.cli.table import COLUMNS, render
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


def _tables(output: str) -> list[dict[str, dict[str, str]]]:
    """Every table the demo printed, in order, each by pool name, each row by column."""
    tables = []
    for chunk in output.split(COLUMNS[0] + " ")[1:]:
        rows = {}
        for line in chunk.splitlines()[1:]:
            if not line.strip():
                break
            name, kind, used_max, bar, *rest = line.split()
            rows[name] = dict(zip(COLUMNS, [name, kind, used_max, bar, *rest], strict=True))
        tables.append(rows)
    assert tables, output
    return tables


def _rows(output: str) -> dict[str, dict[str, str]]:
    """The last table the demo printed, by pool name, each row by column."""
    return _tables(output)[-1]


def test_render_is_one_line_per_pool(sample_snapshot: PoolSnapshot) -> None:
    header, row = render([sample_snapshot]).splitlines()
    assert header.split() == [
        "POOL", "KIND", "USED/MAX", "UTIL", "IDLE", "PEND", "CHECKOUTS", "CONNECTS",
        "TIMEOUTS", "DISCARDS", "STALE", "LEAKS", "WAIT", "P99",
    ]  # fmt: skip
    assert row == (
        "postgresql://db:5432/orders      sqlalchemy       8/10 ########..    2    3      1200"
        "       10        4        0     0     0   12.3ms"
    )


@pytest.fixture(scope="module")
def demo_outputs() -> dict[str, str]:
    """Every scenario's output: the demos run side by side, each for a few seconds."""
    runs = {
        name: subprocess.Popen(
            [*DEMO, "--scenario", name, "--duration", "5" if name == "leak" else "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in SCENARIOS
    }
    outputs = {}
    for name, process in runs.items():
        out, err = process.communicate(timeout=90)
        assert process.returncode == 0, err
        assert re.search(r"^Prometheus metrics on http://127\.0\.0\.1:\d+/metrics$", out, re.M)
        outputs[name] = out
    return outputs


@pytest.fixture(scope="module")
def scenarios(demo_outputs: dict[str, str]) -> dict[str, dict[str, dict[str, str]]]:
    """Every scenario's final table."""
    return {name: _rows(out) for name, out in demo_outputs.items()}


def test_demo_runs_every_pool_kind(scenarios: dict[str, dict[str, dict[str, str]]]) -> None:
    healthy = scenarios["healthy"]
    kinds = {row["KIND"] for row in healthy.values()}
    assert kinds == {"sqlalchemy", "requests", "httpx", "botocore", "redis"}
    assert set(healthy) == {
        "orders-db",
        "inventory-api",
        "pricing-api",
        "pricing-api-async",
        "sessions-dynamodb",
        "sessions-cache",
    }
    for row in healthy.values():
        assert int(row["CHECKOUTS"]) > 0, row
        # room everywhere: no timeout, discard (not even an overflow close), stale or leak
        assert (row["TIMEOUTS"], row["DISCARDS"], row["STALE"], row["LEAKS"]) == (
            "0",
            "0",
            "0",
            "0",
        ), row
        # twice the workers (8, or 4 for boto3): 16 connections each
        assert row["USED/MAX"].endswith("/16"), row
        # keep-alive everywhere, moto included: connections opened about once — a churning
        # pool opens hundreds in these seconds. Not at most 16: on a loaded machine a gap
        # between requests can pass httpx's keepalive_expiry (5 s), and the pool reopens one.
        assert int(row["CONNECTS"]) <= 2 * 16, row


def test_demo_exhaustion_times_callers_out(demo_outputs: dict[str, str]) -> None:
    tables = _tables(demo_outputs["exhaustion"])
    used = [t["orders-db"]["USED/MAX"] for t in tables]
    # One table a second, each an instant: one may fall in the moment between a release and
    # the next waiter's checkout (1/2); the pool is full in the others, never beyond its 2.
    assert len(tables) >= 2, used
    assert "2/2" in used, used
    assert {u.split("/")[1] for u in used} == {"2"}, used
    assert all(int(u.split("/")[0]) <= 2 for u in used), used
    assert int(tables[-1]["orders-db"]["TIMEOUTS"]) > 0
    cache = tables[-1]["sessions-cache"]  # redis: transactions hold their connection as long
    assert (cache["KIND"], cache["USED/MAX"].split("/")[1]) == ("redis", "2")
    assert int(cache["TIMEOUTS"]) > 0


def test_demo_without_redis_server_runs_every_other_pool(tmp_path: Path) -> None:
    """No redis-server on the PATH: the demo says so and runs without its cache."""
    result = subprocess.run(
        [*DEMO, "--duration", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "skipped (not installed): redis (redis-py and redis-server)" in result.stdout
    assert set(_rows(result.stdout)) == {
        "orders-db",
        "inventory-api",
        "pricing-api",
        "pricing-api-async",
        "sessions-dynamodb",
    }


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
    used = [t["orders-db"]["USED/MAX"] for t in _tables(output)]
    db = _rows(output)["orders-db"]
    # Each table an instant: one may fall between a release and the next waiter's checkout
    # (1/2, seen on a loaded CI clone), as in test_demo_exhaustion_times_callers_out.
    assert db["KIND"] == "sqlalchemy"
    assert "2/2" in used, used
    assert all(u in ("1/2", "2/2") for u in used), used
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
def test_every_command_has_help_with_its_exit_codes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: poolwatch {command}")
    assert f"Exit codes: {EXIT_CODES[command]}." in " ".join(text.split())
    assert "%%" not in text


def test_exit_codes_are_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = [re.split(r"(?<!\\)\|", line) for line in readme.splitlines()]
    table = {
        cells[1].strip().split()[1].strip("`"): cells[3].strip()
        for cells in rows
        if len(cells) == 5 and cells[1].startswith(" `poolwatch ")
    }
    assert table == {
        "demo": "0 done or stopped (Ctrl-C, SIGTERM, SIGHUP); 1 failure",
        "top": "0; 1 endpoint unreadable or not Prometheus",
        "doctor": "0 nothing found; 3 findings; 1 endpoint unreadable or not Prometheus, "
        "or a module not importable; 130 interrupted",
        "run": "the program's; 2; 127",
        "upstream": "0; 1 cannot listen",
    }


def test_upstream_on_a_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "poolwatch", "upstream", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"poolwatch upstream: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


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


def _reaped_demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """The demo under tests.support.reaper: what it leaves running is reported."""
    report = tmp_path / "report.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.reaper",
            "--report",
            str(report),
            "--",
            sys.executable,
            "-m",
            "poolwatch",
            "demo",
            "--port",
            "0",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, report


def _demo_pid(report: Path) -> int:
    pid_file = Path(f"{report}.pid")
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(pid_file.read_text())


def _left_behind(
    process: subprocess.Popen[str], report: Path
) -> tuple[dict[str, object], str, str]:
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    return json.loads(report.read_text()), out, err


@pytest.mark.postgres
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_stops_the_demo_and_its_postgresql(
    tmp_path: Path, stop: signal.Signals
) -> None:
    process, report = _reaped_demo(tmp_path, "--duration", "60", "--database", "postgresql")
    assert process.stdout is not None
    seen = []
    for line in process.stdout:  # bounded: the demo prints a table every second
        seen.append(line)
        if line.startswith("POOL "):
            break
    database = [line for line in seen if line.startswith("database: PostgreSQL on 127.0.0.1:")]
    assert len(database) == 1, seen  # the throw-away cluster is running
    os.kill(_demo_pid(report), stop)
    result, out, err = _left_behind(process, report)
    assert result["returncode"] == 0, err
    assert result["left"] == []  # no postgres (postmaster or backend) outlived the demo
    assert "stopping…" in out
    assert "Traceback" not in err


def test_a_stop_signal_is_raised_only_at_a_checkpoint() -> None:
    """The handler never raises: a KeyboardInterrupt raised from it can land in an import's
    weakref callback, be swallowed there and leave an import lock held (moto's server
    thread then blocks for ever). Start-up raises it at its next checkpoint instead."""
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        signals.checkpoint()  # nothing asked yet
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread
        time.sleep(0.01)  # bytecodes run after the signal: none of them raises
        assert signals.requested.is_set()
        with pytest.raises(KeyboardInterrupt):
            signals.checkpoint()
        signals.requested.clear()
        signals.disarm()
        os.kill(os.getpid(), signal.SIGTERM)  # the clean-up has begun: ignored
        time.sleep(0.01)
        assert not signals.requested.is_set()
    assert signal.getsignal(signal.SIGTERM) == previous


@pytest.mark.postgres
@pytest.mark.parametrize("after", [0.0, 1.0, 2.5])
def test_ctrl_c_during_start_up_stops_cleanly(tmp_path: Path, after: float) -> None:
    """SIGINT while the throw-away PostgreSQL is being created, started, or the pools."""
    process, report = _reaped_demo(tmp_path, "--duration", "60", "--database", "postgresql")
    assert process.stderr is not None
    for line in process.stderr:  # bounded: the second line comes within seconds
        if line.startswith("poolwatch demo: starting a throw-away PostgreSQL"):
            break
    time.sleep(after)
    os.kill(_demo_pid(report), signal.SIGINT)  # as a terminal's Ctrl-C, to the demo alone
    result, out, err = _left_behind(process, report)
    assert result["returncode"] == 0, err
    assert result["left"] == []
    assert out.rstrip().endswith("stopping…")
    assert "Traceback" not in err, err
