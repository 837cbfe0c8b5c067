"""Ground truth for httpx (httpcore) pools: every exported figure against the pool, the
workload and the loopback server (tests/support/truth.py says how; ``POOLWATCH_TRUTH_SEED``
replays a run).

An ``httpx.Client`` shared by three worker threads, and an ``AsyncClient`` shared by six
tasks, with ``max_connections=3``. Operations, chosen at random: a request read whole; a
streamed response held across operations (and pauses), read and closed later; an exception
raised while holding one; a request the server answers with ``Connection: close``; a read
timeout. The tasks outnumber the connections, so that they queue (pending); one threaded
run talks to a server that closes idle keep-alive connections after 50 ms.

Why the threads never outnumber the connections, and nobody gives up waiting (no pool
timeouts): httpcore 1.0.9's sync pool, once requests queue, closes connections it has
already handed to a queued request, which then fails on a closed socket (``ReadError:
[Errno 9] Bad file descriptor``) or hangs until its read timeout — with or without
poolwatch (reproduced bare: three threads sharing ``max_connections=2``, each request read
whole; encode/httpcore#1110). Exact pending and timeout counts of the sync pool are pinned
by tests/test_httpx.py, with every connection held while callers wait, and item 4 below.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import ssl
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
import pytest

import poolwatch
from tests.support.threads import blocked_in
from tests.support.truth import (
    Comparison,
    CountingAsyncUpstream,
    CountingUpstream,
    Racing,
    Readers,
    Seeded,
    Tally,
    TaskGate,
    ThreadGate,
    class_attributes,
    cycle,
    deadline_after,
    drive_threads,
    figures,
    pause_moments,
    poolwatch_frames,
    settle,
)

# Bounds: every loop stops at a count or a time, whichever comes first (the CI budget of
# the whole ground-truth suite is about 150 s on a two-core machine; the soak,
# benchmarks/soak.py, runs the same workloads for minutes).
OPERATIONS = 500
"""Operations of one randomized run, over all its workers (and at most ``SECONDS``)."""
SECONDS = 6.0
PAUSES = 8
WORKERS = 6
MAX_CONNECTIONS = 3
LONG_WAIT = 30.0
IDLE_TIMEOUT = 0.05
PER_CALL_CLIENTS = 600
PER_CALL_SECONDS = 5.0
CYCLES = 40
CYCLE_SECONDS = 5.0


class Injected(Exception):
    """An exception the workload raises on purpose while holding a response."""


def _limits() -> httpx.Limits:
    # Every idle connection is kept (no pool_full closes) and none expires during a run.
    return httpx.Limits(
        max_connections=MAX_CONNECTIONS,
        max_keepalive_connections=MAX_CONNECTIONS,
        keepalive_expiry=60.0,
    )


def _timeout(wait: float, read: float = 10.0) -> httpx.Timeout:
    return httpx.Timeout(10.0, read=read, pool=wait)


def pool_of(client: httpx.Client | httpx.AsyncClient) -> Any:
    return client._transport._pool  # type: ignore[union-attr]


def library_levels(pool: Any) -> tuple[int, int, int]:
    """httpcore's own view: connections busy (or connecting), idle, requests queued."""
    connections = list(pool._connections)
    used = sum(1 for c in connections if not c.is_idle() and not c.is_closed())
    idle = sum(1 for c in connections if c.is_idle() and not c.is_closed())
    queued = sum(1 for r in list(pool._requests) if r.is_queued())
    return used, idle, queued


@dataclass
class Worker:
    held: list[httpx.Response] = field(default_factory=list)


