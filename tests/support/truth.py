"""Ground truth for every figure poolwatch exports: the scaffolding of tests/test_truth_*.py.

The ground-truth suite runs randomized, concurrent workloads against real pools and real
servers, pauses them at random moments, and compares each exported figure with three
independent sources, exactly:

(a) the library's own state, read at the pause (``QueuePool.checkedout()``, a urllib3
    pool's queue, httpcore's ``_connections``, aiohttp's ``_acquired``);
(b) what the workload itself did and saw: checkouts made, connections held now, each
    exception by type (pool timeouts, connect errors, injected failures);
(c) what the servers saw: connections accepted and still open, requests answered,
    PostgreSQL's ``pg_stat_activity``.

Meanwhile a thread collects from two readers every few milliseconds — one cumulative, one
preferring DELTA for every instrument kind — and every collection, the racing ones and the
pauses' alike, is checked: cumulative counters and histograms never decrease, the start
time of a series never changes, no delta is negative, a delta point starts where the
reader's previous one ended, and the deltas summed equal the cumulative value.

What this module offers the tests:

* :func:`seeded` — the test's random generator, seeded from ``POOLWATCH_TRUTH_SEED`` when
  set (a replay), else at random; the seed is printed (pytest shows it with a failure) and
  is part of every failure message;
* :class:`Readers` — the MeterProvider with both readers, poolwatch instrumented into it,
  every collection checked (:class:`Checker`);
* :class:`Racing` — the collector thread racing the workload;
* :class:`ThreadGate` / :class:`TaskGate` — the pause: workers park between operations,
  some holding connections; callers blocked in a pool's queue count as quiescent;
* :class:`Tally` — what the workload saw, counted under a lock, with the exceptions it did
  not expect;
* :class:`Comparison` and :func:`figures` — the exported figures of one series next to each
  truth, mismatches printed as a table;
* :class:`CountingUpstream` / :class:`CountingAsyncUpstream` — the loopback servers with a
  count of the connections they hold open;
* :func:`drive_threads` — worker threads run and paused at random operation counts;
* :class:`LibraryLog` — urllib3's own account of its closes, from its log;
* :func:`cycle` — ``instrument()``/``uninstrument()`` cycles with the workload running
  inside the hooks as they are removed.

Replay a failure: ``POOLWATCH_TRUTH_SEED=<seed> python -m pytest <test id>``. A replay makes
the same choices of operations and pause moments; thread scheduling still differs. Every
comparison prints the exported figures it checked (pytest shows them with a failure).

Each bug of issue 18 the suite found, and the one it found besides (the reuse count read
between a checkout and its connect), has a test of its own that reproduces it
deterministically (written, and seen failing, before the fix); the randomized runs compare
every figure exactly, with no tolerance.

Run the whole suite: ``python -m pytest tests/test_truth_*.py``; the longer soak of the same
workloads: ``python benchmarks/soak.py --minutes 5`` (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from opentelemetry.sdk.metrics import (
    Counter as CounterInstrument,
)
from opentelemetry.sdk.metrics import (
    Histogram as HistogramInstrument,
)
from opentelemetry.sdk.metrics import (
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)

import poolwatch
from poolwatch._collect import OBSERVE_EVERY
from tests.support.upstream import AsyncioUpstream, ThreadedUpstream

SEED_VARIABLE = "POOLWATCH_TRUTH_SEED"
"""Environment variable replaying a seed."""

_DELTA_EVERYTHING = {
    cls: AggregationTemporality.DELTA
    for cls in (
        CounterInstrument,
        UpDownCounter,
        HistogramInstrument,
        ObservableCounter,
        ObservableUpDownCounter,
        ObservableGauge,
    )
}


# -- seeds ------------------------------------------------------------------------------------
class Seeded(random.Random):
    """A ``random.Random`` that remembers its seed, for failure messages."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.seed_value = seed

    @property
    def replay(self) -> str:
        return f"seed {self.seed_value} (replay: {SEED_VARIABLE}={self.seed_value})"


