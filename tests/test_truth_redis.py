"""Ground truth for redis-py pools: every exported figure against the pool, the workload and
the server (tests/support/truth.py says how; ``POOLWATCH_TRUTH_SEED`` replays a run).

Each randomized run drives three pools on one throw-away ``redis-server`` from worker
threads (or tasks): ``waits``, a ``BlockingConnectionPool`` with a long timeout, whose
exhausted callers block and show as pending; ``brief``, a ``BlockingConnectionPool`` whose
callers time out after 20 ms ("No connection available."); ``limited``, a
``ConnectionPool`` that refuses at once when its connections are all out ("Too many
connections"). Operations, chosen at random: a command (its checkout and return inside
the client), a command the server answers with an error, a connection checked out and held
across operations (and across pauses), released later. At pauses the server kills some
of a pool's idle connections (``CLIENT KILL``): the pool finds each closed at its next
checkout (stale) and reconnects it. Every pool's connections carry a ``client_name``, so
that the server's ``CLIENT LIST`` counts each pool's connections apart.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import select
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from redis import connection as sync_connection
from redis.asyncio import connection as async_connection

import poolwatch
from tests.support.redis import RedisServer
from tests.support.threads import blocked_in
from tests.support.truth import (
    Comparison,
    Racing,
    Readers,
    Seeded,
    Tally,
    TaskGate,
    ThreadGate,
    assert_cycled_cleanly,
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
OPERATIONS = 600
"""Operations of one randomized run, over all its workers (and at most ``SECONDS``)."""
SECONDS = 6.0
PAUSES = 8
WORKERS = 6
SIZE = 2
"""max_connections of every pool of a run."""
LONG_WAIT = 30.0
SHORT_WAIT = 0.02
EXHAUSTED = ("No connection available.", "Too many connections")
PER_CALL_CLIENTS = 300
PER_CALL_SECONDS = 5.0
CYCLES = 40
CYCLE_SECONDS = 5.0


@dataclass
class Pool:
    """One pool of a run, its client, and what the workload and the server saw of it."""

    label: str
    pool: Any
    client: Any
    blocking: bool
    tally: Tally = field(default_factory=Tally)
    killed: dict[Any, int] = field(default_factory=dict)
    """Connections the server killed that the pool has not found closed yet: local port."""

    @property
    def name(self) -> str:
        """Its connections' ``client_name`` on the server."""
        return f"truth-{self.label}"


def _pools(server: RedisServer, db: int, asyncio_: bool) -> list[Pool]:
    made = []
    module = aredis if asyncio_ else redis
    for label, blocking, wait in (
        ("waits", True, LONG_WAIT),
        ("brief", True, SHORT_WAIT),
        ("limited", False, None),
    ):
        kwargs: dict[str, Any] = {"max_connections": SIZE, "client_name": f"truth-{label}"}
        if blocking:
            pool = module.BlockingConnectionPool.from_url(server.url(db), timeout=wait, **kwargs)
        else:
            pool = module.ConnectionPool.from_url(server.url(db), **kwargs)
        poolwatch.track(pool, name=label)
        made.append(Pool(label, pool, module.Redis(connection_pool=pool), blocking))
    return made


