"""boto3 clients' urllib3 pools (pool.kind botocore) against moto's real server on loopback."""

from __future__ import annotations

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
from tests.conftest import Harness

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
    warnings = [r for r in caplog.records if "Connection pool is full" in r.getMessage()]
    [snap] = _botocore_pools()
    assert snap.name == f"dynamodb {moto_endpoint}"
    assert snap.max == 2
    assert snap.checkouts == 1 + 8 * per_thread  # create_table, then every put_item
    assert len(warnings) > 0  # 8 threads on 2 pooled connections: some are discarded
    assert snap.closed["pool_full"] == len(warnings)
    got = pw.collect()
    assert got.value(
        "poolwatch.connections.closed", pool__name=snap.name, reason="pool_full"
    ) == len(warnings)
    assert got.value("poolwatch.connections.max", pool__name=snap.name, pool__kind="botocore") == 2
    assert SECRET not in repr(got.metrics)
    assert "AKIAPOOLWATCHTEST" not in repr(got.metrics)
    client.close()


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
