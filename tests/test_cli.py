"""The poolwatch command: the embedded demo really exhausts (or does not exhaust) a pool."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from poolwatch._registry import PoolSnapshot
from poolwatch.cli import main, render
from tests.support.postgres import PostgresCluster


def _demo(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "poolwatch", "demo", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _last_row(output: str) -> list[str]:
    rows = [line for line in output.splitlines() if line.startswith("orders-db ")]
    assert rows, output
    return rows[-1].split()


def test_render_is_one_line_per_pool(sample_snapshot: PoolSnapshot) -> None:
    snap = sample_snapshot
    assert render([snap]).splitlines()[1] == (
        "postgresql://db:5432/orders                  sqlalchemy      8/10 ########..    2    3"
        "      1200        4    12.3ms"
    )


def test_demo_exhaustion_times_callers_out() -> None:
    output = _demo("--scenario", "exhaustion", "--duration", "2")
    assert re.search(r"^Prometheus metrics on http://127\.0\.0\.1:\d+/metrics$", output, re.M)
    name, kind, used_max, _bar, _idle, _pending, checkouts, timeouts, _p99 = _last_row(output)
    assert (name, kind, used_max) == ("orders-db", "sqlalchemy", "2/2")
    assert int(checkouts) > 0 and int(timeouts) > 0


def test_demo_healthy_never_times_out() -> None:
    output = _demo("--scenario", "healthy", "--duration", "2")
    row = _last_row(output)
    assert int(row[-3]) > 0  # checkouts
    assert row[-2] == "0"  # timeouts


@pytest.mark.postgres
def test_demo_runs_against_a_database_url(postgres: PostgresCluster) -> None:
    output = _demo("--scenario", "exhaustion", "--duration", "2", "--url", postgres.url())
    name, kind, used_max, *_rest, timeouts, _p99 = _last_row(output)
    assert (name, kind, used_max) == ("orders-db", "sqlalchemy", "2/2")
    assert int(timeouts) > 0
    assert postgres.password not in output


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["demo", "--duration", "-1"])
    assert caught.value.code == 2
    assert "expected a number of seconds > 0, got '-1'" in capsys.readouterr().err
