"""aiohttp connectors (ClientSession pools) on real loopback servers, on a real event loop.

Every test runs against real HTTP/1.1 servers on 127.0.0.1 (tests/support/upstream.py),
inside ``asyncio.run`` (pytest-asyncio is not used), and asserts exact counts: requests
made, connections the servers accepted, closes by reason, timeouts. Levels are read while
requests are in flight, from inside the event loop.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Coroutine, Iterator
from typing import Any, ClassVar, TypeVar

import aiohttp
import pytest
from aiohttp import client, client_proto, connector

import poolwatch
from tests.support.harness import Harness
from tests.support.pools import one_pool
from tests.support.threads import until
from tests.support.upstream import AsyncioUpstream, ThreadedUpstream, refusing_port

T = TypeVar("T")
NAME = "aiohttp"


@pytest.fixture(autouse=True)
def _no_internal_errors(harness: Harness) -> Iterator[None]:
    """Every hook ran without an internal failure (those are logged once, never raised)."""
    yield
    if harness.handle is not None:
        assert harness.handle.errors == {}


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on a fresh event loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, 20)

    return asyncio.run(bounded())


def _pool(name: str = NAME) -> poolwatch.PoolSnapshot:
    return one_pool(name, kind="aiohttp")


async def _get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> bytes:
    async with session.get(url, **kwargs) as response:
        return await response.read()


async def _gather(*calls: Awaitable[T]) -> list[T]:
    return list(await asyncio.gather(*calls))


@pytest.mark.semconv
def test_keep_alive_requests_reuse_one_connection(pw: Harness) -> None:
    async def scenario(up: AsyncioUpstream) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                assert await _get(session, up.url + "/a") == b"ok\n"
            snap = _pool()
            assert (snap.used, snap.idle, snap.max, snap.pending) == (0, 1, 100, 0)
            assert (snap.checkouts, snap.connects, up.connections, up.requests) == (5, 1, 1, 5)
            got = pw.collect()
            here = {"pool__name": NAME, "server__port": up.port}
            assert got.value("poolwatch.connections", state="idle", **here) == 1
            assert got.value("poolwatch.connections", state="used", **here) == 0
            assert got.value("poolwatch.connections.max", pool__name=NAME) == 100
            assert got.value("poolwatch.pending_requests", pool__name=NAME) == 0
            assert got.count("poolwatch.wait.duration", pool__name=NAME, outcome="acquired") == 5
            assert got.count("poolwatch.use.duration", pool__name=NAME) == 5
            assert got.count("poolwatch.connect.duration", pool__name=NAME, outcome="ok") == 1
            point = got.points("poolwatch.connections", pool__name=NAME, state="idle")[0]
            assert dict(point.attributes) == {
                "pool.name": NAME,
                "pool.kind": "aiohttp",
                "server.address": "127.0.0.1",
                "server.port": up.port,
                "state": "idle",
            }
            # The HTTP semantic-convention mirrors, per server.
            open_ = got.points("http.client.open_connections", pool__name=NAME)
            assert {p.attributes["http.connection.state"]: p.value for p in open_} == {
                "active": 0,
                "idle": 1,
            }
            assert {p.attributes["server.port"] for p in open_} == {up.port}
            assert got.count("http.client.request.time_in_queue", pool__name=NAME) == 5
            assert "http.client.connection.duration" not in got.names()  # nothing closed yet
        got = pw.collect()
        assert got.value("poolwatch.connections.closed", pool__name=NAME, reason="disposed") == 1
        assert got.count("http.client.connection.duration", pool__name=NAME) == 1

    with AsyncioUpstream() as up:
        run(scenario(up))


def test_reuse_counts_firsts_when_a_connect_fails_its_checkout(pw: Harness) -> None:
    """A trace callback that raises after a connect fails that checkout (aiohttp closes
    nothing: the connection it opened is dropped). Reuse counted as checkouts less connects
    read 2 here, not 3."""
    failing = [True]

    async def created(*_: Any) -> None:
        if failing and failing.pop():
            raise RuntimeError("raised by the test's trace callback")

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(created)

    class Recording(aiohttp.TCPConnector):  # keeps what it opened, to close the dropped one
        made: ClassVar[list[Any]] = []

        async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
            proto = await super()._create_connection(req, traces, timeout)
            self.made.append(proto)
            return proto

    async def scenario(up: AsyncioUpstream) -> None:
        async with aiohttp.ClientSession(connector=Recording(), trace_configs=[trace]) as session:
            with pytest.raises(RuntimeError):
                await _get(session, up.url)
            Recording.made[0].close()
            for _ in range(4):  # the first opens a connection; three reuse it
                assert await _get(session, up.url) == b"ok\n"
            snap = _pool()
            assert (snap.checkouts, snap.connects, snap.reused) == (4, 2, 3)
            assert up.connections == 2
            got = pw.collect()
            assert got.value("poolwatch.checkouts.reused", pool__name=NAME) == 3
            assert got.count("poolwatch.wait.duration", pool__name=NAME, outcome="error") == 1

    with AsyncioUpstream() as up:
        run(scenario(up))


def test_limit_queues_callers_shows_them_pending_and_times_their_wait(pw: Harness) -> None:
    seen: list[tuple[int, int, int | None, int]] = []

    async def scenario(up: AsyncioUpstream) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:
            requests = asyncio.gather(*(_get(session, up.url) for _ in range(6)))
            await until(lambda: _pool().pending == 4)
            snap = _pool()
            seen.append((snap.used, snap.idle, snap.max, snap.pending))
            got = pw.collect()
            assert got.value("poolwatch.pending_requests", pool__name=NAME) == 4
            assert got.value("poolwatch.connections.max", pool__name=NAME) == 2
            assert got.value("poolwatch.connections", pool__name=NAME, state="used") == 2
            assert await requests == [b"ok\n"] * 6
            snap = _pool()
            assert (snap.used, snap.idle, snap.max, snap.pending) == (0, 2, 2, 0)
            assert (snap.checkouts, snap.connects, up.connections, up.requests) == (6, 2, 2, 6)

    with AsyncioUpstream(delay=0.3) as up:
        run(scenario(up))
    assert seen == [(2, 0, 2, 4)]
    wait = pw.collect().histogram("poolwatch.wait.duration", pool__name=NAME, outcome="acquired")
    assert wait.count == 6
    bounds = list(wait.explicit_bounds)
    counts = list(wait.bucket_counts)
    # Two got a new connection at once; four queued behind a 0.3 s response (two of them
    # behind two): their waits are at least 0.25 s.
    assert sum(counts[: bounds.index(0.1) + 1]) == 2
    assert sum(counts[bounds.index(0.25) + 1 :]) == 4
    assert wait.max >= 0.55


def test_a_full_pool_times_out_waiting_callers_exactly(pw: Harness) -> None:
    errors: list[type[BaseException]] = []

    async def scenario(up: AsyncioUpstream) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            holder = asyncio.ensure_future(_get(session, up.url + "/?delay=0.8"))
            await until(lambda: _pool().used == 1)
            for timeout in (
                aiohttp.ClientTimeout(connect=0.1),
                aiohttp.ClientTimeout(connect=0.1),
                aiohttp.ClientTimeout(total=0.1),  # the session's total timer, while queued
            ):
                try:
                    await _get(session, up.url, timeout=timeout)
                except asyncio.TimeoutError as error:
                    errors.append(type(error))
            assert _pool().pending == 0
            assert await holder == b"ok\n"
            snap = _pool()
            counts = (snap.timeouts, snap.checkouts, snap.connects, snap.connect_errors)
            assert counts == (3, 1, 1, 0)
            got = pw.collect()
            assert got.value("poolwatch.timeouts", pool__name=NAME) == 3
            assert got.count("poolwatch.wait.duration", pool__name=NAME, outcome="timeout") == 3
            assert got.count("poolwatch.wait.duration", pool__name=NAME, outcome="error") == 0
            timed_out = got.histogram("poolwatch.wait.duration", pool__name=NAME, outcome="timeout")
            assert timed_out.min >= 0.09 and timed_out.max < 0.8

    with AsyncioUpstream() as up:
        run(scenario(up))
        assert (up.connections, up.requests) == (1, 1)
    # ClientTimeout(connect=…) on a full pool: aiohttp's ConnectionTimeoutError, a
    # ServerTimeoutError; the total timeout: a plain asyncio.TimeoutError.
    assert errors == [aiohttp.ConnectionTimeoutError] * 2 + [asyncio.TimeoutError]
    assert issubclass(aiohttp.ConnectionTimeoutError, aiohttp.ServerTimeoutError)


def test_refused_connect_is_a_connect_error_and_returns_the_slot(pw: Harness) -> None:
    async def scenario(port: int) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            with pytest.raises(aiohttp.ClientConnectorError):
                await _get(session, f"http://127.0.0.1:{port}/")
            snap = _pool()
            assert (snap.used, snap.idle, snap.pending) == (0, 0, 0)
            assert (snap.checkouts, snap.connects, snap.connect_errors, snap.timeouts) == (
                0,
                0,
                1,
                0,
            )

    with refusing_port() as port:
        run(scenario(port))
    got = pw.collect()
    assert got.count("poolwatch.connect.duration", pool__name=NAME, outcome="error") == 1
    assert got.count("poolwatch.connect.duration", pool__name=NAME, outcome="ok") == 0
    assert got.count("poolwatch.wait.duration", pool__name=NAME, outcome="error") == 1
    assert got.value("poolwatch.timeouts", pool__name=NAME) == 0
    assert "poolwatch.connections.closed" not in got.names()  # never opened, never closed


def test_levels_per_host_with_two_upstreams(pw: Harness) -> None:
    async def scenario(a: AsyncioUpstream, b: ThreadedUpstream) -> None:
        async with aiohttp.ClientSession() as session:
            requests = asyncio.gather(
                _get(session, a.url + "/?delay=0.4"),
                _get(session, a.url + "/?delay=0.4"),
                _get(session, b.url + "/?delay=0.4"),
            )
            await until(lambda: _pool().used == 3)
            got = pw.collect()
            used = {
                p.attributes["server.port"]: p.value
                for p in got.points("poolwatch.connections", pool__name=NAME, state="used")
            }
            assert used == {a.port: 2, b.port: 1}
            assert await requests == [b"ok\n"] * 3
            got = pw.collect()
            idle = {
                p.attributes["server.port"]: p.value
                for p in got.points("poolwatch.connections", pool__name=NAME, state="idle")
            }
            assert idle == {a.port: 2, b.port: 1}
            assert {
                p.attributes["server.address"]
                for p in got.points("poolwatch.connections", pool__name=NAME)
            } == {"127.0.0.1"}
            snap = _pool()
            assert (snap.used, snap.idle, snap.checkouts, snap.connects) == (0, 3, 3, 3)

    with AsyncioUpstream() as a, ThreadedUpstream() as b:
        run(scenario(a, b))
        assert (a.connections, b.connections) == (2, 1)


def _queued(tasks: list[asyncio.Task[Any]]) -> int:
    """Tasks suspended in aiohttp's wait for a free slot, read from their own coroutine
    chains (not from the connector): the innermost coroutine awaited is that wait."""
    queued = 0
    for task in tasks:
        coroutine: Any = task.get_coro()
        innermost = ""
        for _ in range(50):  # bounded: the chain of coroutines awaiting one another
            code = getattr(coroutine, "cr_code", None)
            if code is None:
                break
            innermost, coroutine = code.co_name, coroutine.cr_await
        if not task.done() and innermost == "_wait_for_available_connection":
            queued += 1
    return queued


def test_pending_is_exported_per_server(pw: Harness) -> None:
    """The limit reached with both connections to one server: two requests queue for it,
    three for a second server that has no connection yet."""

    async def scenario(a: AsyncioUpstream, b: ThreadedUpstream) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:
            holders = [asyncio.create_task(_get(session, a.url + "/?delay=1")) for _ in "ab"]
            await until(lambda: _pool().used == 2)
            urls = [a.url] * 2 + [b.url] * 3
            tasks = [asyncio.create_task(_get(session, url)) for url in urls]
            await until(lambda: _queued(tasks) == 5)
            got = pw.collect()
            pending = got.points("poolwatch.pending_requests", pool__name=NAME)
            assert {
                (p.attributes["server.address"], p.attributes["server.port"]): p.value
                for p in pending
            } == {("127.0.0.1", a.port): 2, ("127.0.0.1", b.port): 3}
            used = {
                p.attributes["server.port"]: p.value
                for p in got.points("poolwatch.connections", pool__name=NAME, state="used")
            }
            assert used == {a.port: 2, b.port: 0}  # the second: callers, no connection
            assert _pool().pending == 5
            assert await _gather(*holders, *tasks) == [b"ok\n"] * 7
            after = pw.collect().points("poolwatch.pending_requests", pool__name=NAME)
            assert {p.attributes["server.port"]: p.value for p in after} == {
                a.port: 0,
                b.port: 0,
            }

    with AsyncioUpstream() as a, ThreadedUpstream() as b:
        run(scenario(a, b))
        assert (a.requests, b.requests) == (4, 3)


def test_limit_per_host_queues_per_server_below_max(pw: Harness) -> None:
    async def scenario(up: AsyncioUpstream) -> None:
        made = aiohttp.TCPConnector(limit=10, limit_per_host=1)
        async with aiohttp.ClientSession(connector=made) as session:
            requests = asyncio.gather(*(_get(session, up.url + "/?delay=0.2") for _ in range(3)))
            await until(lambda: _pool().pending == 2)
            snap = _pool()
            assert (snap.used, snap.max, snap.pending) == (1, 10, 2)
            await requests
            assert (_pool().checkouts, _pool().connects, up.connections) == (3, 1, 1)

    with AsyncioUpstream() as up:
        run(scenario(up))


def test_keepalive_timeout_expiry_closes_as_idle_expired(pw: Harness) -> None:
    async def scenario(up: AsyncioUpstream) -> None:
        made = aiohttp.TCPConnector(keepalive_timeout=0.1)
        async with aiohttp.ClientSession(connector=made) as session:
            await _get(session, up.url)
            assert _pool().idle == 1
            await until(lambda: _pool().closed["idle_expired"] == 1)
            assert _pool().idle == 0
            await _get(session, up.url)
            snap = _pool()
            assert (snap.checkouts, snap.connects, up.connections) == (2, 2, 2)
            assert {r: n for r, n in snap.closed.items() if n} == {"idle_expired": 1}

    with AsyncioUpstream() as up:
        run(scenario(up))
    got = pw.collect()
    assert got.count("poolwatch.connection.lifetime", pool__name=NAME, reason="idle_expired") == 1


def test_server_closing_idle_connections_makes_stale_closes_and_no_failure(pw: Harness) -> None:
    """The server closes the idle keep-alive connection; aiohttp sees the EOF on its loop,
    finds the connection closed at the next request, throws it away (``stale``) and opens
    a new one: the request does not fail and nothing counts as an error."""

    async def scenario(up: AsyncioUpstream) -> None:
        async with aiohttp.ClientSession() as session:
            await _get(session, up.url)
            await until(lambda: up.closed_idle == 1)
            await until(lambda: _pool().idle == 0)  # the client has seen the EOF
            assert await _get(session, up.url) == b"ok\n"
            snap = _pool()
            assert (snap.checkouts, snap.connects, up.connections, up.requests) == (2, 2, 2, 2)
            assert {r: n for r, n in snap.closed.items() if n} == {"stale": 1}

    with AsyncioUpstream(idle_timeout=0.05) as up:
        run(scenario(up))
    got = pw.collect()
    assert got.count("poolwatch.wait.duration", pool__name=NAME, outcome="error") == 0
    assert got.value("poolwatch.connections.closed", pool__name=NAME, reason="stale") == 1


def test_reusing_a_connection_the_server_just_closed_is_an_error_and_a_retry(pw: Harness) -> None:
    """The race: the server has closed the idle connection, but the client's loop has not
    seen the EOF yet (here: the loop is blocked meanwhile). aiohttp reuses the connection,
    the request fails with ServerDisconnectedError, the connection is closed as ``error``
    and aiohttp retries the GET once on a new connection: three checkouts, two requests."""

    async def scenario(up: ThreadedUpstream) -> None:
        async with aiohttp.ClientSession() as session:
            await _get(session, up.url)
            deadline = time.monotonic() + 5
            while up.closed_idle < 1:
                assert time.monotonic() < deadline
                time.sleep(0.005)  # blocks the event loop: the EOF stays unread
            assert await _get(session, up.url) == b"ok\n"
            snap = _pool()
            assert (snap.checkouts, snap.connects, up.connections, up.requests) == (3, 2, 2, 2)
            assert {r: n for r, n in snap.closed.items() if n} == {"error": 1}
            assert (snap.used, snap.idle, snap.timeouts) == (0, 1, 0)

    with ThreadedUpstream(idle_timeout=0.05) as up:
        run(scenario(up))


def test_server_ending_connections_closes_them_as_invalidated(pw: Harness) -> None:
    async def scenario(up: AsyncioUpstream) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                await _get(session, up.url)
            snap = _pool()
            assert (snap.checkouts, snap.connects, up.connections, snap.idle) == (3, 3, 3, 0)
            assert {r: n for r, n in snap.closed.items() if n} == {"invalidated": 3}

    with AsyncioUpstream(keep_alive=False) as up:
        run(scenario(up))


def test_a_request_failing_midway_ends_the_use_and_closes_as_error(pw: Harness) -> None:
    """A read timeout is a ServerTimeoutError too, but after the connection was handed out:
    not a pool timeout. The connection is closed as ``error``."""

    async def scenario(up: AsyncioUpstream) -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ServerTimeoutError):
                await _get(session, up.url, timeout=aiohttp.ClientTimeout(sock_read=0.05))
            snap = _pool()
            assert (snap.used, snap.idle, snap.checkouts, snap.timeouts) == (0, 0, 1, 0)
            assert {r: n for r, n in snap.closed.items() if n} == {"error": 1}

    with AsyncioUpstream(delay=0.3) as up:
        run(scenario(up))
    got = pw.collect()
    assert got.count("poolwatch.use.duration", pool__name=NAME) == 1
    assert got.count("poolwatch.wait.duration", pool__name=NAME, outcome="acquired") == 1


def test_force_close_connections_close_as_disposed_on_every_release(pw: Harness) -> None:
    async def scenario(up: AsyncioUpstream) -> None:
        made = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=made) as session:
            for _ in range(3):
                await _get(session, up.url)
            snap = _pool()
            assert (snap.checkouts, snap.connects, up.connections, snap.idle) == (3, 3, 3, 0)
            assert {r: n for r, n in snap.closed.items() if n} == {"disposed": 3}

    with AsyncioUpstream() as up:
        run(scenario(up))


def test_closing_the_session_disposes_idle_tls_connections(pw: Harness) -> None:
    async def scenario(up: AsyncioUpstream) -> None:
        context = ssl.create_default_context(cafile=up.ca_file)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        async with session:
            await _gather(*(_get(session, up.url + "/?delay=0.1") for _ in range(3)))
            snap = _pool()
            assert (snap.idle, snap.connects, up.connections) == (3, 3, 3)
        # A closed session lets go of its connector: the series stays, nothing open.
        got = pw.collect()
        assert got.value("poolwatch.connections", pool__name=NAME, state="idle") == 0
        assert got.value("poolwatch.connections", pool__name=NAME, state="used") == 0
        assert got.value("poolwatch.connections.closed", pool__name=NAME, reason="disposed") == 3
        assert got.count("poolwatch.connection.lifetime", pool__name=NAME, reason="disposed") == 3
        assert got.count("poolwatch.connect.duration", pool__name=NAME, outcome="ok") == 3
        assert len(got.points("poolwatch.connections.closed")) == 1
        again = pw.collect()  # kept for RETENTION, its counters as they were
        assert again.value("poolwatch.connections.closed", pool__name=NAME, reason="disposed") == 3

    with AsyncioUpstream(tls=True) as up:
        assert up.url.startswith("https://")
        run(scenario(up))


HANDSHAKE = 0.2
"""Seconds a TLS upstream sleeps inside each handshake (``handshake_delay``)."""


def test_connect_time_includes_the_tls_handshake(pw: Harness) -> None:
    async def scenario(tls: AsyncioUpstream, plain: AsyncioUpstream) -> None:
        context = ssl.create_default_context(cafile=tls.ca_file)
        secure = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        async with secure:
            await _gather(*(_get(secure, tls.url + "/?delay=0.1") for _ in range(2)))
        async with aiohttp.ClientSession() as session:
            await _get(session, plain.url)

    with (
        AsyncioUpstream(tls=True, handshake_delay=HANDSHAKE) as tls,
        AsyncioUpstream() as plain,
    ):
        run(scenario(tls, plain))
        assert (tls.connections, plain.connections) == (2, 1)
    names = sorted(s.name for s in poolwatch.pools())  # closed: shown until exported once
    got = pw.collect()
    assert names[0] == NAME and names[1].startswith(f"{NAME} (tests/test_aiohttp.py:")
    secure = got.histogram("poolwatch.connect.duration", pool__name=NAME, outcome="ok")
    assert secure.count == 2 and secure.min >= HANDSHAKE  # the handshake is in every connect
    plain_ = got.histogram("poolwatch.connect.duration", pool__name=names[1], outcome="ok")
    assert plain_.count == 1 and plain_.max < HANDSHAKE  # TCP alone


@pytest.mark.semconv
def test_semconv_mirrors_while_requests_are_in_flight(pw: Harness) -> None:
    async def scenario(a: AsyncioUpstream, b: ThreadedUpstream) -> None:
        async with aiohttp.ClientSession() as session:
            assert await _get(session, b.url) == b"ok\n"  # done: its connection is idle
            slow = asyncio.create_task(_get(session, a.url + "/?delay=0.5"))
            # Handed its connection (a slot counts as used from the moment it is being
            # opened, so used == 1 alone may come before the checkout).
            await until(lambda: _pool().used == 1 and _pool().checkouts == 2)
            got = pw.collect()
            mirrors = got.points("http.client.open_connections", pool__name=NAME)
            assert {
                (p.attributes["server.port"], p.attributes["http.connection.state"]): p.value
                for p in mirrors
            } == {
                (a.port, "active"): 1,
                (a.port, "idle"): 0,
                (b.port, "active"): 0,
                (b.port, "idle"): 1,
            }
            [active] = [
                p for p in mirrors if p.value == 1 and p.attributes["server.port"] == a.port
            ]
            assert dict(active.attributes) == {
                "pool.name": NAME,
                "server.address": "127.0.0.1",
                "server.port": a.port,
                "http.connection.state": "active",
            }
            queue = got.histogram("http.client.request.time_in_queue", pool__name=NAME)
            wait = got.histogram("poolwatch.wait.duration", pool__name=NAME, outcome="acquired")
            assert queue.count == 2  # the request in flight has its connection: counted
            assert (queue.count, queue.sum, list(queue.bucket_counts)) == (
                wait.count,
                wait.sum,
                list(wait.bucket_counts),
            )
            assert await slow == b"ok\n"
            await asyncio.sleep(0.1)  # both connections live at least this long
        got = pw.collect()
        duration = got.histogram("http.client.connection.duration", pool__name=NAME)
        lifetime = got.histogram(
            "poolwatch.connection.lifetime", pool__name=NAME, reason="disposed"
        )
        assert duration.count == 2 and duration.min >= 0.1
        assert (duration.sum, duration.min, duration.max, list(duration.bucket_counts)) == (
            lifetime.sum,
            lifetime.min,
            lifetime.max,
            list(lifetime.bucket_counts),
        )

    with AsyncioUpstream() as a, ThreadedUpstream() as b:
        run(scenario(a, b))


def test_checkouts_equal_requests_under_concurrency(pw: Harness) -> None:
    async def scenario(up: AsyncioUpstream) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=5)) as session:
            for _ in range(4):
                await _gather(*(_get(session, up.url) for _ in range(50)))
            snap = _pool()
            assert (snap.checkouts, up.requests) == (200, 200)
            assert snap.connects == up.connections <= 5
            assert (snap.used, snap.pending, snap.idle) == (0, 0, up.connections)

    with AsyncioUpstream() as up:
        run(scenario(up))
    got = pw.collect()
    assert got.count("poolwatch.use.duration", pool__name=NAME) == 200
    assert got.count("poolwatch.wait.duration", pool__name=NAME, outcome="acquired") == 200


def test_a_session_base_url_names_the_pool_without_credentials(pw: Harness) -> None:
    async def scenario(up: AsyncioUpstream) -> str:
        base = f"http://user:s3cret@127.0.0.1:{up.port}/api/"
        made = aiohttp.TCPConnector(limit=3)
        async with aiohttp.ClientSession(base_url=base, connector=made) as session:
            assert await _get(session, "v1?token=abc") == b"ok\n"
            snap = _pool(f"http://127.0.0.1:{up.port}")
            assert (snap.checkouts, snap.max) == (1, 3)
            return repr((poolwatch.pools(), pw.collect().metrics))

    with AsyncioUpstream() as up:
        seen = run(scenario(up))
    for secret in ("s3cret", "user", "token", "api", "v1"):
        assert secret not in seen


def test_a_second_creation_site_gets_its_own_series(pw: Harness) -> None:
    async def scenario(up: AsyncioUpstream) -> None:
        sessions = [aiohttp.ClientSession() for _ in range(2)]  # one site, two instances
        other = aiohttp.ClientSession()  # another site
        for session in [*sessions, other]:
            async with session:
                await _get(session, up.url)
                await _get(session, up.url)

    with AsyncioUpstream() as up:
        run(scenario(up))
    snaps = sorted((s.name, s.checkouts, s.instances_created) for s in poolwatch.pools())
    assert [(name, checkouts, made) for name, checkouts, made in snaps] == [
        (NAME, 4, 2),
        (snaps[1][0], 2, 1),
    ]
    assert snaps[1][0].startswith("aiohttp (tests/test_aiohttp.py:")


def test_a_session_made_before_instrument_is_found(harness: Harness) -> None:
    async def scenario(up: AsyncioUpstream) -> None:
        base = aiohttp.ClientSession(base_url=up.url)
        plain = aiohttp.ClientSession()
        async with base, plain:
            await _get(base, "/")
            await _get(plain, up.url)
            await _get(plain, up.url + "/?delay=0.3")  # in flight when instrumented
            pending = asyncio.ensure_future(_get(plain, up.url + "/?delay=0.3"))
            await asyncio.sleep(0.1)
            harness.instrument()
            named = _pool(up.origin)
            assert (named.used, named.idle, named.checkouts) == (0, 1, 0)
            snap = _pool()
            assert (snap.used, snap.idle, snap.checkouts) == (1, 0, 0)
            await pending
            await _get(plain, up.url)
            snap = _pool()
            assert (snap.used, snap.idle, snap.checkouts, snap.connects) == (0, 1, 1, 0)
        closed = {s.name: s.closed["disposed"] for s in poolwatch.pools()}
        assert closed == {NAME: 1, up.origin: 1}

        # Opened before poolwatch saw them: closes counted, lifetimes unknown.
        assert "poolwatch.connection.lifetime" not in harness.collect().names()

    with AsyncioUpstream() as up:
        run(scenario(up))


_IMPORTED_LATER = """
import asyncio, sys
import poolwatch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

