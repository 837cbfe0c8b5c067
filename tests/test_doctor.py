"""``poolwatch doctor``: findings and advice from real processes' metrics, and the rules."""

from __future__ import annotations

import dataclasses
import io
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

import poolwatch
from poolwatch.cli import doctor as _doctor
from poolwatch.cli import top as _top
from poolwatch.diagnostics import advice as _advice
from poolwatch.diagnostics.advice import Counts
from tests.support.demo import until_serving
from tests.support.terminal import on_terminal, read_until
from tests.support.upstream import ThreadedUpstream, refusing_port

pytestmark = pytest.mark.serial  # six demos judged by timing: run alone (scripts/test)

POOLWATCH = [sys.executable, "-m", "poolwatch"]


def _counts(**values: float | None) -> Counts:
    counts = Counts("sqlalchemy", "orders-db")
    for name, value in values.items():
        setattr(counts, name, value)
    return counts


def test_size_is_littles_law_with_headroom() -> None:
    before = _counts(checkouts=1000, timeouts=5, holds=1000, hold_total=200.0)
    now = _counts(
        checkouts=1100, timeouts=25, holds=1100, hold_total=250.0, used=2, max=2, pending=3
    )
    # (100 served + 20 timed out) / 10 s = 12/s; 50 s held over 100 returns = 0.5 s
    sized = _advice.sizing(now, before, 10.0)
    assert sized == _advice.Sizing(
        9,
        "12.0 checkouts/s wanted x 500 ms mean hold = 6.0 connections busy on average; "
        "x 1.5 headroom → 9",
    )
    [finding] = _advice.findings(now, before, 10.0)
    assert finding == _advice.Finding(
        "critical",
        "sqlalchemy",
        "orders-db",
        "exhausted",
        "20 callers timed out waiting for a connection in 10 s",
        "set create_engine(pool_size=…, max_overflow=…) (their sum is the maximum) to 9 "
        f"(now 2): {sized.reasoning}",
    )


def test_callers_waiting_count_towards_the_size() -> None:
    """Little's law for the queue: 30 wait-seconds in 10 s = 3 callers waiting on average."""
    before = _counts(checkouts=1000, holds=1000, hold_total=200.0, wait_total=100.0)
    now = _counts(checkouts=1100, holds=1100, hold_total=250.0, wait_total=130.0, used=5, max=5)
    assert _advice.sizing(now, before, 10.0) == _advice.Sizing(
        12,  # 10/s x 0.5 s = 5 busy, + 3 waiting = 8 wanting a connection; x 1.5 = 12
        "10.0 checkouts/s wanted x 500 ms mean hold = 5.0 connections busy on average + "
        "3.0 callers waiting; x 1.5 headroom → 12",
    )


def test_one_observation_of_a_level_is_not_enough() -> None:
    """Waiters seen at one scrape only (a request caught between queueing and assignment)."""
    now = _counts(used=2, max=10, pending=1)
    assert _advice.findings(now, _counts(used=2, max=10, pending=0), 10.0) == []
    [finding] = _advice.findings(now, _counts(used=2, max=10, pending=2), 10.0)
    assert finding.problem == "saturated: 2 of 10 connections in use, 1 callers waiting"


def test_a_comfortable_pool_has_no_findings() -> None:
    before = _counts(checkouts=0, holds=0, connects=5)
    now = _counts(checkouts=500, holds=500, hold_total=5.0, used=1, idle=4, max=10, connects=5)
    assert _advice.findings(now, before, 10.0) == []
    assert _advice.sizing(now, before, 10.0) == _advice.Sizing(
        1,  # 50/s x 10 ms = 0.5 busy; x 1.5 = 0.75, rounded up
        "50.0 checkouts/s wanted x 10 ms mean hold = 0.5 connections busy on average; "
        "x 1.5 headroom → 1",
    )


