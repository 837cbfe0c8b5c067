"""httpx Client and AsyncClient pools against real loopback servers: exact counts."""

from __future__ import annotations

import asyncio
import ssl
import sys
import threading
import time
from collections.abc import Callable

import httpcore
import httpx
import pytest

import poolwatch
from tests.conftest import Harness
from tests.support.upstream import AsyncioUpstream, ThreadedUpstream, refusing_port


def _pool(name: str) -> poolwatch.PoolSnapshot:
    found = [s for s in poolwatch.pools() if s.name == name and s.kind == "httpx"]
    assert len(found) == 1, poolwatch.pools()
    return found[0]


def _wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.mark.semconv
def test_keep_alive_requests_reuse_one_connection(pw: Harness) -> None:
    with ThreadedUpstream() as upstream, httpx.Client(base_url=upstream.url) as client:
        for _ in range(4):
            assert client.get("/").text == "ok\n"
        snap = _pool(upstream.origin)
        assert (snap.used, snap.idle, snap.max, snap.pending) == (0, 1, 100, 0)
        assert (snap.checkouts, snap.connects, upstream.connections, upstream.requests) == (
            4,
            1,
            1,
            4,
        )
        assert (snap.reused, snap.reuse_ratio) == (3, 0.75)
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
        assert got.count("poolwatch.wait.duration", pool__name=upstream.origin) == 4
        assert got.count("poolwatch.use.duration", pool__name=upstream.origin) == 4
        assert got.count("poolwatch.connect.duration", pool__name=upstream.origin) == 1
        mirrors = got.points("http.client.open_connections", pool__name=upstream.origin)
        assert {p.attributes["http.connection.state"]: p.value for p in mirrors} == {
            "active": 0,
            "idle": 1,
        }
        assert got.count("http.client.request.time_in_queue", pool__name=upstream.origin) == 4
    assert _pool(upstream.origin).closed["disposed"] == 1  # the client closed


def test_used_and_idle_per_origin(pw: Harness) -> None:
    with ThreadedUpstream() as first, AsyncioUpstream() as second, httpx.Client() as client:
        for url in (first.url, first.url, second.url):
            client.get(url)
        snap = _pool("httpx")
        assert (snap.idle, snap.checkouts, snap.connects) == (2, 3, 2)
        got = pw.collect()
        idle = {
            p.attributes["server.port"]: p.value
            for p in got.points("poolwatch.connections", pool__name="httpx", state="idle")
        }
        assert idle == {first.port: 1, second.port: 1}


def test_pool_timeouts_are_exact_and_waiters_pending(pw: Harness) -> None:
    limits = httpx.Limits(max_connections=2)
    timeout = httpx.Timeout(10.0, pool=0.15)
    outcomes: list[str] = []
    lock = threading.Lock()
    with ThreadedUpstream(delay=0.5) as slow, httpx.Client(limits=limits, timeout=timeout) as c:

        def call() -> None:
            try:
                c.get(slow.url)
                result = "ok"
            except httpx.PoolTimeout:
                result = "timeout"
            with lock:
                outcomes.append(result)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        _wait_until(lambda: _pool("httpx").pending > 0)
        waiting = _pool("httpx")
        for t in threads:
            t.join(10)
        assert waiting.used == 2
        assert sorted(outcomes) == ["ok", "ok", "timeout", "timeout", "timeout", "timeout"]
        snap = _pool("httpx")
        assert (snap.timeouts, snap.checkouts, snap.pending, snap.used) == (4, 2, 0, 0)
        timed_out = pw.collect().histogram(
            "poolwatch.wait.duration", pool__name="httpx", outcome="timeout"
        )
        assert timed_out.count == 4
        assert timed_out.min >= 0.15


