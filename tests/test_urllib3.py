"""urllib3 pools, direct and through PoolManager, ProxyManager and requests, on real servers.

Every test runs against real HTTP servers on 127.0.0.1 (tests/support/upstream.py) and
asserts exact counts: requests made, connections the server accepted, closes by reason.
boto3 through botocore's urllib3 pools is in test_botocore.py.
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import urllib3
from urllib3 import connection, connectionpool, exceptions, poolmanager

import poolwatch
from poolwatch import _registry
from poolwatch.adapters.urllib3 import pool_target
from tests.support.harness import Harness
from tests.support.pools import one_pool
from tests.support.proxy import ConnectProxy
from tests.support.threads import blocked_in, wait_until
from tests.support.upstream import AsyncioUpstream, ThreadedUpstream, refusing_port


@pytest.fixture
def upstream() -> Iterator[ThreadedUpstream]:
    with ThreadedUpstream() as server:
        yield server


_pool = functools.partial(one_pool, kind="urllib3")


@pytest.mark.semconv
def test_keep_alive_requests_reuse_one_connection(pw: Harness, upstream: ThreadedUpstream) -> None:
    manager = urllib3.PoolManager(maxsize=3)
    for _ in range(5):
        assert manager.request("GET", upstream.url + "/a").data == b"ok\n"
    snap = _pool(upstream.origin)
    assert (snap.used, snap.idle, snap.max, snap.pending) == (0, 1, 3, 0)
    assert (snap.checkouts, snap.connects, upstream.connections, upstream.requests) == (5, 1, 1, 5)
    assert (snap.reused, snap.reuse_ratio) == (4, 0.8)  # keep-alive at work
    assert snap.attributes == {"server.address": "127.0.0.1", "server.port": upstream.port}
    got = pw.collect()
    name = upstream.origin
    assert got.value("poolwatch.connections", pool__name=name, state="idle") == 1
    assert got.value("poolwatch.connections", pool__name=name, state="used") == 0
    assert got.value("poolwatch.connections.max", pool__name=name) == 3
    assert got.value("poolwatch.connections.idle.max", pool__name=name) == 3  # maxsize
    assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 5
    assert got.count("poolwatch.use.duration", pool__name=name) == 5
    assert got.count("poolwatch.connect.duration", pool__name=name, outcome="ok") == 1
    point = got.points("poolwatch.connections", pool__name=name, state="idle")[0]
    assert dict(point.attributes) == {
        "pool.name": name,
        "pool.kind": "urllib3",
        "server.address": "127.0.0.1",
        "server.port": upstream.port,
        "state": "idle",
    }
    # The HTTP semantic-convention mirrors.
    idle = got.points("http.client.open_connections", pool__name=name)
    assert {p.attributes["http.connection.state"]: p.value for p in idle} == {
        "active": 0,
        "idle": 1,
    }
    assert idle[0].attributes["server.port"] == upstream.port
    assert got.count("http.client.request.time_in_queue", pool__name=name) == 5
    assert "http.client.connection.duration" not in got.names()  # nothing closed yet
    manager.clear()
    gc.collect()
    got = pw.collect()
    assert got.count("http.client.connection.duration", pool__name=name) == 1


def _same_histogram(a: Any, b: Any) -> None:
    """Two exported histogram points carry exactly the same values."""
    assert (a.count, a.sum, a.min, a.max) == (b.count, b.sum, b.min, b.max)
    assert list(a.bucket_counts) == list(b.bucket_counts)


@pytest.mark.semconv
def test_semconv_mirrors_while_a_request_is_in_flight(
    pw: Harness, upstream: ThreadedUpstream
) -> None:
    manager = urllib3.PoolManager(maxsize=2)
    manager.request("GET", upstream.url)
    held = manager.request("GET", upstream.url, preload_content=False)  # holds its connection
    second = manager.request("GET", upstream.url, preload_content=False)  # a second one
    second.read()
    second.release_conn()
    got = pw.collect()
    name = upstream.origin
    mirrors = got.points("http.client.open_connections", pool__name=name)
    assert {p.attributes["http.connection.state"]: p.value for p in mirrors} == {
        "active": 1,
        "idle": 1,
    }
    [active] = [p for p in mirrors if p.attributes["http.connection.state"] == "active"]
    assert dict(active.attributes) == {
        "pool.name": name,
        "server.address": "127.0.0.1",
        "server.port": upstream.port,
        "http.connection.state": "active",
    }
    queue = got.histogram("http.client.request.time_in_queue", pool__name=name)
    assert queue.count == 3
    assert dict(queue.attributes) == {
        "pool.name": name,
        "server.address": "127.0.0.1",
        "server.port": upstream.port,
    }
    _same_histogram(
        queue, got.histogram("poolwatch.wait.duration", pool__name=name, outcome="acquired")
    )
    assert held.read() == b"ok\n"
    held.release_conn()
    time.sleep(0.1)  # both connections live at least this long
    manager.clear()
    del held, second
    gc.collect()
    got = pw.collect()
    duration = got.histogram("http.client.connection.duration", pool__name=name)
    assert duration.count == 2 and duration.min >= 0.1
    assert duration.attributes["server.port"] == upstream.port
    _same_histogram(
        duration,
        got.histogram("poolwatch.connection.lifetime", pool__name=name, reason="disposed"),
    )


@pytest.mark.semconv
def test_semconv_mirrors_for_requests_pools(pw: Harness, upstream: ThreadedUpstream) -> None:
    with requests.Session() as session:
        held = session.get(upstream.url, stream=True)  # the body unread: the connection held
        got = pw.collect()
        mirrors = got.points("http.client.open_connections", pool__name=upstream.origin)
        assert {p.attributes["http.connection.state"]: p.value for p in mirrors} == {
            "active": 1,
            "idle": 0,
        }
        assert {(p.attributes["server.address"], p.attributes["server.port"]) for p in mirrors} == {
            ("127.0.0.1", upstream.port)
        }
        assert got.value("poolwatch.connections", pool__kind="requests", state="used") == 1
        assert held.text == "ok\n"
        session.get(upstream.url)
        got = pw.collect()
        mirrors = got.points("http.client.open_connections", pool__name=upstream.origin)
        assert {p.attributes["http.connection.state"]: p.value for p in mirrors} == {
            "active": 0,
            "idle": 1,
        }
        assert got.count("http.client.request.time_in_queue", pool__name=upstream.origin) == 2
        del held
    gc.collect()
    got = pw.collect()
    assert got.count("http.client.connection.duration", pool__name=upstream.origin) == 1


def test_semconv_mirrors_are_opt_in(pw: Harness, upstream: ThreadedUpstream) -> None:
    manager = urllib3.PoolManager()
    manager.request("GET", upstream.url)
    names = pw.collect().names()
    assert "poolwatch.connections" in names
    assert not {n for n in names if not n.startswith("poolwatch.")}
    manager.clear()


def test_used_counts_connections_beyond_maxsize_and_each_discard_is_pool_full(
    pw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with ThreadedUpstream(delay=0.3) as slow:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", slow.port, maxsize=2, block=False)
        seen: list[int] = []
        threads = [threading.Thread(target=pool.request, args=("GET", "/")) for _ in range(6)]
        with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
            for t in threads:
                t.start()
            wait_until(lambda: _pool(slow.origin).used == 6)
            seen.append(_pool(slow.origin).used)
            for t in threads:
                t.join()
        discards = [r for r in caplog.records if "Connection pool is full" in r.getMessage()]
        snap = _pool(slow.origin)
        assert seen == [6]  # used above max: block=False opens extra connections
        assert (snap.used, snap.idle, snap.max) == (0, 2, 2)
        assert len(discards) == 4
        assert snap.closed["pool_full"] == 4
        assert (snap.connects, slow.connections) == (6, 6)
        got = pw.collect()
        assert (
            got.value("poolwatch.connections.closed", pool__name=slow.origin, reason="pool_full")
            == 4
        )
        assert (
            got.count("poolwatch.connection.lifetime", pool__name=slow.origin, reason="pool_full")
            == 4
        )
        pool.close()


def test_blocking_pool_times_out_callers_and_shows_them_pending(
    pw: Harness, upstream: ThreadedUpstream
) -> None:
    pool = urllib3.HTTPConnectionPool(
        "127.0.0.1", upstream.port, maxsize=2, block=True, retries=False
    )
    held = [pool.urlopen("GET", "/", preload_content=False) for _ in range(2)]  # at its limit
    outcomes: list[str] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            pool.urlopen("GET", "/", pool_timeout=0.5)
            result = "ok"
        except exceptions.EmptyPoolError:
            result = "timeout"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: blocked_in(threads, "_get_conn") == 4)
    waiting = _pool(upstream.origin)
    got = pw.collect()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert (waiting.used, waiting.pending) == (2, 4)
    assert got.value("poolwatch.pending_requests", pool__name=upstream.origin) == 4
    assert got.value("poolwatch.connections", pool__name=upstream.origin, state="used") == 2
    assert outcomes == ["timeout"] * 4
    for response in held:
        assert response.read() == b"ok\n"
        response.release_conn()
    snap = _pool(upstream.origin)
    assert (snap.timeouts, snap.checkouts, snap.pending, snap.used, snap.idle) == (4, 2, 0, 0, 2)
    got = pw.collect()
    assert got.value("poolwatch.timeouts", pool__name=upstream.origin) == 4
    assert got.value("poolwatch.pending_requests", pool__name=upstream.origin) == 0
    timed_out = got.histogram(
        "poolwatch.wait.duration", pool__name=upstream.origin, outcome="timeout"
    )
    assert timed_out.count == 4
    assert timed_out.min >= 0.5
    assert (snap.connects, upstream.connections, upstream.requests) == (2, 2, 2)
    pool.close()


def test_blocked_callers_are_served_in_turn_and_pending_drops_to_zero(
    pw: Harness, upstream: ThreadedUpstream
) -> None:
    pool = urllib3.HTTPConnectionPool("127.0.0.1", upstream.port, maxsize=1, block=True)
    held = pool.urlopen("GET", "/", preload_content=False)
    threads = [threading.Thread(target=pool.request, args=("GET", "/")) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: blocked_in(threads, "_get_conn") == 3)
    assert pw.collect().value("poolwatch.pending_requests", pool__name=upstream.origin) == 3
    held.read()
    held.release_conn()  # each caller in turn gets the one connection back
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    got = pw.collect()
    assert got.value("poolwatch.pending_requests", pool__name=upstream.origin) == 0
    assert got.count("poolwatch.wait.duration", pool__name=upstream.origin) == 4
    assert (upstream.connections, upstream.requests) == (1, 4)
    pool.close()


def test_server_closing_idle_keep_alives_makes_stale_closes(pw: Harness) -> None:
    with ThreadedUpstream(idle_timeout=0.05) as server:
        manager = urllib3.PoolManager()
        manager.request("GET", server.url)
        wait_until(lambda: server.closed_idle == 1)
        manager.request("GET", server.url)  # finds the dropped connection, reconnects
        snap = _pool(server.origin)
        assert snap.closed["stale"] == 1
        assert sum(snap.closed.values()) == 1
        assert (snap.checkouts, snap.connects, server.connections) == (2, 2, 2)
        got = pw.collect()
        lifetime = got.histogram(
            "poolwatch.connection.lifetime", pool__name=server.origin, reason="stale"
        )
        assert lifetime.count == 1
        assert lifetime.min >= 0.05
        manager.clear()


def test_server_ending_connections_counts_invalidated_when_the_pool_lets_go(
    pw: Harness,
) -> None:
    with ThreadedUpstream() as server:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=1)
        for _ in range(3):
            pool.request("GET", "/", headers={"Connection": "close"})
        snap = _pool(server.origin)
        # The third connection sits closed in the queue until the pool lets go of it.
        assert (snap.connects, snap.closed["invalidated"], snap.idle) == (3, 2, 0)
        pool.close()
        assert _pool(server.origin).closed["invalidated"] == 3


HANDSHAKE = 0.2
"""Seconds a TLS upstream sleeps inside each handshake (``handshake_delay``)."""


def test_tls_connects_are_timed(pw: Harness, upstream: ThreadedUpstream) -> None:
    with ThreadedUpstream(tls=True, handshake_delay=HANDSHAKE) as server:
        manager = urllib3.PoolManager(ca_certs=server.ca_file)
        for _ in range(3):
            assert manager.request("GET", server.url).status == 200
        snap = _pool(server.origin)
        assert server.origin.startswith("https://127.0.0.1:")
        assert (snap.checkouts, snap.connects, server.connections) == (3, 1, 1)
        connect = pw.collect().histogram(
            "poolwatch.connect.duration", pool__name=server.origin, outcome="ok"
        )
        assert connect.count == 1
        assert connect.min >= HANDSHAKE  # the TLS handshake is inside the connect
        manager.clear()
    plain = urllib3.PoolManager()
    plain.request("GET", upstream.url)
    connect = pw.collect().histogram(
        "poolwatch.connect.duration", pool__name=upstream.origin, outcome="ok"
    )
    assert connect.count == 1 and connect.max < HANDSHAKE  # TCP alone
    plain.clear()


def test_refused_connect_is_a_connect_error_and_returns_the_slot(pw: Harness) -> None:
    with refusing_port() as port:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1, retries=False)
        for _ in range(2):
            with pytest.raises(exceptions.NewConnectionError):
                pool.request("GET", "/")
        snap = _pool(f"http://127.0.0.1:{port}")
        assert (snap.used, snap.checkouts, snap.connects, snap.connect_errors) == (0, 2, 0, 2)
        assert sum(snap.closed.values()) == 0  # nothing was ever open
        got = pw.collect()
        name = f"http://127.0.0.1:{port}"
        assert got.count("poolwatch.use.duration", pool__name=name) == 2
        assert got.count("poolwatch.connect.duration", pool__name=name, outcome="error") == 2
        pool.close()


def test_a_request_failing_midway_ends_the_use_and_closes_as_error(pw: Harness) -> None:
    with ThreadedUpstream(delay=0.5) as slow:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", slow.port, maxsize=1, retries=False)
        with pytest.raises(exceptions.ReadTimeoutError):
            pool.request("GET", "/", timeout=urllib3.Timeout(read=0.05))
        snap = _pool(slow.origin)
        assert (snap.used, snap.checkouts, snap.connects) == (0, 1, 1)
        assert snap.closed["error"] == 1
        assert pw.collect().count("poolwatch.use.duration", pool__name=slow.origin) == 1
        pool.close()


def test_a_pool_evicted_from_the_manager_stays_visible_while_in_use(
    pw: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ThreadedUpstream() as first, AsyncioUpstream() as second:
        manager = urllib3.PoolManager(num_pools=1)
        held = manager.request("GET", first.url, preload_content=False)
        manager.request("GET", second.url)  # evicts the first server's pool from the LRU
        assert len(manager.pools) == 1
        evicted = _pool(first.origin)
        assert (evicted.used, evicted.idle) == (1, 0)
        assert held.read() == b"ok\n"
        held.release_conn()
        del held
        gc.collect()
        gone = [s for s in poolwatch.pools() if s.name == first.origin]
        # Shown with its final counts, nothing open, until RETENTION has passed.
        assert [(s.instances, s.used, s.closed["disposed"]) for s in gone] == [(0, 0, 1)]
        closed = pw.collect().value(
            "poolwatch.connections.closed", pool__name=first.origin, reason="disposed"
        )
        assert closed == 1
        monkeypatch.setattr(_registry, "RETENTION", 0.0)
        assert [s.name for s in poolwatch.pools() if s.name == first.origin] == [first.origin]
        assert [s.name for s in poolwatch.pools() if s.name == first.origin] == []
        manager.clear()


def test_counts_stay_exact_with_eight_threads(pw: Harness, upstream: ThreadedUpstream) -> None:
    manager = urllib3.PoolManager(maxsize=8)
    per_thread = 40

    def hammer() -> None:
        for _ in range(per_thread):
            manager.request("GET", upstream.url)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    snap = _pool(upstream.origin)
    assert snap.checkouts == upstream.requests == 8 * per_thread
    assert snap.connects == upstream.connections
    assert snap.used == 0
    assert pw.collect().count("poolwatch.use.duration", pool__name=upstream.origin) == 320
    manager.clear()


def test_names_never_carry_credentials_or_queries(pw: Harness, upstream: ThreadedUpstream) -> None:
    manager = urllib3.PoolManager()
    manager.request("GET", f"http://alice:s3cret@127.0.0.1:{upstream.port}/x?token=abc")
    # A forwarding proxy: the upstream answers the proxied request itself.
    proxy = urllib3.ProxyManager(f"http://bob:hunter2@127.0.0.1:{upstream.port}")
    proxy.request("GET", "http://example.invalid/path?api_key=zzz")
    names = {s.name for s in poolwatch.pools()}
    assert names == {upstream.origin, f"{upstream.origin} (proxy)"}
    exported = repr(pw.collect().metrics)
    for secret in ("alice", "s3cret", "bob", "hunter2", "token", "api_key", "abc", "zzz"):
        assert secret not in exported
    manager.clear()
    proxy.clear()


def test_a_tunnel_through_a_proxy_is_named_by_target_and_proxy() -> None:
    proxy = urllib3.util.parse_url("http://carol:pw@proxy.internal:3128")
    pool = urllib3.HTTPSConnectionPool("api.example.com", 443, _proxy=proxy)
    assert pool_target(pool) == (
        "https://api.example.com via http://proxy.internal:3128",
        {"server.address": "api.example.com", "server.port": 443},
    )


def _secrets_absent(exported: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in exported, secret


def test_proxy_manager_tunnels_to_a_tls_upstream(pw: Harness) -> None:
    with (
        ThreadedUpstream(tls=True, handshake_delay=HANDSHAKE) as upstream,
        ConnectProxy() as proxy,
    ):
        manager = urllib3.ProxyManager(
            f"http://carol:s3cret@127.0.0.1:{proxy.port}",
            proxy_headers=urllib3.make_headers(proxy_basic_auth="carol:s3cret"),
            ca_certs=upstream.ca_file,
        )
        for _ in range(3):
            assert manager.request("GET", upstream.url + "/x?token=abc").data == b"ok\n"
        name = f"{upstream.origin} via {proxy.url}"
        snap = _pool(name)
        assert (snap.checkouts, snap.connects, snap.idle, snap.used) == (3, 1, 1, 0)
        assert (proxy.connections, proxy.tunnels) == (1, 1)
        assert (upstream.connections, upstream.requests) == (1, 3)
        assert proxy.authorizations == [b"Basic Y2Fyb2w6czNjcmV0"]  # carol:s3cret reached it
        assert snap.attributes == {"server.address": "127.0.0.1", "server.port": upstream.port}
        got = pw.collect()
        connect = got.histogram("poolwatch.connect.duration", pool__name=name, outcome="ok")
        # One connect: TCP to the proxy, the CONNECT exchange, TLS with the origin.
        assert connect.count == 1 and connect.min >= HANDSHAKE
        assert got.value("poolwatch.connections", pool__name=name, state="idle") == 1
        _secrets_absent(repr((got.metrics, poolwatch.pools())), "carol", "s3cret", "token", "abc")
        manager.clear()
    gc.collect()
    assert {r: n for r, n in _pool(name).closed.items() if n} == {"disposed": 1}


def test_requests_through_a_tunnelling_proxy(pw: Harness) -> None:
    with (
        ThreadedUpstream(tls=True) as upstream,
        ConnectProxy() as proxy,
        requests.Session() as session,
    ):
        proxies = {"https": f"http://dave:hunter2@127.0.0.1:{proxy.port}"}
        for _ in range(3):  # no response kept: one would keep its pool alive after close()
            assert session.get(upstream.url, proxies=proxies, verify=upstream.ca_file).ok
        name = f"{upstream.origin} via {proxy.url}"
        [snap] = [s for s in poolwatch.pools() if s.kind == "requests"]
        assert snap.name == name
        assert (snap.checkouts, snap.connects, snap.idle, snap.used) == (3, 1, 1, 0)
        assert (proxy.connections, proxy.tunnels, upstream.connections) == (1, 1, 1)
        assert len(proxy.authorizations) == 1  # dave's credentials reached the proxy
        got = pw.collect()
        assert got.count("poolwatch.connect.duration", pool__name=name, outcome="ok") == 1
        assert got.count("poolwatch.wait.duration", pool__name=name, outcome="acquired") == 3
        _secrets_absent(repr((got.metrics, poolwatch.pools())), "dave", "hunter2")
    gc.collect()
    assert {r: n for r, n in _pool(name, kind="requests").closed.items() if n} == {"disposed": 1}


def test_requests_session_pools_are_kind_requests(
    pw: Harness, upstream: ThreadedUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    with requests.Session() as session:
        for _ in range(3):
            assert session.get(upstream.url).text == "ok\n"
        snap = _pool(upstream.origin, kind="requests")
        assert (snap.checkouts, snap.connects, snap.idle, snap.max) == (3, 1, 1, 10)
    gc.collect()
    # The session closed its pool: shown with its final counts until RETENTION has passed.
    assert [(s.instances, s.closed["disposed"]) for s in poolwatch.pools()] == [(0, 1)]
    assert pw.collect().value("poolwatch.connections.closed", reason="disposed") == 1
    assert [(s.instances, s.checkouts) for s in poolwatch.pools()] == [(0, 3)]
    monkeypatch.setattr(_registry, "RETENTION", 0.0)
    assert [s.checkouts for s in poolwatch.pools()] == [3]  # read once more, then removed
    assert poolwatch.pools() == []


def _get(url: str) -> None:
    requests.get(url, timeout=5)  # one Session, so one pool, per call: the same call site


def test_module_level_requests_aggregate_at_their_call_site(
    pw: Harness, upstream: ThreadedUpstream
) -> None:
    for _ in range(4):
        _get(upstream.url)
    with requests.Session() as session:  # a second creation site for the same server
        session_line = sys._getframe().f_lineno - 1
        session.get(upstream.url)
        snaps = {s.name: s for s in poolwatch.pools() if s.kind == "requests"}
    per_call = snaps[upstream.origin]
    assert (per_call.instances_created, per_call.checkouts, per_call.connects) == (4, 4, 4)
    assert (per_call.reused, per_call.reuse_ratio) == (0, 0.0)  # a Session per call: no reuse
    assert per_call.closed["disposed"] == 4  # each Session closed its connection
    assert set(snaps) == {
        upstream.origin,
        f"{upstream.origin} (tests/test_urllib3.py:{session_line})",
    }


def test_session_made_before_instrument_is_found(
    harness: Harness, upstream: ThreadedUpstream
) -> None:
    session = requests.Session()
    session.get(upstream.url)
    harness.instrument()
    session.get(upstream.url)
    snap = _pool(upstream.origin, kind="requests")
    assert (snap.checkouts, snap.idle) == (1, 1)
    session.close()


def test_track_names_a_session(pw: Harness, upstream: ThreadedUpstream) -> None:
    with requests.Session() as session:
        poolwatch.track(session, name="payments-api")
        session.get(upstream.url)
        snap = _pool("payments-api", kind="requests")
        assert snap.checkouts == 1


def test_uninstrument_restores_urllib3(harness: Harness, upstream: ThreadedUpstream) -> None:
    originals = {
        (cls, attr): cls.__dict__.get(attr)
        for cls, attr in [
            (connectionpool.HTTPConnectionPool, "_get_conn"),
            (connectionpool.HTTPConnectionPool, "_put_conn"),
            (connectionpool.HTTPConnectionPool, "_new_conn"),
            (connectionpool.HTTPConnectionPool, "__init__"),
            (connectionpool.HTTPSConnectionPool, "_new_conn"),
            (connection.HTTPConnection, "connect"),
            (connection.HTTPConnection, "close"),
            (connection.HTTPSConnection, "connect"),
            (poolmanager.PoolManager, "__init__"),
            (poolmanager.PoolManager, "_new_pool"),
        ]
    }
    harness.instrument()
    assert all(cls.__dict__.get(attr) is not fn for (cls, attr), fn in originals.items())
    manager = urllib3.PoolManager()
    manager.request("GET", upstream.url)
    poolwatch.uninstrument()
    assert all(cls.__dict__.get(attr) is fn for (cls, attr), fn in originals.items())
    assert "_poolwatch_ledger" not in connectionpool.HTTPConnectionPool.__dict__
    assert "_poolwatch" not in connection.HTTPConnection.__dict__
    (pool,) = manager.pools._container.values()
    assert [
        vars(conn) for conn in pool.pool.queue if conn is not None and "_poolwatch" in vars(conn)
    ] == []
    manager.request("GET", upstream.url)
    assert harness.collect().names() == set()
    manager.clear()


def test_a_blocking_pool_counts_connections_checked_out_before_instrument(
    harness: Harness,
) -> None:
    with ThreadedUpstream() as upstream:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", upstream.port, maxsize=3, block=True)
        held = [pool.request("GET", "/", preload_content=False) for _ in range(2)]
        harness.instrument()
        [snap] = poolwatch.pools()
        assert (snap.used, snap.idle, snap.max, snap.checkouts) == (2, 0, 3, 0)
        more = pool.request("GET", "/", preload_content=False)
        [snap] = poolwatch.pools()
        assert (snap.used, snap.checkouts) == (3, 1)
        for response in [*held, more]:
            response.read()
            response.release_conn()
        [snap] = poolwatch.pools()
        assert (snap.used, snap.idle, snap.checkouts) == (0, 3, 1)
        pool.close()


def test_a_session_per_call_keeps_one_series_whose_counters_only_grow(
    pw: Harness, upstream: ThreadedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """``requests.get()`` makes a Session, so a pool, per call; each is gone before the
    next call. The series outlives them: with a collection every 10 calls, the exported
    counts keep growing under one start time, and the anti-pattern is reported once."""
    caplog.set_level(logging.WARNING, logger="poolwatch")
    counts, starts = [], set()
    for _ in range(30):
        for _ in range(10):
            _get(upstream.url)
        gc.collect()
        point = pw.collect().histogram(
            "poolwatch.wait.duration", pool__name=upstream.origin, outcome="acquired"
        )
        counts.append(point.count)
        starts.add(point.start_time_unix_nano)
    assert counts == list(range(10, 301, 10))
    assert len(starts) == 1
    warnings = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warnings) == 1
    [snap] = [s for s in poolwatch.pools() if s.kind == "requests"]
    assert (snap.instances_created, snap.checkouts, upstream.requests) == (300, 300, 300)