# -- the library's own state -----------------------------------------------------------------
def _local_port(conn: Any) -> int | None:
    sock = getattr(conn, "_sock", None)
    if sock is None:
        writer = getattr(conn, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
    return int(sock.getsockname()[1]) if sock is not None else None


def _every_connection(pool: Any) -> list[Any]:
    every = getattr(pool, "_connections", None)  # the sync blocking pool keeps them all
    if isinstance(every, list):
        return list(every)
    return list(pool._available_connections) + list(pool._in_use_connections)


def _idle(pool: Any) -> list[Any]:
    """Connected connections ready in the pool, as the pool sees them."""
    queue = getattr(pool, "pool", None)
    waiting = list(queue.queue) if queue is not None else list(pool._available_connections)
    return [conn for conn in waiting if conn is not None and _local_port(conn) is not None]


def _used(pool: Any) -> int:
    queue = getattr(pool, "pool", None)
    if queue is not None:
        return int(queue.maxsize - queue.qsize())
    return len(list(pool._in_use_connections))


def _queued(pool: Any) -> int:
    queue = getattr(pool, "pool", None)
    if queue is not None:
        return len(queue.not_empty._waiters)
    condition = getattr(pool, "_condition", None)
    if condition is None:
        return 0
    return sum(1 for waiter in list(condition._waiters) if not waiter.done())


def _notice_kills(p: Pool) -> None:
    """Killed connections the pool has since found closed (and reconnected): stale."""
    for conn, port in list(p.killed.items()):
        if _local_port(conn) != port:
            del p.killed[conn]
            p.tally.add("stale")


def _kill_some(rng: random.Random, server: RedisServer, p: Pool) -> None:
    """At a pause: the server kills some of ``p``'s idle connections."""
    idle = [conn for conn in _idle(p.pool) if conn not in p.killed]  # not killed already
    chosen = rng.sample(idle, rng.randint(0, len(idle))) if idle else []
    ports = {_local_port(conn): conn for conn in chosen}
    ids = [
        c["id"]
        for c in server.clients()
        if c.get("name") == p.name and int(c["addr"].rsplit(":", 1)[1]) in ports
    ]
    assert server.kill(ids) == len(chosen)
    for port, conn in ports.items():
        assert port is not None
        p.killed[conn] = port
        sock = getattr(conn, "_sock", None) or conn._writer.get_extra_info("socket")
        select.select([sock], [], [], 5)  # the server's FIN has arrived: readable


# -- the workload ----------------------------------------------------------------------------
class Workload:
    def __init__(self, rng: Seeded, pools: list[Pool]) -> None:
        self.rng = rng
        self.pools = pools
        self.tally = Tally()
        self.expired = deadline_after(SECONDS)
        self.waiting: dict[int, bool] = {}
        """Tasks in a checkout now, by index: True when in the long-waiting pool."""

    def _exhausted(self, p: Pool, error: redis.exceptions.ConnectionError) -> None:
        if str(error) in EXHAUSTED:
            p.tally.add("timeouts")
        else:
            self.tally.unexpected_error(p.label, error)

    def step(self, held: list[tuple[Pool, Any]], r: random.Random) -> None:
        if held:  # holding one, never wait for another (two holders could deadlock)
            p, conn = held.pop()
            p.pool.release(conn)
            p.tally.add("held", -1)
            p.tally.add("returns")
            return
        p = r.choice(self.pools)
        roll = r.random()
        try:
            if roll < 0.3:
                conn = p.pool.get_connection()
                p.tally.add("checkouts")
                p.tally.add("held")
                held.append((p, conn))
            elif roll < 0.4:
                try:
                    p.client.execute_command("POOLWATCH-NO-SUCH-COMMAND")
                except redis.exceptions.ResponseError:  # the server's answer
                    p.tally.add("checkouts")
                    p.tally.add("returns")
            else:
                p.client.incr(f"truth-{p.label}")
                p.tally.add("checkouts")
                p.tally.add("returns")
        except redis.exceptions.ConnectionError as error:
            self._exhausted(p, error)

    async def step_async(self, index: int, held: list[tuple[Pool, Any]], r: random.Random) -> None:
        if held:
            p, conn = held.pop()
            await p.pool.release(conn)
            p.tally.add("held", -1)
            p.tally.add("returns")
            return
        p = r.choice(self.pools)
        roll = r.random()
        self.waiting[index] = p.label == "waits"
        try:
            if roll < 0.3:
                conn = await p.pool.get_connection()
                p.tally.add("checkouts")
                p.tally.add("held")
                held.append((p, conn))
            elif roll < 0.4:
                try:
                    await p.client.execute_command("POOLWATCH-NO-SUCH-COMMAND")
                except redis.exceptions.ResponseError:
                    p.tally.add("checkouts")
                    p.tally.add("returns")
            else:
                await p.client.incr(f"truth-{p.label}")
                p.tally.add("checkouts")
                p.tally.add("returns")
        except redis.exceptions.ConnectionError as error:
            self._exhausted(p, error)
        finally:
            del self.waiting[index]

    def worker(self, index: int, gate: ThreadGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: list[tuple[Pool, Any]] = []
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                gate.checkpoint()
                if gate.stopping:
                    break
                try:
                    self.step(held, r)
                except Exception as error:
                    self.tally.unexpected_error("step", error)
                self.tally.add("operations")
        finally:
            for p, conn in held:
                p.pool.release(conn)
                p.tally.add("held", -1)
                p.tally.add("returns")

    async def task(self, index: int, gate: TaskGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: list[tuple[Pool, Any]] = []
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                await gate.checkpoint()
                try:
                    await self.step_async(index, held, r)
                except Exception as error:
                    self.tally.unexpected_error("step", error)
                self.tally.add("operations")
        finally:
            for p, conn in held:
                await p.pool.release(conn)
                p.tally.add("held", -1)
                p.tally.add("returns")

    def blocked_tasks(self, waits: Pool) -> int:
        """Tasks queued in ``waits`` once every task in a checkout is so queued (a short
        wait ends by itself; -1 keeps the pause waiting for it)."""
        queued = _queued(waits.pool)
        waiting = list(self.waiting.values())
        if all(waiting) and queued == len(waiting):
            return len(waiting)
        return -1


# -- the comparison --------------------------------------------------------------------------
def compare(
    label: str, rng: Seeded, readers: Readers, server: RedisServer, p: Pool, *, pending: int
) -> None:
    t = p.tally
    _notice_kills(p)
    used_lib = _used(p.pool)
    idle_lib = len(_idle(p.pool))
    unnoticed = len(p.killed)
    # The server closes a killed connection at once; the pool still counts it idle until
    # it finds it closed.
    settle(lambda: server.client_count(p.name) == used_lib + idle_lib - unnoticed)
    on_server = server.client_count(p.name) - used_lib + unnoticed
    got = figures(readers.collect_settled(), p.label)
    cmp = Comparison(f"{label}: pool {p.label!r}", rng, got)
    cmp.expect("used", workload=t["held"], library=used_lib)
    cmp.expect("idle", library=idle_lib, server=on_server)
    cmp.expect("max", workload=SIZE, library=p.pool.max_connections)
    cmp.expect("pending", workload=pending, library=_queued(p.pool))
    cmp.expect("checkouts", workload=t["checkouts"])
    cmp.expect("uses", workload=t["returns"])
    cmp.expect("wait_timeouts", workload=t["timeouts"])
    cmp.expect("timeouts", workload=t["timeouts"])
    cmp.expect("wait_errors", workload=0)
    # Every connection object the pool made connected once, and again after each kill
    # it found; none failed.
    connects = len(_every_connection(p.pool)) + t["stale"]
    cmp.expect("connects", library=connects)
    cmp.expect("connect_errors", workload=0)
    cmp.reused(t["checkouts"] - connects)
    cmp.expect("leaks", workload=0)
    cmp.closes({"stale": t["stale"]}, "workload")
    cmp.expect("lifetimes", workload=t["stale"])
    cmp.check()


def _dispose_checked(label: str, rng: Seeded, readers: Readers, p: Pool, closing: Any) -> None:
    connected = sum(1 for conn in _every_connection(p.pool) if _local_port(conn) is not None)
    before = figures(readers.collect(), p.label).get("closed.disposed") or 0
    closing()
    cmp = Comparison(f"{label}: pool {p.label!r}", rng, figures(readers.collect_settled(), p.label))
    cmp.expect("closed.disposed", library=before + connected)
    cmp.expect("idle", library=0)
    cmp.check()


def test_three_pools_under_threads(
    rng: Seeded, readers: Readers, redis_server: RedisServer
) -> None:
    readers.instrument()
    pools = _pools(redis_server, 60, asyncio_=False)
    workload = Workload(rng, pools)
    gate = ThreadGate(rng)
    waits = pools[0]

    def blocked() -> int:
        return blocked_in(gate.threads, "get_connection", owner=waits.pool)

    def on_pause(label: str, pending: int) -> None:
        workload.tally.assert_expected(rng)
        for p in pools:
            compare(label, rng, readers, redis_server, p, pending=pending if p is waits else 0)
        _kill_some(rng, redis_server, rng.choice(pools))

    with Racing(readers):
        made = drive_threads(
            gate,
            workload.tally,
            lambda i: workload.worker(i, gate),
            workers=WORKERS,
            moments=pause_moments(rng, OPERATIONS, PAUSES),
            on_pause=on_pause,
            blocked=blocked,
        )
    workload.tally.assert_expected(rng)
    for p in pools:
        compare(f"the end ({made} pauses)", rng, readers, redis_server, p, pending=0)
    for p in pools:
        _dispose_checked("after disconnect()", rng, readers, p, p.pool.disconnect)
    readers.assert_clean()


def test_three_pools_under_tasks(rng: Seeded, readers: Readers, redis_server: RedisServer) -> None:
    readers.instrument()

    async def main() -> None:
        pools = _pools(redis_server, 61, asyncio_=True)
        workload = Workload(rng, pools)
        gate = TaskGate(rng)
        waits = pools[0]
        gate.start(lambda i: workload.task(i, gate), WORKERS)
        for number, moment in enumerate(sorted(pause_moments(rng, OPERATIONS, PAUSES)), 1):
            while workload.tally["operations"] < moment and not all(t.done() for t in gate.tasks):
                await asyncio.sleep(0.001)
            if all(t.done() for t in gate.tasks):
                break
            pending = await gate.pause(blocked=lambda: workload.blocked_tasks(waits))
            try:
                # Blocking the loop on purpose: nothing of the client runs meanwhile.
                workload.tally.assert_expected(rng)
                for p in pools:
                    waiting = pending if p is waits else 0
                    compare(f"pause {number}", rng, readers, redis_server, p, pending=waiting)
                _kill_some(rng, redis_server, rng.choice(pools))
                await asyncio.sleep(0.05)  # the loop reads the killed connections' EOF
            finally:
                gate.resume()
        await gate.join()
        workload.tally.assert_expected(rng)
        for p in pools:
            compare("the end", rng, readers, redis_server, p, pending=0)
        for p in pools:
            connected = [c for c in _every_connection(p.pool) if _local_port(c) is not None]
            before = figures(readers.collect(), p.label).get("closed.disposed") or 0
            await p.pool.disconnect()
            after = figures(readers.collect_settled(), p.label)
            cmp = Comparison(f"after disconnect(): pool {p.label!r}", rng, after)
            cmp.expect("closed.disposed", library=before + len(connected))
            cmp.expect("idle", library=0)
            cmp.check()

    with Racing(readers):
        asyncio.run(asyncio.wait_for(main(), 120))
    readers.assert_clean()


# -- a client per call -----------------------------------------------------------------------
def _client_per_call(url: str) -> None:
    client = redis.Redis.from_url(url)  # the anti-pattern: a pool, so a connection, per call
    client.get("truth")
    client.close()


def test_a_client_per_call_keeps_one_monotonic_series(
    rng: Seeded, readers: Readers, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    readers.instrument()
    url = redis_server.url(62)
    expired = deadline_after(PER_CALL_SECONDS)
    calls = 0
    with Racing(readers):
        while calls < PER_CALL_CLIENTS and not expired():
            _client_per_call(url)
            calls += 1
            if calls % 10 == 0:
                gc.collect(1 if calls % 20 else 2)  # the pools made so far freed
                readers.collect()
    readers.assert_clean()
    got = figures(readers.collect_observed(), f"redis://127.0.0.1:{redis_server.port}/62")
    cmp = Comparison(f"after {calls} clients", rng, got)
    cmp.expect("checkouts", workload=calls)
    cmp.expect("connects", workload=calls)  # one connection per client
    cmp.closes({"disposed": calls}, "workload")  # each client closes its pool
    cmp.check()
    # Detection runs at most once a second: a run this fast may end between two rounds.
    poolwatch.pools()  # a round now
    warned = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warned) == 1, f"{rng.replay}: {len(warned)} client_per_request WARNINGs"


# -- instrument/uninstrument cycles under load ------------------------------------------------
def _redis_classes() -> list[type]:
    return [
        sync_connection.ConnectionPool,
        sync_connection.BlockingConnectionPool,
        sync_connection.AbstractConnection,
        async_connection.ConnectionPool,
        async_connection.BlockingConnectionPool,
        async_connection.AbstractConnection,
    ]


def test_instrument_cycles_under_load_reach_no_worker(
    rng: Seeded, readers: Readers, redis_server: RedisServer
) -> None:
    """Workers run commands on a blocking pool of 2 (callers wait, some time out) while the
    controller instruments and uninstruments: every exception a worker sees is one the
    workload causes, none comes from poolwatch, and afterwards redis-py is its own again."""
    before = class_attributes(_redis_classes())
    pool = redis.BlockingConnectionPool.from_url(
        redis_server.url(63), max_connections=2, timeout=0.01
    )
    client = redis.Redis(connection_pool=pool)
    tally = Tally()
    stop = threading.Event()

    def worker(index: int) -> None:
        r = random.Random(rng.seed_value * 1000 + index)
        while not stop.is_set():
            try:
                if r.random() < 0.1:
                    pool.release(pool.get_connection())
                else:
                    client.incr("truth-cycles")
                tally.add("commands")
            except redis.exceptions.ConnectionError as error:
                if str(error) in EXHAUSTED:
                    tally.add("timeouts")
                else:
                    tally.unexpected_error("worker", error)
            except Exception as error:
                where = ", ".join(poolwatch_frames(error)) or "not poolwatch's"
                tally.unexpected_error(f"worker ({where})", error)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    try:
        made = cycle(
            rng,
            readers,
            "redis",
            lambda: tally["commands"] + tally["timeouts"],
            cycles=CYCLES,
            seconds=CYCLE_SECONDS,
            inside=2 * WORKERS,
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert_cycled_cleanly(rng, tally, made, "commands", classes=_redis_classes(), before=before)
    assert all(getattr(conn, "_poolwatch", None) is None for conn in pool._connections)
    pool.disconnect()
