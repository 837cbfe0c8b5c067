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
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from poolwatch import _catalogue as c
from poolwatch._config import Settings
from poolwatch._ledger import LeakReport, Ledger, LedgerSnapshot, WaitTracer
from poolwatch._models import Levels
from poolwatch._safe import ErrorLog, logger
from poolwatch.adapters._base import Adapter

_SITES_KEPT = 10
"""Creation sites remembered per allowed series, for naming a second site of a target."""

OVERFLOW_NAME = "_overflow"
"""The ``pool.name`` of the series pools fold into once ``max_pools`` series exist."""

RETENTION = 600.0
"""Seconds a series with no live pool left is kept (and exported) before it is removed:
twice Prometheus's staleness period (5 minutes) and ten times OpenTelemetry's default export
interval (60 s), so that every reader exports its last values, and a client made per call
at any sensible rate never loses its series between two calls."""


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

    def refs(self) -> tuple[weakref.ref[Any], ...]:
        """The weak references themselves (a copy; some may have died since)."""
        return tuple(self._refs.values())

    def __len__(self) -> int:
        return len(self._refs)

    def __bool__(self) -> bool:
        return bool(self._refs)


class Series:
    """One exported pool identity and the live pool instances behind it.

    Written by the registry alone (which pools belong to it, since when none does); what
    the exporter and the diagnostics keep about a series they keep themselves, by
    ``serial``.
    """

    __slots__ = (
        "adapter",
        "attributes",
        "created_ns",
        "gone_since",
        "instances_created",
        "kind",
        "ledger",
        "name",
        "pools",
        "serial",
        "site",
        "target",
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
        ledger.trace_attributes = {c.POOL_NAME: name, c.POOL_KIND: self.kind, **attributes}
        self.pools = WeakPools()
        self.serial = next(_serials)
        """Unique for the process's life: what readers key their previous values by (an
        ``id()`` is reused by a series made after this one is freed)."""
        self.gone_since: float | None = None
        """``time.monotonic()`` when a reading first found no pool of it alive; None while
        it has one."""
        self.created_ns = time.time_ns()
        """When its counters started (the start time of its cumulative points)."""
        self.instances_created = 0


_serials = itertools.count(1)


class SeriesReading(NamedTuple):
    """A series as read at one moment: immutable, and reading it changed nothing."""

    series: Series
    """Who: kind, name, attributes, serial, start time (read-only to whoever reads this)."""
    levels: Levels
    """Summed over its live pools, read from them."""
    ledger: LedgerSnapshot
    """A copy of what its pools' hooks recorded."""
    instances: int
    """Live pools behind it."""
    instances_created: int
    """Pools that have joined it since it was made."""
    pools: tuple[weakref.ref[Any], ...]
    """Its pools, for the diagnostics' reads of their configuration (never written), held
    weakly: a reading outlives the read (an exporter turns it into points), and a pool the
    application drops meanwhile is freed at once, as it is without poolwatch."""


class Upkeep(NamedTuple):
    """What one series' upkeep found: leaks to log."""

    series: Series
    reports: list[LeakReport]


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

    def __init__(
        self, settings: Settings, errors: ErrorLog, tracer: WaitTracer | None = None
    ) -> None:
        self._settings = settings
        self._errors = errors
        self._tracer = tracer if settings.wait_span_threshold is not None else None
        """Records slow waits as spans (``_tracing``), when on."""
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], Series] = {}
        self._of_pool: weakref.WeakKeyDictionary[Any, Series] = weakref.WeakKeyDictionary()
        self._first_site: dict[tuple[str, str], str | None] = {}
        self._overflow_kinds: set[str] = set()
        self._expiring: list[tuple[tuple[str, str], Series]] = []
        """Series found expired at the last upkeep: removed at the next, after one last read."""
        self._expired: list[Series] = []
        self.on_track: Callable[[], None] | None = None
        """Called before a pool is tracked (a forked child's first pool completes its
        set-up: ``_api``, see Fork in docs/architecture.md)."""
        self.folded = 0
        """Pools folded into an overflow series because of the ``max_pools`` cap."""

    def _new_ledger(self, adapter: Adapter) -> Ledger:
        s = self._settings
        ledger = Ledger(
            s.buckets,
            s.lifetime_buckets,
            s.leak_threshold,
            s.leak_stacks,
            connects_in_checkout=adapter.connects_in_checkout,
            tells_firsts=adapter.tells_firsts,
        )
        ledger.connects_in_wait = adapter.connects_in_wait
        if self._tracer is not None and s.wait_span_threshold is not None:
            ledger.tracer = self._tracer
            ledger.span_threshold = s.wait_span_threshold
        return ledger

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
        if self.on_track is not None:
            self.on_track()
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

    # -- what adapters see of the core (adapters._base.Tracker) ---------------------------
    def kind_of(self, pool: Any) -> str | None:
        """The ``pool.kind`` of the series ``pool`` reports into; None if untracked."""
        with self._lock:
            series = self._of_pool.get(pool)
            return series.kind if series is not None else None

    def replace(self, old: Any, new: Any) -> Ledger | None:
        """``new`` takes ``old``'s place in its series; ``old`` leaves the series' levels."""
        with self._lock:
            series = self._of_pool.pop(old, None)
            if series is None:
                return None
            series.pools.discard(old)
            current = self._of_pool.get(new)
            if current is not None and current is not series:
                current.pools.discard(new)
            series.pools.add(new)
            series.gone_since = None
            series.instances_created += 1
            self._of_pool[new] = series
            return series.ledger

    def report(self, where: str, error: BaseException) -> None:
        """Record a failure inside poolwatch: logged once per ``where``, never raised."""
        self._errors.report(where, error)

    def untrack_adapter(self, adapter: Adapter) -> None:
        """Forget every series of ``adapter``."""
        with self._lock:
            for key in [k for k, s in self._series.items() if s.adapter is adapter]:
                del self._series[key]

    def read(self) -> list[SeriesReading]:
        """Every series as it is now. Pure: nothing any reader or pool can see changes."""
        with self._lock:
            everything = list(self._series.values())
        now = time.perf_counter()
        readings = []
        for series in everything:
            reading = self._read_series(series, now)
            if reading is not None:
                readings.append(reading)
        return readings

    def _read_series(self, series: Series, now: float) -> SeriesReading | None:
        pools = series.pools.live()
        adapter = series.adapter
        try:
            active = adapter.checkouts(pools)
        except Exception as error:
            self._errors.report(f"{series.kind} checkouts", error)
            active = None
        levels: list[Levels] = []
        for pool in pools:
            try:
                levels.append(adapter.levels(pool))
            except Exception as error:  # a pool in a state we did not foresee
                self._errors.report(f"{series.kind} levels", error)
        try:
            table = series.ledger.active if active is None else active
            unconnected = adapter.unconnected(table) if table else 0
        except Exception as error:
            self._errors.report(f"{series.kind} checkouts", error)
            unconnected = 0
        try:
            snapshot = series.ledger.snapshot(now, active, unconnected)
        except Exception as error:
            self._errors.report("ledger snapshot", error)
            return None
        return SeriesReading(
            series,
            _sum_levels(levels),
            snapshot,
            len(pools),
            series.instances_created,
            series.pools.refs(),
        )

    def upkeep(self) -> list[Upkeep]:
        """The registry's own upkeep, before a reading: checkouts whose borrower dropped them
        settled, checkouts out past the leak threshold counted as leaks (each once), and
        series with no live pool for ``RETENTION`` seconds removed — after one last reading:
        a series is found expired at one upkeep and removed at the next. Returns the leak
        reports to log."""
        with self._lock:
            for key, series in self._expiring:
                if self._series.get(key) is series and not series.pools:
                    del self._series[key]
                    self._expired.append(series)
            self._expiring = []
            everything = list(self._series.items())
        now = time.perf_counter()
        now_monotonic = time.monotonic()
        found: list[Upkeep] = []
        expiring: list[tuple[tuple[str, str], Series]] = []
        for key, series in everything:
            # A pool's reference leaves the set as the pool is freed: no need to call each.
            if series.pools:
                series.gone_since = None
            elif series.gone_since is None:
                series.gone_since = now_monotonic
            elif now_monotonic - series.gone_since >= RETENTION:
                expiring.append((key, series))
            try:
                reports = self._upkeep_series(series, now)
            except Exception as error:
                self._errors.report("ledger sweep", error)
                continue
            if reports:
                found.append(Upkeep(series, reports))
        with self._lock:
            self._expiring = expiring
        return found

    def _upkeep_series(self, series: Series, now: float) -> list[LeakReport]:
        ledger, adapter = series.ledger, series.adapter
        if not ledger.active and not ledger.has_reports and not _reads_checkouts(adapter):
            return []  # nothing out, nothing to log: most series of a process with many
        try:
            active = adapter.checkouts(series.pools.live())
            table = ledger.active if active is None else active
            if table:
                adapter.find_abandoned(ledger, table)
        except Exception as error:
            self._errors.report(f"{series.kind} abandoned checkouts", error)
            active = None
        return ledger.sweep(now, active)

    def take_expired(self) -> list[Series]:
        """Series removed by upkeep since the last call (their state elsewhere can go)."""
        with self._lock:
            expired, self._expired = self._expired, []
            return expired

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


def _reads_checkouts(adapter: Adapter) -> bool:
    """Whether ``adapter`` reads what is out from its pools (``Adapter.checkouts``), rather
    than keeping it in ``Ledger.active``."""
    return type(adapter).checkouts is not Adapter.checkouts
