"""Ground truth for urllib3 pools: every exported figure against the pool, the workload and
the loopback server (tests/support/truth.py says how; ``POOLWATCH_TRUTH_SEED`` replays).

Each randomized run drives one ``HTTPConnectionPool`` (``block=True`` or ``False``) from
worker threads. Operations, chosen at random: a request read whole; a response held
unread across operations (and pauses), released later; an exception raised while holding
one (released by the handler); a request asking the server to close the connection; a read
timeout; with ``block=True``, requests with a short pool timeout (they time out) and with a
long one (they wait: pending). One run talks to a server that closes idle keep-alive
connections after 50 ms, so that connections are found dropped on reuse.
"""

from __future__ import annotations

import gc
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import urllib3
from urllib3 import connection, connectionpool, exceptions, poolmanager

import poolwatch
from tests.support.threads import blocked_in
from tests.support.truth import (
    Comparison,
    CountingUpstream,
    LibraryLog,
    Racing,
    Readers,
    Seeded,
    Tally,
    ThreadGate,
    assert_cycled_cleanly,
    class_attributes,
    cycle,
    deadline_after,
    drive_threads,
    figures,
    library_log,
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
MAXSIZE = 2
SHORT_WAIT = 0.02
"""Pool timeout of a request that gives up (``block=True``)."""
LONG_WAIT = 30.0
"""Pool timeout of a request that waits (pending while it does)."""
IDLE_TIMEOUT = 0.05
"""Seconds after which the dropping server closes an idle keep-alive connection."""
PER_CALL_MANAGERS = 600
"""PoolManagers made, used once and dropped (at most ``PER_CALL_SECONDS``)."""
PER_CALL_SECONDS = 5.0
CYCLES = 40
CYCLE_SECONDS = 5.0


class Injected(Exception):
    """An exception the workload raises on purpose while holding a response."""


@dataclass
class Worker:
    """One worker thread's state: what it holds and whether it is waiting for long."""

    held: list[Any] = field(default_factory=list)
    long_wait: bool = False


class Workload:
    """Worker threads making random requests on one pool, counting what they see."""

    def __init__(
        self,
        rng: Seeded,
        pool: connectionpool.HTTPConnectionPool,
        log: LibraryLog,
        *,
        dropping: bool,
    ) -> None:
        self.rng = rng
        self.pool = pool
        self.log = log
        self.dropping = dropping
        self.tally = Tally()
        self.workers: dict[int, Worker] = {}
        self.expired = deadline_after(SECONDS)

    def _open(self, me: Worker, *, wait: float, **kwargs: Any) -> Any:
        """A request (``preload_content=False``); None when the pool timed out."""
        me.long_wait = wait == LONG_WAIT
        try:
            response = self.pool.urlopen(
                "GET",
                kwargs.pop("path", "/"),
                preload_content=False,
                retries=False,
                pool_timeout=wait,
                **kwargs,
            )
        except exceptions.EmptyPoolError:
            self.tally.add("timeouts")
            return None
        except exceptions.ProtocolError:
            if not self.dropping:
                raise
            self._lost()
            return None
        finally:
            me.long_wait = False
        self.tally.add("checkouts")
        return response

    def _lost(self) -> None:
        """Against the dropping server, a connection it closes just as it is reused (after
        the check at checkout) fails the request: the checkout happened, the server never
        answered, urllib3 throws the connection away (error)."""
        for what in ("checkouts", "returns", "failed", "unanswered"):
            self.tally.add(what)

    def _release(self, response: Any) -> None:
        response.drain_conn()
        response.release_conn()
        self.tally.add("returns")

    def _wait(self, me: Worker, r: random.Random) -> float:
        if not self.pool.block:
            return LONG_WAIT  # never waits: opens a connection past maxsize instead
        return SHORT_WAIT if me.held or r.random() < 0.4 else LONG_WAIT

    def whole(self, me: Worker, r: random.Random) -> None:
        response = self._open(me, wait=self._wait(me, r))
        if response is not None:
            assert response.read() == b"ok\n"
            self._release(response)

    def hold(self, me: Worker, r: random.Random) -> None:
        response = self._open(me, wait=self._wait(me, r))
        if response is not None:
            me.held.append(response)
            self.tally.add("held")

    def release(self, me: Worker, r: random.Random) -> None:
        response = me.held.pop(r.randrange(len(me.held)))
        self.tally.add("held", -1)
        self._release(response)

    def raise_holding(self, me: Worker, r: random.Random) -> None:
        response = self._open(me, wait=self._wait(me, r))
        if response is None:
            return
        try:
            raise Injected("raised while holding a response")
        except Injected:
            pass
        finally:
            self._release(response)

    def server_closes(self, me: Worker, r: random.Random) -> None:
        """The server answers ``Connection: close`` and ends the connection."""
        response = self._open(me, wait=self._wait(me, r), headers={"Connection": "close"})
        if response is not None:
            self.log.mark(response.connection, "ended")
            self.tally.add("server_closed")
            self._release(response)

    def read_timeout(self, me: Worker, r: random.Random) -> None:
        """The response comes after the read timeout: urllib3 throws the connection away."""
        wait = self._wait(me, r)
        me.long_wait = wait == LONG_WAIT
        try:
            self.pool.urlopen(
                "GET",
                "/?delay=0.1",
                retries=False,
                pool_timeout=wait,
                timeout=urllib3.Timeout(connect=5.0, read=0.01),
            )
        except exceptions.EmptyPoolError:
            self.tally.add("timeouts")
            return
        except exceptions.ReadTimeoutError:
            self.tally.add("checkouts")
            self.tally.add("failed")
            self.tally.add("returns")  # its use ends when urllib3 throws it away
            return
        except exceptions.ProtocolError:
            if not self.dropping:
                raise
            self._lost()
            return
        finally:
            me.long_wait = False
        self.tally.unexpected_error("read_timeout", AssertionError("the response came in time"))

    def step(self, me: Worker, r: random.Random) -> None:
        if me.held and (r.random() < 0.4 or len(me.held) >= 2):
            self.release(me, r)
            return
        ops = [
            (self.whole, 30),
            (self.hold, 20),
            (self.raise_holding, 6),
            (self.server_closes, 6),
            (self.read_timeout, 3),
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
                self._release(response)

    def blocked(self, gate: ThreadGate) -> int:
        """Workers blocked in the pool's queue with a long pool timeout (a short one ends
        by itself, and the pause waits for it)."""
        return sum(
            1
            for thread in gate.threads
            if thread.ident is not None
            and self.workers.get(thread.ident, Worker()).long_wait
            and blocked_in([thread], "_get_conn", owner=self.pool)
        )


def compare(
    label: str,
    rng: Seeded,
    readers: Readers,
    *,
    workload: Workload,
    server: CountingUpstream,
    pending: int,
) -> None:
    pool, t, log = workload.pool, workload.tally, workload.log
    t.assert_expected(rng)
    queue: Any = pool.pool
    idle_lib = sum(1 for conn in list(queue.queue) if conn is not None and conn.sock is not None)
    dropping = server.idle_timeout is not None
    # The server answers a request after its delay even when the client stopped waiting.
    answered = t["checkouts"] - t["unanswered"]
    settle(lambda: server.requests == answered and server.connections >= t["held"])
    server_view: dict[str, int | None] = {}
    if not dropping:
        # The client's idle connections are open on the server too (a close reaches the
        # server a moment later). Against the dropping server they differ by design: it
        # closes idle connections the client has not looked at yet.
        settle(lambda: server.open_connections == t["held"] + idle_lib)
        server_view["server"] = server.open_connections - t["held"]
    got = figures(readers.collect_settled(), "truth")
    cmp = Comparison(f"{label}: urllib3 block={pool.block}", rng, got)
    used_lib = {"library": MAXSIZE - queue.qsize()} if pool.block else {}
    cmp.expect("used", workload=t["held"], **used_lib)
    cmp.expect("idle", library=idle_lib, **server_view)
    cmp.expect("max", workload=MAXSIZE, library=queue.maxsize)
    waiting = len(queue.not_empty._waiters) if pool.block else 0
    cmp.expect("pending", workload=pending, library=waiting)
    cmp.expect("checkouts", workload=t["checkouts"], server=server.requests + t["unanswered"])
    cmp.expect("uses", workload=t["returns"])
    cmp.expect("wait_timeouts", workload=t["timeouts"])
    cmp.expect("timeouts", workload=t["timeouts"])
    cmp.expect("wait_errors", workload=0)
    cmp.expect("connects", server=server.connections)
    cmp.expect("connect_errors", workload=0)
    cmp.reused(t["checkouts"] - server.connections)
    cmp.expect("leaks", workload=0)
    # Closes: a connection the server ended (Connection: close) is counted once the pool
    # lets go of it — found dropped at its next checkout ("Resetting dropped connection"
    # in urllib3's log) or discarded ("Connection pool is full"); those still in the queue
    # are not yet. Any other connection found dropped was closed by the dropping server
    # while idle: stale. Every other discard is a connection back to a full pool:
    # pool_full. A read timeout throws its connection away: error.
    in_queue = log.in_queue(pool, "ended")
    cmp.agree("ended, in the queue", workload=log.waiting("ended"), library=in_queue)
    cmp.agree(
        "ended by the server",
        workload=t["server_closed"],
        library=log.let_go("ended") + in_queue,
    )
    cmp.closes(
        {
            "invalidated": log.resets_of("ended"),
            "stale": log.resets - log.resets_of("ended"),
            "pool_full": log.discards,
            "error": t["failed"],
        },
        "workload",
    )
    cmp.check()


def _run(rng: Seeded, readers: Readers, *, block: bool, dropping: bool) -> None:
    readers.instrument()
    idle_timeout = IDLE_TIMEOUT if dropping else None
    with CountingUpstream(idle_timeout=idle_timeout) as server, library_log() as log:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=MAXSIZE, block=block)
        poolwatch.track(pool, name="truth")
        workload = Workload(rng, pool, log, dropping=dropping)
        gate = ThreadGate(rng)

        def on_pause(label: str, pending: int) -> None:
            compare(label, rng, readers, workload=workload, server=server, pending=pending)

        with Racing(readers):
            made = drive_threads(
                gate,
                workload.tally,
                lambda i: workload.worker(i, gate),
                workers=WORKERS,
                moments=pause_moments(rng, OPERATIONS, PAUSES),
                on_pause=on_pause,
                blocked=lambda: workload.blocked(gate),
            )
        workload.tally.assert_expected(rng)
        on_pause(f"the end ({made} pauses, {workload.tally['operations']} operations)", 0)
        idle = sum(1 for c in list(pool.pool.queue) if c is not None and c.sock is not None)
        before = figures(readers.collect(), "truth").get("closed.disposed") or 0
        pool.close()  # every idle connection closes as disposed
        after = figures(readers.collect_settled(), "truth")
        cmp = Comparison("after close()", rng, after)
        cmp.expect("closed.disposed", library=before + idle)
        cmp.check()
    readers.assert_clean()


@pytest.mark.parametrize(
    ("block", "dropping"),
    [(True, False), (False, False), (True, True)],
    ids=["block", "nonblocking", "block-idle-drops"],
)
def test_a_pool_under_threads(rng: Seeded, readers: Readers, block: bool, dropping: bool) -> None:
    _run(rng, readers, block=block, dropping=dropping)


# -- reused, with a collection between a checkout and its connect -----------------------------
def inside(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` is running ``function`` now (its stack)."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_reused_is_not_counted_before_the_connect(rng: Seeded, readers: Readers) -> None:
    """One request on a new pool: its checkout comes before its connect, and a collection
    in between must not count it as reusing a connection. The server's TLS handshake waits
    for the test, which collects while the client is inside ``connect()``."""
    readers.instrument()
    handshake = threading.Event()
    with CountingUpstream(tls=True) as server:
        assert server.ssl_context is not None

        def hold_the_handshake(*_: object) -> None:
            handshake.wait(10)

        server.ssl_context.sni_callback = hold_the_handshake
        pool = urllib3.HTTPSConnectionPool("127.0.0.1", server.port, ca_certs=server.ca_file)
        poolwatch.track(pool, name="truth")
        request = threading.Thread(target=lambda: pool.request("GET", "/", retries=False))
        request.start()
        try:
            assert settle(lambda: inside(request, "connect")), "the request never connected"
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
        assert during["reused"] == 0, f"{rng.replay}: reused {during['reused']} while connecting"
        pool.close()
    readers.assert_clean()


# -- connections out before instrument() ---------------------------------------------------
def test_connections_out_before_instrument_are_used(rng: Seeded, readers: Readers) -> None:
    with CountingUpstream() as server:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=3, block=True)
        held = [pool.urlopen("GET", "/", preload_content=False) for _ in range(2)]
        readers.instrument()
        poolwatch.track(pool, name="truth")
        got = figures(readers.collect_settled(), "truth")
        cmp = Comparison("two responses held since before instrument()", rng, got)
        cmp.expect("used", workload=len(held), library=3 - pool.pool.qsize())
        cmp.expect("idle", library=0)
        cmp.check()
        for response in held:
            response.drain_conn()
            response.release_conn()
        got = figures(readers.collect_settled(), "truth")
        cmp = Comparison("both released", rng, got)
        cmp.expect("used", workload=0, library=3 - pool.pool.qsize())
        cmp.expect("idle", library=2, server=server.open_connections)
        cmp.check()
        pool.close()
    readers.assert_clean()


# -- a PoolManager per call -------------------------------------------------------------------
def _manager_per_call(url: str) -> None:
    manager = urllib3.PoolManager()  # the anti-pattern: a new manager, so a new pool, per call
    assert manager.request("GET", url, retries=False).data == b"ok\n"
    manager.clear()


def test_a_pool_manager_per_call_keeps_one_monotonic_series(
    rng: Seeded, readers: Readers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    readers.instrument()
    expired = deadline_after(PER_CALL_SECONDS)
    calls = 0
    with CountingUpstream() as server:
        with Racing(readers):
            while calls < PER_CALL_MANAGERS and not expired():
                _manager_per_call(server.url)
                calls += 1
                if calls % 10 == 0:
                    # every pool made so far freed, as the app's own collector would
                    gc.collect(1 if calls % 20 else 2)
                    readers.collect()
        readers.assert_clean()
        got = figures(readers.collect_observed(), server.origin)
        cmp = Comparison(f"after {calls} managers", rng, got)
        cmp.expect("checkouts", workload=calls, server=server.requests)
        cmp.expect("connects", server=server.connections)
        cmp.expect("closed.disposed", workload=calls)
        cmp.check()
    warned = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warned) == 1, f"{rng.replay}: {len(warned)} client_per_request WARNINGs"


# -- instrument/uninstrument cycles under load ------------------------------------------------
def _urllib3_classes() -> list[type]:
    return [
        connectionpool.HTTPConnectionPool,
        connectionpool.HTTPSConnectionPool,
        connection.HTTPConnection,
        connection.HTTPSConnection,
        poolmanager.PoolManager,
    ]


def test_instrument_cycles_under_load_reach_no_worker(rng: Seeded, readers: Readers) -> None:
    """Workers make requests (a blocking pool timing callers out, a non-blocking one
    discarding) while the controller instruments and uninstruments: every exception a
    worker sees is one the workload causes, and afterwards urllib3 is its own again."""
    before = class_attributes(_urllib3_classes())
    tally = Tally()
    stop = threading.Event()
    with CountingUpstream() as server:
        pools = [
            urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=2, block=True),
            urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=1, block=False),
        ]

        def worker(index: int) -> None:
            r = random.Random(rng.seed_value * 1000 + index)
            while not stop.is_set():
                pool = r.choice(pools)
                try:
                    response = pool.urlopen(
                        "GET", "/", preload_content=False, retries=False, pool_timeout=0.01
                    )
                    time.sleep(r.random() * 0.001)
                    response.drain_conn()
                    response.release_conn()
                    tally.add("requests")
                except exceptions.EmptyPoolError:
                    tally.add("timeouts")
                except Exception as error:
                    where = ", ".join(poolwatch_frames(error)) or "not poolwatch's"
                    tally.unexpected_error(f"worker ({where})", error)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        try:
            made = cycle(
                rng,
                readers,
                "urllib3",
                lambda: tally["requests"] + tally["timeouts"],
                cycles=CYCLES,
                seconds=CYCLE_SECONDS,
                inside=8,
            )
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        for pool in pools:
            pool.close()
    assert_cycled_cleanly(rng, tally, made, "requests", classes=_urllib3_classes(), before=before)
