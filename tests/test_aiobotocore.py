"""aiobotocore clients' pools — aiohttp connectors — show as pool.kind botocore, named by
service and endpoint as boto3's are, with ``max_pool_connections`` as their max; against
moto's real server on loopback (its server mode, as tests/test_botocore.py does for boto3),
on a real event loop.

moto's server (werkzeug's) answers every request with ``Connection: close``: every request
opens a connection, and aiohttp closes it once the response is read (``invalidated``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer

import poolwatch
from tests.support.harness import Harness

SECRET = "poolwatch-aio-secret-key"
KEY_ID = "AKIAPOOLWATCHAIO"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _args(service: str, endpoint: str, **config: Any) -> dict[str, Any]:
    """create_client() arguments; the call itself stays in each test, its creation site."""
    return {
        "service_name": service,
        "endpoint_url": endpoint,
        "region_name": "eu-west-1",
        "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET,
        "config": AioConfig(
            retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}, **config
        ),
    }


def _botocore_pools() -> list[poolwatch.PoolSnapshot]:
    return [s for s in poolwatch.pools() if s.kind == "botocore"]


def _closed(snap: poolwatch.PoolSnapshot) -> dict[str, int]:
    return {reason: n for reason, n in snap.closed.items() if n}


def test_a_client_is_a_botocore_pool_named_by_service_and_endpoint(
    pw: Harness, moto_endpoint: str
) -> None:
    name = f"dynamodb {moto_endpoint}"
    port = int(moto_endpoint.rsplit(":", 1)[1])

    async def scenario() -> None:
        session = get_session()
        async with session.create_client(
            **_args("dynamodb", moto_endpoint, max_pool_connections=3)
        ) as client:
            await client.create_table(
                TableName="aio",
                KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )
            await asyncio.gather(
                *(client.put_item(TableName="aio", Item={"k": {"S": str(i)}}) for i in range(5))
            )
            [snap] = _botocore_pools()
            assert snap.name == name
            assert (snap.max, snap.used, snap.pending, snap.checkouts) == (3, 0, 0, 6)
            assert snap.connects == 6  # moto closes every connection
            assert snap.attributes == {"server.address": "127.0.0.1", "server.port": port}
            got = pw.collect()
            where = {"pool__name": name, "pool__kind": "botocore"}
            assert got.value("poolwatch.connections.max", **where) == 3
            assert got.count("poolwatch.wait.duration", outcome="acquired", **where) == 6
            assert got.count("poolwatch.use.duration", **where) == 6
            assert got.value("poolwatch.connections.closed", reason="invalidated", **where) == 6
            shown = repr(got.metrics)
            assert SECRET not in shown
            assert KEY_ID not in shown

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert [s.name for s in _botocore_pools()] == [name]
    assert not [s for s in poolwatch.pools() if s.kind == "aiohttp"]  # not an anonymous pool


def test_an_exhausted_client_shows_its_waiting_callers(pw: Harness, moto_endpoint: str) -> None:
    name = f"s3 {moto_endpoint}"

    async def scenario() -> None:
        session = get_session()
        async with session.create_client(
            **_args("s3", moto_endpoint, max_pool_connections=1)
        ) as client:
            await client.create_bucket(
                Bucket="aio", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
            )
            await client.put_object(Bucket="aio", Key="big", Body=b"x" * (4 << 20))
            held = await client.get_object(Bucket="aio", Key="big")  # body unread: kept
            waiting = [
                asyncio.ensure_future(client.head_object(Bucket="aio", Key="big")) for _ in range(2)
            ]
            while not _botocore_pools() or _botocore_pools()[0].pending != 2:
                await asyncio.sleep(0.005)
            [snap] = _botocore_pools()
            assert (snap.name, snap.used, snap.max, snap.pending) == (name, 1, 1, 2)
            assert [a.name for a in snap.antipatterns] == ["no_pool_timeout"]
            assert "aiobotocore" in snap.antipatterns[0].problem
            assert "AioConfig(max_pool_connections=" in snap.antipatterns[0].advice
            body = await held["Body"].read()
            assert len(body) == 4 << 20
            held["Body"].close()
            await asyncio.gather(*waiting)
            [snap] = _botocore_pools()
            assert (snap.used, snap.pending, snap.checkouts) == (0, 0, 5)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_track_names_a_client_before_its_first_request(pw: Harness, moto_endpoint: str) -> None:
    async def scenario() -> None:
        session = get_session()
        async with session.create_client(**_args("dynamodb", moto_endpoint)) as client:
            poolwatch.track(client, name="orders-dynamodb")  # no connector yet
            await client.list_tables()
            await client.list_tables()
            snaps = {s.name: s for s in _botocore_pools()}
            assert set(snaps) == {"orders-dynamodb"}
            assert (snaps["orders-dynamodb"].checkouts, snaps["orders-dynamodb"].max) == (2, 10)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_client_made_before_instrument_is_found_as_botocore(
    harness: Harness, moto_endpoint: str
) -> None:
    async def scenario() -> None:
        session = get_session()
        async with session.create_client(**_args("dynamodb", moto_endpoint)) as client:
            await client.list_tables()
            harness.instrument()
            await client.list_tables()
            [snap] = _botocore_pools()
            assert (snap.name, snap.checkouts, snap.max) == (f"dynamodb {moto_endpoint}", 1, 10)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_clients_made_per_call_are_one_series_and_an_antipattern(
    pw: Harness, moto_endpoint: str
) -> None:
    async def lookup() -> None:
        session = get_session()
        async with session.create_client(**_args("dynamodb", moto_endpoint)) as client:
            await client.list_tables()

    async def scenario() -> None:
        for _ in range(10):
            await lookup()
        async with get_session().create_client(**_args("dynamodb", moto_endpoint)) as shared:
            # aiobotocore makes a client's connector at its first request: that is its site.
            await shared.list_tables()
            line = sys._getframe().f_lineno - 1
            snaps = {s.name: s for s in _botocore_pools()}
            per_call = snaps[f"dynamodb {moto_endpoint}"]
            assert (per_call.instances_created, per_call.checkouts) == (10, 10)
            assert [a.name for a in per_call.antipatterns] == ["client_per_request"]
            assert "aiobotocore" in per_call.antipatterns[0].advice
            other = snaps[f"dynamodb {moto_endpoint} (tests/test_aiobotocore.py:{line})"]
            assert other.checkouts == 1

    asyncio.run(asyncio.wait_for(scenario(), 60))