def test_each_rule_names_its_problem() -> None:
    quiet = Counts("httpx", "pricing-api")
    cases = {
        "overflowing": _counts(used=6, max=2),
        "saturated": _counts(used=2, max=2, pending=1),
        "utilization high": _counts(used=9, max=10),
        "discarding": Counts("requests", "api", discards=4, max=10),
        "overflow churn": _counts(discards=20, checkouts=100, max=10),
        "churn": _counts(checkouts=100, connects=90, max=10),
        "stale": _counts(stale=3, max=10),
        "leak": _counts(leaks_active=1, max=10),
    }
    for problem, now in cases.items():
        # the levels as observed twice; the counters as they grew from zero
        before = dataclasses.replace(
            now, checkouts=0, connects=0, discards=0, stale=0, holds=0, hold_total=0
        )
        found = _advice.findings(now, before, 10.0)
        assert [f.topic for f in found] == [problem], (problem, found)
    unbounded = Counts("httpx", "pricing-api")
    [finding] = _advice.findings(unbounded, quiet, 10.0)
    assert finding.problem == "unbounded: the pool has no connection limit"
    assert finding.advice.startswith("set httpx.Limits(max_connections=…)")
    # The anti-patterns the doctor leaves unsaid name topics these rules really produce.
    said_by = {topic for topics in _doctor._SAID_BY.values() for topic in topics}
    assert said_by == {"unbounded", "overflowing", "discarding", "stale"}
    assert said_by <= {*cases, finding.topic}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def reports() -> dict[str, tuple[int, str]]:
    """Doctor's report on each demo scenario, observed side by side for 2 s."""
    scenarios = ("healthy", "exhaustion", "discard", "stale", "leak", "churn")
    ports = {name: _free_port() for name in scenarios}
    demos = [
        subprocess.Popen(
            [
                *POOLWATCH,
                "demo",
                "--scenario",
                name,
                "--duration",
                "120",  # stopped below once observed: room for a slow machine's start-up
                "--port",
                str(port),
                "--database",
                "sqlite",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, port in ports.items()
    ]
    results: dict[str, tuple[int, str]] = {}
    try:
        for port in ports.values():
            until_serving(f"http://127.0.0.1:{port}/metrics")
        time.sleep(3)  # the leak scenario's connections pass its 3 s threshold

        def observe(name: str, port: int) -> None:
            out = io.StringIO()
            code = _doctor.run(
                f"http://127.0.0.1:{port}/metrics", interval=2.0, out=out, progress=io.StringIO()
            )
            results[name] = (code, out.getvalue())

        threads = [threading.Thread(target=observe, args=item) for item in ports.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:  # stopped before the module's other tests run: six busy demos load two cores
        for demo in demos:
            demo.terminate()
        for demo in demos:
            try:
                demo.wait(15)
            except subprocess.TimeoutExpired:  # a stuck demo is the failure, not a leftover
                demo.kill()
                demo.wait(15)
    return results


def _problems(report: str) -> set[tuple[str, str, str]]:
    """(severity, pool, problem name) of each finding in a report."""
    found = set()
    for line in report.splitlines():
        if line.startswith(("CRITICAL", "WARNING")):
            severity, rest = line.split(maxsplit=1)
            pool, problem = rest.split(": ", 1)
            found.add((severity, pool, problem.split(":")[0]))
    return found


def test_doctor_finds_the_exhausted_pool_and_sizes_it(reports: dict[str, tuple[int, str]]) -> None:
    code, report = reports["exhaustion"]
    assert code == _doctor.EXIT_FINDINGS
    assert ("CRITICAL", "orders-db (sqlalchemy)", "exhausted") in _problems(report)
    advice = report.split("orders-db (sqlalchemy): exhausted", 1)[1].splitlines()[1]
    recommended = int(advice.split(" to ", 1)[1].split()[0])
    assert recommended > 2  # the scenario's pool of 2 is far too small for 8 busy workers


def test_doctor_finds_discards_stale_connections_leaks_and_churn(
    reports: dict[str, tuple[int, str]],
) -> None:
    assert ("WARNING", "inventory-api (requests)", "discarding") in _problems(reports["discard"][1])
    assert ("WARNING", "inventory-api (requests)", "stale") in _problems(reports["stale"][1])
    assert ("WARNING", "orders-db (sqlalchemy)", "leak") in _problems(reports["leak"][1])
    churning = {p for p in _problems(reports["churn"][1]) if p[2] == "churn"}
    assert any(pool.endswith("(requests)") for _, pool, _ in churning)


def test_doctor_reports_nothing_wrong_with_a_healthy_workload(
    reports: dict[str, tuple[int, str]],
) -> None:
    code, report = reports["healthy"]
    assert _problems(report) == set(), report
    assert (code, report.splitlines()[1:]) == (0, ["no problems found"]), report


def test_doctor_cannot_read_an_endpoint_in_one_line() -> None:
    with refusing_port() as port:
        result = subprocess.run(
            [*POOLWATCH, "doctor", "--interval", "1", "--url", f"http://127.0.0.1:{port}/m"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"poolwatch doctor: cannot read http://127.0.0.1:{port}/m: [Errno 111] Connection refused\n"
    )


def test_a_pool_seen_at_one_reading_only_is_named_not_judged() -> None:
    """Counters compared with zeros would charge a pool's whole life to the interval."""
    before = {("sqlalchemy", "orders-db"): _counts(checkouts=100, connects=2, holds=100)}
    now = {
        ("sqlalchemy", "orders-db"): _counts(checkouts=300, connects=2, holds=300),
        # new: its 4 checkouts each opened a connection (warming up, not churning)
        ("sqlalchemy", "fresh-db"): Counts("sqlalchemy", "fresh-db", checkouts=4, connects=4),
    }
    assert _advice.findings(now["sqlalchemy", "fresh-db"], Counts("sqlalchemy", "fresh-db"), 2.0)
    found, unjudged = _doctor.report(now, before, 2.0)
    assert (found, unjudged) == (
        [],
        ["fresh-db (sqlalchemy): appeared during the observation, not judged"],
    )
    restarted = {("sqlalchemy", "orders-db"): _counts(checkouts=5, connects=5, holds=5)}
    assert _doctor.report(restarted, before, 2.0) == (
        [],
        ["orders-db (sqlalchemy): its counters went back (a restart?), not judged"],
    )


def test_antipatterns_of_the_process_are_findings_unless_already_said() -> None:
    before = Counts("httpx", "pricing-api", antipatterns={"unbounded_pool", "no_pool_timeout"})
    now = Counts("httpx", "pricing-api", antipatterns={"unbounded_pool", "no_pool_timeout"})
    found, _ = _doctor.report(
        {("httpx", "pricing-api"): now}, {("httpx", "pricing-api"): before}, 2.0
    )
    assert [(f.severity, f.topic) for f in found] == [
        ("warning", "unbounded"),  # the doctor's own, from the missing limit: said once
        ("warning", "no_pool_timeout"),
    ]
    assert found[1] == _advice.Finding(
        "warning",
        "httpx",
        "pricing-api",
        "no_pool_timeout",
        "found by poolwatch in the process (its WARNING log line has the numbers)",
        "set httpx.Timeout(…, pool=…) so that an exhausted pool fails fast with httpx.PoolTimeout",
    )


def test_antipatterns_no_longer_observed_are_not_findings() -> None:
    from poolwatch.cli import top as _top

    total = (
        "# TYPE poolwatch_antipatterns_total counter\n"
        'poolwatch_antipatterns_total{{antipattern="{0}",pool_kind="requests",pool_name="inv"}} 1\n'
    )
    active = (
        "# TYPE poolwatch_antipatterns_active gauge\n"
        'poolwatch_antipatterns_active{{antipattern="{0}",pool_kind="requests",pool_name="inv"}} '
        "{1}\n"
    )
    for order in (1, -1):  # whichever family the exposition lists first
        families = [
            total.format("pool_overflowing") + total.format("client_per_request"),
            active.format("pool_overflowing", 1) + active.format("client_per_request", 0),
        ][::order]
        [pool] = _top.parse("".join(families) + "# EOF\n").values()
        assert pool.antipatterns == {"pool_overflowing"}
        assert pool.antipatterns_stopped == {"client_per_request"}
    # a process of an earlier poolwatch exports no level: what it detected stands
    [pool] = _top.parse(total.format("pool_overflowing") + "# EOF\n").values()
    assert (pool.antipatterns, pool.antipatterns_stopped) == ({"pool_overflowing"}, set())


def test_the_process_view_findings_need_both_readings() -> None:
    from poolwatch.diagnostics.advice import ProcessCounts

    crowded = ProcessCounts(900, 1000, {("close_wait", "untracked"): 6})
    assert [f.problem for f in _doctor.process_findings(crowded, crowded)] == [
        "file descriptors: 900 of 1000 open (90%): at the limit, new connections fail with "
        "'Too many open files'",
        "close_wait: 6 TCP connections no tracked pool owns: their servers closed them "
        "and nothing in this process has",
    ]
    calmer = ProcessCounts(700, 1000, {("close_wait", "untracked"): 4})
    assert _doctor.process_findings(crowded, calmer) == []
    assert _doctor.process_findings(crowded, None) == []


def test_a_real_process_with_an_antipattern_and_connections_left_in_close_wait() -> None:
    handle = poolwatch.instrument(prometheus_port=0, process_view="on")
    assert handle.prometheus_address is not None
    host, port = handle.prometheus_address
    url = f"http://{host}:{port}/metrics"
    listener = socket.create_server(("127.0.0.1", 0))
    leaked = []
    with ThreadedUpstream() as upstream:
        forever = httpx.Client(base_url=upstream.url, timeout=httpx.Timeout(5.0, pool=None))
        forever.get("/")
        for _ in range(_doctor.CLOSE_WAIT_UNTRACKED + 1):  # a client that never closes
            leaked.append(socket.create_connection(listener.getsockname(), timeout=5))
            accepted, _ = listener.accept()
            accepted.close()  # the server closes: the client's socket waits in close_wait
        deadline = time.monotonic() + 5
        while (view := poolwatch.process_view()) is not None and view.count(
            "untracked", "close_wait"
        ) < len(leaked):
            assert time.monotonic() < deadline, view
            time.sleep(0.05)
        out = io.StringIO()
        try:
            code = _doctor.run(url, interval=1.0, out=out, progress=io.StringIO())
        finally:
            forever.close()
            for sock in leaked:
                sock.close()
            listener.close()
    lines = out.getvalue().splitlines()
    assert code == _doctor.EXIT_FINDINGS, lines
    assert (
        f"WARNING   {upstream.origin} (httpx): no_pool_timeout: found by poolwatch in the "
        "process (its WARNING log line has the numbers)"
    ) in lines
    assert (
        f"WARNING   the process (process view): close_wait: {len(leaked)} TCP connections no "
        "tracked pool owns: their servers closed them and nothing in this process has"
    ) in lines


class _Started(io.StringIO):
    """Progress output that tells when the doctor starts waiting (after its first reading)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def write(self, text: str) -> int:
        self.started.set()
        return super().write(text)


def test_a_pool_created_between_the_readings_of_a_real_process(tmp_path: Path) -> None:
    handle = poolwatch.instrument(prometheus_port=0)
    assert handle.prometheus_address is not None
    host, port = handle.prometheus_address
    url = f"http://{host}:{port}/metrics"
    steady = sa.create_engine(f"sqlite:///{tmp_path}/steady.db", pool_size=2, max_overflow=0)
    poolwatch.track(steady, name="steady-db")
    with steady.connect():
        pass
    fresh = sa.create_engine(f"sqlite:///{tmp_path}/fresh.db", pool_size=4, max_overflow=0)
    progress, out = _Started(), io.StringIO()

    def warm_up() -> None:  # after the first reading: 4 checkouts at once, 4 new connections
        assert progress.started.wait(10)
        poolwatch.track(fresh, name="fresh-db")
        held = [fresh.connect() for _ in range(4)]
        for conn in held:
            conn.close()

    thread = threading.Thread(target=warm_up)
    thread.start()
    try:
        code = _doctor.run(url, interval=2.0, out=out, progress=progress)
    finally:
        thread.join(10)
        steady.dispose()
        fresh.dispose()
    first, *rest = out.getvalue().splitlines()
    assert re.fullmatch(rf"2 pools observed for 2\.\d s at {re.escape(url)}", first), first
    assert (code, rest) == (
        0,
        [
            "NOTE      fresh-db (sqlalchemy): appeared during the observation, not judged: run "
            "the doctor again to judge it",
            "no problems found",
        ],
    )


def test_progress_off_a_terminal_is_a_line_every_few_seconds() -> None:
    stream = io.StringIO()
    started = time.monotonic()
    _top.countdown(2.5, "poolwatch doctor: observing http://x/metrics", stream, every=1.0)
    assert 2.5 <= time.monotonic() - started < 3.5
    assert stream.getvalue() == (
        "poolwatch doctor: observing http://x/metrics for 2.5 s …\n"
        "poolwatch doctor: observing http://x/metrics: 1 of 2.5 s …\n"
        "poolwatch doctor: observing http://x/metrics: 2 of 2.5 s …\n"
    )
    assert _top.PROGRESS_EVERY == 5.0


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    """This process, instrumented, serving one SQLite pool's metrics on loopback."""
    handle = poolwatch.instrument(prometheus_port=0)
    assert handle.prometheus_address is not None
    engine = sa.create_engine(f"sqlite:///{tmp_path}/orders.db", pool_size=2, max_overflow=0)
    poolwatch.track(engine, name="orders-db")
    with engine.connect():
        pass
    host, port = handle.prometheus_address
    try:
        yield f"http://{host}:{port}/metrics"
    finally:
        engine.dispose()
        poolwatch.uninstrument()


def test_progress_on_a_terminal_counts_the_seconds(endpoint: str) -> None:
    argv = [*POOLWATCH, "doctor", "--interval", "2", "--url", endpoint]
    with on_terminal(argv, stderr_only=True) as (process, controller):
        label = re.escape(f"poolwatch doctor: observing {endpoint}")
        seen = read_until(controller, r"1 of 2 s …\r?\n")
        assert process.wait(20) == 0
    assert re.search(rf"\r\x1b\[K{label}: 0 of 2 s …\r\x1b\[K{label}: 1 of 2 s …\r?\n", seen), seen


def test_ctrl_c_stops_the_doctor_with_130_and_one_line(endpoint: str) -> None:
    # Started as from a terminal's foreground: a test run started in the background (a
    # shell's `&`, some CI runners) ignores SIGINT, and a child inherits an ignored signal
    # (a handled one is reset to the default at exec).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [*POOLWATCH, "doctor", "--interval", "60", "--url", endpoint],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # bounded: the doctor writes it at once
        assert line == f"poolwatch doctor: observing {endpoint} for 60 s …\n"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)  # its pipes closed too: nothing left to the next test
    assert (process.returncode, out) == (130, "")
    assert err == "poolwatch doctor: interrupted before the second reading: no report\n"


@pytest.mark.parametrize("command", ["doctor", "top"])
def test_a_body_that_is_not_prometheus_is_one_line(command: str) -> None:
    with ThreadedUpstream() as server:  # answers every request with "ok"
        url = f"{server.url}/metrics"
        result = subprocess.run(
            [*POOLWATCH, command, "--interval", "1", "--url", url]
            + (["--once"] if command == "top" else []),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"poolwatch {command}: {url} does not serve metrics in the Prometheus text format "
        "(could not convert string to float: 'ok'): is it a poolwatch /metrics endpoint?\n"
    )


CONFIGURED_APP = """
import httpx
import sqlalchemy as sa

orders = sa.create_engine("sqlite:///orders.db", max_overflow=-1, pool_timeout=None)
reports = sa.create_engine("sqlite:///reports.db", pool_size=3, max_overflow=2)
unbounded = httpx.Limits(max_connections=None)
pricing = httpx.Client(base_url="https://pricing.internal", limits=unbounded)
"""


def test_doctor_judges_the_configuration_an_app_imports(tmp_path: Path) -> None:
    (tmp_path / "shopapp.py").write_text(CONFIGURED_APP)
    result = subprocess.run(
        [*POOLWATCH, "doctor", "--import", "shopapp"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert (result.returncode, result.stderr) == (_doctor.EXIT_FINDINGS, "")
    assert result.stdout.splitlines() == [
        "3 pools configured by shopapp",
        "POOL      https://pricing.internal (httpx): no limit",
        "WARNING   https://pricing.internal (httpx): httpx.Limits(max_connections=None): the "
        "pool has no connection limit",
        "          advice: set httpx.Limits(max_connections=…): an unbounded pool turns a slow "
        "server into a flood of connections, and the server's own connection limit becomes the "
        "first one hit",
        "POOL      sqlite:///orders.db (sqlalchemy): no limit, keeps up to 5 idle",
        "WARNING   sqlite:///orders.db (sqlalchemy): max_overflow=-1: the pool has no "
        "connection limit",
        "          advice: set create_engine(pool_size=…, max_overflow=…) (their sum is the "
        "maximum): an unbounded pool turns a slow server into a flood of connections, and the "
        "server's own connection limit becomes the first one hit",
        "WARNING   sqlite:///orders.db (sqlalchemy): pool_timeout=None: when the pool is "
        "exhausted a caller waits for a connection for ever",
        "          advice: set create_engine(pool_timeout=…) so that an exhausted pool fails "
        "fast with sqlalchemy.exc.TimeoutError",
        "POOL      sqlite:///reports.db (sqlalchemy): max 5, keeps up to 3 idle",
    ]
    missing = subprocess.run(
        [*POOLWATCH, "doctor", "--import", "no_such_app"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == (
        "poolwatch doctor: cannot import no_such_app: No module named 'no_such_app'\n"
    )


REDIS_APP = """
import redis

cache = redis.Redis.from_url("redis://:s3cret@cache.internal:6379/0", max_connections=2**31)
queue = redis.Redis(
    connection_pool=redis.BlockingConnectionPool.from_url(
        "redis://queue.internal:6380/2", max_connections=8, timeout=None
    )
)
"""


def test_doctor_judges_a_redis_configuration_in_redis_py_terms(tmp_path: Path) -> None:
    (tmp_path / "cacheapp.py").write_text(REDIS_APP)
    result = subprocess.run(
        [*POOLWATCH, "doctor", "--import", "cacheapp"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert (result.returncode, result.stderr) == (_doctor.EXIT_FINDINGS, "")
    assert result.stdout.splitlines() == [
        "2 pools configured by cacheapp",
        "POOL      redis://cache.internal:6379/0 (redis): no limit",
        "WARNING   redis://cache.internal:6379/0 (redis): redis.ConnectionPool with "
        "max_connections 2147483648 (redis-py's default before 8.0: no limit): the pool has no "
        "connection limit",
        "          advice: set max_connections=… of the redis.ConnectionPool / "
        "BlockingConnectionPool (Redis.from_url(…, max_connections=…)): an unbounded pool turns "
        "a slow server into a flood of connections, and the server's own connection limit "
        "becomes the first one hit",
        "POOL      redis://queue.internal:6380/2 (redis): max 8, keeps up to 8 idle",
        "WARNING   redis://queue.internal:6380/2 (redis): redis.BlockingConnectionPool"
        "(timeout=None): when the pool is exhausted a caller waits for a connection for ever",
        "          advice: set redis.BlockingConnectionPool(timeout=…) so that an exhausted pool "
        "fails fast with ConnectionError('No connection available.')",
    ]
    assert "s3cret" not in result.stdout


def test_sizing_and_findings_name_redis_py_settings() -> None:
    now = Counts(
        "redis",
        "sessions-cache",
        used=2,
        max=2,
        pending=3,
        checkouts=100,
        holds=100,
        hold_total=20.0,
        timeouts=10,
        stale=2,
    )
    before = dataclasses.replace(now, checkouts=0, holds=0, hold_total=0, timeouts=0, stale=0)
    found = {f.topic: f for f in _advice.findings(now, before, 10.0)}
    assert set(found) == {"exhausted", "stale"}
    assert found["exhausted"].advice == (
        "set max_connections=… of the redis.ConnectionPool / BlockingConnectionPool "
        "(Redis.from_url(…, max_connections=…)) to 4 (now 2): 11.0 checkouts/s wanted x 200 ms "
        "mean hold = 2.2 connections busy on average; x 1.5 headroom → 4"
    )
    assert found["stale"].advice.startswith("redis.Redis(health_check_interval=…)")
    [unbounded] = _advice.findings(Counts("redis", "cache"), Counts("redis", "cache"), 10.0)
    assert unbounded.topic == "unbounded"
    assert "max_connections" in unbounded.advice
