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

Those rows time the hooks in a tight loop, where their code and data stay in the processor's
caches; inside a real request they run among the library's own work, which has evicted
them, and cost several times as much (docs/performance.md has both). The in-situ
measurement reads that cost where it is paid: one client per library, instrumented from
the start, sends pairs of blocks of ``in_situ_block`` requests — up to ``in_situ_pairs``
pairs, or as many as ``in_situ_seconds`` allow — and in one block of each pair poolwatch's
hooks are switched off (``HookSwitch`` puts back the library functions poolwatch
replaced), in the other they are on, in a seeded random order. Neighbours in time share
the machine's state, so its drift cancels in each pair's difference; the median of the
pairs' differences, with a distribution-free 95% interval, is what the hooks add to a
request in that process. The first request after each switch is sent but not timed
(changing a class's attributes empties the interpreter's caches of it once). The check:
poolwatch counted exactly the warm-up and the requests of the blocks with the hooks on.

One process is one draw of where CPython put the objects involved, and that moves the
same hooks' cost by a factor of two (``benchmarks/in_situ.py``): so each library is read
in ``in_situ_layouts`` processes, each laid out in memory by a seed of its own, one after
another. The verdict is taken from the median layout's reading, with the layouts' lowest
and highest as its interval (distribution-free: with six layouts, 97% for the median of
what an application's process may meet).

Each block is read two ways: the latency (its median request, by the wall clock) and the
client thread's CPU time per request (``time.thread_time()`` over the block). The hooks are
synchronous code on the request's path that takes no lock and does no I/O, so what they
add to a request's latency is the time they run on that thread: the CPU reading measures
the same quantity without the waits for a core that other processes on a shared machine
add to the wall clock at random, and its interval is usually the narrower one.

The request rows' own paired differences (bare against poolwatch, round by round) carry
the rounds' noise, several % of a request on this machine: they show the contrib
instrumentations' cost, which is tens of times larger, but cannot read a 1% budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter, thread_time
from typing import Any

from _common import (
    Summary,
    heading,
    interleave,
    median_interval,
    paired_differences,
    summarize,
    table,
    verdict,
)

import poolwatch

TARGET_PCT = 1.0
TARGET_ACQUIRE_US = 1.0


@dataclass(frozen=True)
class HTTPConfig:
    """Sizes of one run."""

    rounds: int = 9
    requests: int = 300
    warmup: int = 30
    acquire_ops: int = 20_000
    acquire_rounds: int = 31
    """Interleaved rounds of each acquire+release row: httpx's bare row moves by more than
    1 µs from round to round, so its paired median needs more rounds than a request's."""
    in_situ_layouts: int = 6
    """In-situ processes per library, each with a memory layout of its own
    (``benchmarks/in_situ.py``): where CPython puts the library's and poolwatch's objects
    moves what the same hooks cost by a factor of two, so one process is one draw."""
    in_situ_pairs: int = 800
    """At most this many pairs of blocks (hooks on, hooks off) per layout..."""
    in_situ_seconds: float = 50.0
    """...or as many as fit in this many seconds (whichever ends first)."""
    in_situ_block: int = 20
    """Timed requests per block (after the one dropped at each switch)."""


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


@dataclass(frozen=True)
class Block:
    """One in-situ block of requests."""

    median: float
    """Median seconds of a request (wall clock)."""
    cpu: float
    """Seconds of the client thread's CPU time per request (the block's total / its size)."""


def _paced(plan: list[bool], seconds: float) -> Iterator[bool]:
    """The entries of ``plan``, ending early at the end of a pair once ``seconds`` have
    passed (a pair is two entries: the hooks on in one, off in the other)."""
    deadline = perf_counter() + seconds
    for i, hooked in enumerate(plan):
        if i % 2 == 0 and perf_counter() > deadline:
            return
        yield hooked


class Library:
    """Makes a client and sends one request with it; knows its contrib instrumentor."""

    key = ""
    """How ``benchmarks/in_situ.py`` names it (``LIBRARIES``)."""
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

    def blocks(
        self,
        plan: list[bool],
        switch: Callable[[bool], None],
        size: int,
        warmup: int,
        seconds: float,
    ) -> list[Block]:
        """After ``warmup`` requests, one ``Block`` per entry of ``plan`` (True: hooks on),
        until the plan ends or, at the end of a pair, ``seconds`` have passed; the first
        request after each ``switch`` is not timed."""
        for _ in range(warmup):
            self.request()
        blocks: list[Block] = []
        for hooked in _paced(plan, seconds):
            switch(hooked)
            self.request()
            times = []
            cpu = thread_time()
            for _ in range(size):
                start = perf_counter()
                self.request()
                times.append(perf_counter() - start)
            cpu = thread_time() - cpu
            blocks.append(Block(statistics.median(times), cpu / size))
        return blocks


class Urllib3(Library):
    key = "urllib3"
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
    key = "requests"
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
    key = "httpx"
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

    def blocks(
        self,
        plan: list[bool],
        switch: Callable[[bool], None],
        size: int,
        warmup: int,
        seconds: float,
    ) -> list[Block]:
        async def run() -> list[Block]:
            await self.aopen()
            try:
                for _ in range(warmup):
                    await self.arequest()
                blocks: list[Block] = []
                for hooked in _paced(plan, seconds):
                    switch(hooked)
                    await self.arequest()
                    times = []
                    cpu = thread_time()
                    for _ in range(size):
                        start = perf_counter()
                        await self.arequest()
                        times.append(perf_counter() - start)
                    cpu = thread_time() - cpu
                    blocks.append(Block(statistics.median(times), cpu / size))
                return blocks
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
    key = "httpx-async"
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
    key = "aiohttp"
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
    key = "boto3"
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


# -- in situ: the hooks switched off and on inside one instrumented client ----------------


class HookSwitch:
    """Turns poolwatch's hooks off and on again in a running, instrumented process.

    Off puts back the library functions poolwatch replaced (each adapter's record of what
    it patched, read from poolwatch's private state: a benchmark may, the application
    never needs to); on puts poolwatch's hooks back. Everything else stays as it is — the
    pools' ledgers, poolwatch's thread, the meter provider — so the two states differ only
    by the code a request runs. The record is read at the first switch, once the client's
    first requests have imported the library and activated its adapter.
    """

    def __init__(self) -> None:
        self._states: dict[bool, list[tuple[Any, str, Any]]] = {}

    def __call__(self, hooked: bool) -> None:
        if not self._states:
            self._states = _hook_states()
        for owner, attribute, value in self._states[hooked]:
            setattr(owner, attribute, value)


def _hook_states() -> dict[bool, list[tuple[Any, str, Any]]]:
    from poolwatch import _api

    current = _api._current
    if current is None:
        raise MeasurementError("in situ: poolwatch is not instrumented")
    on, off = [], []
    for adapter in current._active.values():
        for owner, attribute, original in getattr(adapter, "_patches", ()):
            if isinstance(original, (types.FunctionType, classmethod, staticmethod)):
                on.append((owner, attribute, owner.__dict__[attribute]))
                off.append((owner, attribute, original))
            elif not attribute.startswith("_poolwatch"):
                # Something else replaced (an inherited function?): "off" would not be bare.
                raise MeasurementError(f"in situ: cannot switch {owner.__name__}.{attribute}")
            # Otherwise a mark or class default poolwatch added: it stays, read by no one.
    if not on:
        raise MeasurementError("in situ: no patched library function found to switch")
    return {True: on, False: off}


@dataclass(frozen=True)
class LayoutReading:
    """The in-situ reading of one process: block medians with the hooks off and on."""

    seed: int
    """The seed of its memory layout (``benchmarks/in_situ.py``)."""
    pairs: int
    """Pairs of blocks measured."""
    bare: float
    """Median µs of a request with the hooks off (the median of the off blocks' medians)."""
    added: tuple[float, float, float]
    """Median µs the hooks add to a request's latency (of the paired block differences),
    and its 95% interval."""
    cpu: tuple[float, float, float]
    """Median µs of the client thread's CPU time the hooks add per request (of the paired
    block differences), and its 95% interval."""


@dataclass(frozen=True)
class InSituResult:
    """One library's in-situ readings, one per memory layout."""

    name: str
    layouts: list[LayoutReading]

    @property
    def pairs(self) -> int:
        return sum(r.pairs for r in self.layouts)

    @property
    def bare(self) -> float:
        """Median µs of a request with the hooks off, over the layouts."""
        return statistics.median(r.bare for r in self.layouts)

    def reading(
        self, value: Callable[[LayoutReading], tuple[float, float, float]]
    ) -> tuple[float, float, float]:
        """The median over the layouts of their medians, and the layouts' lowest and highest:
        with six layouts, a distribution-free interval of 97% for the median layout."""
        medians = [value(r)[0] for r in self.layouts]
        return statistics.median(medians), min(medians), max(medians)

    @property
    def cpu(self) -> tuple[float, float, float]:
        return self.reading(lambda r: r.cpu)

    @property
    def added(self) -> tuple[float, float, float]:
        return self.reading(lambda r: r.added)


def measure_layout(library: Library, url: str, config: HTTPConfig, seed: int) -> LayoutReading:
    """One process's reading (run by ``benchmarks/in_situ.py``, in a process of its own):
    pairs of blocks (up to ``in_situ_pairs``, within ``in_situ_seconds``), hooks on and off
    in a seeded random order."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    order = random.Random(f"{library.name}/{seed}")
    plan: list[bool] = []
    for _ in range(config.in_situ_pairs):
        first = order.random() < 0.5
        plan += [first, not first]
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    switch = HookSwitch()
    poolwatch.instrument(meter_provider=meters)
    try:
        library.open(url)
        try:
            blocks = library.blocks(
                plan, switch, config.in_situ_block, config.warmup, config.in_situ_seconds
            )
        finally:
            library.close()
        switch(True)
        pairs = len(blocks) // 2
        expected = config.warmup + pairs * (config.in_situ_block + 1)
        counted = checkouts_of(library.kind)
        if counted != expected:
            raise MeasurementError(
                f"{library.name} in situ: {counted} checkouts counted for {expected} requests "
                "with the hooks on"
            )
    finally:
        poolwatch.uninstrument()
        meters.shutdown()
    # Each pair holds one block of each, so the i-th on and off blocks are pair i's.
    done = plan[: len(blocks)]
    on = [b for b, hooked in zip(blocks, done, strict=True) if hooked]
    off = [b for b, hooked in zip(blocks, done, strict=True) if not hooked]

    def added(value: Callable[[Block], float]) -> tuple[float, float, float]:
        pairs = paired_differences([value(b) * 1e6 for b in on], [value(b) * 1e6 for b in off])
        return median_interval(pairs)

    return LayoutReading(
        seed,
        pairs,
        statistics.median(b.median * 1e6 for b in off),
        added(lambda b: b.median),
        added(lambda b: b.cpu),
    )


def run_in_situ(library: Library, url: str, config: HTTPConfig) -> InSituResult:
    """``in_situ_layouts`` readings of ``library``, each in a new process laid out by its own
    seed (``benchmarks/in_situ.py``), one after another."""
    child = Path(__file__).with_name("in_situ.py")
    config_json = json.dumps(dataclasses.asdict(config))
    layouts = []
    for seed in range(1, config.in_situ_layouts + 1):
        command = [sys.executable, str(child), library.key, url, config_json, str(seed)]
        # The hash seed too: it orders the dicts and sets of everything the process builds.
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        timeout = config.in_situ_seconds * 3 + 120
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise MeasurementError(f"{library.name} in situ, layout {seed}:\n{done.stderr[-3000:]}")
        fields = json.loads(done.stdout.strip().splitlines()[-1])
        fields["added"], fields["cpu"] = tuple(fields["added"]), tuple(fields["cpu"])
        layouts.append(LayoutReading(**fields))
    return InSituResult(library.name, layouts)


def _interval_verdict(low_pct: float, high_pct: float) -> str:
    """MET or NOT MET only when the whole interval is on one side of the target."""
    if high_pct <= TARGET_PCT:
        return verdict(True)
    if low_pct > TARGET_PCT:
        return verdict(False)
    return "UNDECIDED"


def render_in_situ(
    results: list[InSituResult],
    config: HTTPConfig,
    title: str = "HTTP pools: added latency per request, in situ",
) -> str:
    """The in-situ tables and their verdicts: added latency, added CPU time."""

    Value = Callable[[LayoutReading], tuple[float, float, float]]

    def rows(reading: Value) -> list[list[str]]:
        out = []
        for r in results:
            median, low, high = r.reading(reading)
            layouts = " ".join(f"{reading(layout)[0] / r.bare * 100:+.2f}" for layout in r.layouts)
            out.append(
                [
                    r.name,
                    str(r.pairs),
                    f"{r.bare:.1f}",
                    f"{median:+.2f}",
                    f"{median / r.bare * 100:+.2f}%",
                    f"{low / r.bare * 100:+.2f}% .. {high / r.bare * 100:+.2f}%",
                    layouts,
                    _interval_verdict(low / r.bare * 100, high / r.bare * 100),
                ]
            )
        return out

    def within(reading: Value) -> str:
        """How far each layout's own 95% interval reaches, against the spread between them."""
        reach = [
            max(m - low, high - m) / r.bare * 100
            for r in results
            for m, low, high in map(reading, r.layouts)
        ]
        return (
            f"each layout's own 95% interval reaches ±{min(reach):.2f} to ±{max(reach):.2f} "
            "points from its median"
        )

    processes = config.in_situ_layouts
    coverage = 1 - 2 * 0.5**processes  # the chance that the median lies between min and max
    headers = [
        "library",
        "pairs",
        "bare µs",
        "added µs",
        "added",
        "layouts' range",
        "each layout, % (in seed order)",
        "target",
    ]
    return "\n".join(
        [
            heading(title),
            f"one client per library, instrumented throughout, in {processes} "
            "processes each laid out in memory by a seed of its own (benchmarks/in_situ.py);",
            f"in each, pairs of blocks of {config.in_situ_block} requests (up to "
            f"{config.in_situ_pairs}, or {config.in_situ_seconds:.0f} s), poolwatch's hooks "
            "off in one and on in the other, in random order, and the median of the pairs' "
            "differences;",
            "added = the median layout's, as a share of the bare request's median latency; "
            f"target <= {TARGET_PCT:.0f}%: MET when every layout is below it (with {processes}, "
            f"a {coverage:.0%} distribution-free interval for the median layout),",
            "NOT MET when every layout is above it, UNDECIDED otherwise",
            "",
            "the verdict: CPU time of the client thread per request, which the hooks' "
            "synchronous work adds to the latency one for one",
            "and which the machine's other processes do not inflate (waits for a core):",
            table(headers, rows(lambda r: r.cpu)),
            within(lambda r: r.cpu),
            "",
            "the same blocks by the wall clock (their median requests), where waiting added "
            "by poolwatch would show:",
            table(headers, rows(lambda r: r.added)),
            within(lambda r: r.added),
        ]
    )


class Redis(Library):
    """redis-py: one ``PING`` round trip on a ``Redis`` client (its pool's checkout and
    return inside), against a loopback redis-server (``bench_redis.py``)."""

    key = "redis"
    kind = "redis"
    name, contrib = "redis-py Redis PING", "opentelemetry.instrumentation.redis:RedisInstrumentor"

    def open(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)

    def request(self) -> None:
        self.client.ping()

    def close(self) -> None:
        self.client.close()


class RedisAsync(AsyncLibrary):
    key = "redis-async"
    kind = "redis"
    name, contrib = (
        "redis-py asyncio Redis PING",
        "opentelemetry.instrumentation.redis:RedisInstrumentor",
    )

    async def aopen(self) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(self.url)

    async def arequest(self) -> None:
        await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()


LIBRARIES: dict[str, type[Library]] = {
    library.key: library
    for library in (Urllib3, Requests, HTTPX, HTTPXAsync, Aiohttp, Boto3, Redis, RedisAsync)
}
"""The libraries, by the key ``benchmarks/in_situ.py`` is given."""


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
    cases: dict[str, Callable[[str], float]] = {
        "urllib3 _get_conn()+_put_conn()": lambda v: _acquire_urllib3(url, v, ops),
        "httpx pool handle_request()+close()": lambda v: _acquire_httpx(v, ops),
        "aiohttp connector.connect()+release()": lambda v: _acquire_aiohttp(url, v, ops),
    }
    results: dict[str, dict[str, Summary]] = {}
    for label, one in cases.items():
        runs = {variant: functools.partial(one, variant) for variant in ("bare", "poolwatch")}
        samples = interleave(runs, config.acquire_rounds)
        result = {name: summarize(values) for name, values in samples.items()}
        result["added"] = summarize(paired_differences(samples["poolwatch"], samples["bare"]))
        results[label] = result
    return results


@dataclass(frozen=True)
class HTTPResults:
    """Everything the section measured."""

    requests: list[LibraryResult]
    acquire: dict[str, dict[str, Summary]]
    in_situ: list[InSituResult]


def run_http(config: HTTPConfig) -> HTTPResults:
    """Start the servers, then measure every library, the acquire+release rows and the
    in-situ added latency."""
    http_port, moto_port = _free_port(), _free_port()
    upstream = [sys.executable, "-m", "poolwatch", "upstream", "--port", str(http_port)]
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if moto is None:
        raise RuntimeError("moto_server not found: the benchmark environment installs moto")
    url, moto_url = f"http://127.0.0.1:{http_port}/", f"http://127.0.0.1:{moto_port}"
    results = []
    in_situ = []
    libraries: list[tuple[Library, str]] = [
        (Urllib3(), url),
        (Requests(), url),
        (HTTPX(), url),
        (HTTPXAsync(), url),
        (Aiohttp(), url),
        (Boto3(), moto_url),
    ]
    with (
        _server(upstream, http_port),
        _server([moto, "-H", "127.0.0.1", "-p", str(moto_port)], moto_port),
    ):
        for library, target in libraries:
            results.append(run_library(library, target, config))
        acquire = run_acquire(url.rstrip("/"), config)
        for library, target in libraries:
            in_situ.append(run_in_situ(library, target, config))
    return HTTPResults(results, acquire, in_situ)


def render_http(measured: HTTPResults, config: HTTPConfig) -> str:
    """The per-request table, the acquire+release rows, the in-situ table, the verdicts."""
    rows = []
    for r in measured.requests:
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
        "(round-to-round noise here is several % of a request: poolwatch's share is read in situ,"
        " below)",
        table(["library", "variant", "median µs", "IQR µs", "added over bare"], rows),
        "",
    ]
    in_situ = {r.name: r.cpu[0] for r in measured.in_situ}
    for r in measured.requests:
        # The rounds' own poolwatch row is noise at this size (see the in-situ table).
        if "contrib" in r.added:
            contrib = r.added["contrib"].median
            line = f"{r.name}: contrib adds {contrib:.1f} µs per request"
            ours = in_situ.get(r.name)
            if ours is not None and ours > 0 and contrib > 0:
                line += (
                    f", {contrib / ours:.0f}x what poolwatch adds in situ ({ours:.2f} µs of CPU)"
                )
        else:
            line = f"{r.name}: contrib skipped: {r.refusal}"
        lines.append(line)
    lines.append("")
    lines.append(
        f"acquire+release: {config.acquire_rounds} interleaved rounds x {config.acquire_ops} ops;"
        " added = median of per-round paired differences"
    )
    for label, row in measured.acquire.items():
        added = row["added"].median
        lines.append(
            f"{label}: bare {row['bare'].median:.2f} µs, with poolwatch "
            f"{row['poolwatch'].median:.2f} µs: poolwatch adds {added:.2f} µs per "
            f"acquire+release (target <= {TARGET_ACQUIRE_US:.0f} µs): "
            f"{verdict(added <= TARGET_ACQUIRE_US)}"
        )
    lines.append(render_in_situ(measured.in_situ, config))
    return "\n".join(lines)
