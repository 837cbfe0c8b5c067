"""Ground truth for aiohttp connectors: every exported figure against the connector, the
workload and the loopback server (tests/support/truth.py says how; ``POOLWATCH_TRUTH_SEED``
replays a run).

A ``ClientSession`` with ``TCPConnector(limit=3)`` shared by six tasks on one event loop.
Operations, chosen at random: a request read whole; a response held across operations (and
pauses), read and released later; an exception raised after reading one (released by its
``async with``); a request the server answers with ``Connection: close``; a read timeout;
requests whose wait for a slot is bounded short (``ClientTimeout(connect=0.02)``: they time
out) or long (they wait: pending). One run talks to a server that closes idle keep-alive
connections after 50 ms.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import threading
from typing import Any

import aiohttp
import pytest
from aiohttp import client, client_proto, connector

import poolwatch
from tests.support.truth import (
    Comparison,
    CountingAsyncUpstream,
    Racing,
    Readers,
    Seeded,
    Tally,
    TaskGate,
    assert_cycled_cleanly,
    class_attributes,
    cycle,
    deadline_after,
    figures,
    pause_moments,
    poolwatch_frames,
    settle,
)

# Bounds: every loop stops at a count or a time, whichever comes first (the CI budget of
# the whole ground-truth suite is about 150 s on a two-core machine; the soak,
# benchmarks/soak.py, runs the same workloads for minutes).
OPERATIONS = 500
"""Operations of one randomized run, over all its tasks (and at most ``SECONDS``)."""
SECONDS = 6.0
PAUSES = 8
TASKS = 6
LIMIT = 3
SHORT_WAIT = 0.02
LONG_WAIT = 30.0
IDLE_TIMEOUT = 0.05
HELD_BODY = 4 << 20
"""Bytes of a held response's body: more than aiohttp buffers unread (its connection stays
out until the body is read)."""
PER_CALL_SESSIONS = 600
PER_CALL_SECONDS = 5.0
CYCLES = 40
CYCLE_SECONDS = 5.0


class Injected(Exception):
    """An exception the workload raises on purpose inside a response's ``async with``."""


def library_levels(pool: Any) -> tuple[int, int, int]:
    """aiohttp's own view: connections handed out, idle open ones, callers queued."""
    used = len(pool._acquired)
    idle = sum(
        1
        for queue in list(pool._conns.values())
        for proto, _ in list(queue)
        if proto.transport is not None and not proto.transport.is_closing()
    )
    queued = sum(1 for q in list(pool._waiters.values()) for w in list(q) if not w.done())
    return used, idle, queued


