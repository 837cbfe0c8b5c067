"""Leaks: one WARNING naming the pool and, once captured, the borrower's stack; INFO on return."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import sqlalchemy as sa
import urllib3
from aiohttp.client_reqrep import ClientRequest
from yarl import URL

import poolwatch
from tests.support.harness import Harness
from tests.support.postgres import PostgresCluster
from tests.support.upstream import ThreadedUpstream

THRESHOLD = 0.05


def _records(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    found = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "poolwatch"]
    caplog.clear()
    return found


def _borrow(engine: sa.Engine) -> tuple[sa.Connection, int]:
    line = sys._getframe().f_lineno + 1
    return engine.connect(), line  # the borrower: this line must appear in the stack


def test_first_leak_is_reported_then_the_next_borrower_is_named(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    harness.instrument(leak_threshold=THRESHOLD)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/leak.db")
    poolwatch.track(engine, name="orders-db")
    caplog.set_level(logging.INFO, logger="poolwatch")
    first = engine.connect()
    time.sleep(THRESHOLD * 2)
    poolwatch.pools()  # a collection finds it
    [(level, message)] = _records(caplog)
    assert level == "WARNING"
    assert message.startswith(
        "poolwatch: a connection of pool 'orders-db' (sqlalchemy) has been checked out for "
    )
    assert message.endswith(
        "past the leak threshold of 0.05 s; the borrower's stack was not captured; it is from "
        "now on for this pool's checkouts (leak_stacks='auto')"
    )
    second, line = _borrow(engine)
    time.sleep(THRESHOLD * 2)
    poolwatch.pools()
    [(level, message)] = _records(caplog)
    assert level == "WARNING"
    assert "checked out at:\n" in message
    assert f'File "{__file__}", line {line}, in _borrow\n' in message
    innermost = message.split("checked out at:")[1].splitlines()[-1]
    package = str(Path(poolwatch.__file__).parent)
    assert innermost.startswith('  File "') and package not in innermost  # ours left out
    first.close()
    second.close()
    assert [level for level, _ in _records(caplog)] == []  # logged at the next collection
    poolwatch.pools()
    returned = _records(caplog)
    assert [level for level, _ in returned] == ["INFO", "INFO"]
    assert all(
        m.startswith("poolwatch: the leaked connection of pool 'orders-db' (sqlalchemy) came "
                     "back after ")
        for _, m in returned
    )  # fmt: skip
    [snap] = poolwatch.pools()
    assert (snap.leaks, snap.leaks_active) == (2, 0)
    assert [level for level, _ in _records(caplog)] == []  # each reported once


def test_a_leak_shorter_than_a_collection_is_counted_at_its_return(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    harness.instrument(leak_threshold=THRESHOLD, leak_stacks="always")
    engine = sa.create_engine(f"sqlite:///{tmp_path}/leak.db")
    caplog.set_level(logging.INFO, logger="poolwatch")
    conn, line = _borrow(engine)
    time.sleep(THRESHOLD * 2)
    conn.close()  # back before any collection saw it out
    poolwatch.pools()
    [(level, message)] = _records(caplog)
    assert level == "WARNING"
    assert " was held for " in message
    assert f"line {line}, in _borrow" in message
    assert poolwatch.pools()[0].leaks == 1


def test_stacks_off(harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    harness.instrument(leak_threshold=THRESHOLD, leak_stacks="off")
    engine = sa.create_engine(f"sqlite:///{tmp_path}/leak.db")
    caplog.set_level(logging.WARNING, logger="poolwatch")
    held: list[Any] = []
    for _ in range(2):
        held.append(engine.connect())
        time.sleep(THRESHOLD * 2)
        poolwatch.pools()
    messages = [m for _, m in _records(caplog)]
    assert len(messages) == 2
    assert all(
        m.endswith("the borrower's stack is not captured (leak_stacks='off')") for m in messages
    )
    for conn in held:
        conn.close()


def test_an_http_connection_held_too_long_names_its_borrower(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.instrument(leak_threshold=THRESHOLD, leak_stacks="always")
    caplog.set_level(logging.WARNING, logger="poolwatch")
    with ThreadedUpstream() as upstream:
        manager = urllib3.PoolManager()
        line = sys._getframe().f_lineno + 1
        response = manager.request("GET", upstream.url, preload_content=False)
        time.sleep(THRESHOLD * 2)
        poolwatch.pools()
        [(_, message)] = _records(caplog)
        assert message.startswith(f"poolwatch: a connection of pool '{upstream.origin}' (urllib3)")
        assert f'File "{__file__}", line {line}, in ' in message
        response.read()
        response.release_conn()
        manager.clear()


def test_an_httpx_response_held_too_long_names_its_borrower_then_comes_back(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx keeps each checkout's time on the request, not in the ledger: a collection
    finds the request out in the pool's own list, past the threshold."""
    harness.instrument(leak_threshold=THRESHOLD, leak_stacks="always")
    caplog.set_level(logging.INFO, logger="poolwatch")
    with ThreadedUpstream() as upstream, httpx.Client(base_url=upstream.url) as client:
        line = sys._getframe().f_lineno + 1
        response = client.send(client.build_request("GET", "/"), stream=True)
        time.sleep(THRESHOLD * 2)
        [out] = poolwatch.pools()
        [(level, message)] = _records(caplog)
        assert level == "WARNING"
        assert message.startswith(
            f"poolwatch: a connection of pool '{upstream.origin}' (httpx) has been checked out "
        )
        assert f'File "{__file__}", line {line}, in ' in message
        assert response.read() == b"ok\n"
        response.close()
        [back] = poolwatch.pools()
        [(level, message)] = _records(caplog)
        assert (level, message.split(" came back after ")[0]) == (
            "INFO",
            f"poolwatch: the leaked connection of pool '{upstream.origin}' (httpx)",
        )
    assert (out.used, out.checkouts, out.leaks, out.leaks_active) == (1, 1, 1, 1)
    assert (back.used, back.idle, back.leaks, back.leaks_active) == (0, 1, 1, 0)


