"""HTTP pools: the added cost per loopback keep-alive request, and per acquire+release.

Per library — urllib3 ``PoolManager``, requests ``Session``, httpx ``Client`` and
``AsyncClient``, aiohttp ``ClientSession``, a boto3 DynamoDB call against moto — three
variants, timed side by side in this process, round by round in rotated order:

* ``bare`` — no instrumentation;
* ``poolwatch`` — ``poolwatch.instrument()`` with an ``InMemoryMetricReader``, the client
  created after it;
* ``contrib`` — the OpenTelemetry contrib instrumentation of that library
  (``opentelemetry-instrumentation-urllib3``, ``-requests``, ``-httpx``,
  ``-aiohttp-client``, ``-botocore``), with a ``TracerProvider`` whose spans go to an
  in-memory exporter and a ``MeterProvider`` with an in-memory reader: no network, so what
  is measured is the instrumentation's own work.

Each round creates the client, warms it up, then times ``requests`` sequential requests.
The servers run in their own processes on 127.0.0.1 (``poolwatch upstream``, a keep-alive
HTTP/1.1 server, and moto's ``moto_server``), so that they do not share this process's
interpreter lock with the client being measured.

Every round checks that it measured what it claims, or the run fails: ``bare`` that
poolwatch tracked nothing; ``poolwatch`` that ``poolwatch.pools()`` counted one checkout
per request (warm-up included) for the library's ``pool.kind``; ``contrib`` that the
instrumentation finished one span per request.

The acquire+release rows time each pool's own checkout and return, bare and with
poolwatch — the part of a request poolwatch's hooks sit on, without the network:

* urllib3: ``pool._get_conn()`` + ``pool._put_conn()`` on a pool holding a live idle
  connection;
* httpx (httpcore): ``pool.handle_request(request)`` + ``response.close()`` on a
  ``ConnectionPool`` whose one connection answers at once without I/O (a
  ``ConnectionInterface`` of this module's, ``_ReadyConnection``): the pool's queue,
  assignment, wait and release, which carry all three of poolwatch's request hooks;
* aiohttp: ``await connector.connect(req, [], timeout)`` + ``connection.release()`` on a
  ``TCPConnector`` holding a live idle keep-alive connection to the loopback upstream.

Each checks that poolwatch counted every checkout.

On a keep-alive request those hooks are all the poolwatch code that runs (a reused
connection opens and closes nothing; counted with a tracer), and they run on the calling
thread without I/O, so the time they add is the latency poolwatch adds. The last lines
divide it by the bare request's median of the same run: the request rows' own paired
differences carry the network's noise, here ±10% and more, ten times the 1% read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from _common import Summary, heading, interleave, paired_differences, summarize, table, verdict

import poolwatch

TARGET_PCT = 1.0
TARGET_ACQUIRE_US = 1.0
ACQUIRE_ROWS = {
    "urllib3 _get_conn()+_put_conn()": "urllib3 PoolManager",
    "httpx pool handle_request()+close()": "httpx Client",
    "aiohttp connector.connect()+release()": "aiohttp ClientSession",
}
"""Each acquire+release row, and the request row whose keep-alive request runs exactly those
hooks (and no other poolwatch code: a reused connection opens and closes nothing)."""


@dataclass(frozen=True)
class HTTPConfig:
    """Sizes of one run."""

    rounds: int = 9
    requests: int = 300
    warmup: int = 30
    acquire_ops: int = 20_000


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


@contextlib.contextmanager
def _server(args: list[str], port: int) -> Iterator[None]:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port)
        yield
    finally:
        process.terminate()
        process.wait(15)


# -- one request per library -----------------------------------------------------------------


class Library:
    """Makes a client and sends one request with it; knows its contrib instrumentor."""

    name = ""
    kind = ""
    """The ``pool.kind`` poolwatch reports its pools under."""
    contrib = ""
    """``module:Class`` of the contrib instrumentor."""

    def open(self, url: str) -> None:
        raise NotImplementedError

    def request(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def timed(self, count: int, warmup: int, check: Callable[[], None]) -> float:
        """Seconds per request over ``count`` sequential requests, after ``warmup``;
        ``check`` runs once they are done, before the client closes."""
        for _ in range(warmup):
            self.request()
        start = perf_counter()
        for _ in range(count):
            self.request()
        elapsed = perf_counter() - start
        check()
        return elapsed / count


class Urllib3(Library):
    kind = "urllib3"
    name, contrib = (
        "urllib3 PoolManager",
        "opentelemetry.instrumentation.urllib3:URLLib3Instrumentor",
    )

    def open(self, url: str) -> None:
        import urllib3

        self.url, self.client = url, urllib3.PoolManager()

    def request(self) -> None:
        self.client.request("GET", self.url)

    def close(self) -> None:
        self.client.clear()


class Requests(Library):
    kind = "requests"
    name, contrib = (
        "requests Session",
        "opentelemetry.instrumentation.requests:RequestsInstrumentor",
    )

    def open(self, url: str) -> None:
        import requests

        self.url, self.client = url, requests.Session()

    def request(self) -> None:
        self.client.get(self.url)

    def close(self) -> None:
        self.client.close()


class HTTPX(Library):
    kind = "httpx"
    name, contrib = "httpx Client", "opentelemetry.instrumentation.httpx:HTTPXClientInstrumentor"

    def open(self, url: str) -> None:
        import httpx

        self.url, self.client = url, httpx.Client()

    def request(self) -> None:
        self.client.get(self.url)

    def close(self) -> None:
        self.client.close()


class AsyncLibrary(Library):
    """A client on an event loop: the requests are awaited one after another in the loop."""

    def timed(self, count: int, warmup: int, check: Callable[[], None]) -> float:
        async def run() -> float:
            await self.aopen()
            try:
                for _ in range(warmup):
                    await self.arequest()
                start = perf_counter()
                for _ in range(count):
                    await self.arequest()
                elapsed = perf_counter() - start
                check()
                return elapsed / count
            finally:
                await self.aclose()

        return asyncio.run(run())

    def open(self, url: str) -> None:
        self.url = url

    def close(self) -> None:
        pass

    async def aopen(self) -> None:
        raise NotImplementedError

    async def arequest(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class HTTPXAsync(AsyncLibrary):
    kind = "httpx"
    name, contrib = (
        "httpx AsyncClient",
        "opentelemetry.instrumentation.httpx:HTTPXClientInstrumentor",
    )

    async def aopen(self) -> None:
        import httpx

        self.client = httpx.AsyncClient()

    async def arequest(self) -> None:
        await self.client.get(self.url)

    async def aclose(self) -> None:
        await self.client.aclose()


class Aiohttp(AsyncLibrary):
    kind = "aiohttp"
    name, contrib = (
        "aiohttp ClientSession",
        "opentelemetry.instrumentation.aiohttp_client:AioHttpClientInstrumentor",
    )

    async def aopen(self) -> None:
        import aiohttp

        self.client = aiohttp.ClientSession()

    async def arequest(self) -> None:
        async with self.client.get(self.url) as response:
            await response.read()

    async def aclose(self) -> None:
        await self.client.close()


class Boto3(Library):
    kind = "botocore"
    name, contrib = (
        "boto3 DynamoDB (moto)",
        "opentelemetry.instrumentation.botocore:BotocoreInstrumentor",
    )

    def open(self, url: str) -> None:
        import boto3

        self.client = boto3.client(
            "dynamodb",
            endpoint_url=url,
            region_name="eu-west-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )

    def request(self) -> None:
        self.client.list_tables()

    def close(self) -> None:
        self.client.close()


# -- variants ----------------------------------------------------------------------------------


def _instrumentor(spec: str) -> Any:
    module, _, cls = spec.partition(":")
    imported = __import__(module, fromlist=[cls])
    return getattr(imported, cls)()


def _contrib_refusal(library: Library) -> str | None:
    try:
        _instrumentor(library.contrib)
    except Exception as error:
        return f"{library.contrib.split(':')[0]} not usable: {error}"
    return None


class MeasurementError(RuntimeError):
    """A variant did not measure what it claims (nothing counted, nothing traced)."""


def checkouts_of(kind: str) -> int:
    """Checkouts poolwatch counted for pools of ``kind``, over every live series."""
    return sum(s.checkouts for s in poolwatch.pools() if s.kind == kind)


def _checker(
    library: Library, variant: str, expected: int, spans: Any | None
) -> Callable[[], None]:
    """What ``variant`` must have seen once ``expected`` requests are done."""

    def check() -> None:
        if variant == "bare":
            tracked = poolwatch.pools()
            if tracked:
                raise MeasurementError(f"{library.name} bare: poolwatch tracked {tracked}")
        elif variant == "poolwatch":
            counted = checkouts_of(library.kind)
            if counted != expected:
                raise MeasurementError(
                    f"{library.name} poolwatch: {counted} checkouts of kind "
                    f"{library.kind!r} counted for {expected} requests"
                )
        else:
            finished = len(spans.get_finished_spans()) if spans is not None else 0
            if finished != expected:
                raise MeasurementError(
                    f"{library.name} contrib: {finished} spans for {expected} requests"
                )

    return check


def _round(library: Library, url: str, variant: str, config: HTTPConfig) -> float:
    """Microseconds per request for one round of ``variant``."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrumentor = None
    spans = None
    if variant == "poolwatch":
        poolwatch.instrument(meter_provider=meters)
    elif variant == "contrib":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        tracer = TracerProvider()
        spans = InMemorySpanExporter()
        tracer.add_span_processor(SimpleSpanProcessor(spans))
        instrumentor = _instrumentor(library.contrib)
        instrumentor.instrument(tracer_provider=tracer, meter_provider=meters)
    check = _checker(library, variant, config.warmup + config.requests, spans)
    try:
        library.open(url)
        try:
            return library.timed(config.requests, config.warmup, check) * 1e6
        finally:
            library.close()
    finally:
        if instrumentor is not None:
            instrumentor.uninstrument()
        poolwatch.uninstrument()
        meters.shutdown()


