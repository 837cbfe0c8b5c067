"""The soak: the ground-truth suite's workloads for minutes, every figure checked.

    python benchmarks/soak.py --minutes 5 [--seed N] [--no-boto3] [--no-tracemalloc]

One process, poolwatch instrumented once into a MeterProvider with two readers (one
cumulative, one preferring DELTA for every instrument kind), a thread collecting from both
every 50 ms, and every collection checked as tests/support/truth.py checks them (counters
never decrease, start times never change, no delta is negative, a delta starts where the
previous one ended). Meanwhile, until the time is up, on loopback servers started here:

* SQLAlchemy (SQLite file): an engine shared by 4 threads (a pool of 2 + 1 overflow, a
  50 ms pool timeout: some callers time out; invalidations), and an engine per call;
* requests: a Session shared by 3 threads (``pool_maxsize=2``: discards), and
  ``requests.get()`` per call;
* urllib3: a ``block=True`` pool of 2 shared by 3 threads, with a 10 ms pool timeout;
* httpx: a Client shared by 3 threads (3 connections: httpcore's pool is unreliable once
  requests queue, encode/httpcore#1110), and a Client per call;
* aiohttp: a session shared by 6 tasks (limit 3: tasks queue), and a session per call;
* boto3 against moto's server: an S3 client shared by 2 threads, and a client per call.

Every 10 s it samples the process's resident memory (``/proc/self/statm``) and, unless
``--no-tracemalloc``, the memory Python has allocated (``tracemalloc``); growth is read
from the end of the first minute (warm-up: caches, imports) to the end. At the end the
workloads stop, both readers collect once more, and each shared pool's checkouts and pool
timeouts are compared with what its workload counted (the per-call series are shown
beside their call counts; issue 18 item 1 drops and remakes them). It reports
``handle.errors``, every violation by kind, and exits 1 if anything is wrong.

Bounded: at most 60 minutes; every thread and server it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402  (after the repository is on the path)
import httpx  # noqa: E402
import requests  # noqa: E402
import sqlalchemy as sa  # noqa: E402
import urllib3  # noqa: E402

import poolwatch  # noqa: E402
from tests.support.truth import (  # noqa: E402
    Collection,
    CountingAsyncUpstream,
    CountingUpstream,
    Racing,
    Readers,
    Seeded,
    Tally,
    figures,
)

MAX_MINUTES = 60.0
SAMPLE_EVERY = 10.0
"""Seconds between two memory samples."""
WARM_UP = 60.0
"""Seconds before the first sample growth is read from (imports, caches, first pools)."""
COLLECT_EVERY = 0.05
"""Seconds between two collections of the racing collector."""


@dataclass
class Sample:
    at: float
    """Seconds since the workloads started."""
    rss: int
    traced: int | None
    collections: int


@dataclass
class Soak:
    seconds: float
    rng: Seeded
    stop: threading.Event = field(default_factory=threading.Event)
    tally: Tally = field(default_factory=Tally)
    """What the workloads counted, by ``<series>.<what>``."""
    errors: list[str] = field(default_factory=list)
    """Exceptions a workload did not expect."""

    def unexpected(self, where: str, error: BaseException) -> None:
        if len(self.errors) < 20:
            self.errors.append(f"{where}: {type(error).__name__}: {error}")

    def loop(self, where: str, step: Callable[[random.Random], None], seed: int) -> None:
        """Run ``step`` until the soak stops; pace it so no loop hogs the two cores."""
        r = random.Random(self.rng.seed_value * 1000 + seed)
        while not self.stop.is_set():
            try:
                step(r)
            except Exception as error:
                self.unexpected(where, error)
            self.stop.wait(r.random() * 0.004)


# -- the workloads ------------------------------------------------------------------------------
def sqlalchemy_workloads(soak: Soak, directory: Path) -> list[Callable[[], None]]:
    url = f"sqlite:///{directory}/soak.db"
    shared = sa.create_engine(url, pool_size=2, max_overflow=1, pool_timeout=0.05)
    poolwatch.track(shared, name="soak-sqlalchemy")

    def use(r: random.Random) -> None:
        try:
            conn = shared.connect()
        except sa.exc.TimeoutError:
            soak.tally.add("soak-sqlalchemy.timeouts")
            return
        soak.tally.add("soak-sqlalchemy.checkouts")
        with conn:
            conn.execute(sa.text("SELECT 1"))
            if r.random() < 0.05:
                conn.invalidate()
            else:
                time.sleep(r.random() * 0.005)

    def per_call(r: random.Random) -> None:
        engine = sa.create_engine(url)  # an engine per call
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        soak.tally.add(f"{url}.calls")
        time.sleep(0.02)

    return [
        *(lambda i=i: soak.loop("sqlalchemy", use, i) for i in range(4)),
        lambda: soak.loop("sqlalchemy per call", per_call, 10),
    ]


def http_workloads(soak: Soak, server: CountingUpstream) -> list[Callable[[], None]]:
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=2))
    poolwatch.track(session, name="soak-requests")
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, maxsize=2, block=True)
    poolwatch.track(pool, name="soak-urllib3")
    client = httpx.Client(limits=httpx.Limits(max_connections=3, max_keepalive_connections=3))
    poolwatch.track(client, name="soak-httpx")

    def shared_session(r: random.Random) -> None:
        with session.get(server.url, stream=r.random() < 0.3, timeout=10) as response:
            response.content  # noqa: B018  (read whole: the connection goes back)
        soak.tally.add("soak-requests.checkouts")

    def requests_per_call(r: random.Random) -> None:
        requests.get(server.url, timeout=10).raise_for_status()
        soak.tally.add(f"{server.origin}.calls")
        time.sleep(0.01)

    def blocking_pool(r: random.Random) -> None:
        try:
            response = pool.urlopen("GET", "/", retries=False, pool_timeout=0.01)
        except urllib3.exceptions.EmptyPoolError:
            soak.tally.add("soak-urllib3.timeouts")
            return
        soak.tally.add("soak-urllib3.checkouts")
        assert response.data == b"ok\n"

    def shared_client(r: random.Random) -> None:
        client.get(server.url).raise_for_status()
        soak.tally.add("soak-httpx.checkouts")

    def httpx_per_call(r: random.Random) -> None:
        with httpx.Client() as each:
            each.get(server.url).raise_for_status()
        soak.tally.add("httpx.calls")
        time.sleep(0.01)

    return [
        *(lambda i=i: soak.loop("requests", shared_session, 20 + i) for i in range(3)),
        lambda: soak.loop("requests per call", requests_per_call, 30),
        *(lambda i=i: soak.loop("urllib3", blocking_pool, 40 + i) for i in range(3)),
        *(lambda i=i: soak.loop("httpx", shared_client, 50 + i) for i in range(3)),
        lambda: soak.loop("httpx per call", httpx_per_call, 60),
    ]


def aiohttp_workload(soak: Soak, server: CountingAsyncUpstream) -> Callable[[], None]:
    async def main() -> None:
        connector = aiohttp.TCPConnector(limit=3)
        async with aiohttp.ClientSession(connector=connector) as session:
            poolwatch.track(session, name="soak-aiohttp")

            async def shared(index: int) -> None:
                r = random.Random(soak.rng.seed_value * 1000 + 70 + index)
                while not soak.stop.is_set():
                    try:
                        async with session.get(server.url) as response:
                            await response.read()
                        soak.tally.add("soak-aiohttp.checkouts")
                        await asyncio.sleep(r.random() * 0.004)
                    except Exception as error:
                        soak.unexpected("aiohttp", error)

            async def per_call() -> None:
                while not soak.stop.is_set():
                    try:
                        async with aiohttp.ClientSession() as each, each.get(server.url) as got:
                            await got.read()
                        soak.tally.add("aiohttp.calls")
                        await asyncio.sleep(0.01)
                    except Exception as error:
                        soak.unexpected("aiohttp per call", error)

            await asyncio.gather(*(shared(i) for i in range(6)), per_call())

    return lambda: asyncio.run(main())


@contextlib.contextmanager
def moto() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def boto3_workloads(soak: Soak, endpoint: str) -> list[Callable[[], None]]:
    import boto3
    from botocore.config import Config

    def s3(**config: Any) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="eu-west-1",
            aws_access_key_id="AKIAPOOLWATCHSOAK",
            aws_secret_access_key="poolwatch-soak-secret",
            config=Config(
                retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}, **config
            ),
        )

    shared = s3(max_pool_connections=2)
    poolwatch.track(shared, name="soak-boto3")
    shared.create_bucket(
        Bucket="soak", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    shared.put_object(Bucket="soak", Key="object", Body=b"soak")
    soak.tally.add("soak-boto3.checkouts", 2)

    def get(r: random.Random) -> None:
        body = shared.get_object(Bucket="soak", Key="object")["Body"]
        assert body.read() == b"soak"
        body.close()
        soak.tally.add("soak-boto3.checkouts")

    def per_call(r: random.Random) -> None:
        client = s3()  # a client per call
        client.head_bucket(Bucket="soak")
        client.close()
        soak.tally.add(f"s3 {endpoint}.calls")
        time.sleep(0.05)

    return [
        *(lambda i=i: soak.loop("boto3", get, 80 + i) for i in range(2)),
        lambda: soak.loop("boto3 per call", per_call, 90),
    ]


class Warnings(logging.Handler):
    """poolwatch's WARNINGs, counted by what they say (anti-pattern and pool) instead of
    printed; an anti-pattern is reported once per pool series."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"poolwatch: pool (.+?) \((\w+)\): (\w+):", record.getMessage())
        key = f"{found[3]} {found[1]}" if found else record.getMessage()[:80]
        self.counts[key] += 1