def seeded() -> Seeded:
    """The generator of one test: ``POOLWATCH_TRUTH_SEED`` if set, else a fresh seed."""
    given = os.environ.get(SEED_VARIABLE)
    seed = int(given) if given else random.SystemRandom().randrange(1, 2**31)
    print(f"ground truth: seed {seed} ({SEED_VARIABLE}={seed} replays it)")
    return Seeded(seed)


# -- what one collection exported ----------------------------------------------------------
PointKey = tuple[str, frozenset[tuple[str, Any]]]
"""A time series: metric name and attributes."""


def _poolwatch_metrics(data: Any) -> list[Metric]:
    found: list[Metric] = []
    if data is None:
        return found
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name == "poolwatch":
                found.extend(scope_metrics.metrics)
    return found


@dataclass
class Collection:
    """One collection of poolwatch's scope: its points by series."""

    metrics: list[Metric]
    number: dict[PointKey, NumberDataPoint] = field(default_factory=dict)
    histogram: dict[PointKey, HistogramDataPoint] = field(default_factory=dict)
    monotonic: set[str] = field(default_factory=set)
    """Names of the monotonic sums (counters)."""

    def __post_init__(self) -> None:
        for metric in self.metrics:
            data = metric.data
            if isinstance(data, Sum) and data.is_monotonic:
                self.monotonic.add(metric.name)
            for point in data.data_points:
                key = (metric.name, frozenset(point.attributes.items()))
                if isinstance(point, HistogramDataPoint):
                    self.histogram[key] = point
                else:
                    self.number[key] = point

    def series(self) -> set[tuple[str, str]]:
        """``(pool.kind, pool.name)`` of every pool series in the collection."""
        found = set()
        for _, attributes in [*self.number, *self.histogram]:
            found_attributes = dict(attributes)
            if "pool.kind" in found_attributes:
                found.add((found_attributes["pool.kind"], found_attributes["pool.name"]))
        return found

    def of(self, name: str, pool: str, **attrs: Any) -> list[NumberDataPoint | HistogramDataPoint]:
        wanted = {"pool.name": pool, **{k.replace("__", "."): v for k, v in attrs.items()}}
        points: list[NumberDataPoint | HistogramDataPoint] = []
        for (metric, attributes), point in [*self.number.items(), *self.histogram.items()]:
            if metric != name:
                continue
            found = dict(attributes)
            if all(found.get(k) == v for k, v in wanted.items()):
                points.append(point)
        return points