def test_closes_by_reason(pw: Harness) -> None:
    with ThreadedUpstream(idle_timeout=0.05) as dropping, ThreadedUpstream() as steady:
        with httpx.Client(base_url=dropping.url) as client:
            client.get("/")
            _wait_until(lambda: dropping.closed_idle == 1)
            client.get("/")  # the pool finds the server closed it
            assert _pool(dropping.origin).closed["stale"] == 1
        expiring = httpx.Limits(keepalive_expiry=0.05)
        with httpx.Client(base_url=steady.url, limits=expiring) as client:
            client.get("/")
            time.sleep(0.1)
            client.get("/")  # the pool drops the expired one first
            assert _pool(steady.origin).closed["idle_expired"] == 1
        with httpx.Client(base_url=steady.url) as closing:
            site = f"tests/test_httpx.py:{sys._getframe().f_lineno - 1}"  # a second site
            closing.get("/", headers={"Connection": "close"})
            assert _pool(f"{steady.origin} ({site})").closed["invalidated"] == 1
        surplus = httpx.Limits(max_keepalive_connections=1)
        with ThreadedUpstream(delay=0.2) as slow, httpx.Client(limits=surplus) as client:
            threads = [threading.Thread(target=client.get, args=(slow.url,)) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            snap = _pool("httpx")
            assert (snap.connects, snap.idle, snap.closed["pool_full"]) == (3, 1, 2)
    assert _pool(dropping.origin).closed == {
        "idle_expired": 0,
        "max_lifetime": 0,
        "pool_full": 0,
        "stale": 1,
        "invalidated": 0,
        "error": 0,
        "disposed": 1,
    }


def test_read_timeout_ends_the_use_and_closes_as_error(pw: Harness) -> None:
    timeout = httpx.Timeout(5, read=0.05)
    with ThreadedUpstream(delay=0.5) as slow, httpx.Client(base_url=slow.url, timeout=timeout) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get("/")
        snap = _pool(slow.origin)
        assert (snap.used, snap.checkouts, snap.timeouts) == (0, 1, 0)
        assert snap.closed["error"] == 1
        assert pw.collect().count("poolwatch.use.duration", pool__name=slow.origin) == 1


def test_refused_connect_is_a_connect_error(pw: Harness) -> None:
    with refusing_port() as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(httpx.ConnectError):
            client.get("/")
        snap = _pool(f"http://127.0.0.1:{port}")
        assert (snap.used, snap.checkouts, snap.connects, snap.connect_errors) == (0, 1, 0, 1)
        assert sum(snap.closed.values()) == 0


def test_tls_connects_are_timed(pw: Harness) -> None:
    with ThreadedUpstream(tls=True) as server:
        trust = ssl.create_default_context(cafile=server.ca_file)
        with httpx.Client(base_url=server.url, verify=trust) as client:
            for _ in range(3):
                assert client.get("/").status_code == 200
            snap = _pool(server.origin)
            assert (snap.checkouts, snap.connects, server.connections) == (3, 1, 1)
            connect = pw.collect().histogram("poolwatch.connect.duration", pool__name=server.origin)
            assert connect.count == 1


def test_async_client_on_a_real_event_loop(pw: Harness) -> None:
    async def main() -> tuple[poolwatch.PoolSnapshot, int]:
        with AsyncioUpstream(delay=0.2) as upstream:
            limits = httpx.Limits(max_connections=2)
            async with httpx.AsyncClient(base_url=upstream.url, limits=limits) as client:
                requests = [asyncio.create_task(client.get("/")) for _ in range(6)]
                await asyncio.sleep(0.05)
                during = _pool(upstream.origin)
                await asyncio.gather(*requests)
                return during, upstream.connections

    during, connections = asyncio.run(main())
    assert (during.used, during.pending, during.max) == (2, 4, 2)
    [snap] = [s for s in poolwatch.pools() if s.kind == "httpx"]
    assert (snap.checkouts, snap.connects, connections) == (6, 2, 2)
    assert snap.closed["disposed"] == 2


def test_proxy_pools_are_named_without_credentials(pw: Harness) -> None:
    with ThreadedUpstream() as upstream:  # a forwarding proxy: the upstream answers itself
        proxy = f"http://alice:s3cret@127.0.0.1:{upstream.port}"
        with httpx.Client(proxy=proxy) as client:
            client.get("http://example.invalid/path?token=abc")
            pools = {s.name: s.checkouts for s in poolwatch.pools() if s.kind == "httpx"}
            # the client's own pool (unused here) and its proxy mount's pool
            assert pools == {"httpx": 0, f"httpx via {upstream.origin}": 1}
            exported = repr(pw.collect().metrics)
            for secret in ("alice", "s3cret", "token", "abc"):
                assert secret not in exported


def test_a_client_made_before_instrument_is_found(harness: Harness) -> None:
    with ThreadedUpstream() as upstream, httpx.Client(base_url=upstream.url) as client:
        client.get("/")
        harness.instrument()
        client.get("/")
        snap = _pool(upstream.origin)
        assert (snap.checkouts, snap.idle) == (1, 1)


def test_uninstrument_restores_httpcore(harness: Harness) -> None:
    from httpcore._sync import connection_pool

    patched = [
        (httpcore.ConnectionPool, "handle_request"),
        (httpcore.AsyncConnectionPool, "handle_async_request"),
        (connection_pool.PoolRequest, "wait_for_connection"),
        (connection_pool.PoolByteStream, "close"),
        (httpx.Client, "__init__"),
        (httpx.AsyncClient, "__init__"),
    ]
    originals = {(cls, attr): cls.__dict__[attr] for cls, attr in patched}
    harness.instrument()
    assert all(cls.__dict__[attr] is not fn for (cls, attr), fn in originals.items())
    poolwatch.uninstrument()
    assert all(cls.__dict__[attr] is fn for (cls, attr), fn in originals.items())
    assert "_poolwatch_ledger" not in httpcore.ConnectionPool.__dict__
    with ThreadedUpstream() as upstream, httpx.Client(base_url=upstream.url) as client:
        client.get("/")
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
