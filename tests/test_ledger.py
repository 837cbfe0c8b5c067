"""The ledger: exact counts under many threads, exact buckets, leak accounting."""

from __future__ import annotations

import threading

import pytest

from poolwatch._janitor import Janitor
from poolwatch._ledger import DRAIN_AT, Histogram, Ledger
from poolwatch._safe import ErrorLog


def test_buckets_are_upper_inclusive_like_opentelemetry() -> None:
    ledger = Ledger(bounds=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 2.0):
        ledger.acquired(object(), 0.0, value)
    wait = ledger.snapshot().wait["acquired"]
    assert wait.counts == (2, 2, 1)
    assert wait.total == 3.65
    assert (wait.min, wait.max) == (0.05, 2.0)


def test_histogram_observe_matches_bulk_fold() -> None:
    values = [0.0001 * (i % 997) for i in range(5000)]
    direct = Histogram((0.001, 0.01, 0.05))
    for v in values:
        direct.observe(v)
    ledger = Ledger(bounds=(0.001, 0.01, 0.05))
    for v in values:
        ledger.acquired(object(), 0.0, v)
    folded = ledger.snapshot().wait["acquired"]
    assert folded.counts == tuple(direct.counts)
    assert abs(folded.total - direct.total) < 1e-9


def test_counts_stay_exact_with_many_threads() -> None:
    ledger = Ledger()
    threads, per_thread = 8, 20_000
    barrier = threading.Barrier(threads)

    def hammer() -> None:
        barrier.wait()
        for _ in range(per_thread):
            key = object()
            ledger.acquired(key, 0.0, 0.001)
            ledger.released(key, 0.003)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for w in workers:
        w.start()
    # Collect concurrently too: folding must not lose values appended meanwhile.
    while any(w.is_alive() for w in workers):
        ledger.snapshot()
    for w in workers:
        w.join()
    snap = ledger.snapshot()
    assert snap.wait["acquired"].observations == threads * per_thread
    assert snap.use.observations == threads * per_thread
    assert snap.checked_out == 0


def test_a_reader_never_takes_a_snapshot_older_than_another_readers_fold() -> None:
    """Two readers at once (a cumulative and a delta reader collecting on their own
    threads): B reads the cached snapshot, A folds the values pending since and caches a
    newer one, then B finds nothing pending. B must not return the older snapshot — the
    benchmarks/soak.py run of 2026-12-07 exported counts going down by one that way."""
    ledger = Ledger()
    ledger.acquired("first", 0.0, 0.001)
    ledger.released("first", 0.002)
    assert ledger.snapshot().wait["acquired"].observations == 1  # cached: nothing is out
    started: list[bool] = []
    newer: list[int] = []

    class FoldedByAnotherReader(list[float]):
        """The pending waits: the first time B asks whether any are pending, reader A
        takes its snapshot (folding them) before B gets the answer."""

        def __bool__(self) -> bool:
            if not started:  # A's own question, inside its snapshot, is answered plainly
                started.append(True)
                newer.append(ledger.snapshot().wait["acquired"].observations)
            return len(self) > 0

    ledger.waits = FoldedByAnotherReader()
    ledger.acquired("second", 0.0, 0.001)
    ledger.released("second", 0.002)
    seen_by_b = ledger.snapshot().wait["acquired"].observations
    assert newer == [2]
    assert seen_by_b == 2


def test_the_janitor_folds_ledgers_with_too_many_pending_values() -> None:
    busy, quiet = Ledger(), Ledger()
    for ledger, count in ((busy, DRAIN_AT + 10), (quiet, 10)):
        for _ in range(count):
            key = object()
            ledger.acquired(key, 0.0, 0.0)
            ledger.released(key, 0.0)
    janitor = Janitor(lambda: [busy, quiet], ErrorLog())
    assert janitor.sweep() == 1
    assert (len(busy.uses), len(busy.waits), len(quiet.uses)) == (0, 0, 10)
    assert busy.snapshot().use.observations == DRAIN_AT + 10
    assert quiet.snapshot().use.observations == 10