def test_aiohttp_connections_held_too_long_on_two_connectors_of_one_pool(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp keeps each checkout's time on the connection, not in the ledger: a collection
    gathers the connections out from every connector of the series (two connectors tracked
    under one name: one series, two instances) and finds both past the threshold."""
    harness.instrument(leak_threshold=THRESHOLD, leak_stacks="always")
    caplog.set_level(logging.INFO, logger="poolwatch")

    async def main(upstream: ThreadedUpstream) -> list[poolwatch.PoolSnapshot]:
        connectors = [aiohttp.TCPConnector(), aiohttp.TCPConnector()]
        for each in connectors:
            poolwatch.track(each, name="held")
        request = ClientRequest("GET", URL(upstream.url), loop=asyncio.get_running_loop())
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            line = sys._getframe().f_lineno + 1
            connections = [await each.connect(request, [], timeout) for each in connectors]
            await asyncio.sleep(THRESHOLD * 2)
            [out] = poolwatch.pools()
            warnings = _records(caplog)
            assert [level for level, _ in warnings] == ["WARNING", "WARNING"]
            for _, message in warnings:
                assert message.startswith(
                    "poolwatch: a connection of pool 'held' (aiohttp) has been checked out for "
                )
                assert f'File "{__file__}", line {line}, in main' in message
            for connection in connections:
                connection.release()
            [back] = poolwatch.pools()
            returned = _records(caplog)
            assert [level for level, _ in returned] == ["INFO", "INFO"]
            assert all(
                m.startswith("poolwatch: the leaked connection of pool 'held' (aiohttp) came back")
                for _, m in returned
            )
            [after] = poolwatch.pools()
            return [out, back, after]
        finally:
            for each in connectors:
                await each.close()

    with ThreadedUpstream() as upstream:
        out, back, after = asyncio.run(main(upstream))
    assert (out.instances, out.used, out.checkouts, out.leaks, out.leaks_active) == (2, 2, 2, 2, 2)
    assert (back.used, back.idle, back.leaks, back.leaks_active) == (0, 2, 2, 0)
    assert (after.leaks, after.leaks_active) == (2, 0)
    assert _records(caplog) == []  # each reported once


# -- checkouts garbage-collected without being returned ------------------------------------
COLLECTED = "was garbage-collected without being returned, after "


def _checkout_and_drop(engine: sa.Engine) -> None:
    conn = engine.connect()
    conn.execute(sa.text("SELECT 1"))
    # returns without closing conn: the fairy is collected with this frame


def test_a_database_connection_dropped_unreturned_is_a_leak(
    pw: Harness, postgres: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolwatch")
    engine = sa.create_engine(postgres.url())
    poolwatch.track(engine, name="orders-db")
    _checkout_and_drop(engine)
    gc.collect()
    # SQLAlchemy's own cleanup returned the connection to the pool: the use ended
    [snap] = poolwatch.pools()
    assert (snap.used, snap.idle, snap.checkouts, snap.leaks, snap.leaks_active) == (0, 1, 1, 1, 0)
    [(level, message)] = _records(caplog)
    assert level == "WARNING"
    assert message.startswith(
        f"poolwatch: a connection of pool 'orders-db' (sqlalchemy) {COLLECTED}"
    )
    assert message.endswith(
        "s; the borrower's stack was not captured; it is from now on for this pool's "
        "checkouts (leak_stacks='auto')"
    )
    line = _checkout_and_drop.__code__.co_firstlineno + 1
    _checkout_and_drop(engine)  # stacks are captured now: the borrower is named
    gc.collect()
    poolwatch.pools()
    [(level, message)] = _records(caplog)
    assert f'File "{__file__}", line {line}, in _checkout_and_drop\n' in message
    with engine.connect() as conn:  # a returned checkout is not a leak
        conn.execute(sa.text("SELECT 1"))
    got = pw.collect()
    assert got.value("poolwatch.leaks", pool__name="orders-db") == 2
    assert got.value("poolwatch.leaks.active", pool__name="orders-db") == 0
    assert got.count("poolwatch.use.duration", pool__name="orders-db") == 3
    assert _records(caplog) == []
    engine.dispose()


def test_a_urllib3_response_dropped_unreleased_is_a_leak_and_its_socket_closes(
    pw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    with ThreadedUpstream() as upstream:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", upstream.port, maxsize=2)
        kept = pool.request("GET", "/", preload_content=False)  # still referenced: not a leak
        dropped = pool.request("GET", "/", preload_content=False)
        del dropped
        gc.collect()
        first, second = poolwatch.pools(), poolwatch.pools()  # confirmed at the second sweep
        assert [(s.used, s.leaks) for s in first] == [(2, 0)]
        assert [(s.used, s.leaks, s.checkouts) for s in second] == [(1, 1, 2)]
        [(_, message)] = _records(caplog)
        assert message.startswith(f"poolwatch: a connection of pool '{upstream.origin}' (urllib3)")
        assert COLLECTED in message
        for _ in range(3):
            poolwatch.pools()
        assert [(s.used, s.leaks) for s in poolwatch.pools()] == [(1, 1)]  # counted once
        assert kept.read() == b"ok\n"
        kept.release_conn()
        pool.request("GET", "/")
        [snap] = poolwatch.pools()
        assert (snap.used, snap.idle, snap.leaks, snap.checkouts, snap.connects) == (0, 1, 1, 3, 2)
        # the collected response closed its connection (io.IOBase.__del__), and only then
        # poolwatch let go of the object: the server saw it close
        assert snap.closed["invalidated"] == 1
        assert pw.collect().value("poolwatch.leaks", pool__name=upstream.origin) == 1
        pool.close()


def test_an_httpx_response_dropped_unclosed_is_a_leak_that_keeps_its_connection(
    pw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    with ThreadedUpstream() as upstream, httpx.Client(base_url=upstream.url) as client:
        response = client.send(client.build_request("GET", "/"), stream=True)
        del response
        gc.collect()
        poolwatch.pools()
        [snap] = poolwatch.pools()
        # httpcore never takes such a request out of its pool: the connection stays in use
        assert (snap.used, snap.idle, snap.leaks, snap.leaks_active) == (1, 0, 1, 0)
        [(_, message)] = _records(caplog)
        assert message.startswith(f"poolwatch: a connection of pool '{upstream.origin}' (httpx)")
        assert COLLECTED in message
        assert client.get("/").text == "ok\n"  # a second connection
        poolwatch.pools()  # two sweeps more: the leak is not found again
        [snap] = poolwatch.pools()
        assert (snap.used, snap.idle, snap.leaks, snap.checkouts, snap.connects) == (1, 1, 1, 2, 2)


class _UnfinishedBody:
    """A real server on 127.0.0.1 that answers every request with the first bytes of a
    longer body and then waits: a response a client cannot finish reading."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._clients: list[socket.socket] = []

    def __enter__(self) -> _UnfinishedBody:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for client in self._clients:
            client.close()
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._clients.append(client)
            client.settimeout(5)
            client.recv(65536)  # the request
            client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst bytes")


def test_an_unfinished_aiohttp_response_dropped_unreleased_is_an_active_leak(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp keeps a half-read response alive itself (its protocol holds the response's
    end-of-payload callback): it is never collected, and its connection never comes back.
    The leak threshold finds it."""
    harness.instrument(leak_threshold=THRESHOLD)
    caplog.set_level(logging.WARNING, logger="poolwatch")

    async def main() -> poolwatch.PoolSnapshot:
        with _UnfinishedBody() as server:
            async with aiohttp.ClientSession(base_url=server.url) as session:
                response = await session.get("/")
                assert await response.content.read(5) == b"first"
                del response
                gc.collect()
                await asyncio.sleep(THRESHOLD * 2)
                [snapshot] = poolwatch.pools()
                return snapshot

    dropped = asyncio.run(main())
    assert (dropped.used, dropped.leaks, dropped.leaks_active) == (1, 1, 1)
    [(_, message)] = _records(caplog)
    assert message.startswith(
        f"poolwatch: a connection of pool '{dropped.name}' (aiohttp) has been checked out for "
    )


@pytest.mark.filterwarnings("ignore:Unclosed connection:ResourceWarning")  # aiohttp's own
def test_an_aiohttp_connection_dropped_unreleased_is_a_leak(
    pw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")

    async def main() -> poolwatch.PoolSnapshot:
        with ThreadedUpstream() as upstream:
            connector = aiohttp.TCPConnector()
            request = ClientRequest("GET", URL(upstream.url), loop=asyncio.get_running_loop())
            connection = await connector.connect(request, [], aiohttp.ClientTimeout(total=5))
            del connection  # aiohttp's Connection.__del__ releases it, closing it
            gc.collect()
            [snapshot] = poolwatch.pools()
            await connector.close()
            return snapshot

    dropped = asyncio.run(main())
    assert (dropped.used, dropped.idle, dropped.leaks, dropped.checkouts) == (0, 0, 1, 1)
    assert dropped.closed["error"] == 1
    [(_, message)] = _records(caplog)
    assert message.startswith(f"poolwatch: a connection of pool '{dropped.name}' (aiohttp) ")
    assert COLLECTED in message