def _runner(library: Library, url: str, variant: str, config: HTTPConfig) -> Callable[[], float]:
    return lambda: _round(library, url, variant, config)


@dataclass(frozen=True)
class LibraryResult:
    """One library's medians and added costs."""

    name: str
    per_request: dict[str, Summary]
    added: dict[str, Summary]
    refusal: str | None


def run_library(library: Library, url: str, config: HTTPConfig) -> LibraryResult:
    """Every variant of one library, interleaved round by round."""
    refusal = _contrib_refusal(library)
    names = ["bare", "poolwatch"] + ([] if refusal else ["contrib"])
    runs: dict[str, Callable[[], float]] = {
        name: _runner(library, url, name, config) for name in names
    }
    samples = interleave(runs, config.rounds)
    added = {
        name: summarize(paired_differences(values, samples["bare"]))
        for name, values in samples.items()
        if name != "bare"
    }
    return LibraryResult(
        library.name, {n: summarize(v) for n, v in samples.items()}, added, refusal
    )


def _instrumented(variant: str) -> None:
    if variant == "poolwatch":
        from opentelemetry.sdk.metrics import MeterProvider

        poolwatch.instrument(meter_provider=MeterProvider())


def _counted(label: str, variant: str, kind: str, expected: int) -> None:
    """An acquire+release round checks what poolwatch counted (nothing, when bare)."""
    counted = checkouts_of(kind)
    wanted = expected if variant == "poolwatch" else 0
    if counted != wanted:
        raise MeasurementError(
            f"{label} {variant}: {counted} checkouts counted for {expected} acquire+release"
        )