def test_leaks_are_counted_once_whether_seen_out_or_returned_late() -> None:
    ledger = Ledger(leak_threshold=1.0)
    held_out, returned_late, quick = object(), object(), object()
    ledger.acquired(held_out, 0.0, 0.0)
    ledger.acquired(returned_late, 0.0, 0.0)
    ledger.acquired(quick, 0.0, 0.0)
    ledger.released(quick, 0.5)
    # Reading counts what is out past the threshold, and counts no leak: sweeping does.
    assert (ledger.snapshot(now=2.0).leaks, ledger.snapshot(now=2.0).leaks_active) == (0, 2)
    assert [r.held for r in ledger.sweep(now=2.0)] == [2.0, 2.0]  # both seen out past 1 s
    assert ledger.sweep(now=2.5) == []  # each once, however many sweeps see it
    first = ledger.snapshot(now=2.5)
    assert (first.leaks, first.leaks_active) == (2, 2)
    ledger.released(returned_late, 3.0)  # already counted: not counted again
    [back] = ledger.sweep(now=4.0)
    assert (back.returned, back.counted) == (True, False)
    second = ledger.snapshot(now=4.0)
    assert (second.leaks, second.leaks_active) == (2, 1)
    late = object()
    ledger.acquired(late, 10.0, 10.0)
    ledger.released(late, 12.0)  # returned late between two collections
    [report] = ledger.sweep(now=13.0)
    assert (report.returned, report.counted, report.held) == (True, True, 2.0)
    assert ledger.snapshot(now=13.0).leaks == 3


def test_a_checkout_read_from_the_pool_and_returned_late_is_one_leak() -> None:
    """aiohttp and httpx read their checkouts from the pools at collection
    (``Adapter.checkouts``); one seen out past the threshold, then returned, is one leak."""
    ledger = Ledger(leak_threshold=1.0)
    key = object()
    out = {key: 0.0}  # as Adapter.checkouts reads it
    assert len(ledger.sweep(now=2.0, active=out)) == 1
    ledger.uses.append(3.0)  # the release hook's inlined Ledger.released, then:
    ledger.settle(key, 3.0)
    assert [(r.returned, r.counted) for r in ledger.sweep(now=3.5, active={})] == [(True, False)]
    snap = ledger.snapshot(now=3.5, active={})
    assert (snap.leaks, snap.leaks_active, snap.checked_out) == (1, 0, 0)


def test_quantile_interpolates_inside_the_bucket() -> None:
    ledger = Ledger(bounds=(0.1, 0.2, 0.4))
    for value in [0.15] * 99 + [0.3]:
        ledger.acquired(object(), 0.0, value)
    wait = ledger.snapshot().wait["acquired"]
    # Rank 50 of the 99 values in (0.1, 0.2], whose observed floor is the min 0.15.
    assert wait.quantile(0.5) == pytest.approx(0.15 + 0.05 * 50 / 99)
    assert wait.quantile(1.0) == 0.3
    assert Ledger().snapshot().wait["acquired"].quantile(0.99) is None


def test_reset_starts_from_zero() -> None:
    ledger = Ledger(leak_threshold=5.0)
    ledger.acquired(object(), 0.0, 0.1)
    ledger.closed_connection("pool_full", 3.0)
    ledger.reset()
    snap = ledger.snapshot()
    assert snap.checkouts == 0
    assert snap.closed["pool_full"] == 0
    assert ledger.leak_threshold == 5.0


def test_a_pool_opening_connections_ahead_reuses_all_but_first_checkouts() -> None:
    """psycopg_pool and asyncpg open connections before any checkout wants one: a connect
    is not a checkout that did not reuse, a connection's first checkout is."""
    ahead, plain = Ledger(tells_firsts=True), Ledger()
    for ledger in (ahead, plain):
        for _ in range(3):  # min_size=3: opened at start
            ledger.connected(0.01, ok=True)
        one, two = object(), object()
        for i in range(6):
            key = two if i == 5 else one
            ledger.acquired(key, 0.0, 0.001, first=i in (0, 5))
            ledger.released(key, 0.002)
    assert ahead.snapshot().reused == 4  # six checkouts, two connections' first
    assert plain.snapshot().reused == 3  # every connect taken for one checkout


def test_a_first_checkout_is_told_before_it_is_counted() -> None:
    """A collection between the two appends reads the reuse count too low, never too high
    (it never goes down once exported)."""
    ledger = Ledger(tells_firsts=True)
    ledger.acquired(object(), 0.0, 0.001, first=True)
    ledger.firsts.append(None)  # the next checkout's first, its wait not appended yet
    assert ledger.snapshot().reused == 0
    ledger.waits.append(0.001)
    assert ledger.snapshot().reused == 0
    ledger.acquired(object(), 0.0, 0.001)  # a reuse
    assert ledger.snapshot().reused == 1
