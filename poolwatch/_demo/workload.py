"""The demo's workload: every pool kind poolwatch knows, in the shape of one scenario.

Pools (each where its library is installed; the demo says which it skipped):

* ``orders-db`` — SQLAlchemy on a throw-away PostgreSQL cluster when the server binaries
  are on the machine (``--database auto``, the default), else a throw-away SQLite file, or
  the database ``--url`` names;
* ``reports-db`` — a psycopg_pool ``ConnectionPool`` on the same database, when it is
  PostgreSQL (sized with room to spare in every scenario: no alert is about it);
* ``inventory-api`` — a requests Session against the HTTP upstream (``requests.get()`` per
  call in the *churn* scenario: a new pool, so a new connection, per request);
* ``pricing-api`` — an httpx Client; ``pricing-api-async`` — an httpx AsyncClient;
* ``sessions-dynamodb`` — a boto3 DynamoDB client against moto's server on loopback;
* ``sessions-cache`` — a redis-py ``BlockingConnectionPool`` on a throw-away
  ``redis-server`` (``_demo/redis.py``), when the server binary is on the machine: each
  call a ``WATCH``/``MULTI`` transaction holding its connection for the scenario's hold
  time.

The HTTP upstream is poolwatch's own loopback server (``upstream.py``) unless ``--http-url``
names one, and moto's DynamoDB is served by ``wsgi.py``'s keep-alive server (moto's own
closes every connection, which real DynamoDB does not). Each scenario makes the conditions
of the alerts in its ``alerts`` really happen (tests/test_demo_alerts.py):

=============  ===========================================================================
healthy        every pool sized at twice its workers: no alert's condition happens
exhaustion     2 database connections for busy workers, an httpx pool of 2 with a 0.2 s
               pool timeout on a slow upstream, a Redis pool of 2 whose transactions hold
               their connection as long: callers wait and time out
               (PoolwatchPoolExhausted, Saturated, UtilizationHigh, SlowAcquire)
leak           a worker keeps database connections it never returns; the leak threshold is
               3 s (PoolwatchConnectionLeak)
churn          ``requests.get()`` per call: a connection opened per request
               (PoolwatchConnectionChurn; PoolwatchPoolAntipattern: client_per_request)
stale          the upstream closes idle keep-alives after 50 ms and clients pause longer:
               every reuse finds a dropped connection (PoolwatchPoolAntipattern:
               keepalive_too_long)
discard        a requests pool of 2 for 8 workers and a boto3 pool of 1 for 4: connections
               opened past the pool are thrown away (PoolwatchPoolDiscarding;
               PoolwatchPoolAntipattern: pool_overflowing)
=============  ===========================================================================
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO
from urllib.parse import urlsplit

from opentelemetry import trace

import poolwatch
from poolwatch._demo.scenarios import SCENARIOS
from poolwatch._demo.tracing import tracer_provider
from poolwatch._demo.upstream import ThreadedUpstream


@dataclass
class Options:
    """What the command line asked for."""

    scenario: str
    duration: float
    workers: int
    port: int
    url: str | None = None
    http_url: str | None = None
    database: str = "auto"
    """auto (a throw-away PostgreSQL when its binaries and psycopg are here, else SQLite),
    sqlite, or postgresql."""


Call = Callable[[], None]


def _name(client: Any, name: str) -> None:
    """Name a client's pools; a library poolwatch does not hook keeps running unnamed."""
    with suppress(TypeError):
        poolwatch.track(client, name=name)


