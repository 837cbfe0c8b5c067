"""A collection round: upkeep, then a pure reading, then what acts on the reading.

Every collection — a reader's (a Prometheus scrape, an OTLP export tick) or a
``poolwatch.pools()`` call — goes through :meth:`Collector.collect`, which runs, in this
order and in one direction:

1. **upkeep** (``Registry.upkeep``): the one step that writes, on purpose — checkouts whose
   borrower dropped them are settled, checkouts out past the leak threshold are counted as
   leaks (each once, however many collections see it), series gone past ``RETENTION`` are
   removed. Its leak reports go to the leak log. Idempotent per event: any number of
   readers collecting counts and logs each leak once.
2. **reading** (``Registry.read``): every series' levels, read from its pools, and a copy of
   its ledger, as immutable ``SeriesReading``s. Reading changes nothing.
3. **observing**: anti-pattern detection and the sizing history look at the readings and
   keep their own state, by series serial number. They run once per round at most every
   ``OBSERVE_EVERY`` seconds, whatever the number of readers (two readers collecting
   together make one round of detection, not two); ``pools()`` asks for a round now.

The exporter turns the readings (and what detection found) into data points; nothing in it
writes back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from poolwatch import _catalogue as c
from poolwatch._config import Settings
from poolwatch._models import Antipattern, PoolSnapshot, Sizing
from poolwatch._registry import OVERFLOW_NAME, Registry, SeriesReading
from poolwatch._safe import ErrorLog
from poolwatch.diagnostics.antipatterns import Detector
from poolwatch.diagnostics.history import History
from poolwatch.diagnostics.leaks import LeakLog

OBSERVE_EVERY = 1.0
"""Seconds between two rounds of detection and sampling, at most: collections closer than
that (several readers, a scrape right after an export) share the earlier round's findings.
Detection counts rounds (``keepalive_too_long`` wants stale closes at three of them), so a
round must mean time passing, not one more reader."""


class Collection(NamedTuple):
    """One round's readings, with what detection has found for each series."""

    readings: list[SeriesReading]
    antipatterns: Callable[[int], tuple[Antipattern, ...]]
    """By series serial number: the anti-patterns found in it so far."""
    sizing: Callable[[SeriesReading], Sizing | None]
    """The recommended size of a series just read."""


class Collector:
    """Runs collection rounds for every reader and ``pools()``; see the module docstring."""

    def __init__(self, registry: Registry, settings: Settings, errors: ErrorLog) -> None:
        self._registry = registry
        self._errors = errors
        self._settings = settings
        self._lock = threading.Lock()
        self._detector = Detector(settings)
        self._history = History()
        self._leaks = LeakLog(settings)
        self._observed = -OBSERVE_EVERY

    def collect(self, *, observe: bool = False) -> Collection:
        """One round; ``observe`` runs detection and sampling now, even if they ran less than
        ``OBSERVE_EVERY`` seconds ago (``pools()``: the caller asks what is wrong now)."""
        with self._lock:
            self._upkeep()
            readings = self._registry.read()
            now = time.monotonic()
            if observe or now - self._observed >= OBSERVE_EVERY:
                self._observed = now
                self._observe(readings, now)
            return Collection(readings, self._detector.found, self._history.sizing)

    def _upkeep(self) -> None:
        for upkeep in self._registry.upkeep():
            series = upkeep.series
            for report in upkeep.reports:
                try:
                    self._leaks.log(series.name, series.kind, report)
                except Exception as error:
                    self._errors.report("leak log", error)
        for series in self._registry.take_expired():
            self._detector.forget(series.serial)
            self._history.forget(series.serial)

    def _observe(self, readings: list[SeriesReading], now: float) -> None:
        for reading in readings:
            if reading.series.name == OVERFLOW_NAME:  # pools from many places: no one pattern
                continue
            try:
                self._detector.check(reading)
            except Exception as error:
                self._errors.report("anti-patterns", error)
        try:
            self._history.observe(readings, now)
        except Exception as error:
            self._errors.report("sizing history", error)

    def reset_after_fork(self) -> None:
        """In a forked child: a new lock (a parent's thread may have held it), no history."""
        self._lock = threading.Lock()
        self._history.clear()

    def snapshots(self) -> list[PoolSnapshot]:
        """``poolwatch.pools()``: a round with detection now, as public snapshots."""
        collection = self.collect(observe=True)
        snapshots = [snapshot_of(r, collection) for r in collection.readings]
        return sorted(snapshots, key=lambda s: (s.kind, s.name))


def snapshot_of(reading: SeriesReading, collection: Collection) -> PoolSnapshot:
    """The public view of one series reading."""
    series, levels, ledger = reading.series, reading.levels, reading.ledger
    return PoolSnapshot(
        name=series.name,
        kind=series.kind,
        used=levels.used,
        idle=levels.idle,
        max=levels.max,
        pending=levels.pending,
        instances=reading.instances,
        instances_created=reading.instances_created,
        checkouts=ledger.checkouts,
        timeouts=ledger.timeouts,
        connects=ledger.connect[c.CONNECT_OK].observations,
        connect_errors=ledger.connect[c.CONNECT_ERROR].observations
        if c.CONNECT_ERROR in ledger.connect
        else 0,
        closed=dict(ledger.closed),
        leaks=ledger.leaks,
        leaks_active=ledger.leaks_active,
        wait_p99=ledger.wait[c.OUTCOME_ACQUIRED].quantile(0.99),
        attributes=dict(series.attributes),
        idle_max=levels.idle_max,
        reused=ledger.reused,
        antipatterns=collection.antipatterns(series.serial),
        sizing=collection.sizing(reading),
    )
