"""httpx Client and AsyncClient pools against real loopback servers: exact counts.

Servers: tests/support/upstream.py's HTTP/1.1 servers, tests/support/proxy.py's real
tunnelling (CONNECT) proxy, plus, in this module, a real HTTP/2 (h2c) server on the h2
package. No mocks.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import httpcore
import httpx
import pytest

import poolwatch
from poolwatch.adapters.httpx import HTTPXAdapter
from tests.support.harness import Harness
from tests.support.loopback import H2Upstream
from tests.support.pools import one_pool
from tests.support.proxy import ConnectProxy
from tests.support.threads import blocked_in, until, wait_until
from tests.support.upstream import AsyncioUpstream, ThreadedUpstream, refusing_port

_pool = functools.partial(one_pool, kind="httpx")


def _run_threads(target: Callable[[], None], count: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=target) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(10)
        assert not t.is_alive()


# -- levels, checkouts, connects ---------------------------------------------------------------
def _four_requests(client: httpx.Client) -> None:
    for _ in range(4):
        assert client.get("/").text == "ok\n"


def test_keep_alive_requests_reuse_one_connection(pw: Harness) -> None:
    with ThreadedUpstream() as upstream, httpx.Client(base_url=upstream.url) as client:
        _four_requests(client)
        snap = _pool(upstream.origin)
    assert (snap.used, snap.idle, snap.max, snap.pending) == (0, 1, 100, 0)
    assert (snap.checkouts, snap.connects) == (4, 1)
    assert (upstream.connections, upstream.requests) == (1, 4)
    assert (snap.reused, snap.reuse_ratio) == (3, 0.75)


def test_a_pools_points_name_its_server(pw: Harness) -> None:
    with ThreadedUpstream() as upstream, httpx.Client(base_url=upstream.url) as client:
        _four_requests(client)
        got = pw.collect()
    [idle] = got.points("poolwatch.connections", pool__name=upstream.origin, state="idle")
    assert dict(idle.attributes) == {
        "pool.name": upstream.origin,
        "pool.kind": "httpx",
        "server.address": "127.0.0.1",
        "server.port": upstream.port,
        "state": "idle",
    }
    assert idle.value == 1
    assert got.value("poolwatch.connections.max", pool__name=upstream.origin) == 100
    assert got.value("poolwatch.pending_requests", pool__name=upstream.origin) == 0
    assert got.count("poolwatch.wait.duration", pool__name=upstream.origin) == 4
    assert got.count("poolwatch.use.duration", pool__name=upstream.origin) == 4
    assert got.count("poolwatch.connect.duration", pool__name=upstream.origin) == 1


@pytest.mark.semconv
def test_the_semconv_mirrors_of_a_pool_at_rest(pw: Harness) -> None:
    with ThreadedUpstream() as upstream, httpx.Client(base_url=upstream.url) as client:
        _four_requests(client)
        got = pw.collect()
    mirrors = got.points("http.client.open_connections", pool__name=upstream.origin)
    assert {p.attributes["http.connection.state"]: p.value for p in mirrors} == {
        "active": 0,
        "idle": 1,
    }
    assert got.count("http.client.request.time_in_queue", pool__name=upstream.origin) == 4


def test_closing_the_client_closes_its_connection_as_disposed(pw: Harness) -> None:
    with ThreadedUpstream() as upstream:
        with httpx.Client(base_url=upstream.url) as client:
            _four_requests(client)
            assert _pool(upstream.origin).closed.get("disposed", 0) == 0
        assert _pool(upstream.origin).closed["disposed"] == 1


def _same_histogram(a: Any, b: Any) -> None:
    """Two exported histogram points carry exactly the same values."""
    assert (a.count, a.sum, a.min, a.max) == (b.count, b.sum, b.min, b.max)
    assert (list(a.bucket_counts), list(a.explicit_bounds)) == (
        list(b.bucket_counts),
        list(b.explicit_bounds),
    )


@pytest.mark.semconv
def test_semconv_mirrors_while_requests_are_in_flight(pw: Harness) -> None:
    with (
        ThreadedUpstream() as first,
        AsyncioUpstream() as second,
        httpx.Client() as client,
    ):
        held = _held(client, first.url)  # in flight: its connection is active
        assert client.get(second.url).text == "ok\n"  # done: its connection is idle
        got = pw.collect()
        mirrors = got.points("http.client.open_connections", pool__name="httpx")
        assert {
            (p.attributes["server.port"], p.attributes["http.connection.state"]): p.value
            for p in mirrors
        } == {
            (first.port, "active"): 1,
            (first.port, "idle"): 0,
            (second.port, "active"): 0,
            (second.port, "idle"): 1,
        }
        [active] = [
            p for p in mirrors if p.value == 1 and p.attributes["server.port"] == first.port
        ]
        assert dict(active.attributes) == {
            "pool.name": "httpx",
            "server.address": "127.0.0.1",
            "server.port": first.port,
            "http.connection.state": "active",
        }
        _same_histogram(
            got.histogram("http.client.request.time_in_queue", pool__name="httpx"),
            got.histogram("poolwatch.wait.duration", pool__name="httpx", outcome="acquired"),
        )
        assert got.count("http.client.request.time_in_queue", pool__name="httpx") == 2
        held.read()
        held.close()
        time.sleep(0.1)  # both connections live at least this long
    got = pw.collect()  # the client closed both
    duration = got.histogram("http.client.connection.duration", pool__name="httpx")
    assert duration.count == 2 and duration.min >= 0.1
    _same_histogram(
        duration,
        got.histogram("poolwatch.connection.lifetime", pool__name="httpx", reason="disposed"),
    )
    assert dict(duration.attributes) == {"pool.name": "httpx"}


def test_idle_max_is_exported_from_max_keepalive_connections(pw: Harness) -> None:
    limits = httpx.Limits(max_connections=5, max_keepalive_connections=3)
    with ThreadedUpstream() as upstream:
        with httpx.Client(base_url=upstream.url, limits=limits) as bounded:
            bounded.get("/")
            unbounded = httpx.Client(base_url=upstream.url, limits=httpx.Limits())
            site = f"tests/test_httpx.py:{sys._getframe().f_lineno - 1}"
            with unbounded:
                unbounded.get("/")
                got = pw.collect()
        name = upstream.origin
        assert got.value("poolwatch.connections.idle.max", pool__name=name) == 3
        assert got.value("poolwatch.connections.max", pool__name=name) == 5
        other = f"{name} ({site})"
        assert got.value("poolwatch.connections", pool__name=other, state="idle") == 1
        assert got.points("poolwatch.connections.idle.max", pool__name=other) == []
        assert got.points("poolwatch.connections.max", pool__name=other) == []
        assert _pool(name).idle_max == 3


def test_limits_are_read_from_the_pool(pw: Harness) -> None:
    limits = httpx.Limits(max_connections=5, max_keepalive_connections=3)
    with httpx.Client(limits=limits) as bounded, httpx.Client(limits=httpx.Limits()) as open_:
        adapter = HTTPXAdapter(cast(Any, None))  # levels() reads the pool alone
        first = adapter.levels(bounded._transport._pool)
        second = adapter.levels(open_._transport._pool)
    assert (first.max, first.idle_max, first.used, first.idle, first.pending) == (5, 3, 0, 0, 0)
    # httpx.Limits() is unbounded: no max, and the limit is not exported
    assert (second.max, second.idle_max) == (None, None)


def test_used_and_idle_per_origin(pw: Harness) -> None:
    with (
        ThreadedUpstream(delay=0.3) as first,
        AsyncioUpstream(delay=0.3) as second,
        httpx.Client() as client,
    ):
        threads = [
            threading.Thread(target=client.get, args=(url,))
            for url in (first.url, first.url, second.url)
        ]
        for t in threads:
            t.start()
        wait_until(lambda: _pool("httpx").used == 3)
        got = pw.collect()
        used = {
            p.attributes["server.port"]: p.value
            for p in got.points("poolwatch.connections", pool__name="httpx", state="used")
        }
        assert used == {first.port: 2, second.port: 1}
        _join(threads)
        snap = _pool("httpx")
        assert (snap.used, snap.idle, snap.checkouts) == (0, 3, 3)
        assert snap.connects == first.connections + second.connections == 3
        got = pw.collect()
        idle = {
            p.attributes["server.port"]: p.value
            for p in got.points("poolwatch.connections", pool__name="httpx", state="idle")
        }
        assert idle == {first.port: 2, second.port: 1}
        assert got.count("poolwatch.connect.duration", pool__name="httpx") == 3


def _held(client: httpx.Client, url: str) -> httpx.Response:
    """A response whose body is not read: it keeps its connection until closed."""
    return client.send(client.build_request("GET", url), stream=True)


def test_pool_timeouts_are_exact_and_waiters_pending(pw: Harness) -> None:
    limits = httpx.Limits(max_connections=2)
    timeout = httpx.Timeout(10.0, pool=0.5)
    outcomes: list[str] = []
    lock = threading.Lock()
    with ThreadedUpstream() as server, httpx.Client(limits=limits, timeout=timeout) as c:
        held = [_held(c, server.url) for _ in range(2)]  # the pool is at its limit

        def call() -> None:
            try:
                c.get(server.url)
                result = "ok"
            except httpx.PoolTimeout:
                result = "timeout"
            with lock:
                outcomes.append(result)

        threads = _run_threads(call, 4)
        wait_until(lambda: blocked_in(threads, "wait_for_connection") == 4)
        waiting = _pool("httpx")
        got = pw.collect()
        _join(threads)
        for response in held:
            response.read()
            response.close()
        assert (waiting.used, waiting.pending) == (2, 4)
        assert got.value("poolwatch.pending_requests", pool__name="httpx") == 4
        assert got.value("poolwatch.connections", pool__name="httpx", state="used") == 2
        assert outcomes == ["timeout"] * 4
        snap = _pool("httpx")
        assert (snap.timeouts, snap.checkouts, snap.pending, snap.used) == (4, 2, 0, 0)
        got = pw.collect()
        assert got.value("poolwatch.timeouts", pool__name="httpx") == 4
        assert got.value("poolwatch.pending_requests", pool__name="httpx") == 0
        timed_out = got.histogram("poolwatch.wait.duration", pool__name="httpx", outcome="timeout")
        assert timed_out.count == 4
        assert timed_out.min >= 0.5 and timed_out.max < 1.5  # the queue wait alone
        assert got.count("poolwatch.wait.duration", pool__name="httpx", outcome="error") == 0
        assert got.count("poolwatch.use.duration", pool__name="httpx") == 2
        assert server.connections == snap.connects == 2


def test_pending_is_exported_per_server(pw: Harness) -> None:
    """Two origins, the pool at its limit with both connections to the first: two callers
    wait for the first server and three for the second, which has no connection yet."""
    limits = httpx.Limits(max_connections=2)
    timeout = httpx.Timeout(10.0, pool=1.5)
    outcomes: list[str] = []
    lock = threading.Lock()
    with (
        ThreadedUpstream() as first,
        AsyncioUpstream() as second,
        httpx.Client(limits=limits, timeout=timeout) as client,
    ):
        held = [_held(client, first.url) for _ in range(2)]

        def call(url: str) -> None:
            try:
                client.get(url)
                result = "ok"
            except httpx.PoolTimeout:
                result = "timeout"
            with lock:
                outcomes.append(result)

        # Every waiter gives up before the held connections come back. Handing them on
        # while callers of two origins wait (or have just timed out) meets an httpcore
        # race that closes a connection another thread was just given (EBADF; reproduced
        # without poolwatch): not what is tested here.
        urls = [first.url] * 2 + [second.url] * 3
        threads = [threading.Thread(target=call, args=(url,)) for url in urls]
        for t in threads:
            t.start()
        wait_until(lambda: blocked_in(threads, "wait_for_connection") == 5)
        got = pw.collect()
        _join(threads)
        for response in held:
            response.read()
            response.close()
        pending = got.points("poolwatch.pending_requests", pool__name="httpx")
        assert {
            (p.attributes["server.address"], p.attributes["server.port"]): p.value for p in pending
        } == {("127.0.0.1", first.port): 2, ("127.0.0.1", second.port): 3}
        assert {p.attributes["pool.kind"] for p in pending} == {"httpx"}
        used = {
            p.attributes["server.port"]: p.value
            for p in got.points("poolwatch.connections", pool__name="httpx", state="used")
        }
        assert used == {first.port: 2, second.port: 0}  # the second has callers, no connection
        assert outcomes == ["timeout"] * 5
        snap = _pool("httpx")
        assert (snap.pending, snap.used, snap.idle, snap.timeouts) == (0, 0, 2, 5)
        after = pw.collect().points("poolwatch.pending_requests", pool__name="httpx")
        assert {p.attributes["server.port"]: p.value for p in after} == {first.port: 0}
        assert (first.requests, second.requests) == (2, 0)


def test_async_client_on_a_real_event_loop(pw: Harness) -> None:
    async def main() -> tuple[poolwatch.PoolSnapshot, int]:
        with AsyncioUpstream(delay=0.2) as upstream:
            limits = httpx.Limits(max_connections=2)
            async with httpx.AsyncClient(base_url=upstream.url, limits=limits) as client:
                requests = [asyncio.create_task(client.get("/")) for _ in range(6)]
                for _ in range(100):  # bounded: until the six are in the pool
                    await asyncio.sleep(0.005)
                    if _pool(upstream.origin).pending == 4:
                        break
                during = _pool(upstream.origin)
                await asyncio.gather(*requests)
                return during, upstream.connections

    during, connections = asyncio.run(main())
    assert (during.used, during.pending, during.max) == (2, 4, 2)
    [snap] = [s for s in poolwatch.pools() if s.kind == "httpx"]
    assert (snap.checkouts, snap.connects, connections) == (6, 2, 2)
    assert (snap.used, snap.idle, snap.pending) == (0, 0, 0)  # the client closed
    assert snap.closed["disposed"] == 2


def test_async_pool_timeouts(pw: Harness) -> None:
    async def main() -> list[str]:
        with AsyncioUpstream(delay=0.5) as upstream:
            limits = httpx.Limits(max_connections=1)
            timeout = httpx.Timeout(10.0, pool=0.1)
            async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

                async def call() -> str:
                    try:
                        await client.get(upstream.url)
                    except httpx.PoolTimeout:
                        return "timeout"
                    return "ok"

                return sorted(await asyncio.gather(*(call() for _ in range(3))))

    assert asyncio.run(main()) == ["ok", "timeout", "timeout"]
    snap = _pool("httpx")
    assert (snap.timeouts, snap.checkouts, snap.connects) == (2, 1, 1)
    got = pw.collect()
    assert got.value("poolwatch.timeouts", pool__name="httpx") == 2
    assert (
        got.histogram("poolwatch.wait.duration", pool__name="httpx", outcome="timeout").min >= 0.1
    )


def test_only_a_queued_request_is_timed_waiting(pw: Harness) -> None:
    """A request the pool gives a connection before it asks waits for none (recorded as 0,
    the clock not read); one queued behind a held connection waits as long as it is held."""
    limits = httpx.Limits(max_connections=1)
    with ThreadedUpstream() as server, httpx.Client(limits=limits) as client:
        for _ in range(3):
            client.get(server.url)
        got = pw.collect()
        free = got.histogram("poolwatch.wait.duration", pool__name="httpx", outcome="acquired")
        assert (free.count, free.sum, free.min, free.max) == (3, 0.0, 0.0, 0.0)

        held = _held(client, server.url)
        queued = _run_threads(lambda: client.get(server.url).raise_for_status(), 1)
        wait_until(lambda: blocked_in(queued, "wait_for_connection") == 1)
        time.sleep(0.2)
        held.read()
        held.close()
        _join(queued)
        got = pw.collect()
        waits = got.histogram("poolwatch.wait.duration", pool__name="httpx", outcome="acquired")
        assert (waits.count, waits.min) == (5, 0.0)
        assert 0.2 <= waits.max == waits.sum < 2.0  # the queued one: the only wait of length
        assert _pool("httpx").checkouts == 5


def test_a_cancelled_waiter_is_a_wait_error(pw: Harness) -> None:
    async def main() -> None:
        with AsyncioUpstream(delay=0.5) as upstream:
            limits = httpx.Limits(max_connections=1)
            async with httpx.AsyncClient(limits=limits) as client:
                first = asyncio.create_task(client.get(upstream.url))
                second = asyncio.create_task(client.get(upstream.url))
                for _ in range(100):  # bounded: until the second queues behind the first
                    await asyncio.sleep(0.005)
                    if _pool("httpx").pending == 1:
                        break
                await asyncio.sleep(0.1)
                second.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await second
                (await first).raise_for_status()

    asyncio.run(main())
    snap = _pool("httpx")
    assert (snap.checkouts, snap.timeouts, snap.pending) == (1, 0, 0)
    got = pw.collect()
    failed = got.histogram("poolwatch.wait.duration", pool__name="httpx", outcome="error")
    assert failed.count == 1
    assert 0.1 <= failed.sum < 0.5  # from its queueing to its cancellation
    assert got.count("poolwatch.wait.duration", pool__name="httpx", outcome="timeout") == 0


def test_a_request_failing_before_it_can_wait(pw: Harness) -> None:
    """Counted once, by handle_request (the wait hook never ran)."""
    with httpcore.ConnectionPool() as pool, pytest.raises(httpcore.UnsupportedProtocol):
        pool.request("GET", "ftp://127.0.0.1/")
    snap = _pool("httpcore")
    assert (snap.checkouts, snap.timeouts, snap.used) == (0, 0, 0)
    got = pw.collect()
    failed = got.histogram("poolwatch.wait.duration", pool__name="httpcore", outcome="error")
    assert failed.count == 1
    assert 0.0 < failed.sum < 0.1  # from the call to the failure
    assert got.count("poolwatch.wait.duration", pool__name="httpcore", outcome="acquired") == 0


# -- closes by reason ----------------------------------------------------------------------
def test_stale_connections_found_on_reuse(pw: Harness) -> None:
    with ThreadedUpstream(idle_timeout=0.05) as dropping:
        with httpx.Client(base_url=dropping.url) as client:
            client.get("/")
            for round_ in range(1, 4):
                wait_until(lambda r=round_: dropping.closed_idle == r)  # type: ignore[misc]
                client.get("/")  # the pool finds the server closed it, and connects again
            snap = _pool(dropping.origin)
            assert (snap.closed["stale"], snap.connects, dropping.connections) == (3, 4, 4)
            assert (
                pw.collect().value(
                    "poolwatch.connections.closed", pool__name=dropping.origin, reason="stale"
                )
                == 3
            )
        assert _pool(dropping.origin).closed == {
            "idle_expired": 0,
            "max_lifetime": 0,
            "pool_full": 0,
            "stale": 3,
            "invalidated": 0,
            "error": 0,
            "disposed": 1,
        }


def test_closes_by_reason(pw: Harness) -> None:
    with ThreadedUpstream() as steady:
        expiring = httpx.Limits(keepalive_expiry=0.05)
        with httpx.Client(base_url=steady.url, limits=expiring) as client:
            client.get("/")
            time.sleep(0.1)
            client.get("/")  # the pool drops the expired one first
            snap = _pool(steady.origin)
            assert (snap.closed["idle_expired"], snap.connects) == (1, 2)
            lifetime = pw.collect().histogram(
                "poolwatch.connection.lifetime", pool__name=steady.origin, reason="idle_expired"
            )
            assert lifetime.count == 1 and lifetime.min >= 0.05
        with httpx.Client(base_url=steady.url) as closing:
            site = f"tests/test_httpx.py:{sys._getframe().f_lineno - 1}"  # a second site
            closing.get("/", headers={"Connection": "close"})
            assert _pool(f"{steady.origin} ({site})").closed["invalidated"] == 1
        surplus = httpx.Limits(max_keepalive_connections=1)
        with ThreadedUpstream(delay=0.2) as slow, httpx.Client(limits=surplus) as client:
            _join(_run_threads(lambda: client.get(slow.url).raise_for_status(), 3))
            snap = _pool("httpx")
            assert (snap.connects, snap.idle, snap.closed["pool_full"]) == (3, 1, 2)
    assert _pool(steady.origin).closed["disposed"] == 1
    assert sum(_pool(steady.origin).closed.values()) == 2 == _pool(steady.origin).connects


def test_read_timeout_ends_the_use_and_closes_as_error(pw: Harness) -> None:
    timeout = httpx.Timeout(5, read=0.05)
    with ThreadedUpstream(delay=0.5) as slow, httpx.Client(base_url=slow.url, timeout=timeout) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get("/")
        snap = _pool(slow.origin)
        assert (snap.used, snap.checkouts, snap.timeouts) == (0, 1, 0)
        assert snap.closed["error"] == 1
        got = pw.collect()
        assert got.count("poolwatch.use.duration", pool__name=slow.origin) == 1
        assert got.count("poolwatch.wait.duration", pool__name=slow.origin, outcome="error") == 0
    assert sum(_pool(slow.origin).closed.values()) == 1  # counted once, not again at close


def test_refused_connect_is_a_connect_error(pw: Harness) -> None:
    with refusing_port() as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(httpx.ConnectError):
            client.get("/")
        snap = _pool(f"http://127.0.0.1:{port}")
        # No connection ever accepted the request: a failed checkout, not a checkout.
        assert (snap.used, snap.checkouts, snap.connects, snap.connect_errors) == (0, 0, 0, 1)
        assert sum(snap.closed.values()) == 0
        got = pw.collect()
        assert got.count("poolwatch.connect.duration", pool__name=snap.name, outcome="error") == 1
        assert got.count("poolwatch.wait.duration", pool__name=snap.name, outcome="error") == 1


HANDSHAKE = 0.2
"""Seconds a TLS upstream sleeps inside each handshake (``handshake_delay``)."""


def test_tls_connects_are_timed(pw: Harness) -> None:
    with ThreadedUpstream(tls=True, delay=0.1, handshake_delay=HANDSHAKE) as server:
        trust = ssl.create_default_context(cafile=server.ca_file)
        with httpx.Client(base_url=server.url, verify=trust) as client:
            _join(_run_threads(lambda: client.get("/").raise_for_status(), 3))
            for _ in range(3):
                assert client.get("/").status_code == 200
            snap = _pool(server.origin)
            assert (snap.checkouts, snap.connects, server.connections) == (6, 3, 3)
            connect = pw.collect().histogram("poolwatch.connect.duration", pool__name=server.origin)
            assert connect.count == server.connections
            assert connect.min >= HANDSHAKE  # the TLS handshake is part of every connect
    assert _pool(server.origin).closed["disposed"] == 3
    with ThreadedUpstream() as plain, httpx.Client(base_url=plain.url) as client:
        client.get("/")
        connect = pw.collect().histogram("poolwatch.connect.duration", pool__name=plain.origin)
        assert connect.count == 1 and connect.max < HANDSHAKE  # TCP alone


# -- HTTP/2 --------------------------------------------------------------------------------
def test_http2_counts_connections_not_streams(pw: Harness) -> None:
    # h2 is in the dev extra: this runs in every test run (never skipped). The four streams
    # share the connection from asyncio tasks, not threads: httpcore's sync HTTP/2 connection
    # changes its h2 state outside its locks (stream ids, HPACK, frames to send), so threads
    # sharing one now and then lose a request on the wire, a race of httpcore's own.
    async def main(server: H2Upstream) -> tuple[poolwatch.PoolSnapshot, list[str]]:
        async with httpx.AsyncClient(base_url=server.url, http1=False, http2=True) as client:
            calls = [asyncio.create_task(client.get("/")) for _ in range(4)]
            await until(lambda: server.streams == 4)  # the four in flight on the server
            during = _pool(server.url)
            responses = await asyncio.gather(*calls)
            return during, [r.http_version for r in responses]

    with H2Upstream(delay=0.5) as server:
        during, versions = asyncio.run(main(server))
        assert (server.streams, server.connections) == (4, 1)
    assert versions == ["HTTP/2"] * 4
    assert (during.used, during.idle, during.pending) == (1, 0, 0)  # one connection
    snap = _pool(server.url)
    assert (snap.used, snap.idle, snap.checkouts, snap.connects) == (0, 0, 4, 1)
    assert snap.closed["disposed"] == 1
    got = pw.collect()
    assert got.count("poolwatch.wait.duration", pool__name=server.url) == 4
    assert got.count("poolwatch.use.duration", pool__name=server.url) == 4


def test_http2_requests_in_turn_reuse_one_connection(pw: Harness) -> None:
    with (
        H2Upstream() as server,
        httpx.Client(base_url=server.url, http1=False, http2=True) as client,
    ):
        versions = [client.get("/").http_version for _ in range(3)]
        snap = _pool(server.url)
        assert versions == ["HTTP/2"] * 3
        assert (snap.used, snap.idle, snap.checkouts, snap.connects) == (0, 1, 3, 1)
        assert (server.streams, server.connections) == (3, 1)
    assert _pool(server.url).closed["disposed"] == 1


# -- proxies -------------------------------------------------------------------------------
def test_forwarding_proxy_pools_are_named_without_credentials(pw: Harness) -> None:
    with ThreadedUpstream() as upstream:  # a forwarding proxy: the upstream answers itself
        proxy = f"http://alice:s3cret@127.0.0.1:{upstream.port}"
        with httpx.Client(proxy=proxy) as client:
            for _ in range(2):
                client.get("http://example.invalid/path?token=abc")
            pools = {s.name: s.checkouts for s in poolwatch.pools() if s.kind == "httpx"}
            # the client's own pool (unused here) and its proxy mount's pool
            assert pools == {"httpx": 0, f"httpx via {upstream.origin}": 2}
            snap = _pool(f"httpx via {upstream.origin}")
            assert (snap.connects, snap.idle, upstream.connections) == (1, 1, 1)
            got = pw.collect()
            [idle] = got.points("poolwatch.connections", state="idle", pool__name=snap.name)
            assert idle.attributes["server.address"] == "example.invalid"  # the origin
            exported = repr(got.metrics)
            for secret in ("alice", "s3cret", "token", "abc"):
                assert secret not in exported
        assert _pool(f"httpx via {upstream.origin}").closed["disposed"] == 1


def test_tunnelling_proxy_to_a_tls_upstream(pw: Harness) -> None:
    with (
        ThreadedUpstream(tls=True, handshake_delay=HANDSHAKE) as upstream,
        ConnectProxy() as proxy,
    ):
        trust = ssl.create_default_context(cafile=upstream.ca_file)
        with httpx.Client(proxy=proxy.url, verify=trust) as client:
            for _ in range(3):
                assert client.get(upstream.url).text == "ok\n"
            snap = _pool(f"httpx via {proxy.url}")
            assert (snap.checkouts, snap.connects, snap.idle) == (3, 1, 1)
            assert (proxy.connections, proxy.tunnels, upstream.connections) == (1, 1, 1)
            # One connect: TCP to the proxy, the CONNECT exchange and the origin's TLS.
            connect = pw.collect().histogram("poolwatch.connect.duration", pool__name=snap.name)
            assert connect.count == 1 and connect.min >= HANDSHAKE
        assert _pool(f"httpx via {proxy.url}").closed["disposed"] == 1


def test_async_tunnel_connect_includes_the_origin_handshake(pw: Harness) -> None:
    async def main(upstream: AsyncioUpstream, proxy: ConnectProxy) -> list[str]:
        trust = ssl.create_default_context(cafile=upstream.ca_file)
        async with httpx.AsyncClient(proxy=proxy.url, verify=trust) as client:
            return [(await client.get(upstream.url)).text for _ in range(2)]

    with (
        AsyncioUpstream(tls=True, handshake_delay=HANDSHAKE) as upstream,
        ConnectProxy() as proxy,
    ):
        assert asyncio.run(main(upstream, proxy)) == ["ok\n"] * 2
        assert (proxy.tunnels, upstream.connections) == (1, 1)
    snap = _pool(f"httpx via {proxy.url}")
    assert (snap.checkouts, snap.connects, snap.connect_errors) == (2, 1, 0)
    connect = pw.collect().histogram("poolwatch.connect.duration", pool__name=snap.name)
    assert connect.count == 1 and connect.min >= HANDSHAKE


def test_a_failed_tls_handshake_through_a_tunnel_is_a_connect_error(pw: Harness) -> None:
    with (
        ThreadedUpstream(tls=True) as upstream,
        ConnectProxy() as proxy,
        httpx.Client(proxy=proxy.url) as client,  # does not trust the test certificate
    ):
        with pytest.raises(httpx.ConnectError):
            client.get(upstream.url)
        snap = _pool(f"httpx via {proxy.url}")
        assert (snap.checkouts, snap.connects, snap.connect_errors) == (0, 0, 1)  # see above
        assert proxy.tunnels == 1
        # httpcore keeps the failed tunnel in its pool, ACTIVE: it holds one of the
        # pool's max_connections until the client closes, and used says so.
        [mount] = client._mounts.values()
        pool = cast(httpx.HTTPTransport, mount)._pool
        assert [c.is_idle() or c.is_closed() for c in pool._connections] == [False]
        assert snap.used == 1
        got = pw.collect()
        assert got.count("poolwatch.connect.duration", pool__name=snap.name, outcome="ok") == 0
        failed = got.histogram("poolwatch.connect.duration", pool__name=snap.name, outcome="error")
        assert failed.count == 1


def test_no_credentials_in_names_from_base_url(pw: Harness) -> None:
    with ThreadedUpstream() as upstream:
        base = f"http://bob:hunter2@127.0.0.1:{upstream.port}/api?key=topsecret"
        with httpx.Client(base_url=base) as client:
            assert client.get("/").status_code == 200
            assert [s.name for s in poolwatch.pools() if s.kind == "httpx"] == [upstream.origin]
            exported = repr(pw.collect().metrics)
            for secret in ("bob", "hunter2", "key", "topsecret"):
                assert secret not in exported


# -- finding pools -------------------------------------------------------------------------
def test_transports_and_bare_httpcore_pools_are_tracked(pw: Harness) -> None:
    with ThreadedUpstream() as upstream:
        transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=3))
        with httpx.Client(transport=transport, base_url=upstream.url) as client:
            client.get("/")
            snap = _pool(upstream.origin)
            assert (snap.checkouts, snap.max) == (1, 3)
        with httpcore.ConnectionPool(max_connections=4) as pool:
            for _ in range(2):
                assert pool.request("GET", upstream.url).status == 200
            snap = _pool("httpcore")  # met at its first request
            assert (snap.checkouts, snap.connects, snap.idle, snap.max) == (2, 1, 1, 4)
        assert _pool("httpcore").closed["disposed"] == 1


def test_a_client_made_before_instrument_is_found(harness: Harness) -> None:
    with ThreadedUpstream() as upstream:
        # keep-alive for longer than instrument() can take on a loaded machine (its heap walk
        # took more than httpx's default 5 s in a CI run beside two other test processes)
        limits = httpx.Limits(keepalive_expiry=120)
        with (
            httpx.Client(base_url=upstream.url, limits=limits) as client,
            httpcore.ConnectionPool(keepalive_expiry=120) as bare,
        ):
            client.get("/")
            bare.request("GET", upstream.url)
            harness.instrument()
            # found by the heap walk, with the connection opened before
            assert (_pool(upstream.origin).idle, _pool("httpcore").idle) == (1, 1)
            client.get("/")
            snap = _pool(upstream.origin)
            assert (snap.checkouts, snap.idle, snap.connects) == (1, 1, 0)
        # the connections opened before instrument() are counted when they close
        assert _pool(upstream.origin).closed["disposed"] == 1
        assert _pool("httpcore").closed["disposed"] == 1
        got = harness.collect()
        assert got.count("poolwatch.connection.lifetime", pool__name=upstream.origin) == 0


# -- uninstrument, optional h2 -------------------------------------------------------------
def _class_dicts() -> dict[tuple[str, str], dict[str, Any]]:
    """Every class attribute of every class httpx and httpcore define."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] not in ("httpx", "httpcore"):
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module_name:
                found[(module_name, cls.__qualname__)] = dict(vars(cls))
    return found