@contextlib.contextmanager
def quiet_logs() -> Iterator[Warnings]:
    """poolwatch's WARNINGs counted, moto's (werkzeug's) request log silenced."""
    handler = Warnings()
    ours, werkzeug = logging.getLogger("poolwatch"), logging.getLogger("werkzeug")
    ours.addHandler(handler)
    ours.propagate = False
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    try:
        yield handler
    finally:
        ours.removeHandler(handler)
        ours.propagate = True
        werkzeug.setLevel(level)


# -- measuring ---------------------------------------------------------------------------------
def rss() -> int:
    """Resident memory of this process, in bytes (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def poolwatch_allocations(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated, still held, by poolwatch's own code."""
    only = snapshot.filter_traces([tracemalloc.Filter(True, f"{ROOT}/poolwatch/*")])
    return sum(stat.size for stat in only.statistics("filename"))


def commit() -> str:
    try:
        found = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return found.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def report_growth(samples: list[Sample]) -> list[str]:
    lines = [f"{'t (s)':>6}  {'RSS':>10}  {'traced':>10}  collections"]
    for s in samples:
        traced = mib(s.traced) if s.traced is not None else "-"
        lines.append(f"{s.at:6.0f}  {mib(s.rss):>10}  {traced:>10}  {s.collections}")
    return lines