class Demo:
    """Starts the pools and their workers; stops everything it started."""

    def __init__(self, options: Options, out: TextIO) -> None:
        self.options = options
        self.scenario = SCENARIOS[options.scenario]
        self.out = out
        self.stop = threading.Event()
        self.failures: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.signals = StopSignals()
        self.database_label = "the database --url names"
        self.postgres_url: str | None = None
        """The database as a libpq URL, when it is PostgreSQL (for reports-db)."""
        self.tracer: trace.Tracer = trace.NoOpTracer()
        """Each worker call is a span (``demo <pool>``): the parent of poolwatch's waits."""

    @property
    def database_pool(self) -> tuple[int, int]:
        """(pool_size, max_overflow) of orders-db."""
        if self.scenario.room:
            return 2 * self.options.workers, 0
        return self.scenario.pool_size, self.scenario.max_overflow

    @property
    def http_pool(self) -> int:
        """requests pool_maxsize, httpx max_connections, boto3 max_pool_connections."""
        return 2 * self.options.workers if self.scenario.room else self.scenario.http_pool

    @property
    def aws_pool(self) -> int:
        """boto3 max_pool_connections."""
        if self.scenario.room or self.scenario.aws_pool is None:
            return self.http_pool
        return self.scenario.aws_pool

    # -- workers -----------------------------------------------------------------------
    def _failed(self, pool: str) -> None:
        with self._lock:
            self.failures[pool] = self.failures.get(pool, 0) + 1

    def _loop(self, pool: str, call: Call, expected: tuple[type[BaseException], ...]) -> None:
        rng = random.Random()
        while not self.stop.is_set():
            try:
                with self.tracer.start_as_current_span(f"demo {pool}"):
                    call()
            except expected:
                self._failed(pool)  # the scenario's point: poolwatch reports it
            self.stop.wait(rng.uniform(*self.scenario.pause))

    def _start(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def workers(self, pool: str, call: Call, count: int, *expected: type[BaseException]) -> None:
        """Run ``call`` in ``count`` threads until the demo stops."""
        for i in range(count):
            self._start(f"demo-{pool}-{i}", self._loop, pool, call, expected)

    # -- pools -------------------------------------------------------------------------
    def database(self, stack: ExitStack) -> None:
        import sqlalchemy as sa

        s = self.scenario
        pool_size, max_overflow = self.database_pool
        engine = sa.create_engine(
            self._database_url(stack),
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=s.pool_timeout,
        )
        stack.callback(engine.dispose)
        _name(engine, "orders-db")
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY)"))
        rng = random.Random()

        def query() -> None:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT count(*) FROM orders")).scalar()
                self.stop.wait(rng.uniform(*s.hold))

        self.workers("orders-db", query, self.options.workers, sa.exc.TimeoutError)
        if s.leaked:
            self._start("demo-leaker", self._leak, engine, s.leaked)

    def _database_url(self, stack: ExitStack) -> str:
        """--url, else a throw-away PostgreSQL (when possible or asked for), else SQLite."""
        if self.options.url:
            scheme, _, rest = self.options.url.partition("://")
            if scheme.split("+")[0] in ("postgresql", "postgres"):
                self.postgres_url = f"postgresql://{rest}"
            return self.options.url
        if self.options.database != "sqlite":
            from poolwatch._demo.postgres import PostgresCluster, PostgresError, find_bin_dir

            try:
                import psycopg  # noqa: F401  (the driver the cluster's URL names)

                find_bin_dir()
            except (ImportError, PostgresError):
                if self.options.database == "postgresql":
                    raise
            else:
                print("poolwatch demo: starting a throw-away PostgreSQL …", file=sys.stderr)
                cluster = stack.enter_context(PostgresCluster(checkpoint=self.signals.checkpoint))
                self.database_label = f"PostgreSQL on 127.0.0.1:{cluster.port} (throw-away)"
                self.postgres_url = "postgresql://" + cluster.url().partition("://")[2]
                return cluster.url()
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="poolwatch-demo-"))
        self.database_label = "SQLite (throw-away file)"
        return f"sqlite:///{Path(tmp) / 'orders.db'}"

    def _leak(self, engine: Any, count: int) -> None:
        kept = []
        for _ in range(count):  # checked out, never returned while the demo runs
            kept.append(engine.connect())
            if self.stop.wait(1.0):
                break
        self.stop.wait()
        for conn in kept:
            conn.close()

    def reports(self, stack: ExitStack) -> None:
        """reports-db: a psycopg_pool pool on the demo's PostgreSQL, always with room."""
        import psycopg_pool

        if self.postgres_url is None:
            return
        workers = self.options.workers
        pool = psycopg_pool.ConnectionPool(
            self.postgres_url, min_size=workers, max_size=2 * workers, timeout=10, open=False
        )
        _name(pool, "reports-db")
        pool.open(wait=True, timeout=60)
        stack.callback(pool.close)
        rng = random.Random()

        def report() -> None:
            with pool.connection() as conn:
                conn.execute("SELECT count(*) FROM orders").fetchone()
                self.stop.wait(rng.uniform(*self.scenario.hold))

        self.workers("reports-db", report, workers, psycopg_pool.PoolTimeout)

    def requests_session(self, stack: ExitStack, url: str) -> None:
        import requests

        s = self.scenario
        if s.request_per_call:

            def get() -> None:
                requests.get(url, timeout=10).raise_for_status()

            self.workers("inventory-api", get, self.options.workers, requests.RequestException)
            return
        session = stack.enter_context(requests.Session())
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.http_pool)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _name(session, "inventory-api")

        def fetch() -> None:
            session.get(url, timeout=10).raise_for_status()

        self.workers("inventory-api", fetch, self.options.workers, requests.RequestException)

    def httpx_clients(self, stack: ExitStack, url: str) -> None:
        import httpx

        s = self.scenario
        limits = httpx.Limits(
            max_connections=self.http_pool, max_keepalive_connections=self.http_pool
        )
        timeout = httpx.Timeout(10.0, pool=s.http_pool_timeout)
        client = stack.enter_context(httpx.Client(limits=limits, timeout=timeout))
        _name(client, "pricing-api")

        def fetch() -> None:
            client.get(url).raise_for_status()

        self.workers("pricing-api", fetch, self.options.workers, httpx.HTTPError)
        self._start("demo-pricing-api-async", self._async_httpx, url, limits, timeout)

    def _async_httpx(self, url: str, limits: Any, timeout: Any) -> None:
        import httpx

        async def main() -> None:
            async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
                _name(client, "pricing-api-async")
                rng = random.Random()

                async def worker() -> None:
                    while not self.stop.is_set():
                        try:
                            with self.tracer.start_as_current_span("demo pricing-api-async"):
                                (await client.get(url)).raise_for_status()
                        except httpx.HTTPError:
                            self._failed("pricing-api-async")
                        await asyncio.sleep(rng.uniform(*self.scenario.pause))

                await asyncio.gather(*(worker() for _ in range(self.options.workers)))

        asyncio.run(main())

    def dynamodb(self, stack: ExitStack) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        from poolwatch._demo.wsgi import WSGIServer

        # moto's WSGI application under a keep-alive server: moto's own (werkzeug's
        # development server) closes the connection after every response, where real
        # DynamoDB keeps it alive — a healthy boto3 pool would look like it churns.
        server = stack.enter_context(
            WSGIServer(DomainDispatcherApplication(create_backend_app), idle_timeout=30.0)
        )
        client = boto3.client(
            "dynamodb",
            endpoint_url=server.url,
            region_name="eu-west-1",
            aws_access_key_id="demo",  # moto accepts any credentials
            aws_secret_access_key="demo",
            config=Config(max_pool_connections=self.aws_pool, retries={"mode": "standard"}),
        )
        stack.callback(client.close)
        client.create_table(
            TableName="sessions",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        _name(client, "sessions-dynamodb")
        counter = iter(range(10**9))

        def put() -> None:
            client.put_item(TableName="sessions", Item={"id": {"S": str(next(counter))}})

        self.workers(
            "sessions-dynamodb", put, max(2, self.options.workers // 2), BotoCoreError, ClientError
        )

    def cache(self, stack: ExitStack) -> None:
        """``sessions-cache``: redis-py on a throw-away redis-server, when it can run here."""
        import redis

        from poolwatch._demo.redis import RedisError, RedisServer

        s = self.scenario
        try:
            server = stack.enter_context(RedisServer(checkpoint=self.signals.checkpoint))
        except RedisError as error:  # no redis-server on this machine: the demo goes on
            raise ImportError(str(error)) from error
        pool = redis.BlockingConnectionPool.from_url(
            server.url(), max_connections=self.http_pool, timeout=s.http_pool_timeout
        )
        stack.callback(pool.disconnect)
        client = redis.Redis(connection_pool=pool)
        _name(client, "sessions-cache")
        rng = random.Random()

        def touch() -> None:
            # An optimistic transaction: WATCH holds the connection until EXEC, and the
            # work between the read and the write is the scenario's hold time.
            key = f"session:{threading.get_ident()}"
            pipe: Any
            with client.pipeline() as pipe:
                pipe.watch(key)
                seen = int(pipe.get(key) or 0)
                self.stop.wait(rng.uniform(*s.hold))
                pipe.multi()
                pipe.set(key, seen + 1)
                pipe.execute()

        self.workers("sessions-cache", touch, max(2, self.options.workers // 2), redis.RedisError)

    # -- running -----------------------------------------------------------------------
    @contextmanager
    def _upstream(self) -> Iterator[str]:
        if self.options.http_url:
            yield self.options.http_url.rstrip("/") + f"/?delay={self.scenario.http_delay}"
            return
        with ThreadedUpstream(
            delay=self.scenario.http_delay, idle_timeout=self.scenario.idle_timeout
        ) as upstream:
            yield upstream.url + "/"

    def _pools(self, stack: ExitStack, url: str) -> list[str]:
        """Start every pool whose library is installed; the names of those skipped."""
        skipped = []
        starts: list[tuple[str, Callable[[], None]]] = [
            ("sqlalchemy", lambda: self.database(stack)),
            ("psycopg_pool", lambda: self.reports(stack)),
            ("requests", lambda: self.requests_session(stack, url)),
            ("httpx", lambda: self.httpx_clients(stack, url)),
            ("boto3 and moto", lambda: self.dynamodb(stack)),
            ("redis (redis-py and redis-server)", lambda: self.cache(stack)),
        ]
        for library, start in starts:
            self.signals.checkpoint()
            try:
                with self.tracer.start_as_current_span("demo start", attributes={"lib": library}):
                    start()
            except ImportError:
                skipped.append(library)
        return skipped

    def run(self) -> int:
        """Run until ``--duration`` passes, Ctrl-C, SIGTERM or SIGHUP; stop everything started.

        A stop signal is a clean stop at any moment, start-up included (``StopSignals``):
        workers stop, then their pools, servers and the throw-away database.
        """
        with self.signals as signals:
            try:
                return self._run(signals)
            except KeyboardInterrupt:  # before the pools started: nothing of theirs runs
                print("\nstopping…", file=self.out, flush=True)
                return 0

    def _run(self, signals: StopSignals) -> int:
        from poolwatch.cli.table import render

        s = self.scenario
        # The table is the demo's output: keep moto's access log and urllib3's per-discard
        # warnings (which poolwatch counts as pool_full closes) off the terminal.
        for noisy in ("werkzeug", "urllib3.connectionpool"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        # The upstream outlives the stack: workers stop before their servers do.
        with self._upstream() as url:
            signals.checkpoint()
            names = {_origin(url): "inventory-api"} if s.request_per_call else {}
            provider = tracer_provider(os.environ)
            if provider is not None:
                self.tracer = provider.get_tracer("poolwatch.demo")
            handle = poolwatch.instrument(
                prometheus_port=self.options.port,
                leak_threshold=s.leak_threshold,
                pool_names=names,
                tracer_provider=provider,
            )
            try:
                with ExitStack() as stack:
                    try:
                        print("poolwatch demo: starting the pools …", file=sys.stderr, flush=True)
                        skipped = self._pools(stack, url)
                        self._started(handle, skipped)
                        deadline = time.monotonic() + self.options.duration
                        while (left := deadline - time.monotonic()) > 0:
                            if signals.requested.wait(min(1.0, left)):
                                break
                            table = render(sorted(poolwatch.pools(), key=lambda p: p.name))
                            print("\n" + table, file=self.out, flush=True)
                    except KeyboardInterrupt:
                        signals.requested.set()
                    finally:
                        signals.disarm()
                        if signals.requested.is_set():
                            print("\nstopping…", file=self.out, flush=True)
                        self._join()  # workers stop first; then the stack closes their pools
            finally:
                self.stop.set()
                poolwatch.uninstrument()
                if provider is not None:
                    provider.shutdown()  # the last spans
        return 0

    def _started(self, handle: poolwatch.Instrumentation, skipped: list[str]) -> None:
        if handle.prometheus_address:
            host, port = handle.prometheus_address
            print(f"Prometheus metrics on http://{host}:{port}/metrics", file=self.out)
        print(f"scenario {self.options.scenario}: {self.scenario.description}", file=self.out)
        print(f"database: {self.database_label}", file=self.out)
        if skipped:
            print(f"skipped (not installed): {', '.join(skipped)}", file=self.out)

    def _join(self, seconds: float = 15.0) -> None:
        """Stop the workers and wait for them, at most ``seconds`` in all."""
        self.stop.set()
        deadline = time.monotonic() + seconds
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _origin(url: str) -> str:
    """scheme://host:port of a URL: the name poolwatch derives for its HTTP pools."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class StopSignals:
    """SIGTERM and SIGHUP stop the demo as Ctrl-C (SIGINT) does, at any moment.

    A stop signal only sets ``requested``. The main loop waits on it; start-up, a sequence
    of blocking steps (a database to create, servers to start), calls ``checkpoint()``
    between its steps, which raises KeyboardInterrupt there. The handler itself never
    raises: Python runs it between any two bytecodes of the main thread, so an exception
    from it can land in an import's clean-up or a weakref callback, where it is swallowed
    ("Exception ignored in ...") after leaving an import lock held — moto's server thread
    then waits on that lock for ever. A stop during start-up therefore waits for the step
    under way (at most a few seconds: initdb). A signal after ``disarm()`` (the clean-up
    has begun) is ignored so that the clean-up runs to its end. The previous handlers
    come back on exit. Outside the main thread (where Python delivers no signals) it
    does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = threading.Event()
        """Set by the first stop signal."""
        self._ignore = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._ignore:
            self.requested.set()

    def checkpoint(self) -> None:
        """Raise KeyboardInterrupt if a stop was asked for (start-up calls it between steps)."""
        if self.requested.is_set():
            raise KeyboardInterrupt("stop requested")

    def disarm(self) -> None:
        """From now on, stop signals are ignored (the clean-up has begun)."""
        self._ignore = True

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