def _acquire_urllib3(url: str, variant: str, ops: int) -> float:
    """µs per urllib3 ``_get_conn()`` + ``_put_conn()`` with a live idle connection."""
    import urllib3

    _instrumented(variant)
    try:
        host, port = url.split("//", 1)[1].rstrip("/").split(":")
        pool = urllib3.HTTPConnectionPool(host, int(port), maxsize=1)
        pool.request("GET", "/")  # one live idle connection in the queue
        start = perf_counter()
        for _ in range(ops):
            pool._put_conn(pool._get_conn())
        elapsed = (perf_counter() - start) / ops * 1e6
        _counted("urllib3", variant, "urllib3", ops + 1)
        pool.close()
        return elapsed
    finally:
        poolwatch.uninstrument()


class _ReadyConnection:
    """An httpcore connection that is always ready and answers at once, without I/O: what
    is left of a request is the pool's own checkout and return (it implements httpcore's
    ``ConnectionInterface``)."""

    def __init__(self, origin: Any) -> None:
        self._origin = origin

    def handle_request(self, request: Any) -> Any:
        import httpcore

        return httpcore.Response(200, content=b"")

    def can_handle_request(self, origin: Any) -> bool:
        return bool(origin == self._origin)

    def is_available(self) -> bool:
        return True

    def has_expired(self) -> bool:
        return False

    def is_idle(self) -> bool:
        return True

    def is_closed(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def info(self) -> str:
        return "ready"


def _acquire_httpx(variant: str, ops: int) -> float:
    """µs per httpcore ``ConnectionPool.handle_request()`` + ``Response.close()`` on a
    pool whose connection answers at once."""
    import httpcore
    import httpx  # noqa: F401  (poolwatch hooks httpcore when httpx is imported)

    class ReadyPool(httpcore.ConnectionPool):
        def create_connection(self, origin: Any) -> Any:
            return _ReadyConnection(origin)

    _instrumented(variant)
    try:
        pool = ReadyPool()
        request = httpcore.Request("GET", "http://127.0.0.1:9/")  # never sent anywhere
        pool.handle_request(request).close()  # its one connection exists
        start = perf_counter()
        for _ in range(ops):
            pool.handle_request(request).close()
        elapsed = (perf_counter() - start) / ops * 1e6
        _counted("httpx", variant, "httpx", ops + 1)
        pool.close()
        return elapsed
    finally:
        poolwatch.uninstrument()


def _acquire_aiohttp(url: str, variant: str, ops: int) -> float:
    """µs per aiohttp ``connector.connect()`` + ``Connection.release()`` with a live idle
    keep-alive connection."""
    import aiohttp
    from aiohttp.client_reqrep import ClientRequest
    from yarl import URL

    async def run() -> float:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:  # one live idle connection
                await response.read()
            connector = session.connector
            assert connector is not None
            loop = asyncio.get_running_loop()
            request = ClientRequest("GET", URL(url), loop=loop)
            timeout = aiohttp.ClientTimeout()
            start = perf_counter()
            for _ in range(ops):
                connection = await connector.connect(request, [], timeout)
                connection.release()
            elapsed = (perf_counter() - start) / ops * 1e6
            _counted("aiohttp", variant, "aiohttp", ops + 1)
            return elapsed

    _instrumented(variant)
    try:
        return asyncio.run(run())
    finally:
        poolwatch.uninstrument()


def run_acquire(url: str, config: HTTPConfig) -> dict[str, dict[str, Summary]]:
    """Per library, µs per acquire+release bare and with poolwatch, and what it adds."""
    ops = config.acquire_ops
    urllib3_row, httpx_row, aiohttp_row = ACQUIRE_ROWS
    cases: dict[str, Callable[[str], float]] = {
        urllib3_row: lambda v: _acquire_urllib3(url, v, ops),
        httpx_row: lambda v: _acquire_httpx(v, ops),
        aiohttp_row: lambda v: _acquire_aiohttp(url, v, ops),
    }
    results: dict[str, dict[str, Summary]] = {}
    for label, one in cases.items():
        runs = {variant: functools.partial(one, variant) for variant in ("bare", "poolwatch")}
        samples = interleave(runs, config.rounds)
        result = {name: summarize(values) for name, values in samples.items()}
        result["added"] = summarize(paired_differences(samples["poolwatch"], samples["bare"]))
        results[label] = result
    return results


def run_http(
    config: HTTPConfig,
) -> tuple[list[LibraryResult], dict[str, dict[str, Summary]]]:
    """Start the servers, then measure every library and the acquire+release row."""
    http_port, moto_port = _free_port(), _free_port()
    upstream = [sys.executable, "-m", "poolwatch", "upstream", "--port", str(http_port)]
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if moto is None:
        raise RuntimeError("moto_server not found: the benchmark environment installs moto")
    url, moto_url = f"http://127.0.0.1:{http_port}/", f"http://127.0.0.1:{moto_port}"
    results = []
    with (
        _server(upstream, http_port),
        _server([moto, "-H", "127.0.0.1", "-p", str(moto_port)], moto_port),
    ):
        for library in (Urllib3(), Requests(), HTTPX(), HTTPXAsync(), Aiohttp()):
            results.append(run_library(library, url, config))
        results.append(run_library(Boto3(), moto_url, config))
        acquire = run_acquire(url.rstrip("/"), config)
    return results, acquire


def render_http(
    results: list[LibraryResult], acquire: dict[str, dict[str, Summary]], config: HTTPConfig
) -> str:
    """The per-request table, the acquire+release row, and the verdicts."""
    rows = []
    for r in results:
        bare = r.per_request["bare"].median
        for variant, summary in r.per_request.items():
            added = "-"
            if variant != "bare":
                a = r.added[variant].median
                added = f"{a:+.1f} µs ({a / bare * 100:+.2f}%)"
            rows.append(
                [
                    r.name if variant == "bare" else "",
                    variant,
                    f"{summary.median:.1f}",
                    summary.spread(1),
                    added,
                ]
            )
    lines = [
        heading("HTTP pools: one loopback keep-alive request, sequential"),
        f"{config.rounds} interleaved rounds x {config.requests} requests (after {config.warmup} "
        "warm-up); servers in their own processes; added = median of per-round paired differences",
        table(["library", "variant", "median µs", "IQR µs", "added over bare"], rows),
        "",
    ]
    for r in results:
        pct = r.added["poolwatch"].median / r.per_request["bare"].median * 100
        met = verdict(pct <= TARGET_PCT)
        line = (
            f"{r.name}: poolwatch adds {pct:+.2f}% per request (target <= {TARGET_PCT:.0f}%): {met}"
        )
        if "contrib" in r.added:
            ratio = r.added["contrib"].median / max(r.added["poolwatch"].median, 1e-9)
            line += f"; contrib adds {r.added['contrib'].median:.1f} µs"
            line += f" ({ratio:.0f}x poolwatch's)" if r.added["poolwatch"].median > 0 else ""
        elif r.refusal:
            line += f"; contrib skipped: {r.refusal}"
        lines.append(line)
    lines.append("")
    requests = {r.name: r.per_request["bare"].median for r in results}
    for label, row in acquire.items():
        added = row["added"].median
        lines.append(
            f"{label}: bare {row['bare'].median:.2f} µs, with poolwatch "
            f"{row['poolwatch'].median:.2f} µs: poolwatch adds {added:.2f} µs per "
            f"acquire+release (target <= {TARGET_ACQUIRE_US:.0f} µs): "
            f"{verdict(added <= TARGET_ACQUIRE_US)}"
        )
    lines.append("")
    lines.append(
        "added latency = the hooks' µs per acquire+release (no noise from the network) / "
        "the bare request's median µs:"
    )
    for label, row in acquire.items():
        request = requests.get(ACQUIRE_ROWS[label])
        if request is None:
            continue
        pct = row["added"].median / request * 100
        lines.append(
            f"{ACQUIRE_ROWS[label]}: {row['added'].median:.2f} / {request:.1f} µs = "
            f"{pct:+.2f}% per request (target <= {TARGET_PCT:.0f}%): {verdict(pct <= TARGET_PCT)}"
        )
    return "\n".join(lines)