def compare_series(soak: Soak, final: Collection) -> tuple[list[str], bool]:
    """Each shared pool's exported checkouts (and timeouts) against its workload's, and
    each per-call series' checkouts beside the calls made."""
    lines: list[str] = []
    ok = True
    counted = dict(soak.tally.counts)
    shared = sorted({k.rsplit(".", 1)[0] for k in counted if k.startswith("soak-")})
    for name in shared:
        got = figures(final, name)
        for what in ("checkouts", "timeouts"):
            truth = counted.get(f"{name}.{what}", 0)
            exported = (got.get(what) or 0) if what == "timeouts" else got["checkouts"]
            same = exported == truth
            ok &= same
            mark = "ok" if same else "MISMATCH"
            lines.append(
                f"{name:<40} {what:<10} exported {exported:>8}  workload {truth:>8}  {mark}"
            )
    names = {name for _, name in final.series()}
    for key in sorted(k for k in counted if k.endswith(".calls")):
        target = key.rsplit(".", 1)[0]
        # A per-call series is named by its target, with its creation site when another
        # place made a pool for the same target first (the shared pool, named later).
        found = sorted(n for n in names if n == target or n.startswith(f"{target} ("))
        exported = sum(figures(final, name)["checkouts"] or 0 for name in found)
        shown = found[0] if len(found) == 1 else target
        lines.append(
            f"{shown:<40} {'per call':<10} exported {exported:>8}  calls    {counted[key]:>8}"
        )
    return lines, ok


@dataclass
class Run:
    """What a soak measured while its workloads ran."""

    samples: list[Sample] = field(default_factory=list)
    baseline: tracemalloc.Snapshot | None = None
    """Python's allocations at the end of the warm-up (with tracemalloc)."""
    collections: int = 0
    stuck: list[str] = field(default_factory=list)
    warnings: Counter[str] = field(default_factory=Counter)
    """poolwatch's WARNINGs by anti-pattern and pool."""
    final: Collection | None = None
    """Both readers' last collection, the workloads stopped, their pools still alive."""


