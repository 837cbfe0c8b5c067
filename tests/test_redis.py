"""redis-py pools (pool.kind redis) against a real, throw-away ``redis-server`` on loopback.

Each test uses a database of its own (``/<db>`` is part of a pool's name), so that pools of
earlier tests still awaiting collection never join its series. Exact values throughout:
checkouts, connects and closes against what the test did and what the server says
(``CLIENT LIST``, ``CLIENT KILL``), timeouts against the exceptions the callers caught.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

import poolwatch
from tests.support.harness import Harness
from tests.support.loopback import LoopbackServer
from tests.support.redis import RedisServer


def _redis_pools(name: str | None = None) -> list[poolwatch.PoolSnapshot]:
    return [s for s in poolwatch.pools() if s.kind == "redis" and (name is None or s.name == name)]


def _only(name: str) -> poolwatch.PoolSnapshot:
    snaps = _redis_pools(name)
    assert len(snaps) == 1, [s.name for s in _redis_pools()]
    return snaps[0]


def _name(server: RedisServer, db: int) -> str:
    return f"redis://127.0.0.1:{server.port}/{db}"


def _until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def _closed(snap: poolwatch.PoolSnapshot) -> dict[str, int]:
    return {reason: n for reason, n in snap.closed.items() if n}


# -- sync ------------------------------------------------------------------------------------
def test_a_client_from_a_url_is_one_pool_named_without_credentials(
    pw: Harness, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(redis_server.url(1, username="default"), max_connections=4)
    for i in range(5):
        client.set("key", i)
    assert client.get("key") == b"4"
    name = _name(redis_server, 1)
    snap = _only(name)
    assert (snap.used, snap.idle, snap.max, snap.pending) == (0, 1, 4, 0)
    assert (snap.checkouts, snap.connects, snap.reused, snap.timeouts) == (6, 1, 5, 0)
    assert snap.attributes == {"server.address": "127.0.0.1", "server.port": redis_server.port}
    got = pw.collect()
    where = {"pool__name": name, "pool__kind": "redis", "server__port": redis_server.port}
    assert got.value("poolwatch.connections", state="idle", **where) == 1
    assert got.value("poolwatch.connections", state="used", **where) == 0
    assert got.value("poolwatch.connections.max", **where) == 4
    assert got.value("poolwatch.pending_requests", **where) == 0
    assert got.count("poolwatch.wait.duration", outcome="acquired", **where) == 6
    assert got.count("poolwatch.use.duration", **where) == 6
    assert got.count("poolwatch.connect.duration", outcome="ok", **where) == 1
    assert got.value("poolwatch.checkouts.reused", **where) == 5
    assert got.value("poolwatch.timeouts", **where) == 0
    shown = repr(got.metrics)
    assert redis_server.password not in shown
    assert "default:" not in shown
    assert redis_server.password not in repr(poolwatch.pools())
    client.close()  # closes the pool it made: its connection is disposed of
    snap = _only(name)
    assert (snap.used, snap.idle) == (0, 0)
    assert _closed(snap) == {"disposed": 1}


def test_too_many_connections_is_an_exhaustion_counted_as_the_callers_saw_it(
    pw: Harness, redis_server: RedisServer
) -> None:
    pool = redis.ConnectionPool.from_url(redis_server.url(2), max_connections=2)
    client = redis.Redis(connection_pool=pool)
    held = [pool.get_connection() for _ in range(2)]
    caught = []
    for _ in range(3):
        try:
            client.ping()
        except redis.exceptions.ConnectionError as error:  # MaxConnectionsError
            caught.append(str(error))
    assert caught == ["Too many connections"] * 3
    name = _name(redis_server, 2)
    snap = _only(name)
    assert (snap.used, snap.idle, snap.max, snap.pending) == (2, 0, 2, 0)
    assert (snap.checkouts, snap.timeouts, snap.connects) == (2, 3, 2)
    got = pw.collect()
    assert got.value("poolwatch.timeouts", pool__name=name) == 3
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="timeout") == 3
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="error") == 0
    for conn in held:
        pool.release(conn)
    assert client.ping() is True
    snap = _only(name)
    assert (snap.used, snap.idle, snap.checkouts, snap.timeouts) == (0, 2, 3, 3)
    pool.disconnect()


def test_a_blocking_pool_shows_its_waiting_callers_and_counts_its_timeouts(
    pw: Harness, redis_server: RedisServer
) -> None:
    pool = redis.BlockingConnectionPool.from_url(redis_server.url(3), max_connections=2, timeout=10)
    client = redis.Redis(connection_pool=pool)
    name = _name(redis_server, 3)
    held = [pool.get_connection() for _ in range(2)]
    answers: list[bool] = []
    waiting = [threading.Thread(target=lambda: answers.append(client.ping())) for _ in range(3)]
    for thread in waiting:
        thread.start()
    _until(lambda: _only(name).pending == 3)
    snap = _only(name)
    assert (snap.used, snap.idle, snap.max, snap.pending) == (2, 0, 2, 3)
    assert pw.collect().value("poolwatch.pending_requests", pool__name=name) == 3
    for conn in held:
        pool.release(conn)
    for thread in waiting:
        thread.join(10)
    assert answers == [True, True, True]
    snap = _only(name)
    assert (snap.used, snap.idle, snap.pending, snap.checkouts, snap.timeouts) == (0, 2, 0, 5, 0)
    assert snap.connects == 2

    pool.timeout = 0.05
    held = [pool.get_connection() for _ in range(2)]
    caught = []
    for _ in range(4):
        try:
            client.ping()
        except redis.exceptions.ConnectionError as error:
            caught.append(str(error))
    assert caught == ["No connection available."] * 4
    snap = _only(name)
    assert (snap.checkouts, snap.timeouts) == (7, 4)
    got = pw.collect()
    timed_out = got.histogram("poolwatch.wait.duration", pool__name=name, outcome="timeout")
    assert timed_out.count == 4
    assert timed_out.min >= 0.05
    assert got.value("poolwatch.timeouts", pool__name=name) == 4
    for conn in held:
        pool.release(conn)
    pool.disconnect()


def test_connections_the_server_killed_are_stale_when_next_checked_out(
    pw: Harness, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(redis_server.url(4), client_name="pw-stale")
    pool = client.connection_pool
    held = [pool.get_connection() for _ in range(3)]
    for conn in held:
        pool.release(conn)
    name = _name(redis_server, 4)
    assert (_only(name).idle, _only(name).connects) == (3, 3)
    assert redis_server.client_count("pw-stale") == 3
    assert redis_server.kill_clients("pw-stale") == 3
    held = [pool.get_connection() for _ in range(3)]  # each found closed, and reconnected
    for conn in held:
        pool.release(conn)
    snap = _only(name)
    assert _closed(snap) == {"stale": 3}
    assert (snap.connects, snap.checkouts, snap.idle) == (6, 6, 3)
    assert redis_server.client_count("pw-stale") == 3
    got = pw.collect()
    assert got.value("poolwatch.connections.closed", pool__name=name, reason="stale") == 3
    assert got.count("poolwatch.connection.lifetime", pool__name=name, reason="stale") == 3
    client.close()
    assert _closed(_only(name)) == {"stale": 3, "disposed": 3}


def test_a_command_failing_on_its_connection_closes_it_as_an_error(
    pw: Harness, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(
        redis_server.url(5), client_name="pw-error", retry=Retry(NoBackoff(), 0)
    )
    client.ping()
    failures: list[BaseException] = []

    def blocked() -> None:
        try:
            client.blpop(["pw-nothing"], timeout=30)
        except redis.exceptions.ConnectionError as error:
            failures.append(error)

    thread = threading.Thread(target=blocked)
    thread.start()
    _until(lambda: any("b" in c.get("flags", "") for c in redis_server.clients()))
    assert redis_server.kill_clients("pw-error", idle=False) == 1
    thread.join(10)
    assert len(failures) == 1
    snap = _only(_name(redis_server, 5))
    assert _closed(snap) == {"error": 1}
    assert (snap.checkouts, snap.connects, snap.used, snap.idle) == (2, 1, 0, 0)
    assert client.ping() is True  # the connection reconnects
    assert _only(_name(redis_server, 5)).connects == 2
    client.close()


def test_a_pubsub_holds_its_connection_without_leaking_it(
    harness: Harness, redis_server: RedisServer
) -> None:
    harness.instrument(leak_threshold=0.1)
    client = redis.Redis.from_url(redis_server.url(6))
    client.ping()
    pubsub = client.pubsub()
    pubsub.subscribe("pw-channel")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    time.sleep(0.3)  # past the leak threshold
    name = _name(redis_server, 6)
    snap = _only(name)
    assert (snap.used, snap.idle, snap.checkouts, snap.leaks, snap.leaks_active) == (1, 0, 2, 0, 0)
    client.publish("pw-channel", "hello")  # a second connection: the first is the pubsub's
    assert pubsub.get_message(timeout=5)["data"] == b"hello"  # type: ignore[index]
    pubsub.close()  # a subscribed connection is of no use to others: thrown away
    snap = _only(name)
    assert (snap.used, snap.idle, snap.checkouts, snap.leaks) == (0, 1, 3, 0)
    assert _closed(snap) == {"invalidated": 1}
    got = harness.collect()
    assert got.count("poolwatch.use.duration", pool__name=name) == 2  # not the pubsub's
    assert got.value("poolwatch.leaks", pool__name=name) == 0
    client.close()


def test_a_single_connection_client_holds_one_connection_for_its_life(
    harness: Harness, redis_server: RedisServer
) -> None:
    harness.instrument(leak_threshold=0.1)
    client = redis.Redis.from_url(redis_server.url(7), single_connection_client=True)
    for _ in range(4):
        client.ping()
    time.sleep(0.3)
    snap = _only(_name(redis_server, 7))
    assert (snap.used, snap.checkouts, snap.connects, snap.leaks_active) == (1, 1, 1, 0)
    client.close()
    snap = _only(_name(redis_server, 7))
    assert (snap.used, snap.idle, snap.leaks) == (0, 0, 0)


def test_a_monitor_holds_its_connection_and_gives_it_back_as_a_use_again(
    harness: Harness, redis_server: RedisServer
) -> None:
    # leak_stacks="always": the holder's checkout drops the stack its checkout took
    harness.instrument(leak_threshold=0.1, leak_stacks="always")
    pool = redis.ConnectionPool.from_url(redis_server.url(23))
    client = redis.Redis(connection_pool=pool)
    with client.monitor() as monitor:
        client.ping()  # a second connection: the first is the monitor's
        seen = [monitor.next_command()["command"] for _ in range(3)]
        assert seen[-1] == "PING", seen  # after the new connection's HELLO and SELECT
        time.sleep(0.3)  # past the leak threshold
        snap = _only(_name(redis_server, 23))
        assert (snap.used, snap.checkouts, snap.leaks, snap.leaks_active) == (1, 2, 0, 0)
        assert pool._poolwatch_ledger.stacks == {}  # type: ignore[attr-defined]
    # Monitor.__exit__ gives it back (closed: it was in monitor mode); a checkout of the
    # same connection object afterwards is an ordinary use again
    pool.release(pool.get_connection())
    name = _name(redis_server, 23)
    snap = _only(name)
    assert (snap.used, snap.checkouts, snap.leaks) == (0, 3, 0)
    got = harness.collect()
    assert got.count("poolwatch.use.duration", pool__name=name) == 2  # the ping's, the last
    assert got.count("poolwatch.wait.duration", pool__name=name) == 3
    assert got.value("poolwatch.leaks", pool__name=name) == 0
    pool.disconnect()


def test_asyncio_pubsub_and_single_connection_clients_hold_without_using_or_leaking(
    harness: Harness, redis_server: RedisServer
) -> None:
    harness.instrument(leak_threshold=0.1, leak_stacks="always")
    name = _name(redis_server, 24)

    async def scenario() -> None:
        client = aredis.Redis.from_url(redis_server.url(24))
        pubsub = client.pubsub()
        await pubsub.subscribe("pw-async-channel")
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"  # type: ignore[index]
        single = aredis.Redis(connection_pool=client.connection_pool, single_connection_client=True)
        assert await single.ping() is True
        assert await single.ping() is True
        await asyncio.sleep(0.3)  # past the leak threshold
        snap = _only(name)
        assert (snap.used, snap.checkouts, snap.leaks, snap.leaks_active) == (2, 2, 0, 0)
        assert client.connection_pool._poolwatch_ledger.stacks == {}  # type: ignore[attr-defined]
        await single.aclose()  # gives its connection back: not a use
        await pubsub.aclose()
        assert await client.ping() is True  # an ordinary checkout: a use
        snap = _only(name)
        assert (snap.used, snap.checkouts, snap.leaks) == (0, 3, 0)
        await client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    got = harness.collect()
    assert got.count("poolwatch.use.duration", pool__name=name) == 1
    assert got.count("poolwatch.wait.duration", pool__name=name) == 3
    assert got.value("poolwatch.leaks", pool__name=name) == 0


def test_a_connection_kept_past_the_threshold_is_a_leak(
    harness: Harness, redis_server: RedisServer
) -> None:
    harness.instrument(leak_threshold=0.1, leak_stacks="always")
    pool = redis.ConnectionPool.from_url(redis_server.url(8))
    conn = pool.get_connection()
    time.sleep(0.3)
    name = _name(redis_server, 8)
    snap = _only(name)
    assert (snap.used, snap.leaks, snap.leaks_active) == (1, 1, 1)
    pool.release(conn)
    snap = _only(name)
    assert (snap.used, snap.leaks, snap.leaks_active) == (0, 1, 0)
    assert harness.collect().count("poolwatch.use.duration", pool__name=name) == 1
    pool.disconnect()


def test_a_pool_made_before_instrument_is_found_with_its_connections(
    harness: Harness, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(redis_server.url(9))
    client.ping()
    harness.instrument()
    name = _name(redis_server, 9)
    snap = _only(name)
    assert (snap.used, snap.idle, snap.checkouts, snap.connects) == (0, 1, 0, 0)
    client.ping()
    snap = _only(name)
    assert (snap.checkouts, snap.connects, snap.reused) == (1, 0, 1)
    client.close()  # opened before poolwatch saw it: closed, lifetime unknown
    assert _closed(_only(name)) == {"disposed": 1}
    assert harness.collect().count("poolwatch.connection.lifetime", pool__name=name) == 0


def test_misconfigured_pools_are_reported_in_redis_terms(
    pw: Harness, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    unbounded = redis.ConnectionPool.from_url(redis_server.url(10), max_connections=2**31)
    redis.Redis(connection_pool=unbounded).ping()
    forever = redis.BlockingConnectionPool.from_url(redis_server.url(11), timeout=None)
    redis.Redis(connection_pool=forever).ping()
    snaps = {s.name: s for s in _redis_pools()}
    loose = snaps[_name(redis_server, 10)]
    assert loose.max is None
    assert [a.name for a in loose.antipatterns] == ["unbounded_pool"]
    assert loose.antipatterns[0].problem == (
        "redis.ConnectionPool with max_connections 2147483648 (redis-py's default before 8.0: "
        "no limit): the pool has no connection limit"
    )
    assert "max_connections" in loose.antipatterns[0].advice
    patient = snaps[_name(redis_server, 11)]
    assert patient.max == 50
    assert [a.name for a in patient.antipatterns] == ["no_pool_timeout"]
    assert "BlockingConnectionPool(timeout=None)" in patient.antipatterns[0].problem
    assert "timeout=" in patient.antipatterns[0].advice
    assert "max_connections" not in pw.collect().names()  # no metric invented for it
    unbounded.disconnect()
    forever.disconnect()


def test_a_client_per_call_is_one_series_and_an_antipattern(
    pw: Harness, redis_server: RedisServer
) -> None:
    def lookup() -> None:
        client = redis.Redis.from_url(redis_server.url(12))  # the anti-pattern
        client.get("key")
        client.close()

    for _ in range(12):
        lookup()
    snap = _only(_name(redis_server, 12))
    assert (snap.instances_created, snap.checkouts, snap.connects) == (12, 12, 12)
    assert _closed(snap) == {"disposed": 12}
    assert [a.name for a in snap.antipatterns] == ["client_per_request"]
    assert "redis.Redis" in snap.antipatterns[0].advice


def test_track_names_a_client_and_a_second_site_is_named_apart(
    pw: Harness, redis_server: RedisServer
) -> None:
    first = redis.Redis.from_url(redis_server.url(13))
    second = redis.Redis.from_url(redis_server.url(13))
    line = sys._getframe().f_lineno - 1
    first.ping()
    second.ping()
    names = {s.name for s in _redis_pools()}
    assert {_name(redis_server, 13), f"{_name(redis_server, 13)} (tests/test_redis.py:{line})"} <= (
        names
    )
    poolwatch.track(first, name="sessions-cache")
    first.ping()
    assert _only("sessions-cache").checkouts == 1
    first.close()
    second.close()


def test_unix_socket_and_tls_pools_are_named_by_their_target(pw: Harness) -> None:
    unix = redis.Redis(unix_socket_path="/run/pw-test/redis.sock", db=3)
    tls = redis.Redis(host="cache.internal", port=6380, ssl=True, password="hunter2")
    names = {s.name: s for s in _redis_pools()}
    assert "unix:///run/pw-test/redis.sock db=3" in names
    assert names["unix:///run/pw-test/redis.sock db=3"].attributes == {}
    assert names["rediss://cache.internal:6380/0"].attributes == {
        "server.address": "cache.internal",
        "server.port": 6380,
    }
    assert "hunter2" not in repr(poolwatch.pools())
    unix.close()
    tls.close()


def test_uninstrument_restores_every_function_and_forgets_the_marks(
    harness: Harness, redis_server: RedisServer
) -> None:
    from redis import connection

    before = {
        cls: dict(vars(cls))
        for cls in (
            connection.ConnectionPool,
            connection.BlockingConnectionPool,
            connection.AbstractConnection,
            aredis.ConnectionPool,
            aredis.BlockingConnectionPool,
        )
    }
    handle = harness.instrument()
    assert "redis" in handle.libraries
    client = redis.Redis.from_url(redis_server.url(14))
    client.ping()
    [conn] = client.connection_pool._available_connections
    assert conn._poolwatch is not None
    poolwatch.uninstrument()
    assert "_poolwatch" not in vars(conn)
    assert "_poolwatch_ledger" not in vars(client.connection_pool)
    for cls, attributes in before.items():
        assert dict(vars(cls)) == attributes, cls
    assert client.ping() is True
    client.close()


# -- asyncio ---------------------------------------------------------------------------------
def test_an_asyncio_client_counts_exactly_and_disposes_on_aclose(
    pw: Harness, redis_server: RedisServer
) -> None:
    name = _name(redis_server, 20)

    async def scenario() -> None:
        client = aredis.Redis.from_url(redis_server.url(20), max_connections=3)
        await asyncio.gather(*(client.set(f"k{i}", i) for i in range(3)))  # three at once
        for i in range(4):
            await client.get(f"k{i % 3}")
        snap = _only(name)
        assert (snap.used, snap.idle, snap.max, snap.pending) == (0, 3, 3, 0)
        assert (snap.checkouts, snap.connects, snap.reused) == (7, 3, 4)
        held = [await client.connection_pool.get_connection() for _ in range(3)]
        caught = []
        for _ in range(2):
            try:
                await client.ping()
            except redis.exceptions.ConnectionError as error:
                caught.append(str(error))
        assert caught == ["Too many connections"] * 2
        assert (_only(name).used, _only(name).timeouts) == (3, 2)
        for conn in held:
            await client.connection_pool.release(conn)
        await client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    snap = _only(name)
    assert (snap.checkouts, snap.timeouts, snap.used, snap.idle) == (10, 2, 0, 0)
    assert _closed(snap) == {"disposed": 3}
    got = pw.collect()
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="timeout") == 2
    assert got.count("poolwatch.use.duration", pool__name=name) == 10
    assert got.count("poolwatch.connection.lifetime", pool__name=name, reason="disposed") == 3


def test_an_asyncio_blocking_pool_shows_waiting_tasks_and_counts_timeouts(
    pw: Harness, redis_server: RedisServer
) -> None:
    name = _name(redis_server, 21)

    async def scenario() -> None:
        pool = aredis.BlockingConnectionPool.from_url(
            redis_server.url(21), max_connections=2, timeout=10
        )
        client = aredis.Redis(connection_pool=pool)
        held = [await pool.get_connection() for _ in range(2)]
        waiting = [asyncio.ensure_future(client.ping()) for _ in range(3)]
        while _only(name).pending != 3:
            await asyncio.sleep(0.005)
        snap = _only(name)
        assert (snap.used, snap.idle, snap.max, snap.pending) == (2, 0, 2, 3)
        for conn in held:
            await pool.release(conn)
        assert await asyncio.gather(*waiting) == [True, True, True]
        assert (_only(name).pending, _only(name).checkouts) == (0, 5)
        pool.timeout = 0.05
        held = [await pool.get_connection() for _ in range(2)]
        caught = []
        for _ in range(3):
            try:
                await client.ping()
            except redis.exceptions.ConnectionError as error:
                caught.append(str(error))
        assert caught == ["No connection available."] * 3
        for conn in held:
            await pool.release(conn)
        await pool.disconnect()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    snap = _only(name)
    assert (snap.checkouts, snap.timeouts, snap.connects) == (7, 3, 2)
    assert pw.collect().value("poolwatch.timeouts", pool__name=name) == 3


def test_asyncio_connections_the_server_killed_are_stale(
    pw: Harness, redis_server: RedisServer
) -> None:
    name = _name(redis_server, 22)

    async def scenario() -> None:
        client = aredis.Redis.from_url(redis_server.url(22), client_name="pw-astale")
        pool = client.connection_pool
        held = [await pool.get_connection() for _ in range(2)]
        for conn in held:
            await pool.release(conn)
        assert redis_server.kill_clients("pw-astale") == 2
        await asyncio.sleep(0.05)  # the event loop reads the server's EOF on both sockets
        held = [await pool.get_connection() for _ in range(2)]
        for conn in held:
            await pool.release(conn)
        assert await client.ping() is True
        await client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    snap = _only(name)
    assert _closed(snap) == {"stale": 2, "disposed": 2}
    assert (snap.connects, snap.checkouts) == (4, 5)


# -- cluster ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_server() -> Any:
    with RedisServer(cluster=True) as server:
        yield server


def test_a_cluster_clients_per_node_pools_are_redis_pools(
    pw: Harness, cluster_server: RedisServer
) -> None:
    from redis.cluster import RedisCluster

    client = RedisCluster(
        host=cluster_server.host, port=cluster_server.port, password=cluster_server.password
    )
    name = f"redis://127.0.0.1:{cluster_server.port}/0"
    before = _only(name).checkouts
    for i in range(5):
        client.set(f"key-{i}", i)
    snap = _only(name)
    assert snap.checkouts == before + 5
    assert (snap.used, snap.pending) == (0, 0)
    assert snap.idle == cluster_server.client_count()  # every connection it has is the pool's
    assert cluster_server.password not in repr(pw.collect().metrics)
    client.close()


# -- redis-py's own OpenTelemetry metrics -------------------------------------------------------
def test_semconv_mirrors_never_double_redis_pys_own_metrics(redis_server: RedisServer) -> None:
    """redis-py emits db.client.connection.count, .create_time (CONNECTION_BASIC), .timeouts
    and .wait_time (CONNECTION_ADVANCED) once its observability is initialised; with the
    mirrors on, poolwatch then emits the other five and none of those. In a process of its
    own: redis-py records through the global MeterProvider, which can be set once."""
    script = textwrap.dedent(
        f"""
        import json
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        import poolwatch, redis
        from redis.observability import MetricGroup, OTelConfig, get_observability_instance

        def names(data):
            found = {{}}
            for rm in data.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name.startswith("db.client.connection"):
                            found.setdefault(m.name, []).append(sm.scope.name)
            return found

        def workload(db):
            client = redis.Redis.from_url({redis_server.url()!r}[:-1] + str(db))
            client.ping()
            pool = redis.BlockingConnectionPool.from_url(
                {redis_server.url()!r}[:-1] + str(db + 1), max_connections=1, timeout=0.01
            )
            held = pool.get_connection()
            try:
                redis.Redis(connection_pool=pool).ping()
            except redis.ConnectionError:
                pass
            pool.release(held)
            return client, pool

        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        metrics.set_meter_provider(provider)
        poolwatch.instrument(meter_provider=provider, semconv=True, process_view="off")
        kept = workload(30)
        before = names(reader.get_metrics_data())
        groups = [MetricGroup.CONNECTION_BASIC, MetricGroup.CONNECTION_ADVANCED]
        get_observability_instance().init(OTelConfig(metric_groups=groups))
        kept += workload(32)
        after = names(reader.get_metrics_data())
        print(json.dumps({{"before": before, "after": after}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    mirrors = [
        "db.client.connection.count",
        "db.client.connection.create_time",
        "db.client.connection.idle.max",
        "db.client.connection.idle.min",
        "db.client.connection.max",
        "db.client.connection.pending_requests",
        "db.client.connection.timeouts",
        "db.client.connection.use_time",
        "db.client.connection.wait_time",
    ]
    assert seen["before"] == {name: ["poolwatch"] for name in mirrors}
    redis_own = {
        "db.client.connection.count",
        "db.client.connection.create_time",
        "db.client.connection.timeouts",
        "db.client.connection.wait_time",
    }
    assert seen["after"] == {
        name: ["redis-py"] if name in redis_own else ["poolwatch"] for name in mirrors
    }


class _StandIn:
    """A connection class that is not redis-py's (redis-py's own tests use one): it never
    gets poolwatch's mark."""

    def __init__(self, **kwargs: object) -> None:
        self.pid = os.getpid()

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass


def test_a_connection_that_is_not_redis_pys_is_left_alone(pw: Harness) -> None:
    """Giving a pool a connection poolwatch never marked (a stand-in class, as redis-py's
    own tests use, or another pool's foreign object) is the library's business: no
    internal error, nothing counted."""
    pool = redis.ConnectionPool(connection_class=_StandIn)
    pool.release(_StandIn())
    apool = aredis.ConnectionPool(connection_class=_StandIn)
    with pytest.raises(KeyError):  # the asyncio pool's own answer to a foreign connection
        asyncio.run(apool.release(_StandIn()))  # type: ignore[arg-type]
    assert pw.handle is not None and pw.handle.errors == {}


def test_get_connection_warns_of_deprecated_arguments_as_bare_and_counts_either_call(
    pw: Harness, redis_server: RedisServer
) -> None:
    """The checkout hook calls the pool's own get_connection past redis-py's
    @deprecated_args wrapper only for a call without arguments; a call with the deprecated
    command name is checked by redis-py's own check, which warns as it does bare: at the
    application's line (where filters by module, and Python's default filter for
    ``__main__``, judge it), not at poolwatch's hook."""
    import warnings

    pool = redis.ConnectionPool.from_url(redis_server.url(25))
    apool = aredis.ConnectionPool.from_url(redis_server.url(26))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool.release(pool.get_connection())
        assert caught == []
        sync_line = sys._getframe().f_lineno + 1
        pool.release(pool.get_connection("GET"))

        async def scenario() -> int:
            await apool.release(await apool.get_connection())
            assert len(caught) == 1
            line = sys._getframe().f_lineno + 1
            await apool.release(await apool.get_connection("GET"))
            await apool.disconnect()
            return line

        async_line = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [w.category for w in caught] == [DeprecationWarning, DeprecationWarning]
    assert all("get_connection() without args" in str(w.message) for w in caught)
    assert [(w.filename, w.lineno) for w in caught] == [
        (__file__, sync_line),
        (__file__, async_line),
    ]
    for db, idle in ((25, 1), (26, 0)):  # the asyncio pool is disconnected already
        snap = _only(_name(redis_server, db))
        assert (snap.checkouts, snap.connects, snap.used, snap.idle) == (2, 1, 0, idle)
    pool.disconnect()


class _Chatty(LoopbackServer):
    """A stand-in for a server that writes before it is asked, to its first ``chatty``
    connections (a proxy's greeting, a server's error before it hangs up); silent to the
    others, which is all a checkout without a command needs. Not redis-server: it cannot be
    made to do this."""

    def __init__(self, chatty: int) -> None:
        super().__init__()
        self.chatty = chatty

    def serve(self, sock: socket.socket) -> None:
        with sock:
            if self.connections <= self.chatty:
                sock.sendall(b"+OK\r\n")
            sock.settimeout(0.05)
            while not self._stop.is_set():
                try:
                    if not sock.recv(4096):
                        return
                except TimeoutError:
                    continue


def test_reuse_counts_firsts_when_a_checkout_connects_and_fails(pw: Harness) -> None:
    """redis-py's get_connection connects, finds unread data, reconnects, finds it again
    and fails ("Connection not ready"): two connects for no checkout. Reuse counted as
    checkouts less connects read 1 here, not 3."""
    with _Chatty(chatty=2) as server:
        # The connect's handshake, redis-py's redis_connect_func: send nothing, wait a
        # moment for what the server says first (so that the pool's check finds it).
        def handshake(conn: Any) -> None:
            conn._parser.on_connect(conn)  # as redis-py's own handshake starts
            select.select([conn._sock], [], [], 0.2)

        pool = redis.ConnectionPool(
            host="127.0.0.1", port=server.port, protocol=2, redis_connect_func=handshake
        )
        poolwatch.track(pool, name="chatty")
        with pytest.raises(redis.exceptions.ConnectionError, match="Connection not ready"):
            pool.get_connection()
        for _ in range(4):  # the first connects; three reuse its connection
            pool.release(pool.get_connection())
        snap = _only("chatty")
        assert (snap.checkouts, snap.connects, snap.reused) == (4, 3, 3)
        assert server.connections == 3
        assert pw.collect().value("poolwatch.checkouts.reused", pool__name="chatty") == 3
        pool.disconnect()


def test_a_deprecation_warning_raised_as_an_error_is_no_failed_checkout(
    pw: Harness, redis_server: RedisServer
) -> None:
    """Under ``-W error``, redis-py's check raises the warning before any checkout, bare and
    with poolwatch: nothing waited, nothing failed, and the pool lends nothing."""
    import warnings

    pool = redis.ConnectionPool.from_url(redis_server.url(27))
    pool.release(pool.get_connection())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DeprecationWarning):
            pool.get_connection("GET")
    snap = _only(_name(redis_server, 27))
    assert (snap.checkouts, snap.used, snap.idle) == (1, 0, 1)
    got = pw.collect()
    assert got.count("poolwatch.wait.duration", pool__name=_name(redis_server, 27)) == 1
    assert (
        got.count("poolwatch.wait.duration", pool__name=_name(redis_server, 27), outcome="error")
        == 0
    )
    pool.disconnect()