class LibraryTrace:
    """aiohttp's own account of its connector, from its trace callbacks: requests queued
    for a slot and dequeued, connections created (attempts and successes), reused."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.config = aiohttp.TraceConfig()
        for event in (
            "connection_queued_start",
            "connection_queued_end",
            "connection_create_start",
            "connection_create_end",
            "connection_reuseconn",
        ):
            getattr(self.config, f"on_{event}").append(self._counter(event))

    def _counter(self, event: str) -> Any:
        async def count(*_: Any) -> None:
            self.counts[event] = self.counts.get(event, 0) + 1

        return count

    def __getitem__(self, event: str) -> int:
        return self.counts.get(event, 0)

    @property
    def checkouts(self) -> int:
        return self["connection_reuseconn"] + self["connection_create_end"]

    def wait_timeouts(self, queued_now: int) -> int:
        """Queued, never dequeued and not queued now: the wait for a slot ran out."""
        return self["connection_queued_start"] - self["connection_queued_end"] - queued_now

    @property
    def connect_failures(self) -> int:
        """Connections begun and never made (here: the connect timeout ran out meanwhile)."""
        return self["connection_create_start"] - self["connection_create_end"]


class Workload:
    """Random operations on one session, from tasks; what they saw."""

    def __init__(
        self,
        rng: Seeded,
        session: aiohttp.ClientSession,
        url: str,
        dropping: bool,
        trace: LibraryTrace,
    ) -> None:
        self.rng = rng
        self.session = session
        self.trace = trace
        self.url = url
        self.dropping = dropping
        self.tally = Tally()
        self.waiting: dict[int, bool] = {}
        """Tasks in a request now, by index: True when their wait for a slot is long."""
        self.expired = deadline_after(SECONDS)

    async def _get(
        self, index: int, r: random.Random, **kwargs: Any
    ) -> aiohttp.ClientResponse | None:
        long = r.random() < 0.6
        timeout = aiohttp.ClientTimeout(
            total=None, connect=LONG_WAIT if long else SHORT_WAIT, sock_read=kwargs.pop("read", 10)
        )
        self.waiting[index] = long
        try:
            response = await self.session.get(
                kwargs.pop("url", self.url), timeout=timeout, **kwargs
            )
        except aiohttp.ConnectionTimeoutError:
            self.tally.add("timeouts")
            return None
        finally:
            del self.waiting[index]
        self.tally.add("checkouts")
        return response

    async def _finish(self, response: aiohttp.ClientResponse) -> None:
        body = await response.read()
        assert body in (b"ok\n", b"x" * HELD_BODY), len(body)
        response.release()
        self.tally.add("returns")

    async def read_timeout(self, index: int, r: random.Random) -> None:
        """The response comes after the read timeout: aiohttp closes the connection."""
        try:
            response = await self._get(index, r, url=f"{self.url}/?delay=0.5", read=0.01)
        except aiohttp.SocketTimeoutError:
            self.tally.add("checkouts")
            self.tally.add("returns")
            self.tally.add("failed")
            return
        if response is not None:
            self.tally.unexpected_error("read timeout", AssertionError("came in time"))
            await self._finish(response)

    async def raise_inside(self, index: int, r: random.Random) -> None:
        response = await self._get(index, r)
        if response is None:
            return
        try:
            async with response:
                assert await response.read() == b"ok\n"
                raise Injected("raised inside a response's async with")
        except Injected:
            self.tally.add("returns")

    async def step(self, index: int, held: list[aiohttp.ClientResponse], r: random.Random) -> None:
        if held:  # holding one, never wait for another (two holders could deadlock)
            self.tally.add("held", -1)
            await self._finish(held.pop())
            return
        roll = r.random()
        if roll < 0.3:
            # A body too large to be received whole unread: aiohttp hands a connection
            # back as soon as the body is in, read or not.
            response = await self._get(index, r, url=f"{self.url}/?size={HELD_BODY}")
            if response is not None:
                held.append(response)
                self.tally.add("held")
        elif roll < 0.38:
            response = await self._get(index, r, headers={"Connection": "close"})
            if response is not None:
                self.tally.add("server_closed")
                await self._finish(response)
        elif roll < 0.42:
            await self.read_timeout(index, r)
        elif roll < 0.5:
            await self.raise_inside(index, r)
        else:
            response = await self._get(index, r)
            if response is not None:
                await self._finish(response)

    async def worker(self, index: int, gate: TaskGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: list[aiohttp.ClientResponse] = []
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                await gate.checkpoint()
                try:
                    await self.step(index, held, r)
                except aiohttp.ServerDisconnectedError as error:
                    # Against the dropping server, a connection it closes just as it is
                    # reused fails the request (aiohttp retries it once if it can).
                    if not self.dropping:
                        self.tally.unexpected_error("step", error)
                    self.tally.add("disconnected")
                except Exception as error:
                    self.tally.unexpected_error("step", error)
                self.tally.add("operations")
        finally:
            for response in held:
                self.tally.add("held", -1)
                await self._finish(response)

    def blocked(self, pool: Any) -> int:
        """Tasks queued for a slot with a long wait, once every task in a request is so
        queued (a short wait ends by itself; -1 keeps the pause waiting for it)."""
        queued = library_levels(pool)[2]
        waits = list(self.waiting.values())
        if all(waits) and queued == len(waits):
            return len(waits)
        return -1


def compare(
    label: str,
    rng: Seeded,
    readers: Readers,
    *,
    workload: Workload,
    pool: Any,
    server: CountingAsyncUpstream,
    pending: int,
) -> None:
    t, lib = workload.tally, workload.trace
    t.assert_expected(rng)
    dropping = workload.dropping
    used_lib, idle_lib, queued = library_levels(pool)
    made = lib["connection_create_end"]
    # A connection the connect timeout abandoned may have been accepted by the server (its
    # TCP handshake done, aiohttp's side not): the server counts it, the client never had
    # it. The server's counts are compared only while no connect was abandoned.
    exact_server = not dropping and lib.connect_failures == 0
    server_view: dict[str, int | None] = {}
    if exact_server:
        settle(lambda: server.requests == t["checkouts"] - t["disconnected"])
        settle(lambda: server.open_connections == used_lib + idle_lib)
        server_view["server"] = server.open_connections - used_lib
    got = figures(readers.collect_settled(), "truth")
    cmp = Comparison(f"{label}: aiohttp", rng, got)
    cmp.expect("used", workload=t["held"], library=used_lib)
    cmp.expect("idle", library=idle_lib, **server_view)
    cmp.expect("max", workload=LIMIT, library=pool._limit)
    cmp.expect("pending", workload=pending, library=queued)
    # aiohttp retries a request once on a new connection when the connection it reused
    # had been closed by the server (the dropping server): two checkouts, one answer.
    checkouts: dict[str, int | None] = {"library": lib.checkouts}
    if not dropping:
        checkouts["workload"] = t["checkouts"]
    if exact_server:
        checkouts["server"] = server.requests + t["disconnected"]
    cmp.expect("checkouts", **checkouts)
    cmp.expect("uses", library=lib.checkouts - used_lib)
    cmp.expect("wait_timeouts", library=lib.wait_timeouts(queued))
    cmp.expect("timeouts", library=lib.wait_timeouts(queued))
    # A connect timeout runs out while a slot is awaited, or while the connection is made
    # (a connect failure, and a failed wait): the workload sees one exception for both.
    cmp.agree(
        "ConnectionTimeoutErrors",
        workload=t["timeouts"],
        library=lib.wait_timeouts(queued) + lib.connect_failures,
    )
    cmp.expect("wait_errors", library=lib.connect_failures)
    cmp.expect("connect_errors", library=lib.connect_failures)
    cmp.expect("connects", library=made, **({"server": server.connections} if exact_server else {}))
    cmp.reused(lib["connection_reuseconn"])
    cmp.expect("leaks", workload=0)
    # Closes: every connection made that the connector does not hold open now was closed —
    # by the server's Connection: close answer (invalidated), a read timeout (error), and
    # against the dropping server found closed while idle (stale) or as it was reused
    # (error: the request failed, and was retried).
    # (A connection the server closed while idle stays in the connector until aiohttp
    # next looks at it: not idle, not closed yet.)
    held_by_connector = sum(len(queue) for queue in list(pool._conns.values()))
    closed = made - used_lib - held_by_connector
    if not dropping:
        cmp.closes({"invalidated": t["server_closed"], "error": t["failed"]}, "workload")
        cmp.agree("closes", library=closed, workload=t["server_closed"] + t["failed"])
    else:
        cmp.expect("closed.invalidated", workload=t["server_closed"])
        got["closed.error or stale"] = (got.get("closed.error") or 0) + (
            got.get("closed.stale") or 0
        )
        cmp.expect("closed.error or stale", library=closed - t["server_closed"])
    cmp.check()


@pytest.mark.parametrize("dropping", [False, True], ids=["keepalive", "idle-drops"])
def test_a_session_under_tasks(rng: Seeded, readers: Readers, dropping: bool) -> None:
    readers.instrument()

    async def main(server: CountingAsyncUpstream) -> None:
        pool = aiohttp.TCPConnector(limit=LIMIT, keepalive_timeout=60)
        trace = LibraryTrace()
        session = aiohttp.ClientSession(connector=pool, trace_configs=[trace.config])
        poolwatch.track(session, name="truth")
        workload = Workload(rng, session, server.url, dropping, trace)
        gate = TaskGate(rng)

        def compare_now(label: str, pending: int) -> None:
            # Blocking the loop on purpose: nothing of the client runs meanwhile; the
            # server's counters settle on its own loop, in another thread.
            compare(
                label,
                rng,
                readers,
                workload=workload,
                pool=pool,
                server=server,
                pending=pending,
            )

        gate.start(lambda i: workload.worker(i, gate), TASKS)
        for number, moment in enumerate(sorted(pause_moments(rng, OPERATIONS, PAUSES)), 1):
            while workload.tally["operations"] < moment and not all(t.done() for t in gate.tasks):
                await asyncio.sleep(0.001)
            if all(t.done() for t in gate.tasks):
                break
            pending = await gate.pause(blocked=lambda: workload.blocked(pool))
            try:
                compare_now(f"pause {number}", pending)
            finally:
                gate.resume()
        await gate.join()
        compare_now("the end", 0)
        # Every connection the connector holds is closed: idle ones, and those the server
        # closed while idle that aiohttp has not looked at yet.
        kept = sum(len(queue) for queue in list(pool._conns.values()))
        before = figures(readers.collect(), "truth").get("closed.disposed") or 0
        await session.close()
        cmp = Comparison("after close()", rng, figures(readers.collect_settled(), "truth"))
        cmp.expect("closed.disposed", library=before + kept)
        cmp.check()

    idle_timeout = IDLE_TIMEOUT if dropping else None
    with CountingAsyncUpstream(idle_timeout=idle_timeout) as server, Racing(readers):
        asyncio.run(main(server))
    readers.assert_clean()


# -- a session per call -----------------------------------------------------------------------
async def _session_per_call(url: str) -> None:
    # The anti-pattern: a session, so a connector, per call. Its base_url names the series
    # by the server's origin, apart from any connector an earlier test left alive.
    async with aiohttp.ClientSession(base_url=url) as session, session.get("/") as response:
        assert await response.read() == b"ok\n"


def test_a_session_per_call_keeps_one_monotonic_series(
    rng: Seeded, readers: Readers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    readers.instrument()
    calls = 0

    async def main(url: str) -> None:
        nonlocal calls
        expired = deadline_after(PER_CALL_SECONDS)
        while calls < PER_CALL_SESSIONS and not expired():
            await _session_per_call(url)
            calls += 1
            if calls % 10 == 0:
                # every pool made so far freed, as the app's own collector would
                gc.collect(1 if calls % 20 else 2)
                readers.collect()

    with CountingAsyncUpstream() as server:
        with Racing(readers):
            asyncio.run(main(server.url))
        readers.assert_clean()
        got = figures(readers.collect_observed(), server.origin)
        cmp = Comparison(f"after {calls} sessions", rng, got)
        cmp.expect("checkouts", workload=calls, server=server.requests)
        cmp.expect("connects", server=server.connections)
        cmp.check()
    warned = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warned) == 1, f"{rng.replay}: {len(warned)} client_per_request WARNINGs"


# -- instrument/uninstrument cycles under load ------------------------------------------------
def _aiohttp_classes() -> list[type]:
    return [
        connector.BaseConnector,
        connector.TCPConnector,
        connector.UnixConnector,
        client_proto.ResponseHandler,
        client.ClientSession,
    ]


def test_instrument_cycles_under_load_reach_no_task(rng: Seeded, readers: Readers) -> None:
    """Tasks make requests on a connector of 2 (callers wait, some time out) while the
    controller, in another thread, instruments and uninstruments: every exception a task
    sees is one the workload causes, and afterwards aiohttp is its own again."""
    before = class_attributes(_aiohttp_classes())
    tally = Tally()
    stop = threading.Event()

    async def load(url: str) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:

            async def task(index: int) -> None:
                r = random.Random(rng.seed_value * 1000 + index)
                while not stop.is_set():
                    wait = 0.005 if r.random() < 0.3 else 5.0
                    timeout = aiohttp.ClientTimeout(total=None, connect=wait, sock_read=2)
                    try:
                        async with session.get(f"{url}/?delay=0.005", timeout=timeout) as resp:
                            await resp.read()
                        tally.add("requests")
                    except aiohttp.ConnectionTimeoutError:
                        tally.add("timeouts")
                    except Exception as error:
                        where = ", ".join(poolwatch_frames(error)) or "not poolwatch's"
                        tally.unexpected_error(f"task ({where})", error)

            await asyncio.gather(*(task(i) for i in range(8)))

    with CountingAsyncUpstream() as server:
        loop = threading.Thread(target=lambda: asyncio.run(load(server.url)), daemon=True)
        loop.start()
        try:
            made = cycle(
                rng,
                readers,
                "aiohttp",
                lambda: tally["requests"] + tally["timeouts"],
                cycles=CYCLES,
                seconds=CYCLE_SECONDS,
                inside=10,
            )
        finally:
            stop.set()
            loop.join(30)
    assert_cycled_cleanly(rng, tally, made, "requests", classes=_aiohttp_classes(), before=before)
