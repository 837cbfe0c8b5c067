"""``poolwatch top``: the table from real endpoints, in a real pseudo-terminal."""

from __future__ import annotations

import os
import re
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
from poolwatch.cli import top as _top
from tests.support.demo import until_serving
from tests.support.terminal import on_terminal, read_until
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
    def row(
        name: str,
        utilization: float | None,
        timeouts: float | None,
        p99: float | None = None,
        discards: float | None = None,
    ) -> _top.Row:
        return _top.Row("urllib3", name, 0, 0, None, 0, utilization, p99, timeouts, discards, 0)

    table = [
        row("a", 0.5, 0.0, p99=0.002, discards=0.0),
        row("b", 0.99, None, p99=None, discards=4.5),
        row("c", None, 3.0, p99=0.250, discards=0.0),
        row("d", 0.5, 0.0, p99=0.002, discards=None),
    ]
    assert [r.name for r in _top.ordered(table, "u")] == ["b", "a", "d", "c"]
    assert [r.name for r in _top.ordered(table, "t")] == ["c", "a", "d", "b"]
    assert [r.name for r in _top.ordered(table, "w")] == ["c", "a", "d", "b"]
    assert [r.name for r in _top.ordered(table, "d")] == ["b", "a", "c", "d"]
    assert [r.name for r in _top.ordered(table, "n")] == ["a", "b", "c", "d"]
    # reversed: the worst last, ties still by name
    assert [r.name for r in _top.ordered(table, "u", reverse=True)] == ["c", "a", "d", "b"]
    assert [r.name for r in _top.ordered(table, "w", reverse=True)] == ["b", "a", "d", "c"]
    assert [r.name for r in _top.ordered(table, "d", reverse=True)] == ["d", "a", "c", "b"]


@pytest.fixture(scope="module")
def exhausted_process() -> Iterator[str]:
    """A real process serving poolwatch metrics: the demo's exhaustion scenario."""
    yield from _demo_process("exhaustion")


@pytest.fixture(scope="module")
def discarding_process() -> Iterator[str]:
    """The demo's discard scenario: waits in its database pool, discards in its HTTP pools."""
    yield from _demo_process("discard")


