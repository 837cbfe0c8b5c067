"""Ground truth for boto3 clients against moto's server mode (tests/support/truth.py says
how; ``POOLWATCH_TRUTH_SEED`` replays a run).

moto's server (werkzeug's) answers every request with ``Connection: close``: every request
opens a connection, and the pool lets go of each when it is next checked out (found
dropped, "Resetting dropped connection" in urllib3's log) or discarded. An S3 client shared
by worker threads with ``max_pool_connections=2``: objects read whole, or their streaming
body held across operations (and pauses) and read later; a request for a missing key (an
error answer); a body closed unread.
"""

from __future__ import annotations

import gc
import logging
import random
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

import poolwatch
from tests.support.truth import (
    Comparison,
    LibraryLog,
    Racing,
    Readers,
    Seeded,
    Tally,
    ThreadGate,
    deadline_after,
    drive_threads,
    figures,
    idle_in_queue,
    library_log,
    pause_moments,
)

# Bounds: every loop stops at a count or a time, whichever comes first (the CI budget of
# the whole ground-truth suite is about 150 s on a two-core machine; the soak,
# benchmarks/soak.py, runs the same workloads for minutes).
OPERATIONS = 200
"""Operations of one randomized run, over all its workers (and at most ``SECONDS``)."""
SECONDS = 8.0
PAUSES = 5
WORKERS = 4
MAXSIZE = 2
PER_CALL_CLIENTS = 300
"""boto3 clients made, used once and dropped (at most ``PER_CALL_SECONDS``)."""
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


def _s3(endpoint: str, **config: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="eu-west-1",
        aws_access_key_id="AKIAPOOLWATCHTRUTH",
        aws_secret_access_key="poolwatch-truth-secret",
        config=Config(
            retries={"total_max_attempts": 1},  # one request per call: no retries
            s3={"addressing_style": "path"},
            **config,
        ),
    )


class Workload:
    def __init__(self, rng: Seeded, client: Any, log: LibraryLog) -> None:
        self.rng = rng
        self.client = client
        self.log = log
        self.tally = Tally()
        self.expired = deadline_after(SECONDS)

    def _get(self, key: str = "object") -> Any:
        response = self.client.get_object(Bucket="truth", Key=key)
        self.tally.add("checkouts")
        return response["Body"]

    def _finish(self, body: Any) -> None:
        assert body.read() == b"truth"
        body.close()
        self.tally.add("returns")

    def step(self, held: list[Any], r: random.Random) -> None:
        if held and (r.random() < 0.4 or len(held) >= 2):
            self.tally.add("held", -1)
            self._finish(held.pop(r.randrange(len(held))))
            return
        roll = r.random()
        if roll < 0.35:
            held.append(self._get())
            self.tally.add("held")
        elif roll < 0.45:
            try:
                self.client.get_object(Bucket="truth", Key="missing")
            except ClientError as error:  # the server's answer: NoSuchKey
                assert error.response["Error"]["Code"] == "NoSuchKey"
                self.tally.add("checkouts")
                self.tally.add("returns")
            else:
                self.tally.unexpected_error("missing", AssertionError("a missing key was found"))
        elif roll < 0.55:
            body = self._get()
            body.close()  # unread: urllib3 closes the connection, then returns it
            self.tally.add("returns")
            self.tally.add("closed_early")
        else:
            self._finish(self._get())

    def worker(self, index: int, gate: ThreadGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: list[Any] = []
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
            for body in held:
                self.tally.add("held", -1)
                self._finish(body)


def test_an_s3_client_shared_by_threads(rng: Seeded, readers: Readers, moto_endpoint: str) -> None:
    readers.instrument()
    with library_log() as log:  # from before the client's first request
        client = _s3(moto_endpoint, max_pool_connections=MAXSIZE)
        poolwatch.track(client, name="truth")  # named before its first request
        client.create_bucket(
            Bucket="truth", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        client.put_object(Bucket="truth", Key="object", Body=b"truth")
        [pool] = list(client._endpoint.http_session._manager.pools._container.values())
        workload = Workload(rng, client, log)
        workload.tally.add("checkouts", 2)  # the bucket and its object
        workload.tally.add("returns", 2)
        gate = ThreadGate(rng)

        def on_pause(label: str, pending: int) -> None:
            t = workload.tally
            t.assert_expected(rng)
            gc.collect()  # bodies closed unread: their responses are freed (see below)
            got = figures(readers.collect_settled(), "truth")
            cmp = Comparison(f"{label}: boto3 s3", rng, got)
            cmp.expect("used", workload=t["held"])
            cmp.expect("idle", library=idle_in_queue(pool))
            cmp.expect("max", workload=MAXSIZE, library=pool.pool.maxsize)
            cmp.expect("pending", workload=0)
            cmp.expect("checkouts", workload=t["checkouts"], library=pool.num_requests)
            cmp.expect("uses", workload=t["returns"])
            # A body closed unread closes its connection, and urllib3 never gets it back
            # (HTTPResponse.close() does not release it; a block=True pool would be one slot
            # short for good): in the pool's terms a checkout never returned, found once its
            # response is freed.
            cmp.expect("leaks", library=t["closed_early"])
            # Every request connects (the server closes each connection): a new connection
            # object, or one found dropped at checkout and reconnected.
            connects = pool.num_connections + log.resets
            cmp.expect("connects", library=connects)
            cmp.reused(t["checkouts"] - connects)
            # A body closed unread closes its connection at once (invalidated); a
            # connection the server ended is let go of at its next checkout (invalidated)
            # or discarded (pool_full, as urllib3's "Connection pool is full" says).
            cmp.closes(
                {
                    "invalidated": t["closed_early"] + log.resets,
                    "pool_full": log.discards,
                },
                "workload",
            )
            cmp.check()

        with Racing(readers):
            made = drive_threads(
                gate,
                workload.tally,
                lambda i: workload.worker(i, gate),
                workers=WORKERS,
                moments=pause_moments(rng, OPERATIONS, PAUSES),
                on_pause=on_pause,
            )
        on_pause(f"the end ({made} pauses)", 0)
    client.close()
    readers.assert_clean()


# -- a client per call --------------------------------------------------------------------------
def _client_per_call(endpoint: str) -> None:
    # The anti-pattern: a new client, so a new pool, per call. DynamoDB's, whose series is
    # its own ("dynamodb <endpoint>"): the S3 client of the test above, if still alive, would
    # join an S3 series and keep it from ever being empty.
    client = boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name="eu-west-1",
        aws_access_key_id="AKIAPOOLWATCHTRUTH",
        aws_secret_access_key="poolwatch-truth-secret",
        config=Config(retries={"total_max_attempts": 1}),
    )
    client.list_tables()
    client.close()


def test_a_client_per_call_keeps_one_monotonic_series(
    rng: Seeded, readers: Readers, moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    readers.instrument()
    expired = deadline_after(PER_CALL_SECONDS)
    calls = 0
    with Racing(readers):
        while calls < PER_CALL_CLIENTS and not expired():
            _client_per_call(moto_endpoint)
            calls += 1
            if calls % 10 == 0:
                # every pool made so far freed, as the app's own collector would
                gc.collect(1 if calls % 20 else 2)
                readers.collect()
    readers.assert_clean()
    got = figures(readers.collect_observed(), f"dynamodb {moto_endpoint}")
    cmp = Comparison(f"after {calls} clients", rng, got)
    cmp.expect("checkouts", workload=calls)
    cmp.expect("connects", workload=calls)  # one connection per client
    cmp.check()
    warned = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warned) == 1, f"{rng.replay}: {len(warned)} client_per_request WARNINGs"
