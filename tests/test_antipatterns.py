"""Anti-patterns, each reproduced for real and detected once; a healthy workload reports none.

Servers: the loopback HTTP upstreams of tests/support/upstream.py, and the session's real
PostgreSQL for the database pools. No mocks.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx
import pytest
import requests
import sqlalchemy as sa
import urllib3
from requests.adapters import HTTPAdapter

import poolwatch
from poolwatch.diagnostics import antipatterns as _antipatterns
from tests.conftest import Harness
from tests.support.postgres import PostgresCluster
from tests.support.upstream import AsyncioUpstream, ThreadedUpstream

pytestmark = pytest.mark.postgres


def _pg_name(pg: PostgresCluster) -> str:
    return f"postgresql://127.0.0.1:{pg.port}/{pg.dbname}"


def _found(kind: str | None = None) -> dict[str, list[str]]:
    """Anti-pattern names by pool name, as ``pools()`` shows them (and so detects them)."""
    return {
        s.name: [a.name for a in s.antipatterns]
        for s in poolwatch.pools()
        if kind is None or s.kind == kind
    }


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    found = [
        r.getMessage()
        for r in caplog.records
        if r.name == "poolwatch" and r.levelno == logging.WARNING and "Advice:" in r.getMessage()
    ]
    caplog.clear()
    return found


def _threads(target: Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=target) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
        assert not t.is_alive()


def _wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# -- client_per_request -----------------------------------------------------------------------
def _get_once(url: str) -> None:
    requests.get(url, timeout=5).raise_for_status()  # a new Session, so a new pool, per call


def test_a_client_per_request_is_reported_once_with_its_site(
    pw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    site = f"tests/test_antipatterns.py:{_get_once.__code__.co_firstlineno + 1}"
    with ThreadedUpstream() as upstream:
        for _ in range(_antipatterns.PER_REQUEST_INSTANCES - 1):
            _get_once(upstream.url)
        assert _found("requests") == {upstream.origin: []}  # nine: not yet
        assert _warnings(caplog) == []
        _get_once(upstream.url)
        assert _found("requests") == {upstream.origin: ["client_per_request"]}
        [message] = _warnings(caplog)
        assert message == (
            f"poolwatch: pool '{upstream.origin}' (requests): client_per_request: 10 pool "
            f"instances were created at {site} for 10 checkouts: a new client per request, "
            "so every request opens a new connection (TCP, TLS) and none is reused. Advice: "
            "use one requests.Session per process, made at start-up, instead of "
            "requests.get() or a Session per call"
        )
        for _ in range(5):
            _get_once(upstream.url)
        assert _found("requests") == {upstream.origin: ["client_per_request"]}
        assert _warnings(caplog) == []  # once per pool
        got = pw.collect()
        assert (
            got.value(
                "poolwatch.antipatterns",
                pool__name=upstream.origin,
                antipattern="client_per_request",
            )
            == 1
        )
        assert upstream.connections == 15


def test_an_engine_per_request_against_postgresql(pw: Harness, postgres: PostgresCluster) -> None:
    for _ in range(_antipatterns.PER_REQUEST_INSTANCES):
        engine = sa.create_engine(postgres.url())
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        engine.dispose()
    [snapshot] = [s for s in poolwatch.pools() if s.kind == "sqlalchemy"]
    assert [a.name for a in snapshot.antipatterns] == ["client_per_request"]
    assert snapshot.antipatterns[0].advice.startswith("create the engine once per process")
    # each dispose() replaces the engine's pool: two pool objects per engine
    assert (snapshot.instances_created, snapshot.checkouts) == (20, 10)


def test_many_pools_at_one_place_each_used_a_lot_are_not_a_client_per_request(
    pw: Harness,
) -> None:
    with ThreadedUpstream() as upstream:
        sessions = [requests.Session() for _ in range(_antipatterns.PER_REQUEST_INSTANCES)]
        for session in sessions:  # one per tenant, say, each reused
            for _ in range(_antipatterns.PER_REQUEST_CHECKOUTS + 1):
                session.get(upstream.url, timeout=5).raise_for_status()
        assert _found("requests") == {upstream.origin: []}
        for session in sessions:
            session.close()


# -- unbounded_pool --------------------------------------------------------------------------
def test_unbounded_pools_are_reported(pw: Harness, postgres: PostgresCluster) -> None:
    with ThreadedUpstream() as upstream:
        unbounded = httpx.Limits(max_connections=None)
        with (
            httpx.Client(base_url=upstream.url, limits=unbounded) as client,
            httpx.Client(base_url=f"http://localhost:{upstream.port}") as bounded,
        ):
            client.get("/")
            bounded.get("/")
            assert _found("httpx") == {
                upstream.origin: ["unbounded_pool"],
                f"http://localhost:{upstream.port}": [],
            }
            [snapshot] = [s for s in poolwatch.pools() if s.name == upstream.origin]
            assert snapshot.antipatterns[0].problem == (
                "httpx.Limits(max_connections=None): the pool has no connection limit"
            )
            assert snapshot.antipatterns[0].advice.startswith("set httpx.Limits(max_connections=…)")
    engine = sa.create_engine(postgres.url(), max_overflow=-1)
    with engine.connect():
        pass
    [database] = [s for s in poolwatch.pools() if s.kind == "sqlalchemy"]
    assert [a.name for a in database.antipatterns] == ["unbounded_pool"]
    assert database.antipatterns[0].problem.startswith("max_overflow=-1:")
    engine.dispose()


def test_an_aiohttp_connector_without_a_limit(pw: Harness) -> None:
    async def main() -> dict[str, list[str]]:
        with AsyncioUpstream() as upstream:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(base_url=upstream.url, connector=connector) as s:
                async with s.get("/") as response:
                    await response.read()
                return _found("aiohttp")

    assert list(asyncio.run(main()).values()) == [["unbounded_pool"]]


# -- no_pool_timeout -------------------------------------------------------------------------
def test_requests_with_pool_block_waits_for_ever(pw: Harness) -> None:
    with ThreadedUpstream() as upstream, requests.Session() as blocking, requests.Session() as ok:
        blocking.mount("http://", HTTPAdapter(pool_block=True))
        blocking.get(upstream.url, timeout=5)
        ok.get(f"http://localhost:{upstream.port}", timeout=5)
        found = _found("requests")
        assert found[upstream.origin] == ["no_pool_timeout"]
        assert found[f"http://localhost:{upstream.port}"] == []
        [snapshot] = [s for s in poolwatch.pools() if s.name == upstream.origin]
        assert snapshot.antipatterns[0].problem == (
            "HTTPAdapter(pool_block=True): when the pool is exhausted a caller waits for a "
            "connection for ever"
        )


def test_urllib3_callers_seen_waiting_without_a_pool_timeout(pw: Harness) -> None:
    with ThreadedUpstream(delay=0.5) as slow:
        bounded = urllib3.HTTPConnectionPool("127.0.0.1", slow.port, maxsize=1, block=True)
        _threads(lambda: bounded.request("GET", "/", pool_timeout=5).data, 3)
        assert _found("urllib3") == {slow.origin: []}  # they waited, with a timeout
        bounded.close()
        forever = urllib3.HTTPConnectionPool("localhost", slow.port, maxsize=1, block=True)
        threads = [
            threading.Thread(target=lambda: forever.request("GET", "/").data) for _ in range(3)
        ]
        for t in threads:
            t.start()
        name = f"http://localhost:{slow.port}"
        _wait_until(lambda: any(s.pending for s in poolwatch.pools() if s.name == name))
        assert _found("urllib3")[name] == ["no_pool_timeout"]
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        forever.close()


def test_httpx_without_a_pool_timeout(pw: Harness) -> None:
    with ThreadedUpstream() as upstream:
        forever = httpx.Timeout(5.0, pool=None)
        with httpx.Client(base_url=upstream.url, timeout=forever) as client:
            client.get("/")
            assert _found("httpx") == {upstream.origin: ["no_pool_timeout"]}


def test_sqlalchemy_without_a_pool_timeout(pw: Harness, postgres: PostgresCluster) -> None:
    engine = sa.create_engine(postgres.url(), pool_timeout=None)  # type: ignore[arg-type]
    with engine.connect():
        pass
    [snapshot] = [s for s in poolwatch.pools() if s.kind == "sqlalchemy"]
    assert [a.name for a in snapshot.antipatterns] == ["no_pool_timeout"]
    assert snapshot.antipatterns[0].advice.startswith("set create_engine(pool_timeout=…)")
    engine.dispose()


def test_aiohttp_session_without_a_total_or_connect_timeout(pw: Harness) -> None:
    async def main() -> dict[str, list[str]]:
        with AsyncioUpstream() as upstream:
            forever = aiohttp.ClientTimeout(total=None, connect=None)
            async with aiohttp.ClientSession(base_url=upstream.url, timeout=forever) as s:
                async with s.get("/") as response:
                    await response.read()
                return _found("aiohttp")

    assert list(asyncio.run(main()).values()) == [["no_pool_timeout"]]


# -- pool_overflowing ------------------------------------------------------------------------
def test_a_non_blocking_pool_discarding_connections(
    pw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with ThreadedUpstream(delay=0.2) as slow, requests.Session() as session:
        session.mount("http://", HTTPAdapter(pool_maxsize=2))
        _threads(lambda: session.get(slow.url, timeout=5).raise_for_status(), 6)
        discarded = sum("Connection pool is full" in r.getMessage() for r in caplog.records)
        assert discarded == 4
        assert _found("requests") == {slow.origin: []}  # 4 discards: under the threshold
        _threads(lambda: session.get(slow.url, timeout=5).raise_for_status(), 6)
        [snapshot] = [s for s in poolwatch.pools() if s.name == slow.origin]
        assert snapshot.closed["pool_full"] == 8
        assert [a.name for a in snapshot.antipatterns] == ["pool_overflowing"]
        assert snapshot.antipatterns[0].problem.startswith(
            "8 connections were opened past the pool's size and discarded when returned"
        )
        assert "requests.adapters.HTTPAdapter(pool_maxsize=…)" in snapshot.antipatterns[0].advice


def _active(name: str) -> dict[str, bool]:
    """Whether each anti-pattern found in the pool ``name`` is still observed (``pools()``)."""
    [snapshot] = [s for s in poolwatch.pools() if s.name == name]
    return {a.name: a.active for a in snapshot.antipatterns}


def test_overflowing_stops_being_active_when_the_discards_stop(
    pw: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_antipatterns, "STILL_SEEN", 1.0)  # five minutes in production
    with ThreadedUpstream(delay=0.2) as slow, requests.Session() as session:
        session.mount("http://", HTTPAdapter(pool_maxsize=2))

        def burst() -> None:
            _threads(lambda: session.get(slow.url, timeout=5).raise_for_status(), 6)

        burst()
        burst()
        assert _active(slow.origin) == {"pool_overflowing": True}
        collected = pw.collect()
        attributes = {"pool__name": slow.origin, "antipattern": "pool_overflowing"}
        assert collected.value("poolwatch.antipatterns.active", **attributes) == 1
        # no discard for STILL_SEEN: no longer observed; the detection stays counted
        _wait_until(lambda: _active(slow.origin) == {"pool_overflowing": False})
        collected = pw.collect()
        assert collected.value("poolwatch.antipatterns.active", **attributes) == 0
        assert collected.value("poolwatch.antipatterns", **attributes) == 1
        burst()  # discarding again: active again, and still one detection
        assert _active(slow.origin) == {"pool_overflowing": True}
        collected = pw.collect()
        assert collected.value("poolwatch.antipatterns.active", **attributes) == 1
        assert collected.value("poolwatch.antipatterns", **attributes) == 1


def test_a_client_made_per_request_stops_being_active_when_no_more_are_made(
    pw: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_antipatterns, "STILL_SEEN", 1.0)
    with ThreadedUpstream() as upstream:
        for _ in range(_antipatterns.PER_REQUEST_INSTANCES):
            _get_once(upstream.url)
        assert _active(upstream.origin) == {"client_per_request": True}
        _wait_until(lambda: _active(upstream.origin) == {"client_per_request": False})
        _get_once(upstream.url)  # one more client made for one request: at it again
        assert _active(upstream.origin) == {"client_per_request": True}


def test_a_misconfigured_pool_is_active_while_it_lives(pw: Harness) -> None:
    with ThreadedUpstream() as upstream:
        client = httpx.Client(base_url=upstream.url, limits=httpx.Limits(max_connections=None))
        client.get("/")
        assert _active(upstream.origin) == {"unbounded_pool": True}
        client.close()
        del client
        gc.collect()  # the pool is gone; its series stays a while, exported with nothing open
        assert _active(upstream.origin) == {"unbounded_pool": False}
        attributes = {"pool__name": upstream.origin, "antipattern": "unbounded_pool"}
        collected = pw.collect()
        assert collected.value("poolwatch.antipatterns.active", **attributes) == 0
        assert collected.value("poolwatch.antipatterns", **attributes) == 1


# -- keepalive_too_long ----------------------------------------------------------------------
def test_keep_alive_outliving_the_servers_idle_timeout(pw: Harness) -> None:
    with ThreadedUpstream(idle_timeout=0.05) as dropping, requests.Session() as session:
        session.get(dropping.url, timeout=5)
        for round_ in range(1, _antipatterns.STALE_COLLECTIONS + 1):
            _wait_until(lambda r=round_: dropping.closed_idle == r)  # type: ignore[misc]
            session.get(dropping.url, timeout=5)  # finds the connection dropped: stale
            found = _found("requests")[dropping.origin]
            if round_ < _antipatterns.STALE_COLLECTIONS:
                assert found == []
        assert found == ["keepalive_too_long"]
        [snapshot] = [s for s in poolwatch.pools() if s.name == dropping.origin]
        assert snapshot.closed["stale"] == 3
        assert snapshot.antipatterns[0].problem == (
            "3 idle connections were found closed by the server when reused (75% of 4 "
            "checkouts): the client keeps idle connections longer than the server does"
        )


def test_one_burst_of_stale_connections_is_not_the_pattern(pw: Harness) -> None:
    """A server restart drops every idle connection at once: one collection sees them all."""
    with (
        ThreadedUpstream(idle_timeout=0.05, delay=0.1) as dropping,
        requests.Session() as session,
    ):
        session.mount("http://", HTTPAdapter(pool_maxsize=4))
        for _ in range(2):
            _threads(lambda: session.get(dropping.url, timeout=5).raise_for_status(), 4)
            _wait_until(lambda: dropping.closed_idle == dropping.connections)
        # the second burst found all four dropped, within one collection interval
        [snapshot] = [s for s in poolwatch.pools() if s.name == dropping.origin]
        assert (snapshot.closed["stale"], dropping.connections) == (4, 8)
        assert snapshot.antipatterns == ()


# -- connection_too_old ----------------------------------------------------------------------
def test_connections_older_than_the_configured_age(
    harness: Harness, postgres: PostgresCluster
) -> None:
    harness.instrument(connection_max_age=0.3)
    engine = sa.create_engine(postgres.url())
    with ThreadedUpstream() as upstream, requests.Session() as session:
        with engine.connect():
            pass
        session.get(upstream.url, timeout=5)
        assert _found() == {_pg_name(postgres): [], upstream.origin: []}
        time.sleep(0.4)
        found = _found()
        assert found == {
            _pg_name(postgres): ["connection_too_old"],
            upstream.origin: ["connection_too_old"],
        }
        [database] = [s for s in poolwatch.pools() if s.kind == "sqlalchemy"]
        problem = database.antipatterns[0].problem
        assert re.fullmatch(
            r"a connection has been open for \d+ s, past connection_max_age=0\.3 s: it still "
            r"talks to the address DNS gave when it opened \(a failover or rotation goes "
            r"unnoticed\)",
            problem,
        ), problem
        assert database.antipatterns[0].advice == (
            "set create_engine(pool_recycle=…) below connection_max_age"
        )
        assert _active(_pg_name(postgres)) == {"connection_too_old": True}
        engine.dispose()  # the old connection is closed: no longer observed
        assert _active(_pg_name(postgres)) == {"connection_too_old": False}
        with engine.connect():  # a new one, old in its turn
            pass
        time.sleep(0.4)
        assert _active(_pg_name(postgres)) == {"connection_too_old": True}
    engine.dispose()


# -- exported, and healthy ------------------------------------------------------------------
def test_prometheus_renders_the_antipatterns_counter_and_level() -> None:
    handle = poolwatch.instrument(prometheus_port=0)
    try:
        assert handle.prometheus_address is not None
        host, port = handle.prometheus_address
        with (
            ThreadedUpstream() as upstream,
            httpx.Client(base_url=upstream.url, limits=httpx.Limits(max_connections=None)) as c,
        ):
            c.get("/")
            body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
    finally:
        poolwatch.uninstrument()
    for name in ("poolwatch_antipatterns_total", "poolwatch_antipatterns_active"):
        assert re.search(
            "^" + name + r'\{antipattern="unbounded_pool",otel_scope_name="poolwatch",'
            r'[^}]*pool_kind="httpx",pool_name="' + re.escape(upstream.origin) + r'"[^}]*\} 1\.0$',
            body.decode(),
            re.M,
        ), body.decode()


def test_a_healthy_workload_reports_nothing(
    pw: Harness, postgres: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    engine = sa.create_engine(postgres.url(), pool_size=4, max_overflow=2)
    with (
        ThreadedUpstream(delay=0.002) as upstream,
        requests.Session() as session,
        httpx.Client(base_url=upstream.url) as client,
    ):

        def work() -> None:
            for _ in range(25):
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                session.get(upstream.url, timeout=5).raise_for_status()
                client.get("/").raise_for_status()
                poolwatch.pools()  # collections while it runs

        _threads(work, 4)
        snapshots = poolwatch.pools()
    assert {s.kind for s in snapshots} == {"sqlalchemy", "requests", "httpx"}
    assert [(s.name, s.antipatterns) for s in snapshots if s.antipatterns] == []
    assert _warnings(caplog) == []
    assert pw.collect().points("poolwatch.antipatterns") == []
    engine.dispose()


def test_a_misconfiguration_read_failing_is_contained(pw: Harness, monkeypatch: Any) -> None:
    from poolwatch.adapters.httpx import HTTPXAdapter

    def broken(self: Any, pool: Any) -> Any:
        raise RuntimeError("adapter fault")

    monkeypatch.setattr(HTTPXAdapter, "misconfigurations", broken)  # an injected fault
    with ThreadedUpstream() as upstream, httpx.Client(base_url=upstream.url) as client:
        assert client.get("/").status_code == 200
        assert [s.checkouts for s in poolwatch.pools()] == [1]
    assert pw.handle is not None and pw.handle.errors == {"anti-patterns": 1}