def _demo_process(scenario: str) -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen(
        [
            *POOLWATCH,
            "demo",
            "--scenario",
            scenario,
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
        until_serving(url)
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
        [*POOLWATCH, "top", "--once", "--interval", "2", "--url", exhausted_process],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\033[" not in result.stdout  # not a terminal: no colour
    assert result.stderr == f"poolwatch top: reading {exhausted_process} for 2 s …\n"
    rows = _parse_table(result.stdout)
    # every pool of the scenario, each with its limit of 2 (the pools it sizes to run out)
    assert {name: (row["kind"], row["max"]) for name, row in rows.items()} == {
        "orders-db": ("sqlalchemy", "2"),
        "inventory-api": ("requests", "2"),
        "pricing-api": ("httpx", "2"),
        "pricing-api-async": ("httpx", "2"),
        "sessions-dynamodb": ("botocore", "2"),
        "sessions-cache": ("redis", "2"),
    }
    for name, row in rows.items():
        used = int(row["used"])
        # the bar and the percentage say what used/max says
        assert row["pct"] == f"{used * 50}", (name, row)
        assert row["bar"] == "#" * min(10, used * 5) + "." * (10 - min(10, used * 5)), row
        assert row["leaks"] == "0", row
        assert row["p99"] == "-" or row["p99"].endswith("ms"), row
        if name in ("orders-db", "pricing-api", "pricing-api-async", "sessions-cache"):
            # blocking pools: their callers wait
            assert used <= 2, row
            assert row["disc"] == "0.0", row
        else:  # non-blocking urllib3 pools: nobody waits, the extra connections are discarded
            assert (row["pending"], row["tmo"]) == ("0", "0.0"), row
    # 8 workers holding 0.2-0.5 s on 2 connections: full, and callers queued, at any instant
    db = rows["orders-db"]
    assert (db["used"], db["idle"], int(db["pending"]) > 0) == ("2", "0", True), db
    # rates over 2 s of a random workload: the pools built to time out do
    assert float(rows["orders-db"]["tmo"]) > 0, rows["orders-db"]
    assert float(rows["pricing-api"]["tmo"]) + float(rows["pricing-api-async"]["tmo"]) > 0


def test_top_in_a_terminal_colours_sorts_and_quits(exhausted_process: str) -> None:
    argv = [*POOLWATCH, "top", "--interval", "0.5", "--url", exhausted_process]
    with on_terminal(argv, colour=True) as (process, controller):
        screen = read_until(controller, r"sort: utilization.*orders-db.*\n")
        # orders-db at 100%: red from 95%
        assert re.search(r"\033\[31m#{10}\s+100\033\[0m", screen)
        os.write(controller, b"n")
        screen = read_until(controller, r"sort: name.*sessions-dynamodb[^\n]*\n")
        frame = screen.rsplit("sort: name", 1)[1]
        names = [
            line.split()[0]
            for line in frame.splitlines()
            if TABLE_ROW.match(re.sub(r"\033\[[0-9;]*m", "", line))
        ]
        assert names == sorted(names)
        os.write(controller, b"q")
        assert process.wait(10) == 0


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


@pytest.fixture
def still_pools(tmp_path: Path) -> Iterator[str]:
    """This process serving pools in known, unchanging states: every cell of top is known.

    Nothing happens between top's two readings, so every rate is 0.0 and no wait p99 is
    shown; the leak threshold is 1 s, so every connection held counts as a leak.
    """
    from tests.support.upstream import ThreadedUpstream

    handle = poolwatch.instrument(prometheus_port=0, leak_threshold=1.0)
    assert handle.prometheus_address is not None
    engines, held = [], []

    def pool(name: str, size: int, opened: int, kept: int) -> None:
        engine = sa.create_engine(f"sqlite:///{tmp_path}/{name}.db", pool_size=size, max_overflow=0)
        poolwatch.track(engine, name=name)
        engines.append(engine)
        conns = [engine.connect() for _ in range(opened)]
        for conn in conns[kept:]:
            conn.close()  # back in the pool: idle
        held.extend(conns[:kept])

    pool("full-db", 2, 2, 2)  # 100%: red
    pool("busy-db", 5, 5, 4)  # exactly 80%: yellow
    pool("calm-db", 10, 5, 3)  # 30%
    with ThreadedUpstream() as upstream:
        import httpx
        import requests

        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=3))
        poolwatch.track(session, name="inventory-api")
        session.get(upstream.url, timeout=5).raise_for_status()  # one idle connection
        client = httpx.Client(limits=httpx.Limits(max_connections=None))
        poolwatch.track(client, name="pricing-api")
        client.get(upstream.url).raise_for_status()
        time.sleep(1.2)  # past the leak threshold
        host, port = handle.prometheus_address
        try:
            yield f"http://{host}:{port}/metrics"
        finally:
            for conn in held:
                conn.close()
            for engine in engines:
                engine.dispose()
            session.close()
            client.close()
            poolwatch.uninstrument()


STILL_ROWS = {  # name: kind, used/max, bar, %, idle, pending, p99, tmo/s, disc/s, leaks
    "busy-db": ["sqlalchemy", "4/5", "########..", "80", "1", "0", "-", "0.0", "0.0", "4"],
    "calm-db": ["sqlalchemy", "3/10", "###.......", "30", "2", "0", "-", "0.0", "0.0", "3"],
    "full-db": ["sqlalchemy", "2/2", "##########", "100", "0", "0", "-", "0.0", "0.0", "2"],
    "inventory-api": ["requests", "0/3", "..........", "0", "1", "0", "-", "0.0", "0.0", "0"],
    "pricing-api": ["httpx", "0/-", "-", "-", "1", "0", "-", "0.0", "0.0", "0"],
}


def test_every_row_of_a_real_process_exactly(still_pools: str) -> None:
    result = subprocess.run(
        [*POOLWATCH, "top", "--once", "--interval", "1", "--sort", "n", "--url", still_pools],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header == _top.HEADER
    assert {line.split()[0]: line.split()[1:] for line in lines} == STILL_ROWS
    assert [line.split()[0] for line in lines] == sorted(STILL_ROWS)  # --sort n


def test_colour_is_yellow_from_80_and_red_from_95_percent(still_pools: str) -> None:
    argv = [*POOLWATCH, "top", "--interval", "0.5", "--url", still_pools]
    with on_terminal(argv, colour=True) as (process, controller):
        screen = read_until(controller, r"sort: utilization.*pricing-api[^\n]*\n")
        os.write(controller, b"q")
        assert process.wait(10) == 0
    frame = screen.rsplit("sort: utilization", 1)[1]
    lines = {line.split()[0]: line for line in frame.splitlines() if line.split()}
    assert "\033[31m##########  100\033[0m" in lines["full-db"]
    assert "\033[33m########..   80\033[0m" in lines["busy-db"]
    assert "\033[" not in lines["calm-db"] + lines["inventory-api"] + lines["pricing-api"]
    # sorted by utilization, the unbounded pool last
    names = [n for n in lines if n in STILL_ROWS]
    assert names == ["full-db", "busy-db", "calm-db", "inventory-api", "pricing-api"]


def _column(frame: str, column: str) -> list[float]:
    values = []
    for line in frame.splitlines():
        match = TABLE_ROW.match(re.sub(r"\033\[[0-9;]*m", "", line))
        if match:
            text = match[column]
            values.append(-1.0 if text == "-" else float(text.removesuffix("ms")))
    return values


def test_w_and_d_sort_a_live_process_by_wait_and_discards(discarding_process: str) -> None:
    argv = [*POOLWATCH, "top", "--interval", "1", "--no-color", "--url", discarding_process]
    with on_terminal(argv) as (process, controller):
        read_until(controller, r"sort: utilization.*sessions-dynamodb[^\n]*\n")
        frames = {}
        for key, title in ((b"w", "wait_p99"), (b"d", "discards_per_s")):
            os.write(controller, key)
            # the frame a key press draws covers only the moment since the last one: judge
            # the next, a whole interval's rates
            pattern = rf"sort: {title}.*sort: {title}(?:[^\n]*\n){{9}}"
            frames[title] = read_until(controller, pattern).rsplit(f"sort: {title}", 1)[1]
        os.write(controller, b"q")
        assert process.wait(10) == 0
    for title, column in (("wait_p99", "p99"), ("discards_per_s", "disc")):
        values = _column(frames[title], column)
        assert len(values) == 6, frames[title]  # the discard scenario's six pools
        assert values == sorted(values, reverse=True), (title, frames[title])
    # real values lead: callers waited, connections were discarded
    assert _column(frames["wait_p99"], "p99")[0] > 0
    assert _column(frames["discards_per_s"], "disc")[0] > 0