class Workload:
    """Random operations on one client, from threads; what they saw."""

    def __init__(self, rng: Seeded, client: httpx.Client, url: str, *, dropping: bool) -> None:
        self.rng = rng
        self.client = client
        self.url = url
        self.dropping = dropping
        self.tally = Tally()
        self.workers: dict[int, Worker] = {}
        self.expired = deadline_after(SECONDS)

    def _send(self, me: Worker, r: random.Random, **kwargs: Any) -> httpx.Response | None:
        read = kwargs.pop("read", 10.0)
        request = self.client.build_request(
            "GET", kwargs.pop("path", self.url), timeout=_timeout(LONG_WAIT, read), **kwargs
        )
        try:
            response = self.client.send(request, stream=True)
        except (httpx.RemoteProtocolError, httpx.ReadError) as error:
            # Against the dropping server, a connection it closes just as the pool hands
            # it out fails the request (or another thread's pool pass closes it under the
            # request: EBADF, an httpcore race): the checkout happened, the request is lost.
            if not self.dropping:
                raise
            self.tally.add("checkouts")
            self.tally.add("returns")
            self.tally.add("failed")
            self.tally.add("unanswered")
            del error
            return None
        self.tally.add("checkouts")
        return response

    def _finish(self, response: httpx.Response) -> None:
        assert response.read() == b"ok\n"
        response.close()
        self.tally.add("returns")

    def hold(self, me: Worker, r: random.Random) -> None:
        response = self._send(me, r)
        if response is not None:
            me.held.append(response)
            self.tally.add("held")

    def server_closes(self, me: Worker, r: random.Random) -> None:
        response = self._send(me, r, headers={"Connection": "close"})
        if response is not None:
            self.tally.add("server_closed")
            self._finish(response)

    def read_timeout(self, me: Worker, r: random.Random) -> None:
        try:
            response = self._send(me, r, path=f"{self.url}/?delay=0.5", read=0.01)
        except httpx.ReadTimeout:
            # The response did not come in time: its connection is closed (error).
            self.tally.add("checkouts")
            self.tally.add("returns")
            self.tally.add("failed")
            return
        if response is not None:
            self.tally.unexpected_error("read timeout", AssertionError("came in time"))
            self._finish(response)

    def raise_holding(self, me: Worker, r: random.Random) -> None:
        response = self._send(me, r)
        if response is None:
            return
        try:
            raise Injected("raised while holding a response")
        except Injected:
            pass
        finally:
            self._finish(response)

    def whole(self, me: Worker, r: random.Random) -> None:
        response = self._send(me, r)
        if response is not None:
            self._finish(response)

    def step(self, me: Worker, r: random.Random) -> None:
        if me.held:  # holding one, never wait for another (two holders could deadlock)
            self.tally.add("held", -1)
            self._finish(me.held.pop())
            return
        ops = [
            (self.hold, 30),
            (self.server_closes, 8),
            (self.read_timeout, 4),
            (self.raise_holding, 8),
            (self.whole, 50),
        ]
        functions, weights = zip(*ops, strict=True)
        r.choices(functions, weights)[0](me, r)

    def worker(self, index: int, gate: ThreadGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        me = self.workers[threading.get_ident()] = Worker()
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                gate.checkpoint()
                if gate.stopping:
                    break
                try:
                    self.step(me, r)
                except Exception as error:
                    self.tally.unexpected_error("step", error)
                self.tally.add("operations")
        finally:
            for response in me.held:
                self.tally.add("held", -1)
                self._finish(response)


def compare(
    label: str,
    rng: Seeded,
    readers: Readers,
    *,
    tally: Tally,
    pool: Any,
    server: CountingUpstream | CountingAsyncUpstream,
    pending: int,
    name: str,
) -> None:
    t = tally
    t.assert_expected(rng)
    dropping = server.idle_timeout is not None
    settle(lambda: server.requests == t["checkouts"] - t["unanswered"])
    used_lib, idle_lib, queued = library_levels(pool)
    server_view: dict[str, int | None] = {}
    if not dropping:  # the dropping server closes idle connections the pool has not seen
        settle(lambda: server.open_connections == used_lib + idle_lib)
        server_view["server"] = server.open_connections - used_lib
    got = figures(readers.collect_settled(), name)
    cmp = Comparison(f"{label}: httpx", rng, got)
    cmp.expect("used", workload=t["held"], library=used_lib)
    cmp.expect("idle", library=idle_lib, **server_view)
    cmp.expect("max", workload=MAX_CONNECTIONS, library=pool._max_connections)
    cmp.expect("pending", workload=pending, library=queued)
    cmp.expect("checkouts", workload=t["checkouts"], server=server.requests + t["unanswered"])
    cmp.expect("uses", workload=t["returns"])
    cmp.expect("wait_timeouts", workload=t["timeouts"])
    cmp.expect("timeouts", workload=t["timeouts"])
    cmp.expect("wait_errors", workload=0)
    cmp.expect("connects", server=server.connections)
    cmp.expect("connect_errors", workload=0)
    cmp.reused(t["checkouts"] - server.connections)
    cmp.expect("leaks", workload=0)
    # Closes: every connection the server accepted that the pool does not hold open now was
    # closed — by the server's answer (Connection: close: invalidated), by a failed request
    # (error), or, against the dropping server, found closed while idle (stale).
    closed = server.connections - used_lib - idle_lib
    if not dropping:
        cmp.closes({"invalidated": t["server_closed"], "error": t["failed"]}, "workload")
    else:
        # Against the dropping server a request can be handed a connection that the server
        # has just closed, and another thread's pool pass closes it as stale before the
        # request fails on it (an httpcore race, EBADF): which of the two reasons a
        # failed request's connection gets is not the workload's to know; their sum is.
        cmp.expect("closed.invalidated", workload=t["server_closed"])
        got["closed.error or stale"] = (got.get("closed.error") or 0) + (
            got.get("closed.stale") or 0
        )
        cmp.expect("closed.error or stale", server=closed - t["server_closed"])
    cmp.check()


@pytest.mark.parametrize("dropping", [False, True], ids=["keepalive", "idle-drops"])
def test_a_client_under_threads(rng: Seeded, readers: Readers, dropping: bool) -> None:
    readers.instrument()
    with CountingUpstream(idle_timeout=IDLE_TIMEOUT if dropping else None) as server:
        client = httpx.Client(limits=_limits())
        poolwatch.track(client, name="truth")
        pool = pool_of(client)
        workload = Workload(rng, client, server.url, dropping=dropping)
        gate = ThreadGate(rng)

        def on_pause(label: str, pending: int) -> None:
            compare(
                label,
                rng,
                readers,
                tally=workload.tally,
                pool=pool,
                server=server,
                pending=pending,
                name="truth",
            )

        with Racing(readers):
            made = drive_threads(
                gate,
                workload.tally,
                lambda i: workload.worker(i, gate),
                workers=MAX_CONNECTIONS,  # never more: see the module's docstring
                moments=pause_moments(rng, OPERATIONS, PAUSES),
                on_pause=on_pause,
            )
        on_pause(f"the end ({made} pauses)", 0)
        idle = library_levels(pool)[1]
        before = figures(readers.collect(), "truth").get("closed.disposed") or 0
        client.close()
        cmp = Comparison("after close()", rng, figures(readers.collect_settled(), "truth"))
        cmp.expect("closed.disposed", library=before + idle)
        cmp.check()
    readers.assert_clean()


# -- AsyncClient, tasks on one event loop ----------------------------------------------------
class AsyncWorkload:
    """Random operations on one AsyncClient, from tasks. Every wait for a connection is
    long here: a task queued in the pool is still, and counts as pending (the pause cannot
    tell a short wait's task from a long one's)."""

    def __init__(self, rng: Seeded, client: httpx.AsyncClient, url: str) -> None:
        self.rng = rng
        self.client = client
        self.url = url
        self.tally = Tally()
        self.expired = deadline_after(SECONDS)

    async def _send(self, **kwargs: Any) -> httpx.Response:
        read = kwargs.pop("read", 10.0)
        request = self.client.build_request(
            "GET", kwargs.pop("path", self.url), timeout=_timeout(LONG_WAIT, read), **kwargs
        )
        response = await self.client.send(request, stream=True)
        self.tally.add("checkouts")
        return response

    async def _finish(self, response: httpx.Response) -> None:
        assert await response.aread() == b"ok\n"
        await response.aclose()
        self.tally.add("returns")

    async def step(self, held: list[httpx.Response], r: random.Random) -> None:
        if held:  # holding one, never wait for another (two holders could deadlock)
            self.tally.add("held", -1)
            await self._finish(held.pop())
            return
        roll = r.random()
        if roll < 0.35:
            held.append(await self._send())
            self.tally.add("held")
        elif roll < 0.45:
            response = await self._send(headers={"Connection": "close"})
            self.tally.add("server_closed")
            await self._finish(response)
        elif roll < 0.5:
            try:
                await self._send(path=f"{self.url}/?delay=0.5", read=0.01)
            except httpx.ReadTimeout:
                self.tally.add("checkouts")
                self.tally.add("returns")
                self.tally.add("failed")
            else:
                self.tally.unexpected_error("read timeout", AssertionError("came in time"))
        else:
            response = await self._send()
            await asyncio.sleep(r.random() * 0.002)
            await self._finish(response)

    async def worker(self, index: int, gate: TaskGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: list[httpx.Response] = []
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                await gate.checkpoint()
                try:
                    await self.step(held, r)
                except Exception as error:
                    self.tally.unexpected_error("step", error)
                self.tally.add("operations")
        finally:
            for response in held:
                self.tally.add("held", -1)
                await self._finish(response)


def test_an_async_client_under_tasks(rng: Seeded, readers: Readers) -> None:
    readers.instrument()

    async def main(server: CountingAsyncUpstream) -> None:
        client = httpx.AsyncClient(limits=_limits())
        poolwatch.track(client, name="truth")
        pool = pool_of(client)
        workload = AsyncWorkload(rng, client, server.url)
        gate = TaskGate(rng)

        def queued() -> int:
            return library_levels(pool)[2]

        def compare_now(label: str, pending: int) -> None:
            compare(
                label,
                rng,
                readers,
                tally=workload.tally,
                pool=pool,
                server=server,
                pending=pending,
                name="truth",
            )

        gate.start(lambda i: workload.worker(i, gate), WORKERS)
        for number, moment in enumerate(sorted(pause_moments(rng, OPERATIONS, PAUSES)), 1):
            while workload.tally["operations"] < moment and not all(t.done() for t in gate.tasks):
                await asyncio.sleep(0.001)
            if all(t.done() for t in gate.tasks):
                break
            pending = await gate.pause(blocked=queued)
            try:
                # Blocking the loop on purpose: nothing of the client runs meanwhile; the
                # server's counters settle on its own loop, in another thread.
                compare_now(f"pause {number}", pending)
            finally:
                gate.resume()
        await gate.join()
        compare_now("the end", 0)
        await client.aclose()

    with CountingAsyncUpstream() as server, Racing(readers):
        asyncio.run(main(server))
    readers.assert_clean()


# -- issue 18's bugs, and the reuse race, each reproduced (fixed) -----------------------------
def inside(thread: threading.Thread, function: str) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_reused_is_not_counted_before_the_connect(rng: Seeded, readers: Readers) -> None:
    """One request on a new client: httpcore hands the request its (new) connection before
    connecting it; a collection in between must not count it as reusing a connection. The
    server's TLS handshake waits for the test, which collects during the connect."""
    readers.instrument()
    handshake = threading.Event()
    with CountingUpstream(tls=True) as server:
        assert server.ssl_context is not None

        def hold_the_handshake(*_: object) -> None:
            handshake.wait(10)

        server.ssl_context.sni_callback = hold_the_handshake
        trust = ssl.create_default_context(cafile=server.ca_file)
        with httpx.Client(verify=trust) as client:
            poolwatch.track(client, name="truth")
            request = threading.Thread(target=lambda: client.get(server.url))
            request.start()
            try:
                assert settle(lambda: inside(request, "_connect")), "never connected"
                during = figures(readers.collect(), "truth")
            finally:
                handshake.set()
                request.join(10)
            got = figures(readers.collect_settled(), "truth")
            cmp = Comparison("one request, on a new connection", rng, got)
            cmp.expect("checkouts", workload=1, server=server.requests)
            cmp.expect("connects", server=server.connections)
            cmp.expect("reused", workload=0)
            cmp.check()
            assert during["reused"] == 0, f"{rng.replay}: reused {during['reused']} connecting"
    readers.assert_clean()


def test_a_timeout_after_connection_not_available_is_counted(rng: Seeded, readers: Readers) -> None:
    """An HTTP/2-enabled client and an HTTPS server speaking HTTP/1.1 only: while the first
    connection is being set up, httpcore assigns every queued request to it (it could turn
    out HTTP/2). The server's TLS handshake waits until all four requests are in the pool;
    the connection turns out HTTP/1.1, the three others get ConnectionNotAvailable and wait
    again, for 0.1 s, while the first response takes 2 s: three pool timeouts."""
    readers.instrument()
    outcomes: list[str] = []
    lock = threading.Lock()
    handshake = threading.Event()
    with CountingUpstream(tls=True, delay=2.0) as server:
        assert server.ssl_context is not None

        def hold_the_handshake(*_: object) -> None:
            handshake.wait(10)

        server.ssl_context.sni_callback = hold_the_handshake
        trust = ssl.create_default_context(cafile=server.ca_file)
        limits = httpx.Limits(max_connections=1)
        timeout = httpx.Timeout(10.0, pool=0.1)
        with httpx.Client(verify=trust, http2=True, limits=limits, timeout=timeout) as client:
            poolwatch.track(client, name="truth")

            def call() -> None:
                try:
                    client.get(server.url)
                    outcome = "ok"
                except httpx.PoolTimeout:
                    outcome = "timeout"
                with lock:
                    outcomes.append(outcome)

            threads = [threading.Thread(target=call) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                assert settle(lambda: len(pool_of(client)._requests) == 4), "not all queued"
            finally:
                handshake.set()
                for t in threads:
                    t.join(30)
            got = figures(readers.collect_settled(), "truth")
    assert sorted(outcomes) == ["ok", "timeout", "timeout", "timeout"], outcomes
    cmp = Comparison(f"outcomes {sorted(outcomes)}", rng, got)
    cmp.expect("timeouts", workload=3)
    cmp.expect("wait_timeouts", workload=3)
    cmp.expect("checkouts", workload=1, server=server.requests)
    cmp.check()
    readers.assert_clean()


# -- a client per call ------------------------------------------------------------------------
def _client_per_call(url: str) -> None:
    # The anti-pattern: a new client, so a new pool, per call. Its base_url names the series
    # by the server's origin, apart from any client an earlier test left alive (which
    # instrument() would find, as "httpx", and keep that series from ever being empty).
    with httpx.Client(base_url=url) as client:
        client.get("/").raise_for_status()


def test_a_client_per_call_keeps_one_monotonic_series(
    rng: Seeded, readers: Readers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    readers.instrument()
    expired = deadline_after(PER_CALL_SECONDS)
    calls = 0
    with CountingUpstream() as server:
        with Racing(readers):
            while calls < PER_CALL_CLIENTS and not expired():
                _client_per_call(server.url)
                calls += 1
                if calls % 10 == 0:
                    # every pool made so far freed, as the app's own collector would
                    gc.collect(1 if calls % 20 else 2)
                    readers.collect()
        readers.assert_clean()
        got = figures(readers.collect_observed(), server.origin)
        cmp = Comparison(f"after {calls} clients", rng, got)
        cmp.expect("checkouts", workload=calls, server=server.requests)
        cmp.expect("connects", server=server.connections)
        cmp.check()
    warned = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warned) == 1, f"{rng.replay}: {len(warned)} client_per_request WARNINGs"


# -- instrument/uninstrument cycles under load ------------------------------------------------
def _httpx_classes() -> list[type]:
    from httpcore._async import connection as aconn
    from httpcore._async import connection_pool as apool
    from httpcore._async import http11 as ah11
    from httpcore._sync import connection as sconn
    from httpcore._sync import connection_pool as spool
    from httpcore._sync import http11 as sh11

    return [
        spool.ConnectionPool,
        apool.AsyncConnectionPool,
        spool.PoolRequest,
        apool.AsyncPoolRequest,
        spool.PoolByteStream,
        apool.PoolByteStream,
        sconn.HTTPConnection,
        aconn.AsyncHTTPConnection,
        sh11.HTTP11Connection,
        ah11.AsyncHTTP11Connection,
        httpcore.Request,
        httpx.Client,
        httpx.AsyncClient,
    ]


def _no_internal_errors(rng: Seeded, errors: list[dict[str, int]], tally: Tally) -> None:
    """No internal error in any cycle."""
    left = [cycle_errors for cycle_errors in errors if cycle_errors]
    assert not left, f"{rng.replay}: poolwatch's internal errors by cycle: {left}"


def _not_poolwatchs(error: BaseException) -> bool:
    """httpcore's own failures under contention (encode/httpcore#1110: a connection closed
    under a request it was handed — a closed socket, or a read that waits for ever):
    expected of the library, bare too, as long as no poolwatch frame raised them."""
    return isinstance(error, (httpx.ReadError, httpx.ReadTimeout)) and not poolwatch_frames(error)


def test_instrument_cycles_under_load_reach_no_thread(rng: Seeded, readers: Readers) -> None:
    """Threads make requests on a pool of 2 (callers wait, some time out) while the
    controller instruments and uninstruments: every exception a thread sees is one the
    workload causes, and afterwards httpx and httpcore are their own again."""
    before = class_attributes(_httpx_classes())
    tally = Tally()
    stop = threading.Event()
    with CountingUpstream() as server:
        client = httpx.Client(limits=httpx.Limits(max_connections=2))

        def worker(index: int) -> None:
            r = random.Random(rng.seed_value * 1000 + index)
            while not stop.is_set():
                try:
                    timeout = _timeout(0.005 if r.random() < 0.3 else 5.0, read=2.0)
                    with client.stream("GET", f"{server.url}/?delay=0.005", timeout=timeout) as s:
                        s.read()
                    tally.add("requests")
                except httpx.PoolTimeout:
                    tally.add("timeouts")
                except Exception as error:
                    if _not_poolwatchs(error):
                        tally.add("httpcore failures")
                        continue
                    where = ", ".join(poolwatch_frames(error)) or "not poolwatch's"
                    tally.unexpected_error(f"thread ({where})", error)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(6)]
        for t in threads:
            t.start()
        try:
            cycles, errors = cycle(
                rng,
                readers,
                "httpx",
                lambda: tally["requests"] + tally["timeouts"],
                cycles=CYCLES,
                seconds=CYCLE_SECONDS,
                inside=8,
            )
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        client.close()
    assert cycles >= 2 and tally["requests"] > 0, (cycles, tally.counts)
    tally.assert_expected(rng)
    _no_internal_errors(rng, errors, tally)
    assert class_attributes(_httpx_classes()) == before


def test_instrument_cycles_under_load_reach_no_task(rng: Seeded, readers: Readers) -> None:
    """The same with tasks of an AsyncClient on an event loop in another thread."""
    before = class_attributes(_httpx_classes())
    tally = Tally()
    stop = threading.Event()

    async def load(url: str) -> None:
        # One connection for eight tasks: at any moment most of them wait for it.
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as client:

            async def task(index: int) -> None:
                r = random.Random(rng.seed_value * 1000 + index)
                while not stop.is_set():
                    try:
                        timeout = _timeout(0.005 if r.random() < 0.3 else 5.0, read=2.0)
                        response = await client.get(f"{url}/?delay=0.01", timeout=timeout)
                        response.raise_for_status()
                        tally.add("requests")
                    except httpx.PoolTimeout:
                        tally.add("timeouts")
                    except Exception as error:
                        if _not_poolwatchs(error):
                            tally.add("httpcore failures")
                            continue
                        where = ", ".join(poolwatch_frames(error)) or "not poolwatch's"
                        tally.unexpected_error(f"task ({where})", error)

            await asyncio.gather(*(task(i) for i in range(8)))

    with CountingAsyncUpstream() as server:
        loop = threading.Thread(target=lambda: asyncio.run(load(server.url)), daemon=True)
        loop.start()
        try:
            cycles, errors = cycle(
                rng,
                readers,
                "httpx",
                lambda: tally["requests"] + tally["timeouts"],
                cycles=CYCLES,
                seconds=CYCLE_SECONDS,
                inside=8,
            )
        finally:
            stop.set()
            loop.join(30)
    assert cycles >= 2 and tally["requests"] > 0, (cycles, tally.counts)
    tally.assert_expected(rng)
    _no_internal_errors(rng, errors, tally)
    assert class_attributes(_httpx_classes()) == before


def test_a_request_waiting_as_uninstrument_runs_is_unharmed(readers: Readers) -> None:
    """A request queued behind the pool's only connection (held) while uninstrument()
    runs: it gets the connection once it is released, and its response, nothing else."""
    before = class_attributes(_httpx_classes())
    with CountingUpstream() as server, httpx.Client(limits=httpx.Limits(max_connections=1)) as c:
        handle = readers.instrument(libraries=["httpx"])
        held = c.send(c.build_request("GET", server.url), stream=True)
        outcome: list[object] = []

        def queued() -> None:
            try:
                outcome.append(c.get(server.url).status_code)
            except Exception as error:
                outcome.append(error)

        waiting = threading.Thread(target=queued)
        waiting.start()
        assert settle(lambda: blocked_in([waiting], "wait_for_connection") == 1)
        poolwatch.uninstrument()
        held.read()
        held.close()
        waiting.join(10)
    assert outcome == [200], outcome
    assert handle.errors == {}
    assert class_attributes(_httpx_classes()) == before


def test_a_request_waiting_as_uninstrument_runs_is_unharmed_task(readers: Readers) -> None:
    """The same for an AsyncClient's task."""
    before = class_attributes(_httpx_classes())

    async def main(url: str) -> tuple[object, dict[str, int]]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(limits=limits) as client:
            handle = readers.instrument(libraries=["httpx"])
            held = await client.send(client.build_request("GET", url), stream=True)
            queued = asyncio.create_task(client.get(url))
            pool = pool_of(client)
            for _ in range(1000):  # bounded: until it waits in the pool
                await asyncio.sleep(0.005)
                if library_levels(pool)[2] == 1:
                    break
            poolwatch.uninstrument()
            await held.aread()
            await held.aclose()
            try:
                outcome: object = (await queued).status_code
            except Exception as error:
                outcome = error
            return outcome, handle.errors

    with CountingAsyncUpstream() as server:
        outcome, errors = asyncio.run(main(server.url))
    assert outcome == 200, outcome
    assert errors == {}
    assert class_attributes(_httpx_classes()) == before