def run(soak: Soak, readers: Readers, *, boto3: bool, traced: bool) -> Run:
    """Start the servers and workloads, sample memory until the time is up, stop them all."""
    measured = Run()
    threads: list[threading.Thread] = []
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        logs = stack.enter_context(quiet_logs())
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        server = stack.enter_context(CountingUpstream())
        async_server = stack.enter_context(CountingAsyncUpstream())
        racing = stack.enter_context(Racing(readers, every=COLLECT_EVERY))
        targets = [
            *sqlalchemy_workloads(soak, directory),
            *http_workloads(soak, server),
            aiohttp_workload(soak, async_server),
        ]
        if boto3:
            targets += boto3_workloads(soak, stack.enter_context(moto()))
        try:
            for target in targets:
                thread = threading.Thread(target=target, daemon=True)
                thread.start()
                threads.append(thread)
            deadline = started + soak.seconds
            while time.monotonic() < deadline:
                time.sleep(min(SAMPLE_EVERY, max(0.0, deadline - time.monotonic())))
                gc.collect()
                at = time.monotonic() - started
                if measured.baseline is None and at >= WARM_UP and traced:
                    # First: the snapshot itself takes resident memory (~90 MiB here),
                    # which every later sample, the first one read from included, holds.
                    measured.baseline = tracemalloc.take_snapshot()
                sample = Sample(
                    at,
                    rss(),
                    tracemalloc.get_traced_memory()[0] if traced else None,
                    racing.collections,
                )
                measured.samples.append(sample)
                shown = f", traced {mib(sample.traced)}" if sample.traced is not None else ""
                print(
                    f"  {sample.at:5.0f} s  RSS {mib(sample.rss)}{shown}, "
                    f"{racing.collections} collections, "
                    f"violations {dict(readers.checker.kinds) or 'none'}",
                    flush=True,
                )
        finally:
            soak.stop.set()
            for thread in threads:
                thread.join(30)
        measured.collections = racing.collections
        gc.collect()
        measured.final = readers.collect_settled()
        measured.warnings = logs.counts
    measured.stuck = [t.name for t in threads if t.is_alive()]
    return measured


def report(soak: Soak, readers: Readers, handle: poolwatch.Instrumentation, measured: Run) -> bool:
    """Print what the soak found; whether it was clean."""
    assert measured.final is not None
    lines, series_ok = compare_series(soak, measured.final)
    samples = measured.samples
    warm = [s for s in samples if s.at >= WARM_UP] or samples
    first, last = warm[0], samples[-1]
    minutes = max((last.at - first.at) / 60, 1e-9)
    print("\nmemory (growth from the first sample after the warm-up to the last):")
    print("\n".join(report_growth(samples)))
    print(
        f"RSS {mib(first.rss)} -> {mib(last.rss)}: {mib(last.rss - first.rss)} "
        f"({mib((last.rss - first.rss) / minutes)} a minute)"
    )
    if first.traced is not None and last.traced is not None:
        growth = last.traced - first.traced
        print(
            f"traced {mib(first.traced)} -> {mib(last.traced)}: {mib(growth)} "
            f"({mib(growth / minutes)} a minute)"
        )
    if measured.baseline is not None:
        end = tracemalloc.take_snapshot()
        before, after = poolwatch_allocations(measured.baseline), poolwatch_allocations(end)
        print(f"poolwatch's own allocations: {mib(before)} -> {mib(after)}; largest changes:")
        for stat in end.compare_to(measured.baseline, "lineno")[:5]:
            print(f"  {stat}")
    checker = readers.checker
    kinds = dict(checker.kinds)
    print(f"\ncollections: {measured.collections} racing, {checker.collections} in all")
    print(f"violations by kind: {kinds or 'none'}")
    print(f"negative deltas: {checker.negative_deltas}")
    for violation in checker.violations[:5]:
        print(f"  {violation}")
    print(f"handle.errors: {handle.errors or 'none'}")
    repeated = {k: n for k, n in measured.warnings.items() if n > 1}
    print(f"poolwatch WARNINGs: {sum(measured.warnings.values())}, repeated: {repeated or 'none'}")
    print(f"workload exceptions not expected: {soak.errors or 'none'}")
    print(f"threads still running: {measured.stuck or 'none'}")
    print("\nseries at the end:")
    print("\n".join(lines))
    return not (kinds or handle.errors or soak.errors or measured.stuck or repeated) and series_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-boto3", action="store_true", help="leave out boto3 and moto")
    parser.add_argument("--no-tracemalloc", action="store_true")
    args = parser.parse_args()
    seconds = min(max(args.minutes, 0.1), MAX_MINUTES) * 60
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    traced = not args.no_tracemalloc
    if traced:
        tracemalloc.start()
    soak = Soak(seconds, Seeded(seed))
    readers = Readers(soak.rng)
    handle = readers.instrument()
    versions = ", ".join(
        f"{m.__name__} {m.__version__}" for m in (sa, urllib3, requests, httpx, aiohttp)
    )
    print(f"poolwatch soak: commit {commit()}, seed {seed}, {seconds / 60:g} minutes", flush=True)
    print(f"versions: {versions}; load average {os.getloadavg()}", flush=True)
    try:
        measured = run(soak, readers, boto3=not args.no_boto3, traced=traced)
        clean = report(soak, readers, handle, measured)
    finally:
        readers.shutdown()
    print(f"\n{'clean' if clean else 'NOT CLEAN'}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
