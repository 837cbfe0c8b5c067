"""The weak registry of live pools: naming, series, the cardinality cap.

Pools are grouped into *series*: one series per exported identity (kind and name). Pools
created at the same place for the same target share a series, so an application that
creates a client per request shows one series with many pool instances instead of
thousands of series. A series owns the ledger its pools report into; counters therefore
stay monotonic when individual pools come and go.

Pools are held by weak reference only: poolwatch never keeps a pool, client or engine
alive. A series outlives its pools: one whose pools are all gone is still exported (nothing
open, its counters as they were) for ``RETENTION`` seconds, and a pool that joins it
meanwhile continues its counters — a client made per call, gone between two collections and
made again at the next call, is one series whose counters only grow. Only a series idle that
long is removed; if its pools come back after that, it starts again from zero with a new
start time, which every reader takes for what it is (a new series, not a reset of the old).
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from poolwatch import _catalogue as c
from poolwatch._advice import Counts, Sizing, sizing
from poolwatch._antipatterns import Antipattern, Detector, Watch
from poolwatch._config import Settings
from poolwatch._ledger import LeakReport, Ledger, LedgerSnapshot, render_stack
from poolwatch._safe import ErrorLog, logger
from poolwatch.adapters._base import Adapter, Levels

_SITES_KEPT = 10
"""Creation sites remembered per allowed series, for naming a second site of a target."""

OVERFLOW_NAME = "_overflow"
"""The ``pool.name`` of the series pools fold into once ``max_pools`` series exist."""

RETENTION = 600.0
"""Seconds a series with no live pool left is kept (and exported) before it is removed:
twice Prometheus's staleness period (5 minutes) and ten times OpenTelemetry's default export
interval (60 s), so that every reader exports its last values, and a client made per call
at any sensible rate never loses its series between two calls."""

SAMPLE_EVERY = 30.0
"""Seconds between two samples of a series' counts kept for sizing advice."""
SAMPLES_KEPT = 10
"""Samples kept: sizing looks at up to the last five minutes."""


class _PoolRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference that knows its key in ``WeakPools``."""

    __slots__ = ("key",)
    key: int


class WeakPools:
    """The live pool instances of a series, held weakly.

    ``weakref.WeakSet`` would do, but iterating it runs Python code (a generator and an
    iteration guard) for every series at every collection; this lists them in C.
    """

    __slots__ = ("__weakref__", "_gone", "_refs")

    def __init__(self) -> None:
        self._refs: dict[int, _PoolRef] = {}
        owner = weakref.ref(self)  # the callback must not keep this object alive (a cycle)

        def gone(ref: _PoolRef) -> None:
            # Runs as the pool is freed, before its id can be reused.
            pools = owner()
            if pools is not None and pools._refs.get(ref.key) is ref:
                del pools._refs[ref.key]

        self._gone = gone  # one callback for every reference

    def add(self, pool: Any) -> None:
        """Hold ``pool`` weakly (again: no change)."""
        key = id(pool)
        held = self._refs.get(key)
        if held is not None and held() is pool:
            return
        ref = _PoolRef(pool, self._gone)
        ref.key = key
        self._refs[key] = ref

    def discard(self, pool: Any) -> None:
        """Stop holding ``pool``."""
        held = self._refs.get(id(pool))
        if held is not None and held() is pool:
            del self._refs[id(pool)]

    def live(self) -> list[Any]:
        """The pools still alive (a copy: collection runs beside the application)."""
        found = [ref() for ref in list(self._refs.values())]
        return [pool for pool in found if pool is not None]

    def __len__(self) -> int:
        return len(self._refs)

    def __bool__(self) -> bool:
        return bool(self._refs)


class Sample(NamedTuple):
    """A series' counts at one moment, for rates over a window (sizing advice)."""

    at: float
    """``time.monotonic()``."""
    checkouts: int
    timeouts: int
    hold_total: float
    holds: int
    wait_total: float


_ZERO = Sample(0.0, 0, 0, 0.0, 0, 0.0)
"""A series' counts at its creation (``at`` set when it is made)."""


