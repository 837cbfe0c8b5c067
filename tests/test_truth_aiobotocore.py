"""Ground truth for aiobotocore clients, whose pools are aiohttp connectors exported as
pool.kind botocore (tests/support/truth.py says how; ``POOLWATCH_TRUTH_SEED`` replays a run).

An S3 client with ``max_pool_connections=2`` shared by tasks on one event loop, against
moto's server mode on loopback. moto's server (werkzeug's) answers every request with
``Connection: close``: every request opens a connection, which aiohttp closes once the
response is read (invalidated). Operations, chosen at random: an object read whole; an
object's streaming body held across operations (and pauses) and read later — its
connection stays out until then; a request for a missing key (an error answer); a body
closed unread (aiohttp closes its connection: error). aiobotocore sets no bound on the wait
for a connection, so a task asking while both are held waits (pending) until one comes
back.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

import poolwatch
from tests.support.truth import (
    Comparison,
    Racing,
    Readers,
    Seeded,
    Tally,
    TaskGate,
    deadline_after,
    figures,
    pause_moments,
)

OPERATIONS = 200
"""Operations of one randomized run, over all its tasks (and at most ``SECONDS``)."""
SECONDS = 8.0
PAUSES = 5
TASKS = 4
MAXSIZE = 2
BODY = 4 << 20
"""Bytes of an object: more than aiohttp buffers unread, so a held body keeps its connection."""
PER_CALL_CLIENTS = 20
"""aiobotocore clients made, used once and dropped (at most ``PER_CALL_SECONDS``; at least
the 10 instances client_per_request needs, whatever the time)."""
PER_CALL_SECONDS = 5.0


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


BUCKET = "truth-aiobotocore"
"""Its own name: moto's state is the process's, shared with tests/test_truth_botocore.py when
both run in one test process (made "truth" twice: BucketAlreadyOwnedByYou)."""


def _args(service: str, endpoint: str, **config: Any) -> dict[str, Any]:
    return {
        "service_name": service,
        "endpoint_url": endpoint,
        "region_name": "eu-west-1",
        "aws_access_key_id": "AKIAPOOLWATCHTRUTH",
        "aws_secret_access_key": "poolwatch-truth-secret",
        "config": AioConfig(
            retries={"total_max_attempts": 1},  # one request per call: no retries
            s3={"addressing_style": "path"},
            **config,
        ),
    }


def library_levels(connector: Any) -> tuple[int, int, int]:
    """aiohttp's own view: connections handed out, idle open ones, callers queued."""
    used = len(connector._acquired)
    idle = sum(
        1
        for queue in list(connector._conns.values())
        for proto, _ in list(queue)
        if proto.transport is not None and not proto.transport.is_closing()
    )
    queued = sum(1 for q in list(connector._waiters.values()) for w in list(q) if not w.done())
    return used, idle, queued


