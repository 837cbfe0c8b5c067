"""``poolwatch top``: the table from real endpoints, in a real pseudo-terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import exc

import poolwatch
from poolwatch import _top
from tests.support.upstream import refusing_port

POOLWATCH = [sys.executable, "-m", "poolwatch"]
TABLE_ROW = re.compile(
    r"^(?P<name>\S+)\s+(?P<kind>\S+)\s+(?P<used>\d+)/(?P<max>\S+)\s+(?P<bar>[#.-]+)\s+"
    r"(?P<pct>\S+)\s+(?P<idle>\d+)\s+(?P<pending>\d+)\s+(?P<p99>\S+)\s+(?P<tmo>\S+)\s+"
    r"(?P<disc>\S+)\s+(?P<leaks>\d+)$"
)


def _scrape(address: tuple[str, int]) -> str:
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_rows_from_two_scrapes_of_a_real_endpoint(tmp_path: Path) -> None:
    handle = poolwatch.instrument(prometheus_port=0)
    try:
        assert handle.prometheus_address is not None
        engine = sa.create_engine(
            f"sqlite:///{tmp_path}/top.db", pool_size=2, max_overflow=0, pool_timeout=0.01
        )
        poolwatch.track(engine, name="orders-db")
        held = [engine.connect(), engine.connect()]
        before = _top.parse(_scrape(handle.prometheus_address))
        for _ in range(3):
            with pytest.raises(exc.TimeoutError):
                engine.connect()
        now = _top.parse(_scrape(handle.prometheus_address))
        for conn in held:
            conn.close()
        engine.dispose()
    finally:
        poolwatch.uninstrument()
    [row] = _top.rows(now, before, seconds=2.0)
    assert (row.kind, row.name, row.used, row.idle, row.max, row.pending) == (
        "sqlalchemy",
        "orders-db",
        2,
        0,
        2,
        0,
    )
    assert row.utilization == 1.0
    assert row.timeouts_per_s == 1.5  # 3 timeouts over 2 s
    assert row.discards_per_s == 0.0
    assert row.wait_p99 is None  # no successful wait between the two scrapes
    [first] = _top.rows(before, None, seconds=0.0)
    assert first.timeouts_per_s is None  # one scrape: no rate yet
    assert first.wait_p99 is not None  # the two checkouts, cumulative
    text = _top.render([row], colour=False)
    assert text.splitlines()[1].split() == [
        "orders-db",
        "sqlalchemy",
        "2/2",
        "##########",
        "100",
        "0",
        "0",
        "-",
        "1.5",
        "0.0",
        "0",
    ]


def test_quantile_matches_prometheus_histogram_quantile() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, float("inf"): 100.0}
    # rank 99 lies in (0.5, 1.0]: 0.5 + 0.5 * (99 - 90) / (100 - 90)
    assert _top.quantile(0.99, buckets) == pytest.approx(0.95, abs=1e-12)
    assert _top.quantile(0.5, buckets) == 0.1  # rank 50 is the first bucket's upper bound
    assert _top.quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None
    assert _top.quantile(0.99, {0.1: 1.0, float("inf"): 10.0}) == 0.1  # open bucket: its floor


def test_sorting_puts_the_worst_first() -> None:
    def row(name: str, utilization: float | None, timeouts: float | None) -> _top.Row:
        return _top.Row("urllib3", name, 0, 0, None, 0, utilization, None, timeouts, None, 0)

    table = [row("a", 0.5, 0.0), row("b", 0.99, None), row("c", None, 3.0)]
    assert [r.name for r in _top.ordered(table, "u")] == ["b", "a", "c"]
    assert [r.name for r in _top.ordered(table, "t")] == ["c", "a", "b"]
    assert [r.name for r in _top.ordered(table, "n")] == ["a", "b", "c"]
    assert [r.name for r in _top.ordered(table, "u", reverse=True)] == ["c", "a", "b"]


@pytest.fixture(scope="module")
def exhausted_process() -> Iterator[str]:
    """A real process serving poolwatch metrics: the demo's exhaustion scenario."""
    port = _free_port()
    process = subprocess.Popen(
        [
            *POOLWATCH,
            "demo",
            "--scenario",
            "exhaustion",
            "--duration",
            "60",
            "--port",
            str(port),
            "--database",
            "sqlite",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if "orders-db" in _top.fetch(url):
                    break
            except _top.TopError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(15)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _parse_table(text: str) -> dict[str, dict[str, str]]:
    found = {}
    for line in text.splitlines():
        match = TABLE_ROW.match(line)
        if match:
            found[match["name"]] = match.groupdict()
    return found


def test_top_once_against_a_real_process(exhausted_process: str) -> None:
    result = subprocess.run(
        [*POOLWATCH, "top", "--once", "--interval", "1", "--url", exhausted_process],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\033[" not in result.stdout  # not a terminal: no colour
    rows = _parse_table(result.stdout)
    db = rows["orders-db"]
    assert (db["kind"], db["used"], db["max"], db["pct"]) == ("sqlalchemy", "2", "2", "100")
    assert float(db["tmo"]) > 0
    assert {"inventory-api", "sessions-dynamodb"} <= set(rows)


def _read_until(fd: int, pattern: str, seconds: float = 20.0) -> str:
    seen = ""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536).decode(errors="replace")
            except OSError:
                break
            if re.search(pattern, seen, re.S):
                return seen
    raise AssertionError(f"{pattern!r} not seen; got {seen[-2000:]!r}")


def test_top_in_a_terminal_colours_sorts_and_quits(exhausted_process: str) -> None:
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    process = subprocess.Popen(
        [*POOLWATCH, "top", "--interval", "0.5", "--url", exhausted_process],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    try:
        screen = _read_until(controller, r"sort: utilization.*orders-db.*\n")
        # orders-db at 100%: red from 95%
        assert re.search(r"\033\[31m#{10}\s+100\033\[0m", screen)
        os.write(controller, b"n")
        screen = _read_until(controller, r"sort: name.*sessions-dynamodb[^\n]*\n")
        frame = screen.rsplit("sort: name", 1)[1]
        names = [
            line.split()[0]
            for line in frame.splitlines()
            if TABLE_ROW.match(re.sub(r"\033\[[0-9;]*m", "", line))
        ]
        assert names == sorted(names)
        os.write(controller, b"q")
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        os.close(controller)


def test_top_reports_an_unreachable_endpoint_in_one_line() -> None:
    with refusing_port() as port:
        result = subprocess.run(
            [*POOLWATCH, "top", "--once", "--url", f"http://127.0.0.1:{port}/metrics"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"poolwatch top: cannot read http://127.0.0.1:{port}/metrics: [Errno 111] "
        "Connection refused\n"
    )