class Series:
    """One exported pool identity and the live pool instances behind it."""

    __slots__ = (
        "adapter",
        "antipatterns",
        "attributes",
        "created_ns",
        "export_cache",
        "gone_since",
        "history",
        "instances_created",
        "kind",
        "ledger",
        "name",
        "pools",
        "serial",
        "site",
        "target",
        "watch",
    )

    def __init__(
        self,
        adapter: Adapter,
        *,
        name: str,
        target: str,
        site: str | None,
        attributes: Mapping[str, str | int],
        ledger: Ledger,
        kind: str | None = None,
    ) -> None:
        self.adapter = adapter
        self.kind = kind or adapter.kind
        self.name = name
        self.target = target
        self.site = site
        self.attributes = dict(attributes)
        self.ledger = ledger
        self.pools = WeakPools()
        self.serial = next(_serials)
        """Unique for the process's life: what readers key their previous values by (an
        ``id()`` is reused by a series made after this one is freed)."""
        self.gone_since: float | None = None
        """``time.monotonic()`` when a reading first found no pool of it alive; None while
        it has one."""
        self.created_ns = time.time_ns()
        self.instances_created = 0
        self.export_cache: dict[tuple[str, str], dict[str, str | int]] = {}
        """Exported attributes by (metric, variant), built once by the producer."""
        self.antipatterns: dict[str, Antipattern] = {}
        """Anti-patterns found, by name, in the order found (``_antipatterns.py``)."""
        self.watch = Watch()
        self.history: deque[Sample] = deque([_ZERO._replace(at=time.monotonic())], SAMPLES_KEPT)
        """Counts every ``SAMPLE_EVERY`` seconds, oldest first, from zero at creation."""


_serials = itertools.count(1)


class SeriesReading(NamedTuple):
    """A series as read at one collection: its levels and a copy of its ledger."""

    series: Series
    levels: Levels
    ledger: LedgerSnapshot
    instances: int


@dataclass(frozen=True)
class PoolSnapshot:
    """One pool series as ``poolwatch.pools()`` reports it."""

    name: str
    kind: str
    used: int
    idle: int
    max: int | None
    pending: int
    instances: int
    """Live pool objects behind this series (more than one: same target, same site)."""
    instances_created: int
    """Pool objects created for this series since it appeared."""
    checkouts: int
    timeouts: int
    connects: int
    connect_errors: int
    closed: dict[str, int]
    leaks: int
    leaks_active: int
    wait_p99: float | None
    """Estimated 99th percentile of successful waits, in seconds."""
    attributes: dict[str, str | int] = field(default_factory=dict)
    idle_max: int | None = None
    """The most idle connections the pool keeps; None when it keeps any number."""
    reused: int = 0
    """Checkouts served by a connection that was already open (keep-alive at work).

    Every pool poolwatch knows opens a connection for the checkout that needs one, so the
    checkouts that did not open one — successfully or not — reused a connection.
    """
    antipatterns: tuple[Antipattern, ...] = ()
    """Anti-patterns found in how the pool is configured or used (docs/diagnostics.md)."""
    sizing: Sizing | None = None
    """The recommended size from the last minutes' demand and hold time (Little's law with
    half again as headroom), with its reasoning; None before any connection came back."""

    @property
    def utilization(self) -> float | None:
        """used / max, or None for an unbounded pool."""
        if not self.max:
            return None
        return self.used / self.max

    @property
    def reuse_ratio(self) -> float | None:
        """reused / checkouts: near 1 for a warm pool, 0 when every request connects."""
        return self.reused / self.checkouts if self.checkouts else None

    def __repr__(self) -> str:
        limit = "unbounded" if self.max is None else str(self.max)
        return (
            f"<PoolSnapshot {self.kind} {self.name!r} [used {self.used}, idle {self.idle}, "
            f"max {limit}, pending {self.pending} | checkouts {self.checkouts}, "
            f"timeouts {self.timeouts}]>"
        )


def _sum_levels(readings: list[Levels]) -> Levels:
    if len(readings) == 1:
        return readings[0]
    if not readings:  # every pool of the series is gone: nothing open, no limit
        return Levels(0, 0, None, 0)

    def total(values: list[int | None]) -> int | None:
        return None if any(v is None for v in values) else sum(v for v in values if v)

    return Levels(
        used=sum(r.used for r in readings),
        idle=sum(r.idle for r in readings),
        max=total([r.max for r in readings]),
        pending=sum(r.pending for r in readings),
        idle_max=total([r.idle_max for r in readings]),
        idle_min=total([r.idle_min for r in readings]),
        hosts=tuple(host for r in readings for host in r.hosts),
    )