poolwatch.instrument(meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]))
assert "aiohttp" not in sys.modules
import aiohttp

async def main():
    async with aiohttp.ClientSession(base_url=sys.argv[1]) as session:
        for _ in range(3):
            async with session.get("/") as response:
                await response.read()
        snap, = poolwatch.pools()
        print(snap.name, snap.checkouts, snap.connects, snap.idle)

asyncio.run(main())
"""


def test_aiohttp_imported_after_instrument_is_hooked() -> None:
    with AsyncioUpstream() as up:
        done = subprocess.run(
            [sys.executable, "-c", _IMPORTED_LATER, up.url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [up.origin, "3", "1", "1"]
        assert up.connections == 1


def test_uninstrument_restores_aiohttp(harness: Harness) -> None:
    handler, base = client_proto.ResponseHandler, connector.BaseConnector
    patched = [
        (base, "__init__"),
        (base, "connect"),
        (base, "_release"),
        (connector.TCPConnector, "_create_connection"),
        (connector.UnixConnector, "_create_connection"),
        (handler, "close"),
        (handler, "abort"),
        (client.ClientSession, "__init__"),
    ]
    originals = {(cls, attr): cls.__dict__.get(attr) for cls, attr in patched}
    harness.instrument()
    assert all(cls.__dict__.get(attr) is not fn for (cls, attr), fn in originals.items())

    async def scenario(up: AsyncioUpstream) -> None:
        async with aiohttp.ClientSession() as session:
            await _get(session, up.url)
            assert _pool().idle == 1
            poolwatch.uninstrument()
            assert all(cls.__dict__.get(attr) is fn for (cls, attr), fn in originals.items())
            assert "_poolwatch_ledger" not in base.__dict__
            made = session.connector
            assert made is not None
            assert not [k for k in vars(made) if k.startswith("_poolwatch")]
            protocols = [p for conns in made._conns.values() for p, _ in conns]
            assert len(protocols) == 1 and not [k for k in vars(protocols[0]) if "poolwatch" in k]
            await _get(session, up.url)
        async with aiohttp.ClientSession() as later:
            await _get(later, up.url)
            assert not [k for k in vars(later.connector) if k.startswith("_poolwatch")]

    with AsyncioUpstream() as up:
        run(scenario(up))
    assert poolwatch.pools() == []
    assert harness.collect().names() == set()


def test_a_connector_made_on_the_event_loop_makes_no_blocking_call(pw: Harness) -> None:
    """Its creation site is found without a system call: aiohttp's own tests run under
    blockbuster, which fails a blocking call (``os.getcwd``, ``os.path.abspath``) on the
    event loop's thread."""
    from blockbuster import BlockBuster

    async def scenario(up: AsyncioUpstream) -> int:
        async with aiohttp.ClientSession() as first:  # the target's first site: plain name
            assert await _get(first, up.url) == b"ok\n"
        second_line = sys._getframe().f_lineno + 1
        connector = aiohttp.TCPConnector(limit=3)
        async with aiohttp.ClientSession(connector=connector) as second:
            assert await _get(second, up.url) == b"ok\n"
        return second_line

    buster = BlockBuster()
    with AsyncioUpstream() as up:
        buster.activate()
        try:
            line = run(scenario(up))
        finally:
            buster.deactivate()
    names = sorted(s.name for s in poolwatch.pools() if s.kind == "aiohttp")
    assert names == [NAME, f"{NAME} (tests/test_aiohttp.py:{line})"]