class Workload:
    def __init__(self, rng: Seeded, client: Any) -> None:
        self.rng = rng
        self.client = client
        self.tally = Tally()
        self.expired = deadline_after(SECONDS)
        self.asking: dict[int, bool] = {}
        """Tasks in a request now, by index."""

    async def _get(self, index: int, key: str = "object") -> Any:
        self.asking[index] = True
        try:
            response = await self.client.get_object(Bucket=BUCKET, Key=key)
        finally:
            del self.asking[index]
        self.tally.add("checkouts")
        return response["Body"]

    async def _finish(self, body: Any) -> None:
        assert len(await body.read()) == BODY
        body.close()
        self.tally.add("returns")
        self.tally.add("server_closed")

    async def step(self, index: int, held: list[Any], r: random.Random) -> None:
        if held:  # holding one, never wait for another (two holders could deadlock)
            self.tally.add("held", -1)
            await self._finish(held.pop())
            return
        roll = r.random()
        if roll < 0.35:
            held.append(await self._get(index))
            self.tally.add("held")
        elif roll < 0.45:
            self.asking[index] = True
            try:
                await self.client.get_object(Bucket=BUCKET, Key="missing")
            except ClientError as error:  # the server's answer: NoSuchKey
                assert error.response["Error"]["Code"] == "NoSuchKey"
                self.tally.add("checkouts")
                self.tally.add("returns")
                self.tally.add("server_closed")
            else:
                self.tally.unexpected_error("missing", AssertionError("a missing key was found"))
            finally:
                del self.asking[index]
        elif roll < 0.55:
            body = await self._get(index)
            body.close()  # unread: aiohttp closes the connection
            self.tally.add("returns")
            self.tally.add("closed_early")
        else:
            await self._finish(await self._get(index))

    async def task(self, index: int, gate: TaskGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: list[Any] = []
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                await gate.checkpoint()
                try:
                    await self.step(index, held, r)
                except Exception as error:
                    self.tally.unexpected_error("step", error)
                self.tally.add("operations")
        finally:
            for body in held:
                self.tally.add("held", -1)
                await self._finish(body)

    def blocked(self, connector: Any) -> int:
        """Tasks queued for a slot, once every task in a request is so queued."""
        queued = library_levels(connector)[2] if connector is not None else 0
        return queued if queued == len(self.asking) else -1


def compare(
    label: str, rng: Seeded, readers: Readers, workload: Workload, connector: Any, *, pending: int
) -> None:
    t = workload.tally
    t.assert_expected(rng)
    used_lib, idle_lib, queued = library_levels(connector)
    got = figures(readers.collect_settled(), "truth")
    cmp = Comparison(f"{label}: aiobotocore s3", rng, got)
    cmp.expect("used", workload=t["held"], library=used_lib)
    cmp.expect("idle", library=idle_lib, workload=0)  # the server closes every connection
    cmp.expect("max", workload=MAXSIZE, library=connector._limit)
    cmp.expect("pending", workload=pending, library=queued)
    cmp.expect("checkouts", workload=t["checkouts"])
    cmp.expect("uses", workload=t["returns"])
    cmp.expect("timeouts", workload=0)
    cmp.expect("wait_errors", workload=0)
    cmp.expect("connects", workload=t["checkouts"])  # no connection is kept: none reused
    cmp.reused(0)
    cmp.expect("leaks", workload=0)
    cmp.closes({"invalidated": t["server_closed"], "error": t["closed_early"]}, "workload")
    cmp.check()


def test_an_s3_client_shared_by_tasks(rng: Seeded, readers: Readers, moto_endpoint: str) -> None:
    readers.instrument()

    async def main() -> None:
        session = get_session()
        async with session.create_client(
            **_args("s3", moto_endpoint, max_pool_connections=MAXSIZE)
        ) as client:
            poolwatch.track(client, name="truth")  # before its first request: no pool yet
            await client.create_bucket(
                Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
            )
            await client.put_object(Bucket=BUCKET, Key="object", Body=b"x" * BODY)
            [aiohttp_session] = client._endpoint.http_session._sessions.values()
            connector = aiohttp_session.connector
            workload = Workload(rng, client)
            workload.tally.add("checkouts", 2)  # the bucket and its object
            workload.tally.add("returns", 2)
            workload.tally.add("server_closed", 2)
            [snap] = [s for s in poolwatch.pools() if s.name == "truth"]
            assert snap.kind == "botocore"
            gate = TaskGate(rng)
            gate.start(lambda i: workload.task(i, gate), TASKS)
            moments = sorted(pause_moments(rng, OPERATIONS, PAUSES))
            for number, moment in enumerate(moments, 1):
                while workload.tally["operations"] < moment and not all(
                    t.done() for t in gate.tasks
                ):
                    await asyncio.sleep(0.001)
                if all(t.done() for t in gate.tasks):
                    break
                pending = await gate.pause(blocked=lambda: workload.blocked(connector))
                try:
                    compare(f"pause {number}", rng, readers, workload, connector, pending=pending)
                finally:
                    gate.resume()
            await gate.join()
            compare("the end", rng, readers, workload, connector, pending=0)

    with Racing(readers):
        asyncio.run(asyncio.wait_for(main(), 120))
    readers.assert_clean()


# -- a client per call ------------------------------------------------------------------------
async def _client_per_call(session: Any, endpoint: str) -> None:
    # The anti-pattern: a client (so a connector) per call, from one session.
    async with session.create_client(**_args("dynamodb", endpoint)) as client:
        await client.list_tables()


def test_a_client_per_call_keeps_one_monotonic_series(
    rng: Seeded, readers: Readers, moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    readers.instrument()
    calls = 0

    async def main() -> None:
        nonlocal calls
        session = get_session()
        expired = deadline_after(PER_CALL_SECONDS)
        while calls < PER_CALL_CLIENTS and (calls < 12 or not expired()):
            await _client_per_call(session, moto_endpoint)
            calls += 1
            if calls % 10 == 0:
                gc.collect(1 if calls % 20 else 2)  # the clients made so far freed
                readers.collect()

    with Racing(readers):
        asyncio.run(main())
    readers.assert_clean()
    got = figures(readers.collect_observed(), f"dynamodb {moto_endpoint}")
    cmp = Comparison(f"after {calls} clients", rng, got)
    cmp.expect("checkouts", workload=calls)
    cmp.expect("connects", workload=calls)
    cmp.check()
    poolwatch.pools()  # a detection round now (they run at most once a second)
    warned = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warned) == 1, f"{rng.replay}: {len(warned)} client_per_request WARNINGs"