class Registry:
    """Every tracked pool, grouped into series, weakly."""

    def __init__(self, settings: Settings, errors: ErrorLog) -> None:
        self._settings = settings
        self._errors = errors
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], Series] = {}
        self._of_pool: weakref.WeakKeyDictionary[Any, Series] = weakref.WeakKeyDictionary()
        self._first_site: dict[tuple[str, str], str | None] = {}
        self._overflow_kinds: set[str] = set()
        self._detector = Detector(settings)
        self.folded = 0
        """Pools folded into an overflow series because of the ``max_pools`` cap."""

    def _new_ledger(self, adapter: Adapter) -> Ledger:
        s = self._settings
        return Ledger(
            s.buckets,
            s.lifetime_buckets,
            s.leak_threshold,
            s.leak_stacks,
            connects_in_checkout=adapter.connects_in_checkout,
        )

    def _name_for(self, kind: str, target: str, site: str | None, name: str | None) -> str:
        from poolwatch._naming import derived_name  # here: this method is all naming here

        if name is not None:
            return name
        plain = derived_name(target)  # printable, capped: the name as shown and exported
        chosen = self._settings.pool_names.get(plain)
        if chosen is not None:
            return chosen
        first = self._first_site.get((kind, target))
        if first is None and len(self._first_site) < _SITES_KEPT * self._settings.max_pools:
            # Bounded: an application with endless distinct targets (a URL per tenant)
            # folds them into the overflow series anyway; past this, names stay the target.
            first = self._first_site[(kind, target)] = site
        if site is None or first is None or site == first:
            return plain
        derived = derived_name(target, site)
        return self._settings.pool_names.get(derived, derived)

    def track(
        self,
        pool: Any,
        adapter: Adapter,
        *,
        target: str,
        site: str | None = None,
        name: str | None = None,
        attributes: Mapping[str, str | int] | None = None,
        kind: str | None = None,
    ) -> Ledger:
        """Add ``pool`` to its series (creating it, or folding past the cap)."""
        kind = kind or adapter.kind
        with self._lock:
            series_name = self._name_for(kind, target, site, name)
            key = (kind, series_name)
            current = self._of_pool.get(pool)
            if current is not None:
                if name is None or (current.kind, current.name) == key:
                    return current.ledger
                current.pools.discard(pool)  # explicitly renamed: move it
                if not current.pools:
                    self._series.pop((current.kind, current.name), None)
            series = self._series.get(key)
            if series is None:
                # O(kinds), not O(series): registration stays cheap with many series.
                overflow = sum((k, OVERFLOW_NAME) in self._series for k in self._overflow_kinds)
                if len(self._series) - overflow >= self._settings.max_pools:
                    self.folded += 1
                    if self.folded == 1:
                        logger.warning(
                            "poolwatch: more than %d pool series (max_pools); further pools, "
                            "starting with %s %r, are folded into the %r series",
                            self._settings.max_pools,
                            kind,
                            series_name,
                            OVERFLOW_NAME,
                        )
                    key = (kind, OVERFLOW_NAME)
                    self._overflow_kinds.add(kind)
                    series = self._series.get(key)
                    if series is None:
                        series = Series(
                            adapter,
                            name=OVERFLOW_NAME,
                            target=OVERFLOW_NAME,
                            site=None,
                            attributes={},
                            ledger=self._new_ledger(adapter),
                            kind=kind,
                        )
                        self._series[key] = series
                else:
                    series = Series(
                        adapter,
                        name=series_name,
                        target=target,
                        site=site,
                        attributes=attributes or {},
                        ledger=self._new_ledger(adapter),
                        kind=kind,
                    )
                    self._series[key] = series
            elif series.name == OVERFLOW_NAME:
                self.folded += 1
            series.pools.add(pool)
            series.gone_since = None
            series.instances_created += 1
            self._of_pool[pool] = series
            return series.ledger

    def ledgers(self) -> list[Ledger]:
        """The ledger of every series."""
        with self._lock:
            return [series.ledger for series in self._series.values()]

    def series_of(self, pool: Any) -> Series | None:
        """The series ``pool`` reports into, if tracked."""
        with self._lock:
            return self._of_pool.get(pool)

    def forget(self, pool: Any) -> None:
        """Take ``pool`` out of its series' levels; the series and its ledger stay."""
        with self._lock:
            series = self._of_pool.pop(pool, None)
            if series is not None:
                series.pools.discard(pool)

    def untrack_adapter(self, adapter: Adapter) -> None:
        """Forget every series of ``adapter``."""
        with self._lock:
            for key in [k for k, s in self._series.items() if s.adapter is adapter]:
                del self._series[key]

    def read(self) -> list[SeriesReading]:
        """Read every series; a series with no live pool left for ``RETENTION`` seconds is
        read one last time, then removed."""
        with self._lock:
            everything = list(self._series.items())
        now = time.perf_counter()
        now_monotonic = time.monotonic()
        readings: list[SeriesReading] = []
        expired: list[tuple[tuple[str, str], Series]] = []
        for key, series in everything:
            pools = series.pools.live()
            if pools:
                series.gone_since = None
            elif series.gone_since is None:
                series.gone_since = now_monotonic
            elif now_monotonic - series.gone_since >= RETENTION:
                expired.append((key, series))
            reading = self._read_series(series, pools, now)
            if reading is not None:
                _sample(series, reading.ledger, now_monotonic)
                readings.append(reading)
        if expired:
            with self._lock:
                for key, series in expired:
                    if self._series.get(key) is series and not series.pools:
                        del self._series[key]
        return readings

    def _read_series(self, series: Series, pools: list[Any], now: float) -> SeriesReading | None:
        """One series: abandoned checkouts settled, levels, ledger, anti-patterns."""
        try:
            series.adapter.publish_checkouts(series.ledger, pools)
        except Exception as error:
            self._errors.report(f"{series.kind} checkouts", error)
        if series.ledger.active:  # first: what it settles leaves the levels, too
            try:
                series.adapter.find_abandoned(series.ledger)
            except Exception as error:
                self._errors.report(f"{series.kind} abandoned checkouts", error)
        levels: list[Levels] = []
        for pool in pools:
            try:
                levels.append(series.adapter.levels(pool))
            except Exception as error:  # a pool in a state we did not foresee
                self._errors.report(f"{series.kind} levels", error)
        try:
            snapshot = series.ledger.snapshot(now)
            for report in series.ledger.take_reports():
                _log_leak(series, report, self._settings)
        except Exception as error:
            self._errors.report("ledger snapshot", error)
            return None
        summed = _sum_levels(levels)
        if series.name != OVERFLOW_NAME:  # pools from many places: no one pattern
            try:
                self._detector.check(series, summed, snapshot, pools)
            except Exception as error:
                self._errors.report("anti-patterns", error)
        return SeriesReading(series, summed, snapshot, len(pools))

    def pool_sockets(self) -> set[int]:
        """File descriptors of every tracked pool's open connections (the process view)."""
        with self._lock:
            everything = list(self._series.values())
        found: set[int] = set()
        for series in everything:
            for pool in series.pools.live():
                try:
                    found.update(series.adapter.sockets(pool))
                except Exception as error:
                    self._errors.report(f"{series.kind} sockets", error)
        return found

    def reset_after_fork(self) -> None:
        """In a forked child: zero every ledger so the child reports only its own work."""
        self._lock = threading.Lock()
        for series in self._series.values():
            series.ledger.reset()
            series.created_ns = time.time_ns()
            series.instances_created = len(series.pools)
            series.history.clear()
            series.history.append(_ZERO._replace(at=time.monotonic()))