# -- checks on every collection --------------------------------------------------------------
class Checker:
    """Checks every collection of the two readers, in the order they happened."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.kinds: Counter[str] = Counter()
        """Every violation, by kind."""
        self.collections = 0
        self._cumulative: dict[PointKey, tuple[int, Any]] = {}
        """Last cumulative point per series: start time, value (a histogram's: counts)."""
        self._delta_end: dict[PointKey, int] = {}
        """Time of the last delta point per series."""
        self._delta_previous: set[PointKey] = set()
        """Series in the delta reader's previous collection."""
        self.delta_totals: dict[PointKey, tuple[float, ...]] = {}
        """Every delta point of a counter or histogram, summed."""
        self.negative_deltas = 0

    def forget_series(self) -> None:
        """Start over (a new instrumentation: its series start anew); violations stay."""
        self._cumulative.clear()
        self._delta_end.clear()
        self._delta_previous = set()
        self.delta_totals.clear()

    def _violation(self, text: str, kind: str) -> None:
        self.kinds[kind] += 1
        if len(self.violations) < 12:  # the first ones tell the story; kinds count all
            self.violations.append(text)

    @staticmethod
    def _histogram_value(point: HistogramDataPoint) -> tuple[float, ...]:
        return (point.count, point.sum, *point.bucket_counts)

    def cumulative(self, collection: Collection) -> None:
        self.collections += 1
        for key, number in collection.number.items():
            self._check_cumulative(key, number.start_time_unix_nano, (number.value,), collection)
        for key, hist in collection.histogram.items():
            value = self._histogram_value(hist)
            self._check_cumulative(key, hist.start_time_unix_nano, value, collection)

    def _check_cumulative(
        self, key: PointKey, start: int, value: tuple[float, ...], collection: Collection
    ) -> None:
        before = self._cumulative.get(key)
        self._cumulative[key] = (start, value)
        if before is None:
            return
        name = _describe(key)
        if before[0] != start:
            self._violation(
                f"cumulative: the start time of {name} changed ({before[0]} -> {start})",
                "cumulative start time changed",
            )
        counter = key[0] in collection.monotonic or key in collection.histogram
        if counter and any(now < then for now, then in zip(value, before[1], strict=True)):
            self._violation(
                f"cumulative: {name} went down: {before[1][:2]} -> {value[:2]}",
                "cumulative value went down",
            )

    def delta(self, collection: Collection) -> None:
        seen: set[PointKey] = set()
        points: list[tuple[PointKey, int, int, tuple[float, ...]]] = []
        for key, number in collection.number.items():
            if key[0] in collection.monotonic:
                points.append(
                    (key, number.start_time_unix_nano, number.time_unix_nano, (number.value,))
                )
        for key, hist in collection.histogram.items():
            value = self._histogram_value(hist)
            points.append((key, hist.start_time_unix_nano, hist.time_unix_nano, value))
        for key, start, end, value in points:
            seen.add(key)
            name = _describe(key)
            if any(v < 0 for v in value):
                self.negative_deltas += 1
                self._violation(f"delta: {name} is negative: {value[:2]}", "negative delta")
            if key in self._delta_previous and start != self._delta_end[key]:
                self._violation(
                    f"delta: {name} starts at {start}, not where its previous point ended "
                    f"({self._delta_end[key]})",
                    "delta start not the previous end",
                )
            self._delta_end[key] = end
            total = self.delta_totals.get(key)
            self.delta_totals[key] = (
                value if total is None else tuple(a + b for a, b in zip(total, value, strict=True))
            )
        self._delta_previous = seen

    def totals_match(self, cumulative: Collection) -> list[str]:
        """The deltas summed against the cumulative values (both readers just collected,
        nothing happening in between). Sums of durations are compared to 1e-9 s: a
        difference of floats summed back is not bit-exact."""
        mismatches = []
        for key, point in [*cumulative.number.items(), *cumulative.histogram.items()]:
            if isinstance(point, NumberDataPoint):
                if key[0] not in cumulative.monotonic:
                    continue
                value: tuple[float, ...] = (point.value,)
            else:
                value = self._histogram_value(point)
            total = self.delta_totals.get(key)
            if total is None:
                mismatches.append(f"{_describe(key)}: cumulative {value}, no delta point ever")
            elif not _same_totals(total, value):
                mismatches.append(f"{_describe(key)}: deltas sum to {total}, cumulative {value}")
        return mismatches


def _same_totals(total: tuple[float, ...], value: tuple[float, ...]) -> bool:
    """Counts exactly; a histogram's sum (its second figure) to 1e-9 s."""
    if len(value) == 1:
        return total == value
    return (
        total[0] == value[0]
        and total[2:] == value[2:]
        and math.isclose(total[1], value[1], rel_tol=1e-9, abs_tol=1e-9)
    )


def _describe(key: PointKey) -> str:
    name, attributes = key
    shown = ", ".join(f"{k}={v}" for k, v in sorted(attributes) if k != "pool.kind")
    return f"{name}{{{shown}}}"


# -- the readers -----------------------------------------------------------------------------
class Readers:
    """poolwatch into a MeterProvider with a cumulative and a delta reader; every
    collection of either goes through :meth:`collect` and is checked."""

    def __init__(self, rng: Seeded) -> None:
        self.rng = rng
        self.cumulative_reader = InMemoryMetricReader()
        self.delta_reader = InMemoryMetricReader(preferred_temporality=_DELTA_EVERYTHING)
        self.provider = MeterProvider(metric_readers=[self.cumulative_reader, self.delta_reader])
        self.checker = Checker()
        self.handle: poolwatch.Instrumentation | None = None
        self._lock = threading.Lock()
        self.last: Collection | None = None

    def instrument(self, **settings: Any) -> poolwatch.Instrumentation:
        settings.setdefault("process_view", "off")  # its points come on its own schedule
        with self._lock:  # a new instrumentation's series start anew
            self.checker.forget_series()
            self.handle = poolwatch.instrument(meter_provider=self.provider, **settings)
        return self.handle

    def collect(self) -> Collection:
        """Collect from both readers (in a random order), check both; the cumulative one."""
        with self._lock:
            order = [True, False]
            self.rng.shuffle(order)
            cumulative: Collection | None = None
            for is_cumulative in order:
                reader = self.cumulative_reader if is_cumulative else self.delta_reader
                collection = Collection(_poolwatch_metrics(reader.get_metrics_data()))
                if is_cumulative:
                    self.checker.cumulative(collection)
                    cumulative = collection
                else:
                    self.checker.delta(collection)
            assert cumulative is not None
            self.last = cumulative
            return cumulative

    def collect_observed(self) -> Collection:
        """:meth:`collect_settled` once poolwatch's detection can run again: it runs at most
        every ``OBSERVE_EVERY`` seconds, so a workload that ended sooner after the last run
        would be read before detection saw it (a WARNING not logged yet, by design)."""
        time.sleep(OBSERVE_EVERY)
        return self.collect_settled()

    def collect_settled(self, rounds: int = 3) -> Collection:
        """Collect at a quiescent moment, then the deltas summed against the cumulative.

        A collection may itself change what the next one sees (a checkout whose borrower
        dropped it is counted once two sweeps in a row confirm it), so both readers
        collect ``rounds`` times and the last round is compared."""
        collection = self.collect()
        for _ in range(rounds - 1):
            collection = self.collect()
        with self._lock:
            for mismatch in self.checker.totals_match(collection):
                self.checker._violation(
                    f"delta totals: {mismatch}", "deltas summed differ from cumulative"
                )
        return collection

    def assert_clean(self) -> None:
        """No violation in any collection, and no internal error of poolwatch's."""
        kinds = self.checker.kinds
        problems = [f"{n} x {kind}" for kind, n in kinds.most_common()]
        if kinds:
            problems.append("the first ones:")
            problems.extend(self.checker.violations)
        errors = self.handle.errors if self.handle is not None else {}
        if errors:
            problems.append(f"poolwatch's internal errors (handle.errors): {errors}")
        assert not problems, (
            f"{self.rng.replay}: over {self.checker.collections} collections:\n  "
            + "\n  ".join(problems)
        )

    def shutdown(self) -> None:
        poolwatch.uninstrument()
        self.provider.shutdown()


class Racing:
    """A thread collecting from both readers every ``every`` seconds while the workload
    runs (a context manager); an exception in it is raised on exit."""

    def __init__(self, readers: Readers, every: float = 0.004) -> None:
        self.readers = readers
        self.every = every
        self.collections = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="truth-racing", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.every):
                self.readers.collect()
                self.collections += 1
        except BaseException as error:  # re-raised by __exit__
            self._error = error

    def __enter__(self) -> Racing:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the racing collector did not stop"
        if self._error is not None:
            raise self._error