def test_connections_kept_under_keys_without_a_host_are_read(pw: Harness) -> None:
    """A connector subclass (aiohttp's own tests do this) may key its connections by
    something other than a ``ConnectionKey``: its levels are still read, no server named."""

    async def scenario(up: AsyncioUpstream) -> tuple[int, int, tuple[Any, ...]]:
        async with aiohttp.ClientSession() as session:
            assert await _get(session, up.url) == b"ok\n"
            connector = session.connector
            assert connector is not None
            [(key, idle)] = list(connector._conns.items())
            del connector._conns[key]
            connector._conns[("plain", "tuple")] = idle  # type: ignore[index]
            snap = _pool()
            return (snap.used, snap.idle, tuple(h[:2] for h in _hosts(pw)))

    with AsyncioUpstream() as up:
        used, idle, hosts = run(scenario(up))
    assert (used, idle, hosts) == (0, 1, (("", 0),))


def _hosts(pw: Harness) -> list[tuple[Any, ...]]:
    points = pw.collect().points("poolwatch.connections", pool__name=NAME, state="idle")
    return [(p.attributes["server.address"], p.attributes["server.port"]) for p in points]


def test_stand_ins_for_connections_are_read_without_error(pw: Harness) -> None:
    """aiohttp's own tests put ``unittest.mock.Mock()`` objects in a connector's ``_acquired``
    and ``_conns`` (a mock is the real part here: it is what those tests do). Whatever
    attribute poolwatch looks for on one, a Mock has: it must not be taken for a mark."""
    from unittest import mock

    async def scenario() -> tuple[int, int]:
        connector = aiohttp.TCPConnector(limit=5)
        poolwatch.track(connector, name="stand-ins")
        key = mock.Mock(host="127.0.0.1", port=9)
        connector._acquired.add(mock.Mock())
        connector._conns[key] = deque([(mock.Mock(), 0.0)])  # type: ignore[index]
        [snap] = [s for s in poolwatch.pools() if s.name == "stand-ins"]
        pw.collect()
        connector._acquired.clear()
        connector._conns.clear()
        await connector.close()
        return snap.used, snap.leaks_active

    assert run(scenario()) == (1, 0)