def _sample(series: Series, ledger: LedgerSnapshot, now: float) -> None:
    """Keep a sample of the series' counts every ``SAMPLE_EVERY`` seconds (``now``:
    ``time.monotonic()``)."""
    history = series.history
    if now - history[-1].at >= SAMPLE_EVERY:
        use = ledger.use
        waited = ledger.wait[c.OUTCOME_ACQUIRED].total
        history.append(
            Sample(now, ledger.checkouts, ledger.timeouts, use.total, use.observations, waited)
        )


def _sizing(series: Series, levels: Levels, ledger: LedgerSnapshot) -> Sizing | None:
    """Little's law over the window the history covers (from creation at first)."""
    before = series.history[0]
    seconds = time.monotonic() - before.at
    use = ledger.use
    now = Counts(
        series.kind,
        series.name,
        used=levels.used,
        max=levels.max,
        checkouts=ledger.checkouts,
        timeouts=ledger.timeouts,
        hold_total=use.total,
        holds=use.observations,
        wait_total=ledger.wait[c.OUTCOME_ACQUIRED].total,
    )
    then = Counts(
        series.kind,
        series.name,
        checkouts=before.checkouts,
        timeouts=before.timeouts,
        hold_total=before.hold_total,
        holds=before.holds,
        wait_total=before.wait_total,
    )
    return sizing(now, then, seconds)


def _log_leak(series: Series, report: LeakReport, settings: Settings) -> None:
    """One WARNING per leak, with the borrower's stack when captured; INFO on its return."""
    pool = f"{series.name!r} ({series.kind})"
    threshold = f"{settings.leak_threshold:g} s"
    if report.returned and not report.counted:
        logger.info(
            "poolwatch: the leaked connection of pool %s came back after %.1f s",
            pool,
            report.held,
        )
        return
    if report.collected:
        when = "was garbage-collected without being returned, after"
    elif report.returned:
        when = "was held for"
    else:
        when = "has been checked out for"
    if report.stack:
        where = "checked out at:\n" + render_stack(report.stack)
    elif settings.leak_stacks == "auto":
        where = (
            "the borrower's stack was not captured; it is from now on for this pool's "
            "checkouts (leak_stacks='auto')"
        )
    else:
        where = "the borrower's stack is not captured (leak_stacks='off')"
    past = "" if report.collected else f", past the leak threshold of {threshold}"
    logger.warning(
        "poolwatch: a connection of pool %s %s %.1f s%s; %s",
        pool,
        when,
        report.held,
        past,
        where.rstrip(),
    )


def snapshot_of(reading: SeriesReading) -> PoolSnapshot:
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
        instances_created=series.instances_created,
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
        antipatterns=tuple(series.antipatterns.values()),
        sizing=_sizing(series, levels, ledger),
    )
