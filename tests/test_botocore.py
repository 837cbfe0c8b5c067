"""boto3 clients' urllib3 pools (pool.kind botocore) against moto's real server on loopback."""

from __future__ import annotations

import gc
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

import poolwatch
from tests.support.harness import Harness

SECRET = "poolwatch-test-secret-key"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _args(endpoint: str, **config: Any) -> dict[str, Any]:
    """boto3.client() arguments; the call itself stays in each test, its creation site."""
    return {
        "service_name": "dynamodb",
        "endpoint_url": endpoint,
        "region_name": "eu-west-1",
        "aws_access_key_id": "AKIAPOOLWATCHTEST",
        "aws_secret_access_key": SECRET,
        "config": Config(retries={"max_attempts": 1}, **config),
    }


def _table(client: Any, name: str) -> None:
    client.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


def _botocore_pools() -> list[poolwatch.PoolSnapshot]:
    return [s for s in poolwatch.pools() if s.kind == "botocore"]


def test_pool_full_discards_equal_the_warnings_urllib3_logs(
    pw: Harness, moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = boto3.client(**_args(moto_endpoint, max_pool_connections=2))
    _table(client, "discards")
    per_thread = 10

    def put_items(worker: int) -> None:
        for i in range(per_thread):
            client.put_item(TableName="discards", Item={"k": {"S": f"{worker}-{i}"}})

    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        threads = [threading.Thread(target=put_items, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive()
    warnings = [r for r in caplog.records if "Connection pool is full" in r.getMessage()]
    [snap] = _botocore_pools()
    assert snap.name == f"dynamodb {moto_endpoint}"
    assert snap.max == 2
    assert snap.checkouts == 1 + 8 * per_thread  # create_table, then every put_item
    assert len(warnings) > 0  # 8 threads on 2 pooled connections: some are discarded
    assert snap.closed["pool_full"] == len(warnings)
    # How many overlap depends on the scheduler (the next test pins a count); the
    # accounting does not. moto answers every request with "Connection: close": each
    # request connects, and each connection is let go of either as a discard (pool_full)
    # or, kept in the queue closed, as invalidated — the last two when the client closes.
    assert snap.connects == snap.checkouts
    assert snap.used == snap.idle == 0
    got = pw.collect()
    assert got.value(
        "poolwatch.connections.closed", pool__name=snap.name, reason="pool_full"
    ) == len(warnings)
    assert got.value("poolwatch.connections.max", pool__name=snap.name, pool__kind="botocore") == 2
    assert SECRET not in repr(got.metrics)
    assert "AKIAPOOLWATCHTEST" not in repr(got.metrics)
    client.close()
    [snap] = _botocore_pools()
    assert {r: n for r, n in snap.closed.items() if n} == {
        "pool_full": len(warnings),
        "invalidated": snap.connects - len(warnings),
    }


def test_clients_made_per_call_show_as_one_series_with_many_instances(
    pw: Harness, moto_endpoint: str
) -> None:
    def lookup() -> None:
        client = boto3.client(**_args(moto_endpoint))  # the anti-pattern: a client per call
        client.list_tables()
        client.close()

    for _ in range(3):
        lookup()
    shared = boto3.client(**_args(moto_endpoint))
    shared_line = sys._getframe().f_lineno - 1
    shared.list_tables()
    snaps = {s.name: s for s in _botocore_pools()}
    per_call = snaps[f"dynamodb {moto_endpoint}"]
    assert (per_call.instances_created, per_call.checkouts) == (3, 3)
    assert per_call.closed["disposed"] + per_call.closed["invalidated"] == per_call.connects
    other = snaps[f"dynamodb {moto_endpoint} (tests/test_botocore.py:{shared_line})"]
    assert (other.instances_created, other.checkouts) == (1, 1)
    shared.close()


def test_track_names_a_client(pw: Harness, moto_endpoint: str) -> None:
    client = boto3.client(**_args(moto_endpoint))
    client.list_tables()  # its pool exists now
    poolwatch.track(client, name="orders-dynamodb")
    client.list_tables()
    snaps = {s.name: s for s in _botocore_pools()}
    assert snaps["orders-dynamodb"].checkouts == 1
    assert snaps["orders-dynamodb"].instances == 1
    assert set(snaps) == {"orders-dynamodb"}  # its only pool moved out of the derived series
    client.close()


def _connection_attributes(client: Any) -> list[str]:
    manager = client._endpoint.http_session._manager
    (pool,) = manager.pools._container.values()
    (conn,) = (conn for conn in pool.pool.queue if conn is not None)
    return list(vars(conn))


def test_a_tracked_connection_carries_one_attribute_more(
    harness: Harness, moto_endpoint: str
) -> None:
    """botocore's connections have 27 attributes; CPython keeps an instance's attributes in
    its class's compact layout only up to 30. poolwatch's marks are one attribute."""
    bare = boto3.client(**_args(moto_endpoint))
    bare.list_tables()
    attributes = _connection_attributes(bare)
    bare.close()
    del bare
    gc.collect()  # not found by instrument(): its connection stays unmarked
    harness.instrument()
    tracked = boto3.client(**_args(moto_endpoint))
    tracked.list_tables()
    assert sorted(_connection_attributes(tracked)) == sorted([*attributes, "_poolwatch"])
    tracked.close()


def test_eight_threads_holding_responses_make_exactly_six_discards(
    pw: Harness, moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """S3 bodies stream: a thread holds its connection until it reads the body. Eight
    threads hold one each at once (a barrier), so the pool of two discards exactly six."""
    s3 = {"addressing_style": "path"}
    client = boto3.client(
        **{**_args(moto_endpoint, max_pool_connections=2, s3=s3), "service_name": "s3"}
    )
    client.create_bucket(
        Bucket="poolwatch-discards", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    client.put_object(Bucket="poolwatch-discards", Key="k", Body=b"body")
    everyone = threading.Barrier(8, timeout=30)
    bodies: list[bytes] = []
    lock = threading.Lock()

    def get() -> None:
        body = client.get_object(Bucket="poolwatch-discards", Key="k")["Body"]
        everyone.wait()  # eight connections checked out at once
        data = body.read()
        body.close()
        with lock:
            bodies.append(data)

    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        threads = [threading.Thread(target=get) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive()
    assert bodies == [b"body"] * 8
    warnings = [r for r in caplog.records if "Connection pool is full" in r.getMessage()]
    assert len(warnings) == 6
    [snap] = _botocore_pools()
    assert snap.name == f"s3 {moto_endpoint}"
    # moto closes every connection after its response: each request connects.
    assert (snap.checkouts, snap.connects, snap.used, snap.idle) == (10, 10, 0, 0)
    assert snap.closed["pool_full"] == 6
    got = pw.collect()
    assert got.value("poolwatch.connections.closed", pool__name=snap.name, reason="pool_full") == 6
    assert got.count("poolwatch.connection.lifetime", pool__name=snap.name, reason="pool_full") == 6
    client.close()
    [snap] = _botocore_pools()
    assert {r: n for r, n in snap.closed.items() if n} == {"pool_full": 6, "invalidated": 4}


def test_a_client_made_before_instrument_is_found(harness: Harness, moto_endpoint: str) -> None:
    client = boto3.client(**_args(moto_endpoint, max_pool_connections=3))
    client.list_tables()  # its pool exists before instrument()
    harness.instrument()
    client.list_tables()
    [snap] = _botocore_pools()
    assert snap.name == f"dynamodb {moto_endpoint}"  # service and endpoint, as if made after
    # moto closed the first connection after its response: the second call connects again.
    assert (snap.checkouts, snap.connects, snap.max) == (1, 1, 3)
    got = harness.collect()
    assert got.value("poolwatch.connections.max", pool__kind="botocore") == 3
    assert got.count("poolwatch.wait.duration", pool__name=snap.name, outcome="acquired") == 1
    client.close()


@pytest.mark.semconv
def test_semconv_mirrors_for_botocore_pools(pw: Harness, moto_endpoint: str) -> None:
    s3 = {"addressing_style": "path"}
    client = boto3.client(**{**_args(moto_endpoint, s3=s3), "service_name": "s3"})
    client.create_bucket(
        Bucket="poolwatch-semconv", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    client.put_object(Bucket="poolwatch-semconv", Key="k", Body=b"body")
    body = client.get_object(Bucket="poolwatch-semconv", Key="k")["Body"]  # holds its connection
    name = f"s3 {moto_endpoint}"
    port = int(moto_endpoint.rsplit(":", 1)[1])
    got = pw.collect()
    mirrors = got.points("http.client.open_connections", pool__name=name)
    assert {p.attributes["http.connection.state"]: p.value for p in mirrors} == {
        "active": 1,
        "idle": 0,
    }
    assert {(p.attributes["server.address"], p.attributes["server.port"]) for p in mirrors} == {
        ("127.0.0.1", port)
    }
    queue = got.histogram("http.client.request.time_in_queue", pool__name=name)
    wait = got.histogram("poolwatch.wait.duration", pool__name=name, outcome="acquired")
    assert queue.count == 3
    assert (queue.sum, list(queue.bucket_counts)) == (wait.sum, list(wait.bucket_counts))
    assert "pool.kind" not in queue.attributes  # mirrors carry pool.name, not pool.kind
    assert body.read() == b"body"
    body.close()
    got = pw.collect()
    mirrors = got.points("http.client.open_connections", pool__name=name)
    assert {p.attributes["http.connection.state"]: p.value for p in mirrors} == {
        "active": 0,
        "idle": 0,  # moto closed it after the response
    }
    client.close()
    del body  # its response holds the pool: collected, the pool lets go of its connection
    gc.collect()
    got = pw.collect()
    duration = got.histogram("http.client.connection.duration", pool__name=name)
    assert duration.count == 3  # one connection per request
    lifetime = got.histogram("poolwatch.connection.lifetime", pool__name=name, reason="invalidated")
    assert (duration.count, duration.sum) == (lifetime.count, lifetime.sum)
