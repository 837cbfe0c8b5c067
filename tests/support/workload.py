"""A workload that exhausts real pools of every kind, for the end-to-end test.

    python -m tests.support.workload --url URL --port-file FILE --seconds 90

Instruments itself with poolwatch, serves the Prometheus endpoint on a free loopback port
(written to ``--port-file``), and runs cycles, each with four callers per pool at once:

* ``orders-db`` — a SQLAlchemy engine on ``--url`` with pool_size=2, max_overflow=1,
  pool_timeout=0.1: one caller times out, three hold theirs, and when they return the
  overflow connection finds the pool full and is discarded. Full most of the time.
* ``inventory-api`` — a requests Session (pool_maxsize=2) against a slow loopback HTTP
  server started here: four requests at once, so two connections are discarded.
* ``pricing-api`` — an httpx Client (max_connections=2, one kept idle, a 0.1 s pool
  timeout) against the same server: four slow requests at once, so two time out waiting
  for a connection, and one of the two connections is closed when they are done.
* ``sessions-dynamodb`` — a boto3 DynamoDB client (max_pool_connections=2) against moto's
  server started here on loopback.

Beside the cycles, all the time:

* ``catalog-db`` — pool_size=12 held by 11 threads in turn: utilization high (11/12, never
  below 10/12 = 83%) but never saturated or exhausted;
* ``reports-db`` — one connection taken and never returned: a leak past the 2 s threshold;
* ``replica-db``, ``down-api``, ``down-pricing``, ``down-dynamodb`` — a SQLAlchemy engine,
  a requests Session, an httpx Client and a boto3 client for a loopback port that refuses
  connections, called twice a second: connect errors for every kind, and for SQLAlchemy
  (whose checkout includes opening the connection) and httpx (whose checkout is counted
  when the connection accepts the request), wait errors too.

Every pool kind thus has levels, waits, connects, holds and closes to show. It stops after
``--seconds`` (bounded: at most 300) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

import poolwatch
from tests.support.upstream import ThreadedUpstream, refusing_port

CALLERS = 4
HOLD = 0.3
LEAK_THRESHOLD = 2.0
CATALOG_SIZE = 12
CATALOG_HOLDERS = 11


def _database_call(engine: sa.Engine) -> Callable[[], None]:
    def call() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                time.sleep(HOLD)
        except exc.TimeoutError:
            pass  # the point of the exercise: the exhaustion is what poolwatch reports

    return call


def _every(seconds: float, call: Callable[[], None], stop: threading.Event) -> Callable[[], None]:
    def loop() -> None:
        while not stop.is_set():
            call()
            stop.wait(seconds)

    return loop


def _cycle(calls: list[Callable[[], None]]) -> None:
    start = threading.Barrier(CALLERS * len(calls))

    def caller(call: Callable[[], None]) -> None:
        start.wait()
        call()

    threads = [threading.Thread(target=caller, args=(c,)) for c in calls for _ in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def _http_calls(upstream: ThreadedUpstream, moto_url: str) -> tuple[list[Callable[[], None]], Any]:
    import boto3
    import httpx
    import requests
    from botocore.config import Config

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=2))
    poolwatch.track(session, name="inventory-api")
    dynamodb = boto3.client(
        "dynamodb",
        endpoint_url=moto_url,
        region_name="eu-west-1",
        aws_access_key_id="workload",
        aws_secret_access_key="workload",
        config=Config(max_pool_connections=2, retries={"max_attempts": 1}),
    )
    dynamodb.create_table(
        TableName="sessions",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    poolwatch.track(dynamodb, name="sessions-dynamodb")

    pricing = httpx.Client(  # keeps one idle connection: the second is closed each cycle
        base_url=upstream.url,
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
        timeout=httpx.Timeout(10.0, pool=0.1),
    )
    poolwatch.track(pricing, name="pricing-api")

    def inventory() -> None:
        session.get(f"{upstream.url}/?delay={HOLD}", timeout=10)

    def prices() -> None:
        with contextlib.suppress(httpx.PoolTimeout):  # exhaustion, as intended
            pricing.get(f"/?delay={HOLD}")

    def sessions() -> None:
        dynamodb.put_item(TableName="sessions", Item={"id": {"S": str(time.monotonic())}})

    def close() -> None:
        session.close()
        pricing.close()
        dynamodb.close()

    return [inventory, prices, sessions], close


def _busy_catalog(url: str, stop: threading.Event) -> Callable[[], None]:
    """11 threads taking turns on 12 connections; returns a function that joins them."""
    engine = sa.create_engine(url, pool_size=CATALOG_SIZE, max_overflow=0, pool_timeout=5)
    poolwatch.track(engine, name="catalog-db")

    def hold(offset: float) -> None:
        stop.wait(offset)  # staggered: returns never coincide
        while not stop.is_set():
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                stop.wait(HOLD)

    threads = [
        threading.Thread(target=hold, args=(i * HOLD / CATALOG_HOLDERS,), daemon=True)
        for i in range(CATALOG_HOLDERS)
    ]
    for t in threads:
        t.start()

    def join() -> None:
        for t in threads:
            t.join(10)
        engine.dispose()

    return join


def _broken(refused: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """Pools of every kind whose server refuses connections: one call each, and a closer."""
    import boto3
    import httpx
    import requests
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    down = f"http://127.0.0.1:{refused}"
    replica = sa.create_engine(
        f"postgresql+psycopg://u:p@127.0.0.1:{refused}/replica", pool_size=1, max_overflow=0
    )
    poolwatch.track(replica, name="replica-db")
    session = requests.Session()
    poolwatch.track(session, name="down-api")
    client = httpx.Client(timeout=2.0)
    poolwatch.track(client, name="down-pricing")
    dynamodb = boto3.client(
        "dynamodb",
        endpoint_url=down,
        region_name="eu-west-1",
        aws_access_key_id="workload",
        aws_secret_access_key="workload",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    poolwatch.track(dynamodb, name="down-dynamodb")

    def call() -> None:
        with contextlib.suppress(exc.OperationalError), replica.connect():
            pass
        with contextlib.suppress(requests.ConnectionError):
            session.get(down, timeout=2)
        with contextlib.suppress(httpx.ConnectError):
            client.get(down)
        with contextlib.suppress(BotoCoreError):
            dynamodb.list_tables()

    def close() -> None:
        replica.dispose()
        session.close()
        client.close()
        dynamodb.close()

    return call, close


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=90.0)
    args = parser.parse_args()
    stop = threading.Event()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    handle = poolwatch.instrument(prometheus_port=0, leak_threshold=LEAK_THRESHOLD)
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        with ThreadedUpstream() as upstream, refusing_port() as refused:
            engine = sa.create_engine(args.url, pool_size=2, max_overflow=1, pool_timeout=0.1)
            poolwatch.track(engine, name="orders-db")
            host, port = moto.get_host_and_port()
            http_calls, close_http = _http_calls(upstream, f"http://{host}:{port}")
            join_catalog = _busy_catalog(args.url, stop)
            reports = sa.create_engine(args.url, pool_size=5, max_overflow=0)
            poolwatch.track(reports, name="reports-db")
            leaked = reports.connect()  # never returned while the workload runs
            broken, close_broken = _broken(refused)
            failing = threading.Thread(target=_every(0.5, broken, stop), daemon=True)
            failing.start()
            assert handle.prometheus_address is not None
            args.port_file.write_text(str(handle.prometheus_address[1]))
            deadline = time.monotonic() + min(args.seconds, 300.0)
            while not stop.is_set() and time.monotonic() < deadline:
                _cycle([_database_call(engine), *http_calls])
            stop.set()
            failing.join(10)
            join_catalog()
            leaked.close()
            reports.dispose()
            close_broken()
            close_http()
            engine.dispose()
    finally:
        moto.stop()
        poolwatch.uninstrument()
    return 0


if __name__ == "__main__":
    sys.exit(main())