def test_uninstrument_restores_httpx_and_httpcore(harness: Harness) -> None:
    before = _class_dicts()
    assert len(before) > 50
    harness.instrument()
    patched = {key for key, attrs in _class_dicts().items() if attrs != before[key]}
    assert {name for _, name in patched} >= {
        "ConnectionPool",
        "AsyncConnectionPool",
        "PoolRequest",
        "AsyncPoolRequest",
        "PoolByteStream",
        "HTTPConnection",
        "AsyncHTTPConnection",
        "HTTP11Connection",
        "AsyncHTTP11Connection",
        "HTTP2Connection",
        "AsyncHTTP2Connection",
        "Request",
        "Client",
        "AsyncClient",
    }
    with ThreadedUpstream() as upstream, httpx.Client(base_url=upstream.url) as client:
        client.get("/")
        pool = client._transport._pool
        assert pool._poolwatch_ledger is not None
        poolwatch.uninstrument()
        after = _class_dicts()
        changed = [key for key in before if after[key].keys() != before[key].keys()]
        assert changed == []
        replaced = [
            (key, attr)
            for key, attrs in before.items()
            for attr, value in attrs.items()
            if after[key][attr] is not value
        ]
        assert replaced == []
        assert not hasattr(pool, "_poolwatch_ledger")  # the pool forgot, too
        client.get("/")
    assert poolwatch.pools() == []
    assert harness.collect().names() == set()