# -- what the workload saw -------------------------------------------------------------------
class Tally:
    """Counts of what the workload did and saw, under a lock; exceptions it did not expect."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def add(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    def __getitem__(self, what: str) -> int:
        with self._lock:
            return self.counts[what]

    def unexpected_error(self, where: str, error: BaseException) -> None:
        with self._lock:
            if len(self.unexpected) < 20:
                self.unexpected.append(
                    f"{where}: {type(error).__module__}.{type(error).__name__}: {error}"
                )

    def assert_expected(self, rng: Seeded) -> None:
        assert not self.unexpected, (
            f"{rng.replay}: the workload caught exceptions it did not expect:\n  "
            + "\n  ".join(self.unexpected)
        )


# -- the pause --------------------------------------------------------------------------------
class ThreadGate:
    """Worker threads call :meth:`checkpoint` between operations; :meth:`paused` parks them
    all there (a context manager) while the controller reads every truth.

    A worker blocked in a pool's queue, for as long as nobody returns a connection, is as
    still as a parked one: ``blocked`` counts them (from the threads' stacks), and the
    pause is reached when every worker is parked, blocked or finished.
    """

    def __init__(self, rng: Seeded) -> None:
        self.rng = rng
        self._condition = threading.Condition()
        self._paused = False
        self._parked = 0
        self._finished = 0
        self.threads: list[threading.Thread] = []
        self.died: list[str] = []
        self.stopping = False
        """Set when the run failed: workers leave their loop at their next operation."""

    def stop(self) -> None:
        """End the run early (a comparison failed): release every worker, stop them."""
        with self._condition:
            self.stopping = True
            self._paused = False
            self._condition.notify_all()

    def checkpoint(self) -> None:
        with self._condition:
            if not self._paused:
                return
            self._parked += 1
            self._condition.notify_all()
            while self._paused:
                self._condition.wait()
            self._parked -= 1

    def finished(self) -> None:
        with self._condition:
            self._finished += 1
            self._condition.notify_all()

    @contextmanager
    def paused(
        self, blocked: Callable[[], int] = lambda: 0, seconds: float = 60.0
    ) -> Iterator[int]:
        """Until every worker is parked, blocked or finished; yields the blocked count."""
        deadline = time.monotonic() + seconds
        with self._condition:
            self._paused = True
        try:
            while True:
                with self._condition:
                    still = self._parked + self._finished
                waiting = blocked() if still < len(self.threads) else 0
                if still + waiting == len(self.threads):
                    # Confirm: a blocked caller seen an instant before it was served.
                    with self._condition:
                        again = self._parked + self._finished
                    if again == still and blocked() == waiting:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{self.rng.replay}: the workers did not reach the pause in {seconds} s "
                        f"(parked or finished {still}, blocked {waiting} of {len(self.threads)})"
                    )
                time.sleep(0.002)
            yield waiting
        finally:
            with self._condition:
                self._paused = False
                self._condition.notify_all()

    def start(self, target: Callable[[int], None], count: int) -> None:
        def run(index: int) -> None:
            try:
                target(index)
            except BaseException as error:  # a worker's own bug: shown by join()
                self.died.append(f"worker {index}: {type(error).__name__}: {error}")
                raise
            finally:
                self.finished()

        self.threads = [
            threading.Thread(target=run, args=(i,), name=f"truth-worker-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def join(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), f"{self.rng.replay}: {thread.name} did not finish"
        assert not self.died, f"{self.rng.replay}: workers died: {self.died}"


def drive_threads(
    gate: ThreadGate,
    tally: Tally,
    worker: Callable[[int], None],
    *,
    workers: int,
    moments: Iterable[int],
    on_pause: Callable[[str, int], None],
    blocked: Callable[[], int] = lambda: 0,
) -> int:
    """Run ``workers`` threads of ``worker``; each time the workload has made the next of
    ``moments`` operations (``tally["operations"]``), park them all and call
    ``on_pause(label, blocked)``; join them. Returns the pauses made."""
    gate.start(worker, workers)
    made = 0
    try:
        for moment in sorted(moments):
            while tally["operations"] < moment and any(t.is_alive() for t in gate.threads):
                time.sleep(0.001)
            if not any(t.is_alive() for t in gate.threads):
                break
            with gate.paused(blocked) as waiting:
                made += 1
                on_pause(f"pause {made} (after {tally['operations']} operations)", waiting)
    except BaseException:
        gate.stop()  # nothing keeps running into the next test
        for thread in gate.threads:
            thread.join(30)
        raise
    gate.join()
    return made


class TaskGate:
    """:class:`ThreadGate` for tasks on one event loop: workers ``await checkpoint()``."""

    def __init__(self, rng: Seeded) -> None:
        self.rng = rng
        self._paused = False
        self._resume = asyncio.Event()
        self._parked = 0
        self._finished = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def checkpoint(self) -> None:
        if not self._paused:
            return
        self._parked += 1
        try:
            while self._paused:
                await self._resume.wait()
        finally:
            self._parked -= 1

    def start(self, target: Callable[[int], Any], count: int) -> None:
        async def run(index: int) -> None:
            try:
                await target(index)
            finally:
                self._finished += 1

        self.tasks = [asyncio.create_task(run(i), name=f"truth-task-{i}") for i in range(count)]

    async def pause(self, blocked: Callable[[], int] = lambda: 0, seconds: float = 60.0) -> int:
        """Until every task is parked, blocked or finished; returns the blocked count.
        Nothing else runs on the loop until :meth:`resume`, as long as the caller does
        not await."""
        self._paused = True
        self._resume.clear()
        deadline = time.monotonic() + seconds
        while True:
            await asyncio.sleep(0.002)
            still = self._parked + self._finished
            waiting = blocked() if still < len(self.tasks) else 0
            if still + waiting == len(self.tasks):
                for _ in range(5):  # callbacks scheduled by the last steps (closes, releases)
                    await asyncio.sleep(0)
                if self._parked + self._finished == still and blocked() == waiting:
                    return waiting
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.rng.replay}: the tasks did not reach the pause in {seconds} s "
                    f"(parked or finished {still}, blocked {waiting} of {len(self.tasks)})"
                )

    def resume(self) -> None:
        self._paused = False
        self._resume.set()

    async def join(self, seconds: float = 60.0) -> None:
        done, pending = await asyncio.wait(self.tasks, timeout=seconds)
        assert not pending, f"{self.rng.replay}: {len(pending)} tasks did not finish"
        for task in done:
            task.result()


def pause_moments(rng: Seeded, operations: int, pauses: int) -> set[int]:
    """The operation counts at which the controller pauses (random, distinct)."""
    return set(rng.sample(range(1, operations), min(pauses, operations - 1)))


# -- exported figures against the truths ------------------------------------------------------
def _value(points: list[Any]) -> int | None:
    if not points:
        return None
    return int(sum(p.value for p in points))


def _count(points: list[Any]) -> int:
    return int(sum(p.count for p in points))


def figures(collection: Collection, pool: str) -> dict[str, int | None]:
    """Every figure of pool series ``pool`` in one (cumulative) collection: levels summed
    over servers, histogram counts, counters; closes by reason as ``closed.<reason>``."""
    of = collection.of
    found: dict[str, int | None] = {
        "used": _value(of("poolwatch.connections", pool, state="used")),
        "idle": _value(of("poolwatch.connections", pool, state="idle")),
        "max": _value(of("poolwatch.connections.max", pool)),
        "pending": _value(of("poolwatch.pending_requests", pool)),
        "checkouts": _count(of("poolwatch.wait.duration", pool, outcome="acquired")),
        "wait_timeouts": _count(of("poolwatch.wait.duration", pool, outcome="timeout")),
        "wait_errors": _count(of("poolwatch.wait.duration", pool, outcome="error")),
        "uses": _count(of("poolwatch.use.duration", pool)),
        "connects": _count(of("poolwatch.connect.duration", pool, outcome="ok")),
        "connect_errors": _count(of("poolwatch.connect.duration", pool, outcome="error")),
        "timeouts": _value(of("poolwatch.timeouts", pool)),
        "reused": _value(of("poolwatch.checkouts.reused", pool)),
        "leaks": _value(of("poolwatch.leaks", pool)),
        "lifetimes": _count(of("poolwatch.connection.lifetime", pool)),
    }
    for point in of("poolwatch.connections.closed", pool):
        found[f"closed.{point.attributes['reason']}"] = int(point.value)
    return found


@dataclass
class Comparison:
    """Exported figures next to their truths; :meth:`check` fails with every mismatch."""

    label: str
    rng: Seeded
    exported: Mapping[str, int | None]
    rows: list[tuple[str, int | None, dict[str, int | None]]] = field(default_factory=list)

    def reused(self, truth: int) -> None:
        """``reused``: checkouts that opened no connection."""
        self.expect("reused", workload=truth)

    def expect(self, figure: str, **truths: int | None) -> None:
        """``figure`` must equal every truth given (by source: ``workload=``, ``library=``,
        ``server=``); the truths must agree with each other too."""
        self.rows.append((figure, self.exported.get(figure, 0), truths))

    def agree(self, what: str, **truths: int | None) -> None:
        """Truths that must agree with each other (no exported figure: a consistency check
        of the sources themselves, shown in the same table)."""
        values = list(truths.values())
        self.rows.append((what, values[0] if values else None, truths))

    def closes(self, expected: Mapping[str, int], source: str) -> None:
        """Closes by reason: exactly ``expected`` (reasons absent there must be 0)."""
        reasons = {k.split(".", 1)[1] for k in self.exported if k.startswith("closed.")}
        for reason in sorted(reasons | set(expected)):
            self.expect(f"closed.{reason}", **{source: expected.get(reason, 0)})

    def mismatches(self) -> list[str]:
        wrong = []
        for figure, exported, truths in self.rows:
            if any(value != exported for value in truths.values()):
                told = ", ".join(f"{source} {value}" for source, value in truths.items())
                wrong.append(f"{figure:<18} exported {exported!s:<6} truth: {told}")
        return wrong

    def check(self) -> None:
        shown = ", ".join(f"{k} {v}" for k, v in self.exported.items() if v)
        print(f"{self.label}: {shown}")  # pytest shows it with a failure
        wrong = self.mismatches()
        assert not wrong, f"{self.label} ({self.rng.replay}):\n  " + "\n  ".join(wrong)


# -- servers that count the connections they hold open ----------------------------------------
class CountingUpstream(ThreadedUpstream):
    """The threaded loopback server, also counting connections it has finished with
    (``finished``): ``open_connections`` is what it holds open now."""

    def start(self) -> CountingUpstream:
        self.counters.finished = 0  # type: ignore[attr-defined]
        super().start()
        handler = self._server.RequestHandlerClass
        counters = self.counters

        class Counting(handler):  # type: ignore[misc,valid-type]
            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    counters.add("finished")

        self._server.RequestHandlerClass = Counting
        return self

    @property
    def open_connections(self) -> int:
        return self.counters.connections - self.counters.finished  # type: ignore[attr-defined]


class CountingAsyncUpstream(AsyncioUpstream):
    """The asyncio loopback server, counting connections it has finished with."""

    def __enter__(self) -> CountingAsyncUpstream:
        self.counters.finished = 0  # type: ignore[attr-defined]
        super().__enter__()
        return self

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await super()._connection(reader, writer)
        finally:
            self.counters.add("finished")

    @property
    def open_connections(self) -> int:
        return self.counters.connections - self.counters.finished  # type: ignore[attr-defined]


def settle(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll ``condition`` until it holds (a server noticing a close is asynchronous); False
    when it did not within ``seconds`` — the comparison then shows the difference."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# -- urllib3's own account (urllib3, requests, botocore) --------------------------------------
class LibraryLog(logging.Handler):
    """urllib3's own account of its closes, from its log: discards ("Connection pool is
    full, discarding connection") and connections found dropped at checkout ("Resetting
    dropped connection"). The connection concerned is read from the frame of urllib3's
    function that logs it, so that connections the workload marked (:meth:`mark`: the
    server ended it after answering, the workload closed its response early) are told
    from the others: ``resets_of(kind)``, ``discards_of(kind)``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.discards = 0
        self.resets = 0
        self.placeholders_discarded = 0
        self._of: Counter[tuple[str, str]] = Counter()
        self._marked: dict[Any, str] = {}
        self._counts = threading.Lock()

    def mark(self, conn: Any, kind: str) -> None:
        """``conn`` is closed for ``kind``'s reason, and still the pool's."""
        with self._counts:
            self._marked[conn] = kind

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Connection pool is full"):
            what, function = "discards", "_put_conn"
        elif message.startswith("Resetting dropped connection"):
            what, function = "resets", "_get_conn"
        else:
            return
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != function:
            frame = frame.f_back
        conn = frame.f_locals.get("conn") if frame is not None else None
        with self._counts:
            if conn is None:
                # _put_conn(None) logs the warning too (the placeholder urllib3 puts back
                # for a connection it threw away): no connection is discarded.
                self.placeholders_discarded += what == "discards"
                return
            setattr(self, what, getattr(self, what) + 1)
            kind = self._marked.pop(conn, None)
            if kind is not None:
                self._of[(what, kind)] += 1

    def resets_of(self, kind: str) -> int:
        with self._counts:
            return self._of[("resets", kind)]

    def discards_of(self, kind: str) -> int:
        with self._counts:
            return self._of[("discards", kind)]

    def let_go(self, kind: str) -> int:
        return self.resets_of(kind) + self.discards_of(kind)

    def waiting(self, kind: str) -> int:
        """Marked connections the pool has not let go of yet."""
        with self._counts:
            return sum(1 for k in self._marked.values() if k == kind)

    def in_queue(self, pool: Any, kind: str) -> int:
        """Marked connections in ``pool``'s queue now."""
        with self._counts:
            marked = {id(c) for c, k in self._marked.items() if k == kind}
        return sum(1 for conn in list(pool.pool.queue) if conn is not None and id(conn) in marked)


@contextmanager
def library_log() -> Iterator[LibraryLog]:
    """:class:`LibraryLog` on urllib3's pool logger (at DEBUG) while in use."""
    handler = LibraryLog()
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def idle_in_queue(pool: Any) -> int:
    """A urllib3 pool's connected connections in its queue (not its None placeholders)."""
    queue = pool.pool
    if queue is None:
        return 0
    return sum(1 for conn in list(queue.queue) if conn is not None and conn.sock is not None)


# -- instrument/uninstrument cycles ----------------------------------------------------------
def class_attributes(classes: Iterable[type]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every class's own attributes, to compare before instrument() and after uninstrument()."""
    return {(cls.__module__, cls.__qualname__): dict(vars(cls)) for cls in classes}


def cycle(
    rng: Seeded,
    readers: Readers,
    library: str,
    progress: Callable[[], int],
    *,
    cycles: int,
    seconds: float,
    inside: int,
) -> tuple[int, list[dict[str, int]]]:
    """``instrument(libraries=[library])`` and ``uninstrument()``, ``cycles`` times at most
    (and at most ``seconds``), while a workload runs; a collector races them. After each
    ``instrument()``, until the workload has finished ``inside`` more operations
    (``progress()`` counts them; bounded by 5 s): by then the callers waiting in the pool
    entered its wait through poolwatch's hooks, and ``uninstrument()`` removes the hooks
    they are inside of; after it, as long again, for them to leave those hooks. Returns the
    cycles made and poolwatch's internal errors by cycle."""
    expired = deadline_after(seconds)
    made = 0
    errors: list[dict[str, int]] = []
    with Racing(readers):
        while made < cycles and not expired():
            handle = readers.instrument(libraries=[library])
            until = progress() + inside
            settle(lambda until=until: progress() >= until, 5.0)
            time.sleep(rng.random() * 0.005)
            poolwatch.uninstrument()
            if handle.errors:
                errors.append(handle.errors)
            made += 1
            # Uninstrumented until those callers have left the removed hooks (instrumented
            # again at once, the attributes the hooks read would be back for them).
            until = progress() + inside
            settle(lambda until=until: progress() >= until, 5.0)
    return made, errors


def assert_cycled_cleanly(
    rng: Seeded,
    tally: Tally,
    made: tuple[int, list[dict[str, int]]],
    work: str,
    *,
    classes: list[type],
    before: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """After :func:`cycle` (``made``: what it returned): two cycles at least, with ``work``
    counted in ``tally``; no exception the workload did not cause; no internal error in
    any cycle; and every attribute of ``classes`` the library's own again (as ``before``,
    :func:`class_attributes` read before the first ``instrument()``)."""
    cycles, errors = made
    assert cycles >= 2 and tally[work] > 0, (cycles, tally.counts)
    tally.assert_expected(rng)
    assert not errors, f"{rng.replay}: poolwatch's internal errors by cycle: {errors}"
    assert class_attributes(classes) == before


def poolwatch_frames(error: BaseException) -> list[str]:
    """Frames of poolwatch's own code in ``error``'s traceback ("file:line function")."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if os.sep + "poolwatch" + os.sep in filename and os.sep + "tests" + os.sep not in filename:
            frames.append(f"{filename}:{tb.tb_lineno} {tb.tb_frame.f_code.co_name}")
        tb = tb.tb_next
    return frames


def deadline_after(seconds: float) -> Callable[[], bool]:
    """A function telling whether ``seconds`` have passed since this call."""
    end = time.monotonic() + seconds
    return lambda: time.monotonic() > end