def test_hooked_without_h2_installed() -> None:
    """HTTP/2 is optional in httpcore; without h2 the HTTP/1.1 pools are hooked all the same."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        sys.modules["h2"] = None  # as if h2 were not installed
        from opentelemetry.sdk.metrics import MeterProvider
        import poolwatch
        handle = poolwatch.instrument(meter_provider=MeterProvider())
        import httpx
        from tests.support.upstream import ThreadedUpstream
        with ThreadedUpstream() as upstream, httpx.Client() as client:
            client.get(upstream.url)
            print(handle.errors, [(s.kind, s.checkouts) for s in poolwatch.pools()])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{} [('httpx', 1)]"


def test_a_timeout_after_the_connection_became_unavailable_is_counted(pw: Harness) -> None:
    """httpcore hands requests an HTTP/2 connection still connecting; when the server speaks
    HTTP/1.1 the second request finds it unavailable (``ConnectionNotAvailable``) and waits
    again. A pool timeout of that second wait is a timeout its caller sees like any other."""
    limits = httpx.Limits(max_connections=1)
    timeout = httpx.Timeout(10.0, pool=0.3)
    outcomes: list[str] = []
    with ThreadedUpstream(tls=True, handshake_delay=0.3) as server:  # HTTP/1.1 only
        trust = ssl.create_default_context(cafile=server.ca_file)
        with httpx.Client(http2=True, verify=trust, limits=limits, timeout=timeout) as client:
            held: list[httpx.Response] = []
            first = threading.Thread(target=lambda: held.append(_held(client, server.url)))
            first.start()
            pool = client._transport._pool
            wait_until(lambda: len(pool._connections) == 1)  # connecting: the handshake waits

            def second() -> None:
                try:
                    client.get(server.url)
                    outcomes.append("ok")
                except httpx.PoolTimeout:
                    outcomes.append("timeout")

            waiter = threading.Thread(target=second)
            waiter.start()
            _join([first, waiter])
            snap = _pool("httpx")
            got = pw.collect()
            held[0].close()
    assert outcomes == ["timeout"]
    assert server.connections == 1
    # It was given the connecting connection, found it unavailable, waited again and timed
    # out: one timeout, as the caller saw, and no checkout (what it was given, it could not
    # use: that checkout is taken back). The first request holds the one connection.
    assert (snap.timeouts, snap.checkouts, snap.used) == (1, 1, 1)
    assert got.value("poolwatch.timeouts", pool__name="httpx") == 1
    assert got.count("poolwatch.wait.duration", pool__name="httpx", outcome="timeout") == 1
    assert got.count("poolwatch.wait.duration", pool__name="httpx", outcome="acquired") == 1
    assert got.count("poolwatch.use.duration", pool__name="httpx") == 0
